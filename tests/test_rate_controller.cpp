// Tests for keel/rate_controller.hpp: startup window, search, estimator, blocks, limits, and the
// controller against simulated rate limiters (pacing_sim.hpp), all in virtual time.
#include <keel/testing/manual_clock.hpp>

#include <keel/random.hpp>
#include <keel/rate_controller.hpp>
#include <keel/throttler.hpp>
#include "pacing_sim.hpp"

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/system/system_error.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
using keel::testing::manual_clock;

namespace {

namespace asio = boost::asio;

using virtual_throttler = keel::basic_throttler<manual_clock>;
using controller = keel::basic_rate_controller<manual_clock>;
using ticket = controller::ticket;

constexpr std::uint64_t seed = 20240611;

// A throttler and a controller on virtual time, with the clock reset to its epoch first and the
// controller's randomness seeded.
struct rig {
  struct clock_reset {
    clock_reset() { manual_clock::reset(); }
  } reset;
  keel::random_source rng{seed};
  asio::io_context ctx;
  virtual_throttler bucket;
  controller pacing;

  explicit rig(keel::rate_controller_options o = {}, keel::throttler_options b = {})
      : bucket{ctx.get_executor(), b}, pacing{bucket, seeded(std::move(o), rng)} {}

  static keel::rate_controller_options seeded(keel::rate_controller_options o,
                                              keel::random_source& r) {
    o.random = &r;
    return o;
  }

  // A send of one request (and `tokens` LLM tokens) that the throttler granted at once.
  ticket send(double tokens = 0) {
    REQUIRE(bucket.try_acquire({1, tokens}));
    return pacing.on_send({1, tokens});
  }
};

std::chrono::nanoseconds now() {
  return manual_clock::now().time_since_epoch();
}

// Moves virtual time to `t` since the epoch (nothing runs: no io_context is polled).
void advance_to(std::chrono::nanoseconds t) {
  REQUIRE(t >= now());
  manual_clock::advance(t - now());
}

// Acquires one request from `bucket` and records when it was granted.
asio::awaitable<void> take(virtual_throttler& bucket, std::vector<std::chrono::nanoseconds>& at) {
  try {
    co_await bucket.acquire();
    at.push_back(now());
  } catch (const boost::system::system_error&) {
    // The throttler was destroyed with this call still queued: the test is over.
  }
}

keel::rate_controller_options with_ceiling(double requests_per_second) {
  keel::rate_controller_options o;
  o.max_requests_per_second = requests_per_second;
  return o;
}

bool finite_state(const keel::pacing_state& s) {
  return std::isfinite(s.rate) && std::isfinite(s.estimate) && std::isfinite(s.window) &&
         s.rate >= 0 && s.estimate >= 0 && s.window >= 0;
}

bool finite_options(const keel::throttler_options& o) {
  return std::isfinite(o.requests_per_second) && std::isfinite(o.burst) &&
         std::isfinite(o.tokens_per_minute) && std::isfinite(o.token_burst) &&
         o.requests_per_second >= 0 && o.burst >= 0 && o.tokens_per_minute >= 0 &&
         o.token_burst >= 0;
}

// ---- the simulations ----

// An nginx limit_req-like server: R per second, burst 20, Retry-After 1 s, answers in 1 ms.
pacing_sim::server_spec limiter(double requests_per_second) {
  pacing_sim::server_spec s;
  s.requests_per_second = requests_per_second;
  s.burst = 20;
  s.latency = 1ms;
  s.reject_latency = 1ms;
  s.retry_after = std::chrono::seconds(1);
  return s;
}

pacing_sim::client_spec batch(std::size_t prompts, std::size_t concurrency) {
  pacing_sim::client_spec c;
  c.prompts = prompts;
  c.concurrency = concurrency;
  c.seed = seed;
  return c;
}

// Virtual time advances 1 ms per step: every latency in these runs is at least that.
constexpr auto tick = std::chrono::milliseconds(1);

// The start of bin i, in seconds.
double bin_start(std::size_t i) {
  return static_cast<double>(i) * 0.1;
}

// R = 200, 2000 prompts, 64 workers, with or without Retry-After. Shared by two tests (each run
// costs about a second of real time).
const pacing_sim::result& convergence_run(bool retry_after) {
  static std::array<std::optional<pacing_sim::result>, 2> runs;
  auto& r = runs[retry_after ? 1 : 0];
  if (!r) {
    auto s = limiter(200);
    if (!retry_after) {
      s.retry_after.reset();
    }
    r = pacing_sim::run(s, batch(2000, 64), tick);
  }
  return *r;
}

// R = 200 that halves at 5 s and comes back at 15 s; 4000 prompts, 64 workers.
const pacing_sim::result& tracking_run() {
  static std::optional<pacing_sim::result> r;
  if (!r) {
    auto s = limiter(200);
    s.schedule = {{std::chrono::seconds(5), 100, 0}, {std::chrono::seconds(15), 200, 0}};
    r = pacing_sim::run(s, batch(4000, 64), tick);
  }
  return *r;
}

// A server limited only in LLM tokens: 600,000 per minute (10,000/s, 100 calls of 100 tokens),
// bucket of 1,000 tokens (10 calls).
pacing_sim::result token_run(std::size_t prompts, std::uint64_t client_seed = seed) {
  auto s = limiter(0);
  s.tokens_per_minute = 600'000;
  s.token_burst = 1'000;
  auto c = batch(prompts, 64);
  c.seed = client_seed;
  c.tokens_per_prompt = 100;
  return pacing_sim::run(s, c, tick);
}

}  // namespace

// ---- startup ----

TEST_CASE("without a configured limit the controller starts with a window of 16 calls",
          "[rate_controller]") {
  rig r;
  const keel::pacing_state s = r.pacing.requests();
  CHECK(s.phase == keel::pacing_phase::startup);
  CHECK(s.window == 16);
  CHECK(s.rate == 0);
  CHECK(s.estimate == 0);
  CHECK(r.pacing.tokens().phase == keel::pacing_phase::unlimited);
  // The request bucket is the window: 16 slots, refilled at the window's growth rate (before
  // any answer it doubles every 100 ms: 16 x ln 2 / 100 ms per second at first).
  CHECK(r.bucket.options().burst == 16);
  CHECK(r.bucket.options().requests_per_second == Approx(16 * std::log(2.0) / 0.1));
  CHECK(r.bucket.options().tokens_per_minute == 0);

  for (int i = 0; i < 16; ++i) {
    CHECK(r.bucket.try_acquire());
  }
  CHECK_FALSE(r.bucket.try_acquire());
}

TEST_CASE(
    "the startup ramp doubles once per round trip, answered or not; only slow answers free"
    " slots",
    "[rate_controller]") {
  rig r;
  std::vector<ticket> flight;
  for (int i = 0; i < 16; ++i) {
    flight.push_back(r.send());
  }
  CHECK_FALSE(r.bucket.try_acquire());

  // Answers within 10 ms do not free slots: a server that answers in a millisecond would pull
  // a whole window into its first 429s.
  advance_to(1ms);
  for (const ticket& t : flight) {
    r.pacing.on_accepted(t);
  }
  flight.clear();
  CHECK_FALSE(r.bucket.try_acquire());
  CHECK(r.pacing.requests().window == Approx(16).epsilon(0.05));

  // With a 1 ms round trip known, the ramp doubles every 25 ms (its fastest).
  advance_to(26ms);
  int more = 0;
  while (r.bucket.try_acquire()) {
    flight.push_back(r.pacing.on_send());
    ++more;
  }
  CHECK(more >= 8);
  CHECK(more <= 16);
  CHECK(r.pacing.requests().window == Approx(32).epsilon(0.05));

  // An answer that took 10 ms or more gives its slot back at once.
  advance_to(40ms);
  while (r.bucket.try_acquire()) {
    flight.push_back(r.pacing.on_send());
  }
  r.pacing.on_accepted(flight.front());  // sent at 26 ms: 14 ms ago
  CHECK(r.bucket.try_acquire());
  flight.push_back(r.pacing.on_send());

  // By 176 ms the burst has doubled six times since 26 ms: over 1,000.
  advance_to(176ms);
  r.pacing.on_accepted(flight.back());
  CHECK(r.pacing.requests().window >= 1000);
  CHECK(r.pacing.requests().phase == keel::pacing_phase::startup);
  CHECK(r.pacing.requests().rejections == 0);
}

