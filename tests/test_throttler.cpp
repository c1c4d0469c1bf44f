// Tests for keel/throttler.hpp: rate, FIFO, two dimensions, settle, pause, cancel, with_throttle.
#include <keel/testing/manual_clock.hpp>

#include <keel/throttler.hpp>
#include "support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/cancellation_state.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using keel::testing::manual_clock;
using virtual_throttler = keel::basic_throttler<manual_clock>;

namespace {

namespace asio = boost::asio;

using keel_test::elapsed;
using keel_test::sleep_for;

struct grant {
  int id;
  std::chrono::nanoseconds at;
  bool operator==(const grant&) const = default;
};

// Acquires `cost` and records who was granted when; records an abort as a negative id.
asio::awaitable<void> take(virtual_throttler& bucket, keel::throttle_cost cost, int id,
                           std::vector<grant>& log) {
  try {
    co_await bucket.acquire(cost);
    log.push_back({id, elapsed()});
  } catch (const boost::system::system_error& e) {
    if (e.code() != asio::error::operation_aborted) {
      throw;
    }
    log.push_back({-id, elapsed()});
  }
}

void spawn_take(asio::io_context& ctx, virtual_throttler& bucket, keel::throttle_cost cost, int id,
                std::vector<grant>& log) {
  asio::co_spawn(ctx, take(bucket, cost, id, log), [](std::exception_ptr ep) {
    if (ep) {
      std::rethrow_exception(ep);
    }
  });
}

// Same, cancellable through `signal`.
void spawn_take(asio::io_context& ctx, virtual_throttler& bucket, keel::throttle_cost cost, int id,
                std::vector<grant>& log, asio::cancellation_signal& signal) {
  asio::co_spawn(ctx, take(bucket, cost, id, log),
                 asio::bind_cancellation_slot(signal.slot(), [](std::exception_ptr ep) {
                   if (ep) {
                     std::rethrow_exception(ep);
                   }
                 }));
}

}  // namespace

namespace Catch {
template <>
struct StringMaker<grant> {
  static std::string convert(const grant& g) {
    return "{" + std::to_string(g.id) + " at " +
           std::to_string(std::chrono::duration<double, std::milli>(g.at).count()) + " ms}";
  }
};
}  // namespace Catch

TEST_CASE("a thousand coroutines sharing a 100/s bucket are granted in FIFO order at the rate",
          "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 1}};
  std::vector<grant> log;
  for (int i = 0; i < 1000; ++i) {
    spawn_take(ctx, bucket, {}, i, log);
  }

  keel::testing::run_for(ctx, 5s);
  CHECK(log.size() == 501);  // the burst at t=0, then one every 10 ms up to and including 5 s
  CHECK(bucket.waiters() == 499);
  CHECK(bucket.total_queued_time() == 5s);  // the present wait counts

  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 1000; }, 10s));
  CHECK(elapsed() == 9990ms);
  for (int k = 0; k < 1000; ++k) {
    INFO("grant " << k);
    REQUIRE(log[k] == grant{k, k * 10ms});
  }
  CHECK(bucket.waiters() == 0);
  CHECK(bucket.total_granted() == 1000);
  CHECK(bucket.total_waits() == 999);
  // Waiter k (k >= 1) queued at 0 and was granted at k * 10 ms.
  CHECK(bucket.total_wait_time() == 10ms * (999 * 1000 / 2));
  // The rate held calls back from 0 to the last grant, counted once however many waited; time
  // with nobody waiting adds nothing.
  CHECK(bucket.total_queued_time() == 9990ms);
  manual_clock::advance(1s);
  CHECK(bucket.total_queued_time() == 9990ms);
}

