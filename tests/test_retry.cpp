// Tests for keel/retry.hpp: attempts, backoff instants, hints, deadlines, budget, cancellation.
#include <keel/deadline.hpp>
#include <keel/retry.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <memory>
#include <stdexcept>

using namespace keel_test;

namespace {

const boost::system::error_code reset = asio::error::connection_reset;  // transient
const boost::system::error_code throttled = keel::error::throttled;     // throttled
const boost::system::error_code bad_request =
    make_error_code(boost::system::errc::invalid_argument);  // permanent

keel::retry_policy constant_policy(int attempts, std::chrono::nanoseconds d) {
  return keel::retry_policy::with_backoff(attempts, keel::backoff::constant(d));
}

}  // namespace

TEST_CASE("with_retry retries transient failures at the backoff's instants", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{reset}, step{reset}}};
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), constant_policy(5, 100ms)), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 100, 200});
}

TEST_CASE("with_retry gives up after max_attempts with the last error as cause", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{reset}, step{reset}, step{throttled}, step{}}};
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), constant_policy(3, 10ms)), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(op.started_ms.size() == 3);
  CHECK(out.code() == keel::error::retries_exhausted);
  try {
    std::rethrow_exception(out.error);
  } catch (const keel::failure& f) {
    CHECK(f.attempts() == 3);
    REQUIRE(f.causes().size() == 1);
    CHECK(keel::classify(f.causes()[0]).code == keel::error::throttled);
  }
  CHECK(keel::classify(out.error).condition == keel::condition::throttled);
}

TEST_CASE("with_retry does not retry a permanent failure and rethrows it unchanged", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{bad_request}}};
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), constant_policy(5, 10ms)), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(op.started_ms.size() == 1);
  CHECK(out.code() == boost::system::errc::invalid_argument);
}

TEST_CASE("Retry-After overrides the computed backoff and is clamped", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{throttled, std::chrono::nanoseconds(2s)},
               step{throttled, std::chrono::nanoseconds(300s)}}};
  auto policy = constant_policy(5, 100ms);
  policy.max_retry_after = 30s;
  std::vector<keel::retry_event> events;
  policy.on_retry = [&](const keel::retry_event& e) { events.push_back(e); };
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(
      ctx, [&] { return out.done; }, 1h, 100ms));
  CHECK(out.value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 2000, 32000});
  REQUIRE(events.size() == 2);
  CHECK(events[0].from_server_hint);
  CHECK(events[0].delay == 2s);
  CHECK(events[1].delay == 30s);
}

TEST_CASE("on_retry receives attempt number, error, condition and the chosen delay", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{reset}, step{throttled}}};
  std::vector<keel::retry_event> events;
  auto policy = constant_policy(5, 250ms);
  policy.on_retry = [&](const keel::retry_event& e) { events.push_back(e); };
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  REQUIRE(events.size() == 2);
  CHECK(events[0].attempt == 1);
  CHECK(events[0].classification.condition == keel::condition::transient);
  CHECK(events[0].delay == 250ms);
  CHECK_FALSE(events[0].from_server_hint);
  CHECK(keel::classify(events[0].error).code == reset);
  CHECK(events[1].attempt == 2);
  CHECK(events[1].classification.condition == keel::condition::throttled);
}

TEST_CASE("a hint that would end after the deadline fails fast with the original error",
          "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{throttled, std::chrono::nanoseconds(5s)}}};
  auto policy = constant_policy(5, 100ms);
  policy.timeout = 2s;
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 0);  // no sleep at all
  CHECK(out.code() == keel::error::throttled);
  CHECK(op.started_ms.size() == 1);
}

TEST_CASE("the retry deadline is absolute from the first attempt: no sleep ends past it",
          "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  // Each attempt takes 300 ms and fails; backoff 200 ms; timeout 1.5 s from the first attempt.
  scripted op{std::vector<step>(10, step{reset, {}, 300ms})};
  auto policy = constant_policy(10, 200ms);
  policy.timeout = 1500ms;
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  // Attempts at 0, 500, 1000; after the third fails at 1300 a 200 ms sleep would end at 1500.
  CHECK(op.started_ms == std::vector<long long>{0, 500, 1000});
  CHECK(out.finished_at_ms == 1300);
  CHECK(out.code() == asio::error::connection_reset);
}

