// Tests for keel/redis/shared_rate.hpp against a real redis-server, with the time given to the
// script (deterministic): the lead, the fleet's limit and shares, probe gains and hits, pauses.
#include <keel/redis/shared_rate.hpp>

#include "redis_support.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;
using keel::redis::rate_report;
using keel::redis::rate_view;
using std::chrono::milliseconds;

namespace {

// A redis-server of the test's own and one connection to it.
struct one_redis {
  redis_process server;
  asio::io_context ctx;
  keel::redis::client redis{ctx.get_executor(), redis_options(server.port())};
};

struct fleet_process {
  fleet_process(asio::io_context& ctx, keel::redis::client& redis)
      : ctx(ctx), rate(redis, {.key = "keel:test:learned", .member_window = milliseconds(1000)}) {}
  rate_view sync(const rate_report& r, long long now) {
    const outcome<rate_view> o = run_one(ctx, rate.sync(r, now));
    REQUIRE_FALSE(o.error);
    return *o.value;
  }
  // A plain sync: active, with `estimate` (a new sample if `sample`).
  rate_view sync(double estimate, bool sample, long long now) {
    rate_report r;
    r.estimate = estimate;
    r.new_sample = sample;
    return sync(r, now);
  }
  asio::io_context& ctx;
  keel::redis::shared_rate rate;
};

}  // namespace

TEST_CASE("a shared rate: one leader, the fleet's limit summed from its members' samples",
          "[redis]") {
  one_redis r;
  fleet_process a(r.ctx, r.redis);
  fleet_process b(r.ctx, r.redis);
  fleet_process c(r.ctx, r.redis);
  CHECK(a.rate.member() != b.rate.member());

  // The first to sync leads; nothing is learned yet, so there is no share.
  rate_view v = a.sync(0, false, 0);
  CHECK(v.leader);
  CHECK(v.members == 1);
  CHECK(v.share == 0);
  CHECK(v.limit == 0);
  v = b.sync(0, false, 10);
  CHECK_FALSE(v.leader);
  CHECK(v.members == 2);
  CHECK(c.sync(0, false, 20).members == 3);

  // Each measures its share; a new sample sums the active members' latest estimates.
  v = a.sync(60, true, 100);
  // Only a has an estimate so far; b and c were sending too: 60 x 3 / 1.
  CHECK(v.limit == 180);
  CHECK(v.share == 60);
  v = b.sync(70, true, 110);
  CHECK(v.limit == Approx(130.0 * 3 / 2));
  v = c.sync(70, true, 120);
  CHECK(v.limit == 200);
  CHECK(v.share == Approx(200.0 / 3));
  // An estimate that is not a new sample is recorded but does not sum the limit again.
  v = a.sync(66, false, 130);
  CHECK(v.limit == 200);
  CHECK(a.sync(66, false, 140).leader);  // the lead is renewed by each sync

  // A member that stops syncing leaves after the window: the limit stays, the share grows.
  a.sync(66, false, 900);
  b.sync(67, false, 900);
  v = a.sync(66, false, 1500);  // c last synced at 120
  CHECK(v.members == 2);
  CHECK(v.limit == 200);
  CHECK(v.share == 100);
  // ... and its estimate no longer counts in the next sum.
  v = b.sync(70, true, 1510);
  CHECK(v.limit == Approx(136));
  CHECK(v.share == Approx(68));

  // A leader whose calls no longer wait for its pacing gives up the lead (its probes could not
  // grow) but stays a member; one whose calls wait takes it.
  rate_report content;
  content.estimate = 66;
  content.wants_lead = false;
  v = a.sync(content, 1512);
  CHECK_FALSE(v.leader);
  CHECK(v.members == 2);
  v = a.sync(content, 1514);
  CHECK_FALSE(v.leader);  // the lead is free, but a does not want it
  v = b.sync(70, false, 1516);
  CHECK(v.leader);
  v = b.sync(70, false, 1518);
  CHECK(v.leader);
  v = a.sync(66, false, 1519);  // wants it again, but b holds it
  CHECK_FALSE(v.leader);

  // A member that says it is no longer active leaves at once.
  rate_report gone;
  gone.active = false;
  v = a.sync(gone, 1520);
  CHECK_FALSE(v.leader);
  CHECK(v.members == 1);
  v = b.sync(70, false, 1530);
  CHECK(v.leader);
  CHECK(v.members == 1);
  v = b.sync(gone, 1540);  // a leader that leaves gives up the lead
  CHECK_FALSE(v.leader);
  v = a.sync(66, false, 1550);
  CHECK(v.leader);
}

