// Tests for keel/hedge.hpp: hedge timing, commit and cancellation of losers, failures, budgets.
#include <keel/hedge.hpp>

#include "support.hpp"

#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/error.hpp>
#include <catch2/catch.hpp>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

using namespace keel_test;
using keel::testing::run_until;

namespace {

/// One attempt's script: after `latency`, fail with `ec` or return `value`. With `commit_at` set,
/// the attempt is streamed: it sleeps `commit_at`, commits, then sleeps the rest of `latency`.
struct plan {
  ms latency{0};
  boost::system::error_code ec{};
  std::optional<ms> commit_at{};
  int value = 0;
};

/// Hedged attempts that follow their plans and record what happened to each, and in what order
/// (`log`), so that tests can see that a loser unwound before the caller got its result.
struct hedged {
  explicit hedged(std::vector<plan> p)
      : plans(std::move(p)),
        started(plans.size(), -1),
        unwound(plans.size(), -1),
        cancelled(plans.size(), asio::cancellation_type::none),
        commit_result(plans.size()),
        late_commit(plans.size()) {}

  std::vector<plan> plans;
  std::vector<long long> started;
  std::vector<long long> unwound;
  std::vector<asio::cancellation_type> cancelled;  // what the attempt's thread saw, if cancelled
  std::vector<std::optional<bool>> commit_result;
  std::vector<std::optional<bool>> late_commit;  // commit() called after being cancelled
  std::vector<std::string> log;

  asio::awaitable<int> run(keel::hedge_attempt& h) {
    const std::size_t i = h.index();
    REQUIRE(i < plans.size());
    started[i] = now_ms();
    struct cleanup {
      hedged* self;
      std::size_t i;
      ~cleanup() {
        self->unwound[i] = now_ms();
        self->log.push_back("unwound " + std::to_string(i));
      }
    } guard{this, i};
    auto cs = co_await asio::this_coro::cancellation_state;
    const plan p = plans[i];
    bool aborted = false;
    try {
      if (p.commit_at) {
        co_await sleep_for(*p.commit_at);
        commit_result[i] = h.commit();
        if (!*commit_result[i]) {
          throw boost::system::system_error(asio::error::operation_aborted);
        }
        co_await sleep_for(p.latency - *p.commit_at);
      } else {
        co_await sleep_for(p.latency);
      }
    } catch (const boost::system::system_error& e) {
      if (e.code() != asio::error::operation_aborted) {
        throw;
      }
      cancelled[i] = cs.cancelled();
      aborted = true;
    }
    if (aborted) {
      if (p.commit_at && !commit_result[i]) {
        late_commit[i] = h.commit();  // a streamed attempt that got its token anyway
      }
      throw boost::system::system_error(asio::error::operation_aborted);
    }
    if (p.ec) {
      throw keel::failure(p.ec, p.ec.message());
    }
    co_return p.value;
  }

  auto factory() {
    return [this](keel::hedge_attempt& h) { return run(h); };
  }
};

keel::basic_hedge_policy<manual_clock> policy_with(std::size_t attempts, ms delay) {
  keel::basic_hedge_policy<manual_clock> p;
  p.max_attempts = attempts;
  p.delay = delay;
  return p;
}

/// Runs one hedged call to completion and logs "result" when the caller sees it.
asio::awaitable<int> logged(hedged& h, keel::basic_hedge_policy<manual_clock> p) {
  int v = co_await keel::with_hedge(h.factory(), std::move(p));
  h.log.push_back("result");
  co_return v;
}

}  // namespace

