// Tests for keel/keel.hpp: the facilities composed as the README shows, at 10,000 coroutines.
#include <keel/keel.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;

TEST_CASE("10,000 coroutines share one throttler, breaker and retry budget on one io_context",
          "[keel][integration]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::basic_throttler<manual_clock> bucket{ctx.get_executor(),
                                             {.requests_per_second = 2000, .burst = 10}};
  keel::basic_circuit_breaker<manual_clock> breaker{ctx.get_executor(),
                                                    keel::breaker_policy::consecutive(5, 60s)};
  keel::retry_budget budget{1000, 0.1};
  keel::random_source rng{42};
  auto policy = keel::retry_policy::exponential_full_jitter(5, 10ms, 1s);
  policy.budget = &budget;
  policy.random = &rng;

  constexpr int n = 10000;
  int calls = 0, max_in_flight = 0, in_flight = 0;
  long long first_ms = -1, last_ms = -1;
  // Every 10th call fails once with a transient error, then succeeds.
  std::vector<int> failures_left(n);
  for (int i = 0; i < n; i += 10) {
    failures_left[i] = 1;
  }
  auto call_model = [&](int i) -> asio::awaitable<int> {
    co_await bucket.acquire();
    ++calls;
    max_in_flight = std::max(max_in_flight, ++in_flight);
    first_ms = first_ms < 0 ? now_ms() : first_ms;
    last_ms = now_ms();
    co_await sleep_for(20ms);
    --in_flight;
    if (failures_left[i] > 0) {
      --failures_left[i];
      throw boost::system::system_error(asio::error::connection_reset);
    }
    co_return i;
  };

  std::vector<outcome<int>> outcomes(n);
  std::vector<std::function<asio::awaitable<int>()>> leaves;
  leaves.reserve(n);
  for (int i = 0; i < n; ++i) {
    leaves.emplace_back([&call_model, i] { return call_model(i); });
  }
  for (int i = 0; i < n; ++i) {
    auto& leaf = leaves[i];
    spawn(ctx,
          keel::with_breaker(breaker,
                             [&] {
                               return keel::with_retry<manual_clock>(
                                   [&] { return keel::with_deadline<manual_clock>(leaf, 10s); },
                                   policy);
                             }),
          outcomes[i]);
  }
  REQUIRE(keel::testing::run_until(
      ctx,
      [&] { return std::all_of(outcomes.begin(), outcomes.end(), [](auto& o) { return o.done; }); },
      1min));
  int ok = 0;
  for (int i = 0; i < n; ++i) {
    if (outcomes[i].value == i) {
      ++ok;
    }
  }
  CHECK(ok == n);              // every call has exactly its own answer
  CHECK(calls == n + n / 10);  // one extra attempt for every 10th call
  CHECK(bucket.total_granted() == static_cast<std::uint64_t>(n + n / 10));
  // 11,000 grants at 2,000/s with a burst of 10: about 5.5 s of virtual time.
  CHECK(last_ms - first_ms >= 5400);
  CHECK(last_ms - first_ms <= 5600);
  CHECK(max_in_flight >= 40);                             // 2,000/s x 20 ms in flight at once
  CHECK(breaker.state() == keel::breaker_state::closed);  // isolated failures never trip it
  CHECK(budget.can_retry());
}
