// Strict JSON reading for what people write: configs and batch input lines.
#pragma once

// Why
// ---
// nlohmann::json::parse keeps the last of a key given twice in one object, silently; other
// parsers keep the first, so `{"model": "a", "model": "b"}` means one thing to keel and another to
// the tool that wrote or checks it. Its exceptions' messages quote the text ("last read: ...":
// a config may hold a key) and carry the library's exception ids. And it accepts any nesting,
// which later recursive copies cannot take (keel/llm/json_depth.hpp).
//
// Design: one function for every reader of hand-written JSON (`keel::llm::load_config`, the
// keel command's input lines): the depth pre-scan, then nlohmann's parser with a callback that
// tracks the JSON pointer and throws on a repeated key, and one exception type that says what
// and where (a byte offset the caller turns into a line and column or "byte N of the line",
// and a JSON pointer for a repeated key), never quoting the text. Provider bodies are not read
// here: those are machine-written, and their readers bound depth alone.
//
// Thread safety: a pure function.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace keel::llm {

/// Why `parse_strict_json` refused a text.
enum class json_problem {
  /// Not JSON (a syntax error, an invalid UTF-8 byte or escape, a NUL byte), or a number too
  /// large for a double (`1e400`: "a number too large for a double", at its first byte).
  syntax,
  /// Valid syntax the parser still refuses in a way keel cannot place (byte 0).
  unusable,
  /// Arrays and objects nested deeper than `max_json_depth`.
  too_deep,
  /// A key given twice in one object.
  duplicate_key,
};

/// A text `parse_strict_json` refused. `what()` says what is wrong without quoting the text
/// (for a repeated key: "the key appears twice in one object (...)", the pointer apart).
class json_refused : public std::runtime_error {
 public:
  /// Constructs a refusal.
  /// @param problem what kind.
  /// @param byte the 0-based offset in the text where it was found (0 if unknown).
  /// @param pointer for a repeated key, the JSON pointer of its second occurrence; else empty.
  /// @param what the description.
  json_refused(json_problem problem, std::size_t byte, std::string pointer, const std::string& what)
      : std::runtime_error(what), problem_(problem), byte_(byte), pointer_(std::move(pointer)) {}

  /// What kind of problem.
  json_problem problem() const noexcept { return problem_; }
  /// The 0-based byte offset in the text where the problem was found (for `unusable`, 0: the
  /// parser does not say).
  std::size_t byte() const noexcept { return byte_; }
  /// For `duplicate_key`, the JSON pointer of the key's second occurrence (`/a/0/b`); else empty.
  const std::string& pointer() const noexcept { return pointer_; }

 private:
  json_problem problem_;
  std::size_t byte_;
  std::string pointer_;
};

/// Parses `text` as one JSON value, as `nlohmann::json::parse` would, and also refuses nesting
/// deeper than `max_json_depth` (checked before parsing) and a key given twice in one object.
/// Synchronous: no cancellation.
/// @throws json_refused saying what is wrong and where.
nlohmann::json parse_strict_json(std::string_view text);

}  // namespace keel::llm
