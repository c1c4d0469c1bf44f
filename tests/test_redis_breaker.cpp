// Tests for keel/redis/shared_breaker.hpp against a real redis-server, with the time given to
// the script (deterministic): the fleet's failure count, its break, the one fleet-wide probe.
#include <keel/redis/shared_breaker.hpp>

#include "redis_support.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;
using keel::redis::breaker_view;
using std::chrono::milliseconds;

namespace {

using state = breaker_view::state;

struct fleet_process {
  fleet_process(asio::io_context& ctx, keel::redis::client& redis)
      : ctx(ctx),
        breaker(redis, {.key = "keel:test:breaker",
                        .failure_threshold = 3,
                        .break_duration = milliseconds(1000),
                        .probe_timeout = milliseconds(500)}) {}
  breaker_view sync(std::size_t failures, bool had_success, long long now) {
    return get(run_one(ctx, breaker.sync(failures, had_success, now)));
  }
  breaker_view opened(long long break_ms, long long now) {
    return get(run_one(ctx, breaker.opened(milliseconds(break_ms), now)));
  }
  breaker_view closed(long long now) { return get(run_one(ctx, breaker.closed(now))); }
  static breaker_view get(const outcome<breaker_view>& o) {
    REQUIRE_FALSE(o.error);
    return *o.value;
  }
  asio::io_context& ctx;
  keel::redis::shared_breaker breaker;
};

}  // namespace

TEST_CASE("a shared breaker opens on the fleet's failures and lets one process probe", "[redis]") {
  redis_process server;
  asio::io_context ctx;
  keel::redis::client redis(ctx.get_executor(), redis_options(server.port()));
  fleet_process a(ctx, redis);
  fleet_process b(ctx, redis);
  CHECK(a.breaker.member() != b.breaker.member());
  const std::string incarnation = a.sync(0, false, 0).incarnation;
  CHECK(b.sync(0, false, 0).incarnation == incarnation);  // one hash, one name

  // Failures add up across processes; a success resets the count to what followed it.
  breaker_view v = a.sync(2, false, 0);
  CHECK(v.what == state::closed);
  CHECK(v.epoch == 0);
  CHECK(b.sync(0, true, 10).what == state::closed);   // 2 -> 0
  CHECK(a.sync(2, false, 20).what == state::closed);  // 2
  v = b.sync(1, false, 30);                           // 3: the fleet opens for 1,000 ms
  CHECK(v.what == state::open);
  CHECK(v.remaining == milliseconds(1000));
  CHECK(v.epoch == 1);
  // Everyone sees it, with the time left.
  v = a.sync(0, false, 500);
  CHECK(v.what == state::open);
  CHECK(v.remaining == milliseconds(530));
  // A success reported while open does not close it.
  CHECK(b.sync(0, true, 600).what == state::open);

  // The break is over: the first to ask probes; the other waits for the probe's timeout.
  CHECK(a.sync(0, false, 1030).what == state::probe);
  v = b.sync(0, false, 1040);
  CHECK(v.what == state::probing);
  CHECK(v.remaining == milliseconds(490));
  // The probe fails: a longer break (the prober's own grown one), the probe released.
  v = a.opened(2000, 1100);
  CHECK(v.what == state::open);
  CHECK(v.remaining == milliseconds(2000));
  CHECK(v.epoch == 1);  // still the same opening
  CHECK(b.sync(0, false, 1200).remaining == milliseconds(1900));

  // At its end b probes, says nothing, and loses the probe to a after 500 ms.
  CHECK(b.sync(0, false, 3100).what == state::probe);
  CHECK(a.sync(0, false, 3200).remaining == milliseconds(400));
  CHECK(a.sync(0, false, 3600).what == state::probe);
  CHECK(b.sync(0, false, 3650).what == state::probing);
  // a's probe succeeds: the fleet closes, a new epoch, the count starts again.
  v = a.closed(3700);
  CHECK(v.what == state::closed);
  CHECK(v.epoch == 2);
  v = b.sync(2, false, 3800);
  CHECK(v.what == state::closed);
  CHECK(v.epoch == 2);

  // A process that opens on its own opens the fleet; a shorter break never cuts a longer one.
  v = a.opened(5000, 4000);
  CHECK(v.what == state::open);
  CHECK(v.epoch == 3);
  v = b.opened(1000, 4100);
  CHECK(v.remaining == milliseconds(4900));
  CHECK(v.epoch == 3);
}

TEST_CASE("a shared breaker whose Redis restarted empty starts closed, its script reloaded",
          "[redis]") {
  redis_process server;
  asio::io_context ctx;
  keel::redis::client redis(ctx.get_executor(), redis_options(server.port(), 0ms));
  fleet_process a(ctx, redis);
  const breaker_view before = a.sync(3, false, 0);
  CHECK(before.what == state::open);
  CHECK_FALSE(before.incarnation.empty());
  server.stop();
  server.start();
  // The first command after the restart may meet the dropped connection; the next one
  // reconnects, finds no script (NOSCRIPT), loads it again and finds no breaker: closed.
  (void)run_one(ctx, a.breaker.sync(0, false, 100));
  const breaker_view v = a.sync(0, false, 100);
  CHECK(v.what == state::closed);
  CHECK(v.epoch == 0);
  CHECK(v.incarnation != before.incarnation);  // a new hash: its epochs start again
}
