// Tests for keel/testing/mock_llm_server.hpp: wire formats, every fault kind, limits and counters.
#include <keel/llm/hints.hpp>
#include <keel/testing/detail/json_schema_instance.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include "mock_support.hpp"

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using json = nlohmann::json;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel::testing::mock_llm_server;
using keel::testing::mock_options;
using namespace std::chrono_literals;
using ms = std::chrono::milliseconds;

enum class wire { openai, anthropic, bedrock };

// A request in one of the three wire formats.
struct call {
  std::string target;
  std::string body;
};

call make_call(wire w, const std::string& model, const std::string& prompt) {
  switch (w) {
    case wire::openai:
      return {"/v1/chat/completions",
              json{{"model", model},
                   {"messages", json::array({{{"role", "user"}, {"content", prompt}}})}}
                  .dump()};
    case wire::anthropic:
      return {"/v1/messages",
              json{{"model", model},
                   {"max_tokens", 64},
                   {"messages", json::array({{{"role", "user"}, {"content", prompt}}})}}
                  .dump()};
    case wire::bedrock:
      break;
  }
  return {"/model/" + model + "/converse",
          json{{"messages",
                json::array({{{"role", "user"}, {"content", json::array({{{"text", prompt}}})}}})}}
              .dump()};
}

// What the client saw.
struct answer {
  boost::system::error_code ec;
  bhttp::response<bhttp::string_body> res;
  int status() const { return static_cast<int>(res.result_int()); }
  std::string header(const char* name) const { return std::string(res[name]); }
  json body() const { return json::parse(res.body()); }
};

// One request/response exchange on an open stream, with a client-side timeout.
asio::awaitable<answer> exchange(beast::tcp_stream& stream, call c, ms timeout = 2s) {
  bhttp::request<bhttp::string_body> req{bhttp::verb::post, c.target, 11};
  req.set(bhttp::field::host, "127.0.0.1");
  req.set(bhttp::field::content_type, "application/json");
  req.keep_alive(true);
  req.body() = std::move(c.body);
  req.prepare_payload();
  stream.expires_after(timeout);
  answer a;
  auto [wec, wn] = co_await bhttp::async_write(stream, req, asio::as_tuple(asio::use_awaitable));
  if (wec) {
    a.ec = wec;
    co_return a;
  }
  beast::flat_buffer buffer;
  auto [rec, rn] =
      co_await bhttp::async_read(stream, buffer, a.res, asio::as_tuple(asio::use_awaitable));
  a.ec = rec;
  co_return a;
}

// Connects, exchanges once, and closes.
asio::awaitable<answer> post(unsigned short port, call c, ms timeout = 2s) {
  beast::tcp_stream stream(co_await asio::this_coro::executor);
  co_await stream.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                                asio::use_awaitable);
  answer a = co_await exchange(stream, std::move(c), timeout);
  co_return a;
}

// Runs the client coroutine `body` against a started server, then stops the server.
void run(asio::io_context& ctx, mock_llm_server& server,
         std::function<asio::awaitable<void>()> body) {
  keel_test::run_against(ctx, server, std::move(body), 5s);
}

// A fake clock for the rate limiter and outage windows.
struct fake_time {
  std::chrono::steady_clock::time_point t{std::chrono::hours(1)};
  std::function<std::chrono::steady_clock::time_point()> fn() {
    return [this] { return t; };
  }
};

}  // namespace

TEST_CASE("mock_llm_server answers each wire format with a deterministic completion",
          "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const std::string prompt = "hello world, tell me about keel";
    answer o = co_await post(server.port(), make_call(wire::openai, "gpt-4o-mini", prompt));
    REQUIRE(!o.ec);
    CHECK(o.status() == 200);
    json ob = o.body();
    CHECK(ob["object"] == "chat.completion");
    CHECK(ob["model"] == "gpt-4o-mini");
    CHECK(ob["choices"][0]["message"]["role"] == "assistant");
    CHECK(ob["choices"][0]["message"]["content"] == "mock answer to: " + prompt);
    CHECK(ob["choices"][0]["finish_reason"] == "stop");
    CHECK(ob["usage"]["prompt_tokens"] == 8);  // 31 bytes / 4, rounded up
    CHECK(ob["usage"]["total_tokens"] ==
          ob["usage"]["prompt_tokens"].get<int>() + ob["usage"]["completion_tokens"].get<int>());
    CHECK(o.header("x-request-id").starts_with("req_"));
    // No plan, no limit: no rate-limit headers (a client must not learn a fake limit).
    CHECK(o.header("x-ratelimit-limit-requests").empty());
    CHECK(o.header("x-ratelimit-remaining-tokens").empty());

    answer a = co_await post(server.port(), make_call(wire::anthropic, "claude-3-5-haiku", prompt));
    REQUIRE(!a.ec);
    CHECK(a.status() == 200);
    json ab = a.body();
    CHECK(ab["type"] == "message");
    CHECK(ab["role"] == "assistant");
    CHECK(ab["content"][0]["type"] == "text");
    CHECK(ab["content"][0]["text"] == "mock answer to: " + prompt);
    CHECK(ab["stop_reason"] == "end_turn");
    CHECK(ab["usage"]["input_tokens"] == 8);
    CHECK(a.header("request-id").starts_with("req_"));
    CHECK(a.header("anthropic-ratelimit-requests-limit").empty());

    const std::string long_prompt(100, 'x');
    answer b = co_await post(server.port(),
                             make_call(wire::bedrock, "anthropic.claude-v2%3A1", long_prompt));
    REQUIRE(!b.ec);
    CHECK(b.status() == 200);
    json bb = b.body();
    CHECK(bb["output"]["message"]["role"] == "assistant");
    CHECK(bb["output"]["message"]["content"][0]["text"] ==
          "mock answer to: " + std::string(40, 'x'));
    CHECK(bb["stopReason"] == "end_turn");
    CHECK(bb["usage"]["inputTokens"] == 25);
    CHECK(!b.header("x-amzn-RequestId").empty());
  });
  // The Bedrock model id is percent-decoded from the path.
  CHECK(server.stats().model("anthropic.claude-v2:1").requests == 1);
}

TEST_CASE("mock_llm_server answers malformed JSON with each provider's 400 body",
          "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    answer o = co_await post(server.port(), call{"/v1/chat/completions", "{not json"});
    CHECK(o.status() == 400);
    CHECK(o.body()["error"]["type"] == "invalid_request_error");
    CHECK(o.body()["error"].contains("param"));
    CHECK(o.body()["error"].contains("code"));
    answer a = co_await post(server.port(), call{"/v1/messages", "[1,"});
    CHECK(a.status() == 400);
    CHECK(a.body()["type"] == "error");
    CHECK(a.body()["error"]["type"] == "invalid_request_error");
    answer b = co_await post(server.port(), call{"/model/m/converse", "}"});
    CHECK(b.status() == 400);
    CHECK(b.header("x-amzn-ErrorType").starts_with("ValidationException"));
    CHECK(b.body().contains("message"));
  });
  CHECK(server.stats().status_count(400) == 3);
}

