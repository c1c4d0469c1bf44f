// Consumer of keel::keel alone: with_retry over an operation that fails twice, then answers.
#include <keel/retry.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>
#include <string>

namespace asio = boost::asio;
using namespace std::chrono_literals;

asio::awaitable<std::string> flaky(int& calls) {
  if (++calls < 3) {
    throw boost::system::system_error(asio::error::connection_reset);
  }
  co_return "answered on attempt " + std::to_string(calls);
}

int main() {
  asio::io_context ctx;
  int calls = 0;
  std::string reply;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        reply = co_await keel::with_retry([&] { return flaky(calls); },
                                          keel::retry_policy::exponential_full_jitter(5, 1ms, 5ms));
      },
      asio::detached);
  ctx.run();
  std::printf("consumer_core: %s\n", reply.c_str());
  return calls == 3 && reply == "answered on attempt 3" ? 0 : 1;
}