TEST_CASE("before any answer the startup ramp doubles every 100 ms", "[rate_controller]") {
  // A remote server's 429s take a network round trip: 16 x 2^(RTT / 25 ms) calls would go
  // into a burst limit before the first one came back.
  rig r;
  for (int i = 0; i < 16; ++i) {
    (void)r.send();
  }
  advance_to(100ms);
  int more = 0;
  while (r.bucket.try_acquire()) {
    (void)r.pacing.on_send();
    ++more;
  }
  CHECK(more >= 8);  // the ramp earned about 16 (one doubling)
  CHECK(more <= 17);
  CHECK(r.pacing.requests().window == Approx(32).epsilon(0.02));
}

TEST_CASE("the startup window of a server that never throttles stays finite", "[rate_controller]") {
  // Minutes of sends with no 429: the window doubles every 100 ms at most, and would pass
  // the largest double (2^1024) after about 100 s.
  rig r;
  for (int k = 1; k <= 3000; ++k) {
    advance_to(std::chrono::milliseconds(100 * k));
    const ticket t = r.pacing.on_send({1, 0});
    r.pacing.on_accepted(t);
  }
  const keel::pacing_state s = r.pacing.requests();
  CHECK(s.phase == keel::pacing_phase::startup);
  CHECK(std::isfinite(s.window));
  CHECK(s.window == Approx(1e9));
  CHECK(std::isfinite(r.bucket.options().burst));
}

// ---- search ----

// The startup window's 16 calls go out at once; at 10 ms the first comes back a 429 (search
// then paces at 15/s: 16 sent over the last second, 1 refused). Returns the 16 tickets.
namespace {
std::vector<ticket> first_window_then_429(rig& r) {
  std::vector<ticket> flight;
  for (int i = 0; i < 16; ++i) {
    flight.push_back(r.send());
  }
  advance_to(10ms);
  r.pacing.on_throttled(flight[0], keel::limit_kind::requests);
  return flight;
}
}  // namespace

TEST_CASE("the first 429 ends startup: the controller paces the bucket at the accepted rate",
          "[rate_controller]") {
  rig r;
  const std::vector<ticket> flight = first_window_then_429(r);

  const keel::pacing_state s = r.pacing.requests();
  CHECK(s.phase == keel::pacing_phase::search);
  CHECK(s.rejections == 1);
  CHECK(s.window == 0);
  // 16 sent over the last second, 1 rejected.
  CHECK(s.rate == Approx(15));
  // The throttler is now rate-paced, with a burst of 50 ms at the rate (at least one request).
  CHECK(r.bucket.options().requests_per_second == Approx(s.rate));
  CHECK(r.bucket.options().burst == 1);
  CHECK(r.pacing.tokens().phase == keel::pacing_phase::unlimited);

  // Answers no longer widen anything or release slots.
  for (std::size_t i = 1; i < flight.size(); ++i) {
    r.pacing.on_accepted(flight[i]);
  }
  CHECK(r.pacing.requests().phase == keel::pacing_phase::search);
  CHECK(r.pacing.requests().rate == Approx(15));
  CHECK(r.bucket.options().requests_per_second == Approx(15));
}

TEST_CASE(
    "search doubles the rate every 50 ms while calls wait for the bucket, holds it while none "
    "wait, and grows by one doubling after a stall",
    "[rate_controller]") {
  rig r;
  const std::vector<ticket> flight = first_window_then_429(r);
  REQUIRE(r.pacing.requests().rate == Approx(15));

  // Nobody waits for the bucket: the rate holds.
  advance_to(300ms);
  r.pacing.on_accepted(flight[1]);
  CHECK(r.pacing.requests().rate == Approx(15));

  // Four callers now; one is granted from the refilled bucket, three wait.
  std::vector<std::chrono::nanoseconds> granted;
  for (int i = 0; i < 4; ++i) {
    asio::co_spawn(r.ctx, take(r.bucket, granted), asio::detached);
  }
  keel::testing::poll_all(r.ctx);
  REQUIRE(granted.size() == 1);
  REQUIRE(r.bucket.waiters() == 3);

  SECTION("100 ms with callers waiting: two doublings") {
    advance_to(400ms);
    r.pacing.on_accepted(flight[2]);
    CHECK(r.pacing.requests().phase == keel::pacing_phase::search);
    CHECK(r.pacing.requests().rate == Approx(60));
    CHECK(r.bucket.options().requests_per_second == Approx(60));
  }
  SECTION("a stall: one doubling") {
    // 400 ms pass with three callers waiting and nothing run (the io_context is not polled:
    // the bucket would have granted six). Search used to double once per 50 ms of it, 2^8
    // here, and send every waiting call at once.
    advance_to(700ms);
    r.pacing.on_accepted(flight[2]);
    CHECK(r.pacing.requests().phase == keel::pacing_phase::search);
    CHECK(r.pacing.requests().rate == Approx(30));
  }
}

TEST_CASE("search does not grow over a silence in which no caller waited for the bucket",
          "[rate_controller]") {
  rig r;
  const std::vector<ticket> flight = first_window_then_429(r);
  REQUIRE(r.pacing.requests().rate == Approx(15));
  for (std::size_t i = 1; i < flight.size(); ++i) {
    r.pacing.on_throttled(flight[i], keel::limit_kind::requests);
  }
  // Every caller sleeps out its Retry-After (1 s): nobody waits for the bucket. Then the first
  // comes back, takes the token the bucket saved, and the second waits 66.7 ms (at 15/s).
  advance_to(1010ms);
  REQUIRE(r.bucket.try_acquire());
  std::vector<std::chrono::nanoseconds> granted;
  asio::co_spawn(r.ctx, take(r.bucket, granted), asio::detached);
  keel::testing::poll_all(r.ctx);
  REQUIRE(r.bucket.waiters() == 1);
  advance_to(1080ms);
  keel::testing::poll_all(r.ctx);
  REQUIRE(granted.size() == 1);
  // Both send; the controller hears of nothing between the last 429 and these sends.
  const ticket t1 = r.pacing.on_send();
  const ticket t2 = r.pacing.on_send();
  // Growth for the 66.7 ms the rate held a caller back (2^(66.7 / 50)), not for the second
  // before it: that was credited as 21 doublings, and every caller went into the limit at once.
  CHECK(r.pacing.requests().phase == keel::pacing_phase::search);
  CHECK(r.pacing.requests().rate == Approx(15 * std::exp2((1000.0 / 15) / 50)));
  r.pacing.on_accepted(t1);
  r.pacing.on_accepted(t2);
}

// ---- configured and advertised limits ----

TEST_CASE("a configured request ceiling makes the phase fixed at that rate", "[rate_controller]") {
  rig r{with_ceiling(50)};
  const keel::pacing_state s = r.pacing.requests();
  CHECK(s.phase == keel::pacing_phase::fixed);
  CHECK(s.rate == 50);
  CHECK(s.window == 0);
  CHECK(s.estimate == 0);
  CHECK(r.bucket.options().requests_per_second == 50);
  CHECK(r.bucket.options().burst == Approx(2.5));  // 50 ms at 50/s

  // A 429 alone teaches nothing yet: the rate stays.
  const ticket t = r.send();
  r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
  CHECK(r.pacing.requests().rate == 50);
  CHECK(r.bucket.paused_until() == manual_clock::time_point{});
}

TEST_CASE(
    "the controller never paces above a configured ceiling, even when probing a limit "
    "that rose far above it",
    "[rate_controller]") {
  // The server allows 100/s, then 1000/s from t = 3 s; the ceiling is 150/s.
  auto s = limiter(100);
  s.schedule = {{std::chrono::seconds(3), 1000, 0}};
  auto c = batch(600, 64);
  c.pacing.max_requests_per_second = 150;
  const pacing_sim::result res = pacing_sim::run(s, c, tick);
  CAPTURE(res.wall_s, res.final_requests.rate, res.final_requests.estimate);

  CHECK(res.failed == 0);
  REQUIRE(res.bins.size() > 40);
  CHECK(res.bins[0].rate == 150);
  double lowest_before_change = 150;
  double highest = 0;
  for (std::size_t i = 0; i < res.bins.size(); ++i) {
    CAPTURE(i);
    CHECK(res.bins[i].rate <= 150);
    highest = std::max(highest, res.bins[i].rate);
    if (bin_start(i) < 3) {
      lowest_before_change = std::min(lowest_before_change, res.bins[i].rate);
    }
  }
  // 429s below the ceiling taught it the server's 100/s...
  CHECK(lowest_before_change < 105);
  // ...and after the change, probing went back up to the ceiling and stopped there.
  CHECK(res.final_requests.rate == Approx(150));
  CHECK(highest == Approx(150));
}

