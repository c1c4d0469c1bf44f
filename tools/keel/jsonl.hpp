// The batch's files: input items (JSONL), the append-only results file and the resume scan.
#pragma once

// Design
// ------
// Input: one JSON object per line, `{"id": ..., "prompt": "..."}` or `{"id": ..., "messages":
// [{"role": "user", "content": "..."}, ...]}`, with optional `model` (replaces the primary
// entry's model), `max_tokens` (1..1000000), `system` and `metadata` (an object, echoed into the
// result record, not sent). `id` is a string or an integer. Blank lines are not items. Any other
// key, or a value of the wrong type, makes the line a failure record that names the line and
// the JSON path; a line longer than `max_line_bytes` too.
//
// Output: one JSON record per input line, written with a single `write(2)` on an `O_APPEND`
// descriptor, so each record reaches the kernel whole as soon as it is decided (a `kill -9`
// cannot lose a written record, and can at worst leave one torn last line).
//
// What a record holds, and how --resume reads one back, is in record.hpp.
//
// Every record carries `id` and `line` (the input line number). Resume identifies work by id:
// an item whose id already has an `ok` or `failed` record is skipped. Lines whose record is
// about the line itself (`invalid_input`, `duplicate_id`) are identified by line number.
// `cancelled` records (items interrupted by a signal) are dropped on resume and run again.
// `prepare_resume` rewrites the file atomically (temp file + rename) when it must drop
// cancelled records or a torn last line, so one id never has two records. A `results_lock`
// (flock on `<out>.lock`) keeps a second run off the file for the whole run.
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
#include <unordered_set>
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

/// Appends records to the results file, one `write(2)` per record.
class record_writer {
 public:
  /// Opens (creating if needed) `path` for appending ("-": stdout).
  /// @param sync also `fdatasync` after every record (slower; survives power loss).
  /// @throws std::runtime_error naming the file if it cannot be opened.
  explicit record_writer(const std::string& path, bool sync = false);
  ~record_writer();
  record_writer(const record_writer&) = delete;
  record_writer& operator=(const record_writer&) = delete;

  /// Writes `record` as one line, whole or not at all: after a failed or short write (a full
  /// disk) the file is cut back to where the record started, so it always ends at a record
  /// boundary; if it cannot be cut back (a pipe), every later call throws without writing.
  /// @throws std::runtime_error naming the file on a write error (e.g. disk full).
  void write(const nlohmann::json& record);

  /// Empties the file (for `--overwrite`, once everything else the run needs is in place).
  /// No effect on standard output.
  /// @throws std::runtime_error naming the file if it cannot be truncated.
  void truncate();

  /// Records written by this writer.
  std::size_t written() const noexcept { return written_; }

 private:
  int fd_ = -1;
  bool owned_ = false;
  bool sync_ = false;
  bool broken_ = false;  // a partial record is in the file: write nothing more
  std::size_t written_ = 0;
  std::string path_;
};

/// The exclusive right to write one results file: an `flock` on `<path>.lock` (beside the file,
/// never renamed, so it survives `prepare_resume`'s rewrite), holding the owner's pid. A second
/// run on the same file, resumed or not, is refused while the first lives; a crashed run's lock
/// is released by the kernel.
class results_lock {
 public:
  /// Takes the lock without waiting.
  /// @throws std::runtime_error naming the file and the holder's pid if another process holds
  ///   it, or naming the lock file if it cannot be created.
  explicit results_lock(const std::string& path);
  /// Removes the lock file and releases the lock.
  ~results_lock();
  results_lock(const results_lock&) = delete;
  results_lock& operator=(const results_lock&) = delete;

  /// The lock file's path.
  const std::string& path() const noexcept { return lock_path_; }

 private:
  int fd_ = -1;
  std::string lock_path_;
};

/// What a results file already holds.
struct resume_state {
  /// Keys (`id.dump()`) of items with an `ok` or `failed` record.
  std::unordered_set<std::string> done_keys;
  /// Line numbers of `invalid_input` / `duplicate_id` records.
  std::unordered_set<std::size_t> done_lines;
  /// Records kept.
  std::size_t kept = 0;
  /// Kept records whose status is `failed` (the batch's exit status counts them).
  std::size_t kept_failed = 0;
  /// `cancelled` records dropped (their items run again).
  std::size_t dropped_cancelled = 0;
  /// Extra records for an id that already had one (kept: the first).
  std::size_t dropped_duplicates = 0;
  /// True if a torn last line (no newline, or not JSON) was dropped.
  bool dropped_torn_tail = false;
};

/// Reads `path` (a missing file is empty) and, if it must drop records, rewrites it atomically.
/// @throws std::runtime_error naming the file and line for a malformed record that is not the
///   last line (the file is then left untouched).
resume_state prepare_resume(const std::string& path);

}  // namespace keel::cli
