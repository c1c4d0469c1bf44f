// The fleet's learned rate through Redis (`policy.shared`, keel::redis::fleet::sync_pacing): a
// process's rate controller takes the fleet's share, follows the leader's probe and shares
// pauses; a process whose calls wait leads; cut off from Redis a process keeps to its share, and
// the fleet's acquire reports it. Another process of the fleet is played by a
// keel::redis::shared_rate on the same key (its protocol is tested in test_redis_rate.cpp).
#include "llm_client_support.hpp"
#include "redis_support.hpp"
#include "support.hpp"

#include <keel/rate_controller.hpp>
#include <keel/redis/fleet.hpp>
#include <keel/redis/shared_rate.hpp>
#include <keel/throttler.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>

namespace {

keel::llm::client_config learned_config(std::uint16_t redis_port) {
  auto cfg = keel_test::client::make_config(R"({
    "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}]
  })",
                                            "http://127.0.0.1:1");
  cfg.policy.shared.redis = "redis://127.0.0.1:" + std::to_string(redis_port) + "/0";
  cfg.policy.shared.key_prefix = "keeltest";
  cfg.policy.shared.rate_sync = 0.01;
  return cfg;
}

// One process of the fleet (its fleet, bucket and controller of the entry) and a connection
// for another process's shared_rate, on one redis-server of the test's own.
struct one_process {
  keel_test::redis_process redis;
  boost::asio::io_context ctx;
  keel::llm::client_config cfg;
  const keel::llm::entry_config& entry;
  keel::redis::fleet fleet;
  keel::throttler bucket{ctx.get_executor()};
  keel::rate_controller pacing{bucket};
  keel::redis::client other_redis{ctx.get_executor(), keel_test::redis_options(redis.port())};

  explicit one_process(double requests_per_minute = 0)
      : cfg(configured(learned_config(redis.port()), requests_per_minute)),
        entry(cfg.entries.at(0)),
        fleet(ctx.get_executor(), cfg) {}
  one_process(const one_process&) = delete;
  one_process& operator=(const one_process&) = delete;
  ~one_process() {
    fleet.close();
    other_redis.close();
  }
  static keel::llm::client_config configured(keel::llm::client_config c, double rpm) {
    c.entries.at(0).rate_limits.requests_per_minute = rpm;
    return c;
  }
  // The other process's view of the entry's learned rate.
  keel::redis::shared_rate other(std::chrono::milliseconds window = std::chrono::seconds(1)) {
    return keel::redis::shared_rate(
        other_redis,
        {.key = keel::redis::fleet_key("keeltest", entry, "learned"), .member_window = window});
  }
};

}  // namespace

TEST_CASE(
    "a process takes the fleet's share, follows its leader's probe and pause, and keeps to its "
    "share without Redis",
    "[redis]") {
  one_process p;
  keel_test::redis_process& redis = p.redis;
  boost::asio::io_context& ctx = p.ctx;
  const keel::llm::entry_config& entry = p.entry;
  keel::redis::fleet& fleet = p.fleet;
  keel::throttler& bucket = p.bucket;
  keel::rate_controller& pacing = p.pacing;
  REQUIRE(pacing.requests().phase == keel::pacing_phase::startup);

  // The other process: it leads (it syncs first) and has measured 120 r/s on its own.
  keel::redis::shared_rate other = p.other(std::chrono::milliseconds(60'000));
  keel::redis::rate_report measured;
  measured.estimate = 120;
  measured.new_sample = true;
  REQUIRE(keel_test::run_one(ctx, other.sync(measured)).value->leader);

  // This process syncs at its calls (here: the loop), and paces at half the fleet's limit.
  REQUIRE(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    return pacing.requests().phase == keel::pacing_phase::cruise;
  }));
  CHECK(pacing.requests().estimate == Approx(60));
  CHECK(bucket.options().requests_per_second == Approx(60 * 0.97));

  // The leader probes at +40%: so does this process; then its probe ends.
  keel::redis::rate_report probing = measured;
  probing.new_sample = false;
  probing.gain = 0.4;
  REQUIRE_FALSE(keel_test::run_one(ctx, other.sync(probing)).error);
  REQUIRE(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    return pacing.requests().phase == keel::pacing_phase::probe;
  }));
  CHECK(bucket.options().requests_per_second == Approx(60 * 0.97 * 1.4));

  // A pause the leader's bucket holds (a block) holds this one too.
  keel::redis::rate_report paused = probing;
  paused.pause = std::chrono::milliseconds(30'000);
  REQUIRE_FALSE(keel_test::run_one(ctx, other.sync(paused)).error);
  REQUIRE(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    return bucket.paused_until() > std::chrono::steady_clock::now() + std::chrono::seconds(20);
  }));

  // Redis is gone: this process keeps to its share (the leader's probe no longer raises it, and
  // it starts none of its own).
  redis.stop();
  REQUIRE(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    return pacing.requests().phase == keel::pacing_phase::cruise;
  }));
  CHECK(pacing.requests().estimate == Approx(60));
  CHECK(bucket.options().requests_per_second == Approx(60 * 0.97));
  // ... and the fleet's acquire says so (the client warns and counts it, as for a bucket).
  CHECK(keel_test::run_one(ctx, fleet.acquire(entry, 1)).error);
  for (int i = 0; i < 50; ++i) {  // 2.5 s, past any plateau: still no probe
    pacing.on_accepted(pacing.on_send({1, 0}));
    fleet.sync_pacing(entry, pacing);
    ctx.run_for(std::chrono::milliseconds(50));
  }
  CHECK(pacing.requests().phase == keel::pacing_phase::cruise);

  // Redis is back (empty): the next sync succeeds and the acquire stops complaining.
  redis.start();
  REQUIRE(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    return !keel_test::run_one(ctx, fleet.acquire(entry, 1)).error;
  }));
  // Its share counts as a measurement the empty Redis has not summed: the fleet's limit is 60
  // again, not 0 (nor, later, whatever the first process back measured alone).
  const std::string key = keel::redis::fleet_key("keeltest", entry, "learned");
  CHECK(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    const auto limit = keel_test::run_one(ctx, p.other_redis.command({"HGET", key, "limit"}));
    return limit.value && limit.value->kind != keel::redis::reply_kind::nil &&
           std::stod(limit.value->text) == Approx(60);
  }));
}

