// `keel batch`: fan a JSONL file of prompts out through a configured client, one record per line.
#pragma once

// Design
// ------
// `concurrency` worker coroutines on one io_context pull lines from the input one at a time
// (the file is streamed, never loaded whole), so at most `concurrency` items are in flight and
// memory does not grow with the file. Each line ends as exactly one record in the results file
// (see results_file.hpp): the reply, the failure, an `invalid_input` or `duplicate_id` record, or a
// `cancelled` record if a signal interrupted it.
//
// Signals: the first SIGINT/SIGTERM stops admitting lines and gives the items in flight
// `grace` to finish; then (or at a second signal) they are cancelled and recorded as
// `cancelled`. The run prints how to resume and exits with 128 + the signal number.
//
// Exit status: 0 if every item succeeded, 1 if some failed, 2 for a usage, config or I/O
// error before the run, 128 + signal when interrupted.
//
// Thread safety: runs on the calling thread.

#include <keel/llm/config.hpp>
#include "log.hpp"
#include "shard.hpp"
#include "stats.hpp"

#include <cstdint>
#include <optional>
#include <string>

namespace keel::cli {

/// Options of one batch run.
struct batch_options {
  /// Input JSONL ("-": stdin).
  std::string in;
  /// Results JSONL ("-": stdout).
  std::string out;
  /// Continue an existing results file.
  bool resume = false;
  /// Replace an existing results file.
  bool overwrite = false;
  /// Items in flight (overrides policy.concurrency).
  std::optional<int> concurrency;
  /// Time in-flight items get to finish after a signal, seconds.
  double grace = 10;
  /// How progress is shown.
  progress_mode progress = progress_mode::lines;
  /// Seconds between plain progress lines.
  double progress_interval = 5;
  /// Write the summary JSON here too (empty: no).
  std::string summary_json;
  /// Serve Prometheus metrics on 127.0.0.1:port (nullopt: no server).
  std::optional<unsigned short> metrics_port;
  /// fdatasync after every record.
  bool fsync = false;
  /// Stream each reply (`llm::client::stream_call`, the config's `policy.stream` settings): each
  /// record then has `ttft_ms` and the summary the time to first token's percentiles.
  bool stream = false;
  /// Seed of the retry jitter (and of an in-process mock whose scenario names no seed). The
  /// command draws one per run with `random_seed()` unless `--seed` is given; the summary and an
  /// INFO log line name it so that the run's jitter can be repeated.
  std::uint64_t seed = 0;
  /// True when `seed` was drawn at random rather than given (`--seed`); only changes the log line.
  bool seed_is_random = false;
  /// Write a span per item, call and attempt to this file as OTLP/JSON lines (empty: only the
  /// config's `trace.otlp_endpoint`, if any).
  std::string trace_file;
  /// Run only this part of the input (`--shard I/N`, shard.hpp); nullopt: all of it.
  std::optional<shard_spec> shard;
  /// Title of the summary table.
  std::string title = "keel batch";
  /// The command that resumes this run (printed after an interruption).
  std::string resume_command;
  /// Print the summary table on stdout (off when results go to stdout).
  bool print_summary = true;
  /// Called once the metrics server listens, with its port (tests, `keel demo`).
  std::function<void(unsigned short)> on_metrics_port;
};

/// A fresh seed for the retry jitter from `std::random_device`, so that runs and processes do not
/// all draw the same jitter. It is below 2^53, so the summary JSON holds it exactly for any
/// reader (jq, JavaScript) and `--seed` given that number repeats the run's draws.
std::uint64_t random_seed();

/// Runs a batch; returns the process exit status (see the header comment).
/// @param cfg the resolved config (base URLs already pointing where they should).
/// @param log the logger (retries at WARNING, fallbacks and breaker changes at INFO/WARNING).
/// @throws std::runtime_error for I/O errors before the run starts (unreadable input, results
///   file exists without --resume/--overwrite, ...).
int run_batch(const llm::client_config& cfg, const batch_options& opts, logger& log);

}  // namespace keel::cli