namespace {

struct fault_case {
  wire format;
  fault_kind kind;
  int status;
  const char* pointer;            // JSON pointer into the body
  const char* expected;           // expected string there
  const char* error_type_header;  // Bedrock x-amzn-ErrorType prefix, or ""
  bool retry_after;               // whether retry-after must be present
};

const std::vector<fault_case> fault_matrix{
    {wire::openai, fault_kind::rate_limit, 429, "/error/code", "rate_limit_exceeded", "", true},
    {wire::openai, fault_kind::throttling, 429, "/error/code", "rate_limit_exceeded", "", true},
    {wire::openai, fault_kind::server_error, 500, "/error/type", "server_error", "", false},
    {wire::openai, fault_kind::unavailable, 503, "/error/code", "server_is_overloaded", "", false},
    {wire::openai, fault_kind::overloaded, 503, "/error/type", "service_unavailable_error", "",
     false},
    {wire::openai, fault_kind::quota_exhausted, 429, "/error/code", "insufficient_quota", "",
     false},
    {wire::openai, fault_kind::context_length, 400, "/error/code", "context_length_exceeded", "",
     false},
    {wire::openai, fault_kind::auth, 401, "/error/code", "invalid_api_key", "", false},
    {wire::openai, fault_kind::not_found, 404, "/error/code", "model_not_found", "", false},
    {wire::openai, fault_kind::bad_request, 400, "/error/type", "invalid_request_error", "", false},
    {wire::openai, fault_kind::timeout, 504, "/error/message", "Request timed out.", "", false},
    {wire::anthropic, fault_kind::rate_limit, 429, "/error/type", "rate_limit_error", "", true},
    {wire::anthropic, fault_kind::server_error, 500, "/error/type", "api_error", "", false},
    {wire::anthropic, fault_kind::unavailable, 503, "/error/type", "api_error", "", false},
    {wire::anthropic, fault_kind::overloaded, 529, "/error/type", "overloaded_error", "", false},
    {wire::anthropic, fault_kind::quota_exhausted, 400, "/error/type", "invalid_request_error", "",
     false},
    {wire::anthropic, fault_kind::context_length, 400, "/error/type", "invalid_request_error", "",
     false},
    {wire::anthropic, fault_kind::auth, 401, "/error/type", "authentication_error", "", false},
    {wire::anthropic, fault_kind::not_found, 404, "/error/type", "not_found_error", "", false},
    {wire::anthropic, fault_kind::bad_request, 400, "/error/type", "invalid_request_error", "",
     false},
    {wire::anthropic, fault_kind::timeout, 504, "/error/type", "timeout_error", "", false},
    {wire::bedrock, fault_kind::throttling, 429, "/message",
     "Too many requests, please wait before trying again.", "ThrottlingException", false},
    {wire::bedrock, fault_kind::rate_limit, 429, "/message",
     "Too many requests, please wait before trying again.", "ThrottlingException", false},
    {wire::bedrock, fault_kind::server_error, 500, "", "", "InternalServerException", false},
    {wire::bedrock, fault_kind::unavailable, 503, "", "", "ServiceUnavailableException", false},
    {wire::bedrock, fault_kind::overloaded, 503, "", "", "ServiceUnavailableException", false},
    {wire::bedrock, fault_kind::quota_exhausted, 400, "", "", "ServiceQuotaExceededException",
     false},
    {wire::bedrock, fault_kind::context_length, 400, "/message",
     "Input is too long for requested model.", "ValidationException", false},
    {wire::bedrock, fault_kind::auth, 403, "", "", "AccessDeniedException", false},
    {wire::bedrock, fault_kind::not_found, 404, "", "", "ResourceNotFoundException", false},
    {wire::bedrock, fault_kind::bad_request, 400, "", "", "ValidationException", false},
    {wire::bedrock, fault_kind::timeout, 408, "", "", "ModelTimeoutException", false},
};

}  // namespace

TEST_CASE("mock_llm_server sends each provider's real error body and headers for each fault",
          "[mock_llm_server]") {
  for (const fault_case& fc : fault_matrix) {
    INFO("format " << static_cast<int>(fc.format) << ", fault "
                   << keel::testing::to_string(fc.kind));
    asio::io_context ctx;
    mock_llm_server server{ctx, mock_options{}};
    server.set_plan("m", fault_plan{}.with_script({fc.kind}));
    run(ctx, server, [&]() -> asio::awaitable<void> {
      answer r = co_await post(server.port(), make_call(fc.format, "m", "hi"));
      REQUIRE(!r.ec);
      CHECK(r.status() == fc.status);
      json body = r.body();
      if (fc.format == wire::openai) {
        for (const char* k : {"message", "type", "param", "code"}) {
          CHECK(body["error"].contains(k));
        }
        CHECK(r.header("x-request-id").starts_with("req_"));
      } else if (fc.format == wire::anthropic) {
        CHECK(body["type"] == "error");
        CHECK(body["error"]["message"].is_string());
        CHECK(r.header("request-id").starts_with("req_"));
        CHECK(body["request_id"] == r.header("request-id"));
      } else {
        CHECK(body["message"].is_string());
        CHECK(r.header("x-amzn-ErrorType").starts_with(fc.error_type_header));
        CHECK(!r.header("x-amzn-RequestId").empty());
      }
      if (*fc.pointer) {
        CHECK(body[json::json_pointer(fc.pointer)] == fc.expected);
      }
      CHECK(r.header("retry-after").empty() == !fc.retry_after);
      if (fc.retry_after) {
        CHECK(r.header("retry-after") == "1");
        // retry-after-ms is OpenAI's; Anthropic documents retry-after only.
        CHECK(r.header("retry-after-ms") == (fc.format == wire::openai ? "1000" : ""));
      }
      // Bedrock documents no delay header at all.
      CHECK(r.header("retry-after-ms").empty() == (fc.format != wire::openai || !fc.retry_after));
      CHECK(r.header("x-amz-retry-after").empty());
      if (fc.kind == fault_kind::auth && fc.format == wire::openai) {
        CHECK(body["error"]["type"] == "invalid_request_error");
      }
      if (fc.kind == fault_kind::context_length && fc.format == wire::anthropic) {
        CHECK(body["error"]["message"].get<std::string>().starts_with("prompt is too long"));
      }
      // The script is used up: the next request succeeds.
      answer ok = co_await post(server.port(), make_call(fc.format, "m", "hi"));
      CHECK(ok.status() == 200);
    });
    CHECK(server.stats().status_count(fc.status) == 1);
  }
}

TEST_CASE("mock_llm_server content_filter answers as each provider refuses", "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  server.set_plan("m", fault_plan{}.with_script({fault_kind::content_filter}));
  server.set_plan("c", fault_plan{}.with_script({fault_kind::content_filter}));
  server.set_plan("b", fault_plan{}.with_script({fault_kind::content_filter}));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    // Anthropic: a 200 whose stop_reason is "refusal", without text.
    answer a = co_await post(server.port(), make_call(wire::anthropic, "c", "hi"));
    REQUIRE(!a.ec);
    CHECK(a.status() == 200);
    CHECK(a.body()["type"] == "message");
    CHECK(a.body()["stop_reason"] == "refusal");
    CHECK(a.body()["content"].empty());
    CHECK(a.header("request-id").starts_with("req_"));
    // Bedrock: a 200 with the guardrail's canned text and stopReason "guardrail_intervened".
    answer b = co_await post(server.port(), make_call(wire::bedrock, "b", "hi"));
    REQUIRE(!b.ec);
    CHECK(b.status() == 200);
    CHECK(b.body()["stopReason"] == "guardrail_intervened");
    CHECK(b.body()["output"]["message"]["content"][0]["text"].is_string());
    CHECK(b.header("x-amzn-ErrorType").empty());
    // The scripts are used up: normal answers follow.
    answer a2 = co_await post(server.port(), make_call(wire::anthropic, "c", "hi"));
    CHECK(a2.body()["stop_reason"] == "end_turn");
    answer b2 = co_await post(server.port(), make_call(wire::bedrock, "b", "hi"));
    CHECK(b2.body()["stopReason"] == "end_turn");
  });
  CHECK(server.stats().status_count(200) == 4);
}

TEST_CASE("mock_llm_server openai content_filter is a 200 finish_reason, Azure's 400 a quirk",
          "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  server.set_plan("m", fault_plan{}.with_script({fault_kind::content_filter}));
  keel::testing::provider_quirks azure;
  azure.azure_content_filter = true;
  server.set_plan("az", fault_plan{}.with_script({fault_kind::content_filter}).with_quirks(azure));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    answer o = co_await post(server.port(), make_call(wire::openai, "m", "hi"));
    REQUIRE(!o.ec);
    CHECK(o.status() == 200);
    CHECK(o.body()["choices"][0]["finish_reason"] == "content_filter");
    CHECK(o.body()["choices"][0]["message"]["content"].is_null());
    answer a = co_await post(server.port(), make_call(wire::openai, "az", "hi"));
    REQUIRE(!a.ec);
    CHECK(a.status() == 400);
    CHECK(a.body()["error"]["code"] == "content_filter");
  });
}

