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