TEST_CASE("an entry with a configured limit shares its bucket, not a learned rate", "[redis]") {
  one_process p(600);
  boost::asio::io_context& ctx = p.ctx;
  const keel::llm::entry_config& entry = p.entry;
  keel::redis::fleet& fleet = p.fleet;
  keel::rate_controller& pacing = p.pacing;

  keel::redis::shared_rate other = p.other();
  keel::redis::rate_report measured;
  measured.estimate = 120;
  measured.new_sample = true;
  REQUIRE(keel_test::run_one(ctx, other.sync(measured)).value->leader);
  for (int i = 0; i < 20; ++i) {
    fleet.sync_pacing(entry, pacing);
    ctx.run_for(std::chrono::milliseconds(5));
  }
  CHECK(pacing.requests().phase == keel::pacing_phase::startup);  // never took a share
  // ... and never joined the learned rate's members.
  const auto view = keel_test::run_one(ctx, other.sync(measured));
  REQUIRE_FALSE(view.error);
  CHECK(view.value->members == 1);
}

TEST_CASE(
    "a process whose calls wait leads: the fleet sees its probe's gain, and a follower's "
    "429 ends the probe",
    "[redis]") {
  one_process p;
  boost::asio::io_context& ctx = p.ctx;
  const keel::llm::entry_config& entry = p.entry;
  keel::redis::fleet& fleet = p.fleet;
  keel::throttler& bucket = p.bucket;
  keel::rate_controller& pacing = p.pacing;
  pacing.adopt_share(20);  // as if it had learned its share: cruise at 19.4 r/s

  // Calls that always wait for the bucket (demand beyond the share), each accepted at once.
  bool stop = false;
  std::size_t running = 8;
  for (int i = 0; i < 8; ++i) {
    boost::asio::co_spawn(
        ctx,
        [&]() -> boost::asio::awaitable<void> {
          while (!stop) {
            co_await bucket.acquire({1, 0});
            pacing.on_accepted(pacing.on_send({1, 0}));
          }
          --running;
        },
        boost::asio::detached);
  }

  keel::redis::shared_rate other = p.other();
  keel::redis::rate_report follower;
  follower.estimate = 20;
  follower.wants_lead = false;

  // After its plateau it probes, for the fleet: the other process is told the gain.
  double seen_gain = 0;
  REQUIRE(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    const auto v = keel_test::run_one(ctx, other.sync(follower));
    REQUIRE_FALSE(v.error);
    CHECK_FALSE(v.value->leader);
    seen_gain = v.value->gain;
    return seen_gain > 0;
  }));
  CHECK(pacing.requests().phase == keel::pacing_phase::probe);

  // The other process draws a 429 in that probe: the leader's probe ends without a 429 of its
  // own.
  keel::redis::rate_report hit = follower;
  hit.probe_hit = true;
  REQUIRE_FALSE(keel_test::run_one(ctx, other.sync(hit)).error);
  REQUIRE(keel_test::run_real(ctx, [&] {
    fleet.sync_pacing(entry, pacing);
    return pacing.requests().phase == keel::pacing_phase::cruise;
  }));
  CHECK(pacing.requests().rejections == 0);

  stop = true;
  bucket.set_rate(1e6, 0);  // release the waiting calls
  REQUIRE(keel_test::run_real(ctx, [&] { return running == 0; }));
}