TEST_CASE("with_hedge starts the hedge exactly at the delay and the faster attempt wins",
          "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{500ms, {}, {}, 1}, plan{50ms, {}, {}, 2}});
  std::vector<keel::hedge_event> events;
  auto p = policy_with(2, 100ms);
  p.on_hedge = [&](const keel::hedge_event& e) { events.push_back(e); };
  outcome<int> out;
  spawn(ctx, logged(h, p), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(h.started == std::vector<long long>{0, 100});
  REQUIRE(events.size() == 1);
  CHECK(events[0].attempt == 1);
  CHECK(events[0].delay == 100ms);
  CHECK(events[0].elapsed == 100ms);
  CHECK(out.value == 2);
  CHECK(out.finished_at_ms == 150);
  // The primary was cancelled with terminal cancellation when the hedge won, and unwound
  // before the caller saw the result.
  CHECK(h.cancelled[0] == asio::cancellation_type::terminal);
  CHECK(h.unwound[0] == 150);
  CHECK(h.log == std::vector<std::string>{"unwound 1", "unwound 0", "result"});
}

TEST_CASE("with_hedge sends no hedge when the primary answers before the delay", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{80ms, {}, {}, 1}, plan{10ms, {}, {}, 2}});
  int hedges = 0;
  auto p = policy_with(2, 100ms);
  p.on_hedge = [&](const keel::hedge_event&) { ++hedges; };
  outcome<int> out;
  spawn(ctx, keel::with_hedge(h.factory(), p), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  keel::testing::run_for(ctx, 1s);
  CHECK(out.value == 1);
  CHECK(out.finished_at_ms == 80);
  CHECK(h.started == std::vector<long long>{0, -1});
  CHECK(hedges == 0);
}

TEST_CASE("when the primary wins after the hedge started, the hedge is cancelled and unwinds first",
          "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{150ms, {}, {}, 1}, plan{500ms, {}, {}, 2}});
  outcome<int> out;
  spawn(ctx, logged(h, policy_with(2, 100ms)), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 1);
  CHECK(out.finished_at_ms == 150);
  CHECK(h.started == std::vector<long long>{0, 100});
  CHECK(h.cancelled[1] == asio::cancellation_type::terminal);
  CHECK(h.cancelled[0] == asio::cancellation_type::none);
  CHECK(h.log == std::vector<std::string>{"unwound 0", "unwound 1", "result"});
}

TEST_CASE("a streamed attempt's commit cancels the others at once and a late committer gets false",
          "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  // The primary's first token would come at 300 ms, the hedge's (started at 100) at 200 ms; the
  // hedge then streams until 500 ms.
  hedged h({plan{600ms, {}, 300ms, 1}, plan{400ms, {}, 100ms, 2}});
  outcome<int> out;
  spawn(ctx, logged(h, policy_with(2, 100ms)), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(h.commit_result[1] == true);
  CHECK_FALSE(h.commit_result[0].has_value());  // it never reached its first token
  // Cancelled at the hedge's commit (200 ms), not when the hedge finished (500 ms).
  CHECK(h.cancelled[0] == asio::cancellation_type::terminal);
  CHECK(h.unwound[0] == 200);
  CHECK(h.late_commit[0] == false);
  CHECK(out.value == 2);
  CHECK(out.finished_at_ms == 500);
  CHECK(h.log == std::vector<std::string>{"unwound 0", "unwound 1", "result"});
}

TEST_CASE("a winner's repeated commit is true, and a loser's late value is dropped", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<bool> commits;
  bool loser_returned = false;
  auto op = [&](keel::hedge_attempt& h) -> asio::awaitable<int> {
    if (h.index() == 0) {
      try {
        co_await sleep_for(500ms);
      } catch (const boost::system::system_error&) {
      }
      loser_returned = true;
      co_return 99;  // ignores its cancellation and answers anyway
    }
    co_await sleep_for(50ms);
    commits.push_back(h.commit());
    commits.push_back(h.commit());  // asking again is harmless
    co_return 7;
  };
  keel::basic_hedge_policy<manual_clock> p;
  p.delay = 100ms;
  outcome<int> out;
  spawn(ctx, keel::with_hedge(op, p), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(commits == std::vector<bool>{true, true});
  CHECK(loser_returned);
  CHECK(out.value == 7);
  CHECK(out.finished_at_ms == 150);
}

TEST_CASE("a failure before the delay starts no hedge and is thrown", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{50ms, asio::error::connection_reset, {}, 1}, plan{10ms, {}, {}, 2}});
  outcome<int> out;
  spawn(ctx, keel::with_hedge(h.factory(), policy_with(2, 100ms)), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  keel::testing::run_for(ctx, 1s);
  CHECK(out.code() == asio::error::connection_reset);
  CHECK(out.finished_at_ms == 50);
  CHECK(h.started == std::vector<long long>{0, -1});
}

TEST_CASE("after a failure no new hedge starts, and an attempt in flight may still win",
          "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  // Attempt 2 would start at 200 ms; the primary fails at 150 ms, so it never does.
  hedged h({plan{150ms, asio::error::connection_reset, {}, 1}, plan{150ms, {}, {}, 2},
            plan{10ms, {}, {}, 3}});
  outcome<int> out;
  spawn(ctx, keel::with_hedge(h.factory(), policy_with(3, 100ms)), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 2);
  CHECK(out.finished_at_ms == 250);
  CHECK(h.started == std::vector<long long>{0, 100, -1});
}

TEST_CASE("when every attempt fails the primary's failure is thrown, after all have finished",
          "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  // The hedge fails first (at 150 ms), the primary later (at 300 ms): the primary's error wins.
  hedged h({plan{300ms, asio::error::connection_reset, {}, 1},
            plan{50ms, asio::error::connection_refused, {}, 2}});
  outcome<int> out;
  spawn(ctx, keel::with_hedge(h.factory(), policy_with(2, 100ms)), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == asio::error::connection_reset);
  CHECK(out.finished_at_ms == 300);
  CHECK(h.unwound == std::vector<long long>{300, 150});
}

TEST_CASE("a winner's failure after its commit is the call's failure", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{400ms, asio::error::connection_reset, 50ms, 1}, plan{10ms, {}, {}, 2}});
  outcome<int> out;
  spawn(ctx, keel::with_hedge(h.factory(), policy_with(2, 100ms)), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(h.commit_result[0] == true);
  CHECK(h.started == std::vector<long long>{0, -1});  // committed before the delay: no hedge
  CHECK(out.code() == asio::error::connection_reset);
  CHECK(out.finished_at_ms == 400);
}

