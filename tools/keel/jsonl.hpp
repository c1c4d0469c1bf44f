// The batch's input: JSONL items, parsed one line at a time and read without loading the file.
#pragma once

// Design
// ------
// Input: one JSON object per line, `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages":
// [{"role": "user", "content": "..."}, ...]}`, with optional `model` (replaces the primary
// entry's model), `max_tokens` (1..1000000), `system` and `metadata` (an object, echoed into the
// result record, not sent). `id` is a string or an integer. Blank lines are not items. Any other
// key, or a value of the wrong type, makes the line a failure record that names the line and
// the JSON path; a line longer than `max_line_bytes` too. Each line ends as one record of the
// results file (results_file.hpp).
//
// Every line is checked for a NUL byte (nlohmann's parser stops at one, silently dropping the
// rest) and for nesting deeper than keel::llm::max_json_depth before it is parsed.
//
// Thread safety: none; the keel command uses these from one thread.

#include <keel/llm/chat.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <variant>

namespace keel::cli {

/// Longest input line accepted (longer lines become failure records).
inline constexpr std::size_t max_line_bytes = 16 * 1024 * 1024;

/// One valid input item.
struct batch_item {
  /// 1-based input line number.
  std::size_t line = 0;
  /// The item's id, as given (string or integer).
  nlohmann::json id;
  /// `id.dump()`: the key for duplicates and resume.
  std::string key;
  /// The request (model empty unless the line named one).
  keel::llm::chat_request request;
  /// `metadata`, echoed into the result (null if absent).
  nlohmann::json metadata;
  /// The first 100 characters of the last user message, for logs.
  std::string preview;
};

/// An input line that is not a valid item.
struct input_error {
  /// 1-based line number.
  std::size_t line = 0;
  /// The id if it could be read (else null).
  nlohmann::json id;
  /// What is wrong, naming the JSON path ("/messages/0/content: expected a string").
  std::string message;
};

/// Parses one input line.
/// @param text the line without its newline.
/// @param line its 1-based number.
/// @param default_max_tokens used when the line has no `max_tokens`.
std::variant<batch_item, input_error> parse_input_line(std::string_view text, std::size_t line,
                                                       int default_max_tokens);

/// Reads an input file line by line (never loads it whole).
class input_reader {
 public:
  /// Opens `path` ("-" for stdin).
  /// @throws std::runtime_error naming the file if it cannot be opened.
  explicit input_reader(const std::string& path);
  ~input_reader();
  input_reader(const input_reader&) = delete;
  input_reader& operator=(const input_reader&) = delete;

  /// One raw line.
  struct raw_line {
    /// 1-based line number.
    std::size_t number = 0;
    /// The text (cut at `max_line_bytes`).
    std::string text;
    /// True if the line was longer than `max_line_bytes`.
    bool too_long = false;
  };

  /// The next non-blank line, or nullopt at the end of the file. Blocks until the line is
  /// there: on a pipe or terminal, until its writer sends it.
  /// @throws std::runtime_error on a read error.
  std::optional<raw_line> next();

  /// True if the input is a regular file (reads never wait for a writer).
  bool is_regular_file() const;

 private:
  std::FILE* file_ = nullptr;
  bool owned_ = false;
  std::size_t number_ = 0;
  std::string path_;
};

/// Counts the non-blank lines of a regular file (for progress); nullopt for stdin, a pipe or
/// other non-regular file (counting would consume its lines), or on error.
std::optional<std::size_t> count_items(const std::string& path);

}  // namespace keel::cli
