// Tests for keel/aws/retry.hpp and keel/llm/aws_facts.hpp: AWS retry modes around any call.
#include <keel/aws/retry.hpp>
#include <keel/deadline.hpp>
#include <keel/http/error.hpp>
#include <keel/llm/aws_facts.hpp>
#include <keel/llm/error.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using namespace keel_test;
using keel::aws::retry_mode;
using keel::aws::retry_revision;
using keel::llm::errc;

namespace {

using hint_t = std::optional<std::chrono::nanoseconds>;

std::exception_ptr provider(std::string name, errc e, int status, std::string code = {},
                            hint_t hint = std::nullopt) {
  keel::llm::provider_error_info info(status, std::move(name), std::move(code), "test");
  info.retry_after = hint;
  return std::make_exception_ptr(keel::llm::provider_error(e, std::move(info)));
}

/// A Bedrock error response (the errc does not matter to the AWS mapping).
std::exception_ptr bedrock(int status, std::string code, hint_t hint = std::nullopt) {
  const errc e = status == 429   ? errc::rate_limited
                 : status >= 500 ? errc::server_error
                                 : errc::bad_request;
  return provider("bedrock", e, status, std::move(code), hint);
}

std::exception_ptr system_error(boost::system::error_code ec) {
  return std::make_exception_ptr(boost::system::system_error(ec));
}

/// An operation that fails with its script's errors, one per attempt (null or past the end:
/// succeeds with 42), recording when each attempt began.
struct aws_script {
  explicit aws_script(std::vector<std::exception_ptr> o = {}) : outcomes(std::move(o)) {}

  std::vector<std::exception_ptr> outcomes;
  std::vector<long long> started_ms;

  asio::awaitable<int> run() {
    const std::size_t i = started_ms.size();
    started_ms.push_back(now_ms());
    if (i < outcomes.size() && outcomes[i]) {
      std::rethrow_exception(outcomes[i]);
    }
    co_return 42;
  }