TEST_CASE("an enclosing with_deadline stops the retry loop before a sleep it cannot finish",
          "[retry][deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{std::vector<step>(10, step{reset})};
  outcome<int> out;
  spawn(
      ctx,
      keel::with_deadline<manual_clock>(
          [&] { return keel::with_retry<manual_clock>(op.factory(), constant_policy(10, 400ms)); },
          1s),
      out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(op.started_ms == std::vector<long long>{0, 400, 800});
  CHECK(out.finished_at_ms == 800);
  CHECK(out.code() == asio::error::connection_reset);  // the real error, not a timeout
}

TEST_CASE("a per-attempt deadline inside with_retry is retried as a timeout", "[retry][deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{{}, {}, 5s}, step{{}, {}, 5s}, step{{}, {}, 100ms}}};
  outcome<int> out;
  spawn(ctx,
        keel::with_retry<manual_clock>(
            [&] { return keel::with_deadline<manual_clock>(op.factory(), 1s); },
            constant_policy(5, 50ms)),
        out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 1050, 2100});
  CHECK(op.ended_ms == std::vector<long long>{2200});  // timed-out attempts never resumed
}

TEST_CASE("cancellation during a backoff sleep ends the call at once", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{std::vector<step>(5, step{reset})};
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), constant_policy(5, 10s)), out,
        sig.slot());
  keel::testing::run_for(ctx, 1234ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 1234);
  CHECK(out.code() == asio::error::operation_aborted);
  CHECK(op.started_ms.size() == 1);
}

TEST_CASE("cancellation of an attempt is never retried", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{std::vector<step>(5, step{{}, {}, 1s})};
  keel::retry_budget budget{10, 0.1};
  auto policy = constant_policy(5, 10ms);
  policy.budget = &budget;
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out, sig.slot());
  keel::testing::run_for(ctx, 500ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == keel::condition::cancelled);
  CHECK(op.started_ms.size() == 1);
  CHECK(budget.tokens() == 10);  // cancellation does not count against the budget
}

TEST_CASE("a shared budget stops retries when exhausted and refills on success", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::retry_budget budget{4, 0.5};  // retries allowed while tokens > 2
  auto policy = constant_policy(10, 10ms);
  policy.budget = &budget;

  scripted first{std::vector<step>(10, step{reset})};
  outcome<int> a;
  spawn(ctx, keel::with_retry<manual_clock>(first.factory(), policy), a);
  REQUIRE(keel::testing::run_until(ctx, [&] { return a.done; }));
  // 4 -> 3 (retry allowed) -> 2 (refused).
  CHECK(first.started_ms.size() == 2);
  CHECK(a.code() == keel::error::budget_exhausted);
  CHECK(keel::classify(a.error).condition == keel::condition::transient);
  CHECK(budget.denied() == 1);

  scripted second{std::vector<step>(10, step{reset})};
  outcome<int> b;
  spawn(ctx, keel::with_retry<manual_clock>(second.factory(), policy), b);
  REQUIRE(keel::testing::run_until(ctx, [&] { return b.done; }));
  CHECK(second.started_ms.size() == 1);  // no retry at all while the budget is low
  CHECK(budget.tokens() == 1);

  // Successes refill it: 1 + 4 * 0.5 = 3 > 2, so retries are allowed again.
  for (int i = 0; i < 4; ++i) {
    scripted ok;
    outcome<int> o;
    spawn(ctx, keel::with_retry<manual_clock>(ok.factory(), policy), o);
    REQUIRE(keel::testing::run_until(ctx, [&] { return o.done; }));
  }
  CHECK(budget.tokens() == 3);
  CHECK(budget.can_retry());
}

