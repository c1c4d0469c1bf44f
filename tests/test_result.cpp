// Tests for keel/result.hpp: try_await and try_await_ptr turn exceptions into values.
#include <keel/result.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;

TEST_CASE("try_await returns the value or the error code", "[result]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto ok = []() -> asio::awaitable<int> { co_return 5; };
  auto bad = []() -> asio::awaitable<int> {
    throw keel::failure(keel::error::circuit_open, "open");
    co_return 0;
  };
  outcome<keel::result<int>> a, b;
  spawn(ctx, keel::try_await(ok()), a);
  spawn(ctx, keel::try_await(bad()), b);
  REQUIRE(keel::testing::run_until(ctx, [&] { return a.done && b.done; }));
  REQUIRE(a.value);
  REQUIRE(a.value->has_value());
  CHECK(**a.value == 5);
  REQUIRE(b.value);
  REQUIRE(b.value->has_error());
  CHECK(b.value->error() == keel::error::circuit_open);
  CHECK(b.value->error() == keel::condition::throttled);
}

TEST_CASE("try_await rethrows exceptions that have no error code", "[result]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto odd = []() -> asio::awaitable<void> {
    throw std::logic_error("bug");
    co_return;
  };
  outcome<keel::result<void>> out;
  spawn(ctx, keel::try_await(odd()), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.error);
  CHECK(keel::describe(out.error) == "bug");
}

TEST_CASE("try_await_ptr keeps the whole exception", "[result]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto odd = []() -> asio::awaitable<int> {
    throw std::logic_error("details matter");
    co_return 1;
  };
  outcome<keel::result<int, std::exception_ptr>> out;
  spawn(ctx, keel::try_await_ptr(odd()), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  REQUIRE(out.value);
  REQUIRE(out.value->has_error());
  CHECK(keel::describe(out.value->error()) == "details matter");
}