TEST_CASE("mock_llm_server openai timeout is a 504, the old 408 a quirk", "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  server.set_plan("m", fault_plan{}.with_script({fault_kind::timeout}));
  keel::testing::provider_quirks old;
  old.openai_timeout_408 = true;
  server.set_plan("old", fault_plan{}.with_script({fault_kind::timeout}).with_quirks(old));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    answer n = co_await post(server.port(), make_call(wire::openai, "m", "hi"));
    CHECK(n.status() == 504);
    CHECK(n.body()["error"]["type"] == "server_error");
    answer o = co_await post(server.port(), make_call(wire::openai, "old", "hi"));
    CHECK(o.status() == 408);
    CHECK(o.body()["error"]["message"] == "Request timed out.");
  });
}

TEST_CASE("mock_llm_server default 429 delay headers are the ones each provider documents",
          "[mock_llm_server]") {
  using keel::testing::retry_after_style;
  CHECK(fault_plan{}.retry_after_format == retry_after_style::provider);
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  for (const char* m : {"o", "a", "b"}) {
    server.set_plan(m, fault_plan{}.with_script({fault_kind::rate_limit}).with_retry_after(1500ms));
  }
  // The extras stay available explicitly.
  server.set_plan("b-both", fault_plan{}
                                .with_script({fault_kind::throttling})
                                .with_retry_after(1500ms, retry_after_style::both));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    answer o = co_await post(server.port(), make_call(wire::openai, "o", "hi"));
    CHECK(o.status() == 429);
    CHECK(o.header("retry-after") == "2");
    CHECK(o.header("retry-after-ms") == "1500");
    answer a = co_await post(server.port(), make_call(wire::anthropic, "a", "hi"));
    CHECK(a.status() == 429);
    CHECK(a.header("retry-after") == "2");
    CHECK(a.header("retry-after-ms").empty());
    CHECK(a.body()["request_id"] == a.header("request-id"));
    answer b = co_await post(server.port(), make_call(wire::bedrock, "b", "hi"));
    CHECK(b.status() == 429);
    CHECK(b.header("x-amzn-ErrorType").starts_with("ThrottlingException"));
    CHECK(b.header("retry-after").empty());
    CHECK(b.header("retry-after-ms").empty());
    CHECK(b.header("x-amz-retry-after").empty());
    answer bb = co_await post(server.port(), make_call(wire::bedrock, "b-both", "hi"));
    CHECK(bb.header("retry-after") == "2");
    CHECK(bb.header("retry-after-ms") == "1500");
  });
}

TEST_CASE("mock_llm_server limiter 429s keep both delay headers under the provider default",
          "[mock_llm_server]") {
  for (wire w : {wire::anthropic, wire::bedrock}) {
    INFO("format " << static_cast<int>(w));
    asio::io_context ctx;
    fake_time clock;
    mock_options opts;
    opts.now = clock.fn();
    mock_llm_server server{ctx, opts};
    server.set_plan("m", fault_plan{}.with_rate_limit(/*rps*/ 4, /*tpm*/ 0, /*burst*/ 1));
    run(ctx, server, [&]() -> asio::awaitable<void> {
      const call c = make_call(w, "m", "hi");
      CHECK((co_await post(server.port(), c)).status() == 200);
      answer limited = co_await post(server.port(), c);
      CHECK(limited.status() == 429);
      CHECK(limited.header("retry-after-ms") == "250");
      CHECK(limited.header("retry-after") == "1");
    });
  }
}

TEST_CASE("mock_llm_server anthropic 413 carries the request id in header and body",
          "[mock_llm_server]") {
  asio::io_context ctx;
  mock_options opts;
  opts.max_request_body = 64;
  mock_llm_server server{ctx, opts};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    answer r = co_await post(server.port(), make_call(wire::anthropic, "m", std::string(200, 'x')));
    REQUIRE(!r.ec);
    CHECK(r.status() == 413);
    CHECK(r.body()["error"]["type"] == "request_too_large");
    CHECK(r.header("request-id").starts_with("req_"));
    CHECK(r.body()["request_id"] == r.header("request-id"));
  });
}

TEST_CASE("minimal_json_instance builds the smallest value each schema keyword accepts",
          "[mock_llm_server]") {
  using keel::testing::detail::minimal_json_instance;
  auto inst = [](const char* schema) { return json::parse(minimal_json_instance(schema)); };
  CHECK(inst(R"({"type":"string"})") == "");
  CHECK(inst(R"({"type":"string","minLength":3})") == "aaa");
  CHECK(inst(R"({"type":"integer","minimum":5})") == 5);
  CHECK(inst(R"({"type":"integer","exclusiveMinimum":5})") == 6);
  CHECK(inst(R"({"type":"integer","maximum":-2})") == -2);
  CHECK(inst(R"({"type":"number","minimum":1.5})") == 1.5);
  CHECK(inst(R"({"type":"boolean"})") == false);
  CHECK(inst(R"({"type":"null"})").is_null());
  CHECK(inst(R"({"type":["string","null"]})") == "");
  CHECK(inst(R"({"enum":["b","a"]})") == "b");
  CHECK(inst(R"({"const":{"k":1}})") == json{{"k", 1}});
  CHECK(inst(R"({"anyOf":[{"type":"integer"},{"type":"string"}]})") == 0);
  CHECK(inst(R"({"oneOf":[{"type":"boolean"}]})") == false);
  CHECK(inst(R"({"type":"array","items":{"type":"integer","minimum":2},"minItems":2})") ==
        json::array({2, 2}));
  CHECK(inst(R"({"type":"array","items":{"type":"string"}})") == json::array());
  CHECK(inst(R"({"type":"object","properties":{"a":{"type":"string"},"b":{"type":"integer"}},
                 "required":["b"]})") == json{{"b", 0}});
  // Strict structured outputs: every property is required, nested through $defs.
  CHECK(inst(R"({"type":"object","additionalProperties":false,
                 "properties":{"step":{"$ref":"#/$defs/step"},"tags":{"type":"array",
                   "items":{"$ref":"#/definitions/tag"},"minItems":1}},
                 "required":["step","tags"],
                 "$defs":{"step":{"type":"object","properties":{"n":{"type":"integer"},
                   "why":{"type":"string"}},"required":["n","why"],"additionalProperties":false}},
                 "definitions":{"tag":{"enum":["x","y"]}}})") ==
        json{{"step", {{"n", 0}, {"why", ""}}}, {"tags", json::array({"x"})}});
  // A cycle through $ref ends in null at the bound instead of recursing forever.
  const json cyc =
      inst(R"({"$defs":{"n":{"type":"object","properties":{"next":{"$ref":"#/$defs/n"}},
                            "required":["next"]}},"$ref":"#/$defs/n"})");
  CHECK(cyc.is_object());
  CHECK(cyc.dump().find("null") != std::string::npos);
  // A wide recursive schema stops at the value budget.
  const std::string wide = minimal_json_instance(
      R"({"$defs":{"w":{"type":"array","minItems":1000,"items":{"$ref":"#/$defs/w"}}},
          "$ref":"#/$defs/w"})");
  CHECK(json::accept(wide));
  CHECK(wide.size() < 200'000);
  CHECK(minimal_json_instance("not json") == "{}");
}

