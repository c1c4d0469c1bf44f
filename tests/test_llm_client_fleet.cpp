// Tests for keel::llm::client's fleet pacing hook (client_options::fleet): asked for every
// attempt after the entry's own bucket, bypassed (and reported) when it fails, told of 429
// delays. The Redis-backed implementation is tested through `keel batch` (test_cli_e2e.cpp).
#include "llm_client_support.hpp"

#include <keel/http/client.hpp>
#include <keel/llm/client.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel_test::client::make_config;
using keel_test::client::one_retrying_entry;
using keel_test::client::request;
using keel_test::client::run;
using namespace std::chrono_literals;

namespace {

// Records what the client asks; fails every acquire when `down`.
struct fake_fleet final : keel::llm::fleet_pacing {
  boost::asio::awaitable<void> acquire(const keel::llm::entry_config& e, double tokens) override {
    models.push_back(e.model);
    estimates.push_back(tokens);
    if (down) {
      throw std::runtime_error("redis 127.0.0.1:1/0: unavailable");
    }
    if (hold != nullptr && *hold) {
      co_await (*hold)->async_wait(boost::asio::use_awaitable);  // throws when cancelled
    }
  }
  // When `hold` is set, acquire waits on it (until the call is cancelled).
  std::optional<boost::asio::steady_timer>* hold = nullptr;
  void on_server_delay(const keel::llm::entry_config& e, std::chrono::nanoseconds d) override {
    delays.emplace_back(e.model, d);
  }
  void sync_pacing(const keel::llm::entry_config& e, keel::rate_controller& pacing) override {
    synced.push_back(e.model);
    controllers.push_back(&pacing);
    if (share > 0) {
      pacing.adopt_share(share);  // the fleet's learned share of the limit
    }
  }
  bool down = false;
  double share = 0;
  std::vector<std::string> synced;
  std::vector<keel::rate_controller*> controllers;
  std::vector<std::string> models;
  std::vector<double> estimates;
  std::vector<std::pair<std::string, std::chrono::nanoseconds>> delays;
};

}  // namespace

TEST_CASE("every attempt asks the fleet and shares its controller, and a 429's delay is passed on",
          "[llm_client]") {
  boost::asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_retry_after(250ms).with_script({fault_kind::rate_limit}));
  server.start();
  fake_fleet fleet;
  fleet.share = 7;
  keel::llm::client_options o;
  o.seed = 1;
  o.fleet = &fleet;
  keel::llm::client client(ctx.get_executor(), make_config(one_retrying_entry, server.base_url()),
                           {}, o);
  const auto out = run(ctx, client, {request()});
  REQUIRE_FALSE(out[0].error);
  CHECK(out[0].attempts == 2);
  CHECK(fleet.models == std::vector<std::string>{"m", "m"});  // once per attempt
  CHECK(fleet.estimates.at(0) > 64);                          // the request's token estimate
  REQUIRE(fleet.delays.size() == 1);
  CHECK(fleet.delays[0].first == "m");
  CHECK(fleet.delays[0].second == 250ms);
  // Each attempt shares its entry's rate controller with the fleet before it is paced.
  CHECK(fleet.synced == std::vector<std::string>{"m", "m"});  // once per attempt
  REQUIRE(fleet.controllers.size() == 2);
  CHECK(fleet.controllers[0] == fleet.controllers[1]);  // the entry's one controller
  // It paces at the share the fleet gave it (alone, the 429 would have put it in search), less
  // what its own 429 at that share took off (the share refused).
  const keel::pacing_state st = fleet.controllers[0]->requests();
  CHECK(st.phase == keel::pacing_phase::cruise);
  CHECK(st.estimate == Approx(7 * 0.97));
  CHECK(fleet.controllers[0]->bucket().options().requests_per_second == Approx(7 * 0.97 * 0.97));
}

TEST_CASE("a server's delay holds the pacing and the fleet no longer than max_retry_after",
          "[llm_client][review]") {
  // Before, a 429 with a Retry-After of ten minutes paused every process of the fleet for ten
  // minutes (and this one's pacing for its 60 s cap), whatever retry.max_retry_after said.
  boost::asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_retry_after(600s).with_script({fault_kind::rate_limit}));
  server.start();
  fake_fleet fleet;
  keel::llm::client_options o;
  o.seed = 1;
  o.fleet = &fleet;
  keel::llm::client client(ctx.get_executor(),
                           make_config(R"({
      "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}],
      "policy": {"retry": {"max_attempts": 3, "max_retry_after": 0.05,
                           "backoff": {"kind": "constant", "base": 0.001}}}})",
                                       server.base_url()),
                           {}, o);
  const auto out = run(ctx, client, {request()});
  REQUIRE_FALSE(out[0].error);
  CHECK(out[0].attempts == 2);
  REQUIRE(fleet.delays.size() == 1);
  CHECK(fleet.delays[0].second == 50ms);
  // The retry went within the cap.
  CHECK(out[0].seconds < 5);
}

TEST_CASE("a call cancelled while the fleet holds it gives its place in the bucket back",
          "[llm_client][review]") {
  // Before, a call cancelled in the fleet's wait (a deadline, a lost hedge, a caller gone) kept
  // the request it had taken from its entry's bucket, though it sent nothing.
  boost::asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.start();
  std::optional<boost::asio::steady_timer> hold;
  hold.emplace(ctx, std::chrono::steady_clock::time_point::max());
  fake_fleet fleet;
  fleet.hold = &hold;
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client_options o;
  o.fleet = &fleet;
  o.shared_pacing = false;  // the configured bucket only
  keel::llm::client client(ctx.get_executor(),
                           make_config(R"({
      "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001",
                       "requests_per_minute": 6}],
      "policy": {"retry": {"max_attempts": 1}, "deadline": 0.2,
                 "rate_limits": {"burst": 1}}})",
                                       server.base_url()),
                           http, buckets, {}, 1, o);
  const auto out = run(ctx, client, {request()});
  REQUIRE(out[0].error);
  CHECK(out[0].attempts == 0);
  CHECK(server.stats().total.requests == 0);
  REQUIRE(buckets.all().size() == 1);
  // The one request of the burst is back (one request per 10 s would not have refilled it).
  CHECK(buckets.all()[0].second->available_requests() == Approx(1).margin(0.1));
}

TEST_CASE("when the fleet cannot be reached the call goes on under its own bucket",
          "[llm_client]") {
  boost::asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.start();
  fake_fleet fleet;
  fleet.down = true;
  std::vector<std::size_t> errors;
  keel::llm::client_hooks hooks;
  hooks.on_fleet_pacing_error = [&](std::size_t entry, const std::exception_ptr& e) {
    errors.push_back(entry);
    CHECK(keel::describe(e).find("unavailable") != std::string::npos);
  };
  keel::llm::client_options o;
  o.seed = 1;
  o.fleet = &fleet;
  keel::llm::client client(ctx.get_executor(), make_config(one_retrying_entry, server.base_url()),
                           hooks, o);
  const auto out = run(ctx, client, {request(), request()}, 2);
  CHECK_FALSE(out[0].error);
  CHECK_FALSE(out[1].error);
  CHECK(errors == std::vector<std::size_t>{0, 0});
  CHECK(server.stats().model("m").requests == 2);
}
