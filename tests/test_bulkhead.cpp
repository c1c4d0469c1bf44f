// Tests for keel/bulkhead.hpp: concurrency cap, FIFO hand-off, queue_full, queue_timeout, cancel.
#include <keel/bulkhead.hpp>
#include <keel/clock.hpp>
#include <keel/error.hpp>
#include <keel/testing/manual_clock.hpp>

#include "support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
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

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using keel::testing::manual_clock;
using virtual_bulkhead = keel::basic_bulkhead<manual_clock>;

namespace {

namespace asio = boost::asio;

using keel_test::elapsed;
using keel_test::sleep_for;

// One event in a test's story: who, what, when.
struct event {
  int id;
  std::string what;
  std::chrono::nanoseconds at;
  bool operator==(const event&) const = default;
};

std::string outcome_of(const std::exception_ptr& ep) {
  try {
    std::rethrow_exception(ep);
  } catch (const keel::failure& f) {
    if (f.code() == keel::error::queue_full) {
      return "queue_full";
    }
    if (f.code() == keel::error::queue_timeout) {
      return "queue_timeout";
    }
    return "other failure";
  } catch (const boost::system::system_error& e) {
    return e.code() == asio::error::operation_aborted ? "aborted" : "other error";
  } catch (...) {
    return "unknown";
  }
}

// Acquires a permit, records it, holds it for `hold`, and records every failure.
asio::awaitable<void> use_slot(virtual_bulkhead& b, int id, std::chrono::nanoseconds hold,
                               std::vector<event>& log) {
  try {
    keel::bulkhead_permit permit = co_await b.acquire();
    log.push_back({id, "granted", elapsed()});
    co_await sleep_for(hold);
  } catch (...) {
    log.push_back({id, outcome_of(std::current_exception()), elapsed()});
  }
}

void spawn_use(asio::io_context& ctx, virtual_bulkhead& b, int id, std::chrono::nanoseconds hold,
               std::vector<event>& log) {
  asio::co_spawn(ctx, use_slot(b, id, hold, log), asio::detached);
}

void spawn_use(asio::io_context& ctx, virtual_bulkhead& b, int id, std::chrono::nanoseconds hold,
               std::vector<event>& log, asio::cancellation_signal& signal) {
  asio::co_spawn(ctx, use_slot(b, id, hold, log),
                 asio::bind_cancellation_slot(signal.slot(), asio::detached));
}

}  // namespace

namespace Catch {
template <>
struct StringMaker<event> {
  static std::string convert(const event& e) {
    return "{" + std::to_string(e.id) + " " + e.what + " at " +
           std::to_string(std::chrono::duration<double, std::milli>(e.at).count()) + " ms}";
  }
};
}  // namespace Catch

TEST_CASE("a bulkhead never runs more than max_concurrent calls at once", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(), {.max_concurrent = 3, .max_queue = 100}};
  int running = 0;
  int most = 0;
  int done = 0;
  std::vector<std::chrono::nanoseconds> finished(10);
  for (int i = 0; i < 10; ++i) {
    asio::co_spawn(ctx,
                   keel::with_bulkhead(b,
                                       [&, i]() -> asio::awaitable<void> {
                                         most = std::max(most, ++running);
                                         co_await sleep_for(100ms);
                                         --running;
                                         finished[i] = elapsed();
                                         ++done;
                                       }),
                   asio::detached);
  }
  keel::testing::poll_all(ctx);
  CHECK(b.in_flight() == 3);
  CHECK(b.queued() == 7);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return done == 10; }, 10s));
  CHECK(most == 3);
  // Four waves of at most three, in FIFO order.
  for (int i = 0; i < 10; ++i) {
    INFO("call " << i);
    CHECK(finished[i] == (i / 3 + 1) * 100ms);
  }
  CHECK(b.in_flight() == 0);
  CHECK(b.queued() == 0);
  CHECK(b.rejected() == 0);
}

TEST_CASE("a released slot is handed to the oldest waiter", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(), {.max_concurrent = 1, .max_queue = 10}};
  keel::bulkhead_permit held = b.try_acquire();
  REQUIRE(held);
  CHECK_FALSE(b.try_acquire());
  std::vector<event> log;
  for (int i = 1; i <= 4; ++i) {
    spawn_use(ctx, b, i, 10ms, log);
  }
  keel::testing::run_for(ctx, 5ms);
  CHECK(log.empty());
  held.release();
  CHECK_FALSE(held);
  // The slot went straight to waiter 1: nobody can slip in before it resumes.
  CHECK(b.in_flight() == 1);
  CHECK_FALSE(b.try_acquire());
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return log.size() == 4; }, 1s));
  CHECK(log ==
        std::vector<event>{
            {1, "granted", 5ms}, {2, "granted", 15ms}, {3, "granted", 25ms}, {4, "granted", 35ms}});
  keel::testing::run_for(ctx, 10ms);
  CHECK(b.in_flight() == 0);
}