TEST_CASE(
    "an advertised limit sets the estimate and the rate at once, and 429s below it still "
    "lower the rate",
    "[rate_controller]") {
  rig r;
  r.pacing.on_advertised(600, std::nullopt);  // 600 per minute
  keel::pacing_state s = r.pacing.requests();
  CHECK(s.phase == keel::pacing_phase::fixed);
  CHECK(s.estimate == Approx(10));
  CHECK(s.rate == Approx(10));
  CHECK(s.window == 0);
  CHECK(r.bucket.options().requests_per_second == Approx(10));
  CHECK(r.pacing.tokens().phase == keel::pacing_phase::unlimited);

  // The key is shared: the server accepts only every other call (5/s) of the 10/s sent.
  for (int k = 1; k <= 18; ++k) {
    advance_to(std::chrono::milliseconds(100 * (k - 1)));
    const ticket t = r.pacing.on_send({1, 0});
    advance_to(now() + 1ms);
    if (k % 2 == 0) {
      r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
    } else {
      r.pacing.on_accepted(t);
    }
    if (k == 2) {
      // One 429 measures nothing.
      CHECK(r.pacing.requests().rate == Approx(10));
    }
  }
  s = r.pacing.requests();
  CHECK(s.phase == keel::pacing_phase::cruise);
  CHECK(s.estimate == Approx(5));
  CHECK(s.rate == Approx(0.97 * 5));
  CHECK(r.bucket.options().requests_per_second == Approx(0.97 * 5));
  // Plain 429s while calls get through never pause the shared bucket.
  CHECK(r.bucket.paused_until() == manual_clock::time_point{});
}

TEST_CASE("advertised limits that are absent, zero, negative or not finite change nothing",
          "[rate_controller]") {
  rig r;
  r.pacing.on_advertised(std::nullopt, std::nullopt);
  r.pacing.on_advertised(0, -60);
  r.pacing.on_advertised(std::numeric_limits<double>::quiet_NaN(),
                         std::numeric_limits<double>::infinity());
  CHECK(r.pacing.requests().phase == keel::pacing_phase::startup);
  CHECK(r.pacing.requests().window == 16);
  CHECK(r.pacing.tokens().phase == keel::pacing_phase::unlimited);
  CHECK(r.bucket.options().burst == 16);
  CHECK(r.bucket.options().tokens_per_minute == 0);
}

// ---- the estimator ----

TEST_CASE("the estimate is the work accepted between two rejections over their span by send time",
          "[rate_controller]") {
  // Paced at a ceiling of 100/s; the script sends every 10 ms (seq k at (k - 1) x 10 ms) and the
  // server rejects seq 5, 25 and then a wave of four calls sent together at 400 ms.
  rig r{with_ceiling(100)};
  const bool answers_in_flight = GENERATE(false, true);
  CAPTURE(answers_in_flight);
  // Answers of accepted calls either come back at once, or are still in flight (LLM answers take
  // seconds): a send not rejected within the 429 latency counts as accepted either way.
  auto accepted = [&](const ticket& t) {
    if (!answers_in_flight) {
      r.pacing.on_accepted(t);
    }
  };
  for (int k = 1; k <= 40; ++k) {
    advance_to(std::chrono::milliseconds(10 * (k - 1)));
    const ticket t = r.pacing.on_send({1, 0});
    if (k == 5 || k == 25) {
      advance_to(now() + 5ms);  // 429s come back in 5 ms
      r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
    } else {
      accepted(t);
    }
    if (k == 25) {
      // Seq 6..24 accepted (19) over 200 ms of send time.
      const keel::pacing_state s = r.pacing.requests();
      CHECK(s.phase == keel::pacing_phase::cruise);
      CHECK(s.samples == 1);
      CHECK(s.estimate == Approx(19 / 0.2));
      CHECK(s.rate == Approx(0.97 * 19 / 0.2));
    }
  }
  // The wave: seq 41..44, all sent at 400 ms and all rejected. The last one's 429 is reported
  // first; until the others are reported they must not count as accepted.
  advance_to(400ms);
  std::vector<ticket> wave;
  for (int i = 0; i < 4; ++i) {
    wave.push_back(r.pacing.on_send({1, 0}));
  }
  REQUIRE(wave.back().seq == 44);
  advance_to(405ms);
  r.pacing.on_throttled(wave[3], keel::limit_kind::requests, 1s);
  // Between seq 5 (sent at 40 ms) and seq 44 (sent at 400 ms): seq 6..40 minus seq 25 = 34
  // accepted. Counting the unreported 41..43 would make it 37 (102.8/s, above the ceiling).
  const double expected = 34 / 0.36;
  CHECK(r.pacing.requests().estimate == Approx(expected));
  advance_to(406ms);
  for (int i = 0; i < 3; ++i) {
    r.pacing.on_throttled(wave[static_cast<std::size_t>(i)], keel::limit_kind::requests, 1s);
  }
  const keel::pacing_state s = r.pacing.requests();
  CHECK(s.estimate == Approx(expected));
  CHECK(s.rate == Approx(0.97 * expected));
  CHECK(s.rejections == 6);
  CHECK(r.bucket.options().requests_per_second == Approx(0.97 * expected));
  // None of these 429s paused the shared bucket: calls got through between them.
  CHECK(r.bucket.paused_until() == manual_clock::time_point{});
}

// Paced at a ceiling of 100/s, sends every 10 ms (seq k at (k - 1) x 10 ms) of which seq 5 and
// 25 are refused (429s in 5 ms) and the rest answered at once: the estimate is 19 / 0.2 s = 95/s
// (cruise, paced at 92.15/s), and the episode ends 250 ms after the last 429.
void learn_95_per_second(rig& r) {
  for (int k = 1; k <= 25; ++k) {
    advance_to(std::chrono::milliseconds(10 * (k - 1)));
    const ticket t = r.pacing.on_send({1, 0});
    if (k == 5 || k == 25) {
      advance_to(now() + 5ms);
      r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
    } else {
      r.pacing.on_accepted(t);
    }
  }
  REQUIRE(r.pacing.requests().estimate == Approx(95));
}

TEST_CASE(
    "an odd 429 at the plateau lowers the estimate by the share refused, not to the rate "
    "the client sent",
    "[rate_controller]") {
  rig r{with_ceiling(100)};
  learn_95_per_second(r);
  // Then 45 sends at the paced rate, within the plateau; the server refuses only the last (a
  // tight bucket and a bunched send). Between seq 25 and 70: 44 sent, none refused.
  const auto step = std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::duration<double>(1 / (0.97 * 95)));
  const auto t25 = std::chrono::milliseconds(240);
  for (int k = 26; k <= 70; ++k) {
    advance_to(t25 + (k - 25) * step);
    const ticket t = r.pacing.on_send({1, 0});
    if (k == 70) {
      advance_to(now() + 5ms);
      REQUIRE(r.pacing.requests().phase == keel::pacing_phase::cruise);
      r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
    } else {
      r.pacing.on_accepted(t);
    }
  }
  // 1 refused of 45: the estimate goes down by 1/45, not to the 44 / 0.488 s = 90.1/s the
  // client itself sent (which a cut at every such 429 ratchets down from).
  const keel::pacing_state s = r.pacing.requests();
  CHECK(s.estimate == Approx(95 * (1 - 1.0 / 45)));
  CHECK(s.rate == Approx(0.97 * 95 * (1 - 1.0 / 45)));
}

