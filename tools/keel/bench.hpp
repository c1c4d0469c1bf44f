// `keel bench`: the scenario benchmark of concurrency behaviour (policies × fault mixes × load).
#pragma once

// Design
// ------
// One *run* sends `prompts` generated prompts through an `llm::client` with `concurrency` worker
// coroutines on one io_context (as `keel batch` does, without the JSONL files), against the
// in-process mock server on its own thread (or `--url`). The matrix crosses:
//
//   fault mixes   clean          latency 10–30 ms, nothing fails
//                 rate_limited   server limit 200 r/s (burst 200) that advertises itself in
//                                x-ratelimit-* headers; every 429 says `Retry-After: 1`
//                 flaky          5% 503 + 5% 529 (Anthropic overloaded), on both models
//                 outage         the primary answers 503 from 0.5 s to 3.5 s; the fallback is fine
//                 slow           every answer takes 50 ms
//   limited mixes (the server does not say its limit; R = --rate, default 200 r/s)
//                 limited        a stock proxy limiter (nginx `limit_req rate=R burst=20
//                                nodelay`: capacity 21), no rate-limit headers, every 429 says
//                                a constant `Retry-After: 1`; OpenAI format, latency 0–2 ms
//                 limited_no_retry_after   the same, with no delay header at all
//                 limit_change   `limited` whose limit halves at t = 5 s and returns at 15 s
//                 token_limited  no request limit; R × (tokens of one prompt) tokens/minute with
//                                a bucket of 21 prompts' tokens, 2,000-byte prompts, no headers
//                 mixed          `limited` plus 5% 503 and 5% 529 and 50 ms latency (Anthropic
//                                format, so that overloaded is a real 529)
//   policies      none           one attempt
//                 naive          4 attempts, retried at once, Retry-After ignored
//                 exponential    4 attempts, 0.5 s × 2^n (cap 8 s), no jitter, Retry-After obeyed
//                 full_jitter    the same with full jitter
//                 keel           keel's defaults (retry, budget, breaker with a bench-scaled
//                                break) + a fallback entry + shared pacing (the rate controller)
//                 newcomer       the one-entry config a newcomer writes: model, base_url,
//                                api_key, no policy block (every keel default), shared pacing
//                 keel_limit     `keel` with the server's true limit configured
//                 aws_adaptive   one entry in AWS `"mode": "adaptive"` (CUBIC client rate limiter)
//
// The common-client policies (none, naive, exponential, full_jitter, aws_adaptive) run with
// `client_options::shared_pacing = false` and a single entry, so they behave like a common SDK
// client: each call retries on its own schedule (aws_adaptive paces with its own limiter).
// keel, newcomer and keel_limit run with shared pacing and `hold_open_breaker`, as `keel batch`.
//
// The default matrix compares every policy on every classic mix at concurrency 64 (2,000
// prompts), sweeps keel's stack over concurrency 1 to 10,000 on clean and rate_limited and
// full_jitter on rate_limited, and runs the limited mixes at R = 200, concurrency 64 with the
// policies that matter there (see `bench_matrix`). A classic run at concurrency c sends
// max(min(N, 200·c), c) prompts; a limited run sends N = 10·R (limit_change 15·R, so that the
// run sees the limit come back; --quick: 3·R) unless --prompts is given. Any of --faults,
// --policies or --concurrency replaces the default matrix with the cross product of the lists
// given (defaults: every mix, every policy, 64), every limited cell once per --rate (default
// 200); --rate alone keeps the default matrix and changes the limit of its limited runs.
//
// Measured per run: wall time, goodput (successes per second), success ratio, attempts per
// prompt, item latency (p50/p90/p99 over every prompt, and the CDF of successful answers), time
// throttled (waiting for the shared bucket, plus retry sleeps after 429s, summed over prompts),
// CPU seconds of the client thread (getrusage RUSAGE_THREAD; the mock's thread is measured
// apart), peak RSS of the run's process, a histogram of retry delays, and 100 ms bins of
// attempts, repeat attempts, successes, failures and 429s over time. Where a server limit bounds
// the run: the ideal wall time (the least time in which the limiter admits every prompt) and
// wall / ideal. With the mock, every bin also samples the limit in force
// (`mock_llm_server::current_limit`), and for the shared-pacing policies the primary bucket's
// controller (paced rate, estimate, phase); the run's final controller state is `pacing`.
//
// Each run happens in a child process (fork) so that its peak RSS is its own; the mock shares
// that process, so the RSS includes the mock server (and the few MiB the parent had at fork).
//
// Outputs in `out_dir`: results.json (every run, the machine, the target verdict), table.md,
// and SVG plots: latency-cdf-<mix>-c<N>.svg and timeline-<mix>-c<N>.svg per mix compared across
// policies, timeline-sweep-<mix>-<policy>.svg per concurrency sweep, amplification.svg, and
// rate-<mix>-<policy>-c<N>.svg (real limit vs learned estimate vs paced rate vs admitted) per
// shared-pacing run against a limiter. <mix> is the fault mix, with -r<R> for limited mixes.
// The table also goes to stdout.
//
// Thread safety: run from main only (it forks).

