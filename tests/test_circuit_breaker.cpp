// Tests for keel/circuit_breaker.hpp: trip rules, half-open probes, cancellation, with_breaker.
#include <keel/circuit_breaker.hpp>
#include <keel/classify.hpp>
#include <keel/clock.hpp>
#include <keel/error.hpp>
#include <keel/testing/manual_clock.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

using namespace std::chrono_literals;
namespace asio = boost::asio;
using keel::breaker_state;
using keel::testing::manual_clock;

namespace Catch {
template <>
struct StringMaker<keel::breaker_state> {
  static std::string convert(keel::breaker_state s) { return keel::to_string(s); }
};
}  // namespace Catch

namespace {

using test_breaker = keel::basic_circuit_breaker<manual_clock>;

enum class fault { none, transient, throttled, permanent };

// A fake provider: counts the calls that actually start, takes `latency` of virtual time, then
// answers with the call number or fails as its plan says (call numbers start at 1).
struct fake_provider {
  std::chrono::nanoseconds latency{0};
  fault default_fault = fault::none;
  std::map<int, fault> plan;
  int calls = 0;

  asio::awaitable<int> call() {
    const int n = ++calls;
    if (latency > 0ns) {
      keel::basic_timer<manual_clock> t{co_await asio::this_coro::executor};
      t.expires_after(latency);
      co_await t.async_wait(asio::use_awaitable);
    }
    const auto it = plan.find(n);
    switch (it == plan.end() ? default_fault : it->second) {
      case fault::none:
        break;
      case fault::transient:
        throw boost::system::system_error(asio::error::connection_reset, "reset");
      case fault::throttled:
        throw keel::failure(keel::error::throttled, "429");
      case fault::permanent:
        throw boost::system::system_error(asio::error::access_denied, "400");
    }
    co_return n;
  }

  auto op() {
    return [this] { return call(); };
  }
};

struct call_result {
  bool done = false;
  std::optional<int> value;
  std::exception_ptr error;
};

template <class Handler>
void spawn_call(asio::io_context& ctx, asio::awaitable<int> a, call_result& r, Handler wrap) {
  asio::co_spawn(ctx, std::move(a), wrap([&r](std::exception_ptr e, int v) {
                   r.done = true;
                   if (e) {
                     r.error = e;
                   } else {
                     r.value = v;
                   }
                 }));
}

void spawn_call(asio::io_context& ctx, asio::awaitable<int> a, call_result& r) {
  spawn_call(ctx, std::move(a), r, [](auto h) { return h; });
}

// Runs one call through the breaker to completion in virtual time.
call_result call(asio::io_context& ctx, test_breaker& b, fake_provider& p) {
  call_result r;
  spawn_call(ctx, keel::with_breaker(b, p.op()), r);
  REQUIRE(keel::testing::run_until(ctx, [&] { return r.done; }));
  return r;
}

boost::system::error_code code_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& x) {
    return x.code();
  } catch (...) {
    return {};
  }
}

std::optional<keel::failure> failure_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const keel::failure& f) {
    return f;
  } catch (...) {
    return std::nullopt;
  }
}

keel::classification transient() {
  keel::classification c;
  c.condition = keel::condition::transient;
  return c;
}

void fail_once(test_breaker& b) {
  auto p = b.try_acquire();
  REQUIRE(p);
  p->record_failure(transient());
}

}  // namespace

TEST_CASE("five consecutive failures open the breaker for exactly 60 s, then one probe runs",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(5, 60s)};
  fake_provider p;
  p.default_fault = fault::transient;

  for (int i = 0; i < 4; ++i) {
    CHECK(code_of(call(ctx, b, p).error) == asio::error::connection_reset);
  }
  CHECK(b.state() == breaker_state::closed);
  // The fifth failure is rethrown unchanged, and it opens the breaker.
  CHECK(code_of(call(ctx, b, p).error) == asio::error::connection_reset);
  CHECK(b.state() == breaker_state::open);
  CHECK(b.opened_count() == 1);
  REQUIRE(b.open_until());
  CHECK(*b.open_until() == manual_clock::time_point{60s});

  manual_clock::advance(59'999ms);
  CHECK(code_of(call(ctx, b, p).error) == keel::error::circuit_open);
  CHECK(p.calls == 5);
  CHECK(b.rejected_count() == 1);

  manual_clock::advance(1ms);
  CHECK(b.state() == breaker_state::half_open);

  SECTION("one probe success closes it") {
    p.default_fault = fault::none;
    auto probe = call(ctx, b, p);
    REQUIRE(probe.value);
    CHECK(*probe.value == 6);
    CHECK(b.state() == breaker_state::closed);
    CHECK(b.open_until() == std::nullopt);
  }

  SECTION("one probe failure re-opens it for another 60 s") {
    CHECK(code_of(call(ctx, b, p).error) == asio::error::connection_reset);
    CHECK(p.calls == 6);
    CHECK(b.state() == breaker_state::open);
    CHECK(b.opened_count() == 2);
    REQUIRE(b.open_until());
    CHECK(*b.open_until() == manual_clock::time_point{120s});
    manual_clock::advance(59'999ms);
    CHECK(code_of(call(ctx, b, p).error) == keel::error::circuit_open);
    CHECK(p.calls == 6);
    manual_clock::advance(1ms);
    CHECK(b.state() == breaker_state::half_open);
  }
}

TEST_CASE("a success between failures resets the consecutive count", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(5, 60s)};
  fake_provider p;
  p.default_fault = fault::transient;
  p.plan[5] = fault::none;

  for (int i = 0; i < 9; ++i) {
    call(ctx, b, p);
  }
  CHECK(b.state() == breaker_state::closed);
  CHECK(b.counters().failed == 8);
  CHECK(b.counters().succeeded == 1);
  call(ctx, b, p);
  CHECK(b.state() == breaker_state::open);
  CHECK(p.calls == 10);
}

