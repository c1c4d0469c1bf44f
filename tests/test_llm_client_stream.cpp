// Tests of keel::llm::client's streamed calls (`stream_call`, `stream`) against the mock over
// loopback: the three wire formats, the commit point (retry and fallback before the first delta,
// `stream_interrupted` after it, restarts when allowed), the first-token and idle timeouts,
// cancellation closing the connection, back-pressure and token settlement.
#include <keel/llm/client.hpp>

#include <keel/error.hpp>
#include <keel/llm/error.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <vector>

#include "llm_client_support.hpp"
#include "mock_support.hpp"
#include "support.hpp"

namespace {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel::testing::stream_settings;
using keel_test::client::make_config;

// What a streamed call handed its consumer.
struct consumer {
  std::string text;
  std::vector<keel::llm::stream_delta> deltas;  // text views are dangling; restart/entry only
  int restarts = 0;
  keel::llm::delta_handler handler() {
    return [this](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
      if (d.restart) {
        ++restarts;
        text.clear();
      }
      CHECK_FALSE(d.text.empty());
      text += d.text;
      deltas.push_back(d);
      co_return;
    };
  }
};

// A prompt long enough for a reply of several 4-byte chunks.
keel::llm::chat_request prompt() {
  return keel::llm::chat_request::from_prompt("", "tell me about keels and hulls", 64);
}

const std::string reply = "mock answer to: tell me about keels and hulls";

// A config for `server` with one entry of `api_type` named "m" (plus `entry_extra`, JSON members
// with a leading comma) and `policy` (a JSON object).
keel::llm::client_config one_entry(keel::testing::mock_llm_server& server,
                                   const std::string& api_type, const std::string& policy,
                                   const std::string& entry_extra = "") {
  server.start();  // binds the port the config names (run_against's start is then a no-op)
  std::string entry = R"({"api_type": ")" + api_type + R"(", "model": "m", "api_key": "sk-KEY1")";
  if (api_type == "bedrock") {
    entry = R"({"api_type": "bedrock", "model": "m", "aws_region": "us-east-1",
                "aws_access_key": "AKIAEXAMPLE", "aws_secret_key": "SECRETSECRET")";
  }
  return make_config(
      R"({"config_list": [)" + entry + entry_extra + R"(}], "policy": )" + policy + "}",
      server.base_url());
}

// An owning client on `server` with `one_entry`'s config.
keel::llm::client make_client(asio::io_context& ctx, keel::testing::mock_llm_server& server,
                              const std::string& api_type, const std::string& policy) {
  return keel::llm::client(ctx.get_executor(), one_entry(server, api_type, policy), {},
                           {.seed = 1});
}

// Runs one streamed call of `req` through `client` against `server`, handing deltas to `c`.
keel::llm::call_outcome stream_once(asio::io_context& ctx, keel::testing::mock_llm_server& server,
                                    keel::llm::client& client, consumer& c,
                                    keel::llm::stream_call_options o = {},
                                    keel::llm::chat_request req = prompt()) {
  keel::llm::call_outcome out;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> { out = co_await client.stream_call(req, c.handler(), o); },
      10s);
  return out;
}

// A client of `server` whose key, "sk-ECHOED-KEY-99", the tests make the mock echo.
keel::llm::client echoed_key_client(asio::io_context& ctx, keel::testing::mock_llm_server& server) {
  server.start();
  return keel::llm::client(
      ctx.get_executor(),
      make_config(R"({"config_list": [{"model": "m", "api_key": "sk-ECHOED-KEY-99"}]})",
                  server.base_url()),
      {}, {.seed = 1});
}

// Retries transient failures up to 3 attempts, 1 ms apart; no breaker.
const std::string retrying =
    R"({"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.001}},
        "breaker": {"enabled": false}})";

}  // namespace

