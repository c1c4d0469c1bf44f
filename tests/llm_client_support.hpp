// Shared helpers for the keel::llm::client tests: a config pointed at a test server, one-prompt
// requests, and a runner that sends requests through a client with N at once.
#pragma once

#include <keel/llm/client.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cstddef>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace keel_test::client {

/// `json` parsed as a config (no environment), with every entry's base URL set to `base_url`.
inline keel::llm::client_config make_config(const std::string& json, const std::string& base_url) {
  auto cfg = keel::llm::parse_config(json, "<test>",
                                     [](std::string_view) { return std::optional<std::string>{}; });
  for (auto& e : cfg.entries) {
    e.base_url = base_url;
  }
  return cfg;
}

/// A one-prompt request that names no model (the entry's is used) with a 64-token reply budget.
inline keel::llm::chat_request request(const std::string& prompt = "hello") {
  return keel::llm::chat_request::from_prompt("", prompt, 64);
}

/// Runs `requests` through `client` with up to `concurrency` at once, in input order per worker.
/// Each call's context is its index in `requests` (a `const std::size_t*`).
inline std::vector<keel::llm::call_outcome> run(
    boost::asio::io_context& ctx, keel::llm::client& client,
    const std::vector<keel::llm::chat_request>& requests, std::size_t concurrency = 1) {
  namespace asio = boost::asio;
  std::vector<keel::llm::call_outcome> out(requests.size());
  std::vector<std::size_t> index(requests.size());
  std::iota(index.begin(), index.end(), std::size_t{0});
  std::size_t next = 0;
  std::size_t running = concurrency;
  for (std::size_t w = 0; w < concurrency; ++w) {
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          while (next < requests.size()) {
            const std::size_t i = next++;
            out[i] = co_await client.call(requests[i], &index[i]);
          }
          // The server and the pool keep the context busy: stop it once every worker is done.
          if (--running == 0) {
            ctx.stop();
          }
        },
        asio::detached);
  }
  ctx.run();
  ctx.restart();
  return out;
}

/// One OpenAI entry "m" that retries transient errors up to 3 attempts, 1 ms apart.
inline constexpr const char* one_retrying_entry = R"({
  "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}],
  "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.001}}}
})";

/// An OpenAI primary and an Anthropic fallback; 2 attempts each, a breaker that opens after 3
/// failures for 30 s.
inline constexpr const char* two_entries = R"({
  "config_list": [
    {"api_type": "openai", "model": "primary", "api_key": "k1"},
    {"api_type": "anthropic", "model": "secondary", "api_key": "k2"}
  ],
  "policy": {"retry": {"max_attempts": 2, "backoff": {"kind": "constant", "base": 0.001}},
             "breaker": {"failure_threshold": 3, "break": 30}}
})";

}  // namespace keel_test::client