TEST_CASE("a process that closes leaves the fleet at once, not after its window", "[redis]") {
  one_process p;
  boost::asio::io_context& ctx = p.ctx;
  // Paced at a twentieth of a call per second, this process names a window of a minute (three
  // calls' time, capped): without a goodbye it would count in the fleet for that long.
  keel::rate_controller_options slow;
  slow.min_requests_per_second = 0.01;
  keel::throttler bucket{ctx.get_executor()};
  keel::rate_controller pacing{bucket, slow};
  // The other process (a window of a second: it syncs at every look below).
  keel::redis::shared_rate other = p.other();
  keel::redis::rate_report measured;
  measured.estimate = 0.1;
  measured.new_sample = true;
  REQUIRE(keel_test::run_one(ctx, other.sync(measured)).value->leader);
  REQUIRE(keel_test::run_real(ctx, [&] {
    p.fleet.sync_pacing(p.entry, pacing);
    return pacing.requests().phase == keel::pacing_phase::cruise;
  }));
  CHECK(pacing.requests().estimate == Approx(0.05));

  // Its next sync names the long window: its membership then reaches ~60 s ahead (the other's
  // only a second).
  const std::string members = keel::redis::fleet_key("keeltest", p.entry, "learned") + ":members";
  const auto latest_expiry = [&] {
    const auto now = keel_test::run_one(ctx, p.other_redis.command({"TIME"})).value;
    const auto zs = keel_test::run_one(
        ctx, p.other_redis.command({"ZRANGE", members, "0", "-1", "WITHSCORES"}));
    REQUIRE(now);
    REQUIRE(zs.value);
    const double now_ms = std::stod(now->elements.at(0).text) * 1000;
    double latest = 0;
    for (std::size_t i = 1; i < zs.value->elements.size(); i += 2) {
      latest = std::max(latest, std::stod(zs.value->elements[i].text) - now_ms);
    }
    return latest;  // ms
  };
  keel::redis::rate_report still;
  still.estimate = 0.1;
  REQUIRE(keel_test::run_real(ctx, [&] {
    p.fleet.sync_pacing(p.entry, pacing);
    if (keel_test::run_one(ctx, other.sync(still)).value->members != 2 ||
        keel_test::run_one(ctx, p.other_redis.command({"ZCARD", members})).value->integer != 2) {
      return false;
    }
    const double expiry = latest_expiry();
    return expiry > 50'000 && expiry < 61'000;
  }));

  // Closed: its last sync says it is gone; the other process is alone and takes the whole limit
  // long before the minute would have passed (run_real gives up after 20 s).
  p.fleet.close();
  CHECK(keel_test::run_real(ctx, [&] {
    const auto v = keel_test::run_one(ctx, other.sync(still)).value;
    return v && v->members == 1 && v->share == Approx(0.1);
  }));
  // ... and then its connection: only the other process's remains.
  CHECK(keel_test::run_real(ctx, [&] {
    const auto list = keel_test::run_one(ctx, p.other_redis.command({"CLIENT", "LIST"})).value;
    return list && std::count(list->text.begin(), list->text.end(), '\n') == 1;
  }));
}

TEST_CASE("shared.username logs the fleet in as a Redis ACL user", "[redis][review]") {
  // Before, policy.shared could only log in as Redis's default user (credentials in the URL are
  // refused, and there was no other way to name a user).
  keel_test::redis_process redis(
      {"--user", "app", "on", ">app-PW-5", "~*", "&*", "+@all", "--user", "default", "off"});
  boost::asio::io_context ctx;
  auto cfg = keel_test::client::make_config(R"({
    "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001",
                     "requests_per_minute": 600}],
    "policy": {"shared": {"username": "app", "key_prefix": "keeltest"}}
  })",
                                            "http://127.0.0.1:1");
  CHECK(cfg.policy.shared.username == "app");
  cfg.policy.shared.redis = "redis://127.0.0.1:" + std::to_string(redis.port()) + "/0";
  cfg.policy.shared.password = "app-PW-5";
  {
    keel::redis::fleet fleet(ctx.get_executor(), cfg);
    CHECK_FALSE(keel_test::run_one(ctx, fleet.acquire(cfg.entries.at(0), 1)).error);
    fleet.close();
  }
  // The same password as the default user (which is off here): refused.
  cfg.policy.shared.username.clear();
  keel::redis::fleet fleet(ctx.get_executor(), cfg);
  const auto out = keel_test::run_one(ctx, fleet.acquire(cfg.entries.at(0), 1));
  REQUIRE(out.error);
  CHECK(keel::describe(out.error).find("login refused") != std::string::npos);
  fleet.close();
}
