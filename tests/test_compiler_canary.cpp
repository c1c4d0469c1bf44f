// Canaries for coroutine miscompilation: count constructions and destructions of values captured
// by factories and held by policies in the same full-expression as co_await (g++ 12.2 destroys
// some of these twice; see README "Compilers").
#include <keel/deadline.hpp>
#include <keel/retry.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;

namespace {

struct counted {
  static inline int alive = 0;
  static inline int destroyed = 0;
  std::string payload = "a string long enough to live on the heap, not in the SSO buffer";
  counted() { ++alive; }
  counted(const counted& o) : payload(o.payload) { ++alive; }
  counted(counted&& o) noexcept : payload(std::move(o.payload)) { ++alive; }
  counted& operator=(const counted&) = default;
  ~counted() {
    --alive;
    ++destroyed;
  }
};

asio::awaitable<std::size_t> use(const counted& c) {
  co_return c.payload.size();
}

}  // namespace

TEST_CASE(
    "a factory capturing a non-trivial value by copy in the co_await expression is "
    "destroyed exactly once per copy",
    "[canary]") {
  manual_clock::reset();
  counted::alive = 0;
  {
    asio::io_context ctx;
    counted req;
    outcome<std::size_t> out;
    auto run = [&]() -> asio::awaitable<std::size_t> {
      co_return co_await keel::with_retry<manual_clock>([req] { return use(req); },
                                                        keel::retry_policy::immediate(3));
    };
    spawn(ctx, run(), out);
    REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
    CHECK(out.value == req.payload.size());
    CHECK(counted::alive == 1);  // only `req` itself remains
  }
  CHECK(counted::alive == 0);
}

TEST_CASE(
    "a policy temporary with non-trivial members in the co_await expression is destroyed "
    "exactly once",
    "[canary]") {
  manual_clock::reset();
  counted::alive = 0;
  {
    asio::io_context ctx;
    outcome<int> out;
    auto run = [&]() -> asio::awaitable<int> {
      counted in_hook;
      auto p = keel::retry_policy::immediate(2);
      co_return co_await keel::with_deadline<manual_clock>(
          [&] {
            return keel::with_retry<manual_clock>(
                []() -> asio::awaitable<int> { co_return 1; },
                [&] {
                  p.on_retry = [in_hook](const keel::retry_event&) {};
                  return p;
                }());
          },
          1s);
    };
    spawn(ctx, run(), out);
    REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
    CHECK(out.value == 1);
  }
  CHECK(counted::alive == 0);
}