  auto factory() {
    return [this] { return run(); };
  }
};

keel::aws::retry_strategy strategy(retry_mode mode, int attempts,
                                   retry_revision rev = retry_revision::v2_0) {
  return keel::aws::retry_strategy{keel::aws::resolved_retry_config{mode, attempts}, rev,
                                   keel::aws::now_seconds<manual_clock>()};
}

/// Provider facts, jitter pinned to `r`, retries recorded in `events` (if given).
keel::aws::aws_retry_options pinned(double r, std::vector<keel::retry_event>* events = nullptr) {
  keel::aws::aws_retry_options opts;
  opts.facts = keel::llm::aws_attempt_facts;
  opts.rand = [r] { return r; };
  if (events) {
    opts.on_retry = [events](const keel::retry_event& e) { events->push_back(e); };
  }
  return opts;
}

/// `opts` with its give-up reasons recorded in `why`.
keel::aws::aws_retry_options recording(keel::aws::aws_retry_options opts,
                                       std::vector<keel::aws::give_up_reason>& why) {
  opts.on_give_up = [&why](keel::aws::give_up_reason r) { why.push_back(r); };
  return opts;
}

/// Runs one call to completion in virtual time.
outcome<int> run_call(aws_script& op, keel::aws::retry_strategy& s,
                      keel::aws::aws_retry_options opts) {
  asio::io_context ctx;
  outcome<int> out;
  spawn(ctx, keel::aws::with_retry<manual_clock>(op.factory(), s, std::move(opts)), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  return out;
}

}  // namespace

TEST_CASE("standard mode makes 3 attempts on 503 and rethrows the original error", "[aws]") {
  manual_clock::reset();
  auto s = strategy(retry_mode::standard, 3);
  aws_script op{{bedrock(503, "ServiceUnavailableException"),
                 bedrock(503, "ServiceUnavailableException"),
                 bedrock(503, "ServiceUnavailableException")}};
  std::vector<keel::retry_event> events;
  std::vector<keel::aws::give_up_reason> why;
  const auto out = run_call(op, s, recording(pinned(1.0, &events), why));
  CHECK(why == std::vector{keel::aws::give_up_reason::attempts_exhausted});
  CHECK(op.started_ms == std::vector<long long>{0, 1000, 3000});
  CHECK(out.finished_at_ms == 3000);
  CHECK(out.error == op.outcomes[2]);  // the very exception object, no retries_exhausted wrapper
  REQUIRE(events.size() == 2);
  CHECK(events[0].attempt == 1);
  CHECK(events[0].delay == 1s);
  CHECK(events[1].attempt == 2);
  CHECK(events[1].delay == 2s);
  CHECK(events[0].error == op.outcomes[0]);
  CHECK(events[0].classification.condition == keel::condition::transient);
  CHECK_FALSE(events[0].from_server_hint);
  CHECK(s.quota()->available() == 490);  // two retries at 5, nothing given back on failure
}

TEST_CASE("a 2.0 quota is drained by 50 calls of three 502s and call 51 gets no retry", "[aws]") {
  manual_clock::reset();
  auto s = strategy(retry_mode::standard, 3);
  const auto three_502 = [] {
    return std::vector<std::exception_ptr>{bedrock(502, "BadGateway"), bedrock(502, "BadGateway"),
                                           bedrock(502, "BadGateway")};
  };
  int full_calls = 0;
  for (int call = 1; call <= 50; ++call) {
    aws_script op{three_502()};
    const auto out = run_call(op, s, pinned(0.0));
    CHECK(out.error == op.outcomes[2]);
    full_calls += op.started_ms.size() == 3 ? 1 : 0;
  }
  CHECK(full_calls == 50);
  CHECK(s.quota()->available() == 0);

  aws_script last{three_502()};
  std::vector<keel::aws::give_up_reason> why;
  const auto out = run_call(last, s, recording(pinned(0.0), why));
  CHECK(why == std::vector{keel::aws::give_up_reason::quota_exhausted});
  CHECK(last.started_ms.size() == 1);
  CHECK(out.error == last.outcomes[0]);
  CHECK(s.quota()->available() == 0);

  // A first-attempt success gives back the no-retry increment.
  aws_script ok;
  CHECK(run_call(ok, s, pinned(0.0)).value == 42);
  CHECK(s.quota()->available() == 1);
}

TEST_CASE("a 2.1 quota allows 17 full calls then one retry on call 18 then none", "[aws]") {
  manual_clock::reset();
  auto s = strategy(retry_mode::standard, 3, retry_revision::v2_1);
  std::vector<std::size_t> attempts;
  for (int call = 1; call <= 20; ++call) {
    aws_script op{
        {bedrock(502, "BadGateway"), bedrock(502, "BadGateway"), bedrock(502, "BadGateway")}};
    run_call(op, s, pinned(0.0));
    attempts.push_back(op.started_ms.size());
  }
  std::vector<std::size_t> expected(17, 3);
  expected.insert(expected.end(), {2, 1, 1});
  CHECK(attempts == expected);
  CHECK(s.quota()->available() == 10);  // 500 - 35 * 14
}

TEST_CASE("a call whose retry eventually succeeds leaves 495 at 2.0 and 486 at 2.1", "[aws]") {
  manual_clock::reset();
  const bool v21 = GENERATE(false, true);
  auto s = strategy(retry_mode::standard, 3, v21 ? retry_revision::v2_1 : retry_revision::v2_0);
  aws_script op{{bedrock(500, "InternalServerException"), bedrock(500, "InternalServerException")}};
  const auto out = run_call(op, s, pinned(1.0));
  CHECK(out.value == 42);
  if (v21) {
    CHECK(op.started_ms == std::vector<long long>{0, 50, 150});  // 0.05 s, 0.1 s
    CHECK(s.quota()->available() == 486);
  } else {
    CHECK(op.started_ms == std::vector<long long>{0, 1000, 3000});
    CHECK(s.quota()->available() == 495);
  }
}

TEST_CASE("legacy retries a bare 429 five times with uncapped delays", "[aws]") {
  manual_clock::reset();
  SECTION("five attempts, delays 1, 2, 4 and 8 s, no quota") {
    auto s = strategy(retry_mode::legacy, 5);
    aws_script op{std::vector<std::exception_ptr>(5, bedrock(429, ""))};
    op.outcomes[4] = bedrock(429, "");  // a distinct last error
    const auto out = run_call(op, s, pinned(1.0));
    CHECK(op.started_ms == std::vector<long long>{0, 1000, 3000, 7000, 15000});
    CHECK(out.error == op.outcomes[4]);
    CHECK(s.quota() == nullptr);
    CHECK(s.limiter() == nullptr);
  }
  SECTION("the legacy delay is not capped at 20 s") {
    auto s = strategy(retry_mode::legacy, 7);
    aws_script op{std::vector<std::exception_ptr>(6, bedrock(429, ""))};
    std::vector<keel::retry_event> events;
    const auto out = run_call(op, s, pinned(1.0, &events));
    CHECK(out.value == 42);
    REQUIRE(events.size() == 6);
    CHECK(events[5].delay == 32s);
    CHECK(op.started_ms.back() == 63000);
  }
}

TEST_CASE("standard mode does not retry a bare 429 with no error code", "[aws]") {
  manual_clock::reset();
  auto s = strategy(retry_mode::standard, 3);
  aws_script op{{bedrock(429, "")}};
  const auto out = run_call(op, s, pinned(1.0));
  CHECK(op.started_ms.size() == 1);
  CHECK(out.error == op.outcomes[0]);
  CHECK(s.quota()->available() == 500);
}

TEST_CASE("standard mode retries a throttling code whatever the status", "[aws]") {
  manual_clock::reset();
  // 2.1: throttling uses scale 1 (1 s at rand 1) and costs 5, not 14.
  auto s = strategy(retry_mode::standard, 3, retry_revision::v2_1);
  aws_script op{{bedrock(400, "ThrottlingException")}};
  int quota_during_retry = -1;
  auto opts = pinned(1.0);
  opts.on_retry = [&](const keel::retry_event&) { quota_during_retry = s.quota()->available(); };
  const auto out = run_call(op, s, opts);
  CHECK(out.value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 1000});
  CHECK(quota_during_retry == 495);
  CHECK(s.quota()->available() == 500);  // the success gives the 5 back
}