TEST_CASE("failure-ratio mode waits for the minimum throughput and trips at the ratio",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::failure_ratio(0.5, 10, 10s, 5s)};
  fake_provider p;

  SECTION("nine failures are below the minimum throughput") {
    p.default_fault = fault::transient;
    for (int i = 0; i < 9; ++i) {
      call(ctx, b, p);
    }
    CHECK(b.state() == breaker_state::closed);
    p.plan[10] = fault::none;
    call(ctx, b, p);  // 10 calls, but a success never trips the breaker
    CHECK(b.state() == breaker_state::closed);
    call(ctx, b, p);  // 11 calls, 10 failures
    CHECK(b.state() == breaker_state::open);
    REQUIRE(b.open_until());
    CHECK(*b.open_until() == manual_clock::time_point{5s});
  }

  SECTION("it trips when failures reach exactly the ratio") {
    for (int i = 1; i <= 6; ++i) {
      p.plan[i] = fault::none;
    }
    p.default_fault = fault::transient;
    for (int i = 0; i < 11; ++i) {
      call(ctx, b, p);  // 6 successes, then 5 failures: 5/11 < 0.5
    }
    CHECK(b.state() == breaker_state::closed);
    call(ctx, b, p);  // 6/12 == 0.5
    CHECK(b.state() == breaker_state::open);
    CHECK(b.opened_count() == 1);
  }
}

TEST_CASE("failure-ratio mode forgets samples older than the sampling window", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::failure_ratio(0.5, 10, 10s, 5s)};
  fake_provider p;
  p.default_fault = fault::transient;
  for (int i = 0; i < 9; ++i) {
    call(ctx, b, p);
  }

  SECTION("at 9 s they are still in the window") {
    manual_clock::advance(9s);
    call(ctx, b, p);
    CHECK(b.state() == breaker_state::open);
  }

  SECTION("at 10 s they have left it") {
    manual_clock::advance(10s);
    for (int i = 0; i < 9; ++i) {
      call(ctx, b, p);
    }
    CHECK(b.state() == breaker_state::closed);
    call(ctx, b, p);
    CHECK(b.state() == breaker_state::open);
    CHECK(p.calls == 19);
  }
}

TEST_CASE("half-open admits exactly N probes concurrently and rejects the next", "[breaker]") {
  const bool one_probe_fails = GENERATE(false, true);
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(1, 1s);
  policy.half_open_probes = 3;
  test_breaker b{ctx.get_executor(), policy};
  fake_provider p;
  p.plan[1] = fault::transient;
  call(ctx, b, p);
  REQUIRE(b.state() == breaker_state::open);
  manual_clock::advance(1s);
  p.latency = 100ms;

  if (one_probe_fails) {
    p.plan[3] = fault::transient;  // the second of the three probes
  }

  std::vector<call_result> r(4);
  for (auto& x : r) {
    spawn_call(ctx, keel::with_breaker(b, p.op()), x);
  }
  keel::testing::poll_all(ctx);
  CHECK(p.calls == 4);  // the tripping call and three probes
  REQUIRE(r[3].done);
  const auto rejection = failure_of(r[3].error);
  REQUIRE(rejection);
  CHECK(rejection->code() == keel::error::circuit_open);
  CHECK(rejection->retry_after() == std::nullopt);  // no known end while probes run
  CHECK(b.state() == breaker_state::half_open);

  REQUIRE(keel::testing::run_until(ctx, [&] { return r[0].done && r[1].done && r[2].done; }));
  CHECK(manual_clock::now() == manual_clock::time_point{1100ms});
  if (one_probe_fails) {
    CHECK(code_of(r[1].error) == asio::error::connection_reset);
    CHECK(r[2].value);  // a late success from the failed phase does not close it
    CHECK(b.state() == breaker_state::open);
    CHECK(b.opened_count() == 2);
  } else {
    CHECK(r[0].value);
    CHECK(r[1].value);
    CHECK(r[2].value);
    CHECK(b.state() == breaker_state::closed);
    CHECK(b.opened_count() == 1);
  }
}

