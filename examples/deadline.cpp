// Example: with_deadline cancels a slow call; an overall deadline bounds a whole retry loop.
#include <keel/deadline.hpp>
#include <keel/retry.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdio>

namespace asio = boost::asio;
using namespace std::chrono_literals;

asio::awaitable<int> slow_call(std::chrono::milliseconds how_slow) {
  asio::steady_timer t(co_await asio::this_coro::executor, how_slow);
  co_await t.async_wait(asio::use_awaitable);
  co_return 42;
}

int main() {
  asio::io_context ctx;
  int rc = 1;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        // 1. A per-call deadline: the 500 ms call is cancelled after 50 ms.
        try {
          co_await keel::with_deadline([] { return slow_call(500ms); }, 50ms);
        } catch (const keel::failure& f) {
          std::printf("per-call deadline: %s\n", f.what());
        }
        // 2. An overall deadline around retries of per-attempt deadlines: each attempt gets
        //    30 ms, the whole call 100 ms; the retry loop never starts a sleep it cannot finish.
        auto policy = keel::retry_policy::with_backoff(10, keel::backoff::constant(20ms));
        int attempts = 0;
        policy.on_retry = [&](const keel::retry_event& e) { attempts = e.attempt; };
        try {
          co_await keel::with_deadline(
              [&] {
                return keel::with_retry(
                    [] { return keel::with_deadline([] { return slow_call(500ms); }, 30ms); },
                    policy);
              },
              100ms);
        } catch (const boost::system::system_error& e) {
          std::printf("overall deadline after %d attempts: %s\n", attempts + 1, e.what());
          rc = 0;
        }
      },
      asio::detached);
  ctx.run();
  return rc;
}
