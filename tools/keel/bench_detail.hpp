// `keel bench`'s private declarations, shared by its matrix, run, report and plot files.
#pragma once

// Files of `keel bench`
// ---------------------
//   bench.cpp         the driver: runs the matrix (each run in a child process) and reports
//   bench_matrix.cpp  which runs: fault mixes × policies × concurrency, the mock scenarios, the
//                     client configs and the ideal wall times
//   bench_run.cpp     one run: prompts through an llm::client with workers, against the mock on
//                     its own thread, recording every attempt on a timeline
//   bench_report.cpp  results.json, table.md, the target verdict and the stdout table
//   bench_plots.cpp   the SVG charts
//
// Not part of the keel command's interface: bench.hpp is (for main.cpp and the tests).

#include "bench.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

namespace keel::cli::bench_detail {

/// The JSON type of results.json.
using json = nlohmann::json;
/// The clock of wall times and timelines.
using clock_type = std::chrono::steady_clock;

// The in-process mock's models. On the classic mixes and `mixed` the primary speaks Anthropic's
// format (so that "overloaded" is a real 529) and the keel stack's fallback entry OpenAI's; on
// the other limited mixes the primary speaks OpenAI's (what stock proxies front) and the
// fallback Anthropic's. Both models get the same plan (each its own limiter), but in `outage`.

/// The mock's Anthropic-format model.
inline constexpr const char* anthropic_model = "claude-3-5-haiku-latest";
/// The mock's OpenAI-format model.
inline constexpr const char* openai_model = "gpt-4o-mini";
/// The rate-limited mix's server limit, requests per second (also its burst).
inline constexpr double server_rps = 200;
/// The limited mixes' request bucket: nginx `limit_req ... burst=20 nodelay` admits the request
/// that finds the zone empty plus 20 more at once, a bucket of 21.
inline constexpr double limited_burst = 21;
/// token_limited's prompts are this many bytes, so that prompt tokens dominate (as in a batch
/// of documents) and every prompt costs the mock the same tokens.
inline constexpr std::size_t token_prompt_bytes = 2000;
/// `mixed`'s random failures (5% 503 + 5% 529), drawn after the limiter admitted the attempt.
inline constexpr double mixed_failure_share = 0.10;
/// limit_change: the limit halves at this many ms after the mock's start...
inline constexpr int change_down_ms = 5000;
/// ... and returns at this many.
inline constexpr int change_up_ms = 15000;
/// Connections per host. `keel batch` uses max(64, concurrency); the bench caps it because the
/// client and the mock share one process here, and 10,000 connections on each side would exceed
/// this machine's 20,000-descriptor limit. A real HTTP client pool is about this size
/// (openai-python allows 1,000).
inline constexpr std::size_t max_connections = 1024;
/// Width of a timeline bin, seconds.
inline constexpr double bin_seconds = 0.1;
/// Upper edges of the retry-delay histogram, seconds (the last bin is open).
inline const std::vector<double> delay_edges = {0, 0.001, 0.01, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16};

/// Seconds from `a` to `b`.
double seconds_between(clock_type::time_point a, clock_type::time_point b);

/// `v` rounded to `digits` decimals.
double round_to(double v, int digits);

/// `v` printed with `decimals` decimals ("%.*f").
std::string fixed(double v, int decimals);

/// The number of a rate for labels and file names: "200", "12.5".
std::string rate_label(double r);

/// The tokens the mock charges a prompt of `bytes` ASCII bytes: ceil(bytes / 4) for the prompt
/// and for its completion, "mock answer to: " + the prompt's first 40 bytes (the mock's rule,
/// docs/mock_llm_server.md).
double mock_tokens(std::size_t bytes);

/// The machine a bench runs on (cpu, memory, kernel, compiler, date, load), for results.json.
json machine_json();

/// results.json's document: `machine` (taken before the runs), the options, the total wall
/// time, the load at the end, the target verdict and `runs`.
json bench_results(json machine, json runs, const bench_options& opts, double total_seconds);

/// Writes results.json, table.md and the SVG plots of `results` into `opts.out_dir`, and prints
/// the table, the target verdict and what was written on stdout.
/// @throws std::runtime_error if a file cannot be written.
void write_bench_report(const json& results, const bench_options& opts, double total_seconds);

}  // namespace keel::cli::bench_detail