#include <keel/llm/config.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace keel::cli {

/// Options of `keel bench`.
struct bench_options {
  /// A small matrix (15 runs, about half a minute) for tests and smoke checks.
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
  /// Server limits R of the limited mixes, requests per second (empty: the default, 200). A
  /// list runs every limited cell once per rate; with `--url`, R is what `keel_limit`
  /// configures.
  std::vector<double> rates;
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
  /// The server limit R of a limited mix, requests per second (0 for the other mixes).
  double rate = 0;
};

/// The default server limit R of the limited mixes, requests per second.
inline constexpr double bench_default_rate = 200;

/// The fault mixes, in table order.
const std::vector<std::string>& bench_faults();

/// The policy variants, in table order.
const std::vector<std::string>& bench_policies();

/// True for the mixes whose limiter does not advertise its limit and whose limit is `--rate`
/// (limited, limited_no_retry_after, limit_change, token_limited, mixed).
bool bench_limited_mix(const std::string& fault);

/// True for the policies that run with shared pacing (the rate controller): keel, newcomer,
/// keel_limit.
bool bench_paced_policy(const std::string& policy);

/// The runs `opts` asks for (see the header comment), without duplicates.
std::vector<bench_run_spec> bench_matrix(const bench_options& opts);

/// The mock scenario of a fault mix, as JSON text (docs/mock_llm_server.md).
/// @param rate the server limit R of a limited mix, requests per second (ignored by the others).
/// @throws std::invalid_argument for an unknown mix or a rate that is not positive.
std::string bench_scenario_json(const std::string& fault, double rate = bench_default_rate);

/// The client config of a run's policy with every entry pointed at `base_url`: the entries
/// speak the wire format of the run's mix (OpenAI for the limited mixes but `mixed`,
/// Anthropic for the others), and `keel_limit` configures the run's limit.
/// @throws std::invalid_argument for an unknown policy.
llm::client_config bench_config(const bench_run_spec& run, const std::string& base_url,
                                const bench_options& opts);

/// `bench_config` of `policy` on the `clean` mix (an Anthropic-format primary; with `--url`,
/// `keel_limit` configures the first of `opts.rates`, or 200 r/s).
/// @throws std::invalid_argument for an unknown policy.
llm::client_config bench_config(const std::string& policy, const std::string& base_url,
                                const bench_options& opts);

/// The least wall time of `run` against the in-process mock: the time in which the mix's
/// limiter admits every prompt's successful attempt (for `mixed`, 1/0.9 attempts per prompt),
/// or the answers' latency at the run's concurrency if that is longer. Null for the mixes that
/// no server limit bounds (clean, flaky, outage, slow).
std::optional<double> bench_ideal_seconds(const bench_run_spec& run);

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