TEST_CASE("mock_llm_server answers openai response_format with JSON content", "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  auto with_format = [](json rf) {
    json body{{"model", "m"},
              {"messages", json::array({{{"role", "user"}, {"content", "hi"}}})},
              {"response_format", std::move(rf)}};
    return call{"/v1/chat/completions", body.dump()};
  };
  run(ctx, server, [&]() -> asio::awaitable<void> {
    answer obj = co_await post(server.port(), with_format(json{{"type", "json_object"}}));
    CHECK(obj.status() == 200);
    CHECK(json::parse(obj.body()["choices"][0]["message"]["content"].get<std::string>()) ==
          json::object());
    answer sch = co_await post(
        server.port(),
        with_format(json{
            {"type", "json_schema"},
            {"json_schema",
             {{"name", "answer"},
              {"strict", true},
              {"schema",
               {{"type", "object"},
                {"properties",
                 {{"city", {{"type", "string"}}}, {"rank", {{"type", "integer"}, {"minimum", 1}}}}},
                {"required", {"city", "rank"}},
                {"additionalProperties", false}}}}}}));
    CHECK(sch.status() == 200);
    CHECK(json::parse(sch.body()["choices"][0]["message"]["content"].get<std::string>()) ==
          json{{"city", ""}, {"rank", 1}});
    answer text = co_await post(server.port(), with_format(json{{"type", "text"}}));
    CHECK(text.body()["choices"][0]["message"]["content"] == "mock answer to: hi");
  });
}

TEST_CASE("mock_llm_server malformed answers a complete 200 whose body is not JSON",
          "[mock_llm_server]") {
  for (wire w : {wire::openai, wire::anthropic, wire::bedrock}) {
    INFO("format " << static_cast<int>(w));
    asio::io_context ctx;
    mock_llm_server server{ctx, mock_options{}};
    server.set_plan("m", fault_plan{}.with_script({fault_kind::malformed}));
    run(ctx, server, [&]() -> asio::awaitable<void> {
      answer r = co_await post(server.port(), make_call(w, "m", "hi"));
      REQUIRE(!r.ec);  // framed correctly: the whole body arrived
      CHECK(r.status() == 200);
      CHECK(!r.res.body().empty());
      CHECK_FALSE(json::accept(r.res.body()));
      CHECK(r.res.body().front() == '{');
      answer ok = co_await post(server.port(), make_call(w, "m", "hi"));
      CHECK(json::accept(ok.res.body()));
    });
    CHECK(server.stats().status_count(200) == 2);
    CHECK(server.stats().total.truncations == 0);
  }
}

TEST_CASE("mock_llm_server sends the delay of a 429 in the plan's retry-after format",
          "[mock_llm_server]") {
  using keel::testing::retry_after_style;
  for (wire w : {wire::openai, wire::anthropic, wire::bedrock}) {
    for (auto style :
         {retry_after_style::provider, retry_after_style::both, retry_after_style::milliseconds,
          retry_after_style::seconds, retry_after_style::http_date, retry_after_style::amz,
          retry_after_style::none}) {
      INFO("format " << static_cast<int>(w) << ", style " << keel::testing::to_string(style));
      asio::io_context ctx;
      mock_llm_server server{ctx, mock_options{}};
      server.set_plan(
          "m", fault_plan{}.with_script({fault_kind::rate_limit}).with_retry_after(1500ms, style));
      run(ctx, server, [&]() -> asio::awaitable<void> {
        const auto before = std::chrono::system_clock::now();
        answer r = co_await post(server.port(), make_call(w, "m", "hi"));
        const auto after = std::chrono::system_clock::now();
        REQUIRE(!r.ec);
        CHECK(r.status() == 429);
        const std::string ra = r.header("retry-after");
        const std::string ra_ms = r.header("retry-after-ms");
        const std::string amz = r.header("x-amz-retry-after");
        switch (style) {
          case retry_after_style::provider:
            CHECK(ra == (w == wire::bedrock ? "" : "2"));
            CHECK(ra_ms == (w == wire::openai ? "1500" : ""));
            CHECK(amz.empty());
            break;
          case retry_after_style::both:
            CHECK(ra == "2");
            CHECK(ra_ms == "1500");
            CHECK(amz.empty());
            break;
          case retry_after_style::milliseconds:
            CHECK(ra.empty());
            CHECK(ra_ms == "1500");
            CHECK(amz.empty());
            break;
          case retry_after_style::seconds:
            CHECK(ra == "2");  // rounded up
            CHECK(ra_ms.empty());
            CHECK(amz.empty());
            break;
          case retry_after_style::http_date: {
            CHECK(ra_ms.empty());
            CHECK(amz.empty());
            CHECK(ra.size() == 29);  // "Sun, 06 Nov 1994 08:49:37 GMT"
            CHECK(ra.ends_with(" GMT"));
            const auto date = keel::llm::parse_http_date(ra, after);
            REQUIRE(date);
            // wall clock + 1.5 s, rounded up to a whole second
            CHECK(*date >= before + 1500ms);
            CHECK(*date < after + 2500ms);
            CHECK(date->time_since_epoch() % std::chrono::seconds(1) ==
                  std::chrono::system_clock::duration::zero());
            break;
          }
          case retry_after_style::amz:
            CHECK(ra.empty());
            CHECK(ra_ms.empty());
            CHECK(amz == "1500");
            break;
          case retry_after_style::none:
            CHECK(ra.empty());
            CHECK(ra_ms.empty());
            CHECK(amz.empty());
            if (w == wire::openai) {
              CHECK(r.body()["error"]["message"].get<std::string>().find("try again later") !=
                    std::string::npos);
            }
            break;
        }
      });
    }
  }
}

TEST_CASE("mock_llm_server reports its rate limits per minute as the providers do",
          "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  server.set_plan("*", fault_plan{}.with_rate_limit(/*rps*/ 4, /*tpm*/ 6000, /*burst*/ 2));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    answer o = co_await post(server.port(), make_call(wire::openai, "m", "hi"));
    CHECK(o.status() == 200);
    CHECK(o.header("x-ratelimit-limit-requests") == "240");
    CHECK(o.header("x-ratelimit-remaining-requests") == "1");
    CHECK(o.header("x-ratelimit-limit-tokens") == "6000");
    answer a = co_await post(server.port(), make_call(wire::anthropic, "m", "hi"));
    CHECK(a.status() == 200);
    CHECK(a.header("anthropic-ratelimit-requests-limit") == "240");
    CHECK(a.header("anthropic-ratelimit-requests-remaining") == "0");  // same model, same bucket
    CHECK(a.header("anthropic-ratelimit-tokens-limit") == "6000");
  });
}

TEST_CASE("mock_llm_server caps the wait of a vanishingly small rate at a day",
          "[mock_llm_server][review]") {
  // 1e-300 requests per second passes validation; its wait does not fit in int64 milliseconds.
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  server.set_plan("*", fault_plan{}.with_rate_limit(/*rps*/ 1e-300, /*tpm*/ 0, /*burst*/ 1));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const call c = make_call(wire::openai, "m", "hi");
    CHECK((co_await post(server.port(), c)).status() == 200);
    answer limited = co_await post(server.port(), c);
    CHECK(limited.status() == 429);
    CHECK(limited.header("retry-after") == "86400");
    CHECK(limited.header("retry-after-ms") == "86400000");
  });
}

TEST_CASE("mock_llm_server rate limiter 429s use the plan's retry-after format",
          "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  fault_plan plan = fault_plan{}.with_rate_limit(/*rps*/ 4, /*tpm*/ 0, /*burst*/ 1);
  plan.retry_after_format = keel::testing::retry_after_style::amz;
  server.set_plan("b", plan);
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const call c = make_call(wire::bedrock, "b", "hi");
    CHECK((co_await post(server.port(), c)).status() == 200);
    answer limited = co_await post(server.port(), c);
    CHECK(limited.status() == 429);
    CHECK(limited.header("x-amzn-ErrorType").starts_with("ThrottlingException"));
    CHECK(limited.header("x-amz-retry-after") == "250");
    CHECK(limited.header("retry-after").empty());
    CHECK(limited.header("retry-after-ms").empty());
  });
}