TEST_CASE("a streamed call hands every delta to the consumer and returns the whole reply",
          "[llm_client][stream]") {
  for (const char* api : {"openai", "anthropic", "bedrock"}) {
    INFO(api);
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    keel::llm::client client = make_client(ctx, server, api, retrying);
    consumer c;
    const keel::llm::call_outcome out = stream_once(ctx, server, client, c);
    REQUIRE_FALSE(out.error);
    REQUIRE(out.response);
    CHECK(out.response->text == reply);
    CHECK(c.text == reply);
    CHECK(c.deltas.size() > 5);  // 4-byte chunks
    CHECK(out.delivered_deltas == c.deltas.size());
    CHECK(out.delivered_bytes == reply.size());
    CHECK(c.restarts == 0);
    CHECK(out.attempts == 1);
    REQUIRE(out.first_token_seconds);
    CHECK(*out.first_token_seconds <= out.seconds);
    CHECK(out.response->usage.output > 0);  // the final usage event
    CHECK(out.response->usage.input > 0);
    CHECK_FALSE(out.response->finish_reason.empty());
    const auto s = server.stats().model("m");
    CHECK(s.requests == 1);
    CHECK(s.streams == 1);
  }
}

TEST_CASE("failures before the first delta are retried like a whole call", "[llm_client][stream]") {
  for (const char* api : {"openai", "anthropic", "bedrock"}) {
    INFO(api);
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    // A 503, then a stream whose error event comes before any text: both before the commit point.
    stream_settings st;
    st.fault_after_chunks = 0;
    server.set_plan("m", fault_plan{}.with_retry_after(0ms).with_stream(st).with_script(
                             {fault_kind::unavailable, fault_kind::stream_error}));
    keel::llm::client client = make_client(ctx, server, api, retrying);
    consumer c;
    const keel::llm::call_outcome out = stream_once(ctx, server, client, c);
    INFO((out.error ? keel_test::what_of(out.error) : ""));
    REQUIRE_FALSE(out.error);
    CHECK(out.attempts == 3);
    CHECK(c.text == reply);
    CHECK(c.restarts == 0);  // nothing reached the consumer before the third attempt
    CHECK(server.stats().model("m").requests == 3);
  }
}

TEST_CASE("a stream cut after its first delta is not retried and reports what it delivered",
          "[llm_client][stream]") {
  struct row {
    fault_kind fault;
    const char* cause;  // the error_class of the failure that cut the stream
  };
  for (const row& r : {row{fault_kind::stream_drop, "connection"},
                       row{fault_kind::stream_error, ""}, row{fault_kind::stream_corrupt, ""}}) {
    for (const char* api : {"openai", "anthropic", "bedrock"}) {
      INFO(api << " fault " << static_cast<int>(r.fault));
      asio::io_context ctx;
      keel::testing::mock_llm_server server(ctx);
      stream_settings st;
      st.fault_after_chunks = 2;
      server.set_plan("m", fault_plan{}.with_stream(st).with_script({r.fault}));
      keel::llm::client client = make_client(ctx, server, api, retrying);
      consumer c;
      const keel::llm::call_outcome out = stream_once(ctx, server, client, c);
      REQUIRE(out.error);
      CHECK(keel::llm::error_class(out.error) == "stream_interrupted");
      CHECK(keel::classify(out.error).condition == keel::condition::permanent);
      CHECK(out.attempts == 1);
      CHECK(server.stats().model("m").requests == 1);
      CHECK(c.deltas.size() == 2);
      CHECK(out.delivered_deltas == 2);
      CHECK(out.delivered_bytes == 8);
      CHECK(c.text == reply.substr(0, 8));
      CHECK(keel_test::what_of(out.error).find("stream interrupted after 8 bytes in 2 deltas") !=
            std::string::npos);
      // The cause is kept (what cut the stream).
      try {
        std::rethrow_exception(out.error);
      } catch (const keel::failure& f) {
        REQUIRE(f.causes().size() == 1);
        if (*r.cause) {
          CHECK(keel::llm::error_class(f.causes()[0]) == r.cause);
        }
      }
    }
  }
}

TEST_CASE("a restartable stream is retried and the consumer is told to discard its text",
          "[llm_client][stream]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  stream_settings st;
  st.fault_after_chunks = 3;
  server.set_plan("m", fault_plan{}.with_stream(st).with_script({fault_kind::stream_drop}));
  keel::llm::client client = make_client(ctx, server, "openai", retrying);
  consumer c;
  keel::llm::stream_call_options o;
  o.restartable = true;
  const keel::llm::call_outcome out = stream_once(ctx, server, client, c, o);
  REQUIRE_FALSE(out.error);
  CHECK(out.attempts == 2);
  CHECK(c.restarts == 1);
  REQUIRE(c.deltas.size() > 4);
  CHECK(c.deltas[3].restart);  // the second attempt's first delta
  CHECK_FALSE(c.deltas[4].restart);
  CHECK(c.text == reply);
  CHECK(out.delivered_bytes == reply.size());  // counted since the restart
  CHECK(out.delivered_deltas == c.deltas.size() - 3);
}

