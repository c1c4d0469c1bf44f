// A bound on the nesting depth of every JSON text keel parses.
#pragma once

// Why
// ---
// nlohmann::json parses iteratively and destroys a tree iteratively, but copies, compares and
// serialises it recursively: a 160 KB input line nested 80,000 arrays deep parsed fine and then
// overflowed the stack when the batch copied its `metadata` (SIGSEGV, every run and every
// resume). Bounding the depth when the text is read bounds every later recursion.
//
// Design: a linear pre-scan of the raw text, before the parser sees it, counting `[` and `{`
// outside strings (escapes honoured). It needs no parser callback (nlohmann's callback cannot stop
// a parse except by throwing) and it reports the byte where the limit was crossed, so each
// reader can name the file, line and position. Text that is not JSON is left to the parser: the
// scan never accepts anything the parser would refuse, it only refuses more.
//
// `max_json_depth` (128) is far beyond what any provider body, config or input item needs (the
// deepest shapes, JSON schemas in `response_format`, take two levels per nested property) and
// far below what nlohmann's recursive copy and dump can take on the thread's stack (a few
// hundred bytes per level).
//
// Thread safety: a pure function.

#include <cstddef>
#include <string_view>

namespace keel::llm {

/// Deepest nesting of arrays and objects keel accepts in any JSON it reads (a top-level object
/// is depth 1).
inline constexpr std::size_t max_json_depth = 128;

/// The byte offset of the `[` or `{` that opens nesting level `max_depth + 1` in `text`
/// (outside strings), or `std::string_view::npos` if the text never nests deeper than
/// `max_depth`. Does not validate the text otherwise.
inline std::size_t json_too_deep_at(std::string_view text,
                                    std::size_t max_depth = max_json_depth) noexcept {
  std::size_t depth = 0;
  const std::size_t n = text.size();
  for (std::size_t i = 0; i < n; ++i) {
    const char c = text[i];
    if (c == '"') {
      // Skip the string in a tight loop: this scan runs on every body keel reads.
      for (++i; i < n; ++i) {
        const char s = text[i];
        if (s == '\\') {
          ++i;  // the escaped character, whatever it is
        } else if (s == '"') {
          break;
        }
      }
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        return i;
      }
    } else if (c == ']' || c == '}') {
      depth -= depth > 0 ? 1 : 0;
    }
  }
  return std::string_view::npos;
}

}  // namespace keel::llm
