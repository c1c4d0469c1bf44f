// Tests for keel/testing/manual_clock.hpp and keel/clock.hpp: virtual time drives stock timers.
#include <keel/clock.hpp>
#include <keel/testing/manual_clock.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;

TEST_CASE("the manual clock only moves when advanced", "[clock]") {
  manual_clock::reset();
  CHECK(manual_clock::now().time_since_epoch() == 0ns);
  manual_clock::advance(1500ms);
  CHECK(manual_clock::now().time_since_epoch() == 1500ms);
  manual_clock::advance(-5s);  // steady: never goes back
  CHECK(manual_clock::now().time_since_epoch() == 1500ms);
  static_assert(manual_clock::is_steady);
}

TEST_CASE("timers on the manual clock fire at exact virtual instants", "[clock]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<long long> fired;
  for (auto d : {300ms, 100ms, 200ms}) {
    auto t = std::make_shared<keel::basic_timer<manual_clock>>(ctx, d);
    t->async_wait([t, &fired](boost::system::error_code ec) {
      if (!ec) {
        fired.push_back(now_ms());
      }
    });
  }
  keel::testing::run_for(ctx, 250ms);
  CHECK(fired == std::vector<long long>{100, 200});
  keel::testing::run_for(ctx, 1s);
  CHECK(fired == std::vector<long long>{100, 200, 300});
}

TEST_CASE("run_until stops at the predicate or at the limit", "[clock]") {
  manual_clock::reset();
  asio::io_context ctx;
  bool never = false;
  CHECK_FALSE(keel::testing::run_until(
      ctx, [&] { return never; }, 2s, 100ms));
  CHECK(now_ms() == 2000);
  CHECK(keel::testing::run_until(
      ctx, [&] { return now_ms() >= 2500; }, 1s, 100ms));
  CHECK(now_ms() == 2500);
}