TEST_CASE("past the commit point no fallback entry answers", "[llm_client][stream]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  stream_settings st;
  st.fault_after_chunks = 1;
  server.set_plan("m", fault_plan{}.with_stream(st).with_script({fault_kind::stream_drop}));
  server.start();
  keel::llm::client client(
      ctx.get_executor(),
      make_config(
          R"({"config_list": [{"model": "m", "api_key": "k"}, {"model": "n", "api_key": "k"}],
                      "policy": {"retry": {"max_attempts": 1}}})",
          server.base_url()),
      {}, {.seed = 1});
  consumer c;
  const keel::llm::call_outcome out = stream_once(ctx, server, client, c);
  REQUIRE(out.error);
  CHECK(keel::llm::error_class(out.error) == "stream_interrupted");
  CHECK(server.stats().model("n").requests == 0);
  CHECK(out.entry == 0);
}

TEST_CASE("a failure before the first delta falls back to the next entry", "[llm_client][stream]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_script({fault_kind::server_error}));
  server.start();
  keel::llm::client client(ctx.get_executor(),
                           make_config(R"({"config_list": [{"model": "m", "api_key": "k"},
                                      {"api_type": "anthropic", "model": "n", "api_key": "k"}],
                      "policy": {"retry": {"max_attempts": 1}}})",
                                       server.base_url()),
                           {}, {.seed = 1});
  consumer c;
  const keel::llm::call_outcome out = stream_once(ctx, server, client, c);
  REQUIRE_FALSE(out.error);
  CHECK(out.entry == 1);
  REQUIRE_FALSE(c.deltas.empty());
  CHECK(c.deltas.front().entry == 1);
  CHECK(c.text == reply);
}

TEST_CASE("a server that sends no first token in time is timed out and retried",
          "[llm_client][stream]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  // The first attempt's head and first token wait out a 10 s tail; the retry is prompt.
  server.set_plan("m", fault_plan{}.with_script({fault_kind::stall}));
  keel::llm::client client = make_client(ctx, server, "openai", retrying);
  consumer c;
  keel::llm::stream_call_options o;
  o.first_token_timeout = 0.05;
  const auto t0 = std::chrono::steady_clock::now();
  const keel::llm::call_outcome out = stream_once(ctx, server, client, c, o);
  REQUIRE_FALSE(out.error);
  CHECK(std::chrono::steady_clock::now() - t0 < 5s);
  CHECK(out.attempts == 2);
  CHECK(c.text == reply);
  CHECK(c.restarts == 0);
}

TEST_CASE("first-token and idle timeouts name which one fired", "[llm_client][stream]") {
  SECTION("no first token: deadline_exceeded, retried up to the cap") {
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    stream_settings st;
    st.fault_after_chunks = 0;
    server.set_plan("m", fault_plan{}.with_stream(st).with_script(
                             {fault_kind::stream_stall, fault_kind::stream_stall}));
    keel::llm::client client = make_client(
        ctx, server, "openai",
        R"({"retry": {"max_attempts": 2, "backoff": {"kind": "constant", "base": 0.001}},
            "stream": {"first_token_timeout": 0.05}})");
    consumer c;
    const keel::llm::call_outcome out = stream_once(ctx, server, client, c);
    REQUIRE(out.error);
    CHECK(out.attempts == 2);
    CHECK(c.deltas.empty());
    CHECK_FALSE(out.first_token_seconds);
    CHECK(keel::llm::error_class(out.error) == "deadline_exceeded");
    CHECK(keel_test::what_of(keel::root_cause(out.error)).find("no first token within") !=
          std::string::npos);
  }
  SECTION("silence after a delta: stream_interrupted caused by the idle timeout") {
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    stream_settings st;
    st.fault_after_chunks = 1;
    server.set_plan("m", fault_plan{}.with_stream(st).with_script({fault_kind::stream_stall}));
    keel::llm::client client = make_client(ctx, server, "openai", retrying);
    consumer c;
    keel::llm::call_outcome out;
    keel::llm::stream_call_options o;
    o.idle_timeout = 0.05;
    keel_test::run_against(
        ctx, server,
        [&]() -> asio::awaitable<void> {
          out = co_await client.stream_call(prompt(), c.handler(), o);
          // The mock sees the stalled connection closed.
          co_await keel_test::until([&] { return server.stats().total.abandoned == 1; });
        },
        10s);
    REQUIRE(out.error);
    CHECK(keel::llm::error_class(out.error) == "stream_interrupted");
    CHECK(out.attempts == 1);
    CHECK(c.deltas.size() == 1);
    try {
      std::rethrow_exception(out.error);
    } catch (const keel::failure& f) {
      REQUIRE(f.causes().size() == 1);
      CHECK(keel_test::what_of(f.causes()[0]).find("stream idle for") != std::string::npos);
    }
  }
}