TEST_CASE("a large token request is not starved by smaller ones queued behind it", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  // 6000 tokens per minute = 100 per second; requests unlimited.
  virtual_throttler bucket{ctx.get_executor(), {.tokens_per_minute = 6000, .token_burst = 1000}};
  REQUIRE(bucket.try_acquire({.requests = 1, .tokens = 1000}));
  std::vector<grant> log;
  spawn_take(ctx, bucket, {.tokens = 900}, 1, log);
  for (int i = 2; i <= 6; ++i) {
    spawn_take(ctx, bucket, {.tokens = 10}, i, log);
  }
  keel::testing::run_for(ctx, 1s);
  // 100 tokens are available, enough for any small request, yet nobody overtakes the big one.
  CHECK(bucket.available_tokens() == Approx(100));
  CHECK_FALSE(bucket.try_acquire({.tokens = 10}));
  spawn_take(ctx, bucket, {.tokens = 10}, 7, log);
  keel::testing::run_for(ctx, 1ms);
  CHECK(log.empty());
  CHECK(bucket.waiters() == 7);

  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 7; }, 20s));
  CHECK(log == std::vector<grant>{{1, 9000ms},
                                  {2, 9100ms},
                                  {3, 9200ms},
                                  {4, 9300ms},
                                  {5, 9400ms},
                                  {6, 9500ms},
                                  {7, 9600ms}});
}

TEST_CASE("requests and tokens are acquired all-or-nothing", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{
      ctx.get_executor(),
      {.requests_per_second = 10, .burst = 5, .tokens_per_minute = 600, .token_burst = 100}};
  REQUIRE(bucket.try_acquire({.requests = 1, .tokens = 100}));
  CHECK(bucket.available_requests() == Approx(4));
  CHECK(bucket.available_tokens() == Approx(0).margin(1e-9));

  std::vector<grant> log;
  spawn_take(ctx, bucket, {.requests = 1, .tokens = 50}, 1, log);
  keel::testing::run_for(ctx, 2s);
  // Requests are there but tokens are not: the waiter took neither.
  CHECK(log.empty());
  CHECK(bucket.available_requests() == Approx(5));
  CHECK(bucket.available_tokens() == Approx(20));
  CHECK_FALSE(bucket.try_acquire({.requests = 1, .tokens = 0}));  // nobody jumps the queue

  REQUIRE(keel::testing::run_until(
      ctx, [&] { return !log.empty(); }, 10s));
  CHECK(log.front() == grant{1, 5s});
  CHECK(bucket.available_requests() == Approx(4));
  CHECK(bucket.available_tokens() == Approx(0).margin(1e-9));
}

TEST_CASE("try_acquire takes only what is available now", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 10, .burst = 2}};
  CHECK(bucket.try_acquire());
  CHECK(bucket.try_acquire());
  CHECK_FALSE(bucket.try_acquire());
  CHECK(bucket.available_requests() == Approx(0).margin(1e-9));
  manual_clock::advance(99ms);
  CHECK_FALSE(bucket.try_acquire());
  manual_clock::advance(1ms);
  CHECK(bucket.try_acquire());
  CHECK_FALSE(bucket.try_acquire({.requests = 0.5}));
  CHECK(bucket.total_granted() == 3);
  CHECK(bucket.total_waits() == 0);
}

TEST_CASE("settle gives back unused tokens and charges overruns", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.tokens_per_minute = 6000, .token_burst = 1000}};
  REQUIRE(bucket.try_acquire({.tokens = 800}));
  CHECK(bucket.available_tokens() == Approx(200));
  bucket.settle(800, 300);  // used less than estimated
  CHECK(bucket.available_tokens() == Approx(700));
  bucket.settle(100, 900);  // used more: debt
  CHECK(bucket.available_tokens() == Approx(-100));
  bucket.settle(5000, 0);  // never above capacity
  CHECK(bucket.available_tokens() == Approx(1000));

  // From debt, a waiter waits out the debt plus its own cost.
  bucket.settle(0, 1100);
  std::vector<grant> log;
  spawn_take(ctx, bucket, {.tokens = 100}, 1, log);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return !log.empty(); }, 10s));
  CHECK(log.front() == grant{1, 2s});

  // A refund that covers the head grants it at once.
  spawn_take(ctx, bucket, {.tokens = 300}, 2, log);
  keel::testing::run_for(ctx, 10ms);
  CHECK(log.size() == 1);
  bucket.settle(300, 0);
  keel::testing::poll_all(ctx);
  REQUIRE(log.size() == 2);
  CHECK(log.back() == grant{2, 2010ms});
}

