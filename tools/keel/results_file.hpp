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
// an item whose id already has an `ok` or `failed` record is skipped. Records about a line
// itself (`invalid_input`, `duplicate_id`) cost nothing to redo and are dropped on resume, so a
// line fixed in the input since runs.
// `cancelled` records (items interrupted by a signal) are dropped on resume and run again.
// `prepare_resume` rewrites the file atomically (temp file + rename) when it must drop
// cancelled records or a torn last line, so one id never has two records. A `results_lock`
// (flock on `<out>.lock`, and on the file) keeps a second run off the file for the whole run.
//
// Thread safety: none; the keel command uses these from one thread.

#include <nlohmann/json.hpp>

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_set>

namespace keel::cli {

/// Appends records to the results file, one `write(2)` per record.
class record_writer {
 public:
  /// Opens (creating if needed) `path` for appending ("-": stdout), and holds an `flock` on it
  /// (see results_lock).
  /// @param sync also `fdatasync` after every record (slower; survives power loss).
  /// @throws std::runtime_error naming the file if it cannot be opened, or if another run's
  ///   writer holds it.
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

  /// True if the file this writer owns has no name left (it was deleted during the run, so
  /// every record written to it is gone with the descriptor); false for standard output.
  bool removed() const noexcept;

 private:
  int fd_ = -1;
  bool owned_ = false;
  bool sync_ = false;
  bool broken_ = false;  // a partial record is in the file: write nothing more
  bool append_ = true;   // fd_ is O_APPEND (an owned file always; standard output may not be)
  std::size_t written_ = 0;
  std::string path_;
};

/// The exclusive right to write one results file: an `flock` on `<path>.lock` beside the file
/// `path` resolves to (symlinks followed, so two names of one file share it; never renamed, so
/// it survives `prepare_resume`'s rewrite), holding the owner's pid. A hard link is a name with
/// its own lock file: for it, the file itself is probed for the `flock` a run's `record_writer`
/// holds on it. A second run on the same file, resumed or not, is refused while the first
/// lives; a crashed run's locks are released by the kernel.
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
  void release() noexcept;

  int fd_ = -1;
  std::string lock_path_;
};

/// What a results file already holds.
struct resume_state {
  /// Keys (`id.dump()`) of items with an `ok` or `failed` record.
  std::unordered_set<std::string> done_keys;
  /// `invalid_input` / `duplicate_id` records dropped (their lines are read again).
  std::size_t dropped_line_records = 0;
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

/// Replaces what `path` holds with `text`, atomically where it can: a regular file (or one to be
/// created) is written to a new `mkstemp` file beside it that takes its permissions, synced, and
/// renamed over it, and the directory is synced; a symlink is written through (its target is
/// replaced, the link stays); anything else (`/dev/stdout`, a pipe) is written directly. A hard
/// link to the old file keeps the old contents.
/// @throws std::runtime_error naming `path` and the system's reason; `path` is then as it was
///   and no temporary file is left.
void replace_file(const std::string& path, std::string_view text);

/// What `produce` writes into: called with the bytes in order.
using byte_sink = std::function<void(std::string_view)>;

/// `replace_file` with the new contents written by `produce` (through a 64 KiB buffer), so a
/// large file need not be held in memory.
/// @throws what `produce` throws, or std::runtime_error as `replace_file`; either way `path` is
///   as it was and no temporary file is left.
void replace_file(const std::string& path, const std::function<void(const byte_sink&)>& produce);

/// Reads `path` (a missing file is empty) and, if it must drop records, rewrites it atomically
/// (`replace_file`). Records about a line (`invalid_input`, `duplicate_id`) are dropped too: the
/// resumed run reads those lines again and records them again, so a line fixed in the input
/// since runs (and a line's record is never stale).
/// @throws std::runtime_error naming the file and line for a malformed record that is not the
///   last line (the file is then left untouched).
resume_state prepare_resume(const std::string& path);

}  // namespace keel::cli