TEST_CASE(
    "mock_llm_server rate limit answers 429 with a Retry-After that matches when capacity "
    "returns",
    "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  server.set_plan("*", fault_plan{}.with_rate_limit(/*rps*/ 4, /*tpm*/ 0, /*burst*/ 2));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const call c = make_call(wire::openai, "gpt", "hi");
    CHECK((co_await post(server.port(), c)).status() == 200);
    answer second = co_await post(server.port(), c);
    CHECK(second.status() == 200);
    CHECK(second.header("x-ratelimit-remaining-requests") == "0");
    CHECK(second.header("x-ratelimit-reset-requests") == "500ms");
    answer third = co_await post(server.port(), c);
    CHECK(third.status() == 429);
    CHECK(third.body()["error"]["code"] == "rate_limit_exceeded");
    CHECK(third.header("retry-after-ms") == "250");
    CHECK(third.header("retry-after") == "1");
    clock.t += 249ms;  // one millisecond early: still limited, 1 ms to go
    answer early = co_await post(server.port(), c);
    CHECK(early.status() == 429);
    CHECK(early.header("retry-after-ms") == "1");
    clock.t += 1ms;  // exactly when the hint said
    CHECK((co_await post(server.port(), c)).status() == 200);
    CHECK((co_await post(server.port(), c)).status() == 429);
  });
  CHECK(server.stats().status_count(429) == 3);
  CHECK(server.stats().status_count(200) == 3);
}

TEST_CASE("mock_llm_server token rate limit computes Retry-After from the token deficit",
          "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  // 600 tokens per minute = 10 tokens/s. A 104-byte prompt costs 26 prompt tokens plus 14 for
  // the 56-byte answer: 40 tokens.
  server.set_plan("claude", fault_plan{}.with_rate_limit(0, 600));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const call c = make_call(wire::anthropic, "claude", std::string(104, 'a'));
    for (int i = 0; i < 15; ++i) {  // 15 * 40 = 600 tokens: the whole minute
      CHECK((co_await post(server.port(), c)).status() == 200);
    }
    answer limited = co_await post(server.port(), c);
    CHECK(limited.status() == 429);
    CHECK(limited.body()["error"]["type"] == "rate_limit_error");
    CHECK(limited.header("retry-after-ms") == "4000");
    CHECK(limited.header("retry-after") == "4");
    clock.t += 4s;
    CHECK((co_await post(server.port(), c)).status() == 200);
  });
}

TEST_CASE("mock_llm_server sends no rate-limit headers when the plan hides its limits",
          "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  const fault_plan limited = fault_plan{}.with_rate_limit(/*rps*/ 4, /*tpm*/ 6000, /*burst*/ 1);
  server.set_plan("hidden", fault_plan{limited}.with_rate_limit_headers(false));
  server.set_plan("shown", limited);
  const std::vector<const char*> openai_headers = {
      "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
      "x-ratelimit-limit-tokens",   "x-ratelimit-remaining-tokens",   "x-ratelimit-reset-tokens"};
  const std::vector<const char*> anthropic_headers = {
      "anthropic-ratelimit-requests-limit",   "anthropic-ratelimit-requests-remaining",
      "anthropic-ratelimit-requests-reset",   "anthropic-ratelimit-tokens-limit",
      "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    // The same limits with headers on: every header is there.
    answer shown = co_await post(server.port(), make_call(wire::openai, "shown", "hi"));
    CHECK(shown.status() == 200);
    for (const char* h : openai_headers) {
      INFO(h);
      CHECK(!shown.header(h).empty());
    }

    answer ok = co_await post(server.port(), make_call(wire::openai, "hidden", "hi"));
    CHECK(ok.status() == 200);
    for (const char* h : openai_headers) {
      INFO(h);
      CHECK(ok.header(h).empty());
    }
    // The limit is still enforced, and its 429 still states the exact wait.
    answer limited429 = co_await post(server.port(), make_call(wire::anthropic, "hidden", "hi"));
    CHECK(limited429.status() == 429);
    CHECK(limited429.header("retry-after-ms") == "250");
    for (const char* h : anthropic_headers) {
      INFO(h);
      CHECK(limited429.header(h).empty());
    }
    clock.t += 250ms;
    answer later = co_await post(server.port(), make_call(wire::anthropic, "hidden", "hi"));
    CHECK(later.status() == 200);
    for (const char* h : anthropic_headers) {
      INFO(h);
      CHECK(later.header(h).empty());
    }
  });
}

TEST_CASE("mock_llm_server limiter 429s can state a constant Retry-After like nginx",
          "[mock_llm_server]") {
  using keel::testing::limiter_retry_after_mode;
  using keel::testing::retry_after_style;
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  server.set_plan("m", fault_plan{}
                           .with_rate_limit(/*rps*/ 4, /*tpm*/ 0, /*burst*/ 1)
                           .with_retry_after(1000ms, retry_after_style::both)
                           .with_limiter_retry_after(limiter_retry_after_mode::constant));
  server.set_plan("nginx", fault_plan{}
                               .with_rate_limit(/*rps*/ 4, /*tpm*/ 0, /*burst*/ 1)
                               .with_retry_after(1000ms, retry_after_style::seconds)
                               .with_limiter_retry_after(limiter_retry_after_mode::constant)
                               .with_rate_limit_headers(false));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const call c = make_call(wire::openai, "m", "hi");
    CHECK((co_await post(server.port(), c)).status() == 200);
    answer first = co_await post(server.port(), c);
    CHECK(first.status() == 429);
    CHECK(first.header("retry-after-ms") == "1000");  // the exact wait would be 250 ms
    CHECK(first.header("retry-after") == "1");
    CHECK(first.body()["error"]["message"].get<std::string>().find("try again in 1s") !=
          std::string::npos);
    clock.t += 249ms;  // 1 ms from capacity: still the constant
    answer early = co_await post(server.port(), c);
    CHECK(early.status() == 429);
    CHECK(early.header("retry-after-ms") == "1000");
    clock.t += 1ms;
    CHECK((co_await post(server.port(), c)).status() == 200);

    // "add_header Retry-After 1": only the header nginx sends.
    const call n = make_call(wire::openai, "nginx", "hi");
    CHECK((co_await post(server.port(), n)).status() == 200);
    answer ng = co_await post(server.port(), n);
    CHECK(ng.status() == 429);
    CHECK(ng.header("retry-after") == "1");
    CHECK(ng.header("retry-after-ms").empty());
    CHECK(ng.header("x-ratelimit-limit-requests").empty());
  });
}

TEST_CASE("mock_llm_server limiter 429s can carry no delay at all", "[mock_llm_server]") {
  using keel::testing::limiter_retry_after_mode;
  for (wire w : {wire::openai, wire::anthropic, wire::bedrock}) {
    INFO("format " << static_cast<int>(w));
    asio::io_context ctx;
    fake_time clock;
    mock_options opts;
    opts.now = clock.fn();
    mock_llm_server server{ctx, opts};
    server.set_plan("m", fault_plan{}
                             .with_script({fault_kind::rate_limit})
                             .with_rate_limit(/*rps*/ 4, /*tpm*/ 0, /*burst*/ 1)
                             .with_retry_after(700ms, keel::testing::retry_after_style::both)
                             .with_limiter_retry_after(limiter_retry_after_mode::none));
    run(ctx, server, [&]() -> asio::awaitable<void> {
      const call c = make_call(w, "m", "hi");
      // A scripted 429 still states the plan's retry_after.
      answer scripted = co_await post(server.port(), c);
      CHECK(scripted.status() == 429);
      CHECK(scripted.header("retry-after-ms") == "700");
      CHECK((co_await post(server.port(), c)).status() == 200);
      answer limited = co_await post(server.port(), c);
      CHECK(limited.status() == 429);
      CHECK(limited.header("retry-after").empty());
      CHECK(limited.header("retry-after-ms").empty());
      CHECK(limited.header("x-amz-retry-after").empty());
      if (w == wire::openai) {
        CHECK(limited.body()["error"]["type"] == "requests");
        const auto msg = limited.body()["error"]["message"].get<std::string>();
        CHECK(msg.find("try again later") != std::string::npos);
        CHECK(msg.find("try again in") == std::string::npos);
        CHECK(limited.header("x-ratelimit-limit-requests") == "240");  // headers are separate
      } else if (w == wire::bedrock) {
        CHECK(limited.header("x-amzn-ErrorType").starts_with("ThrottlingException"));
      }
    });
  }
}

