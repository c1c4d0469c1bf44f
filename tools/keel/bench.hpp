// `keel bench`: the scenario benchmark of concurrency behaviour (policies × fault mixes × load).
#pragma once

// Design
// ------
// One *run* sends `prompts` generated prompts through an `llm_client` with `concurrency` worker
// coroutines on one io_context (as `keel batch` does, without the JSONL files), against the
// in-process mock server on its own thread (or `--url`). The matrix crosses:
//
//   fault mixes   clean          latency 10–30 ms, nothing fails
//                 rate_limited   server limit 200 r/s (burst 200); every 429 says `Retry-After: 1`
//                 flaky          5% 503 + 5% 529 (Anthropic overloaded), on both models
//                 outage         the primary answers 503 from 0.5 s to 3.5 s; the fallback is fine
//                 slow           every answer takes 50 ms
//   policies      none           one attempt
//                 naive          4 attempts, retried at once, Retry-After ignored
//                 exponential    4 attempts, 0.5 s × 2^n (cap 8 s), no jitter, Retry-After obeyed
//                 full_jitter    the same with full jitter
//                 keel           full jitter + breaker + retry budget + fallback entry + the shared
//                                bucket (429 pause, limits learned from headers): llm_client's
//                                default behaviour
//
// The four non-keel policies run with `client_options::shared_pacing = false` and a single
// entry, so they behave like a common SDK client: each call retries on its own schedule.
//
// The default matrix compares every policy on every mix at concurrency 64 (2,000 prompts),
// sweeps keel's stack over concurrency 1, 16, 64, 256, 1,024 and 10,000 on the clean and
// rate-limited mixes, and sweeps full_jitter (the best-behaved common client) on the
// rate-limited mix for contrast: 40 runs, about three minutes on a 2-core machine. A run
// at concurrency c sends max(min(N, 200·c), c) prompts: every worker has work, and the c = 1 runs
// stay short. Any of --faults, --policies or --concurrency replaces that with the cross product of
// the lists given (defaults: every mix, every policy, 64).
//
// Measured per run: wall time, goodput (successes per second), success ratio, attempts per
// prompt, item latency (p50/p90/p99 over every prompt, and the CDF of successful answers), time
// throttled (waiting for the shared bucket, plus retry sleeps after 429s, summed over prompts),
// CPU seconds of the client thread (getrusage RUSAGE_THREAD; the mock's thread is measured
// apart), peak RSS of the run's process, a histogram of retry delays, and 100 ms bins of
// attempts, repeat attempts, successes and failures over time.
//
// Each run happens in a child process (fork) so that its peak RSS is its own; the mock shares
// that process, so the RSS includes the mock server (and the few MiB the parent had at fork).
//
// Outputs in `out_dir`: results.json (every run, the machine, the target verdict), table.md,
// and SVG plots: latency-cdf-<mix>-c<N>.svg and timeline-<mix>-c<N>.svg per mix compared across
// policies, timeline-sweep-<mix>-<policy>.svg per concurrency sweep, and amplification.svg.
// The table also goes to stdout.
//
// Thread safety: run from main only (it forks).

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace keel::cli {

struct config;

/// Options of `keel bench`.
struct bench_options {
  /// A small matrix (about ten seconds) for tests and smoke checks.
  bool quick = false;
  /// Where results.json, table.md and the SVG files go (created if missing).
  std::string out_dir = "keel-bench";
  /// Benchmark this endpoint instead of the in-process mock (fault mixes do not apply).
  std::string url;
  /// Wire format of `url`: "openai" or "anthropic".
  std::string api_type = "openai";
  /// Model sent to `url` (empty: gpt-4o-mini or claude-3-5-haiku-latest).
  std::string model;
  /// Prompts per run (default 2,000; 200 with `quick`).
  std::optional<std::size_t> prompts;
  /// Concurrency levels (empty: the default matrix).
  std::vector<int> concurrency;
  /// Fault mixes (empty: the default matrix).
  std::vector<std::string> faults;
  /// Policy variants (empty: the default matrix).
  std::vector<std::string> policies;
  /// Seeds the mock's fault generators and the clients' jitter.
  std::uint64_t seed = 1;
  /// Run each scenario in a child process (per-run peak RSS).
  bool fork = true;
  /// Print a line per run on stderr.
  bool progress = true;
};

/// One run of the matrix.
struct bench_run_spec {
  /// Fault mix ("external" with --url).
  std::string fault;
  /// Policy variant.
  std::string policy;
  /// Workers (items in flight).
  int concurrency = 64;
  /// Prompts sent.
  std::size_t prompts = 0;
};

/// The fault mixes, in table order.
const std::vector<std::string>& bench_faults();

/// The policy variants, in table order.
const std::vector<std::string>& bench_policies();

/// The runs `opts` asks for (see the header comment), without duplicates.
std::vector<bench_run_spec> bench_matrix(const bench_options& opts);

/// The mock scenario of a fault mix, as JSON text (docs/mock_llm_server.md).
/// @throws std::invalid_argument for an unknown mix.
std::string bench_scenario_json(const std::string& fault);

/// The client config of a policy variant with every entry pointed at `base_url`.
/// @throws std::invalid_argument for an unknown policy.
config bench_config(const std::string& policy, const std::string& base_url,
                    const bench_options& opts);

/// Performs one run in this process and returns its measurements (see results.json).
nlohmann::json run_bench_scenario(const bench_run_spec& spec, const bench_options& opts);

/// The target of the rate-limited workload (2,000 prompts, concurrency 64, keel): wall time
/// within 5% of prompts / 200 r/s, zero failures, attempts ≤ 1.1 × prompts. Null when the
/// results have no such run.
nlohmann::json bench_target(const nlohmann::json& runs);

/// The runs as an aligned text table (stdout) or a Markdown table.
std::string bench_table(const nlohmann::json& runs, bool markdown);

/// Writes the SVG plots of `results` into `dir`; returns the file names written.
std::vector<std::string> write_bench_plots(const nlohmann::json& results, const std::string& dir);

/// Runs the whole matrix, writes the files and prints the table; returns the exit status
/// (0, or 1 if a run could not be performed).
int run_bench(const bench_options& opts);

}  // namespace keel::cli
