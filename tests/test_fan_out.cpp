// Tests for keel/fan_out.hpp: order, bounded concurrency, failures kept, cancellation reported.
#include <keel/classify.hpp>
#include <keel/fan_out.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <numeric>

using namespace keel_test;

TEST_CASE("fan_out keeps input order and loses nothing when half the items fail", "[fan_out]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<int> items(1000);
  std::iota(items.begin(), items.end(), 0);
  int in_flight = 0, peak = 0, calls = 0;
  auto fn = [&](int i) -> asio::awaitable<int> {
    ++calls;
    peak = std::max(peak, ++in_flight);
    co_await sleep_for(std::chrono::milliseconds(1 + (i * 7) % 13));  // finish out of order
    --in_flight;
    if (i % 2 == 1) {
      throw keel::failure(keel::error::throttled, "odd item " + std::to_string(i));
    }
    co_return i * 10;
  };
  outcome<std::vector<keel::result<int, std::exception_ptr>>> out;
  spawn(ctx, keel::fan_out(items, 16, fn), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  REQUIRE_FALSE(out.error);
  const auto& results = *out.value;
  REQUIRE(results.size() == 1000);
  CHECK(calls == 1000);
  CHECK(peak == 16);
  for (int i = 0; i < 1000; ++i) {
    if (i % 2 == 0) {
      REQUIRE(results[i].has_value());
      CHECK(*results[i] == i * 10);
    } else {
      REQUIRE(results[i].has_error());
      CHECK(keel::describe(results[i].error()) == "odd item " + std::to_string(i));
    }
  }
}

TEST_CASE("cancelling a fan_out cancels in-flight items and reports the rest", "[fan_out]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<int> items(10);
  std::iota(items.begin(), items.end(), 0);
  int started = 0;
  auto fn = [&](int) -> asio::awaitable<int> {
    ++started;
    co_await sleep_for(100ms);
    co_return 1;
  };
  outcome<std::vector<keel::result<int, std::exception_ptr>>> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::fan_out(items, 3, fn), out, sig.slot());
  keel::testing::run_for(ctx, 150ms);  // items 0-2 done, 3-5 in flight
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  REQUIRE(out.value);
  const auto& r = *out.value;
  REQUIRE(r.size() == 10);
  CHECK(started == 6);
  for (int i = 0; i < 3; ++i) {
    CHECK(r[i].has_value());
  }
  for (int i = 3; i < 10; ++i) {
    REQUIRE(r[i].has_error());
    CHECK(keel::classify(r[i].error()).condition == keel::condition::cancelled);
  }
  CHECK(out.finished_at_ms == 150);
}

TEST_CASE("fan_out over an empty range returns an empty vector, and rejects zero concurrency",
          "[fan_out]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<int> none;
  auto fn = [](int) -> asio::awaitable<int> { co_return 1; };
  outcome<std::vector<keel::result<int, std::exception_ptr>>> empty, zero;
  spawn(ctx, keel::fan_out(none, 4, fn), empty);
  std::vector<int> one{1};
  spawn(ctx, keel::fan_out(one, 0, fn), zero);
  REQUIRE(keel::testing::run_until(ctx, [&] { return empty.done && zero.done; }));
  REQUIRE(empty.value);
  CHECK(empty.value->empty());
  CHECK(zero.error);
}

TEST_CASE("fan_out runs void functions", "[fan_out]") {
  manual_clock::reset();
  asio::io_context ctx;
  std::vector<int> items{1, 2, 3};
  int sum = 0;
  auto fn = [&](int i) -> asio::awaitable<void> {
    sum += i;
    co_return;
  };
  outcome<std::vector<keel::result<void, std::exception_ptr>>> out;
  spawn(ctx, keel::fan_out(items, 2, fn), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  REQUIRE(out.value);
  CHECK(out.value->size() == 3);
  CHECK((*out.value)[2].has_value());
  CHECK(sum == 6);
}