TEST_CASE("pause_until holds every waiter until the pause ends, then releases them at the rate",
          "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 1}};
  bucket.pause_until(manual_clock::time_point{200ms});
  CHECK_FALSE(bucket.try_acquire());  // the bucket is full, but paused
  std::vector<grant> log;
  for (int i = 1; i <= 5; ++i) {
    spawn_take(ctx, bucket, {}, i, log);
  }
  keel::testing::run_for(ctx, 50ms);
  bucket.pause_for(100ms);  // would end at 150 ms: a pause is never shortened
  CHECK(bucket.paused_until() == manual_clock::time_point{200ms});
  keel::testing::run_for(ctx, 149ms);
  CHECK(log.empty());
  CHECK(elapsed() == 199ms);
  CHECK(bucket.total_queued_time() == 0ms);  // waiting out a pause is not waiting for the rate

  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 5; }, 10s));
  // The saved token goes at the end of the pause, then one every 10 ms.
  CHECK(log == std::vector<grant>{{1, 200ms}, {2, 210ms}, {3, 220ms}, {4, 230ms}, {5, 240ms}});
  CHECK(bucket.total_queued_time() == 40ms);
}

TEST_CASE("a later pause extends an earlier one and time paused earns no tokens", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 5}};
  for (int i = 0; i < 5; ++i) {
    REQUIRE(bucket.try_acquire());
  }
  bucket.pause_for(100ms);
  std::vector<grant> log;
  for (int i = 1; i <= 3; ++i) {
    spawn_take(ctx, bucket, {}, i, log);
  }
  keel::testing::run_for(ctx, 50ms);
  bucket.pause_until(manual_clock::time_point{300ms});  // a second 429 while paused
  CHECK(bucket.paused_until() == manual_clock::time_point{300ms});
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 3; }, 10s));
  // The bucket was empty when paused and earns nothing before 300 ms.
  CHECK(log == std::vector<grant>{{1, 310ms}, {2, 320ms}, {3, 330ms}});
  CHECK(bucket.total_queued_time() == 30ms);  // from the end of the extended pause
}

TEST_CASE("set_rate changes the grant spacing mid-run", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 1}};
  std::vector<grant> log;
  for (int i = 0; i < 10; ++i) {
    spawn_take(ctx, bucket, {}, i, log);
  }
  keel::testing::run_for(ctx, 55ms);
  REQUIRE(log.size() == 6);  // 0, 10, ..., 50 ms
  bucket.set_rate(50, 0);    // half a token saved at 100/s, the other half at 50/s: 65 ms
  keel::testing::run_for(ctx, 30ms);
  REQUIRE(log.size() == 8);  // 65, 85 ms
  bucket.set_rate(200, 0);
  CHECK(bucket.options().requests_per_second == 200);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 10; }, 10s));
  std::vector<std::chrono::nanoseconds> at;
  for (const auto& g : log) {
    at.push_back(g.at);
  }
  CHECK(at == std::vector<std::chrono::nanoseconds>{0ms, 10ms, 20ms, 30ms, 40ms, 50ms, 65ms, 85ms,
                                                    90ms, 95ms});
}

TEST_CASE("a cancelled waiter leaves the queue, takes nothing and the next one gets its turn",
          "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 1}};
  std::vector<grant> log;
  asio::cancellation_signal cancel_3;
  asio::cancellation_signal cancel_5;
  spawn_take(ctx, bucket, {}, 1, log);  // granted at once
  spawn_take(ctx, bucket, {}, 2, log);  // due at 10 ms
  spawn_take(ctx, bucket, {}, 3, log, cancel_3);
  spawn_take(ctx, bucket, {}, 4, log);
  keel::testing::run_for(ctx, 5ms);
  CHECK(bucket.waiters() == 3);

  cancel_3.emit(asio::cancellation_type::terminal);  // a waiter in the middle
  keel::testing::poll_all(ctx);
  CHECK(bucket.waiters() == 2);
  keel::testing::run_for(ctx, 15ms);
  // Waiter 4 is served at 20 ms, the instant waiter 3 would have had.
  CHECK(log == std::vector<grant>{{1, 0ms}, {-3, 5ms}, {2, 10ms}, {4, 20ms}});

  // Cancelling the head, the only waiter, disarms the timer: the io_context runs out of work.
  spawn_take(ctx, bucket, {}, 5, log, cancel_5);
  keel::testing::run_for(ctx, 5ms);
  CHECK(bucket.waiters() == 1);
  cancel_5.emit(asio::cancellation_type::terminal);
  keel::testing::poll_all(ctx);
  CHECK(ctx.stopped());
  CHECK(log.back() == grant{-5, 25ms});
  CHECK(bucket.waiters() == 0);
  // Nothing was taken for the cancelled waiters: the next one is due at 30 ms as if they had
  // never asked.
  spawn_take(ctx, bucket, {}, 6, log);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 6; }, 1s));
  CHECK(log.back() == grant{6, 30ms});
  CHECK(bucket.total_granted() == 4);
  CHECK(bucket.total_waits() == 5);
}

