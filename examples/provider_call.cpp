// Example: real HTTP against the in-process mock LLM server: the first two answers are a 429
// with Retry-After and a 529 overload, then Anthropic's messages API answers; with_retry honours
// the server's delay, with_deadline bounds each attempt, keel::llm::complete speaks the wire
// format.
#include <keel/deadline.hpp>
#include <keel/http/client.hpp>
#include <keel/llm/complete.hpp>
#include <keel/retry.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using keel::testing::fault_kind;

int main() {
  asio::io_context ctx;
  keel::testing::mock_llm_server server{ctx};
  auto plan =
      keel::testing::fault_plan().with_script({fault_kind::rate_limit, fault_kind::overloaded});
  plan.retry_after = 50ms;
  server.set_plan("claude-demo", plan);
  server.start();

  keel::http::client http{ctx.get_executor(), keel::http::client_options{}};
  const keel::llm::endpoint ep(keel::llm::provider_kind::anthropic, server.base_url(),
                               "sk-ant-demo-key");
  const auto req =
      keel::llm::chat_request::from_prompt("claude-demo", "Why do retries need jitter?", 128);

  auto policy = keel::retry_policy::exponential_full_jitter(4, 20ms, 500ms);
  policy.on_retry = [](const keel::retry_event& e) {
    std::printf("WARNING attempt %d: %s; retrying in %lld ms%s\n", e.attempt,
                keel::describe(e.error).c_str(),
                static_cast<long long>(
                    std::chrono::duration_cast<std::chrono::milliseconds>(e.delay).count()),
                e.from_server_hint ? " (Retry-After)" : "");
  };
  int rc = 1;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        auto attempt = [&] {
          return keel::with_deadline([&] { return keel::llm::complete(http, ep, req); }, 2s);
        };
        keel::llm::chat_response reply = co_await keel::with_retry(attempt, policy);
        std::printf("%s (model %s, %lld in / %lld out tokens, request %s)\n", reply.text.c_str(),
                    reply.model.c_str(), reply.usage.input, reply.usage.output,
                    reply.request_id.c_str());
        const auto stats = server.stats();
        std::printf(
            "server saw %llu requests on %llu connection(s): 429 x%llu, 529 x%llu, 200 x%llu\n",
            static_cast<unsigned long long>(stats.total.requests),
            static_cast<unsigned long long>(stats.accepted_connections),
            static_cast<unsigned long long>(stats.status_count(429)),
            static_cast<unsigned long long>(stats.status_count(529)),
            static_cast<unsigned long long>(stats.status_count(200)));
        rc = stats.total.requests == 3 ? 0 : 1;
        server.stop();
      },
      asio::detached);
  ctx.run();
  return rc;
}
