// Tests for keel/deadline.hpp: timeouts, cancellation of the operation, nesting, fast failures.
#include <keel/deadline.hpp>

#include "support.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

using namespace keel_test;

TEST_CASE("with_deadline returns the value of an operation that finishes in time", "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{{}, {}, 300ms}}};
  outcome<int> out;
  spawn(ctx, keel::with_deadline<manual_clock>(op.factory(), 1s), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 42);
  CHECK(out.finished_at_ms == 300);
}

TEST_CASE("a deadline cancels an in-flight operation and nothing of it runs afterwards",
          "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{{}, {}, 5s}}};
  outcome<int> out;
  spawn(ctx, keel::with_deadline<manual_clock>(op.factory(), 1s), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 1000);
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(out.code() == keel::condition::timeout);
  keel::testing::run_for(ctx, 10s);
  CHECK(op.started_ms.size() == 1);
  CHECK(op.ended_ms.empty());  // the operation's code after its sleep never ran
}

TEST_CASE("a fast failure propagates at once instead of waiting for the timer", "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{asio::error::connection_reset, {}, 10ms}}};
  outcome<int> out;
  spawn(ctx, keel::with_deadline<manual_clock>(op.factory(), 10s), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 10);
  CHECK(out.code() == asio::error::connection_reset);
}

TEST_CASE("nested deadlines: the tighter wins whichever is outside", "[deadline]") {
  for (bool outer_tighter : {true, false}) {
    manual_clock::reset();
    asio::io_context ctx;
    scripted op{{step{{}, {}, 5s}}};
    outcome<int> out;
    const auto outer = outer_tighter ? 1s : 3s;
    const auto inner = outer_tighter ? 3s : 1s;
    spawn(ctx,
          keel::with_deadline<manual_clock>(
              [&] { return keel::with_deadline<manual_clock>(op.factory(), inner); }, outer),
          out);
    REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
    CHECK(out.finished_at_ms == 1000);
    CHECK(out.code() == keel::error::deadline_exceeded);
  }
}

TEST_CASE("code under a deadline can read the time it has left", "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::optional<manual_clock::duration> seen_outer, seen_inner, seen_none;
  auto probe = [&](std::optional<manual_clock::duration>& into) {
    return [&]() -> asio::awaitable<int> {
      co_await sleep_for(200ms);
      into = co_await keel::remaining_time<manual_clock>();
      co_return 1;
    };
  };
  outcome<int> a, b, c;
  spawn(ctx, keel::with_deadline<manual_clock>(probe(seen_outer), 2s), a);
  spawn(ctx,
        keel::with_deadline<manual_clock>(
            [&] { return keel::with_deadline<manual_clock>(probe(seen_inner), 700ms); }, 2s),
        b);
  auto no_deadline = probe(seen_none);  // the closure must outlive the coroutine it starts
  spawn(ctx, no_deadline(), c);
  REQUIRE(keel::testing::run_until(ctx, [&] { return a.done && b.done && c.done; }));
  REQUIRE(seen_outer);
  CHECK(*seen_outer == 1800ms);
  REQUIRE(seen_inner);
  CHECK(*seen_inner == 500ms);
  CHECK_FALSE(seen_none.has_value());
}

TEST_CASE("cancelling the caller cancels the operation and is not reported as a timeout",
          "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{{}, {}, 5s}}};
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::with_deadline<manual_clock>(op.factory(), 2s), out, sig.slot());
  keel::testing::run_for(ctx, 300ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 300);
  CHECK(out.code() == keel::condition::cancelled);
  CHECK(op.ended_ms.empty());
}