TEST_CASE("cancelling the head re-evaluates the queue at once", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.tokens_per_minute = 6000, .token_burst = 1000}};
  REQUIRE(bucket.try_acquire({.tokens = 500}));
  std::vector<grant> log;
  asio::cancellation_signal cancel_big;
  // This coroutine lets every cancellation type through (co_spawn's default is terminal only).
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        co_await asio::this_coro::reset_cancellation_state(asio::enable_total_cancellation());
        co_await take(bucket, {.tokens = 900}, 1, log);  // needs 4 s more
      },
      asio::bind_cancellation_slot(cancel_big.slot(), asio::detached));
  spawn_take(ctx, bucket, {.tokens = 100}, 2, log);  // could go now, but queued
  keel::testing::run_for(ctx, 1s);
  CHECK(log.empty());
  cancel_big.emit(asio::cancellation_type::partial);  // any cancellation type is honoured
  keel::testing::poll_all(ctx);
  CHECK(log == std::vector<grant>{{-1, 1s}, {2, 1s}});
  CHECK(bucket.available_tokens() == Approx(500));  // 500 + 100 earned - 100 taken
}

TEST_CASE("a cancellation that arrives after the grant gives the grant back", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.tokens_per_minute = 6000, .token_burst = 1000}};
  REQUIRE(bucket.try_acquire({.tokens = 1000}));
  std::vector<grant> log;
  asio::cancellation_signal cancel_1;
  spawn_take(ctx, bucket, {.tokens = 300}, 1, log, cancel_1);
  spawn_take(ctx, bucket, {.tokens = 400}, 2, log);
  keel::testing::poll_all(ctx);
  CHECK(bucket.waiters() == 2);
  // From inside the io_context, so that co_spawn delivers the cancellation at once: waiter 1 is
  // granted (its completion is posted), then cancelled before it resumes.
  asio::post(ctx, [&] {
    bucket.settle(600, 0);
    CHECK(bucket.waiters() == 1);
    cancel_1.emit(asio::cancellation_type::terminal);
  });
  keel::testing::poll_all(ctx);
  // Waiter 1 gave its 300 tokens back, which let waiter 2 through at the same instant.
  CHECK(log == std::vector<grant>{{-1, 0ms}, {2, 0ms}});
  CHECK(bucket.available_tokens() == Approx(200));
  CHECK(bucket.total_granted() == 2);  // the try_acquire and waiter 2
}

TEST_CASE("an acquire granted at once neither suspends nor arms a timer", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 5}};
  // Baseline: how many handlers an empty coroutine takes to run.
  asio::co_spawn(
      ctx, []() -> asio::awaitable<void> { co_return; }, asio::detached);
  const std::size_t baseline = keel::testing::poll_all(ctx);

  int granted = 0;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 5; ++i) {
          co_await bucket.acquire();
          ++granted;
        }
      },
      asio::detached);
  CHECK(keel::testing::poll_all(ctx) == baseline);
  CHECK(granted == 5);
  CHECK(ctx.stopped());  // no timer is pending
  CHECK(bucket.total_waits() == 0);
  CHECK(bucket.total_granted() == 5);
  CHECK(bucket.total_wait_time() == std::chrono::nanoseconds::zero());
}