TEST_CASE("cancelling the caller cancels every attempt, waits for them, and aborts", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{500ms, {}, {}, 1}, plan{500ms, {}, {}, 2}, plan{10ms, {}, {}, 3}});
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, logged(h, policy_with(3, 100ms)), out, sig.slot());
  keel::testing::run_for(ctx, 150ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  keel::testing::run_for(ctx, 1s);
  CHECK(out.code() == asio::error::operation_aborted);
  CHECK(out.finished_at_ms == 150);
  CHECK(h.started == std::vector<long long>{0, 100, -1});  // attempt 2 was due at 200 ms
  CHECK(h.cancelled[0] == asio::cancellation_type::terminal);
  CHECK(h.cancelled[1] == asio::cancellation_type::terminal);
  CHECK(h.unwound[0] == 150);
  CHECK(h.unwound[1] == 150);
  CHECK(h.log == std::vector<std::string>{"unwound 0", "unwound 1"});
}

TEST_CASE("max_attempts 3 hedges twice, one delay apart, and the last one can win", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{1000ms, {}, {}, 1}, plan{1000ms, {}, {}, 2}, plan{50ms, {}, {}, 3}});
  std::vector<keel::hedge_event> events;
  auto p = policy_with(3, 100ms);
  p.on_hedge = [&](const keel::hedge_event& e) { events.push_back(e); };
  outcome<int> out;
  spawn(ctx, logged(h, p), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(h.started == std::vector<long long>{0, 100, 200});
  REQUIRE(events.size() == 2);
  CHECK(events[0].attempt == 1);
  CHECK(events[0].elapsed == 100ms);
  CHECK(events[1].attempt == 2);
  CHECK(events[1].elapsed == 200ms);
  CHECK(out.value == 3);
  CHECK(out.finished_at_ms == 250);
  CHECK(h.cancelled[0] == asio::cancellation_type::terminal);
  CHECK(h.cancelled[1] == asio::cancellation_type::terminal);
  CHECK(h.log.back() == "result");
}