TEST_CASE("every probe must succeed to close, and an abandoned permit frees its slot",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(1, 1s);
  policy.half_open_probes = 3;
  test_breaker b{ctx.get_executor(), policy};
  fail_once(b);
  manual_clock::advance(1s);

  auto p1 = b.try_acquire();
  auto p2 = b.try_acquire();
  std::optional<test_breaker::permit> p3 = b.try_acquire();
  REQUIRE(p1);
  REQUIRE(p2);
  REQUIRE(p3);
  CHECK(p1->is_probe());
  CHECK_FALSE(b.try_acquire());

  p3.reset();  // destroyed without an outcome: recorded as cancelled, slot freed
  CHECK(b.counters().cancelled == 1);
  auto p4 = b.try_acquire();
  REQUIRE(p4);
  CHECK_FALSE(b.try_acquire());

  p1->record_success();
  p2->record_success(5ms);
  CHECK_FALSE(p1->pending());
  CHECK(b.state() == breaker_state::half_open);
  p1->record_failure(transient());  // a second outcome on a spent permit is ignored
  CHECK(b.state() == breaker_state::half_open);
  p4->record_success();
  CHECK(b.state() == breaker_state::closed);
  CHECK(b.counters().succeeded == 3);
  CHECK(b.counters().failed == 1);
}

TEST_CASE("late outcomes of calls admitted in an earlier phase do not move the state",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(1, 1s)};
  auto slow_success = b.try_acquire();
  auto slow_failure = b.try_acquire();
  REQUIRE(slow_success);
  REQUIRE(slow_failure);
  fail_once(b);
  manual_clock::advance(1s);
  auto probe = b.try_acquire();
  REQUIRE(probe);

  slow_success->record_success();  // from the closed phase: must not count as a probe
  CHECK(b.state() == breaker_state::half_open);
  CHECK_FALSE(b.try_acquire());  // the probe slot is still taken
  probe->record_success();
  CHECK(b.state() == breaker_state::closed);

  slow_failure->record_failure(transient());  // one failure would open it, but this one is stale
  CHECK(b.state() == breaker_state::closed);
  CHECK(b.counters().failed == 2);  // still counted as telemetry
  CHECK(b.opened_count() == 1);
}

TEST_CASE("slow successful calls count as failures but still return their value", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(2, 10s);
  policy.slow_call_threshold = 1s;
  test_breaker b{ctx.get_executor(), policy};
  fake_provider p;

  p.latency = 1s;  // exactly the threshold is not slow
  for (int i = 0; i < 3; ++i) {
    CHECK(call(ctx, b, p).value);
  }
  CHECK(b.state() == breaker_state::closed);
  CHECK(b.counters().slow == 0);

  p.latency = 1001ms;
  auto slow = call(ctx, b, p);
  REQUIRE(slow.value);
  CHECK(*slow.value == 4);
  CHECK(b.counters().slow == 1);
  CHECK(b.state() == breaker_state::closed);
  CHECK(call(ctx, b, p).value);
  CHECK(b.state() == breaker_state::open);
  CHECK(b.counters().failed == 2);
}

TEST_CASE("break durations grow with each re-opening, stop at the cap and reset after closing",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(1, 10s);
  policy.break_growth = 2.0;
  policy.max_break_duration = 35s;
  test_breaker b{ctx.get_executor(), policy};

  std::vector<std::chrono::nanoseconds> breaks;
  for (int i = 0; i < 4; ++i) {
    fail_once(b);  // closed at first, then a failed half-open probe
    breaks.push_back(b.remaining_open_time());
    manual_clock::advance(breaks.back());
  }
  CHECK(breaks == std::vector<std::chrono::nanoseconds>{10s, 20s, 35s, 35s});

  auto probe = b.try_acquire();
  REQUIRE(probe);
  probe->record_success();
  CHECK(b.state() == breaker_state::closed);
  fail_once(b);
  CHECK(b.remaining_open_time() == 10s);
}

TEST_CASE("permanent errors answer for a healthy provider and never open the breaker",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(1, 60s)};
  fake_provider p;
  p.default_fault = fault::permanent;
  for (int i = 0; i < 3; ++i) {
    CHECK(code_of(call(ctx, b, p).error) == asio::error::access_denied);
  }
  CHECK(b.state() == breaker_state::closed);
  CHECK(b.counters().failed == 0);
  CHECK(b.counters().not_counted == 3);
  p.default_fault = fault::transient;
  CHECK(code_of(call(ctx, b, p).error) == asio::error::connection_reset);
  CHECK(b.state() == breaker_state::open);
}