TEST_CASE("a probe that goes on over a stall raises the rate by one round, not ten",
          "[rate_controller]") {
  rig r;
  learn_95_per_second(r);
  const double base = r.pacing.requests().rate;
  // The episode ends (quiet), the plateau (at most 1 s) passes, and with callers waiting for
  // the bucket the probe begins.
  advance_to(1500ms);
  r.pacing.on_accepted(r.pacing.on_send());
  REQUIRE(r.pacing.requests().phase == keel::pacing_phase::cruise);
  advance_to(2600ms);
  std::vector<std::chrono::nanoseconds> granted;
  while (r.bucket.try_acquire()) {
  }
  for (int i = 0; i < 4; ++i) {
    asio::co_spawn(r.ctx, take(r.bucket, granted), asio::detached);
  }
  keel::testing::poll_all(r.ctx);
  REQUIRE(r.bucket.waiters() > 0);
  r.pacing.on_accepted(r.pacing.on_send());
  REQUIRE(r.pacing.requests().phase == keel::pacing_phase::probe);

  // 2 s with callers waiting and nothing run (the bucket would have granted about 180): one
  // more round of 100 ms at most, gain 0.02 x (2^2 - 1). Crediting the 2 s went to round 10:
  // 21 x the base rate, and every waiting call at once.
  // (One event: the rate the bucket releases its waiters at.)
  advance_to(4600ms);
  const ticket t = r.pacing.on_send();
  CHECK(r.pacing.requests().phase == keel::pacing_phase::probe);
  CHECK(r.pacing.requests().rate <= base * (1 + 0.02 * 3) + 1e-9);
  CHECK(r.pacing.requests().rate > base);
  CHECK(r.bucket.options().requests_per_second == Approx(r.pacing.requests().rate));
  r.pacing.on_accepted(t);
}

TEST_CASE("429s of one episode that under-measure the limit cut the margin once, not once each",
          "[rate_controller]") {
  rig r{with_ceiling(100)};
  learn_95_per_second(r);
  // Then the client sends slowly (callers parked by Retry-After: every 15 ms, 67/s) and seq 30,
  // 40 and 50 are refused, 150 ms apart: one episode. Each 429 came for a call sent after the
  // previous cut, but the pairs (60/s) under-measure: the client did not keep the server busy.
  for (int k = 26; k <= 50; ++k) {
    advance_to(600ms + (k - 26) * 15ms);
    const ticket t = r.pacing.on_send({1, 0});
    if (k % 10 == 0) {
      advance_to(now() + 5ms);
      r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
    } else {
      r.pacing.on_accepted(t);
    }
  }
  // One margin off the estimate the episode opened with (a margin per 429 would be 95 x 0.97^3).
  const keel::pacing_state s = r.pacing.requests();
  CHECK(s.rejections == 5);
  CHECK(s.estimate == Approx(95 * 0.97));
}

TEST_CASE("429s of a wave reported later than the usual 429 latency do not raise the estimate",
          "[rate_controller]") {
  // As above, but the three earlier members of the wave take 20 ms to come back instead of the
  // 5 ms seen so far, and a send in between lets the controller decide they were accepted.
  // Reporting one more rejection used to raise the estimate from 34 / 0.36 to 36 / 0.36: only a
  // 429 that extends the episode is evaluated now.
  rig r{with_ceiling(1000)};
  for (int k = 1; k <= 40; ++k) {
    advance_to(std::chrono::milliseconds(10 * (k - 1)));
    const ticket t = r.pacing.on_send({1, 0});
    if (k == 5 || k == 25) {
      advance_to(now() + 5ms);
      r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
    } else {
      r.pacing.on_accepted(t);
    }
  }
  advance_to(400ms);
  std::vector<ticket> wave;
  for (int i = 0; i < 4; ++i) {
    wave.push_back(r.pacing.on_send({1, 0}));
  }
  advance_to(405ms);
  r.pacing.on_throttled(wave[3], keel::limit_kind::requests, 1s);
  const double expected = 34 / 0.36;
  REQUIRE(r.pacing.requests().estimate == Approx(expected));
  advance_to(410ms);
  r.pacing.on_accepted(r.pacing.on_send({1, 0}));
  advance_to(420ms);
  for (int i = 0; i < 3; ++i) {
    r.pacing.on_throttled(wave[static_cast<std::size_t>(i)], keel::limit_kind::requests, 1s);
    CAPTURE(i);
    CHECK(r.pacing.requests().estimate <= Approx(expected));
  }
}

// ---- blocks ----

TEST_CASE(
    "429s with nothing accepted for 250 ms pause the bucket for their Retry-After, and it "
    "resumes at its rate",
    "[rate_controller]") {
  rig r{with_ceiling(20)};  // one call per 50 ms, burst 1
  std::vector<std::chrono::nanoseconds> granted;
  for (int i = 0; i < 60; ++i) {
    asio::co_spawn(r.ctx, take(r.bucket, granted), asio::detached);
  }
  // The server refuses everything (its quota is exhausted) and says Retry-After: 2.
  for (int k = 0; k <= 5; ++k) {
    if (k > 0) {
      keel::testing::run_for(r.ctx, 50ms);
    }
    const ticket t = r.pacing.on_send({1, 0});
    r.pacing.on_throttled(t, keel::limit_kind::requests, 2s);
    if (k < 5) {
      CAPTURE(k);
      CHECK(r.bucket.paused_until() == manual_clock::time_point{});
    }
  }
  // The sixth 429 (at 250 ms) makes the span of refusals 250 ms: everybody waits 2 s.
  CHECK(r.bucket.paused_until() == manual_clock::time_point{2250ms});
  CHECK(granted.size() == 6);  // 0, 50, ..., 250 ms

  keel::testing::run_for(r.ctx, 3250ms - now());
  std::size_t during = 0;
  std::size_t after = 0;
  for (const auto at : granted) {
    if (at > 250ms && at < 2250ms) {
      ++during;
    } else if (at >= 2250ms) {
      ++after;
    }
  }
  CHECK(during == 0);
  // After the pause the waiters come out at 20/s, not all at once.
  CHECK(after >= 19);
  CHECK(after <= 21);
  for (std::size_t i = 1; i < granted.size(); ++i) {
    if (granted[i - 1] >= 2250ms) {
      CAPTURE(i, granted[i - 1].count(), granted[i].count());
      CHECK(granted[i] - granted[i - 1] >= 49ms);
    }
  }
}

TEST_CASE("a block's pause is capped at max_pause", "[rate_controller]") {
  keel::rate_controller_options o = with_ceiling(20);
  o.max_pause = 10s;
  rig r{o};
  for (int k = 0; k <= 5; ++k) {
    advance_to(std::chrono::milliseconds(50 * k));
    const ticket t = r.pacing.on_send({1, 0});
    r.pacing.on_throttled(t, keel::limit_kind::requests, 3600s);
  }
  CHECK(r.bucket.paused_until() == manual_clock::time_point{250ms + 10s});
}

TEST_CASE("a 429 with Retry-After while calls get through does not pause the bucket",
          "[rate_controller]") {
  rig r{with_ceiling(20)};
  SECTION("every fourth call rejected for 300 ms") {
    for (int k = 0; k < 20; ++k) {
      advance_to(std::chrono::milliseconds(50 * k));
      const ticket t = r.pacing.on_send({1, 0});
      advance_to(now() + 1ms);
      if (k % 4 == 3) {
        r.pacing.on_throttled(t, keel::limit_kind::requests, 30s);
      } else {
        r.pacing.on_accepted(t);
      }
      CAPTURE(k);
      CHECK(r.bucket.paused_until() == manual_clock::time_point{});
    }
    CHECK(r.pacing.requests().rejections == 5);
  }
  SECTION("every call rejected, but over less than 250 ms") {
    for (int k = 0; k < 4; ++k) {
      advance_to(std::chrono::milliseconds(50 * k));
      const ticket t = r.pacing.on_send({1, 0});
      r.pacing.on_throttled(t, keel::limit_kind::requests, 30s);
    }
    CHECK(r.pacing.requests().rejections == 4);
    CHECK(r.bucket.paused_until() == manual_clock::time_point{});
  }
}

TEST_CASE(
    "callers parked by Retry-After who come back and are all refused again make a block; "
    "one of them accepted does not",
    "[rate_controller]") {
  for (const bool one_accepted : {false, true}) {
    DYNAMIC_SECTION("one accepted: " << one_accepted) {
      rig r;
      // Three callers, each refused with Retry-After 300 ms; nobody sends while they wait.
      for (int i = 0; i < 3; ++i) {
        const ticket t = r.pacing.on_send({1, 0});
        advance_to(now() + 1ms);
        r.pacing.on_throttled(t, keel::limit_kind::requests, 300ms);
      }
      CHECK(r.bucket.paused_until() == manual_clock::time_point{});
      // They come back 300 ms later.
      advance_to(303ms);
      std::vector<ticket> back;
      for (int i = 0; i < 3; ++i) {
        back.push_back(r.pacing.on_send({1, 0}));
      }
      advance_to(now() + 1ms);
      if (one_accepted) {
        r.pacing.on_accepted(back[1]);
      }
      for (int i = 0; i < 3; ++i) {
        if (!(one_accepted && i == 1)) {
          r.pacing.on_throttled(back[static_cast<std::size_t>(i)], keel::limit_kind::requests,
                                300ms);
        }
      }
      if (one_accepted) {
        CHECK(r.bucket.paused_until() == manual_clock::time_point{});
      } else {
        CHECK(r.bucket.paused_until() == manual_clock::time_point{304ms + 300ms});
      }
    }
  }
}

