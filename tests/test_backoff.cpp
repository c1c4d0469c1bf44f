// Tests for keel/backoff.hpp: curves, caps, every jitter, per-condition strategies.
#include <keel/backoff.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <set>

using namespace std::chrono_literals;
using ns = std::chrono::nanoseconds;

TEST_CASE(
    "full-jitter delays lie from 0 up to min(cap, base*2^n) exclusive and differ between seeds",
    "[backoff]") {
  const auto b = keel::backoff::exponential(100ms, 2s, keel::jitter::full);
  std::set<long long> first_delays;
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    keel::random_source rng{seed};
    keel::backoff_state st;
    for (int k = 1; k <= 12; ++k) {
      const ns upper = std::min<ns>(2s, ns(100ms) * (1LL << (k - 1)));
      const ns d = b.next_delay(k, st, rng);
      REQUIRE(d >= 0ns);
      REQUIRE(d < upper);
      if (k == 3) {
        first_delays.insert(d.count());
      }
    }
  }
  CHECK(first_delays.size() == 20);  // every seed gave a different delay
}

TEST_CASE("the same seed gives the same delays", "[backoff]") {
  const auto b = keel::backoff::exponential(1s, 60s, keel::jitter::full);
  keel::random_source a{99}, c{99};
  keel::backoff_state sa, sc;
  for (int k = 1; k <= 8; ++k) {
    CHECK(b.next_delay(k, sa, a) == b.next_delay(k, sc, c));
  }
}

TEST_CASE("un-jittered curves are constant, linear and exponential, and capped", "[backoff]") {
  keel::random_source rng{1};
  keel::backoff_state st;
  const auto c = keel::backoff::constant(250ms);
  CHECK(c.next_delay(1, st, rng) == 250ms);
  CHECK(c.next_delay(7, st, rng) == 250ms);
  const auto l = keel::backoff::linear(2s, 7s);
  CHECK(l.next_delay(1, st, rng) == 2s);
  CHECK(l.next_delay(3, st, rng) == 6s);
  CHECK(l.next_delay(4, st, rng) == 7s);
  const auto e = keel::backoff::exponential(1s, 20s, keel::jitter::none);
  CHECK(e.next_delay(1, st, rng) == 1s);
  CHECK(e.next_delay(2, st, rng) == 2s);
  CHECK(e.next_delay(5, st, rng) == 16s);
  CHECK(e.next_delay(6, st, rng) == 20s);
  CHECK(e.next_delay(400, st, rng) == 20s);  // no overflow far out
}

TEST_CASE("equal jitter keeps at least half of the curve", "[backoff]") {
  const auto b = keel::backoff::exponential(1s, 60s, keel::jitter::equal);
  keel::random_source rng{5};
  keel::backoff_state st;
  for (int k = 1; k <= 6; ++k) {
    const ns t = ns(1s) * (1LL << (k - 1));
    const ns d = b.next_delay(k, st, rng);
    CHECK(d >= t / 2);
    CHECK(d < t);
  }
}

TEST_CASE("decorrelated jitter stays between base and three times the previous delay",
          "[backoff]") {
  const auto b = keel::backoff::exponential(100ms, 10s, keel::jitter::decorrelated);
  keel::random_source rng{11};
  keel::backoff_state st;
  ns prev = 100ms;
  for (int k = 1; k <= 30; ++k) {
    const ns d = b.next_delay(k, st, rng);
    CHECK(d >= 100ms);
    CHECK(d <= std::min<ns>(10s, prev * 3));
    prev = d;
  }
}

TEST_CASE("decorrelated-v2 jitter is positive, capped, and its median grows like base*2^n",
          "[backoff]") {
  const auto b = keel::backoff::exponential(1s, 1000s, keel::jitter::decorrelated_v2);
  // Median over many seeds of the 5th delay should be in the same order as 2^4 s.
  std::vector<double> fifth;
  for (std::uint64_t seed = 1; seed <= 301; ++seed) {
    keel::random_source rng{seed};
    keel::backoff_state st;
    ns d{};
    for (int k = 1; k <= 5; ++k) {
      d = b.next_delay(k, st, rng);
      REQUIRE(d >= 0ns);
      REQUIRE(d <= 1000s);
    }
    fifth.push_back(std::chrono::duration<double>(d).count());
  }
  std::sort(fifth.begin(), fifth.end());
  const double median = fifth[fifth.size() / 2];
  CHECK(median > 16 / 4.0);
  CHECK(median < 16 * 4.0);
}

TEST_CASE("first_retry_immediate waits zero once, then follows the curve", "[backoff]") {
  auto b = keel::backoff::exponential(1s, 60s, keel::jitter::none);
  b.first_retry_immediate = true;
  keel::random_source rng{1};
  keel::backoff_state st;
  CHECK(b.next_delay(1, st, rng) == 0s);
  CHECK(b.next_delay(2, st, rng) == 1s);
  CHECK(b.next_delay(3, st, rng) == 2s);
}

TEST_CASE("a backoff strategy picks by selector, then by condition, then the default",
          "[backoff]") {
  keel::backoff_strategy s{keel::backoff::constant(5s)};
  s.on(keel::condition::throttled, keel::backoff::constant(1s));
  s.select(
      [](const std::exception_ptr&, const keel::classification& c) -> std::optional<keel::backoff> {
        if (c.code == boost::system::errc::resource_unavailable_try_again) {
          return keel::backoff::linear(2s, 10s);
        }
        return std::nullopt;
      });
  keel::classification throttled{keel::condition::throttled, {}, {}};
  keel::classification transient{keel::condition::transient, {}, {}};
  keel::classification special{
      keel::condition::transient,
      {},
      make_error_code(boost::system::errc::resource_unavailable_try_again)};
  CHECK(s.choose(nullptr, throttled).base == 1s);
  CHECK(s.choose(nullptr, transient).base == 5s);
  CHECK(s.choose(nullptr, special).shape == keel::backoff_shape::linear);
  CHECK(s.choose(nullptr, special).base == 2s);
}

TEST_CASE("the default hierarchy retries transient failures once immediately", "[backoff]") {
  const auto s = keel::backoff_strategy::hierarchy();
  keel::random_source rng{3};
  keel::backoff_state st;
  keel::classification transient{keel::condition::transient, {}, {}};
  keel::classification throttled{keel::condition::throttled, {}, {}};
  CHECK(s.choose(nullptr, transient).next_delay(1, st, rng) == 0s);
  CHECK(s.choose(nullptr, throttled).first_retry_immediate == false);
  CHECK(s.choose(nullptr, throttled).base == 1s);
  CHECK(s.choose(nullptr, throttled).cap == 60s);
}