TEST_CASE("max_attempts 1 never hedges", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{500ms, {}, {}, 1}, plan{10ms, {}, {}, 2}});
  outcome<int> out;
  spawn(ctx, keel::with_hedge(h.factory(), policy_with(1, 100ms)), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 1);
  CHECK(out.finished_at_ms == 500);
  CHECK(h.started == std::vector<long long>{0, -1});
}

TEST_CASE("with_hedge accepts factories taking an index or nothing, and void operations",
          "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<std::size_t> seen;
  auto by_index = [&](std::size_t i) -> asio::awaitable<int> {
    seen.push_back(i);
    co_await sleep_for(i == 0 ? 300ms : 10ms);
    co_return static_cast<int>(i) + 10;
  };
  int calls = 0;
  auto plain = [&]() -> asio::awaitable<void> {
    ++calls;
    co_await sleep_for(calls == 1 ? 300ms : 10ms);
  };
  outcome<int> a;
  outcome<void> b;
  spawn(ctx, keel::with_hedge(by_index, policy_with(2, 100ms)), a);
  spawn(ctx, keel::with_hedge(plain, policy_with(2, 100ms)), b);
  REQUIRE(run_until(ctx, [&] { return a.done && b.done; }));
  CHECK(seen == std::vector<std::size_t>{0, 1});
  CHECK(a.value == 11);
  CHECK(a.finished_at_ms == 110);
  CHECK(calls == 2);
  CHECK_FALSE(b.error);
  CHECK(b.finished_at_ms == 110);
}

TEST_CASE("a stand-alone hedge_attempt is attempt 0 and always commits", "[hedge]") {
  keel::hedge_attempt solo;
  CHECK(solo.index() == 0);
  CHECK(solo.commit());
  CHECK(solo.commit());
}

TEST_CASE("latency_window answers nearest-rank percentiles of its most recent samples", "[hedge]") {
  keel::basic_latency_window<manual_clock> w(4, 1);
  CHECK_FALSE(w.percentile(50).has_value());
  for (int i = 1; i <= 3; ++i) {
    w.record(ms(i * 10));
  }
  CHECK(w.size() == 3);
  CHECK_FALSE(w.percentile(50, 4).has_value());  // fewer than min_samples
  CHECK(w.percentile(0) == ms(10));
  CHECK(w.percentile(50) == ms(20));  // rank ceil(1.5) = 2
  CHECK(w.percentile(100) == ms(30));
  w.record(40ms);
  w.record(50ms);  // replaces the oldest, 10 ms
  CHECK(w.size() == 4);
  CHECK(w.percentile(0) == ms(20));
  CHECK(w.percentile(95) == ms(50));
  CHECK(w.percentile(250) == ms(50));  // clamped to 100
  w.record(-5ms);                      // counts as zero
  CHECK(w.percentile(0) == ms(0));
  w.clear();
  CHECK(w.size() == 0);
  CHECK_FALSE(w.percentile(50).has_value());
}

TEST_CASE("latency_window re-sorts only after refresh_every new samples", "[hedge]") {
  keel::basic_latency_window<manual_clock> w(8, 3);
  w.record(10ms);
  CHECK(w.percentile(100) == ms(10));  // first query sorts
  w.record(90ms);
  w.record(80ms);
  CHECK(w.percentile(100) == ms(10));  // 2 new samples: still the old snapshot
  w.record(70ms);
  CHECK(w.percentile(100) == ms(90));  // 3 new samples: refreshed
}