// ---- token limits ----

TEST_CASE("token 429s put the token dimension in search and then cruise, leaving requests alone",
          "[rate_controller]") {
  rig r;
  // A call of 100 tokens every millisecond; the server rejects seq 5 and seq 10 for tokens.
  for (int k = 1; k <= 10; ++k) {
    advance_to(std::chrono::milliseconds(k - 1));
    const ticket t = r.pacing.on_send({1, 100});
    if (k == 5 || k == 10) {
      r.pacing.on_throttled(t, keel::limit_kind::tokens, 1s);
    } else {
      r.pacing.on_accepted(t);
    }
    if (k == 5) {
      const keel::pacing_state tok = r.pacing.tokens();
      CHECK(tok.phase == keel::pacing_phase::search);
      CHECK(tok.rejections == 1);
      // 500 tokens sent over the last second, 100 rejected.
      CHECK(tok.rate == Approx(400));
      CHECK(r.bucket.options().tokens_per_minute == Approx(400 * 60));
    }
  }
  // Seq 6..9 (400 tokens) accepted over 5 ms.
  const keel::pacing_state tok = r.pacing.tokens();
  CHECK(tok.phase == keel::pacing_phase::cruise);
  CHECK(tok.estimate == Approx(400 / 0.005));
  CHECK(tok.rate == Approx(0.97 * 400 / 0.005));
  CHECK(r.bucket.options().tokens_per_minute == Approx(tok.rate * 60));
  CHECK(r.bucket.options().token_burst >= 100);

  // The request dimension is still a window (which time widened).
  const keel::pacing_state req = r.pacing.requests();
  CHECK(req.phase == keel::pacing_phase::startup);
  CHECK(req.rejections == 0);
  CHECK(req.rate == 0);
  CHECK(req.window >= 16);
  CHECK(r.bucket.options().burst == req.window);
}

// ---- options ----

TEST_CASE("negative and non-finite options are normalized", "[rate_controller]") {
  constexpr double inf = std::numeric_limits<double>::infinity();
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  keel::rate_controller_options o;
  o.max_requests_per_second = inf;
  o.max_tokens_per_minute = nan;
  o.initial_window = -4;
  o.margin = nan;
  o.burst_time = -1s;
  o.search_doubling = -5ms;
  o.quiet = -1s;
  o.min_sample = -inf;
  o.plateau_min = 2s;
  o.plateau_max = -1s;
  o.probe_round = 0ns;
  o.probe_step = nan;
  o.block_span = -1s;
  o.max_pause = -1s;
  o.min_requests_per_second = -1;
  rig r{o};

  // An infinite ceiling is no ceiling; a negative window is the smallest one.
  keel::pacing_state s = r.pacing.requests();
  CHECK(s.phase == keel::pacing_phase::startup);
  CHECK(s.window == 1);
  CHECK(r.pacing.tokens().phase == keel::pacing_phase::unlimited);
  CHECK(finite_options(r.bucket.options()));
  CHECK(r.bucket.options().burst == 1);

  // Drive it through every phase; nothing may become NaN, infinite or negative.
  std::vector<ticket> flight;
  for (int k = 0; k < 400; ++k) {
    advance_to(std::chrono::milliseconds(5 * k));
    const ticket t = r.pacing.on_send({1, k % 3 == 0 ? nan : 50.0});
    if (k % 7 == 3) {
      r.pacing.on_throttled(t, k % 2 == 0 ? keel::limit_kind::tokens : keel::limit_kind::unknown,
                            k % 5 == 0 ? std::optional<std::chrono::nanoseconds>(-1s)
                                       : std::optional<std::chrono::nanoseconds>(3600s));
    } else if (k % 11 == 0) {
      r.pacing.on_abandoned(t);
    } else {
      r.pacing.on_accepted(t);
    }
    s = r.pacing.requests();
    CAPTURE(k, s.rate, s.estimate, keel::to_string(s.phase));
    REQUIRE(finite_state(s));
    REQUIRE(finite_state(r.pacing.tokens()));
    REQUIRE(finite_options(r.bucket.options()));
  }
  s = r.pacing.requests();
  CHECK(s.phase != keel::pacing_phase::startup);
  CHECK(s.rate >= 1e-6);  // never below the (normalized) minimum rate
  CHECK(r.pacing.tokens().phase != keel::pacing_phase::unlimited);
  CHECK(r.bucket.options().requests_per_second > 0);
}

TEST_CASE("pacing phases have names", "[rate_controller]") {
  CHECK(std::string(keel::to_string(keel::pacing_phase::unlimited)) == "unlimited");
  CHECK(std::string(keel::to_string(keel::pacing_phase::startup)) == "startup");
  CHECK(std::string(keel::to_string(keel::pacing_phase::search)) == "search");
  CHECK(std::string(keel::to_string(keel::pacing_phase::cruise)) == "cruise");
  CHECK(std::string(keel::to_string(keel::pacing_phase::probe)) == "probe");
  CHECK(std::string(keel::to_string(keel::pacing_phase::fixed)) == "fixed");
}

// ---- a fleet's shares and probes (keel/redis/shared_rate.hpp) ----

// Sends and accepts one call if the bucket has room, `n` times, `step` apart: the controller
// sees events (its phases advance lazily).
void accept_calls(rig& r, int n, std::chrono::nanoseconds step) {
  for (int i = 0; i < n; ++i) {
    advance_to(now() + step);
    if (r.bucket.try_acquire({1, 0})) {
      r.pacing.on_accepted(r.pacing.on_send({1, 0}));
    }
  }
}

TEST_CASE("adopt_share sets the estimate to the fleet's share, out of startup or search",
          "[rate_controller]") {
  rig r;
  REQUIRE(r.pacing.requests().phase == keel::pacing_phase::startup);
  r.pacing.adopt_share(100);
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);
  CHECK(r.pacing.requests().estimate == 100);
  CHECK(r.pacing.requests().rate == Approx(97));  // (1 - margin) x the share
  CHECK(r.bucket.options().requests_per_second == Approx(97));

  // A share that is not positive or not finite changes nothing.
  r.pacing.adopt_share(0);
  r.pacing.adopt_share(-3);
  r.pacing.adopt_share(std::numeric_limits<double>::quiet_NaN());
  r.pacing.adopt_share(std::numeric_limits<double>::infinity());
  CHECK(r.pacing.requests().estimate == 100);

  // A new share replaces the estimate.
  r.pacing.adopt_share(50);
  CHECK(r.pacing.requests().estimate == 50);
  CHECK(r.bucket.options().requests_per_second == Approx(48.5));

  // While it reacts to a 429 of its own, the episode decides, not the fleet.
  const ticket t = r.send();
  r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
  const double reacting = r.pacing.requests().estimate;
  r.pacing.adopt_share(200);
  CHECK(r.pacing.requests().estimate == reacting);
  CHECK(reacting < 100);

  // A ceiling (configured or advertised) is knowledge of its own.
  rig configured{with_ceiling(20)};
  configured.pacing.adopt_share(100);
  CHECK(configured.pacing.requests().phase == keel::pacing_phase::fixed);
  CHECK(configured.bucket.options().requests_per_second == 20);
}

TEST_CASE(
    "a follower of the fleet's probes does not probe on its own and probes by the leader's "
    "gain",
    "[rate_controller]") {
  rig alone;
  alone.pacing.adopt_share(100);
  accept_calls(alone, 50, 50ms);  // 2.5 s: past any plateau
  CHECK(alone.pacing.requests().phase == keel::pacing_phase::probe);
  CHECK(alone.pacing.requests().gain > 0);

  rig r;
  r.pacing.adopt_share(100);
  r.pacing.follow_probes(0);
  accept_calls(r, 50, 50ms);
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);
  CHECK(r.pacing.requests().gain == 0);
  CHECK(r.bucket.options().requests_per_second == Approx(97));

  // The leader probes at +50%: so does the follower, on its own plateau rate.
  r.pacing.follow_probes(0.5);
  CHECK(r.pacing.requests().phase == keel::pacing_phase::probe);
  CHECK(r.pacing.requests().rate == Approx(145.5));
  CHECK(r.pacing.requests().gain == Approx(0.5));
  CHECK(r.bucket.options().requests_per_second == Approx(145.5));
  // The leader's probe is over: back to the plateau.
  r.pacing.follow_probes(0);
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);
  CHECK(r.bucket.options().requests_per_second == Approx(97));
  // A gain that is negative or not finite is none.
  r.pacing.follow_probes(-1);
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);
  r.pacing.follow_probes(std::numeric_limits<double>::quiet_NaN());
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);

  // Its own 429 in a followed probe is its own episode: the probe stops for it at once.
  r.pacing.follow_probes(0.5);
  REQUIRE(r.pacing.requests().phase == keel::pacing_phase::probe);
  const ticket t = r.send();
  r.pacing.on_throttled(t, keel::limit_kind::requests, 1s);
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);
  CHECK(r.pacing.requests().rejections == 1);
}