TEST_CASE("a non-retryable error and the attempt cap stop at once with the original error",
          "[aws]") {
  manual_clock::reset();
  SECTION("a validation error is not retried") {
    auto s = strategy(retry_mode::standard, 3);
    aws_script op{{bedrock(400, "ValidationException")}};
    std::vector<keel::aws::give_up_reason> why;
    const auto out = run_call(op, s, recording(pinned(1.0), why));
    CHECK(why == std::vector{keel::aws::give_up_reason::not_retryable});
    CHECK(op.started_ms.size() == 1);
    CHECK(out.error == op.outcomes[0]);
    CHECK(s.quota()->available() == 500);
  }
  SECTION("one total attempt means no retry, even for a 503") {
    auto s = strategy(retry_mode::standard, 1);
    aws_script op{{bedrock(503, "ServiceUnavailableException")}};
    const auto out = run_call(op, s, pinned(1.0));
    CHECK(op.started_ms.size() == 1);
    CHECK(out.error == op.outcomes[0]);
    CHECK(s.quota()->available() == 500);
  }
}

TEST_CASE("at 2.1 x-amz-retry-after lengthens the delay and is reported as a server hint",
          "[aws]") {
  manual_clock::reset();
  std::vector<keel::retry_event> events;
  SECTION("1500 ms beats the 0.05 s backoff") {
    auto s = strategy(retry_mode::standard, 3, retry_revision::v2_1);
    aws_script op{{bedrock(503, "ServiceUnavailableException", 1500ms)}};
    CHECK(run_call(op, s, pinned(1.0, &events)).value == 42);
    CHECK(op.started_ms == std::vector<long long>{0, 1500});
    REQUIRE(events.size() == 1);
    CHECK(events[0].delay == 1500ms);
    CHECK(events[0].from_server_hint);
  }
  SECTION("10000 ms is clamped to the backoff plus 5 s") {
    auto s = strategy(retry_mode::standard, 3, retry_revision::v2_1);
    aws_script op{{bedrock(503, "ServiceUnavailableException", 10s)}};
    CHECK(run_call(op, s, pinned(1.0, &events)).value == 42);
    CHECK(op.started_ms == std::vector<long long>{0, 5050});
    REQUIRE(events.size() == 1);
    CHECK(events[0].from_server_hint);
  }
  SECTION("0 ms does not shorten the backoff and is not a hint") {
    auto s = strategy(retry_mode::standard, 3, retry_revision::v2_1);
    aws_script op{{bedrock(503, "ServiceUnavailableException", 0ms)}};
    CHECK(run_call(op, s, pinned(1.0, &events)).value == 42);
    CHECK(op.started_ms == std::vector<long long>{0, 50});
    REQUIRE(events.size() == 1);
    CHECK_FALSE(events[0].from_server_hint);
  }
  SECTION("2.0 ignores the header") {
    auto s = strategy(retry_mode::standard, 3, retry_revision::v2_0);
    aws_script op{{bedrock(503, "ServiceUnavailableException", 1500ms)}};
    CHECK(run_call(op, s, pinned(1.0, &events)).value == 42);
    CHECK(op.started_ms == std::vector<long long>{0, 1000});
    REQUIRE(events.size() == 1);
    CHECK_FALSE(events[0].from_server_hint);
  }
}

TEST_CASE("adaptive mode sends freely until the first throttle, then waits for the limiter",
          "[aws]") {
  manual_clock::reset();
  auto s = strategy(retry_mode::adaptive, 3);
  REQUIRE(s.limiter() != nullptr);
  REQUIRE(s.quota() != nullptr);
  aws_script op{{bedrock(400, "ThrottlingException")}};
  std::vector<std::pair<long long, std::chrono::nanoseconds>> waits;  // (at ms, wait)
  std::vector<keel::retry_event> events;
  auto opts = pinned(0.5, &events);
  opts.on_rate_limit_wait = [&](std::chrono::nanoseconds w) { waits.emplace_back(now_ms(), w); };
  const auto out = run_call(op, s, opts);
  CHECK(out.value == 42);
  // Attempt 1 went at t = 0 with no wait (limiter disabled). The throttle at t = 0 set the rate
  // to 0.5 tokens/s with an empty bucket; after the 0.5 s backoff it holds 0.25 tokens, so the
  // limiter asks for (1 - 0.25) / 0.5 = 1.5 s more: attempt 2 goes at exactly t = 2 s.
  REQUIRE(events.size() == 1);
  CHECK(events[0].delay == 500ms);
  REQUIRE(waits.size() == 1);
  CHECK(waits[0].first == 500);
  CHECK(waits[0].second == 1500ms);
  CHECK(op.started_ms == std::vector<long long>{0, 2000});
  CHECK(s.limiter()->enabled());
  // The success at t = 2: measured rate 0.8, CUBIC 3.2, capped at 2 x 0.8.
  CHECK(s.limiter()->fill_rate() == Approx(1.6).margin(1e-9));
}