TEST_CASE("mock_llm_server token_burst makes a small token bucket bite at once",
          "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  // 6000 tokens per minute = 100 tokens/s, but only 120 in the bucket: three 40-token requests
  // (a 104-byte prompt and a 56-byte answer). Without token_burst the bucket would hold 6000.
  const fault_plan plan =
      fault_plan{}.with_rate_limit(/*rps*/ 0, /*tpm*/ 6000).with_token_burst(120);
  server.set_plan("gpt", plan);
  server.set_plan("claude", plan);
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const call o = make_call(wire::openai, "gpt", std::string(104, 'a'));
    for (int i = 0; i < 3; ++i) {
      answer r = co_await post(server.port(), o);
      CHECK(r.status() == 200);
      CHECK(r.header("x-ratelimit-limit-tokens") == "6000");
      CHECK(r.header("x-ratelimit-remaining-tokens") == std::to_string(80 - 40 * i));
    }
    answer limited = co_await post(server.port(), o);
    CHECK(limited.status() == 429);
    CHECK(limited.body()["error"]["type"] == "tokens");
    CHECK(limited.body()["error"]["message"].get<std::string>().find("tokens per min (TPM)") !=
          std::string::npos);
    CHECK(limited.header("retry-after-ms") == "400");  // 40 tokens at 100 per second

    const call a = make_call(wire::anthropic, "claude", std::string(104, 'a'));
    for (int i = 0; i < 3; ++i) {
      CHECK((co_await post(server.port(), a)).status() == 200);
    }
    answer alimited = co_await post(server.port(), a);
    CHECK(alimited.status() == 429);
    CHECK(alimited.body()["error"]["message"].get<std::string>().find("input tokens per minute") !=
          std::string::npos);
    clock.t += 400ms;
    CHECK((co_await post(server.port(), a)).status() == 200);
  });
}

TEST_CASE("mock_llm_server rate schedule halves the admitted rate at its instant and restores it",
          "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  const auto t0 = clock.t;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  server.set_plan("m", fault_plan{}
                           .with_rate_limit(/*rps*/ 10, /*tpm*/ 0, /*burst*/ 1)
                           .with_rate_change(1000ms, 5)
                           .with_rate_change(2000ms, 10));
  // burst 0: the capacity derived from the first rate (2) stays when the rate goes to 20.
  server.set_plan("derived", fault_plan{}.with_rate_limit(/*rps*/ 2).with_rate_change(1000ms, 20));
  std::vector<int> admitted(3, 0);
  run(ctx, server, [&]() -> asio::awaitable<void> {
    CHECK(server.current_limit("m").requests_per_second == 10);
    const call c = make_call(wire::openai, "m", "hi");
    for (int step = 0; step < 30; ++step) {  // one request every 100 ms for 3 s
      clock.t = t0 + step * 100ms;
      answer r = co_await post(server.port(), c);
      if (r.status() == 200) {
        ++admitted[static_cast<std::size_t>(step / 10)];
      }
      if (step == 11) {  // the first refusal at the halved rate: 0.5 request short at 5/s
        CHECK(r.status() == 429);
        CHECK(r.header("retry-after-ms") == "100");
        CHECK(r.header("x-ratelimit-limit-requests") == "300");
      }
      if (step == 15) {
        CHECK(server.current_limit("m").requests_per_second == 5);
      }
      if (step == 25) {
        CHECK(r.header("x-ratelimit-limit-requests") == "600");
        CHECK(server.current_limit("m").requests_per_second == 10);
      }
    }

    const call d = make_call(wire::openai, "derived", "hi");
    clock.t = t0;
    CHECK((co_await post(server.port(), d)).status() == 200);
    CHECK((co_await post(server.port(), d)).status() == 200);
    CHECK((co_await post(server.port(), d)).status() == 429);
    clock.t = t0 + 3s;  // 2 s at 20/s would fill a 40-request bucket; this one holds 2
    answer first = co_await post(server.port(), d);
    CHECK(first.status() == 200);
    CHECK(first.header("x-ratelimit-limit-requests") == "1200");
    CHECK(first.header("x-ratelimit-remaining-requests") == "1");
    CHECK((co_await post(server.port(), d)).status() == 200);
    answer third = co_await post(server.port(), d);
    CHECK(third.status() == 429);
    CHECK(third.header("retry-after-ms") == "50");  // one request at the new 20/s
  });
  CHECK(admitted == std::vector<int>{10, 5, 10});
}

TEST_CASE("fault_plan limits_at applies the schedule in order of its instants",
          "[mock_llm_server]") {
  const fault_plan plan = fault_plan{}
                              .with_rate_limit(/*rps*/ 50, /*tpm*/ 60000)
                              .with_rate_change(15000ms, 200, 0)
                              .with_rate_change(5000ms, 100)
                              .with_rate_change(15000ms, std::nullopt, 1000);
  CHECK(plan.limits_at(0ms).requests_per_second == 50);
  CHECK(plan.limits_at(4999ms).tokens_per_minute == 60000);
  CHECK(plan.limits_at(5000ms).requests_per_second == 100);
  CHECK(plan.limits_at(5000ms).tokens_per_minute == 60000);  // omitted: kept
  CHECK(plan.limits_at(15000ms).requests_per_second == 200);
  CHECK(plan.limits_at(15000ms).tokens_per_minute == 1000);  // equal instants: list order
  // No plan: no limit.
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  CHECK(server.current_limit("none").requests_per_second == 0);
  CHECK(server.current_limit("none").tokens_per_minute == 0);
}

TEST_CASE("scenario JSON loads the limiter keys of servers that hide their limits",
          "[mock_llm_server]") {
  using keel::testing::limiter_retry_after_mode;
  using keel::testing::retry_after_style;
  const auto s = keel::testing::scenario::from_json(R"({
    "models": {
      "vllm": {"rate_limit": {"requests_per_second": 50, "burst": 50, "tokens_per_minute": 60000,
                              "token_burst": 5000},
               "rate_limit_headers": false, "limiter_retry_after": "constant",
               "retry_after_ms": 1000, "retry_after_format": "seconds",
               "rate_schedule": [{"at_ms": 5000, "requests_per_second": 100},
                                 {"at_ms": 15000, "requests_per_second": 200,
                                  "tokens_per_minute": 120000}]},
      "quiet": {"retry_after_format": "none", "limiter_retry_after": "none"},
      "exact": {"limiter_retry_after": "exact", "rate_limit_headers": true}
    }
  })");
  const auto& v = s.plans.at("vllm");
  CHECK(v.requests_per_second == 50);
  CHECK(v.token_burst == 5000);
  CHECK_FALSE(v.rate_limit_headers);
  CHECK(v.limiter_retry_after == limiter_retry_after_mode::constant);
  CHECK(v.retry_after_format == retry_after_style::seconds);
  REQUIRE(v.rate_schedule.size() == 2);
  CHECK(v.rate_schedule[0].at == 5000ms);
  CHECK(v.rate_schedule[0].requests_per_second == 100.0);
  CHECK_FALSE(v.rate_schedule[0].tokens_per_minute);
  CHECK(v.rate_schedule[1].at == 15000ms);
  CHECK(v.rate_schedule[1].requests_per_second == 200.0);
  CHECK(v.rate_schedule[1].tokens_per_minute == 120000.0);
  const auto& q = s.plans.at("quiet");
  CHECK(q.retry_after_format == retry_after_style::none);
  CHECK(q.limiter_retry_after == limiter_retry_after_mode::none);
  CHECK(q.rate_limit_headers);  // defaults
  CHECK(q.token_burst == 0);
  CHECK(q.rate_schedule.empty());
  const auto& e = s.plans.at("exact");
  CHECK(e.limiter_retry_after == limiter_retry_after_mode::exact);
  CHECK(e.rate_limit_headers);
  for (auto m : {limiter_retry_after_mode::exact, limiter_retry_after_mode::constant,
                 limiter_retry_after_mode::none}) {
    CHECK(keel::testing::parse_limiter_retry_after_mode(keel::testing::to_string(m)) == m);
  }
  CHECK(keel::testing::to_string(retry_after_style::none) == "none");

  // The scenario drives a server: the schedule applies from start(), the headers stay away.
  asio::io_context ctx;
  fake_time clock;
  const auto t0 = clock.t;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  server.set_scenario(s);
  run(ctx, server, [&]() -> asio::awaitable<void> {
    clock.t = t0 + 5s;
    CHECK(server.current_limit("vllm").requests_per_second == 100);
    CHECK(server.current_limit("vllm").tokens_per_minute == 60000);
    answer r = co_await post(server.port(), make_call(wire::openai, "vllm", "hi"));
    CHECK(r.status() == 200);
    CHECK(r.header("x-ratelimit-limit-requests").empty());
  });
}