TEST_CASE("by default throttled failures never open the breaker, transient ones still do",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  // The default policy, as a library user gets it: consecutive(5, 60 s).
  test_breaker b{ctx.get_executor(), keel::breaker_policy{}};
  fake_provider p;
  p.default_fault = fault::throttled;
  constexpr int n = 50;  // ten times the threshold, in a row
  for (int i = 0; i < n; ++i) {
    CHECK(code_of(call(ctx, b, p).error) == keel::error::throttled);
  }
  CHECK(b.state() == breaker_state::closed);
  CHECK(b.opened_count() == 0);
  CHECK(p.calls == n);  // every throttled call ran: none was rejected
  CHECK(b.counters().failed == 0);
  CHECK(b.counters().not_counted == n);

  p.default_fault = fault::transient;
  for (int i = 0; i < 4; ++i) {
    CHECK(code_of(call(ctx, b, p).error) == asio::error::connection_reset);
  }
  CHECK(b.state() == breaker_state::closed);
  CHECK(code_of(call(ctx, b, p).error) == asio::error::connection_reset);
  CHECK(b.state() == breaker_state::open);
  CHECK(code_of(call(ctx, b, p).error) == keel::error::circuit_open);
}

TEST_CASE("a policy that lists throttled counts 429s against the breaker", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(3, 60s);
  policy.counts_as_failure.insert(keel::condition::throttled);
  test_breaker b{ctx.get_executor(), policy};
  fake_provider p;
  p.default_fault = fault::throttled;
  for (int i = 0; i < 3; ++i) {
    CHECK(code_of(call(ctx, b, p).error) == keel::error::throttled);
  }
  CHECK(b.state() == breaker_state::open);
  CHECK(b.counters().failed == 3);
}

TEST_CASE("a cancelled call is neither success nor failure and frees its probe slot", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(1, 60s)};
  fake_provider p;
  p.plan[1] = fault::transient;
  call(ctx, b, p);
  manual_clock::advance(60s);
  REQUIRE(b.state() == breaker_state::half_open);

  p.latency = 1s;
  asio::cancellation_signal cancel;
  call_result probe;
  spawn_call(ctx, keel::with_breaker(b, p.op()), probe,
             [&](auto h) { return asio::bind_cancellation_slot(cancel.slot(), std::move(h)); });
  keel::testing::poll_all(ctx);
  CHECK(p.calls == 2);
  CHECK(code_of(call(ctx, b, p).error) == keel::error::circuit_open);  // the slot is taken

  cancel.emit(asio::cancellation_type::terminal);
  keel::testing::poll_all(ctx);
  REQUIRE(probe.done);
  CHECK(code_of(probe.error) == asio::error::operation_aborted);
  CHECK(b.counters().cancelled == 1);
  CHECK(b.counters().failed == 1);  // only the call that tripped it
  CHECK(b.state() == breaker_state::half_open);

  auto next = call(ctx, b, p);  // the freed slot admits a new probe
  REQUIRE(next.value);
  CHECK(p.calls == 3);
  CHECK(b.state() == breaker_state::closed);
}

TEST_CASE("cancellation never counts, even when the policy lists it as a failure", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(1, 60s);
  policy.counts_as_failure = keel::condition_set::all_failures().insert(keel::condition::cancelled);
  test_breaker b{ctx.get_executor(), policy};
  fake_provider p;
  p.latency = 1s;
  asio::cancellation_signal cancel;
  call_result r;
  spawn_call(ctx, keel::with_breaker(b, p.op()), r,
             [&](auto h) { return asio::bind_cancellation_slot(cancel.slot(), std::move(h)); });
  keel::testing::poll_all(ctx);
  cancel.emit(asio::cancellation_type::terminal);
  keel::testing::poll_all(ctx);
  REQUIRE(r.done);
  CHECK(code_of(r.error) == asio::error::operation_aborted);
  CHECK(b.state() == breaker_state::closed);
  CHECK(b.counters().cancelled == 1);
}

TEST_CASE("a rejected call returns the degraded answer without calling the operation",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(1, 60s)};
  fake_provider p;

  auto run = [&](auto a) {
    call_result r;
    spawn_call(ctx, std::move(a), r);
    keel::testing::poll_all(ctx);
    REQUIRE(r.done);
    return r;
  };
  auto closed = run(keel::with_breaker(b, p.op(), [] { return -1; }));
  REQUIRE(closed.value);
  CHECK(*closed.value == 1);  // admitted: the operation's answer, not the degraded one

  fail_once(b);
  manual_clock::advance(15s);
  auto plain = run(keel::with_breaker(b, p.op(), [] { return -1; }));
  REQUIRE(plain.value);
  CHECK(*plain.value == -1);
  auto informed = run(keel::with_breaker(b, p.op(), [](const keel::failure& f) {
    return static_cast<int>(
        std::chrono::duration_cast<std::chrono::seconds>(*f.retry_after()).count());
  }));
  REQUIRE(informed.value);
  CHECK(*informed.value == 45);
  CHECK(p.calls == 1);
  CHECK(b.rejected_count() == 2);
}

