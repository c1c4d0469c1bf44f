// Tests for keel/fallback.hpp: order, predicates, skipping, deadlines, every cause kept.
#include <keel/deadline.hpp>
#include <keel/fallback.hpp>
#include <keel/retry.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;

namespace {
const boost::system::error_code reset = asio::error::connection_reset;
const boost::system::error_code throttled = keel::error::throttled;
const boost::system::error_code too_long = make_error_code(boost::system::errc::message_size);
}  // namespace

TEST_CASE("with_fallback returns the first alternative that succeeds", "[fallback]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted a{{step{reset}}}, b{{step{throttled}}}, c;
  c.value = 3;
  std::vector<keel::fallback_event> events;
  keel::fallback_policy policy;
  policy.on_fallback = [&](const keel::fallback_event& e) { events.push_back(e); };
  outcome<int> out;
  spawn(ctx,
        keel::with_fallback<int, manual_clock>(
            keel::alternatives(a.factory(), b.factory(), c.factory()), policy),
        out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 3);
  CHECK(a.started_ms.size() == 1);
  CHECK(b.started_ms.size() == 1);
  REQUIRE(events.size() == 2);
  CHECK(events[0].from == 0);
  CHECK(events[0].to == 1);
  CHECK(events[0].classification.condition == keel::condition::transient);
  CHECK(events[1].from == 1);
  CHECK(events[1].to == 2);
}

TEST_CASE("when every alternative fails the error carries every cause in order", "[fallback]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted a{{step{reset}}}, b{{step{throttled}}};
  outcome<int> out;
  spawn(ctx, keel::with_fallback(keel::alternatives(a.factory(), b.factory())), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == keel::error::all_fallbacks_failed);
  try {
    std::rethrow_exception(out.error);
  } catch (const keel::failure& f) {
    REQUIRE(f.causes().size() == 2);
    CHECK(keel::classify(f.causes()[0]).code == reset);
    CHECK(keel::classify(f.causes()[1]).code == throttled);
  }
}

TEST_CASE("a failure outside fallback_on is rethrown without trying the rest", "[fallback]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted a{{step{make_error_code(boost::system::errc::permission_denied)}}}, b;
  keel::fallback_policy policy;
  policy.fallback_on = keel::condition_set::retryable();  // permanent errors do not move on
  outcome<int> out;
  spawn(ctx, keel::with_fallback(keel::alternatives(a.factory(), b.factory()), policy), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == boost::system::errc::permission_denied);
  CHECK(b.started_ms.empty());
}

TEST_CASE("should_try sends a context-too-long error straight to the larger model", "[fallback]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted small{{step{too_long}}}, same_size, large;
  large.value = 100;
  keel::fallback_policy policy;
  policy.should_try = [](const std::exception_ptr&, const keel::classification& c, std::size_t,
                         std::size_t candidate) {
    return c.code != boost::system::errc::message_size || candidate == 2;  // 2 = large context
  };
  outcome<int> out;
  spawn(ctx,
        keel::with_fallback(
            keel::alternatives(small.factory(), same_size.factory(), large.factory()), policy),
        out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 100);
  CHECK(same_size.started_ms.empty());
}

TEST_CASE("cancellation is never a reason to fall back", "[fallback]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted a{{step{{}, {}, 10s}}}, b;
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::with_fallback(keel::alternatives(a.factory(), b.factory())), out, sig.slot());
  keel::testing::run_for(ctx, 100ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == keel::condition::cancelled);
  CHECK(b.started_ms.empty());
}

TEST_CASE("alternatives inherit the remaining deadline", "[fallback][deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted a{{step{reset, {}, 600ms}}}, b{{step{{}, {}, 5s}}};
  std::optional<manual_clock::duration> left_for_b;
  auto b_probe = [&]() -> asio::awaitable<int> {
    left_for_b = co_await keel::remaining_time<manual_clock>();
    co_return co_await b.run();
  };
  outcome<int> out;
  spawn(
      ctx,
      keel::with_deadline<manual_clock>(
          [&] {
            return keel::with_fallback<int, manual_clock>(keel::alternatives(a.factory(), b_probe));
          },
          1s),
      out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  REQUIRE(left_for_b);
  CHECK(*left_for_b == 400ms);
  CHECK(out.finished_at_ms == 1000);
  CHECK(out.code() == keel::error::deadline_exceeded);
}

TEST_CASE("each alternative can be a whole retry stack", "[fallback][retry]") {
  manual_clock::reset();
  asio::io_context ctx;
  scripted primary{std::vector<step>(3, step{throttled})}, secondary;
  secondary.value = 7;
  auto policy = keel::retry_policy::with_backoff(3, keel::backoff::constant(100ms));
  outcome<int> out;
  spawn(ctx,
        keel::with_fallback(keel::alternatives(
            [&] { return keel::with_retry<manual_clock>(primary.factory(), policy); },
            secondary.factory())),
        out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.value == 7);
  CHECK(primary.started_ms == std::vector<long long>{0, 100, 200});
  CHECK(secondary.started_ms == std::vector<long long>{200});
}