TEST_CASE("lead() gives a follower its own probes back; end_probe() ends one without a 429",
          "[rate_controller]") {
  rig r;
  r.pacing.adopt_share(100);
  r.pacing.follow_probes(0.3);
  REQUIRE(r.pacing.requests().phase == keel::pacing_phase::probe);
  r.pacing.lead();
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);
  CHECK(r.bucket.options().requests_per_second == Approx(97));
  accept_calls(r, 50, 50ms);  // its plateau started again at lead(), and ended
  CHECK(r.pacing.requests().phase == keel::pacing_phase::probe);

  r.pacing.end_probe();  // a follower drew this probe's 429
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);
  CHECK(r.pacing.requests().rate == Approx(97));
  CHECK(r.pacing.requests().estimate == 100);  // nothing measured: the estimate stays
  r.pacing.end_probe();                        // not probing: nothing changes
  CHECK(r.pacing.requests().phase == keel::pacing_phase::cruise);

  rig startup;
  startup.pacing.lead();       // not a follower: nothing changes
  startup.pacing.end_probe();  // not probing
  CHECK(startup.pacing.requests().phase == keel::pacing_phase::startup);
}

// ---- against simulated limiters ----

// Four processes x 64 workers x 1,000 prompts against one 200/s limiter, learning alone or
// following process 0 (keel/redis/shared_rate.hpp's protocol).
const pacing_sim::result& fleet_run(bool follow) {
  static std::array<std::optional<pacing_sim::result>, 2> runs;
  auto& r = runs[follow ? 1 : 0];
  if (!r) {
    auto c = batch(1000, 64);
    c.processes = 4;
    c.follow_leader = follow;
    r = pacing_sim::run(limiter(200), c, tick);
  }
  return *r;
}

TEST_CASE("a fleet whose processes follow one leader learns one limit without colliding",
          "[rate_controller]") {
  const pacing_sim::result& alone = fleet_run(false);
  const pacing_sim::result& shared = fleet_run(true);
  CAPTURE(alone.wall_s, alone.attempts, alone.rejected, alone.failed);
  CAPTURE(shared.wall_s, shared.attempts, shared.rejected, shared.failed,
          shared.final_requests.estimate, keel::to_string(shared.final_requests.phase));
  CHECK(shared.failed == 0);
  CHECK(shared.ok == 4000);
  CHECK(shared.wall_s <= 1.10 * 4000 / 200);
  CHECK(static_cast<double>(shared.attempts) <= 1.10 * 4000);
  // In the middle of the run the fleet as a whole is paced at the limit.
  CHECK(shared.accepted_in(5, 15) >= 0.95 * 200 * 10);
  CHECK(shared.rejected < alone.rejected);
}

TEST_CASE("a fleet's processes do not take the limit's 429s for noise while they converge",
          "[rate_controller]") {
  // Against nginx one run of four processes took 1.14 attempts per prompt: every process had
  // learned 2-5% of the limit's 429s as noise. A process's noise trial compares its own windows,
  // but the others' sends fill the limiter too: a process that halved its rate kept a share of
  // 429s while the others were still above theirs (13% of noise after 1.6 s, 1.145 attempts per
  // prompt, client seed 13 here). In a fleet a trial now needs the lower window to keep half the
  // share refused whatever the sample size, and not to refuse more than twice as much (seeds 13,
  // 17, 21), and the fleet's share to have moved with it (seed 14: 2.9% of noise without).
  const std::uint64_t client_seed = GENERATE(13, 14, 17, 21);
  pacing_sim::server_spec s;
  s.requests_per_second = 200;
  s.latency = 50ms;
  s.arrival_jitter = 5ms;
  auto c = batch(1000, 64);
  c.processes = 4;
  c.follow_leader = true;
  c.seed = client_seed;
  c.stall_every = 200ms;  // a loaded machine: four processes, nginx and Redis on two cores
  c.stall_max = 30ms;
  const pacing_sim::result res = pacing_sim::run(s, c);
  CAPTURE(client_seed, res.wall_s, res.attempts, res.rejected, res.max_noise);
  CHECK(res.failed == 0);
  CHECK(res.max_noise == 0);  // before: 0.133, 0.029, 0.058, 0.033
  CHECK(static_cast<double>(res.attempts) <= 1.10 * 4000);
}

TEST_CASE("against a 200/s limiter the batch converges to its rate, with or without Retry-After",
          "[rate_controller]") {
  const bool retry_after = GENERATE(true, false);
  const pacing_sim::result& res = convergence_run(retry_after);
  CAPTURE(retry_after, res.wall_s, res.attempts, res.rejected, res.final_requests.estimate,
          res.final_requests.rate, keel::to_string(res.final_requests.phase));
  CHECK(res.failed == 0);
  CHECK(res.ok == 2000);
  CHECK(res.wall_s <= 1.10 * 2000 / 200);
  CHECK(static_cast<double>(res.attempts) <= 1.10 * 2000);
  CHECK(res.final_requests.estimate == Approx(200).epsilon(0.05));
}

TEST_CASE("after the first second no 100 ms bin sees a synchronized burst or a stall",
          "[rate_controller]") {
  const bool retry_after = GENERATE(true, false);
  const pacing_sim::result& res = convergence_run(retry_after);
  CAPTURE(retry_after, res.wall_s);
  // The server admits at most R x 0.1 + burst + 1 = 41 per bin whatever the client does, so a
  // herd shows in the attempts (every caller at once, most of them rejected) and in the empty
  // bins that follow (everybody waiting out the same Retry-After).
  constexpr double r = 200;
  constexpr double burst = 20;
  REQUIRE(res.bins.size() > 20);
  for (std::size_t i = 10; i < res.bins.size(); ++i) {
    const auto& b = res.bins[i];
    CAPTURE(bin_start(i), b.accepted, b.rejected, b.rate);
    CHECK(b.accepted <= 1.3 * r * 0.1 + burst);
    CHECK(b.accepted + b.rejected <= 1.3 * r * 0.1 + burst);
    if (bin_start(i) + 0.1 <= res.wall_s - 0.5) {
      CHECK(b.accepted >= 0.7 * r * 0.1);
    }
  }
}

// 3 x R prompts at concurrency 64 against an R r/s limiter (burst 20, Retry-After: 1), with
// requests reordered by up to 1 ms and the client process stalling (pacing_sim::client_spec).
pacing_sim::result stalling_run(double r, std::uint64_t client_seed, std::chrono::nanoseconds every,
                                std::chrono::nanoseconds max) {
  auto s = limiter(r);
  s.arrival_jitter = 1ms;
  auto c = batch(static_cast<std::size_t>(3 * r), 64);
  c.seed = client_seed;
  c.stall_every = every;
  c.stall_max = max;
  return pacing_sim::run(s, c, 100us);
}

TEST_CASE("a client process that stalls for up to 500 ms at a time still finishes every item",
          "[rate_controller]") {
  // A loaded machine (CI running tests in parallel, a VM's steal time) stops the process for
  // a while; then every timer that fell due fires at once. Before the controller knew stalls,
  // runs like these failed items: search credited the stall as time spent pacing (2^12 after
  // 300 ms), a sample across the backlog's bunched sends said hundreds or thousands of requests
  // per second, and the client herded against Retry-After: 1 to the end. Seed 11 failed 17
  // items in 725 attempts (estimate 1,347 r/s).
  const std::uint64_t client_seed = GENERATE(values<std::uint64_t>({1, 2, 3, 4, 11, 12}));
  const pacing_sim::result res = stalling_run(100, client_seed, 1s, 500ms);
  CAPTURE(client_seed, res.wall_s, res.attempts, res.rejected, res.final_requests.estimate,
          res.final_requests.noise, keel::to_string(res.final_requests.phase));
  CHECK(res.failed == 0);
  CHECK(res.ok == 300);
  CHECK(static_cast<double>(res.attempts) <= 1.5 * 300);
  CHECK(res.final_requests.estimate <= 150);
  CHECK(res.final_requests.noise <= 0.25);
}

