// Example: with_fallback moves from an overloaded primary model to a secondary one.
#include <keel/fallback.hpp>
#include <keel/retry.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdio>

namespace asio = boost::asio;
using namespace std::chrono_literals;

asio::awaitable<std::string> call_model(std::string model, bool overloaded) {
  if (overloaded) {
    throw keel::failure(keel::error::throttled, model + ": 529 overloaded");
  }
  co_return model + " says hello";
}

int main() {
  asio::io_context ctx;
  int rc = 1;
  auto retry = keel::retry_policy::with_backoff(2, keel::backoff::constant(5ms));
  keel::fallback_policy policy;
  policy.on_fallback = [](const keel::fallback_event& e) {
    std::printf("falling back from #%zu to #%zu after: %s\n", e.from, e.to,
                keel::describe(e.error).c_str());
  };
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        std::string reply = co_await keel::with_fallback(
            keel::alternatives(
                [&] {
                  return keel::with_retry([] { return call_model("big-model", true); }, retry);
                },
                [] { return call_model("small-model", false); }),
            policy);
        std::printf("%s\n", reply.c_str());
        rc = reply == "small-model says hello" ? 0 : 1;
      },
      asio::detached);
  ctx.run();
  return rc;
}