TEST_CASE("a cost above the burst waits for a full bucket and leaves debt", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 10, .burst = 2}};
  REQUIRE(bucket.try_acquire());
  std::vector<grant> log;
  spawn_take(ctx, bucket, {.requests = 5}, 1, log);
  spawn_take(ctx, bucket, {.requests = 1}, 2, log);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 2; }, 10s));
  // Full (2) at 100 ms, takes 5 leaving -3; the next needs 1 more: 400 ms later.
  CHECK(log == std::vector<grant>{{1, 100ms}, {2, 500ms}});
  CHECK(bucket.available_requests() == Approx(0).margin(1e-9));
}

TEST_CASE("a timer that fires late does not cost queued waiters their tokens", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 1}};
  std::vector<grant> log;
  for (int i = 0; i < 300; ++i) {
    spawn_take(ctx, bucket, {}, i, log);
  }
  keel::testing::poll_all(ctx);
  REQUIRE(log.size() == 1);  // the burst

  // The timer for the head is due at 10 ms; it runs 15 ms late. The grants due at 10 and 20 ms
  // both go out (a bucket refilled straight to 25 ms would have capped at 1 and granted one).
  manual_clock::advance(25ms);
  keel::testing::poll_all(ctx);
  CHECK(log.size() == 3);
  // And the schedule stays on the 10 ms grid: the next grant is due at 30 ms, not 35 ms.
  manual_clock::advance(5ms);
  keel::testing::poll_all(ctx);
  CHECK(log.size() == 4);
  CHECK(log.back() == grant{3, 30ms});

  // A stall longer than the 50 ms catch-up window is not made up: 1 s late, the grants due in
  // the last 50 ms (at 980 ... 1,030 ms) go out, not 100.
  manual_clock::advance(1000ms);
  keel::testing::poll_all(ctx);
  CHECK(log.size() == 4 + 6);
  CHECK(bucket.waiters() == 300 - 10);
  // Then the 10 ms grid again.
  manual_clock::advance(10ms);
  keel::testing::poll_all(ctx);
  CHECK(log.size() == 11);
  CHECK(bucket.total_granted() == 11);
}

TEST_CASE("provider headers resync the bucket levels and capacities", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(),
                           {.requests_per_second = 10, .burst = 10, .tokens_per_minute = 600}};
  CHECK(bucket.options().token_burst == 0);
  CHECK(bucket.available_tokens() == Approx(600));  // one minute's worth
  bucket.set_available_requests(0);
  bucket.set_available_tokens(-60);
  CHECK(bucket.available_requests() == Approx(0));
  CHECK(bucket.available_tokens() == Approx(-60));
  bucket.set_available_requests(50);  // capped at the burst
  CHECK(bucket.available_requests() == Approx(10));
  bucket.set_burst(3);  // the level follows a lower capacity
  CHECK(bucket.available_requests() == Approx(3));
  bucket.set_token_burst(20);
  CHECK(bucket.options().token_burst == 20);

  std::vector<grant> log;
  spawn_take(ctx, bucket, {.requests = 1, .tokens = 20}, 1, log);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return !log.empty(); }, 60s));
  CHECK(log.front() == grant{1, 8s});  // 80 tokens at 10 per second
  // Turning the token limit off grants on requests alone.
  bucket.set_rate(10, 0);
  CHECK(std::isinf(bucket.available_tokens()));
  CHECK(bucket.try_acquire({.requests = 1, .tokens = 1e9}));
}

TEST_CASE("a throttler without limits grants everything at once", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor()};
  for (int i = 0; i < 10000; ++i) {
    REQUIRE(bucket.try_acquire({.requests = 1, .tokens = 1000}));
  }
  CHECK(std::isinf(bucket.available_requests()));
  CHECK(bucket.total_granted() == 10000);
}

TEST_CASE("destroying a throttler aborts its waiters", "[throttler]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<grant> log;
  {
    virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 1, .burst = 1}};
    REQUIRE(bucket.try_acquire());
    spawn_take(ctx, bucket, {}, 1, log);
    spawn_take(ctx, bucket, {}, 2, log);
    keel::testing::run_for(ctx, 10ms);
    CHECK(bucket.waiters() == 2);
  }
  keel::testing::poll_all(ctx);
  CHECK(log == std::vector<grant>{{-1, 10ms}, {-2, 10ms}});
  CHECK(ctx.stopped());
}