TEST_CASE("acquire throws queue_full at once when the slots and the queue are full", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(), {.max_concurrent = 1, .max_queue = 2}};
  keel::bulkhead_permit held = b.try_acquire();
  std::vector<event> log;
  spawn_use(ctx, b, 1, 0ms, log);
  spawn_use(ctx, b, 2, 0ms, log);
  spawn_use(ctx, b, 3, 0ms, log);
  keel::testing::poll_all(ctx);
  CHECK(log == std::vector<event>{{3, "queue_full", 0ms}});
  CHECK(b.rejected() == 1);
  CHECK(b.queued() == 2);
  CHECK(make_error_code(keel::error::queue_full) == keel::condition::throttled);

  // The default bulkhead has no queue: it rejects as soon as every slot is busy.
  virtual_bulkhead no_queue{ctx.get_executor(), {.max_concurrent = 1}};
  CHECK(no_queue.options().max_queue == 0);
  keel::bulkhead_permit only = no_queue.try_acquire();
  bool rejected = false;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        try {
          co_await no_queue.acquire();
        } catch (const keel::failure& f) {
          rejected = f.code() == keel::error::queue_full;
        }
      },
      asio::detached);
  keel::testing::poll_all(ctx);
  CHECK(rejected);
  CHECK(no_queue.rejected() == 1);
}

TEST_CASE("a waiter gives up with queue_timeout after exactly the timeout", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(),
                     {.max_concurrent = 1, .max_queue = 10, .queue_timeout = 50ms}};
  keel::bulkhead_permit held = b.try_acquire();
  std::vector<event> log;
  spawn_use(ctx, b, 1, 0ms, log);
  keel::testing::run_for(ctx, 20ms);
  spawn_use(ctx, b, 2, 0ms, log);
  keel::testing::run_for(ctx, 29ms);
  CHECK(log.empty());
  keel::testing::run_for(ctx, 1ms);
  CHECK(log == std::vector<event>{{1, "queue_timeout", 50ms}});
  keel::testing::run_for(ctx, 20ms);
  CHECK(log.back() == event{2, "queue_timeout", 70ms});
  CHECK(b.timed_out() == 2);
  CHECK(b.queued() == 0);
  CHECK(b.in_flight() == 1);

  // A waiter served before its timeout is not timed out later.
  spawn_use(ctx, b, 3, 100ms, log);
  keel::testing::run_for(ctx, 30ms);
  held.release();
  keel::testing::run_for(ctx, 40ms);
  CHECK(log.back() == event{3, "granted", 100ms});
  CHECK(b.timed_out() == 2);
}

TEST_CASE("a waiter cancelled while queued takes no slot", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(), {.max_concurrent = 1, .max_queue = 10}};
  keel::bulkhead_permit held = b.try_acquire();
  std::vector<event> log;
  asio::cancellation_signal cancel_1;
  spawn_use(ctx, b, 1, 10ms, log, cancel_1);
  spawn_use(ctx, b, 2, 10ms, log);
  keel::testing::run_for(ctx, 5ms);
  CHECK(b.queued() == 2);
  cancel_1.emit(asio::cancellation_type::terminal);
  keel::testing::poll_all(ctx);
  CHECK(b.queued() == 1);
  CHECK(b.in_flight() == 1);
  keel::testing::run_for(ctx, 5ms);
  held.release();
  keel::testing::run_for(ctx, 20ms);
  CHECK(log == std::vector<event>{{1, "aborted", 5ms}, {2, "granted", 10ms}});
  CHECK(b.in_flight() == 0);
  CHECK(ctx.stopped());  // nothing left pending
}

TEST_CASE("a cancellation that arrives after the hand-off passes the slot on", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(), {.max_concurrent = 1, .max_queue = 10}};
  keel::bulkhead_permit held = b.try_acquire();
  std::vector<event> log;
  asio::cancellation_signal cancel_1;
  spawn_use(ctx, b, 1, 10ms, log, cancel_1);
  spawn_use(ctx, b, 2, 10ms, log);
  keel::testing::run_for(ctx, 5ms);
  // From inside the io_context, so that co_spawn delivers the cancellation at once.
  asio::post(ctx, [&] {
    held.release();  // handed to waiter 1, which has not resumed yet
    cancel_1.emit(asio::cancellation_type::terminal);
  });
  keel::testing::poll_all(ctx);
  CHECK(log == std::vector<event>{{1, "aborted", 5ms}, {2, "granted", 5ms}});
  CHECK(b.in_flight() == 1);
}

TEST_CASE("with_bulkhead returns the value, and releases the slot on success and failure",
          "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(), {.max_concurrent = 2}};
  int value = 0;
  int calls = 0;
  std::string error;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        value = co_await keel::with_bulkhead(b, [&]() -> asio::awaitable<int> {
          ++calls;
          CHECK(b.in_flight() == 1);
          co_return 42;
        });
        co_await keel::with_bulkhead(b, [&]() -> asio::awaitable<void> {
          ++calls;
          co_return;
        });
        try {
          co_await keel::with_bulkhead(b, [&]() -> asio::awaitable<void> {
            ++calls;
            throw std::runtime_error("provider failed");
            co_return;
          });
        } catch (const std::runtime_error& e) {
          error = e.what();
        }
      },
      asio::detached);
  keel::testing::poll_all(ctx);
  CHECK(value == 42);
  CHECK(calls == 3);
  CHECK(error == "provider failed");
  CHECK(b.in_flight() == 0);
}