TEST_CASE("cancelling a streamed call closes its connection at once", "[llm_client][stream]") {
  for (bool in_handler : {false, true}) {
    INFO((in_handler ? "cancelled while the consumer runs" : "cancelled while keel reads"));
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    stream_settings st;
    st.chunk_latency = 20ms;  // the whole stream would take ~0.25 s
    server.set_plan("m", fault_plan{}.with_stream(st));
    keel::llm::client client = make_client(ctx, server, "openai", retrying);
    asio::cancellation_signal cancel;
    consumer c;
    keel::llm::call_outcome out;
    bool finished = false;
    keel::llm::delta_handler h = [&](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
      co_await c.handler()(d);
      if (c.deltas.size() == 2) {
        if (in_handler) {
          cancel.emit(asio::cancellation_type::terminal);
        } else {
          asio::post(ctx, [&] { cancel.emit(asio::cancellation_type::terminal); });
        }
      }
    };
    server.start();
    asio::co_spawn(
        ctx, [&]() -> asio::awaitable<void> { out = co_await client.stream_call(prompt(), h); },
        asio::bind_cancellation_slot(cancel.slot(), [&](std::exception_ptr) { finished = true; }));
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          co_await keel_test::until(
              [&] { return finished && server.stats().total.abandoned == 1; });
          server.stop();
        },
        asio::detached);
    ctx.run_for(10s);
    REQUIRE(finished);
    REQUIRE(out.error);
    CHECK(keel::classify(out.error).condition == keel::condition::cancelled);
    CHECK(c.deltas.size() == 2);
    const auto s = server.stats();
    CHECK(s.total.abandoned == 1);
    CHECK(s.model("m").requests == 1);  // not retried
    // Closed before the stream's last chunk went out.
    REQUIRE(s.responses.size() == 1);
    CHECK(s.responses[0].closed_by_client_at);
    CHECK_FALSE(s.responses[0].completed_at);
  }
}

TEST_CASE("a slow consumer gets one delta at a time and keel reads only when it is ready",
          "[llm_client][stream]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  keel::llm::client client = make_client(ctx, server, "anthropic", retrying);
  int inside = 0;
  int most_inside = 0;
  std::string text;
  keel::llm::delta_handler slow = [&](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
    most_inside = std::max(most_inside, ++inside);
    text += d.text;
    asio::steady_timer t(co_await asio::this_coro::executor, 2ms);
    co_await t.async_wait(asio::use_awaitable);
    --inside;
  };
  keel::llm::chat_response res;
  keel_test::run_against(
      ctx, server, [&]() -> asio::awaitable<void> { res = co_await client.stream(prompt(), slow); },
      10s);
  CHECK(most_inside == 1);
  CHECK(text == reply);
  CHECK(res.text == reply);
}

TEST_CASE("a consumer that throws ends the call with its own error, not retried",
          "[llm_client][stream]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  keel::llm::client client = make_client(ctx, server, "openai", retrying);
  int calls = 0;
  keel::llm::delta_handler throwing = [&](const keel::llm::stream_delta&) -> asio::awaitable<void> {
    ++calls;
    throw std::runtime_error("consumer is full");
    co_return;
  };
  std::string what;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        try {
          co_await client.stream(prompt(), throwing);
        } catch (const std::runtime_error& e) {
          what = e.what();
        }
      },
      10s);
  CHECK(what == "consumer is full");
  CHECK(calls == 1);
  CHECK(server.stats().model("m").requests == 1);
}

