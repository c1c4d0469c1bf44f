// Example: fan_out runs 100 calls, 8 at a time, and reports one result per item in order.
#include <keel/fan_out.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdio>
#include <numeric>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;

int main() {
  asio::io_context ctx;
  std::vector<int> items(100);
  std::iota(items.begin(), items.end(), 0);
  int in_flight = 0, peak = 0, rc = 1;
  auto work = [&](int i) -> asio::awaitable<int> {
    peak = std::max(peak, ++in_flight);
    asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(i % 3));
    co_await t.async_wait(asio::use_awaitable);
    --in_flight;
    if (i % 10 == 0) {
      throw std::runtime_error("item " + std::to_string(i) + " failed");
    }
    co_return i* i;
  };
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        auto results = co_await keel::fan_out(items, 8, work);
        std::size_t ok = 0, failed = 0;
        for (auto& r : results) {
          r ? ++ok : ++failed;
        }
        std::printf("%zu results: %zu ok, %zu failed; at most %d in flight; results[7] = %d\n",
                    results.size(), ok, failed, peak, *results[7]);
        rc = (results.size() == 100 && failed == 10 && peak <= 8) ? 0 : 1;
      },
      asio::detached);
  ctx.run();
  return rc;
}
