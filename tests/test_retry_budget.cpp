// Tests for keel/retry_budget.hpp: gRFC A6 token arithmetic.
#include <keel/retry_budget.hpp>

#include <catch2/catch.hpp>

#include <thread>
#include <vector>

TEST_CASE("the retry budget follows gRFC A6: -1 per failure, +ratio per success, stop at half",
          "[budget]") {
  keel::retry_budget b{10, 0.1};
  CHECK(b.tokens() == 10);
  CHECK(b.can_retry());
  for (int i = 0; i < 5; ++i) {
    b.on_failure();
  }
  CHECK(b.tokens() == 5);
  CHECK_FALSE(b.can_retry());  // 5 is not > 10/2
  CHECK_FALSE(b.try_retry());
  CHECK(b.denied() == 1);
  b.on_success();
  CHECK(b.tokens() == Approx(5.1));
  CHECK(b.can_retry());
  for (int i = 0; i < 100; ++i) {
    b.on_failure();
  }
  CHECK(b.tokens() == 0);  // floor
  for (int i = 0; i < 1000; ++i) {
    b.on_success();
  }
  CHECK(b.tokens() == 10);  // ceiling
}

TEST_CASE("the retry budget is consistent under concurrent use", "[budget][threads]") {
  keel::retry_budget b{100000, 1};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) {
        b.on_failure();
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  CHECK(b.tokens() == 60000);
}

namespace {

// Runs `prompts` prompts through `b` where one attempt in `every` fails (then is retried and
// succeeds), as with_retry charges them; returns how many retries the budget refused.
int refused_over_a_batch(keel::retry_budget& b, int prompts, int every) {
  int refused = 0;
  for (int attempt = 1, done = 0; done < prompts; ++attempt) {
    if (attempt % every == 0) {
      b.on_failure();
      if (!b.try_retry()) {
        ++refused;
        ++done;  // the prompt fails with budget_exhausted
      }
    } else {
      b.on_success();
      ++done;
    }
  }
  return refused;
}

}  // namespace

TEST_CASE("a token ratio of 0.5 survives a 10 percent failure rate that drains gRPC's 0.1",
          "[budget]") {
  // 10% of attempts fail: 1 failure per 9 successes. gRPC's ratio drains above r / (1 + r) = 9%,
  // so over 5,000 prompts a 100-token budget reaches its half (after about 4,500) and refuses
  // retries that would have succeeded; 0.5 drains only above 33%.
  keel::retry_budget grpc_ratio{100, 0.1};
  CHECK(refused_over_a_batch(grpc_ratio, 5000, 10) == 59);
  CHECK_FALSE(grpc_ratio.can_retry());

  keel::retry_budget llm_ratio{100, 0.5};
  CHECK(refused_over_a_batch(llm_ratio, 5000, 10) == 0);
  CHECK(llm_ratio.tokens() == 100);
  // 25% failing (1 in 4) and 33% (1 in 3, exactly on the line) leave 0.5 full; 50% (1 in 2) is an
  // outage, and the budget stops retries as it should.
  keel::retry_budget quarter{100, 0.5};
  CHECK(refused_over_a_batch(quarter, 5000, 4) == 0);
  keel::retry_budget third{100, 0.5};
  CHECK(refused_over_a_batch(third, 5000, 3) == 0);
  keel::retry_budget half{100, 0.5};
  CHECK(refused_over_a_batch(half, 5000, 2) > 2000);
  CHECK_FALSE(half.can_retry());
}
