// The fleet's breaker through Redis (`policy.shared`, keel::redis::fleet): two clients
// standing for two processes, each with its own Redis connection, against one mock server.
#include "llm_client_support.hpp"
#include "redis_support.hpp"
#include "support.hpp"

#include <keel/llm/client.hpp>
#include <keel/llm/error.hpp>
#include <keel/redis/fleet.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <catch2/catch.hpp>

#include <functional>
#include <optional>

using keel::testing::fault_kind;
using keel::testing::fault_plan;

namespace {

// Two "processes" sharing one key: failing fast, a breaker that opens after 3 failures in a row
// for 0.3 s, no retries (every call is one attempt).
keel::llm::client_config fleet_config(const std::string& base_url, std::uint16_t redis_port) {
  auto cfg = keel_test::client::make_config(R"({
    "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}],
    "policy": {"retry": {"max_attempts": 1},
               "retry_budget": {"enabled": false},
               "breaker": {"failure_threshold": 3, "break": 0.3, "break_growth": 1}}
  })",
                                            base_url);
  cfg.policy.shared.redis = "redis://127.0.0.1:" + std::to_string(redis_port) + "/0";
  cfg.policy.shared.key_prefix = "keeltest";
  return cfg;
}

bool circuit_open(const std::exception_ptr& e) {
  return e && keel::llm::error_class(e) == "circuit_open";
}

// Two processes, a and b (each a client with its own fleet and Redis connection), and one mock
// server on which every call fails (503) after 50 ms. `tune_b` changes b's config.
struct two_processes {
  keel_test::redis_process redis;
  boost::asio::io_context ctx;
  keel::testing::mock_llm_server server{ctx};
  std::optional<keel::redis::fleet> fleet_a;
  std::optional<keel::redis::fleet> fleet_b;
  std::optional<keel::llm::client> a;
  std::optional<keel::llm::client> b;

  explicit two_processes(const std::function<void(keel::llm::client_config&)>& tune_b = {}) {
    server.set_plan("m", fault_plan{}
                             .with_probability(fault_kind::unavailable, 1.0)
                             .with_latency(std::chrono::milliseconds(50)));
    server.start();
    const auto cfg_a = fleet_config(server.base_url(), redis.port());
    auto cfg_b = cfg_a;
    if (tune_b) {
      tune_b(cfg_b);
    }
    fleet_a.emplace(ctx.get_executor(), cfg_a);
    fleet_b.emplace(ctx.get_executor(), cfg_b);
    keel::llm::client_options oa;
    oa.seed = 1;
    oa.fleet = &*fleet_a;
    keel::llm::client_options ob = oa;
    ob.fleet = &*fleet_b;
    a.emplace(ctx.get_executor(), cfg_a, keel::llm::client_hooks{}, oa);
    b.emplace(ctx.get_executor(), cfg_b, keel::llm::client_hooks{}, ob);
  }
  two_processes(const two_processes&) = delete;
  two_processes& operator=(const two_processes&) = delete;
  ~two_processes() {
    fleet_a->close();
    fleet_b->close();
  }
};

}  // namespace

TEST_CASE("a breaker one process opens holds the others, and both close when the provider is back",
          "[redis]") {
  using keel_test::client::request;
  using keel_test::client::run;
  two_processes p;
  auto& ctx = p.ctx;
  auto& server = p.server;
  keel::llm::client& a = *p.a;
  keel::llm::client& b = *p.b;

  // Process a fails three times in a row: its breaker opens and tells the fleet.
  auto out = run(ctx, a, {request(), request(), request(), request()});
  CHECK(server.stats().total.requests == 3);
  CHECK(circuit_open(out[3].error));
  CHECK(a.breaker(0)->state() == keel::breaker_state::open);

  // Process b has not failed once. Its first call waits for the fleet's answer before it goes
  // out, so that a process joining during the break sends nothing into the outage (before, its
  // first calls did: 16 at concurrency 32); it keeps to the fleet's break without calling.
  out = run(ctx, b, {request(), request(), request()});
  CHECK(server.stats().total.requests == 3);
  CHECK(circuit_open(out[0].error));
  CHECK(circuit_open(out[1].error));
  CHECK(circuit_open(out[2].error));
  CHECK(b.breaker(0)->state() == keel::breaker_state::open);

  // The provider is back. After the break the fleet lets one process probe; its success closes
  // the fleet, and the other process's breaker closes with it. (That only one probes is shown
  // where the order can be controlled: the script's test, test_redis_breaker.cpp.)
  server.clear_plans();
  const auto before = server.stats().total.requests;
  std::size_t calls = 0;
  REQUIRE(keel_test::run_real(ctx, [&] {
    ++calls;
    const auto ra = run(ctx, a, {request()});
    const auto rb = run(ctx, b, {request()});
    const bool a_ok = !ra[0].error;
    const bool b_ok = !rb[0].error;
    return a_ok && b_ok;
  }));
  CHECK(a.breaker(0)->state() == keel::breaker_state::closed);
  CHECK(b.breaker(0)->state() == keel::breaker_state::closed);
  // Every admitted call succeeded: the probe, then the calls after the close (at most 2 per
  // round, one round with both).
  CHECK(server.stats().total.requests - before >= 2);
  CHECK(server.stats().total.by_status[200] == server.stats().total.requests - before);
  INFO("rounds: " << calls);
}

TEST_CASE("shared.breaker_sync sets how soon a process sees another's open breaker", "[redis]") {
  using keel_test::client::request;
  using keel_test::client::run;
  // 1 ms: every call of b checks the fleet; 60 s: b checks once, at its first call.
  const double sync = GENERATE(0.001, 60.0);
  two_processes p([&](keel::llm::client_config& c) { c.policy.shared.breaker_sync = sync; });
  auto& ctx = p.ctx;
  auto& server = p.server;
  keel::llm::client& a = *p.a;
  keel::llm::client& b = *p.b;

  // b's first call checks the fleet (closed) and fails on its own (1 of b's 3).
  auto out = run(ctx, b, {request()});
  CHECK_FALSE(circuit_open(out[0].error));
  // a fails three times in a row: its breaker opens and tells the fleet.
  out = run(ctx, a, {request(), request(), request()});
  REQUIRE(a.breaker(0)->state() == keel::breaker_state::open);
  // b's next call checks the fleet again if the interval allows (the answer comes while the
  // call runs), so the call after it keeps to the fleet's break; otherwise both go out.
  out = run(ctx, b, {request(), request()});
  INFO("breaker_sync " << sync);
  CHECK_FALSE(circuit_open(out[0].error));
  if (sync < 1) {
    CHECK(circuit_open(out[1].error));
    CHECK(server.stats().total.requests == 5);
  } else {
    CHECK_FALSE(circuit_open(out[1].error));
    CHECK(server.stats().total.requests == 6);
  }
}
