// Tests for keel/aws/adaptive.hpp: rate clocker, CUBIC, send token bucket and the limiter flow.
#include <keel/aws/adaptive.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <map>

TEST_CASE("the rate clocker measures nothing until a half-second bucket boundary", "[aws]") {
  keel::aws::rate_clocker clocker{0.0};
  for (double t : {0.1, 0.2, 0.3, 0.4, 0.49}) {
    CHECK(clocker.record(t) == 0);
  }
  CHECK(clocker.record(0.5) == Approx(9.6).margin(1e-9));  // 0.8 * 6 / 0.5
  CHECK(clocker.rate() == Approx(9.6).margin(1e-9));
}

TEST_CASE("the rate clocker's first bucket starts at the whole second", "[aws]") {
  keel::aws::rate_clocker clocker{1.7};  // last_bucket = 1.0, not 1.5
  CHECK(clocker.record(1.8) == Approx(0.8 * 1 / 0.5).margin(1e-9));
}

TEST_CASE("CUBIC K and the throttle decrease match the check values", "[aws]") {
  keel::aws::cubic_calculator c{0.0, 10.0};
  CHECK(c.k() == Approx(1.9574338205844317).margin(1e-9));
  CHECK(c.success(0.0) == Approx(7.0).margin(1e-9));  // success(last_fail) = beta * w_max
  CHECK(c.throttle(8.0, 3.0) == Approx(5.6).margin(1e-9));
  CHECK(c.w_max() == 8.0);
  CHECK(c.last_fail() == 3.0);
  CHECK(c.k() == Approx(1.8171205928321397).margin(1e-9));
  CHECK(c.success(3.0) == Approx(5.6).margin(1e-9));
}

TEST_CASE("CUBIC success #2 after two throttles gives 6.606547753887045 at t=9", "[aws]") {
  // Spec case: w_max = 10, last throttle at t = 5; each throttle's input is the rate in force.
  keel::aws::cubic_calculator c{5.0, 10.0};
  CHECK(c.success(5) == Approx(7.0).margin(1e-9));
  CHECK(c.success(6) == Approx(9.64893600966).margin(1e-9));
  CHECK(c.success(7) == Approx(10.000030849917364).margin(1e-9));
  // Throttles at t = 7 and t = 8, each fed the rate calculated at the previous step.
  const double before7 = c.success(6);
  const double after7 = c.throttle(before7, 7);
  CHECK(after7 == Approx(before7 * 0.7).margin(1e-9));
  c.throttle(after7, 8);
  CHECK(c.w_max() == after7);  // the pre-decrease rate, not after7 * 0.7
  CHECK(c.success(9) == Approx(6.606547753887045).margin(1e-9));
}

TEST_CASE("the send bucket's first refill only records the time", "[aws]") {
  keel::aws::send_token_bucket b{10.0};
  b.refill(100.0);
  CHECK(b.capacity() == 0);
  b.refill(100.5);
  CHECK(b.capacity() == Approx(5.0).margin(1e-9));
  b.refill(200.0);
  CHECK(b.capacity() == 10.0);  // capped at max_capacity
}

TEST_CASE("set_rate refills at the old rate and floors the fill rate and capacity", "[aws]") {
  keel::aws::send_token_bucket b{4.0, 0.0};
  CHECK(b.fill_rate() == 4.0);
  CHECK(b.max_capacity() == 4.0);
  b.set_rate(0.2, 0.5);  // refill 0.5 s at 4/s first
  CHECK(b.fill_rate() == 0.5);
  CHECK(b.max_capacity() == 1.0);
  CHECK(b.capacity() == 1.0);  // 2 tokens cut to the new limit
  b.set_rate(0.8, 1.0);
  CHECK(b.fill_rate() == 0.8);
  CHECK(b.max_capacity() == 1.0);
  b.set_rate(2.5, 1.0);
  CHECK(b.fill_rate() == 2.5);
  CHECK(b.max_capacity() == 2.5);
}

TEST_CASE("try_acquire takes tokens only when available and wait_time says how long", "[aws]") {
  keel::aws::send_token_bucket b{2.0, 0.0};
  CHECK_FALSE(b.try_acquire(1, 0.0));
  CHECK(b.wait_time(1, 0.0) == Approx(0.5).margin(1e-12));
  CHECK(b.capacity() == 0);
  CHECK(b.wait_time(1, 0.2) == Approx(0.3).margin(1e-12));
  CHECK(b.try_acquire(1, 0.5));
  CHECK(b.capacity() == Approx(0).margin(1e-12));
  // Waiting exactly the returned time must succeed despite rounding.
  double now = 0.5;
  for (int i = 0; i < 20; ++i) {
    now += b.wait_time(1, now);
    CHECK(b.wait_time(1, now) == 0);
    CHECK(b.try_acquire(1, now));
    CHECK(b.capacity() >= 0);
  }
}