TEST_CASE("an exhausted budget still lets a throttled failure retry but refuses a transient one",
          "[retry][budget]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::retry_budget budget{4, 0.5};  // retries allowed while tokens > 2
  budget.on_failure();
  budget.on_failure();
  REQUIRE(budget.tokens() == 2);
  REQUIRE_FALSE(budget.can_retry());
  auto policy = constant_policy(5, 10ms);  // charge_budget_on left at its default
  policy.budget = &budget;

  // 429s: retried at the backoff's instants as if there were no budget, and not charged.
  scripted throttled_op{{step{throttled}, step{throttled}, step{throttled}}};
  outcome<int> a;
  spawn(ctx, keel::with_retry<manual_clock>(throttled_op.factory(), policy), a);
  REQUIRE(keel::testing::run_until(ctx, [&] { return a.done; }));
  CHECK(a.value == 42);
  CHECK(throttled_op.started_ms == std::vector<long long>{0, 10, 20, 30});
  CHECK(budget.denied() == 0);
  CHECK(budget.tokens() == Approx(2.5));  // untouched by the 429s; +0.5 for the success

  // Attempts still bound them: five 429s in a row give retries_exhausted, never budget_exhausted.
  scripted always_throttled{std::vector<step>(10, step{throttled})};
  outcome<int> b;
  spawn(ctx, keel::with_retry<manual_clock>(always_throttled.factory(), policy), b);
  REQUIRE(keel::testing::run_until(ctx, [&] { return b.done; }));
  CHECK(always_throttled.started_ms.size() == 5);
  CHECK(b.code() == keel::error::retries_exhausted);
  CHECK(budget.tokens() == Approx(2.5));

  // A transient failure is charged (2.5 -> 1.5) and refused at once.
  scripted transient_op{{step{reset}, step{}}};
  outcome<int> c;
  spawn(ctx, keel::with_retry<manual_clock>(transient_op.factory(), policy), c);
  REQUIRE(keel::testing::run_until(ctx, [&] { return c.done; }));
  CHECK(transient_op.started_ms.size() == 1);
  CHECK(c.code() == keel::error::budget_exhausted);
  CHECK(keel::classify(c.error).condition == keel::condition::transient);
  CHECK(budget.denied() == 1);
  CHECK(budget.tokens() == Approx(1.5));
}

TEST_CASE("a retry the budget refuses is sent anyway while exempt_from_budget says so",
          "[retry][budget]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::retry_budget budget{4, 0.5};  // retries allowed while tokens > 2
  budget.on_failure();
  budget.on_failure();
  REQUIRE_FALSE(budget.can_retry());
  auto policy = constant_policy(4, 10ms);
  policy.budget = &budget;
  bool exempt = true;  // e.g. "the breaker is open: it will hold the retry"
  std::vector<keel::condition> asked;
  policy.exempt_from_budget = [&](const std::exception_ptr& e, const keel::classification& c) {
    CHECK(e);
    asked.push_back(c.condition);
    return exempt;
  };

  // Exempt: retried at the backoff's instants, every failure still charged, every refusal counted.
  scripted exempted{{step{reset}, step{reset}, step{}}};
  outcome<int> a;
  spawn(ctx, keel::with_retry<manual_clock>(exempted.factory(), policy), a);
  REQUIRE(keel::testing::run_until(ctx, [&] { return a.done; }));
  CHECK(a.value == 42);
  CHECK(exempted.started_ms == std::vector<long long>{0, 10, 20});
  CHECK(asked ==
        std::vector<keel::condition>{keel::condition::transient, keel::condition::transient});
  CHECK(budget.denied() == 2);
  CHECK(budget.tokens() == Approx(0.5));  // 2 - 1 - 1 + 0.5 for the success

  // Attempts still bound an exempt call.
  scripted always_failing{std::vector<step>(10, step{reset})};
  outcome<int> b;
  spawn(ctx, keel::with_retry<manual_clock>(always_failing.factory(), policy), b);
  REQUIRE(keel::testing::run_until(ctx, [&] { return b.done; }));
  CHECK(always_failing.started_ms.size() == 4);
  CHECK(b.code() == keel::error::retries_exhausted);

  // Not exempt: refused at once, as without the hook.
  exempt = false;
  scripted refused{{step{reset}, step{}}};
  outcome<int> c;
  spawn(ctx, keel::with_retry<manual_clock>(refused.factory(), policy), c);
  REQUIRE(keel::testing::run_until(ctx, [&] { return c.done; }));
  CHECK(refused.started_ms.size() == 1);
  CHECK(c.code() == keel::error::budget_exhausted);
}