TEST_CASE("a deadline that has already passed fails without calling the operation", "[deadline]") {
  manual_clock::reset();
  manual_clock::advance(5s);
  asio::io_context ctx;
  scripted op;
  outcome<int> out;
  spawn(ctx, keel::with_deadline_at<manual_clock>(op.factory(), manual_clock::time_point{1s}), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(op.started_ms.empty());
}

TEST_CASE("a deadline aborts a socket read that would never complete", "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  asio::ip::tcp::acceptor acceptor(ctx, {asio::ip::make_address("127.0.0.1"), 0});
  asio::ip::tcp::socket server_side(ctx);
  acceptor.async_accept(server_side, [](boost::system::error_code) {});
  bool read_returned = false;
  boost::system::error_code read_error;
  auto read_forever = [&]() -> asio::awaitable<int> {
    asio::ip::tcp::socket s(co_await asio::this_coro::executor);
    co_await s.async_connect(acceptor.local_endpoint(), asio::use_awaitable);
    char byte = 0;
    try {
      co_await asio::async_read(s, asio::buffer(&byte, 1), asio::use_awaitable);
    } catch (const boost::system::system_error& e) {
      read_error = e.code();
      read_returned = true;
      throw;
    }
    co_return 1;
  };
  outcome<int> out;
  spawn(ctx, keel::with_deadline<manual_clock>(read_forever, 1s), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(out.finished_at_ms == 1000);
  CHECK(read_returned);
  CHECK(read_error == asio::error::operation_aborted);
}

TEST_CASE("with_deadline works for operations returning void", "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  outcome<void> fast, slow;
  spawn(ctx, keel::with_deadline<manual_clock>([] { return sleep_for(100ms); }, 1s), fast);
  spawn(ctx, keel::with_deadline<manual_clock>([] { return sleep_for(3s); }, 1s), slow);
  REQUIRE(keel::testing::run_until(ctx, [&] { return fast.done && slow.done; }));
  CHECK_FALSE(fast.error);
  CHECK(fast.finished_at_ms == 100);
  CHECK(slow.code() == keel::error::deadline_exceeded);
  CHECK(slow.finished_at_ms == 1000);
}

TEST_CASE("with_deadline runs move-only, non-default-constructible and throwing factories",
          "[deadline]") {
  // A value with a default constructor is spawned as the operation's own awaitable (no wrapping
  // coroutine); one without goes through the optional. A factory that throws at once does so
  // before the deadline is queued: nothing of the call is left to fire.
  manual_clock::reset();
  asio::io_context ctx;
  auto boxed = [](manual_clock::duration d) -> asio::awaitable<std::unique_ptr<int>> {
    co_await sleep_for(d);
    co_return std::make_unique<int>(7);
  };
  struct no_default {
    explicit no_default(int x) : v(x) {}
    int v;
  };
  auto plain = [](manual_clock::duration d) -> asio::awaitable<no_default> {
    co_await sleep_for(d);
    co_return no_default(9);
  };
  outcome<std::unique_ptr<int>> fast_box, slow_box;
  outcome<no_default> fast_plain, slow_plain;
  outcome<int> thrown;
  int factory_calls = 0;
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return boxed(100ms); }, 1s), fast_box);
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return boxed(3s); }, 1s), slow_box);
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return plain(200ms); }, 1s), fast_plain);
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return plain(3s); }, 1s), slow_plain);
  spawn(ctx,
        keel::with_deadline<manual_clock>(
            [&]() -> asio::awaitable<int> {
              ++factory_calls;
              throw std::runtime_error("no operation");
            },
            500ms),
        thrown);
  REQUIRE(keel::testing::run_until(ctx, [&] {
    return fast_box.done && slow_box.done && fast_plain.done && slow_plain.done && thrown.done;
  }));
  REQUIRE(fast_box.value);
  REQUIRE(*fast_box.value);
  CHECK(**fast_box.value == 7);
  CHECK(fast_box.finished_at_ms == 100);
  CHECK(slow_box.code() == keel::error::deadline_exceeded);
  CHECK(slow_box.finished_at_ms == 1000);
  REQUIRE(fast_plain.value);
  CHECK(fast_plain.value->v == 9);
  CHECK(slow_plain.code() == keel::error::deadline_exceeded);
  CHECK(thrown.finished_at_ms == 0);
  CHECK(factory_calls == 1);
  REQUIRE(thrown.error);
  CHECK_THROWS_AS(std::rethrow_exception(thrown.error), std::runtime_error);
  keel::testing::run_for(ctx, 5s);  // past every deadline: nothing of the calls fires
  CHECK(factory_calls == 1);
}

TEST_CASE("an unbounded deadline does not overflow", "[deadline][review]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{{}, {}, 100ms}}};
  outcome<int> out;
  spawn(ctx, keel::with_deadline<manual_clock>(op.factory(), std::chrono::nanoseconds::max()), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 42);
  CHECK(out.finished_at_ms == 100);
}

TEST_CASE("an operation that succeeds despite the caller's cancellation keeps its value",
          "[deadline][review]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto stubborn = []() -> asio::awaitable<int> {
    try {
      co_await sleep_for(1s);
    } catch (...) {
    }
    co_return 7;  // ignores cancellation and answers anyway
  };
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::with_deadline<manual_clock>(stubborn, 5s), out, sig.slot());
  keel::testing::run_for(ctx, 100ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 7);
}