TEST_CASE("mock_llm_server scripted sequence fails the first two requests then succeeds",
          "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  server.set_plan("gpt",
                  fault_plan{}.with_script({fault_kind::unavailable, fault_kind::unavailable}));
  std::vector<int> statuses;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    for (int i = 0; i < 4; ++i) {
      statuses.push_back(
          (co_await post(server.port(), make_call(wire::openai, "gpt", "q"))).status());
    }
    // Another model has no plan and is unaffected.
    statuses.push_back(
        (co_await post(server.port(), make_call(wire::openai, "other", "q"))).status());
  });
  CHECK(statuses == std::vector<int>{503, 503, 200, 200, 200});
  const auto s = server.stats();
  CHECK(s.total.requests == 5);
  CHECK(s.model("gpt").requests == 4);
  CHECK(s.model("gpt").status_count(503) == 2);
  CHECK(s.model("gpt").status_count(200) == 2);
  CHECK(s.model("other").status_count(200) == 1);
  CHECK(s.accepted_connections == 5);
  server.reset_stats();
  CHECK(server.stats().total.requests == 0);
  CHECK(server.stats().by_model.empty());
}

TEST_CASE("mock_llm_server outage window answers 503 between its bounds", "[mock_llm_server]") {
  asio::io_context ctx;
  fake_time clock;
  mock_options opts;
  opts.now = clock.fn();
  mock_llm_server server{ctx, opts};
  server.set_plan("*", fault_plan{}.with_outage(100ms, 200ms));
  std::vector<int> statuses;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    for (auto at : {0ms, 99ms, 100ms, 199ms, 200ms}) {
      clock.t = std::chrono::steady_clock::time_point{std::chrono::hours(1)} + at;
      answer r = co_await post(server.port(), make_call(wire::bedrock, "m", "q"));
      statuses.push_back(r.status());
      if (r.status() == 503) {
        CHECK(r.header("x-amzn-ErrorType").starts_with("ServiceUnavailableException"));
      }
    }
  });
  CHECK(statuses == std::vector<int>{200, 200, 503, 503, 200});
}

TEST_CASE("mock_llm_server reset, truncation and stall are transport errors at the client",
          "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  server.set_plan(
      "m", fault_plan{}.with_script({fault_kind::reset, fault_kind::truncated, fault_kind::stall}));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const call c = make_call(wire::openai, "m", "q");
    answer reset = co_await post(server.port(), c);
    CHECK((reset.ec == asio::error::connection_reset || reset.ec == bhttp::error::end_of_stream));
    answer truncated = co_await post(server.port(), c);
    CHECK(truncated.ec == bhttp::error::partial_message);
    const auto before = std::chrono::steady_clock::now();
    answer stalled = co_await post(server.port(), c, 100ms);
    CHECK(stalled.ec == beast::error::timeout);
    CHECK(std::chrono::steady_clock::now() - before >= 100ms);
    CHECK((co_await post(server.port(), c)).status() == 200);
  });
  const auto s = server.stats().model("m");
  CHECK(s.requests == 4);
  CHECK(s.resets == 1);
  CHECK(s.truncations == 1);
  CHECK(s.stalls == 1);
  CHECK(s.status_count(200) == 1);  // truncated answers are not counted as sent
}

TEST_CASE("mock_llm_server random faults are deterministic under the seed", "[mock_llm_server]") {
  auto statuses_for = [](std::uint64_t seed) {
    asio::io_context ctx;
    mock_options opts;
    opts.seed = seed;
    mock_llm_server server{ctx, opts};
    server.set_plan("*", fault_plan{}
                             .with_probability(fault_kind::rate_limit, 0.3)
                             .with_probability(fault_kind::overloaded, 0.2));
    std::vector<int> out;
    run(ctx, server, [&]() -> asio::awaitable<void> {
      for (int i = 0; i < 30; ++i) {
        out.push_back(
            (co_await post(server.port(), make_call(wire::anthropic, "c", "q"))).status());
      }
    });
    return out;
  };
  const auto a = statuses_for(7);
  CHECK(a == statuses_for(7));
  CHECK(a != statuses_for(8));
  const auto n429 = std::count(a.begin(), a.end(), 429);
  const auto n529 = std::count(a.begin(), a.end(), 529);
  const auto n200 = std::count(a.begin(), a.end(), 200);
  CHECK(n429 > 0);
  CHECK(n529 > 0);
  CHECK(n200 > 0);
  CHECK(n429 + n529 + n200 == 30);
}

TEST_CASE("mock_llm_server applies latency before answering", "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  server.set_plan("m", fault_plan{}.with_latency(60ms));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const auto before = std::chrono::steady_clock::now();
    CHECK((co_await post(server.port(), make_call(wire::openai, "m", "q"))).status() == 200);
    CHECK(std::chrono::steady_clock::now() - before >= 60ms);
  });
}

TEST_CASE("mock_llm_server keeps connections alive across requests", "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    co_await stream.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), server.port()),
                                  asio::use_awaitable);
    for (wire w : {wire::openai, wire::anthropic, wire::bedrock, wire::openai, wire::openai}) {
      answer r = co_await exchange(stream, make_call(w, "m", "q"));
      REQUIRE(!r.ec);
      CHECK(r.status() == 200);
      CHECK(r.res.keep_alive());
    }
  });
  CHECK(server.stats().accepted_connections == 1);
  CHECK(server.stats().total.requests == 5);
  CHECK(server.base_url() == "http://127.0.0.1:" + std::to_string(server.port()));
}

TEST_CASE("mock_llm_server context window turns long prompts into context-length errors",
          "[mock_llm_server]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  fault_plan plan;
  plan.context_window = 10;  // tokens: 40 bytes fit, 41 do not
  server.set_plan("small", plan);
  run(ctx, server, [&]() -> asio::awaitable<void> {
    CHECK((co_await post(server.port(), make_call(wire::openai, "small", std::string(40, 'a'))))
              .status() == 200);
    answer r = co_await post(server.port(), make_call(wire::openai, "small", std::string(41, 'a')));
    CHECK(r.status() == 400);
    CHECK(r.body()["error"]["code"] == "context_length_exceeded");
    CHECK(r.body()["error"]["param"] == "messages");
  });
}