TEST_CASE("transient and timeout failures draw on the budget by default, throttled ones do not",
          "[retry][budget]") {
  const keel::retry_policy defaults;
  CHECK(defaults.charge_budget_on ==
        keel::condition_set{keel::condition::transient, keel::condition::timeout});
  CHECK(keel::retry_policy::exponential_full_jitter(3, 1s, 10s).charge_budget_on ==
        defaults.charge_budget_on);
  CHECK(keel::retry_policy::immediate(3).charge_budget_on == defaults.charge_budget_on);

  // A timeout is charged like a transient failure: one timeout takes a full budget{2} to its half.
  manual_clock::reset();
  asio::io_context ctx;
  keel::retry_budget budget{2, 0.1};
  auto policy = constant_policy(5, 10ms);
  policy.budget = &budget;
  scripted op{{step{keel::error::deadline_exceeded}, step{}}};
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(op.started_ms.size() == 1);
  CHECK(out.code() == keel::error::budget_exhausted);
  CHECK(keel::classify(out.error).condition == keel::condition::timeout);
}

TEST_CASE("a policy that lists throttled in charge_budget_on refuses 429s on an exhausted budget",
          "[retry][budget]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::retry_budget budget{4, 0.5};
  auto policy = constant_policy(10, 10ms);
  policy.budget = &budget;
  policy.charge_budget_on.insert(keel::condition::throttled);
  scripted op{std::vector<step>(10, step{throttled})};
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  // 4 -> 3 (retry allowed) -> 2 (refused), as for transient failures.
  CHECK(op.started_ms.size() == 2);
  CHECK(out.code() == keel::error::budget_exhausted);
  CHECK(keel::classify(out.error).condition == keel::condition::throttled);
}

TEST_CASE("retry_if narrows which failures are retried", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{reset}, step{throttled}}};
  auto policy = constant_policy(5, 10ms);
  policy.retry_if = [](const std::exception_ptr&, const keel::classification& c) {
    return c.condition != keel::condition::throttled;
  };
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(op.started_ms.size() == 2);
  CHECK(out.code() == keel::error::throttled);
}

TEST_CASE("a rejected result is retried and the last one is returned when attempts run out",
          "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  int calls = 0;
  auto op = [&]() -> asio::awaitable<int> { co_return ++calls; };
  outcome<int> until_three, never_good;
  spawn(ctx,
        keel::with_retry<manual_clock>(op, constant_policy(5, 10ms),
                                       [](const int& v) { return v < 3; }),
        until_three);
  REQUIRE(keel::testing::run_until(ctx, [&] { return until_three.done; }));
  CHECK(until_three.value == 3);
  calls = 0;
  spawn(
      ctx,
      keel::with_retry<manual_clock>(op, constant_policy(4, 10ms), [](const int&) { return true; }),
      never_good);
  REQUIRE(keel::testing::run_until(ctx, [&] { return never_good.done; }));
  CHECK(never_good.value == 4);
  CHECK_FALSE(never_good.error);
}

TEST_CASE("full-jitter retries spread out and are reproducible with a seed", "[retry]") {
  auto run_with_seed = [](std::uint64_t seed) {
    manual_clock::reset();
    asio::io_context ctx;
    keel::random_source rng{seed};
    scripted op{std::vector<step>(4, step{reset})};
    auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
    policy.random = &rng;
    outcome<int> out;
    spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
    keel::testing::run_until(ctx, [&] { return out.done; });
    return op.started_ms;
  };
  const auto a = run_with_seed(1), b = run_with_seed(1), c = run_with_seed(2);
  CHECK(a == b);
  CHECK(a != c);
  REQUIRE(a.size() == 5);
  for (std::size_t k = 1; k < a.size(); ++k) {
    const long long gap = a[k] - a[k - 1];
    CHECK(gap >= 0);
    CHECK(gap <= 1000LL << (k - 1));
  }
}

