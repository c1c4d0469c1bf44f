// Example: 300 prompts at concurrency 32 against a server that limits to 100 requests/s and
// never says so (no rate-limit headers, a constant "Retry-After: 1", as an nginx limit_req proxy
// answers). A keel::rate_controller learns the limit from the 429s and paces one shared
// throttler at it; with_retry honours each 429's Retry-After for the call it rejected.
#include <keel/http/client.hpp>
#include <keel/llm/complete.hpp>
#include <keel/llm/error.hpp>
#include <keel/rate_controller.hpp>
#include <keel/retry.hpp>
#include <keel/testing/mock_llm_server.hpp>
#include <keel/throttler.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int main() {
  asio::io_context ctx;
  keel::testing::mock_llm_server server{ctx};
  server.set_plan("gpt-demo",
                  keel::testing::fault_plan{}
                      .with_rate_limit(/*rps*/ 100, /*tpm*/ 0, /*burst*/ 21)
                      .with_rate_limit_headers(false)
                      .with_limiter_retry_after(keel::testing::limiter_retry_after_mode::constant)
                      .with_retry_after(1s, keel::testing::retry_after_style::seconds));
  server.start();

  keel::http::client http{ctx.get_executor(), keel::http::client_options{}};
  const keel::llm::endpoint ep(keel::llm::provider_kind::openai, server.base_url(), "sk-demo");

  keel::throttler bucket{ctx.get_executor()};  // no configured limit
  keel::rate_controller_options po;
  po.on_change = [](const keel::pacing_state& r, const keel::pacing_state&) {
    std::printf("pacing: %-7s estimate %6.1f r/s, pacing at %6.1f r/s\n", keel::to_string(r.phase),
                r.estimate, r.rate);
  };
  keel::rate_controller pacing{bucket, po};

  // One attempt: wait for the shared bucket, tell the controller, send, report the outcome.
  auto attempt =
      [&](const keel::llm::chat_request& req) -> asio::awaitable<keel::llm::chat_response> {
    co_await bucket.acquire();
    const auto ticket = pacing.on_send();
    try {
      keel::llm::chat_response reply = co_await keel::llm::complete(http, ep, req);
      pacing.on_accepted(ticket);
      co_return reply;
    } catch (const keel::llm::provider_error& e) {
      if (e.llm_code() == keel::llm::errc::rate_limited) {
        pacing.on_throttled(ticket, keel::llm::limit_of(e), e.retry_after());
      } else {
        pacing.on_accepted(ticket);  // the limiter let it through; the server failed
      }
      throw;
    } catch (...) {
      pacing.on_abandoned(ticket);  // no answer: no signal
      throw;
    }
  };

  constexpr int prompts = 300;
  constexpr int concurrency = 32;
  int next = 0;
  int ok = 0;
  int running = concurrency;
  const auto t0 = std::chrono::steady_clock::now();
  for (int w = 0; w < concurrency; ++w) {
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          while (next < prompts) {
            const keel::llm::chat_request req(
                "gpt-demo", {keel::llm::chat_message("user", "prompt " + std::to_string(next++))},
                16);
            auto policy = keel::retry_policy::exponential_full_jitter(6, 100ms, 2s);
            co_await keel::with_retry([&] { return attempt(req); }, policy);
            ++ok;
          }
          // Idle pooled connections keep the context busy: stop it after the last worker.
          if (--running == 0) {
            ctx.stop();
          }
        },
        asio::detached);
  }
  ctx.run();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto stats = server.stats();
  std::printf("%d of %d answered in %.2f s (ideal about %.2f s); %llu requests, %llu x 429\n", ok,
              prompts, wall, (prompts - 21) / 100.0,
              static_cast<unsigned long long>(stats.total.requests),
              static_cast<unsigned long long>(stats.status_count(429)));
  const keel::pacing_state learned = pacing.requests();
  // The estimate is within 20% of the real 100 r/s, and 429s stayed a small share.
  const bool good = ok == prompts && learned.estimate > 80 && learned.estimate < 120 &&
                    stats.status_count(429) < prompts / 5;
  return good ? 0 : 1;
}