TEST_CASE("a consumer's failure is the caller's: no breaker opens and nothing is retried",
          "[llm_client][stream][review]") {
  // keel serve's consumer writes to its caller's socket: a caller that hung up makes it throw
  // the socket's error, a transient-looking one. Twelve such callers opened the provider's
  // breaker for everyone else (and through Redis, for the fleet).
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  keel::llm::client client =
      make_client(ctx, server, "openai",
                  R"({"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.001}},
          "breaker": {"failure_threshold": 2, "break": 60}})");
  const auto hung_up = [](const keel::llm::stream_delta&) -> asio::awaitable<void> {
    throw boost::system::system_error(asio::error::broken_pipe, "writing to the caller");
    co_return;
  };
  std::vector<boost::system::error_code> codes;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 4; ++i) {
          const keel::llm::call_outcome out = co_await client.stream_call(prompt(), hung_up);
          try {
            std::rethrow_exception(out.error);
          } catch (const boost::system::system_error& e) {
            codes.push_back(e.code());
          }
        }
      },
      10s);
  // Each call ended with the consumer's own error, after one request: no retry, no open
  // breaker (two counted failures would have refused the third and fourth calls).
  REQUIRE(codes.size() == 4);
  for (const auto& ec : codes) {
    CHECK(ec == asio::error::broken_pipe);
  }
  CHECK(server.stats().model("m").requests == 4);
}

TEST_CASE("a streamed call settles its token reservation with the final usage",
          "[llm_client][stream]") {
  // The bucket refills on the steady clock (100 tokens/s at 6,000 per minute). The prompt is
  // ~1,000 tokens so that what a settle leaves differs from a held reservation (+4,000) by far
  // more than a slow run refills: the checks below hold for runs of up to ~5 s.
  const std::string prompt = [] {
    std::string p;
    while (p.size() < 4000) {
      p += "tell me about keels and hulls. ";
    }
    return p;
  }();
  const auto remaining = [&](std::vector<fault_kind> script) {
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    stream_settings st;
    st.chunk_bytes = 256;
    st.fault_after_chunks = 2;
    server.set_plan("m", fault_plan{}.with_stream(st).with_script(std::move(script)));
    keel::http::client http(ctx.get_executor(), {});
    keel::llm::bucket_registry buckets(ctx.get_executor());
    keel::llm::client client(ctx.get_executor(),
                             one_entry(server, "openai", R"({"retry": {"max_attempts": 1}})",
                                       R"(, "tokens_per_minute": 6000)"),
                             http, buckets, {}, 1);
    consumer c;
    const keel::llm::call_outcome out = stream_once(
        ctx, server, client, c, {}, keel::llm::chat_request::from_prompt("", prompt, 4000));
    return std::pair{out, buckets.all().at(0).second->available_tokens()};
  };
  const double estimate_prompt = static_cast<double>(prompt.size()) / 4;
  // A whole stream: reserved prompt + 4,000 max_tokens; settled to the reported usage.
  const auto [ok, after_ok] = remaining({});
  REQUIRE(ok.response);
  const double used = static_cast<double>(ok.response->usage.total());
  CHECK(used > estimate_prompt * 0.9);
  CHECK(after_ok >= 6000 - used - 1);
  CHECK(after_ok < 6000 - used + 400);
  // Cut after two chunks: settled to the estimate of what it used (prompt + 512 bytes of text),
  // not the 4,000-token reservation (which would leave ~1,000 plus the refill).
  const auto [cut, after_cut] = remaining({fault_kind::stream_drop});
  REQUIRE(cut.error);
  CHECK(after_cut > 6000 - estimate_prompt - 300);
  CHECK(after_cut < 6000 - estimate_prompt + 500);
}

TEST_CASE("a key the server echoes into a stream never reaches the consumer",
          "[llm_client][stream]") {
  // The mock's reply echoes the prompt; 4-byte chunks split the key across deltas.
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  keel::llm::client client = echoed_key_client(ctx, server);
  consumer c;
  const keel::llm::call_outcome out =
      stream_once(ctx, server, client, c, {},
                  keel::llm::chat_request::from_prompt("", "is sk-ECHOED-KEY-99 mine? s", 64));
  REQUIRE_FALSE(out.error);
  CHECK(c.text == "mock answer to: is <redacted> mine? s");
  CHECK(out.response->text == c.text);
  for (const auto& d : c.deltas) {
    CHECK_FALSE(d.restart);
  }
  CHECK(out.delivered_bytes == c.text.size());
}