TEST_CASE("with_breaker runs operations that return void", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(1, 60s)};
  int runs = 0;
  int degraded = 0;
  bool fail = true;
  auto op = [&]() -> asio::awaitable<void> {
    ++runs;
    if (fail) {
      throw boost::system::system_error(asio::error::connection_reset);
    }
    co_return;
  };
  std::vector<std::exception_ptr> errors;
  auto on_done = [&](std::exception_ptr e) { errors.push_back(e); };
  asio::co_spawn(ctx, keel::with_breaker(b, op), on_done);
  asio::co_spawn(ctx, keel::with_breaker(b, op, [&] { ++degraded; }), on_done);
  keel::testing::poll_all(ctx);
  REQUIRE(errors.size() == 2);
  CHECK(code_of(errors[0]) == asio::error::connection_reset);
  CHECK(errors[1] == nullptr);
  CHECK(runs == 1);
  CHECK(degraded == 1);

  b.reset();
  fail = false;
  asio::co_spawn(ctx, keel::with_breaker(b, op), on_done);
  keel::testing::poll_all(ctx);
  REQUIRE(errors.size() == 3);
  CHECK(errors[2] == nullptr);
  CHECK(runs == 2);
  CHECK(b.counters().succeeded == 1);
}

TEST_CASE("with_breaker moves non-trivial and move-only values out unchanged", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(1, 60s)};
  const std::string long_text(1000, 'x');  // heap-allocated: a double destroy would show
  auto text = [&]() -> asio::awaitable<std::string> { co_return long_text; };
  auto boxed = []() -> asio::awaitable<std::unique_ptr<int>> {
    co_return std::make_unique<int>(42);
  };
  std::string got_text;
  std::unique_ptr<int> got_box;
  asio::co_spawn(ctx, keel::with_breaker(b, text),
                 [&](std::exception_ptr, std::string v) { got_text = std::move(v); });
  asio::co_spawn(ctx, keel::with_breaker(b, boxed),
                 [&](std::exception_ptr, std::unique_ptr<int> v) { got_box = std::move(v); });
  keel::testing::poll_all(ctx);
  CHECK(got_text == long_text);
  REQUIRE(got_box);
  CHECK(*got_box == 42);

  b.isolate();
  auto degraded = [] { return std::string("busy"); };
  asio::co_spawn(ctx, keel::with_breaker(b, text, degraded),
                 [&](std::exception_ptr, std::string v) { got_text = std::move(v); });
  keel::testing::poll_all(ctx);
  CHECK(got_text == "busy");
}

