// keel::llm::json_writer: JSON text written straight into a string, for the bodies keel sends on
// every call (provider requests, the gateway's completions and stream chunks).
#pragma once

// Why
// ---
// keel built every body it sends as an nlohmann::json tree and dumped it. Per call that is a map
// node and a string for every member, copies of every nested initializer list, and a tree walk
// to serialise: in `keel serve` (issue 18), building the upstream request and the OpenAI
// completion this way took 27% of the gateway's instructions per request (callgrind, one-entry
// config against the mock), and the allocations were the largest part of its malloc traffic.
// These bodies have a fixed shape known at compile time, so the tree buys nothing.
//
// Design: a writer that appends to a caller's string, tracking only whether the next value needs
// a comma (a key or the start of an array clears it, every value and every close sets it), so a
// body reads in the code as its JSON does. Strings are escaped exactly as
// `nlohmann::json::dump(-1, ' ', false, error_handler_t::replace)` escapes them (the serialiser
// keel used before, and still uses to read): pure ASCII is escaped here (`\"`, `\\`, `\b`, `\f`,
// `\n`, `\r`, `\t`, other control bytes as `\u00XX`), well-formed UTF-8 (RFC 3629) is copied as
// is, and a string with an ill-formed sequence is handed whole to nlohmann, which replaces the
// bytes it rejects with U+FFFD. Floating-point
// numbers and embedded JSON values (a `response_format` schema, `metadata`, tool parameters) are
// dumped by nlohmann too, so numbers print as before. Key order is the order written (OpenAI's
// own order where keel writes OpenAI's shapes), where the tree sorted keys alphabetically; JSON
// objects are unordered, and no reader keel knows of depends on order.
//
// The writer does not check structure: it is used by code whose shape is fixed, and the tests
// parse what each body function writes.
//
// Thread safety: an instance is used by one thread; `append_json_string` is a pure function.

#include <nlohmann/json.hpp>

#include <bit>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

namespace keel::llm {

namespace detail {

// For each byte: 0 copied as is, 1 escaped, 2 not ASCII (the string goes to nlohmann).
struct json_escape_table {
  unsigned char kind[256] = {};
  constexpr json_escape_table() {
    for (int c = 0; c < 0x20; ++c) {
      kind[c] = 1;
    }
    kind[static_cast<unsigned char>('"')] = 1;
    kind[static_cast<unsigned char>('\\')] = 1;
    for (int c = 0x80; c < 0x100; ++c) {
      kind[c] = 2;
    }
  }
};
inline constexpr json_escape_table json_escapes{};

// The length of the well-formed multi-byte UTF-8 sequence at `p` (before `end`), or 0: RFC 3629
// table 3-7, so no overlong forms, no surrogates and nothing beyond U+10FFFF, exactly what
// nlohmann's lexer and serialiser accept.
inline std::size_t utf8_sequence(const char* p, const char* end) noexcept {
  const auto b0 = static_cast<unsigned char>(p[0]);
  std::size_t n = 0;  // continuation bytes
  unsigned char lo = 0x80;
  unsigned char hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 1;
  } else if (b0 == 0xE0) {
    n = 2;
    lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    n = 2;
  } else if (b0 == 0xED) {
    n = 2;
    hi = 0x9F;
  } else if (b0 == 0xF0) {
    n = 3;
    lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    n = 3;
  } else if (b0 == 0xF4) {
    n = 3;
    hi = 0x8F;
  } else {
    return 0;
  }
  if (static_cast<std::size_t>(end - p) <= n) {
    return 0;
  }
  for (std::size_t i = 1; i <= n; ++i) {
    const auto b = static_cast<unsigned char>(p[i]);
    if (b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xBF)) {
      return 0;
    }
  }
  return n + 1;
}

// Skips plain ASCII (bytes copied as is: kind 0 above) eight bytes at a time, for the reader and
// the writer of JSON strings: returns the first byte that is not plain, or a point in the last
// 7 bytes before `end` (the caller goes on byte by byte). A byte is not plain if its high bit is
// set, it is below 0x20, or it is '"' or '\\'. In a word, subtracting 0x20 from each byte (or 1
// from each byte XOR the quote or the backslash) sets the high bit of the lowest such byte,
// and of no plain byte below it (no borrow reaches a byte before the first hit); so on a
// little-endian machine the lowest set high bit marks the first byte that is not plain.
inline const char* skip_plain_ascii(const char* p, const char* end) noexcept {
  constexpr std::uint64_t ones = 0x0101010101010101ULL;
  constexpr std::uint64_t highs = 0x8080808080808080ULL;
  while (end - p >= 8) {
    std::uint64_t x = 0;
    std::memcpy(&x, p, 8);
    const std::uint64_t quote = x ^ (ones * '"');
    const std::uint64_t backslash = x ^ (ones * '\\');
    const std::uint64_t hit = (x | (x - ones * 0x20) | (quote - ones) | (backslash - ones)) & highs;
    if (hit != 0) {
      if constexpr (std::endian::native == std::endian::little) {
        return p + (std::countr_zero(hit) >> 3);
      }
      break;
    }
    p += 8;
  }
  return p;
}

}  // namespace detail