TEST_CASE("the adaptive limiter does not delay sends before the first throttle", "[aws]") {
  keel::aws::adaptive_rate_limiter limiter{0.0};
  CHECK_FALSE(limiter.enabled());
  for (int i = 0; i < 100; ++i) {
    CHECK(limiter.before_send(0.0) == 0);
  }
  limiter.after_response(false, 0.2);
  CHECK_FALSE(limiter.enabled());
  CHECK(limiter.fill_rate() == 0.5);  // the rate is tracked even while disabled
}

TEST_CASE("the adaptive limiter paces sends once enabled", "[aws]") {
  keel::aws::adaptive_rate_limiter limiter{0.0};
  limiter.after_response(true, 0.05);
  CHECK(limiter.enabled());
  CHECK(limiter.fill_rate() == 0.5);  // measured 0 => new rate 0, floored
  // 0.05 s at the creation rate of 1 left 0.05 tokens: (1 - 0.05) / 0.5 = 1.9 s (§8).
  const double wait = limiter.before_send(0.05);
  CHECK(wait == Approx(1.9).margin(1e-9));
  CHECK(limiter.before_send(0.05 + wait) == 0);
  CHECK(limiter.before_send(0.05 + wait) > 0);  // the token was taken
}

TEST_CASE("the adaptive limiter reproduces the cross-SDK end-to-end sending-rate table", "[aws]") {
  keel::aws::adaptive_rate_limiter limiter{0.0};
  const std::map<int, double> measured{{3, 4.8}, {10, 4.3264}};
  const std::map<int, double> fill{
      {3, 0.5}, {6, 0.6912}, {10, 3.02848}, {16, 2.997426}, {17, 3.452226}};
  for (int k = 1; k <= 17; ++k) {
    const double t = k / 5.0;                  // responses every 0.2 s
    const bool throttle = k == 10 || k == 16;  // t = 2.0 and 3.2
    INFO("t = " << t);
    const double rate = limiter.after_response(throttle, t);
    CHECK(limiter.enabled() == (k >= 10));
    if (auto it = measured.find(k); it != measured.end()) {
      CHECK(limiter.measured_rate() == Approx(it->second).margin(5e-7));
    }
    if (auto it = fill.find(k); it != fill.end()) {
      CHECK(rate == Approx(it->second).margin(5e-7));
      CHECK(limiter.fill_rate() == rate);
    }
  }
}

TEST_CASE("β and the minimum fill rate can be set; the defaults are botocore's", "[aws]") {
  keel::aws::cubic_calculator half{0.0, 0.0, 0.5};
  CHECK(half.beta() == 0.5);
  CHECK(half.throttle(8, 1.0) == Approx(4.0).margin(1e-12));
  CHECK(half.k() == Approx(std::cbrt(10.0)).margin(1e-12));  // cbrt(8 * (1 - 0.5) / 0.4)
  CHECK(keel::aws::cubic_calculator{0.0}.beta() == 0.7);

  // The end-to-end table's first throttle (t = 2.0, measured 4.3264): 4.3264 * β.
  keel::aws::adaptive_options opts;
  opts.beta = 0.5;
  opts.min_fill_rate = 0.25;
  keel::aws::adaptive_rate_limiter tuned{0.0, opts};
  keel::aws::adaptive_rate_limiter stock{0.0};
  CHECK(tuned.after_response(false, 0.2) == 0.25);  // measured 0: floored at the new minimum
  CHECK(stock.after_response(false, 0.2) == 0.5);
  for (int k = 2; k <= 10; ++k) {
    const double t = k / 5.0;
    const double a = tuned.after_response(k == 10, t);
    const double b = stock.after_response(k == 10, t);
    if (k == 10) {
      CHECK(a == Approx(4.3264 * 0.5).margin(5e-7));
      CHECK(b == Approx(3.02848).margin(5e-7));
    }
  }
}

TEST_CASE("the send bucket at 10 TPS serves 20 sends 0.1 s apart without a rounding refusal",
          "[aws]") {
  // Times accumulate in steps of 0.1, so each refill adds 0.9999999999999998 tokens or so: seven
  // of the 20 sends would be refused without the 1e-9 tolerance (reference §9.6).
  SECTION("from empty") {
    keel::aws::send_token_bucket bucket{10.0, 0.0};
    double t = 0;
    for (int k = 1; k <= 20; ++k) {
      t += 0.1;
      INFO("send " << k);
      CHECK(bucket.wait_time(1, t) == 0);
      CHECK(bucket.try_acquire(1, t));
      CHECK(bucket.capacity() >= 0);
      CHECK(bucket.capacity() < 1e-9);
    }
  }
  SECTION("from full") {
    keel::aws::send_token_bucket bucket{10.0, 0.0};
    bucket.refill(1.0);
    REQUIRE(bucket.capacity() == 10);
    double t = 1.0;
    for (int k = 1; k <= 20; ++k) {
      t += 0.1;
      CHECK(bucket.try_acquire(1, t));
    }
    CHECK(bucket.capacity() == Approx(9.0).margin(1e-9));
  }
}
