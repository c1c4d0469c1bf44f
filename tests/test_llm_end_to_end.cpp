// End to end over loopback: keel::llm::complete through keel::http::client against the mock LLM
// server, wrapped in with_retry / with_deadline on virtual time.
#include <keel/deadline.hpp>
#include <keel/http/client.hpp>
#include <keel/llm/complete.hpp>
#include <keel/llm/error.hpp>
#include <keel/retry.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include "support.hpp"

#include <nlohmann/json.hpp>

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
  /// Runs `call(k, "m")` under `with_retry` with `policy` to completion; returns the outcome and
  /// every retry event.
  std::pair<outcome<keel::llm::chat_response>, std::vector<keel::retry_event>> retried(
      keel::llm::provider_kind k, keel::retry_policy policy) {
    std::pair<outcome<keel::llm::chat_response>, std::vector<keel::retry_event>> result;
    policy.on_retry = [&](const keel::retry_event& e) { result.second.push_back(e); };
    spawn(ctx, keel::with_retry<manual_clock>(call(k, "m"), policy), result.first);
    REQUIRE(keel::testing::run_until(
        ctx, [&] { return result.first.done; }, 1min));
    return result;
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
    // Both headers on every format (Bedrock documents none; the delay hint is under test here).
    plan.with_retry_after(1500ms, keel::testing::retry_after_style::both);
    r.server.set_plan("m", plan);
    auto [out, events] =
        r.retried(kind, keel::retry_policy::with_backoff(5, keel::backoff::constant(100ms)));
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

namespace {

constexpr keel::llm::provider_kind all_providers[] = {keel::llm::provider_kind::openai,
                                                      keel::llm::provider_kind::anthropic,
                                                      keel::llm::provider_kind::bedrock};

// The code of an error (a provider's errc, an HTTP client error or an Asio code).
boost::system::error_code code_of(const std::exception_ptr& ep) {
  try {
    if (ep) {
      std::rethrow_exception(ep);
    }
  } catch (const boost::system::system_error& e) {
    return e.code();
  } catch (...) {
  }
  return {};
}

// What a scripted fault must turn into at the end of keel::llm::complete.
struct e2e_fault {
  fault_kind fault;
  keel::llm::errc code;
  keel::condition condition;
};

// Every keel::llm::errc the mock produces with a real provider answer (bad_request only comes
// from a request keel never builds, transport from the client rather than from keel::llm).
const std::vector<e2e_fault> retried_faults{
    {fault_kind::rate_limit, keel::llm::errc::rate_limited, keel::condition::throttled},
    {fault_kind::throttling, keel::llm::errc::rate_limited, keel::condition::throttled},
    {fault_kind::overloaded, keel::llm::errc::overloaded, keel::condition::transient},
    {fault_kind::unavailable, keel::llm::errc::overloaded, keel::condition::transient},
    {fault_kind::server_error, keel::llm::errc::server_error, keel::condition::transient},
    {fault_kind::timeout, keel::llm::errc::timeout, keel::condition::timeout},
};

// The errc a retried fault maps to for `kind`: Anthropic's 503 carries type api_error, which
// keel::llm reads as server_error (same condition, transient).
keel::llm::errc expected_code(const e2e_fault& f, keel::llm::provider_kind kind) {
  if (kind == keel::llm::provider_kind::anthropic && f.fault == fault_kind::unavailable) {
    return keel::llm::errc::server_error;
  }
  return f.code;
}

const std::vector<e2e_fault> permanent_faults{
    {fault_kind::quota_exhausted, keel::llm::errc::quota_exhausted, keel::condition::permanent},
    {fault_kind::context_length, keel::llm::errc::context_length_exceeded,
     keel::condition::permanent},
    {fault_kind::content_filter, keel::llm::errc::content_filtered, keel::condition::permanent},
    {fault_kind::auth, keel::llm::errc::auth, keel::condition::permanent},
    {fault_kind::not_found, keel::llm::errc::not_found, keel::condition::permanent},
    {fault_kind::malformed, keel::llm::errc::malformed_response, keel::condition::permanent},
    {fault_kind::bad_request, keel::llm::errc::bad_request, keel::condition::permanent},
};

}  // namespace

TEST_CASE("every retryable provider error class is retried until max_attempts, then gives up",
          "[llm][e2e]") {
  for (const e2e_fault& f : retried_faults) {
    for (auto kind : all_providers) {
      INFO(kind_name(kind) << " fault " << keel::testing::to_string(f.fault));
      rig r;
      r.server.set_plan("m", fault_plan()
                                 .with_script({f.fault, f.fault, f.fault})
                                 .with_retry_after(1500ms, keel::testing::retry_after_style::both));
      auto [out, events] =
          r.retried(kind, keel::retry_policy::with_backoff(3, keel::backoff::constant(100ms)));
      REQUIRE(out.error);
      CHECK(out.code() == keel::error::retries_exhausted);
      const auto last = keel::root_cause(out.error);
      CHECK(code_of(last) == expected_code(f, kind));
      CHECK(code_of(last) == f.condition);
      CHECK(keel::classify(last).condition == f.condition);
      CHECK(r.server.stats().model("m").requests == 3);
      REQUIRE(events.size() == 2);
      const bool throttled = f.condition == keel::condition::throttled;
      for (const auto& e : events) {
        CHECK(code_of(e.error) == expected_code(f, kind));
        CHECK(e.classification.condition == f.condition);
        CHECK(e.from_server_hint == throttled);
        CHECK(e.delay == (throttled ? 1500ms : 100ms));
      }
      CHECK(events[0].attempt == 1);
      CHECK(events[1].attempt == 2);
      CHECK(out.finished_at_ms >= (throttled ? 3000 : 200));
    }
  }
}

TEST_CASE("a retryable provider error followed by success costs exactly one retry", "[llm][e2e]") {
  for (const e2e_fault& f : retried_faults) {
    for (auto kind : all_providers) {
      INFO(kind_name(kind) << " fault " << keel::testing::to_string(f.fault));
      rig r;
      // Both delay headers on every format (Bedrock documents none).
      r.server.set_plan("m", fault_plan().with_script({f.fault}).with_retry_after(
                                 1000ms, keel::testing::retry_after_style::both));
      auto [out, events] =
          r.retried(kind, keel::retry_policy::with_backoff(3, keel::backoff::constant(250ms)));
      REQUIRE(out.value);
      CHECK(out.value->text.find("hello there") != std::string::npos);
      REQUIRE(events.size() == 1);
      CHECK(code_of(events[0].error) == expected_code(f, kind));
      // Retry-After is 1 s (retry-after-ms: 1000).
      CHECK(events[0].delay == (f.condition == keel::condition::throttled ? 1000ms : 250ms));
      CHECK(r.server.stats().model("m").requests == 2);
    }
  }
}

TEST_CASE("every permanent provider error class fails at once without a retry", "[llm][e2e]") {
  for (const e2e_fault& f : permanent_faults) {
    for (auto kind : all_providers) {
      INFO(kind_name(kind) << " fault " << keel::testing::to_string(f.fault));
      rig r;
      r.server.set_plan("m", fault_plan().with_script({f.fault}));
      auto [out, events] =
          r.retried(kind, keel::retry_policy::with_backoff(5, keel::backoff::constant(100ms)));
      REQUIRE(out.error);
      CHECK(out.code() == f.code);  // rethrown unchanged, not wrapped in retries_exhausted
      CHECK(out.code() == keel::condition::permanent);
      CHECK(keel::classify(out.error).condition == keel::condition::permanent);
      CHECK(events.empty());
      CHECK(out.finished_at_ms == 0);  // no backoff sleep
      // The API key never leaks into the error.
      CHECK(keel::describe(out.error).find("sk-test-secret-key") == std::string::npos);
      CHECK(r.server.stats().model("m").requests == 1);
    }
  }
}

TEST_CASE("transport faults (reset, truncated body) are transient and retried end to end",
          "[llm][e2e]") {
  for (auto fault : {fault_kind::reset, fault_kind::truncated}) {
    for (auto kind : all_providers) {
      INFO(kind_name(kind) << " fault " << keel::testing::to_string(fault));
      rig r;
      r.server.set_plan("m", fault_plan().with_script({fault, fault}));
      auto [out, events] =
          r.retried(kind, keel::retry_policy::with_backoff(2, keel::backoff::constant(100ms)));
      REQUIRE(out.error);
      CHECK(out.code() == keel::error::retries_exhausted);
      const auto last = keel::root_cause(out.error);
      CHECK(code_of(last) == keel::condition::transient);
      CHECK(code_of(last).category() != keel::llm::error_category());  // the client's error
      REQUIRE(events.size() == 1);
      CHECK(events[0].classification.condition == keel::condition::transient);
      CHECK(events[0].delay == 100ms);
      CHECK_FALSE(events[0].from_server_hint);
      const auto s = r.server.stats().model("m");
      CHECK(s.requests == 2);
      CHECK(s.resets + s.truncations == 2);
    }
  }
}

TEST_CASE("each Retry-After form sets the retry delay end to end", "[llm][e2e]") {
  using keel::testing::retry_after_style;
  struct form {
    retry_after_style style;
    std::chrono::milliseconds lo;  // exclusive, unless equal to hi
    std::chrono::milliseconds hi;  // inclusive
  };
  // The plan's delay is 2300 ms; seconds round it up; an HTTP-date has second resolution and is
  // computed from the real wall clock, so only a bound holds for it.
  const std::vector<form> forms{
      {retry_after_style::milliseconds, 2300ms, 2300ms},
      {retry_after_style::seconds, 3000ms, 3000ms},
      {retry_after_style::both, 2300ms, 2300ms},  // retry-after-ms wins over Retry-After
      {retry_after_style::http_date, 1300ms, 3300ms},
      {retry_after_style::amz, 2300ms, 2300ms},
  };
  for (const form& fm : forms) {
    for (auto kind : all_providers) {
      if (fm.style == retry_after_style::amz && kind != keel::llm::provider_kind::bedrock) {
        continue;  // x-amz-retry-after is Bedrock's header
      }
      INFO(kind_name(kind) << " form " << keel::testing::to_string(fm.style));
      rig r;
      r.server.set_plan(
          "m",
          fault_plan().with_script({fault_kind::rate_limit}).with_retry_after(2300ms, fm.style));
      auto [out, events] =
          r.retried(kind, keel::retry_policy::with_backoff(3, keel::backoff::constant(100ms)));
      REQUIRE(out.value);
      REQUIRE(events.size() == 1);
      CHECK(code_of(events[0].error) == keel::llm::errc::rate_limited);
      CHECK(events[0].from_server_hint);
      if (fm.lo == fm.hi) {
        CHECK(events[0].delay == fm.hi);
      } else {
        CHECK(events[0].delay > fm.lo);
        CHECK(events[0].delay <= fm.hi);
      }
      CHECK(out.finished_at_ms >=
            std::chrono::duration_cast<std::chrono::milliseconds>(events[0].delay).count());
      CHECK(r.server.stats().model("m").requests == 2);
    }
  }
}

TEST_CASE("the rate limiter's Retry-After is honoured end to end and the retry then succeeds",
          "[llm][e2e]") {
  using keel::testing::retry_after_style;
  for (auto style :
       {retry_after_style::both, retry_after_style::milliseconds, retry_after_style::amz}) {
    INFO("form " << keel::testing::to_string(style));
    rig r;
    fault_plan plan = fault_plan().with_rate_limit(/*rps*/ 4, /*tpm*/ 0, /*burst*/ 1);
    plan.retry_after_format = style;
    r.server.set_plan("m", plan);
    std::vector<keel::retry_event> events;
    auto policy = keel::retry_policy::with_backoff(3, keel::backoff::constant(10ms));
    policy.on_retry = [&](const keel::retry_event& e) { events.push_back(e); };
    outcome<int> out;
    auto two_calls = [&]() -> asio::awaitable<int> {
      int ok = 0;
      for (int i = 0; i < 2; ++i) {
        auto reply = co_await keel::with_retry<manual_clock>(
            r.call(keel::llm::provider_kind::bedrock, "m"), policy);
        ok += reply.text.empty() ? 0 : 1;
      }
      co_return ok;
    };
    spawn(r.ctx, two_calls(), out);
    REQUIRE(keel::testing::run_until(
        r.ctx, [&] { return out.done; }, 1min));
    CHECK(out.value == 2);
    // The second call found the bucket empty; virtual time may have moved while the first call
    // was on the wire, so the wait is at most one refill (250 ms), and obeying it succeeds.
    REQUIRE(events.size() == 1);
    CHECK(events[0].from_server_hint);
    CHECK(events[0].delay > 0ms);
    CHECK(events[0].delay <= 250ms);
    CHECK(r.server.stats().model("m").status_count(429) == 1);
    CHECK(r.server.stats().model("m").requests == 3);
  }
}

namespace {

// A sender that answers 401 and echoes back whatever credentials it was sent, as some
// OpenAI-compatible servers and proxies do.
struct echoing_sender {
  asio::awaitable<keel::http::response> send(keel::http::request req) {
    std::string sent;
    for (std::string_view name : {"authorization", "x-api-key", "x-amz-security-token"}) {
      if (auto v = req.headers.find(name)) {
        std::string value(*v);
        if (value.starts_with("Bearer ")) {
          value.erase(0, 7);  // the bare key: "Bearer ..." is already caught by redact()
        }
        sent += value + " ";
      }
    }
    keel::http::response res;
    res.status = 401;
    res.headers.set("content-type", "application/json");
    res.headers.set("x-request-id", "req-" + sent);  // echoed in a header too
    const std::string message = "Incorrect API key provided: " + sent;
    if (bedrock) {
      res.headers.set("x-amzn-errortype", "UnrecognizedClientException");
      res.body = nlohmann::json{{"message", message}}.dump();
    } else {
      res.body = nlohmann::json{{"error", {{"type", "authentication_error"}, {"message", message}}}}
                     .dump();
    }
    co_return res;
  }
  bool bedrock = false;
};

}  // namespace

TEST_CASE("credentials a server echoes in an error never reach the error's message", "[llm]") {
  // Keys of shapes the pattern-based redaction does not recognise.
  const std::string key = "ZZplainkey12345";
  const keel::llm::aws_credentials aws{"AKIDSHORT", "plainsecret/KEY+value", "plain-session-tok"};
  for (const auto kind : {keel::llm::provider_kind::openai, keel::llm::provider_kind::anthropic,
                          keel::llm::provider_kind::bedrock}) {
    CAPTURE(static_cast<int>(kind));
    asio::io_context ctx;
    echoing_sender sender{kind == keel::llm::provider_kind::bedrock};
    keel::llm::endpoint ep(kind, "http://127.0.0.1:1", key, "us-east-1");
    outcome<keel::llm::chat_response> out;
    spawn(ctx, keel::llm::complete(sender, ep, hello("m"), aws), out);
    ctx.run();
    REQUIRE(out.done);
    REQUIRE(out.error);
    try {
      std::rethrow_exception(out.error);
    } catch (const keel::llm::provider_error& e) {
      CHECK(e.llm_code() == keel::llm::errc::auth);
      const std::string all = std::string(e.what()) + "|" + e.message() + "|" + e.provider_code() +
                              "|" + e.request_id();
      CAPTURE(all);
      CHECK(all.find("[redacted]") != std::string::npos);
      CHECK(all.find("ZZplain") == std::string::npos);
      // The secret key itself is never sent (SigV4 signs with it), so this one guards the
      // signing code, not the masking: it fails only if the secret ever went on the wire.
      CHECK(all.find("plainsecret") == std::string::npos);
      CHECK(all.find("plain-session") == std::string::npos);
      CHECK(all.find("AKIDSHORT") == std::string::npos);
    }
  }
}

TEST_CASE("a secret cut by the message's truncation is masked up to the cut", "[llm]") {
  keel::llm::provider_error_info info(401, "openai", "",
                                      std::string(290, 'x') + " ZZplainkey12345");
  const keel::llm::provider_error e(keel::llm::errc::auth, info);
  REQUIRE(e.message().find("ZZplai") != std::string::npos);  // cut inside the key
  REQUIRE(e.message().ends_with("..."));
  const keel::llm::provider_error clean = keel::llm::without_secrets(e, {"ZZplainkey12345"});
  CHECK(clean.message().find("ZZpl") == std::string::npos);
  CHECK(clean.message().find("[redacted]") != std::string::npos);
  CHECK(std::string(clean.what()).find("ZZpl") == std::string::npos);
  CHECK(clean.status() == 401);
  CHECK(clean.llm_code() == keel::llm::errc::auth);
  // Nothing to mask: the same error comes back.
  CHECK(keel::llm::without_secrets(e, {"absent-secret", "", "ab"}).message() == e.message());
}