TEST_CASE("a shared rate: followers get the leader's probe gain, the leader gets their hits",
          "[redis]") {
  one_redis r;
  fleet_process a(r.ctx, r.redis);
  fleet_process b(r.ctx, r.redis);
  REQUIRE(a.sync(50, true, 0).leader);
  REQUIRE_FALSE(b.sync(50, true, 0).leader);

  rate_report probing;
  probing.estimate = 50;
  probing.gain = 0.14;
  rate_view v = a.sync(probing, 100);
  CHECK(v.gain == 0);  // the leader is not told its own gain
  v = b.sync(50, false, 110);
  CHECK(v.gain == Approx(0.14));
  CHECK_FALSE(v.probe_hit);

  // A follower that drew a 429 in the probe says so; the leader hears it once.
  rate_report hit;
  hit.estimate = 50;
  hit.probe_hit = true;
  b.sync(hit, 150);
  v = a.sync(probing, 200);
  CHECK(v.probe_hit);
  CHECK_FALSE(a.sync(probing, 210).probe_hit);
  // A hit with no probe running is nothing.
  rate_report flat;
  flat.estimate = 50;
  a.sync(flat, 220);
  CHECK(b.sync(50, false, 230).gain == 0);
  b.sync(hit, 240);
  CHECK_FALSE(a.sync(flat, 250).probe_hit);

  // A leader that stops syncing loses the lead after the window, and its probe with it.
  a.sync(probing, 300);
  CHECK(b.sync(50, false, 400).gain == Approx(0.14));
  v = b.sync(50, false, 1300);
  CHECK(v.leader);
  v = a.sync(flat, 1310);
  CHECK_FALSE(v.leader);
  CHECK(v.gain == 0);
}

TEST_CASE("a shared rate keeps a slow member as long as the window it names", "[redis]") {
  one_redis r;
  fleet_process fast(r.ctx, r.redis);
  fleet_process slow(r.ctx, r.redis);
  rate_report sparse;
  sparse.estimate = 1;
  sparse.window = milliseconds(5000);  // its calls are seconds apart
  REQUIRE(slow.sync(sparse, 0).leader);
  CHECK(fast.sync(1, false, 100).members == 2);
  // At 3 s the slow member still counts, and still leads; the fast one, silent since 100 ms,
  // has gone (its window is the default 1 s).
  rate_view v = slow.sync(sparse, 3000);
  CHECK(v.leader);
  CHECK(v.members == 1);
  v = fast.sync(1, false, 3100);
  CHECK_FALSE(v.leader);
  CHECK(v.members == 2);
  // Past its window without a sync, the slow member is gone too, and the lead with it.
  v = fast.sync(1, false, 8100);
  CHECK(v.leader);
  CHECK(v.members == 1);
}

TEST_CASE("a shared rate keeps the fleet's latest pause end", "[redis]") {
  one_redis r;
  fleet_process a(r.ctx, r.redis);
  fleet_process b(r.ctx, r.redis);
  rate_report paused;
  paused.pause = milliseconds(3000);
  CHECK(a.sync(paused, 0).pause == milliseconds(3000));
  CHECK(b.sync(0, false, 1000).pause == milliseconds(2000));
  rate_report shorter;
  shorter.pause = milliseconds(500);
  CHECK(b.sync(shorter, 1100).pause == milliseconds(1900));  // a shorter one never cuts it
  CHECK(a.sync(0, false, 3100).pause == milliseconds(0));
}

TEST_CASE("a shared rate cannot be reached: sync throws", "[redis]") {
  asio::io_context ctx;
  keel::redis::client_options o = redis_options(free_port());
  o.command_timeout = milliseconds(200);
  keel::redis::client redis(ctx.get_executor(), o);
  keel::redis::shared_rate rate(redis, {.key = "keel:test:learned"});
  const outcome<rate_view> got = run_one(ctx, rate.sync({}, 0));
  CHECK(got.error);
}