TEST_CASE("an adaptive limiter wait past the enclosing deadline gives up with the last error",
          "[aws][deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto s = strategy(retry_mode::adaptive, 3);
  aws_script op{{bedrock(400, "ThrottlingException")}};
  int waits = 0;
  std::vector<keel::aws::give_up_reason> why;
  auto opts = recording(pinned(0.0), why);
  opts.on_rate_limit_wait = [&](std::chrono::nanoseconds) { ++waits; };
  outcome<int> out;
  spawn(ctx,
        keel::with_deadline<manual_clock>(
            [&] { return keel::aws::with_retry<manual_clock>(op.factory(), s, opts); }, 1s),
        out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  // The limiter wants 2 s before the retry (empty bucket at 0.5 tokens/s): past the 1 s deadline.
  CHECK(out.finished_at_ms == 0);
  CHECK(op.started_ms.size() == 1);
  CHECK(waits == 0);
  CHECK(out.error == op.outcomes[0]);
  CHECK(why == std::vector{keel::aws::give_up_reason::no_time_left});
}

TEST_CASE("a timeout costs 10 at 2.0 and 14 at 2.1, other transport errors 5", "[aws]") {
  manual_clock::reset();
  asio::io_context ctx;
  // Each attempt is a per-attempt with_deadline (a read timeout) around a 5 s operation.
  int calls = 0;
  auto slow = [&]() -> asio::awaitable<int> {
    ++calls;
    co_await sleep_for(5s);
    co_return 1;
  };
  auto timing_out = [&] { return keel::with_deadline<manual_clock>(slow, 1s); };
  SECTION("2.0") {
    auto s = strategy(retry_mode::standard, 3);
    outcome<int> out;
    spawn(ctx, keel::aws::with_retry<manual_clock>(timing_out, s, pinned(0.0)), out);
    REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
    CHECK(calls == 3);
    CHECK(out.finished_at_ms == 3000);
    CHECK(out.code() == keel::error::deadline_exceeded);
    CHECK(s.quota()->available() == 480);
  }
  SECTION("2.1") {
    auto s = strategy(retry_mode::standard, 3, retry_revision::v2_1);
    outcome<int> out;
    spawn(ctx, keel::aws::with_retry<manual_clock>(timing_out, s, pinned(0.0)), out);
    REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
    CHECK(calls == 3);
    CHECK(s.quota()->available() == 472);
  }
  SECTION("a connection reset at 2.0") {
    auto s = strategy(retry_mode::standard, 3);
    aws_script op{{system_error(asio::error::connection_reset),
                   system_error(asio::error::connection_reset),
                   system_error(asio::error::connection_reset)}};
    keel::aws::aws_retry_options opts;  // default facts: a transport error
    opts.rand = [] { return 0.0; };
    const auto out = run_call(op, s, opts);
    CHECK(op.started_ms.size() == 3);
    CHECK(out.error == op.outcomes[2]);
    CHECK(s.quota()->available() == 490);
  }
}

TEST_CASE("a strategy built from a config follows its revision (AWS_NEW_RETRIES_2026)", "[aws]") {
  manual_clock::reset();
  keel::aws::resolved_retry_config cfg{retry_mode::standard, 3, retry_revision::v2_1};
  keel::aws::retry_strategy s{cfg, keel::aws::now_seconds<manual_clock>()};
  CHECK(s.revision() == retry_revision::v2_1);
  aws_script op{{bedrock(500, "InternalServerException"), bedrock(500, "InternalServerException")}};
  CHECK(run_call(op, s, pinned(1.0)).value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 50, 150});
  CHECK(s.quota()->available() == 486);
}

TEST_CASE("the initial quota and the maximum backoff can be tuned", "[aws]") {
  manual_clock::reset();
  keel::aws::retry_tuning tuning;
  tuning.initial_quota = 8;
  tuning.max_backoff = 1.5;
  keel::aws::retry_strategy s{keel::aws::resolved_retry_config{retry_mode::standard, 5},
                              retry_revision::v2_0, keel::aws::now_seconds<manual_clock>(), tuning};
  CHECK(s.quota()->max() == 8);
  CHECK(s.max_backoff() == 1.5);
  // 5 of 8 for the first retry; the second (5 more) is refused.
  aws_script drained{std::vector<std::exception_ptr>(5, bedrock(503, "ServiceUnavailable"))};
  std::vector<keel::aws::give_up_reason> why;
  run_call(drained, s, recording(pinned(1.0), why));
  CHECK(drained.started_ms == std::vector<long long>{0, 1000});
  CHECK(why == std::vector<keel::aws::give_up_reason>{keel::aws::give_up_reason::quota_exhausted});

  manual_clock::reset();
  tuning = keel::aws::retry_tuning{};
  tuning.max_backoff = 1.5;
  keel::aws::retry_strategy capped{keel::aws::resolved_retry_config{retry_mode::standard, 4},
                                   retry_revision::v2_0, keel::aws::now_seconds<manual_clock>(),
                                   tuning};
  CHECK(capped.quota()->max() == 500);
  aws_script op{std::vector<std::exception_ptr>(3, bedrock(503, "ServiceUnavailable"))};
  CHECK(run_call(op, capped, pinned(1.0)).value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 1000, 2500, 4000});  // 1, then 1.5, 1.5
}