/// Appends `s` to `out` as a JSON string literal (quotes included), escaped exactly as
/// `nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)` would.
inline void append_json_string(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  const std::size_t start = out.size();
  out.reserve(start + s.size() + 2);
  out += '"';
  const char* p = s.data();
  const char* const end = p + s.size();
  const char* run = p;  // start of the bytes not yet copied
  for (p = detail::skip_plain_ascii(p, end); p != end; ++p) {
    const unsigned char c = static_cast<unsigned char>(*p);
    const unsigned char kind = detail::json_escapes.kind[c];
    if (kind == 0) {
      continue;
    }
    if (kind == 2) {
      // Not ASCII: a well-formed sequence is copied as is, as nlohmann's dump copies it. At an
      // ill-formed one the whole string goes to nlohmann, which writes U+FFFD where its
      // decoder rejects bytes (how many bytes one U+FFFD stands for is its rule, not ours).
      if (const std::size_t n = detail::utf8_sequence(p, end); n != 0) {
        p += n - 1;
        continue;
      }
      out.resize(start);
      out += nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      return;
    }
    out.append(run, p);
    run = p + 1;
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default: {
        const char esc[] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 0xf]};
        out.append(esc, sizeof esc);
      }
    }
  }
  out.append(run, end);
  out += '"';
}

/// Writes JSON text into a string, value by value; see the overview. Each call returns the
/// writer, so a body chains: `w.begin_object().key("n").value(1).end_object()`.
class json_writer {
 public:
  /// Appends to `out` (which must outlive the writer).
  explicit json_writer(std::string& out) noexcept : out_(out) {}

  /// `{`.
  json_writer& begin_object() {
    separate();
    out_ += '{';
    comma_ = false;
    return *this;
  }
  /// `}`.
  json_writer& end_object() {
    out_ += '}';
    comma_ = true;
    return *this;
  }
  /// `[`.
  json_writer& begin_array() {
    separate();
    out_ += '[';
    comma_ = false;
    return *this;
  }
  /// `]`.
  json_writer& end_array() {
    out_ += ']';
    comma_ = true;
    return *this;
  }
  /// A member's key (escaped like any string) and `:`; the next call writes its value.
  json_writer& key(std::string_view k) {
    separate();
    append_json_string(out_, k);
    out_ += ':';
    comma_ = false;
    return *this;
  }
  /// A string value.
  json_writer& value(std::string_view s) {
    separate();
    append_json_string(out_, s);
    comma_ = true;
    return *this;
  }
  /// A string value (a literal would otherwise pick the `bool` overload).
  json_writer& value(const char* s) { return value(std::string_view(s)); }
  /// A string value.
  json_writer& value(const std::string& s) { return value(std::string_view(s)); }
  /// `true` or `false`.
  json_writer& value(bool b) {
    separate();
    out_ += b ? "true" : "false";
    comma_ = true;
    return *this;
  }
  /// An integer.
  template <typename Int,
            std::enable_if_t<std::is_integral_v<Int> && !std::is_same_v<Int, bool>, int> = 0>
  json_writer& value(Int n) {
    static_assert(sizeof(Int) <= 8, "at most 64-bit integers");
    separate();
    char buf[24];
    const auto r = std::to_chars(buf, buf + sizeof buf, n);
    out_.append(buf, r.ptr);
    comma_ = true;
    return *this;
  }
  /// A floating-point number, printed as nlohmann prints it.
  json_writer& value(double d) { return value(nlohmann::json(d)); }
  /// An embedded JSON value, dumped compactly (invalid UTF-8 in its strings replaced).
  json_writer& value(const nlohmann::json& j) {
    separate();
    out_ += j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    comma_ = true;
    return *this;
  }
  /// `null`.
  json_writer& null() {
    separate();
    out_ += "null";
    comma_ = true;
    return *this;
  }

 private:
  void separate() {
    if (comma_) {
      out_ += ',';
    }
  }

  std::string& out_;
  bool comma_ = false;  // the next value or key follows another at its level
};

}  // namespace keel::llm