TEST_CASE("the circuit_open failure carries the remaining open time as retry_after", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(1, 60s)};
  fake_provider p;
  fail_once(b);
  manual_clock::advance(12'500ms);
  CHECK(b.remaining_open_time() == 47'500ms);

  auto r = call(ctx, b, p);
  const auto f = failure_of(r.error);
  REQUIRE(f);
  CHECK(f->code() == keel::error::circuit_open);
  CHECK(f->retry_after() == std::chrono::nanoseconds(47'500ms));
  const auto c = keel::classify(r.error);
  CHECK(c.condition == keel::condition::throttled);
  CHECK(c.retry_after == std::chrono::nanoseconds(47'500ms));
  CHECK(p.calls == 0);

  b.isolate();
  const auto isolated = failure_of(call(ctx, b, p).error);
  REQUIRE(isolated);
  CHECK(isolated->code() == keel::error::circuit_open);
  CHECK(isolated->retry_after() == std::nullopt);
}

TEST_CASE("isolate rejects every call until reset, and reset closes and clears the counts",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(3, 1s)};
  fake_provider p;
  p.default_fault = fault::transient;
  call(ctx, b, p);
  call(ctx, b, p);
  b.reset();
  call(ctx, b, p);
  call(ctx, b, p);
  CHECK(b.state() == breaker_state::closed);  // 2 + 2 failures, with a reset in between

  b.isolate();
  CHECK(b.state() == breaker_state::isolated);
  manual_clock::advance(1h);
  CHECK(b.state() == breaker_state::isolated);
  CHECK(b.open_until() == std::nullopt);
  CHECK(b.remaining_open_time() == 0ns);
  CHECK(code_of(call(ctx, b, p).error) == keel::error::circuit_open);
  CHECK(p.calls == 4);
  CHECK(b.opened_count() == 0);

  b.reset();
  CHECK(b.state() == breaker_state::closed);
  p.default_fault = fault::none;
  CHECK(call(ctx, b, p).value);
  CHECK(p.calls == 5);
}

TEST_CASE("the state-change hook sees closed, open, half_open, closed in order", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<std::tuple<breaker_state, breaker_state, breaker_state>> seen;
  test_breaker* self = nullptr;
  auto policy = keel::breaker_policy::consecutive(2, 60s);
  // Reading the state from inside the hook would deadlock if the hook ran under the lock.
  policy.on_state_change = [&](breaker_state from, breaker_state to) {
    seen.emplace_back(from, to, self->state());
  };
  test_breaker b{ctx.get_executor(), policy};
  self = &b;
  fake_provider p;
  p.plan = {{1, fault::transient}, {2, fault::transient}};
  call(ctx, b, p);
  call(ctx, b, p);
  manual_clock::advance(60s);
  CHECK(seen.size() == 1);  // open -> half_open is taken when the next call arrives
  call(ctx, b, p);
  b.isolate();
  b.reset();
  using s = breaker_state;
  CHECK(seen == decltype(seen){{s::closed, s::open, s::open},
                               {s::open, s::half_open, s::half_open},
                               {s::half_open, s::closed, s::closed},
                               {s::closed, s::isolated, s::isolated},
                               {s::isolated, s::closed, s::closed}});
}

TEST_CASE("one thousand coroutines share one breaker on one io_context", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(5, 60s)};
  fake_provider p;
  p.latency = 10ms;
  p.default_fault = fault::transient;
  constexpr int n = 1000;

  auto wave = [&](bool degraded) {
    std::vector<call_result> r(n);
    for (auto& x : r) {
      if (degraded) {
        spawn_call(ctx, keel::with_breaker(b, p.op(), [] { return -1; }), x);
      } else {
        spawn_call(ctx, keel::with_breaker(b, p.op()), x);
      }
    }
    REQUIRE(keel::testing::run_until(ctx, [&] {
      return std::all_of(r.begin(), r.end(), [](const call_result& x) { return x.done; });
    }));
    return r;
  };

  // All admitted while closed; the fifth failure opens it, the 995 late ones change nothing.
  auto first = wave(false);
  CHECK(p.calls == n);
  CHECK(std::all_of(first.begin(), first.end(), [](const call_result& x) {
    return code_of(x.error) == asio::error::connection_reset;
  }));
  CHECK(b.opened_count() == 1);
  CHECK(b.counters().failed == n);
  REQUIRE(b.open_until());
  CHECK(*b.open_until() == manual_clock::time_point{10ms + 60s});

  auto second = wave(false);
  CHECK(p.calls == n);
  CHECK(b.rejected_count() == n);

  manual_clock::advance(60s);
  p.default_fault = fault::none;
  auto third = wave(true);  // one probe runs; 999 get the degraded answer
  CHECK(p.calls == n + 1);
  CHECK(std::count_if(third.begin(), third.end(),
                      [](const call_result& x) { return x.value && *x.value == -1; }) == n - 1);
  CHECK(b.state() == breaker_state::closed);

  auto fourth = wave(false);
  CHECK(p.calls == 2 * n + 1);
  CHECK(std::all_of(fourth.begin(), fourth.end(), [](const call_result& x) { return x.value; }));
  CHECK(b.rejected_count() == 2 * n - 1);
}

TEST_CASE("concurrent threads keep the breaker's counters consistent", "[breaker][threads]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::atomic<int> opens{0};
  // One failure opens it and a zero break makes the next call a probe: every transition happens
  // constantly. The breaker can only stay closed if no failure is ever recorded in its epoch, so
  // "it opened at least once" holds whatever the interleaving.
  auto policy = keel::breaker_policy::consecutive(1, 0s);
  policy.half_open_probes = 2;
  policy.on_state_change = [&](breaker_state, breaker_state to) {
    if (to == breaker_state::open) {
      ++opens;
    }
  };
  test_breaker b{ctx.get_executor(), policy};
  constexpr int threads = 4;
  constexpr int iterations = 20'000;
  std::atomic<std::uint64_t> rejected{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (int i = 0; i < iterations; ++i) {
        auto permit = b.try_acquire();
        if (!permit) {
          ++rejected;
        } else if ((i + t) % 3 == 0) {
          permit->record_failure(transient());
        } else if ((i + t) % 7 != 0) {
          permit->record_success(1ms);
        }  // else: dropped, recorded as cancelled
      }
    });
  }
  for (auto& th : pool) {
    th.join();
  }
  const auto c = b.counters();
  CHECK(c.admitted + c.rejected == static_cast<std::uint64_t>(threads * iterations));
  CHECK(c.admitted == c.succeeded + c.failed + c.cancelled);
  CHECK(c.rejected == rejected.load());
  CHECK(c.opened > 0);
  CHECK(c.opened == static_cast<std::uint64_t>(opens.load()));
}

TEST_CASE("a custom classifier decides which failures count", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(1, 60s);
  policy.classify = [](const std::exception_ptr&) {
    keel::classification c;
    c.condition = keel::condition::transient;
    return c;
  };
  test_breaker b{ctx.get_executor(), policy};
  auto op = []() -> asio::awaitable<int> {
    throw std::runtime_error("opaque SDK error");
    co_return 0;
  };
  std::exception_ptr error;
  asio::co_spawn(ctx, keel::with_breaker(b, op), [&](std::exception_ptr e, int) { error = e; });
  keel::testing::poll_all(ctx);
  REQUIRE(error);
  CHECK(keel::describe(error) == "opaque SDK error");
  CHECK(b.state() == breaker_state::open);
}

TEST_CASE("an inconsistent policy is rejected at construction", "[breaker]") {
  asio::io_context ctx;
  auto ex = ctx.get_executor();
  CHECK_THROWS_AS(test_breaker(ex, keel::breaker_policy::consecutive(0, 1s)),
                  std::invalid_argument);
  CHECK_THROWS_AS(test_breaker(ex, keel::breaker_policy::failure_ratio(0.0, 10, 10s, 1s)),
                  std::invalid_argument);
  CHECK_THROWS_AS(test_breaker(ex, keel::breaker_policy::failure_ratio(1.5, 10, 10s, 1s)),
                  std::invalid_argument);
  CHECK_THROWS_AS(test_breaker(ex, keel::breaker_policy::failure_ratio(0.5, 0, 10s, 1s)),
                  std::invalid_argument);
  auto p = keel::breaker_policy::consecutive();
  p.half_open_probes = 0;
  CHECK_THROWS_AS(test_breaker(ex, p), std::invalid_argument);
  p = keel::breaker_policy::consecutive();
  p.break_growth = 0.5;
  CHECK_THROWS_AS(test_breaker(ex, p), std::invalid_argument);
  const keel::breaker_policy defaults;
  CHECK(defaults.failure_threshold == 5);
  CHECK(defaults.break_duration == 60s);
  CHECK(defaults.half_open_probes == 1);
  CHECK(defaults.counts_as_failure ==
        keel::condition_set{keel::condition::transient, keel::condition::timeout});
  CHECK(keel::breaker_policy::consecutive(3, 1s).counts_as_failure == defaults.counts_as_failure);
  CHECK(keel::breaker_policy::failure_ratio(0.5, 10, 10s, 1s).counts_as_failure ==
        defaults.counts_as_failure);
  CHECK_NOTHROW(test_breaker(ex, defaults));
}

TEST_CASE("an unbounded break duration keeps the breaker open instead of overflowing",
          "[breaker][review]") {
  keel::testing::manual_clock::reset();
  boost::asio::io_context ctx;
  keel::basic_circuit_breaker<keel::testing::manual_clock> breaker{
      ctx.get_executor(), keel::breaker_policy::consecutive(1, std::chrono::nanoseconds::max())};
  auto permit = breaker.try_acquire();
  REQUIRE(permit);
  permit->record_failure(
      keel::classify(boost::system::error_code(boost::asio::error::connection_reset)));
  keel::testing::manual_clock::advance(std::chrono::hours(24 * 365));
  CHECK(breaker.state() == keel::breaker_state::open);
  CHECK_FALSE(breaker.try_acquire());
}

TEST_CASE("a cancelled call that reports another error does not count against the breaker",
          "[breaker][review]") {
  keel::testing::manual_clock::reset();
  boost::asio::io_context ctx;
  keel::basic_circuit_breaker<keel::testing::manual_clock> breaker{
      ctx.get_executor(), keel::breaker_policy::consecutive(1, std::chrono::seconds(60))};
  // Turns its cancellation into a reset, as some transports do.
  auto op = [&]() -> boost::asio::awaitable<int> {
    keel::basic_timer<keel::testing::manual_clock> t(co_await boost::asio::this_coro::executor,
                                                     std::chrono::seconds(10));
    try {
      co_await t.async_wait(boost::asio::use_awaitable);
    } catch (...) {
      throw boost::system::system_error(boost::asio::error::connection_reset);
    }
    co_return 1;
  };
  boost::asio::cancellation_signal sig;
  bool done = false;
  boost::asio::co_spawn(ctx, keel::with_breaker(breaker, op),
                        boost::asio::bind_cancellation_slot(
                            sig.slot(), [&](std::exception_ptr, int) { done = true; }));
  keel::testing::run_for(ctx, std::chrono::milliseconds(100));
  sig.emit(boost::asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return done; }));
  CHECK(breaker.state() == keel::breaker_state::closed);
  CHECK(breaker.counters().failed == 0);
  CHECK(breaker.counters().cancelled == 1);
}