TEST_CASE("the adaptive limiter's clock and rate calculator can be injected", "[aws]") {
  // A scripted calculator records what it is asked, at the injected clock's times (1000 s ahead
  // of the manual clock); with a minimum fill rate of 2 the retry after the throttle waits
  // (1 - 0 tokens) / 2 = 0.5 s.
  struct scripted : keel::aws::rate_calculator {
    std::vector<std::pair<std::string, double>> calls;
    double success(double t) override {
      calls.emplace_back("success", t);
      return 100;
    }
    double throttle(double rate, double t) override {
      calls.emplace_back("throttle", t);
      return rate;
    }
  };
  manual_clock::reset();
  auto calc = std::make_shared<scripted>();
  keel::aws::retry_tuning tuning;
  tuning.adaptive.calculator = calc;
  tuning.adaptive.min_fill_rate = 2;
  tuning.limiter_clock = [] { return 1000 + keel::aws::now_seconds<manual_clock>(); };
  keel::aws::retry_strategy s{keel::aws::resolved_retry_config{retry_mode::adaptive, 3},
                              keel::aws::now_seconds<manual_clock>(), tuning};
  aws_script op{{bedrock(400, "ThrottlingException")}};
  CHECK(run_call(op, s, pinned(0.0)).value == 42);
  CHECK(op.started_ms == std::vector<long long>{0, 500});
  CHECK(calc->calls ==
        std::vector<std::pair<std::string, double>>{{"throttle", 1000.0}, {"success", 1000.5}});
  // Measured 2 responses / 0.5 s, smoothed to 3.2: the calculator's 100 is capped at 2 x 3.2.
  CHECK(s.limiter()->fill_rate() == Approx(6.4).margin(1e-9));
}

TEST_CASE("legacy retries socket errors but not other exceptions", "[aws]") {
  manual_clock::reset();
  auto s = strategy(retry_mode::legacy, 5);
  keel::aws::aws_retry_options opts;
  opts.rand = [] { return 1.0; };
  aws_script resets{
      {system_error(asio::error::connection_reset), system_error(asio::error::connection_refused)}};
  CHECK(run_call(resets, s, opts).value == 42);
  CHECK(resets.started_ms == std::vector<long long>{0, 1000, 3000});

  aws_script odd{{std::make_exception_ptr(std::runtime_error("parse failure"))}};
  const auto out = run_call(odd, s, opts);
  CHECK(odd.started_ms.size() == 1);
  CHECK(out.error == odd.outcomes[0]);
}

TEST_CASE("legacy does not retry a broken response stream or a malformed response", "[aws]") {
  // botocore's legacy handler retries only socket errors; ResponseStreamingError (keel::http's
  // truncated_response) and the base HTTPClientError (protocol_error) propagate on attempt 1.
  // Standard mode retries both, and legacy still retries a connection closed before the
  // response, a connect timeout and a refused connection.
  manual_clock::reset();
  keel::aws::aws_retry_options opts;
  opts.facts = keel::llm::aws_attempt_facts;  // what keel batch uses; falls back to the default
  opts.rand = [] { return 1.0; };
  for (const keel::http::error e :
       {keel::http::error::truncated_response, keel::http::error::protocol_error}) {
    INFO(keel::http::make_error_code(e).message());
    manual_clock::reset();
    auto legacy = strategy(retry_mode::legacy, 5);
    aws_script broken{{system_error(e), system_error(e)}};
    std::vector<keel::aws::give_up_reason> why;
    const auto out = run_call(broken, legacy, recording(opts, why));
    CHECK(broken.started_ms == std::vector<long long>{0});
    CHECK(out.error == broken.outcomes[0]);
    CHECK(why == std::vector<keel::aws::give_up_reason>{keel::aws::give_up_reason::not_retryable});

    auto standard = strategy(retry_mode::standard, 3);
    aws_script again{{system_error(e), system_error(e)}};
    CHECK(run_call(again, standard, opts).value == 42);
    CHECK(again.started_ms.size() == 3);
  }
  manual_clock::reset();
  auto legacy = strategy(retry_mode::legacy, 5);
  aws_script sockets{{system_error(keel::http::error::connection_closed),
                      system_error(keel::http::error::connect_timeout),
                      system_error(asio::error::connection_refused)}};
  CHECK(run_call(sockets, legacy, opts).value == 42);
  CHECK(sockets.started_ms == std::vector<long long>{0, 1000, 3000, 7000});
}