TEST_CASE("many threads share a throttler without losing or double-granting",
          "[throttler][threads]") {
  // Real time, two threads, each coroutine on its own strand; some acquires race a deadline.
  asio::io_context ctx;
  constexpr double rate = 4000;
  constexpr double burst = 20;
  keel::throttler bucket{ctx.get_executor(), {.requests_per_second = rate, .burst = burst}};
  std::atomic<int> granted{0};
  std::atomic<int> aborted{0};
  std::atomic<int> tried{0};
  constexpr int coroutines = 8;
  constexpr int per_coroutine = 40;
  std::atomic<int> finished{0};
  const auto start = std::chrono::steady_clock::now();

  for (int c = 0; c < coroutines; ++c) {
    asio::co_spawn(
        asio::make_strand(ctx),
        [&, c]() -> asio::awaitable<void> {
          const auto ex = co_await asio::this_coro::executor;
          for (int i = 0; i < per_coroutine; ++i) {
            if ((i + c) % 4 != 0) {
              co_await bucket.acquire();
              ++granted;
              continue;
            }
            // Race the acquire against a short deadline.
            asio::steady_timer deadline{ex, std::chrono::microseconds(100 * (c + 1))};
            auto [order, acquired, waited] =
                co_await asio::experimental::make_parallel_group(
                    asio::co_spawn(ex, bucket.acquire(), asio::deferred),
                    deadline.async_wait(asio::deferred))
                    .async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
            (void)order;
            (void)waited;
            if (acquired) {
              ++aborted;
            } else {
              ++granted;
            }
          }
          ++finished;
        },
        asio::detached);
  }
  std::thread trier([&] {
    while (finished.load() < coroutines) {
      if (bucket.try_acquire()) {
        ++tried;
      }
      std::this_thread::yield();
    }
  });
  std::thread second([&] { ctx.run(); });
  ctx.run();
  second.join();
  trier.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  CHECK(finished.load() == coroutines);
  CHECK(granted.load() + aborted.load() == coroutines * per_coroutine);
  CHECK(bucket.total_granted() == static_cast<std::uint64_t>(granted.load() + tried.load()));
  CHECK(bucket.waiters() == 0);
  // Never more than the burst plus what the rate refilled meanwhile.
  CHECK(static_cast<double>(bucket.total_granted()) <= burst + rate * seconds + 1);
  CHECK(seconds < 1.0);
}

TEST_CASE("an unbounded pause holds waiters without overflowing", "[throttler][review]") {
  keel::testing::manual_clock::reset();
  boost::asio::io_context ctx;
  keel::basic_throttler<keel::testing::manual_clock> bucket{ctx.get_executor(),
                                                            {.requests_per_second = 10}};
  bucket.pause_for(std::chrono::nanoseconds::max());
  int granted = 0;
  boost::asio::co_spawn(
      ctx,
      [&]() -> boost::asio::awaitable<void> {
        co_await bucket.acquire();
        ++granted;
      },
      boost::asio::detached);
  keel::testing::run_for(ctx, std::chrono::seconds(10), std::chrono::milliseconds(100));
  CHECK(granted == 0);
  CHECK(bucket.waiters() == 1);
}

TEST_CASE("a token-only call is not held back by the request bucket, even with burst 0",
          "[throttler][review]") {
  manual_clock::reset();
  asio::io_context ctx;
  // Burst 0 paces requests like burst 1 but leaves the level just below zero after each one.
  virtual_throttler bucket{ctx.get_executor(),
                           {.requests_per_second = 1, .burst = 0, .tokens_per_minute = 6000}};
  REQUIRE(bucket.try_acquire({.requests = 1, .tokens = 10}));
  CHECK(bucket.try_acquire({.requests = 0, .tokens = 10}));  // spends no request
  CHECK_FALSE(bucket.try_acquire({.requests = 1}));          // a request still waits its turn
  std::vector<grant> log;
  spawn_take(ctx, bucket, {.requests = 0, .tokens = 10}, 1, log);
  keel::testing::poll_all(ctx);
  REQUIRE(log.size() == 1);
  CHECK(log.front() == grant{1, 0ms});
}

