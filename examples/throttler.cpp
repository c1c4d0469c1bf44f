// Example: six callers share one throttler; a 429 with Retry-After holds all of them at once.
#include <keel/throttler.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>

using namespace std::chrono_literals;
namespace asio = boost::asio;

namespace {

const auto start = std::chrono::steady_clock::now();

double ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// What a provider's reply says about its usage.
struct reply {
  int total_tokens = 0;
};

// Stands for the provider call.
asio::awaitable<reply> send() {
  co_return reply{250};
}

// A caller that estimates its LLM tokens, waits for its turn, and settles the real usage.
asio::awaitable<void> caller(keel::throttler& bucket, int id) {
  // 400 tokens estimated; the 150 the reply did not use are given back when it arrives.
  co_await keel::with_throttle(bucket, {.requests = 1, .tokens = 400}, send,
                               [](const reply& r) { return r.total_tokens; });
  std::printf("t=%4.0f ms  caller %d granted; %.0f tokens left after settling\n", ms(), id,
              bucket.available_tokens());
}

// At 120 ms one call gets "429, retry-after: 0.2": everybody pauses, not just that caller.
asio::awaitable<void> provider_says_slow_down(keel::throttler& bucket) {
  asio::steady_timer timer{co_await asio::this_coro::executor, 120ms};
  co_await timer.async_wait(asio::use_awaitable);
  bucket.pause_for(200ms);
  std::printf("t=%4.0f ms  429 received: pausing everybody for 200 ms (%zu waiting)\n", ms(),
              bucket.waiters());
}

}  // namespace

int main() {
  asio::io_context ctx;
  // 20 requests per second with a burst of 2, and 60k LLM tokens per minute.
  keel::throttler bucket{
      ctx.get_executor(),
      {.requests_per_second = 20, .burst = 2, .tokens_per_minute = 60'000, .token_burst = 2'000}};
  for (int id = 0; id < 6; ++id) {
    asio::co_spawn(ctx, caller(bucket, id), asio::detached);
  }
  asio::co_spawn(ctx, provider_says_slow_down(bucket), asio::detached);
  ctx.run();

  std::printf("granted %llu, %llu had to wait, %.0f ms waited in total\n",
              static_cast<unsigned long long>(bucket.total_granted()),
              static_cast<unsigned long long>(bucket.total_waits()),
              std::chrono::duration<double, std::milli>(bucket.total_wait_time()).count());
  return bucket.total_granted() == 6 ? 0 : 1;
}