TEST_CASE("after a stall no estimate exceeds twice what the server accepted over the last second",
          "[rate_controller]") {
  // Stalls of up to a second, twice a second on average: the backlog goes out in bunches, and
  // a sample's span says little. Without the cap, seed 11 ended at an estimate of 799 r/s with
  // 1,381 attempts for 600 items, seed 15 at 2,676 r/s.
  const std::uint64_t client_seed = GENERATE(values<std::uint64_t>({11, 15}));
  const pacing_sim::result res = stalling_run(200, client_seed, 500ms, 1s);
  CAPTURE(client_seed, res.wall_s, res.attempts, res.rejected, res.final_requests.estimate);
  CHECK(res.failed == 0);
  CHECK(static_cast<double>(res.attempts) <= 1.5 * 600);
  CHECK(res.final_requests.estimate <= 1.5 * 200);
}

TEST_CASE("the controller follows a limit that halves and comes back", "[rate_controller]") {
  const pacing_sim::result& res = tracking_run();
  CAPTURE(res.wall_s, res.attempts, res.rejected, res.final_requests.estimate);
  CHECK(res.failed == 0);
  CHECK(res.ok == 4000);
  REQUIRE(res.bins.size() > 200);
  // The estimate (what the plateaus pace at) follows the halved limit within 15%...
  for (std::size_t i = 70; i < 140; ++i) {
    CAPTURE(bin_start(i), res.bins[i].estimate, res.bins[i].rate);
    CHECK(res.bins[i].estimate == Approx(100).epsilon(0.15));
  }
  // ...and the server admits about that much.
  CHECK(res.accepted_in(7, 14) / 7 == Approx(100).epsilon(0.05));
  // Within 2 s of the limit's return the controller paces at 180/s or more.
  std::optional<double> recovered;
  for (std::size_t i = 150; i < res.bins.size() && !recovered; ++i) {
    if (res.bins[i].rate >= 180) {
      recovered = bin_start(i);
    }
  }
  REQUIRE(recovered);
  CHECK(*recovered < 17.0);
}

TEST_CASE("within 2 s of each change of the limit, throughput is within 10% of it",
          "[rate_controller]") {
  // The target: the limit halves at 5 s and comes back at 15 s. Throughput is what the
  // server admitted per second (the paced rate itself probes above the limit now and then).
  const pacing_sim::result& res = tracking_run();
  REQUIRE(res.bins.size() > 200);
  for (double from : {7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0}) {
    CAPTURE(from);
    CHECK(res.accepted_in(from, from + 1) == Approx(100).epsilon(0.10));
  }
  for (double from : {17.0, 18.0}) {
    CAPTURE(from);
    CHECK(res.accepted_in(from, from + 1) == Approx(200).epsilon(0.10));
  }
}

TEST_CASE("against an unthrottled server pacing costs nothing", "[rate_controller]") {
  auto s = limiter(0);
  s.latency = 50ms;
  auto c = batch(1000, 16);
  const pacing_sim::result paced = pacing_sim::run(s, c, tick);
  c.paced = false;
  const pacing_sim::result plain = pacing_sim::run(s, c, tick);
  CAPTURE(paced.wall_s, plain.wall_s, paced.p99_s, plain.p99_s);
  CHECK(paced.failed == 0);
  CHECK(paced.rejected == 0);
  CHECK(paced.final_requests.phase == keel::pacing_phase::startup);
  CHECK(paced.wall_s == Approx(plain.wall_s).epsilon(0.02));
  CHECK(paced.p99_s == Approx(plain.p99_s).epsilon(0.02));
}

// A server with no rate limit that answers 5% of calls 429 at random (Retry-After 10 ms): a
// busy shared pool, or keel's mock with a `rate_limit` fault.
pacing_sim::server_spec random_429s() {
  auto s = limiter(0);
  s.latency = 5ms;
  s.p_throttle = 0.05;
  s.retry_after = 10ms;
  return s;
}

TEST_CASE("429s at random whatever the rate do not hold a batch back", "[rate_controller]") {
  const std::size_t concurrency = GENERATE(1, 16, 64);
  auto c = batch(concurrency == 1 ? 2000 : (concurrency == 16 ? 5000 : 20000), concurrency);
  const pacing_sim::result paced = pacing_sim::run(random_429s(), c, tick);
  c.paced = false;
  const pacing_sim::result plain = pacing_sim::run(random_429s(), c, tick);
  // Calls per second of the last whole second of the paced run, against the plain loop's mean.
  const double end = std::floor(paced.wall_s * 10) / 10;
  const double late = paced.accepted_in(end - 1, end);
  const double plain_rate = static_cast<double>(c.prompts) / plain.wall_s;
  CAPTURE(concurrency, paced.wall_s, plain.wall_s, late, plain_rate, paced.rejected,
          paced.final_requests.estimate, paced.final_requests.rate);
  CHECK(paced.failed == 0);
  CHECK(paced.rejected >= paced.attempts / 40);  // the 429s did come (about 5%)
  // Before the controller tried its cuts, 5% random 429s took a batch from thousands of calls
  // per second to 26 (and concurrency 1 to one call every two seconds). Now the controller
  // learns within seconds that a lower rate does not reduce them, and stops pacing below the
  // client's own rate.
  CHECK(late >= 0.8 * plain_rate);
  CHECK(paced.wall_s <= plain.wall_s + 5);
  CHECK(paced.final_requests.noise > 0.02);  // learned as noise, and said so
  CHECK(paced.final_requests.noise < 0.15);
}

TEST_CASE("random 429s that cut the rate low early are still learned as noise",
          "[rate_controller]") {
  // Client seeds whose first random 429s came in the startup ramp (Retry-After 1 s, c = 64):
  // search adopted 35-50 r/s, each later random 429 cut a few percent, and a trial of a second
  // against half a second after its 429 never saw a rate 10% lower, nor 30 calls in a window
  // below 60 r/s. The estimate sank to 13 r/s and the batch took 41 s and 107 s against a plain
  // loop's 11 s (stock nginx with 5% random 429s: 42 s against the SDK's 12 s).
  const std::uint64_t client_seed = GENERATE(6, 8);
  auto s = random_429s();
  s.retry_after = std::chrono::seconds(1);
  auto c = batch(10000, 64);
  c.seed = client_seed;
  const pacing_sim::result paced = pacing_sim::run(s, c, tick);
  c.paced = false;
  const pacing_sim::result plain = pacing_sim::run(s, c, tick);
  CAPTURE(client_seed, paced.wall_s, plain.wall_s, paced.rejected, paced.final_requests.estimate);
  CHECK(paced.failed == 0);
  // Measured: 19.1 and 18.3 s against 11.6 and 10.8 (the noise learned after 5-6 s).
  CHECK(paced.wall_s <= 2 * plain.wall_s);
  CHECK(paced.final_requests.noise > 0.02);
  CHECK(paced.final_requests.noise < 0.15);
}

TEST_CASE("a real limit is never learned as noise", "[rate_controller]") {
  // The trial's traps: a startup burst the limiter let through at many times its rate (50 r/s),
  // probes that cross the limit and pace at it again, callers parked by Retry-After.
  const double rate = GENERATE(50.0, 200.0, 1000.0);
  const std::size_t concurrency = GENERATE(16, 64, 256);
  const bool retry_after = GENERATE(true, false);
  auto s = limiter(rate);
  if (!retry_after) {
    s.retry_after.reset();
  }
  const auto prompts = static_cast<std::size_t>(10 * rate);
  const pacing_sim::result res = pacing_sim::run(s, batch(prompts, concurrency), tick);
  CAPTURE(rate, concurrency, retry_after, res.wall_s, res.rejected, res.final_requests.estimate);
  CHECK(res.failed == 0);
  CHECK(res.rejected > 0);  // the limit was met
  CHECK(res.final_requests.noise == 0);
}

