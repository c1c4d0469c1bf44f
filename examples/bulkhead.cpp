// Example: a bulkhead of 2 slots and a queue of 2 sheds load instead of piling it up.
#include <keel/bulkhead.hpp>
#include <keel/error.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <cstdio>
#include <string>

using namespace std::chrono_literals;
namespace asio = boost::asio;

namespace {

const auto start = std::chrono::steady_clock::now();

double ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

asio::awaitable<void> sleep_for(std::chrono::milliseconds d) {
  asio::steady_timer timer{co_await asio::this_coro::executor, d};
  co_await timer.async_wait(asio::use_awaitable);
}

// A call that arrives at `arrive`, then holds a slot for `work`.
asio::awaitable<void> call(keel::bulkhead& pool, char name, std::chrono::milliseconds arrive,
                           std::chrono::milliseconds work) {
  co_await sleep_for(arrive);
  try {
    const int answer = co_await keel::with_bulkhead(pool, [&]() -> asio::awaitable<int> {
      std::printf("t=%4.0f ms  %c runs (%zu in flight)\n", ms(), name, pool.in_flight());
      co_await sleep_for(work);
      co_return 42;
    });
    std::printf("t=%4.0f ms  %c done: %d\n", ms(), name, answer);
  } catch (const keel::failure& f) {
    std::printf("t=%4.0f ms  %c rejected: %s\n", ms(), name, f.code().message().c_str());
  }
}

}  // namespace

int main() {
  asio::io_context ctx;
  keel::bulkhead pool{ctx.get_executor(),
                      {.max_concurrent = 2, .max_queue = 2, .queue_timeout = 150ms}};
  asio::co_spawn(ctx, call(pool, 'A', 0ms, 300ms), asio::detached);   // runs
  asio::co_spawn(ctx, call(pool, 'B', 0ms, 300ms), asio::detached);   // runs
  asio::co_spawn(ctx, call(pool, 'C', 10ms, 50ms), asio::detached);   // queues, times out
  asio::co_spawn(ctx, call(pool, 'D', 10ms, 50ms), asio::detached);   // queues, times out
  asio::co_spawn(ctx, call(pool, 'E', 20ms, 50ms), asio::detached);   // queue full: rejected
  asio::co_spawn(ctx, call(pool, 'F', 200ms, 50ms), asio::detached);  // gets A's slot at 300
  ctx.run();

  std::printf("rejected %llu, timed out %llu, in flight %zu\n",
              static_cast<unsigned long long>(pool.rejected()),
              static_cast<unsigned long long>(pool.timed_out()), pool.in_flight());
  return pool.rejected() == 1 && pool.timed_out() == 2 && pool.in_flight() == 0 ? 0 : 1;
}
