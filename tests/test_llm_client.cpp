// Tests of keel::llm::client's library surface (the owning constructor, `complete`, the opaque
// per-call context, the pacing hook) against the mock server over loopback. The policy stack
// itself is tested in test_llm_client_fallback.cpp (fallback, breakers, attempt slots),
// test_llm_client_pacing.cpp (429s, token buckets, learned limits) and test_llm_client_wire.cpp
// (AWS modes, generation parameters, odd answers, redaction, private CAs).
#include <keel/llm/client.hpp>

#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <catch2/catch.hpp>

#include <optional>
#include <set>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
using keel::testing::fault_kind;
using keel::testing::fault_plan;

keel::llm::client_config config_for(const std::string& base_url, const std::string& extra = "") {
  const std::string text =
      R"({"config_list": [{"model": "primary", "base_url": ")" + base_url +
      R"(", "api_key": "sk-test-key-123"}, {"model": "backup", "base_url": ")" + base_url +
      R"(", "api_key": "sk-test-key-123"}])" + extra + "}";
  return keel::llm::parse_config(text, "<test>",
                                 [](std::string_view) { return std::optional<std::string>{}; });
}

// Runs `body` on `ctx` until it returns, then stops the context (the server keeps it busy).
template <class T, class Body>
T run(asio::io_context& ctx, Body body) {
  std::optional<T> value;
  std::exception_ptr error;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        try {
          value.emplace(co_await body());
        } catch (...) {
          error = std::current_exception();
        }
        ctx.stop();
      },
      asio::detached);
  ctx.run();
  ctx.restart();
  if (error) {
    std::rethrow_exception(error);
  }
  return std::move(*value);
}

}  // namespace

TEST_CASE(
    "an owning client completes a request with the entry's model when the request names "
    "none, and hands its context to every hook",
    "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server{ctx, {.seed = 1}};
  server.set_plan("primary", fault_plan{}.with_script({fault_kind::unavailable}));
  server.start();

  std::vector<const void*> attempt_contexts;
  std::vector<const void*> retry_contexts;
  keel::llm::client_hooks hooks;
  hooks.on_attempt = [&](const keel::llm::attempt_report& r) {
    attempt_contexts.push_back(r.context);
  };
  hooks.on_retry = [&](const keel::llm::retry_report& r) { retry_contexts.push_back(r.context); };
  keel::llm::client llm{ctx.get_executor(), config_for(server.base_url()), hooks};

  const int tag = 42;
  const keel::llm::chat_response reply = run<keel::llm::chat_response>(ctx, [&] {
    return llm.complete(keel::llm::chat_request("", {{"user", "hello there"}}, 32), &tag);
  });
  CHECK(reply.text == "mock answer to: hello there");
  CHECK(reply.model == "primary");
  // The scripted 503 was retried on the same entry: two attempts, one retry, all with `tag`.
  REQUIRE(attempt_contexts.size() == 2);
  CHECK(attempt_contexts[0] == &tag);
  CHECK(attempt_contexts[1] == &tag);
  REQUIRE(retry_contexts.size() == 1);
  CHECK(retry_contexts[0] == &tag);
  CHECK(server.stats().status_count(503) == 1);
}

TEST_CASE("complete throws the call's final error, and error_class names its deciding kind",
          "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server{ctx, {.seed = 2}};
  // Both entries refuse the key: a permanent error, not retried, falls back, then fails.
  server.set_plan("primary", fault_plan{}.with_probability(fault_kind::auth, 1.0));
  server.set_plan("backup", fault_plan{}.with_probability(fault_kind::auth, 1.0));
  server.start();
  std::vector<std::pair<std::size_t, std::size_t>> fallbacks;
  keel::llm::client_hooks hooks;
  hooks.on_fallback = [&](const void*, std::size_t from, std::size_t to, std::exception_ptr) {
    fallbacks.emplace_back(from, to);
  };
  keel::llm::client llm{ctx.get_executor(), config_for(server.base_url()), hooks};

  std::exception_ptr failure;
  try {
    run<keel::llm::chat_response>(ctx, [&] {
      return llm.complete(keel::llm::chat_request("", {{"user", "hi"}}, 16));
    });
  } catch (...) {
    failure = std::current_exception();
  }
  REQUIRE(failure);
  CHECK(keel::llm::error_class(failure) == "auth");
  CHECK(keel::llm::error_status(failure) == 401);
  REQUIRE(fallbacks.size() == 1);
  CHECK(fallbacks[0] == std::pair<std::size_t, std::size_t>{0, 1});
  // The error never carries the key.
  CHECK(keel::llm::error_json(failure).dump().find("sk-test-key-123") == std::string::npos);
}

TEST_CASE("an owning client reports its buckets' pacing through the pacing hook", "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server{ctx, {.seed = 3}};
  // A limiter without rate-limit headers and without Retry-After: only outcomes teach the rate.
  server.set_plan("primary",
                  fault_plan{}
                      .with_rate_limit(50, 0, 5)
                      .with_rate_limit_headers(false)
                      .with_limiter_retry_after(keel::testing::limiter_retry_after_mode::none));
  server.start();
  std::set<keel::pacing_phase> phases;
  std::set<std::string> buckets;
  keel::llm::client_hooks hooks;
  hooks.on_pacing = [&](const std::string& bucket, const keel::pacing_state& requests,
                        const keel::pacing_state&) {
    buckets.insert(bucket);
    phases.insert(requests.phase);
  };
  keel::llm::client_options options;
  options.seed = 7;
  keel::llm::client llm{ctx.get_executor(), config_for(server.base_url()), hooks, options};

  // 40 calls at once against a burst of 5: the startup wave draws 429s and the controller
  // leaves startup; every call still ends with an answer.
  const std::vector<keel::llm::call_outcome> outcomes = run<std::vector<keel::llm::call_outcome>>(
      ctx, [&]() -> asio::awaitable<std::vector<keel::llm::call_outcome>> {
        std::vector<keel::llm::call_outcome> out(40);
        std::size_t done = 0;
        auto ex = co_await asio::this_coro::executor;
        asio::steady_timer all_done(ex, asio::steady_timer::time_point::max());
        for (std::size_t i = 0; i < out.size(); ++i) {
          asio::co_spawn(
              ex,
              [&, i]() -> asio::awaitable<void> {
                out[i] = co_await llm.call(keel::llm::chat_request("", {{"user", "x"}}, 8));
                if (++done == out.size()) {
                  all_done.cancel();
                }
              },
              asio::detached);
        }
        co_await all_done.async_wait(asio::as_tuple(asio::use_awaitable));
        co_return out;
      });
  for (const auto& o : outcomes) {
    CHECK(o.response.has_value());
  }
  CHECK(server.stats().status_count(429) > 0);
  CHECK(buckets == std::set<std::string>{"openai/primary"});
  CHECK(phases.count(keel::pacing_phase::search) + phases.count(keel::pacing_phase::cruise) > 0);
}
