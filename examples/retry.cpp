// Example: with_retry over a flaky operation, logging every retry like a WARNING line would.
#include <keel/retry.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>

namespace asio = boost::asio;
using namespace std::chrono_literals;

// Fails twice with a reset, once with a "429" carrying Retry-After: 30 ms, then answers.
asio::awaitable<std::string> flaky_call(int& calls) {
  ++calls;
  if (calls <= 2) {
    throw boost::system::system_error(asio::error::connection_reset);
  }
  if (calls == 3) {
    throw keel::failure(keel::error::throttled, "429 rate limited", {},
                        std::chrono::nanoseconds(30ms));
  }
  co_return "hello after " + std::to_string(calls) + " attempts";
}

int main() {
  asio::io_context ctx;
  int calls = 0;
  auto policy = keel::retry_policy::exponential_full_jitter(5, 10ms, 200ms);
  policy.on_retry = [](const keel::retry_event& e) {
    std::printf("WARNING retry: attempt %d failed (%s), sleeping %lld ms%s\n", e.attempt,
                keel::describe(e.error).c_str(),
                static_cast<long long>(
                    std::chrono::duration_cast<std::chrono::milliseconds>(e.delay).count()),
                e.from_server_hint ? " (server hint)" : "");
  };
  int rc = 1;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        std::string reply = co_await keel::with_retry([&] { return flaky_call(calls); }, policy);
        std::printf("%s\n", reply.c_str());
        rc = calls == 4 ? 0 : 1;
      },
      asio::detached);
  ctx.run();
  return rc;
}
