// End to end over loopback: keel::llm::complete through keel::http::client against the mock LLM
// server, wrapped in with_retry / with_deadline on virtual time.
#include <keel/deadline.hpp>
#include <keel/http/client.hpp>
#include <keel/llm/complete.hpp>
#include <keel/llm/error.hpp>
#include <keel/retry.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

using namespace keel_test;
using keel::testing::fault_kind;
using keel::testing::fault_plan;

namespace {

// The mock measures outages and rate limits on the manual clock, so hints are exact.
keel::testing::mock_options virtual_time_mock() {
  keel::testing::mock_options o;
  o.now = [] {
    return std::chrono::steady_clock::time_point(manual_clock::now().time_since_epoch());
  };
  return o;
}

keel::llm::chat_request hello(const std::string& model) {
  return keel::llm::chat_request(model, {keel::llm::chat_message("user", "hello there")}, 64);
}

const keel::llm::aws_credentials test_aws{"AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                          ""};

struct rig {
  asio::io_context ctx;
  keel::testing::mock_llm_server server{ctx, virtual_time_mock()};
  keel::http::client http{ctx.get_executor(), keel::http::client_options{}};
  rig() {
    manual_clock::reset();
    server.start();
  }
  ~rig() { server.stop(); }
  keel::llm::endpoint endpoint(keel::llm::provider_kind k) {
    return keel::llm::endpoint(k, server.base_url(), "sk-test-secret-key", "us-east-1");
  }
  auto call(keel::llm::provider_kind k, const std::string& model) {
    return
        [this, k, model] { return keel::llm::complete(http, endpoint(k), hello(model), test_aws); };
  }
};

std::string kind_name(keel::llm::provider_kind k) {
  return std::string(keel::llm::to_string(k));
}

}  // namespace

TEST_CASE("every retryable provider error is retried end to end, honouring the server's delay",
          "[llm][e2e]") {
  for (auto kind : {keel::llm::provider_kind::openai, keel::llm::provider_kind::anthropic,
                    keel::llm::provider_kind::bedrock}) {
    INFO(kind_name(kind));
    rig r;
    auto plan = fault_plan().with_script({fault_kind::rate_limit, fault_kind::overloaded,
                                          fault_kind::server_error, fault_kind::unavailable});
    plan.retry_after = std::chrono::milliseconds(1500);
    r.server.set_plan("m", plan);
    std::vector<keel::retry_event> events;
    auto policy = keel::retry_policy::with_backoff(5, keel::backoff::constant(100ms));
    policy.on_retry = [&](const keel::retry_event& e) { events.push_back(e); };
    outcome<keel::llm::chat_response> out;
    spawn(r.ctx, keel::with_retry<manual_clock>(r.call(kind, "m"), policy), out);
    REQUIRE(keel::testing::run_until(
        r.ctx, [&] { return out.done; }, 1min));
    REQUIRE(out.value);
    CHECK(out.value->text.find("hello there") != std::string::npos);
    REQUIRE(events.size() == 4);
    CHECK(events[0].classification.condition == keel::condition::throttled);
    CHECK(events[0].from_server_hint);
    CHECK(events[0].delay == 1500ms);  // the 429's Retry-After, not the 100 ms backoff
    for (std::size_t i = 1; i < 4; ++i) {
      CHECK(events[i].classification.condition == keel::condition::transient);
      CHECK(events[i].delay == 100ms);
    }
    CHECK(r.server.stats().model("m").requests == 5);
  }
}

TEST_CASE("quota exhausted and context length fail fast without a retry", "[llm][e2e]") {
  for (auto fault : {fault_kind::quota_exhausted, fault_kind::context_length}) {
    for (auto kind : {keel::llm::provider_kind::openai, keel::llm::provider_kind::anthropic,
                      keel::llm::provider_kind::bedrock}) {
      INFO(kind_name(kind) << " fault " << static_cast<int>(fault));
      rig r;
      r.server.set_plan("m", fault_plan().with_script({fault}));
      outcome<keel::llm::chat_response> out;
      spawn(r.ctx,
            keel::with_retry<manual_clock>(r.call(kind, "m"),
                                           keel::retry_policy::exponential_full_jitter(5, 1s, 60s)),
            out);
      REQUIRE(keel::testing::run_until(
          r.ctx, [&] { return out.done; }, 1min));
      REQUIRE(out.error);
      CHECK(keel::classify(out.error).condition == keel::condition::permanent);
      CHECK(out.code() == (fault == fault_kind::quota_exhausted
                               ? keel::llm::errc::quota_exhausted
                               : keel::llm::errc::context_length_exceeded));
      CHECK(out.finished_at_ms == 0);  // no backoff sleep
      CHECK(r.server.stats().model("m").requests == 1);
      // The API key never leaks into the error.
      CHECK(keel::describe(out.error).find("sk-test-secret-key") == std::string::npos);
    }
  }
}

TEST_CASE("a deadline cancels a stalled request and the next attempt uses a new connection",
          "[llm][e2e]") {
  rig r;
  r.server.set_plan("m", fault_plan().with_script({fault_kind::stall}));
  const auto ep = r.endpoint(keel::llm::provider_kind::openai);
  auto attempt = [&] {
    return keel::with_deadline<manual_clock>(
        [&] { return keel::llm::complete(r.http, ep, hello("m")); }, 2s);
  };
  outcome<keel::llm::chat_response> out;
  spawn(r.ctx,
        keel::with_retry<manual_clock>(
            attempt, keel::retry_policy::with_backoff(3, keel::backoff::constant(100ms))),
        out);
  REQUIRE(keel::testing::run_until(
      r.ctx, [&] { return out.done; }, 1min));
  REQUIRE(out.value);
  CHECK(out.finished_at_ms >= 2100);
  CHECK(r.server.stats().model("m").stalls == 1);
  CHECK(r.server.stats().accepted_connections == 2);  // the stalled connection was not reused
}

TEST_CASE("successful calls reuse one pooled connection", "[llm][e2e]") {
  rig r;
  outcome<int> out;
  auto ten_calls = [&]() -> asio::awaitable<int> {
    int ok = 0;
    for (int i = 0; i < 10; ++i) {
      auto reply = co_await keel::llm::complete(
          r.http, r.endpoint(keel::llm::provider_kind::anthropic), hello("m"));
      ok += reply.text.empty() ? 0 : 1;
    }
    co_return ok;
  };
  spawn(r.ctx, ten_calls(), out);
  REQUIRE(keel::testing::run_until(
      r.ctx, [&] { return out.done; }, 1min));
  CHECK(out.value == 10);
  CHECK(r.server.stats().accepted_connections == 1);
}

TEST_CASE("fail matrix: a reset at request k leaves every call with exactly one outcome",
          "[llm][e2e]") {
  for (int k = 0; k < 4; ++k) {
    INFO("k = " << k);
    rig r;
    std::vector<fault_kind> script(4, fault_kind::ok);
    script[static_cast<std::size_t>(k)] = fault_kind::reset;
    r.server.set_plan("m", fault_plan().with_script(script));
    std::vector<int> outcomes_seen(3, 0);
    std::vector<outcome<keel::llm::chat_response>> outs(3);
    auto sequence = [&]() -> asio::awaitable<void> {
      for (std::size_t i = 0; i < 3; ++i) {
        try {
          co_await keel::with_retry<manual_clock>(
              r.call(keel::llm::provider_kind::openai, "m"),
              keel::retry_policy::with_backoff(3, keel::backoff::constant(10ms)));
          ++outcomes_seen[i];
        } catch (...) {
          ++outcomes_seen[i];
          outs[i].error = std::current_exception();
        }
      }
    };
    outcome<void> done;
    spawn(r.ctx, sequence(), done);
    REQUIRE(keel::testing::run_until(
        r.ctx, [&] { return done.done; }, 1min));
    CHECK(outcomes_seen == std::vector<int>{1, 1, 1});
    for (auto& o : outs) {
      CHECK_FALSE(o.error);  // the reset was retried: every call succeeded
    }
    // Three calls make three requests, plus one retry when the reset falls among them (k < 3).
    CHECK(r.server.stats().total.resets == (k < 3 ? 1u : 0u));
    CHECK(r.server.stats().total.requests == (k < 3 ? 4u : 3u));
  }
}
