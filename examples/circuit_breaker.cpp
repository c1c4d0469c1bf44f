// Example: a circuit breaker in front of a flaky provider, with a degraded answer while it is open.
#include <keel/circuit_breaker.hpp>
#include <keel/clock.hpp>
#include <keel/error.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>
#include <exception>
#include <string>

using namespace std::chrono_literals;
namespace asio = boost::asio;

namespace {

std::chrono::steady_clock::time_point now() {
  return std::chrono::steady_clock::now();
}

// Stands in for an LLM client: its first three calls fail with a connection reset (a transient
// failure, the kind a breaker counts); after that it answers. Each call takes 2 ms.
struct flaky_provider {
  int calls = 0;

  // The prompt is taken by value: a coroutine must not keep references to its caller's temporaries.
  asio::awaitable<std::string> complete(std::string prompt) {
    ++calls;
    keel::basic_timer<> latency{co_await asio::this_coro::executor};
    latency.expires_after(2ms);
    co_await latency.async_wait(asio::use_awaitable);
    if (calls <= 3) {
      throw boost::system::system_error(asio::error::connection_reset, "provider reset");
    }
    co_return "echo: " + prompt;
  }
};

asio::awaitable<void> demo(keel::circuit_breaker& breaker, flaky_provider& provider) {
  for (int i = 1; i <= 5; ++i) {
    const std::string prompt = "question " + std::to_string(i);
    // Lambdas on their own line: portable to g++ 12 as well (see docs/core/circuit_breaker.md).
    auto op = [&] { return provider.complete(prompt); };
    std::exception_ptr error;
    try {
      const std::string answer = co_await keel::with_breaker(breaker, op);
      std::printf("call %d: %s\n", i, answer.c_str());
    } catch (...) {
      error = std::current_exception();
    }
    if (error) {
      std::printf("call %d: failed: %s (breaker %s)\n", i, keel::describe(error).c_str(),
                  keel::to_string(breaker.state()));
    }
  }

  // While the breaker is open, answer something useful instead of failing.
  auto op = [&] { return provider.complete("question 6"); };
  auto busy = [](const keel::failure& f) {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(*f.retry_after());
    return "(degraded) the assistant is busy; try again in " + std::to_string(ms.count()) + " ms";
  };
  std::printf("call 6: %s\n", (co_await keel::with_breaker(breaker, op, busy)).c_str());

  if (const auto until = breaker.open_until()) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*until - now());
    std::printf("waiting %lld ms for the break to end\n", static_cast<long long>(left.count()));
    keel::basic_timer<> pause{co_await asio::this_coro::executor};
    pause.expires_at(*until);
    co_await pause.async_wait(asio::use_awaitable);
  }

  auto probe = [&] { return provider.complete("question 7"); };
  std::printf("call 7 (probe): %s\n", (co_await keel::with_breaker(breaker, probe)).c_str());
}

}  // namespace

int main() {
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(3, 50ms);
  policy.on_state_change = [](keel::breaker_state from, keel::breaker_state to) {
    std::printf("  [breaker] %s -> %s\n", keel::to_string(from), keel::to_string(to));
  };
  keel::circuit_breaker breaker{ctx.get_executor(), policy};
  flaky_provider provider;

  std::exception_ptr failed;
  asio::co_spawn(ctx, demo(breaker, provider), [&](std::exception_ptr e) { failed = e; });
  ctx.run();

  if (failed) {
    std::printf("unexpected failure: %s\n", keel::describe(failed).c_str());
    return 1;
  }
  const auto c = breaker.counters();
  std::printf("provider calls: %d, rejected: %llu, opened: %llu, final state: %s\n", provider.calls,
              static_cast<unsigned long long>(c.rejected),
              static_cast<unsigned long long>(c.opened), keel::to_string(breaker.state()));
  // Three failures, then a probe: calls 4 to 6 never reached the provider.
  const bool as_expected = provider.calls == 4 && c.rejected == 3 && c.opened == 1 &&
                           breaker.state() == keel::breaker_state::closed;
  return as_expected ? 0 : 1;
}
