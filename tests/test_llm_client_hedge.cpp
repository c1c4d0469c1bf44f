// Tests of keel::llm::client's hedged attempts (`policy.hedge`) against the mock over loopback:
// a slow attempt gets a second copy, the first to answer (a stream: to produce its first text)
// wins, the loser's connection is closed, hedges go to the next entry when asked, and the budget
// caps them. The hedge schedule itself is tested on virtual time in test_hedge.cpp.
#include <keel/llm/client.hpp>

#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "llm_client_support.hpp"
#include "mock_support.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel::testing::stream_settings;
using keel_test::client::make_config;

struct hedge_seen {
  std::size_t entry;
  std::size_t attempt;
  std::size_t to;
};

// A client on `server` (started) with `entries` and `policy`, recording its hedges in `seen`.
keel::llm::client make_client(asio::io_context& ctx, keel::testing::mock_llm_server& server,
                              const std::string& entries, const std::string& policy,
                              std::vector<hedge_seen>& seen) {
  server.start();
  keel::llm::client_hooks hooks;
  hooks.on_hedge = [&seen](std::size_t entry, const void*, std::size_t attempt, std::size_t to) {
    seen.push_back({entry, attempt, to});
  };
  return keel::llm::client(
      ctx.get_executor(),
      make_config(R"({"config_list": )" + entries + R"(, "policy": )" + policy + "}",
                  server.base_url()),
      hooks, {.seed = 1});
}

const std::string one_entry = R"([{"model": "m", "api_key": "k"}])";

// Hedge after a fixed 50 ms; the retry budget off so that only the hedge budget caps.
const std::string hedge_50ms = R"({"hedge": {"enabled": true, "delay": 0.05, "percentile": 0},
                                   "retry_budget": {"enabled": false}})";

keel::llm::chat_request prompt() {
  return keel::llm::chat_request::from_prompt("", "hedge me", 64);
}

}  // namespace

TEST_CASE("a stalled attempt is hedged, the hedge answers and the stalled one is closed",
          "[llm_client][hedge]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_script({fault_kind::stall}));
  std::vector<hedge_seen> seen;
  keel::llm::client client = make_client(ctx, server, one_entry, hedge_50ms, seen);
  keel::llm::call_outcome out;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        out = co_await client.call(prompt());
        co_await keel_test::until([&] { return server.stats().total.abandoned == 1; });
      },
      10s);
  REQUIRE_FALSE(out.error);
  CHECK(out.response->text == "mock answer to: hedge me");
  CHECK(out.attempts == 2);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].attempt == 1);
  CHECK(seen[0].to == 0);
  const auto s = server.stats();
  CHECK(s.model("m").requests == 2);
  CHECK(s.model("m").abandoned == 1);
  CHECK(s.model("m").status_count(200) == 1);
}

TEST_CASE("an attempt that answers within the delay is never hedged", "[llm_client][hedge]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  std::vector<hedge_seen> seen;
  keel::llm::client client = make_client(
      ctx, server, one_entry, R"({"hedge": {"enabled": true, "delay": 5, "percentile": 0}})", seen);
  std::vector<keel::llm::call_outcome> out;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 20; ++i) {
          out.push_back(co_await client.call(prompt()));
        }
      },
      10s);
  for (const auto& o : out) {
    CHECK_FALSE(o.error);
    CHECK(o.attempts == 1);
  }
  CHECK(seen.empty());
  CHECK(server.stats().model("m").requests == 20);
}

TEST_CASE("with a percentile delay, hedges stay within the budget and count as attempts",
          "[llm_client][hedge]") {
  // The p95 of ~1 ms latencies hedges about one call in twenty once 5 are known; the budget
  // (capacity 2, 0.05 per call) allows at most 2 + 0.05 * 100 = 7.
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_latency(0ms, 4ms));
  std::vector<hedge_seen> seen;
  keel::llm::client client =
      make_client(ctx, server, one_entry,
                  R"({"hedge": {"enabled": true, "min_samples": 5, "budget_capacity": 2}})", seen);
  int attempts = 0;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 100; ++i) {
          const auto o = co_await client.call(prompt());
          CHECK_FALSE(o.error);
          attempts += o.attempts;
        }
      },
      20s);
  CHECK(seen.size() <= 7);
  CHECK(attempts == 100 + static_cast<int>(seen.size()));
  // A hedge that lost while it was still connecting never reached the server.
  CHECK(server.stats().model("m").requests <= static_cast<std::uint64_t>(attempts));
  CHECK(server.stats().model("m").requests >= 100);
}

TEST_CASE("a hedged stream commits at its first text: only the winner's deltas arrive",
          "[llm_client][hedge][stream]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  stream_settings st;
  st.fault_after_chunks = 0;  // the first copy's head arrives, its first text never does
  server.set_plan("m", fault_plan{}.with_stream(st).with_script({fault_kind::stream_stall}));
  std::vector<hedge_seen> seen;
  keel::llm::client client = make_client(ctx, server, one_entry, hedge_50ms, seen);
  std::string text;
  int restarts = 0;
  keel::llm::call_outcome out;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        out = co_await client.stream_call(
            prompt(), [&](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
              restarts += d.restart ? 1 : 0;
              text += d.text;
              co_return;
            });
        co_await keel_test::until([&] { return server.stats().total.abandoned == 1; });
      },
      10s);
  REQUIRE_FALSE(out.error);
  CHECK(text == "mock answer to: hedge me");
  CHECK(restarts == 0);
  CHECK(out.attempts == 2);
  CHECK(seen.size() == 1);
  REQUIRE(out.first_token_seconds);
  CHECK(*out.first_token_seconds >= 0.05);  // the hedge's first token
  CHECK(server.stats().model("m").streams == 2);
}

