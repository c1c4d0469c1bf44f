// Tests for keel/aws/backoff.hpp: standard 2.0/2.1 and legacy delays, x-amz-retry-after.
#include <keel/aws/backoff.hpp>

#include <catch2/catch.hpp>

#include <vector>

TEST_CASE("standard 2.0 pinned jitter gives 1, 2, 4, 8, 16 then 20", "[aws]") {
  const std::vector<double> expected{1, 2, 4, 8, 16, 20, 20, 20};
  for (int n = 1; n <= 8; ++n) {
    CHECK(keel::aws::standard_delay_v2_0(1.0, n) == expected[n - 1]);
  }
  CHECK(keel::aws::standard_delay_v2_0(1.0, 64) == 20);
  CHECK(keel::aws::standard_delay_v2_0(0.5, 3) == 2);
  CHECK(keel::aws::standard_delay_v2_0(0.0, 5) == 0);
}

TEST_CASE("standard 2.1 pinned jitter follows the scale for each kind of error", "[aws]") {
  const std::vector<double> other{0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 20, 20};
  for (int n = 1; n <= 11; ++n) {
    CHECK(keel::aws::standard_delay_v2_1(1.0, n, false) == Approx(other[n - 1]).margin(1e-12));
  }
  const std::vector<double> dynamo{0.025, 0.05, 0.1};
  for (int n = 1; n <= 3; ++n) {
    CHECK(keel::aws::standard_delay_v2_1(1.0, n, false, true) ==
          Approx(dynamo[n - 1]).margin(1e-12));
  }
  const std::vector<double> throttling{1, 2, 4, 8, 16, 20};
  for (int n = 1; n <= 6; ++n) {
    CHECK(keel::aws::standard_delay_v2_1(1.0, n, true) == throttling[n - 1]);
    CHECK(keel::aws::standard_delay_v2_1(1.0, n, true, true) == throttling[n - 1]);
  }
}

TEST_CASE("x-amz-retry-after extends a 2.1 delay by at most 5 s and bad values are ignored",
          "[aws]") {
  const double t = 0.05;
  CHECK(keel::aws::apply_retry_after(t, "1500") == Approx(1.5).margin(1e-12));
  CHECK(keel::aws::apply_retry_after(t, "0") == Approx(0.05).margin(1e-12));
  CHECK(keel::aws::apply_retry_after(t, "10000") == Approx(5.05).margin(1e-12));
  CHECK(keel::aws::apply_retry_after(t, "invalid") == Approx(0.05).margin(1e-12));
  CHECK(keel::aws::apply_retry_after(t, "-100") == Approx(0.05).margin(1e-12));
  CHECK(keel::aws::apply_retry_after(t, std::nullopt) == t);
  // max_backoff is not applied afterwards: up to 25 s.
  CHECK(keel::aws::apply_retry_after(20, "60000") == 25);
}

TEST_CASE("the x-amz-retry-after parser accepts only plain signed decimal integers", "[aws]") {
  CHECK(keel::aws::parse_retry_after("1500") == 1.5);
  CHECK(keel::aws::parse_retry_after("+1500") == 1.5);
  CHECK(keel::aws::parse_retry_after("-0") == 0.0);
  CHECK_FALSE(keel::aws::parse_retry_after(""));
  CHECK_FALSE(keel::aws::parse_retry_after("+"));
  CHECK_FALSE(keel::aws::parse_retry_after("+-5"));
  CHECK_FALSE(keel::aws::parse_retry_after(" 1500"));
  CHECK_FALSE(keel::aws::parse_retry_after("1_500"));
  CHECK_FALSE(keel::aws::parse_retry_after("1.5"));
  CHECK_FALSE(keel::aws::parse_retry_after("99999999999999999999999"));
}

TEST_CASE("legacy backoff doubles without a cap", "[aws]") {
  CHECK(keel::aws::legacy_delay(1.0, 1) == 1);
  CHECK(keel::aws::legacy_delay(1.0, 5) == 16);
  CHECK(keel::aws::legacy_delay(1.0, 7) == 64);
  CHECK(keel::aws::legacy_delay(0.25, 3) == 1);
}