TEST_CASE("a limit behind random 429s is still learned", "[rate_controller]") {
  auto s = random_429s();
  s.requests_per_second = 200;
  s.retry_after = std::chrono::seconds(1);
  const pacing_sim::result res = pacing_sim::run(s, batch(2000, 64), tick);
  CAPTURE(res.wall_s, res.attempts, res.rejected, res.final_requests.estimate);
  CHECK(res.failed == 0);
  // 2000 calls at 200/s take 10 s. The random 429s that pass as noise between probes still
  // pull the estimate 10-25% below the limit before the next probe, and with Retry-After: 1 an
  // item refused twice near the end waits two seconds after the others (measured: 12.3-13.6 s;
  // before the trials, 92 s with the estimate at 12/s).
  CHECK(res.wall_s <= 1.40 * 10);
  // The noise hides a crossing of a few percent: the estimate may sit up to 15% above the limit
  // (measured: 160-227 at the end of such runs).
  CHECK(res.final_requests.estimate >= 0.7 * 200);
  CHECK(res.final_requests.estimate <= 1.2 * 200);
  CHECK(res.final_requests.noise > 0.02);
}

TEST_CASE("against a token-limited server the controller learns the limit in tokens",
          "[rate_controller]") {
  const pacing_sim::result res = token_run(500);
  const keel::pacing_state& tok = res.final_tokens;
  CAPTURE(res.wall_s, res.rejected, tok.estimate, tok.rate, keel::to_string(tok.phase));
  CHECK(res.failed == 0);
  CHECK(res.ok == 500);
  CHECK((tok.phase == keel::pacing_phase::cruise || tok.phase == keel::pacing_phase::probe));
  CHECK(tok.estimate == Approx(10'000).epsilon(0.15));
  // Every estimate it held along the way was within 15% too.
  for (std::size_t i = 0; i < res.bins.size(); ++i) {
    if (res.bins[i].token_estimate > 0) {
      CAPTURE(bin_start(i), res.bins[i].token_estimate);
      CHECK(res.bins[i].token_estimate == Approx(10'000).epsilon(0.15));
    }
  }
  // The 429s said tokens: the request dimension never left startup.
  CHECK(res.final_requests.phase == keel::pacing_phase::startup);
  CHECK(res.final_requests.rejections == 0);
  // 100 calls/s of 100 tokens: 5 s, plus startup and the last calls' Retry-After.
  CHECK(res.wall_s <= 1.3 * 5);
}

TEST_CASE("a token estimate stays within 15% of the limit to the end of a longer batch",
          "[rate_controller]") {
  // The same server with 1000 prompts and client seed 1. Near the end of the batch fewer than
  // 4 calls wait for the bucket, so the last probe's 429s are measured coarsely: 3 calls (300
  // tokens) in 26 ms used to replace an estimate of exactly 10,000/s with 11,538/s (+15.4%); a
  // coarse probe sample now moves the estimate by 10% at most.
  const pacing_sim::result res = token_run(1000, 1);
  const keel::pacing_state& tok = res.final_tokens;
  CAPTURE(res.wall_s, res.rejected, tok.estimate, tok.rate, keel::to_string(tok.phase));
  CHECK(res.failed == 0);
  CHECK(tok.estimate == Approx(10'000).epsilon(0.15));
}

TEST_CASE("random 503s after admission are not rate signals", "[rate_controller]") {
  auto s = limiter(200);
  s.p_error = 0.10;
  s.latency = 50ms;
  const pacing_sim::result res = pacing_sim::run(s, batch(2000, 64), tick);
  CAPTURE(res.wall_s, res.attempts, res.errors, res.final_requests.estimate,
          res.final_requests.rate);
  CHECK(res.failed == 0);
  CHECK(res.ok == 2000);
  CHECK(res.errors >= 100);  // the faults did happen (about 10% of 2000+ admissions)
  CHECK(res.final_requests.estimate == Approx(200).epsilon(0.10));
  bool estimated = false;
  for (std::size_t i = 0; i < res.bins.size(); ++i) {
    if (res.bins[i].estimate > 0) {
      estimated = true;
      CAPTURE(bin_start(i), res.bins[i].estimate);
      CHECK(res.bins[i].estimate == Approx(200).epsilon(0.10));
    }
  }
  CHECK(estimated);
}

// ---- threads ----

TEST_CASE("many threads feed one controller without losing a count", "[rate_controller][threads]") {
  // Real time: four threads send through one throttler and report every kind of outcome while
  // two more read the state; on_change runs on whichever thread caused a change.
  asio::io_context ctx;
  keel::throttler bucket{ctx.get_executor()};
  // Catch's assertions are not thread-safe: the threads count, the test checks after join.
  std::atomic<int> changes{0};
  std::atomic<int> bad{0};
  keel::rate_controller_options o;
  o.on_change = [&](const keel::pacing_state& r, const keel::pacing_state& t) {
    if (!std::isfinite(r.rate) || !std::isfinite(t.rate)) {
      ++bad;
    }
    ++changes;
  };
  keel::rate_controller pacing{bucket, o};
  constexpr int senders = 4;
  constexpr int per_sender = 3000;
  std::atomic<int> request_429s{0};
  std::atomic<int> token_429s{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int s = 0; s < senders; ++s) {
    threads.emplace_back([&, s] {
      keel::random_source rng(static_cast<std::uint64_t>(s) + 1);
      for (int i = 0; i < per_sender; ++i) {
        // Non-blocking: a grant or nothing; either way the controller hears of a send.
        (void)bucket.try_acquire({1, 10});
        const auto t = pacing.on_send({1, 10});
        const double u = rng.uniform();
        if (u < 0.05) {
          pacing.on_throttled(t, keel::limit_kind::requests, std::chrono::milliseconds(1));
          ++request_429s;
        } else if (u < 0.07) {
          pacing.on_throttled(t, keel::limit_kind::tokens);
          ++token_429s;
        } else if (u < 0.10) {
          pacing.on_abandoned(t);
        } else {
          pacing.on_accepted(t);
          if (u > 0.999) {
            pacing.on_advertised(std::nullopt, 600'000.0);
          }
        }
      }
    });
  }
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&] {
      while (!done.load()) {
        const auto req = pacing.requests();
        const auto tok = pacing.tokens();
        if (!(req.rate >= 0) || !(tok.rate >= 0)) {
          ++bad;
        }
        (void)bucket.options();
      }
    });
  }
  for (int s = 0; s < senders; ++s) {
    threads[static_cast<std::size_t>(s)].join();
  }
  done = true;
  for (std::size_t i = senders; i < threads.size(); ++i) {
    threads[i].join();
  }
  CHECK(pacing.requests().rejections == static_cast<std::uint64_t>(request_429s.load()));
  CHECK(pacing.tokens().rejections == static_cast<std::uint64_t>(token_429s.load()));
  CHECK(pacing.requests().phase != keel::pacing_phase::startup);
  CHECK(changes.load() > 0);
  CHECK(bad.load() == 0);
}

TEST_CASE("the client's bursts stay below what the server let through before its first 429",
          "[rate_controller]") {
  // nginx burst=20 at 1000 r/s holds 21 ms of traffic; 50 ms of client burst (50 calls) after a
  // lull would come back as a wave of 429s. The first 429 came after 21 accepted calls: the
  // throttler's burst stays at 10 whatever the rate.
  rig r;
  std::vector<ticket> first;
  for (int i = 0; i < 16; ++i) {
    first.push_back(r.send());
  }
  advance_to(1ms);  // a 1 ms server: the ramp doubles every 25 ms
  for (const ticket& t : first) {
    r.pacing.on_accepted(t);
  }
  advance_to(20ms);
  std::vector<ticket> sent;
  while (r.bucket.try_acquire()) {
    sent.push_back(r.pacing.on_send());
  }
  REQUIRE(sent.size() >= 6);
  for (std::size_t i = 0; i < 5; ++i) {
    r.pacing.on_accepted(sent[i]);
  }
  r.pacing.on_throttled(sent[5], keel::limit_kind::requests, 1s);  // seq 22: 21 got through
  CHECK(r.pacing.requests().phase == keel::pacing_phase::search);
  // Whatever the rate becomes, the burst stays at 10.
  for (int k = 0; k < 5; ++k) {
    advance_to(now() + 200ms);
    (void)r.pacing.requests();
    r.pacing.on_accepted(r.pacing.on_send());
    CHECK(r.bucket.options().burst <= 10);
  }
  // Without a startup 429 (a configured ceiling), the burst is 50 ms of the rate.
  rig configured{with_ceiling(1000)};
  CHECK(configured.bucket.options().burst == Approx(50));
}
