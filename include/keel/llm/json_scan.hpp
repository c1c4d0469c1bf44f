// keel::llm::json_scan: a strict, allocation-light JSON reader for the hot path. It reads the
// fields a caller names straight from the text, builds no tree, and declines anything it is not
// sure of; json_writer.hpp is its counterpart for writing.
#pragma once

// Why
// ---
// Reading an OpenAI completion (383 bytes from the mock) into an nlohmann tree was a quarter of
// keel serve's instructions per request (callgrind, 31,800 of 142,000; issue 18), and reading the
// caller's request another 15%, three quarters of each in
// nlohmann's lexer (about 55 instructions per byte: every character goes through an input
// adapter and is pushed into two buffers). nlohmann's SAX interface skips the tree but keeps the
// lexer (measured 35-40% faster than the tree, not more). Nothing in keel's chosen libraries
// reads JSON at a few instructions per byte, so this one reader is written by hand.
//
// Design: recursive descent driven by the caller (`object` calls back per key, `array` per
// element; the callback reads the value or `skip`s it), validating the whole text as it goes.
// It is a fast path, never the only path: every function returns false to **decline** — on
// invalid JSON, and equally on anything valid it does not take (a number it would have to
// round, a UTF-8 byte-order mark, nesting deeper than `max_json_depth`) — and the caller then
// reads the text with nlohmann as before. So a decline is always safe, and what this reader
// accepts must be exactly what nlohmann accepts with the same values: fuzz/fuzz_llm_response
// (and fuzz/fuzz_gateway_request for the gateway's requests) checks that differentially on
// every input.
//
// Users: `keel::llm::openai::parse_response` without `raw`, and the gateway's
// `parse_chat_request`. Each reads a fixed set of fields and declines on any other shape.
//
// Accepted as nlohmann does: RFC 8259 grammar; whitespace space, tab, CR, LF; strings with every
// escape (`\uXXXX` with surrogate pairs) and valid UTF-8 only (RFC 3629, no overlongs or
// surrogates); control characters below 0x20 refused inside strings. Declined although valid:
// a number whose double is out of range, a negative or non-integer number where a count is read.
//
// Thread safety: a value type; one object per text.

#include <keel/llm/json_depth.hpp>
#include <keel/llm/json_writer.hpp>

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>

namespace keel::llm {

/// Reads one JSON text by recursive descent, validating as it goes; see the overview. Every
/// reading function returns false to decline (invalid text, or a shape not taken).
/// Not copyable in effect: views the text, which must outlive it.
class json_scan {
 public:
  /// Reads `text` (not copied).
  explicit json_scan(std::string_view text) noexcept
      : p_(text.data()), end_(text.data() + text.size()) {}

  /// What a value is, from its first character.
  enum class kind { object, array, string, number, boolean, null, none };
  /// The kind of the next value (whitespace skipped); `none` at the end of the text or before a
  /// character that starts no value. Reads nothing.
  kind peek() noexcept {
    ws();
    if (p_ == end_) {
      return kind::none;
    }
    switch (*p_) {
      case '{':
        return kind::object;
      case '[':
        return kind::array;
      case '"':
        return kind::string;
      case 't':
      case 'f':
        return kind::boolean;
      case 'n':
        return kind::null;
      default:
        return (*p_ == '-' || (*p_ >= '0' && *p_ <= '9')) ? kind::number : kind::none;
    }
  }

  /// Reads an object, calling `f(std::string_view key)` with the reader at each member's value;
  /// `f` must read the value (or `skip` it) and return false to decline. The key view is valid
  /// until `f` reads the value (a nested key may reuse its storage). Declines beyond
  /// `max_json_depth` levels.
  template <class F>
  bool object(F&& f) {
    if (!enter('{')) {
      return false;
    }
    ws();
    if (p_ != end_ && *p_ == '}') {
      return leave();
    }
    for (;;) {
      ws();
      std::string_view k;
      if (!key(k)) {
        return false;
      }
      ws();
      if (p_ == end_ || *p_ != ':') {
        return false;
      }
      ++p_;
      bool more = false;
      if (!f(k) || !separator('}', more)) {
        return false;
      }
      if (!more) {
        return true;
      }
    }
  }

  /// Reads an array, calling `f(std::size_t index)` with the reader at each element; as
  /// `object` otherwise.
  template <class F>
  bool array(F&& f) {
    if (!enter('[')) {
      return false;
    }
    ws();
    if (p_ != end_ && *p_ == ']') {
      return leave();
    }
    for (std::size_t i = 0;; ++i) {
      bool more = false;
      if (!f(i) || !separator(']', more)) {
        return false;
      }
      if (!more) {
        return true;
      }
    }
  }