TEST_CASE("hedges go to the next entry when asked, and the winner's entry is reported",
          "[llm_client][hedge]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_script({fault_kind::stall}));
  std::vector<hedge_seen> seen;
  keel::llm::client client = make_client(
      ctx, server,
      R"([{"model": "m", "api_key": "k"}, {"api_type": "anthropic", "model": "n", "api_key": "k"}])",
      R"({"hedge": {"enabled": true, "delay": 0.05, "percentile": 0, "target": "next"}})", seen);
  keel::llm::call_outcome out;
  keel_test::run_against(
      ctx, server, [&]() -> asio::awaitable<void> { out = co_await client.call(prompt()); }, 10s);
  REQUIRE_FALSE(out.error);
  CHECK(out.entry == 1);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].entry == 0);
  CHECK(seen[0].to == 1);
  CHECK(server.stats().model("m").requests == 1);
  CHECK(server.stats().model("n").requests == 1);
}

TEST_CASE("a hedged stream that fails after its first text is the committed entry's failure",
          "[llm_client][hedge][stream][review]") {
  // Before, the entry reported was the hedge's (started last, then cancelled), because only a
  // copy that finished named the winner.
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  stream_settings st;
  st.fault_after_chunks = 2;
  server.set_plan("m", fault_plan{}.with_latency(200ms).with_stream(st).with_script(
                           {fault_kind::stream_error}));
  server.set_plan("n", fault_plan{}.with_latency(5s));
  std::vector<hedge_seen> seen;
  keel::llm::client client = make_client(
      ctx, server,
      R"([{"model": "m", "api_key": "k"}, {"api_type": "anthropic", "model": "n", "api_key": "k"}])",
      R"({"hedge": {"enabled": true, "delay": 0.05, "percentile": 0, "target": "next"},
          "retry_budget": {"enabled": false}})",
      seen);
  keel::llm::call_outcome out;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        out = co_await client.stream_call(
            prompt(), [&](const keel::llm::stream_delta&) -> asio::awaitable<void> { co_return; });
      },
      10s);
  REQUIRE(out.error);
  CHECK(keel::llm::error_class(out.error) == "stream_interrupted");
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].to == 1);  // the hedge went to "n" and was cancelled
  CHECK(out.entry == 0);   // "m" delivered text and failed
}

TEST_CASE("the hedge budget caps hedges: a call it refuses waits for its own attempt",
          "[llm_client][hedge]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  // Two calls whose first attempts stall; the budget holds one hedge and earns none. The second
  // call's stalled attempt ends at the entry's 0.3 s timeout and is retried.
  server.set_plan("m", fault_plan{}.with_script(
                           {fault_kind::stall, fault_kind::ok, fault_kind::stall, fault_kind::ok}));
  std::vector<hedge_seen> seen;
  keel::llm::client client =
      make_client(ctx, server, R"([{"model": "m", "api_key": "k", "timeout": 0.3}])",
                  R"({"hedge": {"enabled": true, "delay": 0.05, "percentile": 0, "budget_ratio": 0,
                    "budget_capacity": 1},
          "retry": {"max_attempts": 2, "backoff": {"kind": "constant", "base": 0.001}},
          "retry_budget": {"enabled": false}, "breaker": {"enabled": false}})",
                  seen);
  keel::llm::call_outcome first;
  keel::llm::call_outcome second;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        first = co_await client.call(prompt());
        second = co_await client.call(prompt());
      },
      10s);
  REQUIRE_FALSE(first.error);
  REQUIRE_FALSE(second.error);
  CHECK(first.attempts == 2);
  CHECK(second.attempts == 2);
  CHECK(second.seconds >= 0.3);  // waited out its timeout: no hedge
  CHECK(seen.size() == 1);
}

TEST_CASE("policy.hedge is parsed, checked and printed", "[llm_client][hedge][config]") {
  const auto parse = [](const std::string& hedge) {
    return keel::llm::parse_config(
        R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"hedge": )" + hedge + "}}",
        "<test>", [](std::string_view) { return std::optional<std::string>{}; });
  };
  const auto cfg = parse(R"({"enabled": true, "max_attempts": 3, "delay": 0.5, "percentile": 99,
                             "min_samples": 50, "budget_ratio": 0.1, "budget_capacity": 4,
                             "target": "next"})");
  const keel::llm::hedge_config& h = cfg.policy.hedge;
  CHECK(h.enabled);
  CHECK(h.max_attempts == 3);
  CHECK(h.delay == 0.5);
  CHECK(h.percentile == 99);
  CHECK(h.min_samples == 50);
  CHECK(h.budget_ratio == 0.1);
  CHECK(h.budget_capacity == 4);
  CHECK(h.to_next);
  const auto j = keel::llm::to_json(cfg);
  CHECK(j["policy"]["hedge"]["target"] == "next");
  CHECK(j["policy"]["hedge"]["max_attempts"] == 3);
  CHECK_FALSE(parse("{}").policy.hedge.enabled);
  for (const auto& [bad, where] : std::vector<std::pair<std::string, std::string>>{
           {R"({"target": "sideways"})", "/policy/hedge/target"},
           {R"({"max_attempts": 1})", "/policy/hedge/max_attempts"},
           {R"({"percentile": 101})", "/policy/hedge/percentile"},
           {R"({"delay": 0})", "/policy/hedge/delay"},
           {R"({"when": 1})", "/policy/hedge/when"}}) {
    INFO(bad);
    try {
      parse(bad);
      FAIL("accepted");
    } catch (const std::exception& e) {
      CHECK(std::string(e.what()).find(where) != std::string::npos);
    }
  }
}
