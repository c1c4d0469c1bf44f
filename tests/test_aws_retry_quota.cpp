// Tests for keel/aws/retry_quota.hpp: the standard-mode quota and the recorded_cost rule.
#include <keel/aws/classification.hpp>
#include <keel/aws/retry_quota.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

namespace {

// Runs one standard-mode call against scripted statuses (the last one repeats) and returns the
// number of attempts made, following §3: classify, check max, take from the quota, finish.
int run_call(keel::aws::retry_quota& quota, keel::aws::quota_costs costs,
             const std::vector<int>& statuses, int max_attempts = 3) {
  keel::aws::standard_call_state call{quota, costs};
  for (int n = 1;; ++n) {
    const int status = statuses[std::min(static_cast<std::size_t>(n - 1), statuses.size() - 1)];
    const bool ok = status >= 200 && status <= 299;
    if (ok || n >= max_attempts || !keel::aws::standard_retryable(status, "", false, false) ||
        !call.try_acquire_retry(false, false)) {
      call.on_call_finished(status);
      return n;
    }
  }
}

}  // namespace

TEST_CASE("the retry quota acquires all or nothing and releases up to its maximum", "[aws]") {
  keel::aws::retry_quota q{12};
  CHECK(q.available() == 12);
  CHECK(q.max() == 12);
  CHECK(q.acquire(5));
  CHECK(q.acquire(5));
  CHECK(q.available() == 2);
  CHECK_FALSE(q.acquire(5));  // no partial acquisition
  CHECK(q.available() == 2);
  q.release(5);
  CHECK(q.available() == 7);
  q.release(100);
  CHECK(q.available() == 12);  // capped
  q.release(1);
  CHECK(q.available() == 12);  // no-op when full
  CHECK(keel::aws::retry_quota{}.available() == 500);
}

TEST_CASE("quota costs have the 2.0 and 2.1 presets", "[aws]") {
  constexpr auto v20 = keel::aws::quota_costs::v2_0();
  STATIC_REQUIRE(v20.cost_for(false, false) == 5);
  STATIC_REQUIRE(v20.cost_for(true, false) == 10);
  STATIC_REQUIRE(v20.cost_for(false, true) == 5);
  STATIC_REQUIRE(v20.no_retry_increment == 1);
  constexpr auto v21 = keel::aws::quota_costs::v2_1();
  STATIC_REQUIRE(v21.cost_for(false, false) == 14);
  STATIC_REQUIRE(v21.cost_for(true, false) == 14);
  STATIC_REQUIRE(v21.cost_for(false, true) == 5);
  STATIC_REQUIRE(v21.no_retry_increment == 1);
}

TEST_CASE("50 calls of three 502s drain a 2.0 quota and call 51 gets no retry", "[aws]") {
  keel::aws::retry_quota q;
  for (int call = 1; call <= 50; ++call) {
    CHECK(run_call(q, keel::aws::quota_costs::v2_0(), {502}) == 3);
  }
  CHECK(q.available() == 0);
  CHECK(run_call(q, keel::aws::quota_costs::v2_0(), {502}) == 1);
  CHECK(q.available() == 0);
  // Recovery: a first-attempt success gives back the no-retry increment.
  CHECK(run_call(q, keel::aws::quota_costs::v2_0(), {200}) == 1);
  CHECK(q.available() == 1);
}

TEST_CASE("a 2.1 quota allows 17 full calls, one retry on call 18 and none afterwards", "[aws]") {
  keel::aws::retry_quota q;
  for (int call = 1; call <= 17; ++call) {
    CHECK(run_call(q, keel::aws::quota_costs::v2_1(), {502}) == 3);
  }
  CHECK(q.available() == 500 - 17 * 28);
  CHECK(run_call(q, keel::aws::quota_costs::v2_1(), {502}) == 2);
  CHECK(q.available() == 10);
  CHECK(run_call(q, keel::aws::quota_costs::v2_1(), {502}) == 1);
  CHECK(q.available() == 10);
}

TEST_CASE("retry eventually succeeds leaves 495 at 2.0 and 486 at 2.1", "[aws]") {
  keel::aws::retry_quota q20;
  CHECK(run_call(q20, keel::aws::quota_costs::v2_0(), {500, 500, 200}) == 3);
  CHECK(q20.available() == 495);
  keel::aws::retry_quota q21;
  CHECK(run_call(q21, keel::aws::quota_costs::v2_1(), {500, 500, 200}) == 3);
  CHECK(q21.available() == 486);
}

TEST_CASE("only the last retry's cost is released and only on a 2xx", "[aws]") {
  keel::aws::retry_quota q;
  {
    keel::aws::standard_call_state call{q};
    CHECK_FALSE(call.recorded_cost());
    CHECK(call.try_acquire_retry(true, false));   // timeout: 10
    CHECK(call.try_acquire_retry(false, false));  // then 5, overwriting
    CHECK(call.recorded_cost() == 5);
    CHECK(q.available() == 485);
    call.on_call_finished(200);
    CHECK(q.available() == 490);
  }
  {
    keel::aws::standard_call_state call{q};
    CHECK(call.try_acquire_retry(false, false));
    call.on_call_finished(503);  // non-2xx: nothing back
    CHECK(q.available() == 485);
  }
  {
    keel::aws::standard_call_state call{q};
    call.on_call_finished(204);  // first-attempt 2xx: the no-retry increment
    CHECK(q.available() == 486);
  }
}

TEST_CASE("a refused acquisition leaves the recorded cost unchanged", "[aws]") {
  keel::aws::retry_quota q{12};
  keel::aws::standard_call_state call{q, keel::aws::quota_costs::v2_0()};
  CHECK(call.try_acquire_retry(false, false));
  CHECK_FALSE(call.try_acquire_retry(true, false));  // 10 > 7
  CHECK(call.recorded_cost() == 5);
  CHECK(q.available() == 7);
}

TEST_CASE("the retry quota stays within bounds under concurrent use", "[aws][threads]") {
  keel::aws::retry_quota q{1000};
  std::atomic<int> successes{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        if (q.acquire(3)) {
          successes.fetch_add(1);
          q.release(2);
        }
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  // Every successful acquire nets -1, and nothing is lost or double-counted.
  CHECK(successes.load() > 0);
  CHECK(q.available() == 1000 - successes.load());
  CHECK(q.available() >= 0);
}

TEST_CASE("the 2.1 retry-eventually-succeeds call leaves 486 while other threads retry too",
          "[aws][threads]") {
  // Thread 0 makes the §9.3 call (500, 500, 200): net -14. Seven other threads each make 50 calls
  // of (500, 200), each net 0. Every release follows its own call's acquire, so the cap is never
  // reached and the final amount does not depend on the interleaving.
  keel::aws::retry_quota q;
  const auto costs = keel::aws::quota_costs::v2_1();
  std::vector<std::thread> threads;
  std::atomic<int> attempts{0};
  threads.emplace_back([&] { attempts += run_call(q, costs, {500, 500, 200}); });
  for (int t = 0; t < 7; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        attempts += run_call(q, costs, {500, 200});
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  CHECK(attempts.load() == 3 + 7 * 50 * 2);
  CHECK(q.available() == 486);
}
