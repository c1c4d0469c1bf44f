// Demo: 200 prompts fanned out through keel's whole configured stack (`keel::llm::client`):
// adaptive pacing, retries, the breaker, the retry budget and a fallback entry, from the same
// config file the `keel` command reads.
//
//     example_llm_client keel.json     # your config (e.g. [{"model", "base_url", "api_key"}])
//     example_llm_client               # no argument: against keel's in-process mock server
//
// The user code is `summarise` and the first four lines of `main` (15 lines). Without an argument
// the program starts a mock server that rate-limits the primary at 100 requests/s with no
// rate-limit headers and `Retry-After: 1` (an nginx `limit_req`), fails 5% of its calls with 503
// and 529, and answers the fallback normally; it exits 1 unless every prompt got an answer.
#include <keel/fan_out.hpp>
#include <keel/llm/client.hpp>
#include <keel/testing/mock_llm_thread.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace asio = boost::asio;

namespace {

int failed = 0;

// ---- user code -------------------------------------------------------------------------------
asio::awaitable<void> summarise(keel::llm::client& llm, std::vector<std::string> prompts) {
  auto replies = co_await keel::fan_out(prompts, 64, [&](const std::string& p) {
    return llm.complete(keel::llm::chat_request::from_prompt("", p, 64));
  });
  for (const auto& r : replies) {
    std::puts(r ? r->text.c_str() : keel::llm::error_class(r.error()).c_str());
    failed += r ? 0 : 1;
  }
}
// ------------------------------------------------------------------------------------------------

// Plans the mock: the primary rate-limited without headers, and 5% 503 + 5% 529.
void plan_mock(keel::testing::mock_llm_server& server) {
  using keel::testing::fault_kind;
  server.set_plan("primary-model",
                  keel::testing::fault_plan{}
                      .with_latency(std::chrono::milliseconds(5))
                      .with_rate_limit(100, 0, 20)
                      .with_rate_limit_headers(false)
                      .with_limiter_retry_after(keel::testing::limiter_retry_after_mode::constant)
                      .with_probability(fault_kind::unavailable, 0.05)
                      .with_probability(fault_kind::overloaded, 0.05));
}

// Writes a config naming the mock's two models; returns the file's path.
std::string write_config(const std::string& base_url) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("keel-example-" + std::to_string(::getpid()) + ".json");
  std::ofstream(path) << R"([{"model": "primary-model", "base_url": ")" << base_url
                      << R"(", "api_key": "sk-demo"}, {"model": "fallback-model", "base_url": ")"
                      << base_url << R"(", "api_key": "sk-demo"}])";
  return path.string();
}

}  // namespace

int main(int argc, char** argv) {
  keel::testing::mock_llm_thread mock{{.seed = 7}, plan_mock};  // its own thread
  const std::string config_file = argc > 1 ? argv[1] : write_config(mock.base_url());
  std::vector<std::string> prompts;
  for (int i = 0; i < 200; ++i) {
    prompts.push_back("summarise report #" + std::to_string(i));
  }
  // ---- user code (continued) -----------------------------------------------------------------
  asio::io_context io;
  keel::llm::client llm{io.get_executor(), keel::llm::load_config(config_file)};
  asio::co_spawn(io, summarise(llm, std::move(prompts)), asio::detached);
  io.run();
  // ------------------------------------------------------------------------------------------------
  if (argc <= 1) {
    std::filesystem::remove(config_file);
  }
  std::fprintf(stderr, "%d of 200 failed\n", failed);
  return failed == 0 ? 0 : 1;
}