TEST_CASE("force_open_until opens for a break decided elsewhere, moves it, and keeps isolation",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<std::pair<breaker_state, breaker_state>> changes;
  auto policy = keel::breaker_policy::consecutive(3, 10s);
  policy.on_state_change = [&](breaker_state f, breaker_state t) { changes.emplace_back(f, t); };
  test_breaker b{ctx.get_executor(), policy};
  fake_provider p;
  // A time already past leaves a closed breaker closed.
  b.force_open_until(manual_clock::now());
  CHECK(b.state() == breaker_state::closed);
  CHECK(changes.empty());
  // Closed -> open until the given time (not its own 10 s): rejected, nothing runs.
  b.force_open_until(manual_clock::now() + 2s);
  CHECK(b.state() == breaker_state::open);
  CHECK(b.remaining_open_time() == 2s);
  CHECK(b.opened_count() == 0);  // not one of its own openings
  CHECK(code_of(call(ctx, b, p).error) == keel::error::circuit_open);
  CHECK(p.calls == 0);
  // Moved later, then earlier: the end is where it was last put.
  b.force_open_until(manual_clock::now() + 5s);
  CHECK(b.remaining_open_time() == 5s);
  b.force_open_until(manual_clock::now() + 1s);
  CHECK(b.remaining_open_time() == 1s);
  // A break over is extended without a half-open in between (no state change).
  manual_clock::advance(1s);
  CHECK(b.state() == breaker_state::half_open);  // as reported, lazily
  b.force_open_until(manual_clock::now() + 1s);
  CHECK(b.state() == breaker_state::open);
  CHECK(changes.size() == 1);
  // Moved to now: the next call is the half-open probe, and its success closes.
  b.force_open_until(manual_clock::now());
  CHECK(b.state() == breaker_state::half_open);
  CHECK(call(ctx, b, p).value);
  CHECK(p.calls == 1);
  CHECK(b.state() == breaker_state::closed);
  REQUIRE(changes.size() == 3);
  CHECK(changes[0] == std::pair{breaker_state::closed, breaker_state::open});
  CHECK(changes[1] == std::pair{breaker_state::open, breaker_state::half_open});
  CHECK(changes[2] == std::pair{breaker_state::half_open, breaker_state::closed});
  // Isolation is kept.
  b.isolate();
  b.force_open_until(manual_clock::now() + 1s);
  CHECK(b.state() == breaker_state::isolated);
  manual_clock::advance(2s);
  CHECK(b.state() == breaker_state::isolated);
}