TEST_CASE("the hedge delay is a percentile of the latency window once it has min_samples",
          "[hedge]") {
  keel::basic_latency_window<manual_clock> window(1024, 1);
  auto p = policy_with(2, 100ms);
  p.latency = &window;
  p.min_samples = 20;
  p.percentile = 95;
  auto run_one = [&](long long expected_hedge_at) {
    manual_clock::reset();
    asio::io_context ctx;
    hedged h({plan{1000ms, {}, {}, 1}, plan{10ms, {}, {}, 2}});
    outcome<int> out;
    spawn(ctx, keel::with_hedge(h.factory(), p), out);
    REQUIRE(run_until(ctx, [&] { return out.done; }));
    CHECK(h.started[1] == expected_hedge_at);
    CHECK(out.value == 2);
    return out.finished_at_ms;
  };
  for (int i = 1; i <= 18; ++i) {
    window.record(ms(i * 10));
  }
  // 18 samples: the fixed delay. The hedge wins, so the call records when it started (100 ms,
  // not its commit at 110 ms): 19 samples.
  CHECK(run_one(100) == 110);
  CHECK(window.size() == 19);
  CHECK(run_one(100) == 110);
  REQUIRE(window.size() == 20);
  // Samples 10..180 ms and 100 ms twice: the 95th percentile is the 19th of 20, 170 ms.
  CHECK(window.percentile(60) == ms(100));  // 12th of 20: 10..90, then 100 three times
  CHECK(window.percentile(95) == ms(170));
  CHECK(run_one(170) == 180);
}

TEST_CASE("a hedge_budget caps hedges at its capacity plus ratio times the calls", "[hedge]") {
  keel::hedge_budget budget(0.05, 2);
  auto p = policy_with(2, 100ms);
  p.budget = &budget;
  int hedges = 0;
  p.on_hedge = [&](const keel::hedge_event&) { ++hedges; };
  // The budget's own arithmetic, in thousandths: starts full, +50 per call (capped), -1000 a hedge.
  std::int64_t tokens = 2000;
  int expected = 0;
  const int calls = 100;
  for (int c = 0; c < calls; ++c) {
    manual_clock::reset();
    asio::io_context ctx;
    hedged h({plan{200ms, {}, {}, 1}, plan{50ms, {}, {}, 2}});
    outcome<int> out;
    spawn(ctx, keel::with_hedge(h.factory(), p), out);
    REQUIRE(run_until(ctx, [&] { return out.done; }));
    tokens = std::min<std::int64_t>(tokens + 50, 2000);
    const bool hedge = tokens >= 1000;
    if (hedge) {
      tokens -= 1000;
      ++expected;
    }
    CHECK(out.value == (hedge ? 2 : 1));
    CHECK(out.finished_at_ms == (hedge ? 150 : 200));
  }
  CHECK(hedges == expected);
  CHECK(hedges == 6);  // calls 1, 2, 21, 41, 61 and 81
  CHECK(hedges <= 2 + 0.05 * calls);
  CHECK(budget.granted() == 6);
  CHECK(budget.denied() == calls - 6);
}

TEST_CASE("a hedge is charged to the retry budget and refused when it is at half", "[hedge]") {
  keel::retry_budget retries(10, 0.1);
  auto p = policy_with(2, 100ms);
  p.retry_budget = &retries;
  int hedges = 0;
  for (int c = 0; c < 8; ++c) {
    manual_clock::reset();
    asio::io_context ctx;
    hedged h({plan{200ms, {}, {}, 1}, plan{50ms, {}, {}, 2}});
    outcome<int> out;
    spawn(ctx, keel::with_hedge(h.factory(), p), out);
    REQUIRE(run_until(ctx, [&] { return out.done; }));
    hedges += h.started[1] >= 0 ? 1 : 0;
  }
  // 10 tokens; each hedge takes one; no hedge once tokens <= 5.
  CHECK(hedges == 5);
  CHECK(retries.tokens() == Approx(5.0));
  CHECK(retries.denied() == 3);
}

TEST_CASE("a hedge refused by the hedge budget takes nothing from the retry budget", "[hedge]") {
  keel::retry_budget retries(10, 0.1);
  keel::hedge_budget empty(0.0, 0);
  auto p = policy_with(2, 100ms);
  p.retry_budget = &retries;
  p.budget = &empty;
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{200ms, {}, {}, 1}, plan{50ms, {}, {}, 2}});
  outcome<int> out;
  spawn(ctx, keel::with_hedge(h.factory(), p), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 1);
  CHECK(h.started[1] == -1);
  CHECK(empty.denied() == 1);
  CHECK(retries.tokens() == Approx(10.0));
}