TEST_CASE("scenario JSON loads into fault plans", "[mock_llm_server]") {
  const auto s = keel::testing::scenario::from_json(R"({
    "seed": 9,
    "models": {
      "*": {"latency_ms": {"min": 5, "max": 20}, "errors": {"rate_limit": 0.1, "overloaded": 0.05},
            "retry_after_ms": 2000},
      "gpt-4o": {"latency_ms": 3, "rate_limit": {"requests_per_second": 5, "burst": 2,
                 "tokens_per_minute": 1000}, "context_window": 8000,
                 "outages": [{"from_ms": 100, "to_ms": 300}],
                 "script": ["unavailable", "unavailable", "ok", "reset"]},
      "claude": {"retry_after_format": "http_date",
                 "script": ["auth", "not_found", "content_filter", "timeout", "malformed"]}
    }
  })");
  CHECK(s.seed == 9u);
  REQUIRE(s.plans.size() == 3);
  const auto& claude = s.plans.at("claude");
  CHECK(claude.retry_after_format == keel::testing::retry_after_style::http_date);
  CHECK(claude.script == std::vector<fault_kind>{fault_kind::auth, fault_kind::not_found,
                                                 fault_kind::content_filter, fault_kind::timeout,
                                                 fault_kind::malformed});
  const auto& any = s.plans.at("*");
  CHECK(any.latency_min == 5ms);
  CHECK(any.latency_max == 20ms);
  CHECK(any.probability.at(fault_kind::rate_limit) == Approx(0.1));
  CHECK(any.retry_after == 2000ms);
  CHECK(any.retry_after_format == keel::testing::retry_after_style::provider);
  const auto& g = s.plans.at("gpt-4o");
  CHECK(g.latency_min == 3ms);
  CHECK(g.latency_max == 3ms);
  CHECK(g.requests_per_second == 5);
  CHECK(g.burst == 2);
  CHECK(g.tokens_per_minute == 1000);
  CHECK(g.context_window == 8000u);
  REQUIRE(g.outages.size() == 1);
  CHECK(g.outages[0].to == 300ms);
  CHECK(g.script == std::vector<fault_kind>{fault_kind::unavailable, fault_kind::unavailable,
                                            fault_kind::ok, fault_kind::reset});
}

TEST_CASE("a bad scenario names the JSON path of the offending value", "[mock_llm_server]") {
  using keel::testing::scenario;
  using keel::testing::scenario_error;
  struct bad {
    const char* text;
    const char* path;
  };
  for (const bad& b : std::vector<bad>{
           {R"({"models": {"gpt-4o": {"errors": {"rate_limit": 1.5}}}})",
            "/models/gpt-4o/errors/rate_limit"},
           {R"({"models": {"m": {"errors": {"teapot": 0.1}}}})", "/models/m/errors/teapot"},
           {R"({"models": {"m": {"script": ["ok", "explode"]}}})", "/models/m/script/1"},
           {R"({"models": {"meta/llama": {"latency_ms": {"min": "5"}}}})",
            "/models/meta~1llama/latency_ms/min"},
           {R"({"models": {"m": {"outages": [{"from_ms": 5}]}}})", "/models/m/outages/0"},
           {R"({"models": {"m": {"latncy_ms": 5}}})", "/models/m/latncy_ms"},
           {R"({"models": {"m": {"retry_after_format": "rfc850"}}})",
            "/models/m/retry_after_format"},
           {R"({"models": {"m": {"retry_after_format": 5}}})", "/models/m/retry_after_format"},
           {R"({"models": {"m": {"limiter_retry_after": "exactly"}}})",
            "/models/m/limiter_retry_after"},
           {R"({"models": {"m": {"limiter_retry_after": 1}}})", "/models/m/limiter_retry_after"},
           {R"({"models": {"m": {"rate_limit_headers": "no"}}})", "/models/m/rate_limit_headers"},
           {R"({"models": {"m": {"quirks": []}}})", "/models/m/quirks"},
           {R"({"models": {"m": {"quirks": {"azure": true}}}})", "/models/m/quirks/azure"},
           {R"({"models": {"m": {"quirks": {"openai_timeout_408": 1}}}})",
            "/models/m/quirks/openai_timeout_408"},
           {R"({"models": {"m": {"rate_limit": {"token_burst": -5}}}})",
            "/models/m/rate_limit/token_burst"},
           {R"({"models": {"m": {"rate_schedule": {"at_ms": 10}}}})", "/models/m/rate_schedule"},
           {R"({"models": {"m": {"rate_schedule": [{"at_ms": 10, "requests_per_second": "x"}]}}})",
            "/models/m/rate_schedule/0/requests_per_second"},
           {R"({"models": {"m": {"rate_schedule": [{"at_ms": 1, "tokens_per_minute": -1}]}}})",
            "/models/m/rate_schedule/0/tokens_per_minute"},
           {R"({"models": {"m": {"rate_schedule": [{"requests_per_second": 5}]}}})",
            "/models/m/rate_schedule/0"},
           {R"({"models": {"m": {"rate_schedule": [{"at_ms": 10}]}}})",
            "/models/m/rate_schedule/0"},
           {R"({"models": {"m": {"rate_schedule": [{"at_ms": 10, "rps": 5}]}}})",
            "/models/m/rate_schedule/0/rps"},
           {R"({"models": {"m": {"rate_schedule": [{"at_ms": 9, "requests_per_second": 5},
                                                   {"at_ms": 5, "requests_per_second": 1}]}}})",
            "/models/m/rate_schedule/1/at_ms"},
           {R"({"models": []})", "/models"},
           {R"({"models": )", ""},
           // Regression (fuzz/fuzz_mock_scenario): nlohmann reports a number that overflows a
           // double as out_of_range, not parse_error; it escaped as a non-scenario_error.
           {R"({"models": {"m": {"retry_after_ms": 1e400}}})", ""},
           // A key twice: refused at its pointer (nlohmann kept the last).
           {R"({"models": {"m": {"retry_after_ms": 5, "retry_after_ms": 9}}})",
            "/models/m/retry_after_ms"},
       }) {
    INFO(b.text);
    try {
      (void)scenario::from_json(b.text);
      FAIL("no error");
    } catch (const scenario_error& e) {
      CHECK(e.path() == b.path);
      CHECK(std::string(e.what()).find(b.path[0] ? b.path : "(document)") != std::string::npos);
    }
  }  // Nested past keel::llm::max_json_depth: refused before nlohmann builds the tree (issue 13).
  const std::string deep =
      R"({"models": {"m": {"script": )" + std::string(50000, '[') + std::string(50000, ']') + "}}}";
  CHECK_THROWS_WITH(scenario::from_json(deep), Catch::Contains("nested deeper than 128 levels"));
}

TEST_CASE("load_scenario reads the demo file and a server runs it", "[mock_llm_server]") {
  const auto demo =
      std::filesystem::path(__FILE__).parent_path().parent_path() / "docs/scenarios/demo.json";
  REQUIRE(std::filesystem::exists(demo));
  const auto s = keel::testing::load_scenario(demo.string());
  CHECK(s.plans.count("*") == 1);

  const auto bad_file = std::filesystem::temp_directory_path() / "keel_mock_bad_scenario.json";
  {
    std::ofstream out(bad_file);
    out << R"({"models": {"x": {"rate_limit": {"requests_per_second": -1}}}})";
  }
  try {
    (void)keel::testing::load_scenario(bad_file.string());
    FAIL("no error");
  } catch (const keel::testing::scenario_error& e) {
    CHECK(e.path() == "/models/x/rate_limit/requests_per_second");
    CHECK(std::string(e.what()).find(bad_file.string()) != std::string::npos);
  }
  std::filesystem::remove(bad_file);
  CHECK_THROWS_AS(keel::testing::load_scenario("/nonexistent/keel.json"),
                  keel::testing::scenario_error);

  // A scenario drives a server: its script is consumed in order.
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  keel::testing::scenario sc;
  sc.plans["m"] = fault_plan{}.with_script({fault_kind::overloaded});
  server.set_scenario(sc);
  run(ctx, server, [&]() -> asio::awaitable<void> {
    CHECK((co_await post(server.port(), make_call(wire::anthropic, "m", "q"))).status() == 529);
    CHECK((co_await post(server.port(), make_call(wire::anthropic, "m", "q"))).status() == 200);
  });
}