TEST_CASE("with_retry works for operations returning void", "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  int calls = 0;
  auto op = [&]() -> asio::awaitable<void> {
    if (++calls < 3) {
      throw boost::system::system_error(asio::error::connection_reset);
    }
    co_return;
  };
  outcome<void> out;
  spawn(ctx, keel::with_retry<manual_clock>(op, constant_policy(5, 10ms)), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK_FALSE(out.error);
  CHECK(calls == 3);
  CHECK(out.finished_at_ms == 20);
}

TEST_CASE("a cancelled attempt that reports another error is still not retried or charged",
          "[retry][review]") {
  manual_clock::reset();
  asio::io_context ctx;
  int calls = 0;
  // An attempt that turns its cancellation into a reset, as some transports do.
  auto op = [&]() -> asio::awaitable<int> {
    ++calls;
    try {
      co_await sleep_for(1s);
    } catch (...) {
      throw boost::system::system_error(asio::error::connection_reset);
    }
    co_return 1;
  };
  keel::retry_budget budget{10, 0.1};
  auto policy = constant_policy(5, 10ms);
  policy.budget = &budget;
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::with_retry<manual_clock>(op, policy), out, sig.slot());
  keel::testing::run_for(ctx, 500ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == asio::error::operation_aborted);
  CHECK(calls == 1);
  CHECK(budget.tokens() == 10);
}

TEST_CASE("a rejected result obeys retry_on like a transient failure", "[retry][review]") {
  manual_clock::reset();
  asio::io_context ctx;
  int calls = 0;
  auto op = [&]() -> asio::awaitable<int> { co_return ++calls; };
  auto policy = constant_policy(5, 10ms);
  policy.retry_on.erase(keel::condition::transient);
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op, policy, [](const int&) { return true; }), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 1);
  CHECK(calls == 1);
}

TEST_CASE("an unbounded retry timeout does not overflow", "[retry][review]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted op{{step{reset}, step{reset}}};
  auto policy = constant_policy(5, 100ms);
  policy.timeout = std::chrono::nanoseconds::max();
  outcome<int> out;
  spawn(ctx, keel::with_retry<manual_clock>(op.factory(), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 100, 200});
}

TEST_CASE("a shared policy drives concurrent calls like a copied one and outlives its owner",
          "[retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto policy = std::make_shared<const keel::retry_policy>(constant_policy(3, 100ms));
  scripted a{{step{reset}, step{reset}}};
  scripted b{{step{reset}, step{reset}, step{reset}}};
  outcome<int> out_a, out_b;
  spawn(ctx, keel::with_retry<manual_clock>(a.factory(), policy), out_a);
  spawn(ctx, keel::with_retry<manual_clock>(b.factory(), policy), out_b);
  const std::weak_ptr<const keel::retry_policy> watch = policy;
  policy.reset();  // the calls keep it alive
  keel::testing::run_for(ctx, 50ms);
  CHECK_FALSE(watch.expired());
  REQUIRE(keel::testing::run_until(ctx, [&] { return out_a.done && out_b.done; }));
  CHECK(out_a.value == 42);
  CHECK(a.started_ms == std::vector<long long>{0, 100, 200});
  CHECK(out_b.code() == keel::error::retries_exhausted);
  CHECK(b.started_ms == std::vector<long long>{0, 100, 200});
  CHECK(watch.expired());
}

TEST_CASE("with_retry refuses a null shared policy before running anything", "[retry]") {
  asio::io_context ctx;
  scripted op;
  std::shared_ptr<const keel::retry_policy> none;
  CHECK_THROWS_AS(keel::with_retry<manual_clock>(op.factory(), none), std::invalid_argument);
  CHECK(op.started_ms.empty());
}