TEST_CASE("an on_hedge hook that throws cancels the attempts, waits for them and rethrows",
          "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{500ms, {}, {}, 1}, plan{10ms, {}, {}, 2}});
  auto p = policy_with(2, 100ms);
  p.on_hedge = [](const keel::hedge_event&) { throw std::runtime_error("hook"); };
  outcome<int> out;
  spawn(ctx, logged(h, p), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  REQUIRE(out.error);
  CHECK_THROWS_AS(std::rethrow_exception(out.error), std::runtime_error);
  CHECK(out.finished_at_ms == 100);
  CHECK(h.started == std::vector<long long>{0, -1});
  CHECK(h.cancelled[0] == asio::cancellation_type::terminal);
  CHECK(h.unwound[0] == 100);
}

TEST_CASE(
    "with_hedge waits for a loser's slow cleanup, and a caller cancellation then keeps the value",
    "[hedge]") {
  for (bool cancel_during_cleanup : {false, true}) {
    manual_clock::reset();
    asio::io_context ctx;
    long long cleanup_done = -1, primary_unwound = -1;
    auto op = [&](std::size_t i) -> asio::awaitable<int> {
      if (i == 1) {
        co_await sleep_for(50ms);
        co_return 2;
      }
      struct guard {
        long long& at;
        ~guard() { at = now_ms(); }
      } g{primary_unwound};
      try {
        co_await sleep_for(500ms);
      } catch (const boost::system::system_error&) {
      }
      // Cancelled: clean up for 100 ms (say, a graceful close) before unwinding.
      co_await asio::this_coro::reset_cancellation_state();
      co_await sleep_for(100ms);
      cleanup_done = now_ms();
      throw boost::system::system_error(asio::error::operation_aborted);
    };
    outcome<int> out;
    asio::cancellation_signal sig;
    spawn(ctx, keel::with_hedge(op, policy_with(2, 100ms)), out, sig.slot());
    keel::testing::run_for(ctx, 200ms);
    CHECK_FALSE(out.done);  // the hedge won at 150 ms; the primary is still cleaning up
    if (cancel_during_cleanup) {
      sig.emit(asio::cancellation_type::terminal);
    }
    REQUIRE(run_until(ctx, [&] { return out.done; }));
    // The caller's cancellation reaches the loser too and cuts its cleanup short.
    const long long end = cancel_during_cleanup ? 200 : 250;
    CHECK(cleanup_done == (cancel_during_cleanup ? -1 : 250));
    CHECK(primary_unwound == end);
    CHECK(out.finished_at_ms == end);
    CHECK(out.value == 2);  // the value was in hand before the caller's cancellation
  }
}

TEST_CASE("a deadline around with_hedge cancels every attempt", "[hedge]") {
  manual_clock::reset();
  asio::io_context ctx;
  hedged h({plan{500ms, {}, {}, 1}, plan{500ms, {}, {}, 2}});
  auto p = policy_with(2, 100ms);
  auto hedged_call = [&] { return keel::with_hedge(h.factory(), p); };
  outcome<int> out;
  spawn(ctx, keel::with_deadline<manual_clock>(hedged_call, 300ms), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(out.finished_at_ms == 300);
  CHECK(h.started == std::vector<long long>{0, 100});
  CHECK(h.cancelled[0] == asio::cancellation_type::terminal);
  CHECK(h.cancelled[1] == asio::cancellation_type::terminal);
  CHECK(h.unwound == std::vector<long long>{300, 300});
}

TEST_CASE("with_hedge takes only factories of awaitables", "[hedge]") {
  auto returns_int = [] { return 1; };
  auto takes_string = [](const std::string&) -> asio::awaitable<int> { co_return 1; };
  auto takes_index = [](std::size_t) -> asio::awaitable<int> { co_return 1; };
  STATIC_REQUIRE_FALSE(keel::detail::hedge_factory<decltype(returns_int)>);
  STATIC_REQUIRE_FALSE(keel::detail::hedge_factory<decltype(takes_string)>);
  STATIC_REQUIRE(keel::detail::hedge_factory<decltype(takes_index)>);
}
