// `keel demo` and `keel batch --mock`.
#include "demo.hpp"

#include <keel/testing/mock_llm_server.hpp>
#include <keel/testing/mock_llm_thread.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <unistd.h>
#include <cstdio>
#include <filesystem>
#include <fstream>

namespace keel::cli {

namespace {

const char* const demo_config_json = R"({
  "config_list": [
    {"api_type": "openai", "model": "gpt-4o-mini", "api_key": "demo-key-not-secret",
     "timeout": 10, "requests_per_minute": 15000},
    {"api_type": "anthropic", "model": "claude-3-5-haiku-latest",
     "api_key": "demo-key-not-secret", "timeout": 10, "requests_per_minute": 12000},
    {"api_type": "bedrock", "model": "anthropic.claude-3-haiku-20240307-v1:0",
     "aws_region": "us-east-1", "mode": "adaptive", "timeout": 10}
  ],
  "policy": {
    "retry": {"max_attempts": 4,
              "backoff": {"kind": "exponential", "base": 0.1, "cap": 2, "jitter": "full"}},
    "deadline": 60,
    "breaker": {"failure_threshold": 5, "break": 1, "break_growth": 2, "max_break": 10},
    "retry_budget": {"max_tokens": 200, "token_ratio": 0.2},
    "concurrency": 64
  }
})";

const char* const demo_scenario = R"({
  "seed": 7,
  "models": {
    "gpt-4o-mini": {
      "latency_ms": {"min": 15, "max": 60},
      "rate_limit": {"requests_per_second": 240, "burst": 40},
      "errors": {"server_error": 0.01, "unavailable": 0.01},
      "outages": [{"from_ms": 3000, "to_ms": 5500}]
    },
    "claude-3-5-haiku-latest": {
      "latency_ms": {"min": 20, "max": 80},
      "rate_limit": {"requests_per_second": 220, "burst": 40},
      "errors": {"overloaded": 0.03}
    },
    "anthropic.claude-3-haiku-20240307-v1:0": {
      "latency_ms": {"min": 25, "max": 90},
      "errors": {"throttling": 0.05, "unavailable": 0.01}
    }
  }
})";

std::string status_line(const keel::testing::mock_model_stats& s) {
  std::string out = std::to_string(s.requests) + " requests:";
  bool first = true;
  for (const auto& [status, n] : s.by_status) {
    out += (first ? " " : ", ") + std::to_string(n) + " x " + std::to_string(status);
    first = false;
  }
  if (s.resets) {
    out += ", " + std::to_string(s.resets) + " resets";
  }
  return out;
}

}  // namespace

llm::client_config demo_config() {
  return llm::parse_config(demo_config_json, "<built-in demo config>",
                           [](std::string_view) { return std::optional<std::string>{}; });
}

const char* demo_scenario_json() {
  return demo_scenario;
}

int run_with_mock(const std::string& scenario, llm::client_config cfg, batch_options opts,
                  logger& log) {
  const keel::testing::scenario s = scenario == "demo"
                                        ? keel::testing::scenario::from_json(demo_scenario)
                                        : keel::testing::load_scenario(scenario);
  keel::testing::mock_options mo;
  mo.seed = opts.seed;
  keel::testing::mock_llm_thread mock(s, mo);
  for (auto& e : cfg.entries) {
    e.base_url = mock.base_url();
  }
  log.log(log_level::info, "mock", "in-process mock server started", {{"url", mock.base_url()}});
  const int rc = run_batch(cfg, opts, log);
  if (opts.print_summary) {
    const auto st = mock.stats();
    std::printf("  mock server    %s\n", status_line(st.total).c_str());
    for (const auto& [model, ms] : st.by_model) {
      std::printf("    %-40s %s\n", model.c_str(), status_line(ms).c_str());
    }
    std::fflush(stdout);
  }
  return rc;
}

int run_demo(const demo_options& d, batch_options opts, logger& log) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("keel-demo-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path in = dir / "prompts.jsonl";
  {
    std::ofstream f(in, std::ios::trunc);
    static const char* const topics[] = {"the incident report",    "this support ticket",
                                         "the release notes",      "the customer email",
                                         "the meeting transcript", "the pull request",
                                         "the on-call handover",   "the postmortem"};
    for (std::size_t i = 1; i <= d.prompts; ++i) {
      f << R"({"id": )" << i << R"(, "prompt": "Summarise )" << topics[i % 8] << " #" << i
        << R"( in two sentences.", "max_tokens": 128})"
        << "\n";
    }
    if (!f) {
      throw std::runtime_error("cannot write " + in.string());
    }
  }
  opts.in = in.string();
  opts.out = d.out.empty() ? (dir / "results.jsonl").string() : d.out;
  // The demo's own temporary file is always fresh; a file the user named keeps its results
  // unless --overwrite says otherwise, as for `keel batch`.
  opts.overwrite = d.out.empty() || d.overwrite;
  opts.title = "keel demo: " + std::to_string(d.prompts) +
               " prompts against the in-process mock (no network, no keys)";
  llm::client_config cfg =
      d.config.empty() ? demo_config() : llm::load_config(d.config, llm::process_env());
  const int rc = run_with_mock(d.scenario.empty() ? "demo" : d.scenario, std::move(cfg), opts, log);
  std::printf("  files          %s -> %s\n", opts.in.c_str(), opts.out.c_str());
  std::fflush(stdout);
  return rc;
}

}  // namespace keel::cli