TEST_CASE("with_bulkhead never calls the factory when the call is rejected", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  virtual_bulkhead b{ctx.get_executor(), {.max_concurrent = 1}};
  keel::bulkhead_permit held = b.try_acquire();
  int calls = 0;
  std::string outcome;
  asio::co_spawn(ctx,
                 keel::with_bulkhead(b,
                                     [&]() -> asio::awaitable<void> {
                                       ++calls;
                                       co_return;
                                     }),
                 [&](std::exception_ptr ep) { outcome = ep ? outcome_of(ep) : "ran"; });
  keel::testing::poll_all(ctx);
  CHECK(outcome == "queue_full");
  CHECK(calls == 0);
}

TEST_CASE("destroying a bulkhead aborts its waiters and leaves permits valid", "[bulkhead]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<event> log;
  keel::bulkhead_permit survivor;
  {
    virtual_bulkhead b{ctx.get_executor(),
                       {.max_concurrent = 1, .max_queue = 5, .queue_timeout = 1s}};
    survivor = b.try_acquire();
    REQUIRE(survivor);
    spawn_use(ctx, b, 1, 0ms, log);
    keel::testing::run_for(ctx, 10ms);
    CHECK(b.queued() == 1);
  }
  keel::testing::poll_all(ctx);
  CHECK(log == std::vector<event>{{1, "aborted", 10ms}});
  survivor.release();  // the state outlives the bulkhead object
  CHECK_FALSE(survivor);
  CHECK(ctx.stopped());
}

TEST_CASE("a bulkhead shared by two threads never exceeds its cap and loses no slot",
          "[bulkhead][threads]") {
  asio::io_context ctx;
  keel::bulkhead b{ctx.get_executor(), {.max_concurrent = 3, .max_queue = 1000}};
  constexpr int coroutines = 8;
  constexpr int per_coroutine = 40;
  std::atomic<int> running{0};
  std::atomic<int> most{0};
  std::atomic<int> ran{0};
  std::atomic<int> aborted{0};
  const auto start = std::chrono::steady_clock::now();
  for (int c = 0; c < coroutines; ++c) {
    asio::co_spawn(
        asio::make_strand(ctx),
        [&, c]() -> asio::awaitable<void> {
          const auto ex = co_await asio::this_coro::executor;
          auto work = [&]() -> asio::awaitable<void> {
            const int now = ++running;
            int seen = most.load();
            while (now > seen && !most.compare_exchange_weak(seen, now)) {
            }
            struct leave {
              std::atomic<int>& count;
              ~leave() { --count; }
            } guard{running};
            co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
            ++ran;
          };
          for (int i = 0; i < per_coroutine; ++i) {
            if ((i + c) % 4 != 0) {
              co_await keel::with_bulkhead(b, work);
              continue;
            }
            asio::steady_timer deadline{ex, std::chrono::microseconds(20 * (c + 1))};
            auto [order, failed, waited] =
                co_await asio::experimental::make_parallel_group(
                    asio::co_spawn(ex, keel::with_bulkhead(b, work), asio::deferred),
                    deadline.async_wait(asio::deferred))
                    .async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
            (void)order;
            (void)waited;
            if (failed) {
              ++aborted;
            }
          }
        },
        asio::detached);
  }
  std::thread second([&] { ctx.run(); });
  ctx.run();
  second.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  CHECK(most.load() <= 3);
  CHECK(most.load() >= 1);
  CHECK(ran.load() + aborted.load() == coroutines * per_coroutine);
  CHECK(b.in_flight() == 0);
  CHECK(b.queued() == 0);
  CHECK(seconds < 1.0);
}

TEST_CASE("an unbounded queue timeout never times out a waiter", "[bulkhead][review]") {
  keel::testing::manual_clock::reset();
  boost::asio::io_context ctx;
  keel::basic_bulkhead<keel::testing::manual_clock> pool{
      ctx.get_executor(),
      {.max_concurrent = 1, .max_queue = 1, .queue_timeout = std::chrono::nanoseconds::max()}};
  auto held = pool.try_acquire();
  REQUIRE(held);
  bool got = false;
  boost::asio::co_spawn(
      ctx,
      [&]() -> boost::asio::awaitable<void> {
        auto p = co_await pool.acquire();
        got = static_cast<bool>(p);
      },
      boost::asio::detached);
  keel::testing::run_for(ctx, std::chrono::seconds(10));
  CHECK(pool.queued() == 1);
  CHECK(pool.timed_out() == 0);
  held.release();
  keel::testing::run_for(ctx, std::chrono::milliseconds(1));
  CHECK(got);
}