  /// Reads a string into `out` (unescaped).
  bool string(std::string& out) {
    ws();
    std::string_view plain;
    if (!scan_string(plain, &out)) {
      return false;
    }
    if (plain.data() != nullptr) {
      out.assign(plain);
    }
    return true;
  }

  /// Reads a string, or `null` as an empty string; declines anything else without reading it
  /// (chosen by the first character: a failed read may stop inside a string).
  bool optional_string(std::string& out) {
    switch (peek()) {
      case kind::null:
        out.clear();
        return null();
      case kind::string:
        return string(out);
      default:
        return false;
    }
  }

  /// Sets `seen` and returns true the first time: for a member a caller reads, so that a
  /// member given twice declines (nlohmann's tree keeps the last one; matching that is not
  /// worth the code).
  static bool first_time(bool& seen) noexcept {
    const bool was = seen;
    seen = true;
    return !was;
  }

  /// Reads `null`.
  bool null() noexcept {
    ws();
    return literal("null");
  }

  /// Reads a non-negative integer that fits in a `long long`; declines anything else (negative,
  /// fraction, exponent, too large: nlohmann's tree would hold a different type or value).
  bool count(long long& out) noexcept {
    ws();
    const char* start = p_;
    if (p_ == end_ || *p_ < '0' || *p_ > '9') {
      return false;
    }
    if (!scan_number()) {
      return false;
    }
    const auto r = std::from_chars(start, p_, out);
    return r.ec == std::errc() && r.ptr == p_;  // a fraction or exponent stops from_chars early
  }

  /// Reads a number as a double (an integer converted as nlohmann's `get<double>` converts it);
  /// declines one out of a double's range.
  bool number(double& out) noexcept {
    ws();
    const char* start = p_;
    if (!scan_number()) {
      return false;
    }
    if (!float_) {
      // nlohmann holds an integer and converts it: "-0" is then 0.0, not -0.0.
      long long i = 0;
      const auto r = std::from_chars(start, p_, i);
      out = static_cast<double>(i);
      return r.ec == std::errc() && r.ptr == p_;
    }
    const auto r = std::from_chars(start, p_, out);
    return r.ec == std::errc() && r.ptr == p_;
  }

  /// Reads `true` or `false`.
  bool boolean(bool& out) noexcept {
    ws();
    if (literal("true")) {
      out = true;
      return true;
    }
    out = false;
    return literal("false");
  }

  /// Reads and discards any value, validating it.
  bool skip() {
    switch (peek()) {
      case kind::object:
        return object([this](std::string_view) { return skip(); });
      case kind::array:
        return array([this](std::size_t) { return skip(); });
      case kind::string: {
        std::string_view ignored;
        return scan_string(ignored, nullptr);
      }
      case kind::number:
        return scan_number();
      case kind::boolean:
        return literal(*p_ == 't' ? "true" : "false");
      case kind::null:
        return literal("null");
      case kind::none:
        return false;
    }
    return false;
  }

  /// True if only whitespace is left.
  bool at_end() noexcept {
    ws();
    return p_ == end_;
  }

 private:
  void ws() noexcept {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) {
      ++p_;
    }
  }
  bool literal(std::string_view word) noexcept {
    if (static_cast<std::size_t>(end_ - p_) < word.size() ||
        std::string_view(p_, word.size()) != word) {
      return false;
    }
    p_ += word.size();
    return true;
  }
  bool enter(char open) noexcept {
    ws();
    if (p_ == end_ || *p_ != open || depth_ == max_json_depth) {
      return false;
    }
    ++p_;
    ++depth_;
    return true;
  }
  bool leave() noexcept {
    ++p_;
    --depth_;
    return true;
  }
  // After a member or an element: a comma (consumed, `more` set) or `close` (consumed, the level
  // left); false for anything else.
  bool separator(char close, bool& more) noexcept {
    ws();
    if (p_ != end_ && *p_ == ',') {
      ++p_;
      more = true;
      return true;
    }
    more = false;
    return p_ != end_ && *p_ == close && leave();
  }
  bool key(std::string_view& k) {
    if (!scan_string(k, &key_)) {
      return false;
    }
    if (k.data() == nullptr) {
      k = key_;
    }
    return true;
  }