TEST_CASE("detached work spawned under a deadline enforces its own deadline",
          "[deadline][review]") {
  manual_clock::reset();
  asio::io_context ctx;
  outcome<void> detached;
  auto parent_spawning_on_own_executor = [&]() -> asio::awaitable<int> {
    auto ex = co_await asio::this_coro::executor;
    asio::co_spawn(ex, keel::with_deadline<manual_clock>([] { return sleep_for(1s); }, 300ms),
                   [&](std::exception_ptr e) {
                     detached.done = true;
                     detached.error = e;
                     detached.finished_at_ms = now_ms();
                   });
    co_return 1;
  };
  SECTION("spawned on the deadline executor") {
    outcome<int> out;
    spawn(ctx, keel::with_deadline<manual_clock>(parent_spawning_on_own_executor, 50ms), out);
    REQUIRE(keel::testing::run_until(ctx, [&] { return out.done && detached.done; }));
    CHECK(out.value == 1);
    CHECK(detached.code() == keel::error::deadline_exceeded);
    CHECK(detached.finished_at_ms == 300);
  }
  SECTION("without_deadline strips the inherited deadline") {
    std::optional<std::optional<manual_clock::time_point>> seen;
    auto probe = [&]() -> asio::awaitable<int> {
      auto ex = co_await asio::this_coro::executor;
      seen = keel::deadline_of<manual_clock>(keel::without_deadline<manual_clock>(ex));
      CHECK(keel::deadline_of<manual_clock>(ex).has_value());
      co_return 1;
    };
    outcome<int> out;
    spawn(ctx, keel::with_deadline<manual_clock>(probe, 50ms), out);
    REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
    REQUIRE(seen.has_value());
    CHECK_FALSE(seen->has_value());
  }
}

// ---- the shared deadline queue (one timer per context and clock) ----------------------------

TEST_CASE("deadlines added out of order each expire at their own instant", "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  // Added in this order, so the queue's timer must be moved earlier three times and later
  // after each expiry; the calls that finish in time must not disturb the others.
  const std::vector<std::pair<ms, ms>> calls = {{500ms, 1s},   {100ms, 1s}, {300ms, 1s},
                                                {700ms, 50ms}, {200ms, 1s}, {400ms, 250ms}};
  std::vector<outcome<void>> out(calls.size());
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const auto [limit, takes] = calls[i];
    spawn(ctx,
          keel::with_deadline<manual_clock>([takes = takes] { return sleep_for(takes); }, limit),
          out[i]);
  }
  CHECK(keel::detail::deadline_queue<manual_clock>::of(ctx.get_executor()).size() == 0);
  keel::testing::poll_all(ctx);
  CHECK(keel::detail::deadline_queue<manual_clock>::of(ctx.get_executor()).size() == 6);
  REQUIRE(keel::testing::run_until(ctx, [&] {
    return std::all_of(out.begin(), out.end(), [](const auto& o) { return o.done; });
  }));
  for (std::size_t i = 0; i < calls.size(); ++i) {
    INFO("call " << i);
    const auto [limit, takes] = calls[i];
    if (takes < limit) {
      CHECK_FALSE(out[i].error);
      CHECK(out[i].finished_at_ms == takes.count());
    } else {
      CHECK(out[i].code() == keel::error::deadline_exceeded);
      CHECK(out[i].finished_at_ms == limit.count());
    }
  }
  CHECK(keel::detail::deadline_queue<manual_clock>::of(ctx.get_executor()).size() == 0);
}

TEST_CASE("a pending deadline timer does not keep the io_context running once calls are done",
          "[deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  outcome<int> first, second;
  scripted op{{step{{}, {}, 100ms}, step{{}, {}, 100ms}}};
  // A one-hour deadline: its timer stays armed after the call, for the next call to reuse.
  spawn(ctx, keel::with_deadline<manual_clock>(op.factory(), 1h), first);
  REQUIRE(keel::testing::run_until(ctx, [&] { return first.done; }));
  CHECK(first.value == 42);
  ctx.poll();
  CHECK(ctx.stopped());  // no outstanding work: run() would have returned
  // The context is usable again, and the next call reuses the timer.
  ctx.restart();
  spawn(ctx, keel::with_deadline<manual_clock>(op.factory(), 1h), second);
  REQUIRE(keel::testing::run_until(ctx, [&] { return second.done; }));
  CHECK(second.value == 42);
  CHECK(second.finished_at_ms == 200);
  ctx.poll();
  CHECK(ctx.stopped());
}

TEST_CASE("a caller on a work-tracking executor does not keep the io_context running",
          "[deadline][review]") {
  // The queue keeps an executor for the context's lifetime; a tracked one would hold the
  // context's work count above zero forever.
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{{}, {}, 100ms}}};
  outcome<int> out;
  {
    auto tracked = asio::require(ctx.get_executor(), asio::execution::outstanding_work.tracked);
    asio::co_spawn(tracked, keel::with_deadline<manual_clock>(op.factory(), 1h),
                   [&](std::exception_ptr e, int v) {
                     out.done = true;
                     out.error = e;
                     out.value = v;
                   });
  }
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 42);
  ctx.poll();
  CHECK(ctx.stopped());  // nothing left holding work: run() would have returned
}