TEST_CASE("attempt facts tell a socket error from other transport errors", "[aws]") {
  using keel::aws::default_attempt_facts;
  for (const auto& ep :
       {system_error(asio::error::connection_reset), system_error(asio::error::connection_refused),
        system_error(asio::error::eof), system_error(keel::http::error::connection_closed)}) {
    const auto f = default_attempt_facts(ep);
    REQUIRE(f);
    CHECK(f->transport_error);
    CHECK(f->socket_error);
    CHECK_FALSE(f->timeout);
  }
  for (const auto& ep : {system_error(keel::http::error::connect_timeout),
                         system_error(keel::http::error::request_timeout)}) {
    const auto f = default_attempt_facts(ep);
    REQUIRE(f);
    CHECK(f->socket_error);
    CHECK(f->timeout);
  }
  for (const auto& ep : {system_error(keel::http::error::truncated_response),
                         system_error(keel::http::error::protocol_error)}) {
    const auto f = default_attempt_facts(ep);
    REQUIRE(f);
    CHECK(f->transport_error);
    CHECK_FALSE(f->socket_error);
  }
  // botocore's SSLError is a ConnectionError: retried by every mode, unlike keel's own policies.
  for (const auto& ep : {system_error(keel::http::error::tls_verification_failed),
                         system_error(keel::http::error::tls_error)}) {
    REQUIRE(keel::classify(ep).condition == keel::condition::permanent);
    const auto f = default_attempt_facts(ep);
    REQUIRE(f);
    CHECK(f->transport_error);
    CHECK(f->socket_error);
    CHECK_FALSE(f->timeout);
  }
  // A provider's "no response at all" is a connection failure.
  const auto none = keel::llm::aws_attempt_facts(provider("bedrock", errc::transport, 0));
  REQUIRE(none);
  CHECK(none->socket_error);
  const auto throttled = keel::llm::aws_attempt_facts(bedrock(429, "ThrottlingException"));
  REQUIRE(throttled);
  CHECK_FALSE(throttled->socket_error);
}

TEST_CASE("a ConverseStream exception event is judged as the same exception as a whole response",
          "[aws][retry][stream]") {
  // Exception events carry the stream's 200 and a lowerCamelCase :exception-type.
  struct row {
    errc kind;
    const char* type;
    const char* code;
    int status;
  };
  for (const row& r :
       {row{errc::rate_limited, "throttlingException", "ThrottlingException", 429},
        row{errc::server_error, "modelStreamErrorException", "ModelStreamErrorException", 500},
        row{errc::overloaded, "serviceUnavailableException", "ServiceUnavailableException", 503},
        row{errc::bad_request, "validationException", "ValidationException", 400}}) {
    INFO(r.type);
    const auto f = keel::llm::aws_attempt_facts(provider("bedrock", r.kind, 200, r.type));
    REQUIRE(f);
    CHECK(f->code == r.code);
    CHECK(f->status == r.status);
  }
  // So legacy mode retries a throttling event and a model stream error, and not a validation one.
  manual_clock::reset();
  keel::aws::aws_retry_options opts;
  opts.facts = keel::llm::aws_attempt_facts;
  opts.rand = [] { return 0.0; };
  auto legacy = strategy(retry_mode::legacy, 5);
  aws_script events{{provider("bedrock", errc::rate_limited, 200, "throttlingException"),
                     provider("bedrock", errc::server_error, 200, "modelStreamErrorException")}};
  CHECK(run_call(events, legacy, opts).value == 42);
  CHECK(events.started_ms.size() == 3);
  auto legacy2 = strategy(retry_mode::legacy, 5);
  aws_script invalid{{provider("bedrock", errc::bad_request, 200, "validationException")}};
  CHECK(run_call(invalid, legacy2, opts).error == invalid.outcomes[0]);
}

TEST_CASE("cancellation during a backoff sleep ends the call at once and is not retried", "[aws]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto s = strategy(retry_mode::standard, 3);
  aws_script op{
      {bedrock(503, "ServiceUnavailableException"), bedrock(503, "ServiceUnavailableException")}};
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::aws::with_retry<manual_clock>(op.factory(), s, pinned(1.0)), out, sig.slot());
  keel::testing::run_for(ctx, 400ms);  // inside the 1 s backoff
  REQUIRE_FALSE(out.done);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 400);
  CHECK(out.code() == asio::error::operation_aborted);
  CHECK(op.started_ms.size() == 1);
  CHECK(s.quota()->available() == 495);  // the granted retry was paid for; nothing else
}

TEST_CASE("a cancelled attempt is neither retried nor recorded in the quota or the limiter",
          "[aws]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto s = strategy(retry_mode::adaptive, 3);
  int calls = 0;
  auto op = [&]() -> asio::awaitable<int> {
    ++calls;
    co_await sleep_for(1s);
    co_return 1;
  };
  outcome<int> out;
  asio::cancellation_signal sig;
  spawn(ctx, keel::aws::with_retry<manual_clock>(op, s, pinned(1.0)), out, sig.slot());
  keel::testing::run_for(ctx, 500ms);
  sig.emit(asio::cancellation_type::terminal);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == asio::error::operation_aborted);
  CHECK(calls == 1);
  CHECK(s.quota()->available() == 500);
  // A response recorded at t = 0.5 would have measured 0.8 * 1 / 0.5 = 1.6.
  CHECK(s.limiter()->measured_rate() == 0);
  CHECK_FALSE(s.limiter()->enabled());
}

