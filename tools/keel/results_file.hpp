// The batch's results file: records appended whole, the lock that keeps one run per file, and
// the scan that --resume starts from.
#pragma once

// Design
// ------
// One JSON record per input line, written with a single `write(2)` on an `O_APPEND`
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
// Thread safety: none; the keel command uses these from one thread.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <string>
#include <unordered_set>

namespace keel::cli {

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

  /// Writes `line` (one record's JSON text, without its newline) as `write` writes a record.
  /// @throws std::runtime_error as `write`.
  void write_line(std::string line);

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
  bool append_ = true;   // fd_ is O_APPEND (an owned file always; standard output may not be)
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