  // -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?, and (like nlohmann) a finite double when it
  // has a fraction or exponent; from_chars also refuses an underflow, which is only a decline.
  bool scan_number() noexcept {
    const char* start = p_;
    if (p_ != end_ && *p_ == '-') {
      ++p_;
    }
    if (p_ == end_) {
      return false;
    }
    if (*p_ == '0') {
      ++p_;
    } else if (*p_ >= '1' && *p_ <= '9') {
      digits();
    } else {
      return false;
    }
    bool is_float = false;
    if (p_ != end_ && *p_ == '.') {
      ++p_;
      if (!digits()) {
        return false;
      }
      is_float = true;
    }
    if (p_ != end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ != end_ && (*p_ == '+' || *p_ == '-')) {
        ++p_;
      }
      if (!digits()) {
        return false;
      }
      is_float = true;
    }
    float_ = is_float;
    // An integer too large for 64 bits becomes a double in nlohmann; decline rather than judge.
    if (!is_float) {
      return p_ - start <= 19;
    }
    double d = 0;
    const auto r = std::from_chars(start, p_, d);
    return r.ec == std::errc() && r.ptr == p_;
  }
  bool digits() noexcept {
    const char* start = p_;
    while (p_ != end_ && *p_ >= '0' && *p_ <= '9') {
      ++p_;
    }
    return p_ != start;
  }

  // Scans a string. With no escapes, `plain` views it in the text; with escapes, `plain` is
  // null and the unescaped string is in `*out` (not built when `out` is null).
  bool scan_string(std::string_view& plain, std::string* out) {
    if (p_ == end_ || *p_ != '"') {
      return false;
    }
    const char* start = ++p_;
    bool escaped = false;
    for (;;) {
      // A run of plain ASCII (most of any body), eight bytes at a time while it lasts, then
      // byte by byte; appended at once.
      const char* run = p_;
      p_ = detail::skip_plain_ascii(p_, end_);
      while (p_ != end_ && plain_ascii(static_cast<unsigned char>(*p_))) {
        ++p_;
      }
      if (escaped && out != nullptr) {
        out->append(run, p_);
      }
      if (p_ == end_) {
        return false;
      }
      const auto c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        break;
      }
      if (c < 0x20) {
        return false;
      }
      if (c == '\\') {
        if (!escaped && out != nullptr) {
          out->assign(start, p_);
        }
        escaped = true;
        if (!escape(out)) {
          return false;
        }
        continue;
      }
      const char* seq = p_;
      if (!utf8()) {  // c >= 0x80: the run stopped at neither a quote, a control nor an escape
        return false;
      }
      if (escaped && out != nullptr) {
        out->append(seq, p_);
      }
    }
    plain = escaped ? std::string_view()
                    : std::string_view(start, static_cast<std::size_t>(p_ - start));
    ++p_;
    return true;
  }

  static bool plain_ascii(unsigned char c) noexcept {
    return c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
  }

  // One escape sequence at `\`, appended (unescaped) to `*out` when it is not null.
  bool escape(std::string* out) {
    ++p_;
    if (p_ == end_) {
      return false;
    }
    char c = 0;
    switch (*p_) {
      case '"':
      case '\\':
      case '/':
        c = *p_;
        break;
      case 'b':
        c = '\b';
        break;
      case 'f':
        c = '\f';
        break;
      case 'n':
        c = '\n';
        break;
      case 'r':
        c = '\r';
        break;
      case 't':
        c = '\t';
        break;
      case 'u': {
        std::uint32_t cp = 0;
        if (!hex4(cp)) {
          return false;
        }
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
          return false;  // a low surrogate alone
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
          std::uint32_t low = 0;
          if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') {
            return false;
          }
          ++p_;
          if (!hex4(low) || low < 0xDC00 || low > 0xDFFF) {
            return false;
          }
          cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        }
        if (out != nullptr) {
          append_utf8(*out, cp);
        }
        return true;
      }
      default:
        return false;
    }
    ++p_;
    if (out != nullptr) {
      out->push_back(c);
    }
    return true;
  }
  // At the `u` of `\uXXXX`: reads the four hex digits and leaves the reader after them.
  bool hex4(std::uint32_t& v) noexcept {
    if (end_ - p_ < 5) {
      return false;
    }
    v = 0;
    for (int i = 1; i <= 4; ++i) {
      const char h = p_[i];
      std::uint32_t d = 0;
      if (h >= '0' && h <= '9') {
        d = static_cast<std::uint32_t>(h - '0');
      } else if (h >= 'a' && h <= 'f') {
        d = static_cast<std::uint32_t>(h - 'a' + 10);
      } else if (h >= 'A' && h <= 'F') {
        d = static_cast<std::uint32_t>(h - 'A' + 10);
      } else {
        return false;
      }
      v = v << 4 | d;
    }
    p_ += 5;
    return true;
  }
  static void append_utf8(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  // One multi-byte UTF-8 sequence (detail::utf8_sequence, json_writer.hpp).
  bool utf8() noexcept {
    const std::size_t n = detail::utf8_sequence(p_, end_);
    p_ += n;
    return n != 0;
  }

  const char* p_;
  const char* end_;
  std::size_t depth_ = 0;
  bool float_ = false;  // the last number read had a fraction or an exponent
  std::string key_;     // a key with escapes, unescaped
};

}  // namespace keel::llm