TEST_CASE("a key the server echoes into a streamed tool call never reaches the consumer",
          "[llm_client][stream][tools]") {
  // The mock calls the tool by its name with the schema's enum value: both hold the key, and
  // 4-byte argument fragments split it.
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  keel::llm::client client = echoed_key_client(ctx, server);
  keel::llm::chat_request req = prompt();
  keel::llm::tool_definition tool;
  tool.name = "call-sk-ECHOED-KEY-99";
  tool.parameters = nlohmann::json::parse(
      R"({"type":"object","properties":{"k":{"type":"string","enum":["sk-ECHOED-KEY-99"]}},
          "required":["k"]})");
  req.tools.push_back(tool);
  std::string seen;
  keel::llm::call_outcome out;
  keel_test::run_against(
      ctx, server,
      [&]() -> asio::awaitable<void> {
        out = co_await client.stream_call(
            req, [&](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
              REQUIRE(d.tool != nullptr);
              seen += d.tool->id + "|" + d.tool->name + "|" + std::string(d.text) + "\n";
              co_return;
            });
      },
      10s);
  REQUIRE_FALSE(out.error);
  CHECK(seen.find("sk-ECHOED") == std::string::npos);
  CHECK(seen.find("call-<redacted>") != std::string::npos);
  REQUIRE(out.response->tool_calls.size() == 1);
  CHECK(out.response->tool_calls[0].name == "call-<redacted>");
  CHECK(out.response->tool_calls[0].arguments == R"({"k":"<redacted>"})");
}

TEST_CASE("a streamed tool call reaches the consumer as pieces and the reply as a whole call",
          "[llm_client][stream][tools]") {
  for (const char* api : {"openai", "anthropic", "bedrock"}) {
    INFO(api);
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    // The first attempt fails before any piece: retried like text.
    server.set_plan("m", fault_plan{}.with_retry_after(0ms).with_script(
                             {fault_kind::unavailable, fault_kind::ok}));
    keel::llm::client client = make_client(ctx, server, api, retrying);
    keel::llm::chat_request req = prompt();
    keel::llm::tool_definition tool;
    tool.name = "lookup";
    tool.parameters = nlohmann::json::parse(
        R"({"type":"object","properties":{"term":{"type":"string"},"n":{"type":"integer"}},
            "required":["term","n"]})");
    req.tools.push_back(tool);
    std::string id;
    std::string name;
    std::string args;
    std::size_t pieces = 0;
    keel::llm::call_outcome out;
    keel_test::run_against(
        ctx, server,
        [&]() -> asio::awaitable<void> {
          out = co_await client.stream_call(
              req, [&](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
                REQUIRE(d.tool != nullptr);  // no text in this reply
                CHECK(d.tool_index == 0);
                CHECK(d.tool->arguments.empty());  // the fragment is the text
                id += d.tool->id;
                name += d.tool->name;
                args += d.text;
                ++pieces;
                co_return;
              });
        },
        10s);
    REQUIRE_FALSE(out.error);
    CHECK(out.attempts == 2);
    CHECK(pieces > 2);  // the call's start, then 4-byte argument fragments
    CHECK(out.delivered_deltas == pieces);
    CHECK(name == "lookup");
    CHECK_FALSE(id.empty());
    CHECK(nlohmann::json::parse(args) == nlohmann::json{{"term", ""}, {"n", 0}});
    REQUIRE(out.response);
    CHECK(out.response->text.empty());
    REQUIRE(out.response->tool_calls.size() == 1);
    CHECK(out.response->tool_calls[0].id == id);
    CHECK(out.response->tool_calls[0].name == "lookup");
    CHECK(out.response->tool_calls[0].arguments == args);
    // As each provider says it: OpenAI "tool_calls", Anthropic and Bedrock "tool_use".
    CHECK(
        (out.response->finish_reason == "tool_calls" || out.response->finish_reason == "tool_use"));
  }
}