TEST_CASE("an open circuit breaker is rethrown at once without retry or bookkeeping", "[aws]") {
  manual_clock::reset();
  auto s = strategy(retry_mode::adaptive, 5);
  aws_script op{{bedrock(503, "ServiceUnavailableException"),
                 std::make_exception_ptr(keel::failure(keel::error::circuit_open, "open"))}};
  const auto out = run_call(op, s, pinned(1.0));
  CHECK(op.started_ms == std::vector<long long>{0, 1000});
  CHECK(out.error == op.outcomes[1]);
  CHECK(out.code() == keel::error::circuit_open);
  CHECK(s.quota()->available() == 495);  // the first retry only; nothing given back
  // Only the 503 at t = 0 was recorded (rate 0); the breaker at t = 1 would have made it 1.6.
  CHECK(s.limiter()->measured_rate() == 0);
}

TEST_CASE(
    "an enclosing with_deadline shorter than the next backoff gives up with the original "
    "error",
    "[aws][deadline]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto s = strategy(retry_mode::standard, 3);
  aws_script op{
      {bedrock(503, "ServiceUnavailableException"), bedrock(503, "ServiceUnavailableException")}};
  outcome<int> out;
  spawn(ctx,
        keel::with_deadline<manual_clock>(
            [&] { return keel::aws::with_retry<manual_clock>(op.factory(), s, pinned(1.0)); },
            2500ms),
        out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  // Attempt 2 fails at t = 1 s; the 2 s backoff would end at 3 s, past the 2.5 s deadline.
  CHECK(op.started_ms == std::vector<long long>{0, 1000});
  CHECK(out.finished_at_ms == 1000);
  CHECK(out.error == op.outcomes[1]);
  CHECK(s.quota()->available() == 495);  // the refused retry is not charged
}

TEST_CASE("aws::with_retry works for operations returning void", "[aws]") {
  manual_clock::reset();
  asio::io_context ctx;
  auto s = strategy(retry_mode::standard, 3);
  int calls = 0;
  auto op = [&]() -> asio::awaitable<void> {
    if (++calls < 2) {
      std::rethrow_exception(bedrock(500, "InternalServerException"));
    }
    co_return;
  };
  outcome<void> out;
  spawn(ctx, keel::aws::with_retry<manual_clock>(op, s, pinned(1.0)), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK_FALSE(out.error);
  CHECK(calls == 2);
  CHECK(out.finished_at_ms == 1000);
  CHECK(s.quota()->available() == 500);  // 500 - 5 + 5
}

TEST_CASE("retry_strategy owns a quota and a limiter according to its mode", "[aws]") {
  manual_clock::reset();
  const auto legacy = strategy(retry_mode::legacy, 5);
  CHECK(legacy.quota() == nullptr);
  CHECK(legacy.limiter() == nullptr);
  CHECK(legacy.total_max_attempts() == 5);
  const auto standard = strategy(retry_mode::standard, 3, retry_revision::v2_1);
  REQUIRE(standard.quota() != nullptr);
  CHECK(standard.quota()->available() == 500);
  CHECK(standard.limiter() == nullptr);
  CHECK(standard.revision() == retry_revision::v2_1);
  CHECK(standard.costs().retry == 14);
  const auto adaptive = strategy(retry_mode::adaptive, 0);
  CHECK(adaptive.mode() == retry_mode::adaptive);
  CHECK(adaptive.quota() != nullptr);
  CHECK(adaptive.limiter() != nullptr);
  CHECK(adaptive.total_max_attempts() == 1);  // clamped
}

TEST_CASE("default_attempt_facts reads keel conditions", "[aws]") {
  using keel::aws::default_attempt_facts;
  CHECK_FALSE(default_attempt_facts(system_error(asio::error::operation_aborted)));
  CHECK_FALSE(default_attempt_facts(
      std::make_exception_ptr(keel::failure(keel::error::circuit_open, "open"))));

  const auto timeout = default_attempt_facts(system_error(asio::error::timed_out));
  REQUIRE(timeout);
  CHECK(timeout->transport_error);
  CHECK(timeout->timeout);

  const auto deadline = default_attempt_facts(
      std::make_exception_ptr(keel::failure(keel::error::deadline_exceeded, "late")));
  REQUIRE(deadline);
  CHECK(deadline->timeout);

  const auto reset = default_attempt_facts(system_error(asio::error::connection_reset));
  REQUIRE(reset);
  CHECK(reset->transport_error);
  CHECK_FALSE(reset->timeout);

  for (const auto& ep : {std::make_exception_ptr(std::runtime_error("x")),
                         std::make_exception_ptr(keel::failure(keel::error::throttled, "local")),
                         system_error(make_error_code(boost::system::errc::invalid_argument))}) {
    const auto f = default_attempt_facts(ep);
    REQUIRE(f);
    CHECK(f->status == 0);
    CHECK(f->code.empty());
    CHECK_FALSE(f->transport_error);
    CHECK_FALSE(f->timeout);
    CHECK_FALSE(keel::aws::standard_retryable(f->status, f->code, f->transport_error, f->timeout));
    CHECK_FALSE(keel::aws::legacy_retryable(f->status, f->code, f->transport_error));
  }
}

TEST_CASE("aws_attempt_facts maps provider errors of every provider", "[aws][llm]") {
  struct row {
    const char* provider;
    errc code;
    int status;
    const char* provider_code;
    hint_t hint;
    // Expected facts.
    int status_out;
    const char* code_out;
    bool transport;
    std::optional<std::string> amz;
    bool standard_retries;
    bool legacy_retries;
  };
  const std::vector<row> rows{
      {"bedrock", errc::rate_limited, 429, "ThrottlingException", 1500ms, 429,
       "ThrottlingException", false, "1500", true, true},
      {"bedrock", errc::rate_limited, 429, "ThrottlingException", 1500ms + 1ns, 429,
       "ThrottlingException", false, "1501", true, true},
      {"bedrock", errc::overloaded, 503, "ServiceUnavailableException", std::nullopt, 503,
       "ServiceUnavailableException", false, std::nullopt, true, true},
      {"bedrock", errc::overloaded, 429, "ModelNotReadyException", std::nullopt, 429,
       "ModelNotReadyException", false, std::nullopt, false, true},
      {"bedrock", errc::timeout, 408, "ModelTimeoutException", std::nullopt, 408,
       "ModelTimeoutException", false, std::nullopt, false, false},
      {"bedrock", errc::bad_request, 400, "ValidationException", std::nullopt, 400,
       "ValidationException", false, std::nullopt, false, false},
      {"bedrock", errc::transport, 0, "", std::nullopt, 0, "", true, std::nullopt, true, true},
      {"openai", errc::rate_limited, 429, "rate_limit_exceeded", 2s, 429, "ThrottlingException",
       false, std::nullopt, true, true},
      {"openai", errc::quota_exhausted, 429, "insufficient_quota", std::nullopt, 400, "", false,
       std::nullopt, false, false},
      {"openai", errc::overloaded, 503, "", std::nullopt, 503, "", false, std::nullopt, true, true},
      {"openai", errc::server_error, 500, "server_error", std::nullopt, 500, "", false,
       std::nullopt, true, true},
      {"openai", errc::timeout, 408, "", std::nullopt, 408, "RequestTimeout", false, std::nullopt,
       true, false},
      {"openai", errc::transport, 0, "", std::nullopt, 0, "", true, std::nullopt, true, true},
      {"openai", errc::auth, 401, "invalid_api_key", std::nullopt, 401, "", false, std::nullopt,
       false, false},
      {"anthropic", errc::overloaded, 529, "overloaded_error", std::nullopt, 503, "", false,
       std::nullopt, true, true},
      {"anthropic", errc::rate_limited, 429, "rate_limit_error", 3s, 429, "ThrottlingException",
       false, std::nullopt, true, true},
      {"anthropic", errc::timeout, 504, "timeout_error", std::nullopt, 504, "RequestTimeout", false,
       std::nullopt, true, true},
      {"anthropic", errc::server_error, 500, "api_error", std::nullopt, 500, "", false,
       std::nullopt, true, true},
      {"anthropic", errc::context_length_exceeded, 400, "invalid_request_error", std::nullopt, 400,
       "", false, std::nullopt, false, false},
  };
  for (const row& r : rows) {
    INFO(r.provider << " " << keel::llm::to_string(r.code) << " " << r.status);
    const auto f = keel::llm::aws_attempt_facts(
        provider(r.provider, r.code, r.status, r.provider_code, r.hint));
    REQUIRE(f);
    CHECK(f->status == r.status_out);
    CHECK(f->code == r.code_out);
    CHECK(f->transport_error == r.transport);
    CHECK_FALSE(f->timeout);
    CHECK(f->amz_retry_after == r.amz);
    CHECK(keel::aws::standard_retryable(f->status, f->code, f->transport_error, f->timeout) ==
          r.standard_retries);
    CHECK(keel::aws::legacy_retryable(f->status, f->code, f->transport_error) == r.legacy_retries);
  }
  CHECK(keel::aws::is_throttling_code(
      keel::llm::aws_attempt_facts(provider("openai", errc::rate_limited, 429))->code));
}

TEST_CASE("aws_attempt_facts falls back to the default facts for other errors", "[aws][llm]") {
  CHECK_FALSE(keel::llm::aws_attempt_facts(system_error(asio::error::operation_aborted)));
  CHECK_FALSE(keel::llm::aws_attempt_facts(
      std::make_exception_ptr(keel::failure(keel::error::circuit_open, "open"))));
  const auto reset = keel::llm::aws_attempt_facts(system_error(asio::error::connection_reset));
  REQUIRE(reset);
  CHECK(reset->transport_error);
  const auto none = keel::llm::aws_attempt_facts(nullptr);
  REQUIRE(none);
  CHECK(none->status == 0);
  CHECK_FALSE(none->transport_error);
}