TEST_CASE("infinite costs, corrections and levels cannot block the throttler for good",
          "[throttler][review]") {
  const double inf = std::numeric_limits<double>::infinity();
  for (int variant = 0; variant < 4; ++variant) {
    CAPTURE(variant);
    manual_clock::reset();
    asio::io_context ctx;
    virtual_throttler bucket{ctx.get_executor(), {.tokens_per_minute = 600, .token_burst = 100}};
    switch (variant) {
      case 0:
        bucket.settle(0, inf);
        break;
      case 1:
        bucket.set_available_tokens(-inf);
        break;
      case 2:
        CHECK(bucket.try_acquire({.tokens = inf}));  // counts as 0 tokens
        break;
      case 3:
        bucket.settle(-5, 10);  // a negative estimate counts as 0: charges the 10 used
        CHECK(bucket.available_tokens() == Approx(90));
        break;
    }
    CHECK(std::isfinite(bucket.available_tokens()));
    std::vector<grant> log;
    spawn_take(ctx, bucket, {.tokens = 10}, 1, log);
    REQUIRE(keel::testing::run_until(
        ctx, [&] { return !log.empty(); }, 10s));
    CHECK(log.front().at <= 1s);
  }
}

namespace {

// A provider reply that reports the tokens it used.
struct usage_reply {
  int total_tokens = 0;
};

}  // namespace

TEST_CASE("with_throttle starts each call when the bucket grants it and returns its value",
          "[throttler][with_throttle]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 1}};
  std::vector<std::chrono::nanoseconds> started;
  std::array<keel_test::outcome<int>, 3> out;
  for (int i = 0; i < 3; ++i) {
    keel_test::spawn(ctx,
                     keel::with_throttle(bucket, {},
                                         [&, i]() -> asio::awaitable<int> {
                                           started.push_back(elapsed());
                                           co_return 10 * i;
                                         }),
                     out[i]);
  }
  keel_test::outcome<void> last;
  bool ran_void = false;
  keel_test::spawn(ctx,
                   keel::with_throttle(bucket, {.requests = 1},
                                       [&]() -> asio::awaitable<void> {
                                         started.push_back(elapsed());
                                         ran_void = true;
                                         co_return;
                                       }),
                   last);
  keel::testing::poll_all(ctx);
  CHECK(started == std::vector<std::chrono::nanoseconds>{0ms});  // the others queue
  CHECK(bucket.waiters() == 3);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return last.done; }, 1s));
  CHECK(started == std::vector<std::chrono::nanoseconds>{0ms, 10ms, 20ms, 30ms});
  for (int i = 0; i < 3; ++i) {
    INFO("call " << i);
    REQUIRE(out[i].done);
    CHECK_FALSE(out[i].error);
    CHECK(out[i].value == 10 * i);
    CHECK(out[i].finished_at_ms == 10 * i);
  }
  CHECK(ran_void);
  CHECK_FALSE(last.error);
  CHECK(bucket.total_granted() == 4);
}

