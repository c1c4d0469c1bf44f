// `keel demo` and `keel batch --mock`: the batch against an in-process mock LLM server.
#pragma once

// The mock runs on its own thread and io_context (like a real server would, on the machine's
// second core); every config entry's base_url is pointed at it. The built-in scenario is a
// realistic fault mix: the primary (OpenAI wire format) has a server-side rate limit slightly
// below the client's and answers 429 with Retry-After beyond it, 1% 500s and 503s, and a 2.5 s
// outage starting 3 s in, so the breaker opens and the Anthropic fallback takes over; the
// fallback sends some 529 overloaded; a third entry speaks Bedrock in AWS adaptive mode.
//
// Thread safety: run from main only.

#include <keel/llm/config.hpp>
#include "batch.hpp"
#include "log.hpp"

#include <string>

namespace keel::cli {

/// Options of `keel demo`.
struct demo_options {
  /// Generated prompts.
  std::size_t prompts = 3000;
  /// Results file (empty: a file in a fresh temporary directory). A file that already holds
  /// results is refused unless `overwrite`.
  std::string out;
  /// Replace the results `out` already holds.
  bool overwrite = false;
  /// Scenario file (empty: the built-in one).
  std::string scenario;
  /// Config file (empty: the built-in one).
  std::string config;
};

/// The built-in demo config (three entries, a full policy); base URLs are set by the runner.
llm::client_config demo_config();

/// The built-in demo scenario as JSON text (docs/scenarios/keel-demo.json has a copy).
const char* demo_scenario_json();

/// Runs `run_batch` against an in-process mock: `scenario` is "demo" (built-in) or a file.
/// @returns run_batch's exit status.
int run_with_mock(const std::string& scenario, llm::client_config cfg, batch_options opts,
                  logger& log);

/// Generates the prompts and runs the demo; prints where the files are.
int run_demo(const demo_options& d, batch_options opts, logger& log);

}  // namespace keel::cli
