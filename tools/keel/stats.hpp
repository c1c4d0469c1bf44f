// The batch's running totals, the live progress display and the end-of-run summary.
#pragma once

// Progress goes to stderr: on a terminal a bar redrawn in place ten times a second (done/total,
// ok/failed, in flight, rate, retries, 429s seen, throttle waits, ETA); otherwise one plain
// line every `interval`; nothing with --quiet. The summary is a table on stdout and, with
// --summary-json, the same numbers as JSON.
//
// Thread safety: none; the batch runner updates the stats on its one thread.

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace keel::cli {

/// What a batch has done so far.
struct batch_stats {
  /// Items in the input (0 if unknown, e.g. stdin).
  std::size_t total = 0;
  /// Items finished in this run (ok + failed + cancelled), records written.
  std::size_t done = 0;
  /// Successful items.
  std::size_t ok = 0;
  /// Failed items (invalid input and duplicates included).
  std::size_t failed = 0;
  /// Items cancelled by a signal (run again on --resume).
  std::size_t cancelled = 0;
  /// Items finished whose record could not be written (not in `done`; they run again on
  /// --resume).
  std::size_t unwritten = 0;
  /// Items skipped because --resume found their record.
  std::size_t skipped = 0;
  /// Items being processed now.
  std::size_t in_flight = 0;
  /// HTTP attempts.
  std::uint64_t attempts = 0;
  /// Retries (attempts after a failure on the same entry).
  std::uint64_t retries = 0;
  /// 429 responses seen.
  std::uint64_t http_429 = 0;
  /// Attempts that waited for rate-limit capacity.
  std::uint64_t throttle_waits = 0;
  /// Total time attempts waited for rate-limit capacity, seconds.
  double throttled_seconds = 0;
  /// Moves to a fallback entry.
  std::uint64_t fallbacks = 0;
  /// Times a breaker opened.
  std::uint64_t breaker_opens = 0;
  /// Times an item waited for an open breaker's probe (no fallback left).
  std::uint64_t breaker_holds = 0;
  /// Hedged copies of slow attempts sent (`policy.hedge`).
  std::uint64_t hedges = 0;
  /// Failed items by error class.
  std::map<std::string, std::uint64_t> failed_by_class;
  /// Retries by the class of the error that caused them.
  std::map<std::string, std::uint64_t> retries_by_cause;
  /// Attempts by entry name.
  std::map<std::string, std::uint64_t> attempts_by_model;
  /// Successful items by the entry that answered.
  std::map<std::string, std::uint64_t> ok_by_model;
  /// Latency of each finished item, seconds.
  std::vector<double> latencies;
  /// True when the run streams its replies (`--stream`): the summary then has the time to first
  /// token.
  bool streamed = false;
  /// Time to first token of each finished item whose stream delivered text (`--stream`),
  /// seconds.
  std::vector<double> first_tokens;
  /// Tokens billed (input).
  long long tokens_in = 0;
  /// Tokens billed (output).
  long long tokens_out = 0;
  /// Estimated cost of the answers whose entry has a `price`, US dollars.
  double cost = 0;
  /// Answers whose entry has a `price`.
  std::size_t priced = 0;
  /// Answers whose entry has no `price` (their cost is unknown).
  std::size_t unpriced = 0;
  /// When the run started.
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  /// Wall time of the run (set at the end), seconds.
  double wall_seconds = 0;
  /// The seed of the run's retry jitter (`--seed` repeats it).
  std::uint64_t seed = 0;
};

/// The `p`-th percentile (0..100) of `values` by nearest rank; 0 for none.
double percentile(std::vector<double> values, double p);

/// The summary as JSON (--summary-json).
nlohmann::json summary_json(const batch_stats& s);

/// The summary as an aligned text table.
std::string summary_table(const batch_stats& s, const std::string& title);

/// How progress is shown.
enum class progress_mode { bar, lines, quiet };

/// Draws progress on a stream.
class progress_display {
 public:
  /// Shows `s` on `out` in `mode`.
  progress_display(progress_mode mode, std::FILE* out, const batch_stats& s);

  /// Redraws (bar) or prints a line (lines).
  void tick();
  /// Erases the bar (before a log line).
  void clear();
  /// Redraws the bar after a log line.
  void redraw();
  /// Erases the bar for good.
  void finish();
  /// The mode.
  progress_mode mode() const noexcept { return mode_; }

 private:
  std::string render() const;

  progress_mode mode_;
  std::FILE* out_;
  const batch_stats& s_;
  bool drawn_ = false;
};

}  // namespace keel::cli