TEST_CASE("with_throttle settles the estimate with the reported usage, but not a failed call",
          "[throttler][with_throttle]") {
  manual_clock::reset();
  asio::io_context ctx;
  // One token a second: virtual time does not move here, so nothing refills.
  virtual_throttler bucket{ctx.get_executor(), {.tokens_per_minute = 60, .token_burst = 1000}};
  int mapped = 0;
  auto tokens_of = [&mapped](const usage_reply& r) {
    ++mapped;
    return r.total_tokens;
  };

  keel_test::outcome<usage_reply> under;  // estimated 500, used 200: 300 come back
  keel_test::spawn(
      ctx,
      keel::with_throttle(
          bucket, {.requests = 1, .tokens = 500},
          []() -> asio::awaitable<usage_reply> { co_return usage_reply{200}; }, tokens_of),
      under);
  keel::testing::poll_all(ctx);
  REQUIRE(under.done);
  CHECK(under.value->total_tokens == 200);
  CHECK(mapped == 1);
  CHECK(bucket.available_tokens() == Approx(800));

  keel_test::outcome<usage_reply> failed;  // estimated 300, then the call throws: not settled
  keel_test::spawn(ctx,
                   keel::with_throttle(
                       bucket, {.requests = 1, .tokens = 300},
                       []() -> asio::awaitable<usage_reply> {
                         throw std::runtime_error("provider down");
                         co_return usage_reply{};
                       },
                       tokens_of),
                   failed);
  keel::testing::poll_all(ctx);
  REQUIRE(failed.done);
  CHECK_THROWS_WITH(std::rethrow_exception(failed.error), "provider down");
  CHECK(mapped == 1);
  CHECK(bucket.available_tokens() == Approx(500));

  keel_test::outcome<usage_reply> over;  // estimated 100, used 450: the overrun is charged
  keel_test::spawn(
      ctx,
      keel::with_throttle(
          bucket, {.requests = 1, .tokens = 100},
          []() -> asio::awaitable<usage_reply> { co_return usage_reply{450}; }, tokens_of),
      over);
  keel::testing::poll_all(ctx);
  REQUIRE(over.done);
  CHECK(mapped == 2);
  CHECK(bucket.available_tokens() == Approx(50));
}

TEST_CASE("with_throttle cancelled while queued never calls the operation and takes nothing",
          "[throttler][with_throttle]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{ctx.get_executor(), {.requests_per_second = 100, .burst = 1}};
  REQUIRE(bucket.try_acquire());
  int cancelled_calls = 0;
  std::vector<std::chrono::nanoseconds> started;
  asio::cancellation_signal cancel;
  keel_test::outcome<void> first;
  keel_test::outcome<void> second;
  keel_test::spawn(ctx,
                   keel::with_throttle(bucket, {},
                                       [&]() -> asio::awaitable<void> {
                                         ++cancelled_calls;
                                         co_return;
                                       }),
                   first, cancel.slot());
  keel_test::spawn(ctx,
                   keel::with_throttle(bucket, {},
                                       [&]() -> asio::awaitable<void> {
                                         started.push_back(elapsed());
                                         co_return;
                                       }),
                   second);
  keel::testing::run_for(ctx, 5ms);
  CHECK(bucket.waiters() == 2);

  cancel.emit(asio::cancellation_type::terminal);
  keel::testing::poll_all(ctx);
  REQUIRE(first.done);
  CHECK(first.code() == asio::error::operation_aborted);
  CHECK(first.finished_at_ms == 5);
  CHECK(cancelled_calls == 0);
  CHECK(bucket.waiters() == 1);
  // The second call takes the turn the cancelled one would have had.
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return second.done; }, 1s));
  CHECK(started == std::vector<std::chrono::nanoseconds>{10ms});
  CHECK_FALSE(second.error);
  CHECK(bucket.total_granted() == 2);  // the try_acquire and the second call
}

TEST_CASE("with_throttle cancelled during the operation propagates and keeps the cost spent",
          "[throttler][with_throttle]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_throttler bucket{
      ctx.get_executor(),
      {.requests_per_second = 1, .burst = 1, .tokens_per_minute = 60, .token_burst = 1000}};
  int mapped = 0;
  asio::cancellation_signal cancel;
  keel_test::outcome<usage_reply> out;
  keel_test::spawn(ctx,
                   keel::with_throttle(
                       bucket, {.requests = 1, .tokens = 500},
                       []() -> asio::awaitable<usage_reply> {
                         co_await sleep_for(100ms);
                         co_return usage_reply{10};
                       },
                       [&mapped](const usage_reply& r) {
                         ++mapped;
                         return r.total_tokens;
                       }),
                   out, cancel.slot());
  keel::testing::run_for(ctx, 50ms);
  CHECK_FALSE(out.done);
  cancel.emit(asio::cancellation_type::terminal);
  keel::testing::poll_all(ctx);
  REQUIRE(out.done);
  CHECK(out.code() == asio::error::operation_aborted);
  CHECK(out.finished_at_ms == 50);
  CHECK(mapped == 0);
  // Nothing given back or settled: only 50 ms of refill on top of what the call took.
  CHECK(bucket.available_tokens() == Approx(500.05));
  CHECK(bucket.available_requests() == Approx(0.05));
}