TEST_CASE("an expiry after an earlier cancellation the caller survived is still a timeout",
          "[deadline][review]") {
  // A caller cancelled before the call, that chose to carry on (throw_if_cancelled(false)), e.g.
  // to run a cleanup step bounded by a deadline: the expiry is deadline_exceeded, not taken for
  // the earlier cancellation.
  manual_clock::reset();
  asio::io_context ctx;
  asio::cancellation_signal sig;
  boost::system::error_code first, second;
  outcome<void> out;
  auto sleep_for = [](manual_clock::duration d) -> asio::awaitable<void> {
    keel::basic_timer<manual_clock> t(co_await asio::this_coro::executor);
    t.expires_after(d);
    co_await t.async_wait(asio::use_awaitable);
  };
  auto body = [&]() -> asio::awaitable<void> {
    co_await asio::this_coro::throw_if_cancelled(false);
    try {
      co_await sleep_for(1h);
    } catch (const boost::system::system_error& e) {
      first = e.code();
    }
    try {
      co_await keel::with_deadline<manual_clock>([&] { return sleep_for(24h); }, 1s);
    } catch (const boost::system::system_error& e) {
      second = e.code();
    }
  };
  spawn(ctx, body(), out, sig.slot());
  keel::testing::run_for(ctx, 10ms);
  sig.emit(asio::cancellation_type::terminal);  // cancels the first step only
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(first == asio::error::operation_aborted);
  CHECK(second == keel::error::deadline_exceeded);
  CHECK(out.finished_at_ms == 1010);
}

TEST_CASE("an io_context destroyed with calls under a deadline pending frees them cleanly",
          "[deadline]") {
  manual_clock::reset();
  auto never = []() -> asio::awaitable<int> {
    co_await sleep_for(24h);
    co_return 1;
  };
  outcome<int> a, b;
  {
    asio::io_context ctx;
    spawn(ctx, keel::with_deadline<manual_clock>(never, 1s), a);
    spawn(ctx, keel::with_deadline<manual_clock>(never, 2s), b);
    keel::testing::run_for(ctx, 10ms);
    CHECK(keel::detail::deadline_queue<manual_clock>::of(ctx.get_executor()).size() == 2);
  }  // ASan checks that no entry or timer outlives its frame
  CHECK_FALSE(a.done);
  CHECK_FALSE(b.done);
}

TEST_CASE("deadlines on strands of a multi-threaded io_context fire and complete on each strand",
          "[deadline][threads]") {
  // Real time, but no outcome depends on timing: `never` cannot finish before its 2 ms deadline,
  // and `quick` finishes at once, far inside its one-hour deadline.
  asio::io_context ctx(2);
  constexpr int per_kind = 200;
  std::atomic<int> timed_out{0}, answered{0}, wrong{0};
  auto never = []() -> asio::awaitable<int> {
    keel::basic_timer<> t(co_await asio::this_coro::executor);
    t.expires_after(std::chrono::hours(24));
    co_await t.async_wait(asio::use_awaitable);
    co_return 1;
  };
  auto quick = []() -> asio::awaitable<int> {
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
    co_return 7;
  };
  for (int i = 0; i < per_kind; ++i) {
    auto strand = asio::make_strand(ctx);
    asio::co_spawn(strand, keel::with_deadline(never, 2ms), [&](std::exception_ptr e, int) {
      try {
        if (e) {
          std::rethrow_exception(e);
        }
        ++wrong;
      } catch (const keel::failure& f) {
        (f.code() == keel::error::deadline_exceeded ? timed_out : wrong)++;
      } catch (...) {
        ++wrong;
      }
    });
    asio::co_spawn(strand, keel::with_deadline(quick, 1h),
                   [&](std::exception_ptr e, int v) { (!e && v == 7 ? answered : wrong)++; });
  }
  std::thread helper([&] { ctx.run(); });
  ctx.run();
  helper.join();
  CHECK(timed_out == per_kind);
  CHECK(answered == per_kind);
  CHECK(wrong == 0);
}

TEST_CASE("on a thread_pool the shared deadline timer does not hold up join",
          "[deadline][threads]") {
  // thread_pool has no io_context work count to lend: the queue posts an idle check that
  // cancels its timer once no deadline is pending. Every call here finishes long before its
  // one-hour deadline, so the timer is still armed when the last call leaves: without the idle
  // check, join() would wait an hour.
  asio::thread_pool pool(2);
  std::atomic<int> answered{0};
  auto quick = []() -> asio::awaitable<int> {
    co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
    co_return 7;
  };
  for (int i = 0; i < 40; ++i) {
    asio::co_spawn(asio::make_strand(pool), keel::with_deadline(quick, 1h),
                   [&](std::exception_ptr e, int v) {
                     if (!e && v == 7) {
                       ++answered;
                     }
                   });
  }
  pool.join();
  CHECK(answered == 40);
}