TEST_CASE("a call admitted before the breaker opened does not send after waiting to", "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_breaker b{ctx.get_executor(), keel::breaker_policy::consecutive(3, 10s)};
  fake_provider p;
  p.default_fault = fault::transient;
  // Six calls admitted at once, each held back (as by a rate limiter's queue) for 100 ms more
  // than the one before, then asking the breaker again just before they send.
  std::vector<call_result> results(6);
  for (int i = 0; i < 6; ++i) {
    auto op = [&p, i](test_breaker::permit& permit) -> asio::awaitable<int> {
      keel::basic_timer<manual_clock> t{co_await asio::this_coro::executor};
      t.expires_after(100ms * (i + 1));
      co_await t.async_wait(asio::use_awaitable);
      permit.ensure_admitted();
      co_return co_await p.call();
    };
    spawn_call(ctx, keel::with_breaker(b, op), results[static_cast<std::size_t>(i)]);
  }
  REQUIRE(keel::testing::run_until(ctx, [&] {
    return std::all_of(results.begin(), results.end(), [](auto& r) { return r.done; });
  }));
  // The first three sent and failed; the third opened the breaker at 300 ms.
  CHECK(p.calls == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(code_of(results[static_cast<std::size_t>(i)].error) == asio::error::connection_reset);
  }
  // The other three never sent: circuit_open with the break that is left when each asked.
  for (int i = 3; i < 6; ++i) {
    const auto f = failure_of(results[static_cast<std::size_t>(i)].error);
    REQUIRE(f);
    CHECK(f->code() == keel::error::circuit_open);
    REQUIRE(f->retry_after());
    CHECK(*f->retry_after() == 10s - 100ms * (i - 2));
    CHECK(std::string(f->what()).find("while the call waited") != std::string::npos);
  }
  const auto c = b.counters();
  CHECK(c.failed == 3);
  CHECK(c.cancelled == 3);  // never ran: neither success nor failure
  CHECK(c.opened == 1);
  CHECK(b.state() == breaker_state::open);
}

TEST_CASE("a permit stays admitted while its phase lasts or once the breaker is closed again",
          "[breaker]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = keel::breaker_policy::consecutive(1, 1s);
  policy.half_open_probes = 2;
  test_breaker b{ctx.get_executor(), policy};
  auto closed_phase = b.try_acquire();
  REQUIRE(closed_phase);
  CHECK(closed_phase->still_admitted());
  fail_once(b);  // opens
  CHECK_FALSE(closed_phase->still_admitted());
  CHECK_THROWS_AS(closed_phase->ensure_admitted(), keel::failure);
  CHECK_FALSE(closed_phase->pending());  // recorded as cancelled
  CHECK_FALSE(closed_phase->still_admitted());

  manual_clock::advance(1s);
  auto probe1 = b.try_acquire();
  auto probe2 = b.try_acquire();
  REQUIRE(probe1);
  REQUIRE(probe2);
  CHECK(probe1->still_admitted());
  CHECK_NOTHROW(probe1->ensure_admitted());
  CHECK_FALSE(b.try_acquire());                  // both probe slots taken
  b.force_open_until(manual_clock::now() + 1s);  // e.g. the fleet's word: a new phase
  CHECK_FALSE(probe2->still_admitted());
  CHECK_THROWS_AS(probe2->ensure_admitted(), keel::failure);
  manual_clock::advance(1s);
  auto probe3 = b.try_acquire();
  REQUIRE(probe3);
  CHECK_FALSE(probe1->still_admitted());  // its half-open phase is over
  auto probe4 = b.try_acquire();
  REQUIRE(probe4);
  auto late = b.try_acquire();
  CHECK_FALSE(late);  // two probe slots, both taken
  probe3->record_success();
  probe4->record_success();
  CHECK(b.state() == breaker_state::closed);
  // Closed again: the earlier probe may go out after all; an outcome recorded ends it.
  CHECK(probe1->still_admitted());
  probe1->record_success();
  CHECK_FALSE(probe1->still_admitted());
}
