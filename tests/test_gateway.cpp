// Tests for keel::gateway (keel serve): the OpenAI wire translation as pure functions, and the
// server on loopback in front of a keel::llm::client and the mock LLM server.
#include <keel/gateway/openai_wire.hpp>
#include <keel/gateway/server.hpp>

#include <keel/error.hpp>
#include <keel/http/client.hpp>
#include <keel/http/error.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/sigv4.hpp>
#include <keel/otlp.hpp>
#include <keel/testing/mock_llm_server.hpp>
#include <keel/trace.hpp>

#include "llm_client_support.hpp"
#include "support.hpp"

#include <catch2/catch.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

using namespace keel_test;
using keel::gateway::bad_request;
using keel::gateway::parse_chat_request;
using nlohmann::json;

namespace {

// The bad_request `body` raises (param, status); fails the test if it parses. The tree-only
// reading must refuse it with the same message: the reader without a tree declines it.
std::pair<std::string, int> refusal(const std::string& body) {
  std::string tree_says;
  try {
    (void)keel::gateway::detail::parse_chat_request_tree(body);
  } catch (const bad_request& e) {
    tree_says = e.what();
  }
  try {
    (void)parse_chat_request(body);
  } catch (const bad_request& e) {
    CHECK(tree_says == e.what());
    return {e.param(), e.status()};
  }
  FAIL("parsed: " << body);
  return {};
}

std::exception_ptr provider(keel::llm::errc code, int status,
                            std::optional<std::chrono::nanoseconds> retry_after = {}) {
  keel::llm::provider_error_info info(status, "openai", "code", "upstream said no");
  info.retry_after = retry_after;
  return std::make_exception_ptr(keel::llm::provider_error(code, info));
}

}  // namespace

TEST_CASE("an OpenAI chat completions body becomes a provider-neutral request", "[gateway]") {
  const auto p = parse_chat_request(R"({
    "model": "route", "max_tokens": 10, "max_completion_tokens": 20, "temperature": 0.5,
    "top_p": 0.9, "stop": "END", "seed": 7, "stream": false, "user": "ignored",
    "response_format": {"type": "json_object"}, "metadata": {"team": "a"},
    "messages": [
      {"role": "system", "content": "Be terse."},
      {"role": "developer", "content": [{"type": "text", "text": "Answer in "},
                                         {"type": "text", "text": "French."}]},
      {"role": "user", "content": "Hello"},
      {"role": "assistant", "content": "Bonjour"},
      {"role": "user", "content": [{"type": "text", "text": "Again"}]}]})");
  const keel::llm::chat_request& r = p.request;
  CHECK(r.model == "route");
  CHECK(r.system == "Be terse.\n\nAnswer in French.");
  REQUIRE(r.messages.size() == 3);
  CHECK(r.messages[0].role == "user");
  CHECK(r.messages[1].content == "Bonjour");
  CHECK(r.messages[2].content == "Again");
  CHECK(r.max_tokens == 20);  // max_completion_tokens wins
  CHECK(r.temperature == 0.5);
  CHECK(r.top_p == 0.9);
  CHECK(r.stop == std::vector<std::string>{"END"});
  CHECK(r.seed == 7);
  REQUIRE(r.response_format);
  CHECK((*r.response_format)["type"] == "json_object");
  CHECK(r.metadata["team"] == "a");
  CHECK_FALSE(p.stream);

  const auto s = parse_chat_request(
      R"({"model": "m", "stream": true, "stream_options": {"include_usage": true},
          "messages": [{"role": "user", "content": "x"}]})");
  CHECK(s.stream);
  CHECK(s.include_usage);
  CHECK(s.request.max_tokens == 0);  // not given: no limit sent (Anthropic: its default)
}

TEST_CASE("the common request is read without a tree as the tree reads it", "[gateway]") {
  // Bodies the scanner takes (keel/llm/json_scan.hpp), and valid ones it leaves to the tree
  // (other members, content parts, a duplicate member, -0, escapes): the same request either way.
  const std::string bodies[] = {
      R"({"model": "gpt-4o-mini", "max_tokens": 32, "messages": [{"role": "user", "content":
          "Summarise the incident report in one line."}]})",
      R"({"model":"m","messages":[{"role":"system","content":"a"},{"role":"developer",
          "content":null},{"role":"system","content":"b"},{"role":"user","content":"q",
          "name":"ann"},{"role":"assistant","content":null},{"role":"user","content":"\u00e9\n"}],
          "max_tokens":null,"max_completion_tokens":7,"temperature":0,"top_p":1,"stream":true,
          "stream_options":{"include_usage":true,"other":[1]}})",
      R"({"max_completion_tokens":9,"max_tokens":3,"model":"m","temperature":1.25e0,
          "top_p":-0,"stream":null,"stream_options":{"include_usage":"yes"},
          "messages":[{"role":"user","content":"x"}]})",
      R"({"model":"m","stream_options":5,"temperature":null,"messages":[{"content":"x",
          "role":"user"}]})",
      R"({"model":"m","user":"u","seed":-4,"messages":[{"role":"user","content":"x"}]})",
      R"({"model":"m","model":"n","messages":[{"role":"user","content":"x"}]})",
      R"({"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"p"}]}]})",
      R"({"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant",
          "tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},
          {"role":"tool","tool_call_id":"c","content":"r"}]})",
      R"({"model":"m","temperature":2,"top_p":0.000001,"max_tokens":2147483647,
          "messages":[{"role":"user","content":"x"}]})",
  };
  const keel::llm::endpoint ep(keel::llm::provider_kind::openai, "http://h", "k");
  for (const auto& body : bodies) {
    INFO(body);
    const auto tree = keel::gateway::detail::parse_chat_request_tree(body);
    const auto fast = parse_chat_request(body);
    CHECK(fast.stream == tree.stream);
    CHECK(fast.include_usage == tree.include_usage);
    CHECK(fast.request.system == tree.request.system);
    CHECK(fast.request.max_tokens == tree.request.max_tokens);
    CHECK(fast.request.temperature == tree.request.temperature);
    CHECK(fast.request.top_p == tree.request.top_p);
    CHECK(keel::llm::build_request(fast.request, ep).body ==
          keel::llm::build_request(tree.request, ep).body);
  }
  const auto p = parse_chat_request(bodies[1]);
  CHECK(p.request.system == "a\n\n\n\nb");
  REQUIRE(p.request.messages.size() == 3);
  CHECK(p.request.messages[2].content == "\xc3\xa9\n");
  CHECK(p.request.max_tokens == 7);
  CHECK(p.stream);
  CHECK(p.include_usage);
  CHECK(parse_chat_request(bodies[2]).request.max_tokens == 9);  // max_completion_tokens wins
}

TEST_CASE("fields keel does not model are kept for OpenAI-format entries", "[gateway]") {
  const auto parsed = parse_chat_request(R"({"model": "m", "frequency_penalty": 0.5,
      "logit_bias": {"50256": -100}, "user": "u-1", "top_k": 20, "reasoning_effort": null,
      "seed": 7, "stream": false, "logprobs": false, "n": 1,
      "messages": [{"role": "user", "content": "x"}]})");
  const json expected = {{"frequency_penalty", 0.5},
                         {"logit_bias", {{"50256", -100}}},
                         {"user", "u-1"},
                         {"top_k", 20},
                         {"reasoning_effort", nullptr}};
  CHECK(parsed.request.extra_fields == expected);
  CHECK(parsed.request.seed == std::optional<std::int64_t>(7));
  // A body with only the fields keel reads has none (and takes the reading without a tree).
  CHECK(parse_chat_request(R"({"model": "m", "messages": [{"role": "user", "content": "x"}]})")
            .request.extra_fields.is_null());
}

TEST_CASE("a max_tokens over INT_MAX says the real range", "[gateway][review]") {
  try {
    (void)parse_chat_request(
        R"({"model": "m", "max_tokens": 2147483648, "messages": [{"role": "user", "content": "x"}]})");
    FAIL("parsed");
  } catch (const bad_request& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains("an integer from 1 to 2147483647"));
  }
}

TEST_CASE("a body keel cannot serve is refused with the field at fault", "[gateway]") {
  struct row {
    const char* body;
    const char* param;
    int status;
  };
  const std::vector<row> rows = {
      {"{bad", "", 400},
      {"", "", 400},
      {"[1]", "", 400},
      {R"({"messages": [{"role": "user", "content": "x"}]})", "model", 400},
      {R"({"model": "m"})", "messages", 400},
      {R"({"model": "m", "max_tokens": 2147483648, "messages": [{"role": "user", "content": "x"}]})",
       "max_tokens", 400},
      {R"({"model": "m", "messages": []})", "messages", 400},
      {R"({"model": "m", "messages": [{"role": "robot", "content": "x"}]})", "messages[0].role",
       400},
      {R"({"model": "m", "messages": [{"role": "user", "content": 5}]})", "messages[0].content",
       400},
      {R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})",
       "messages[0].content[0].image_url", 400},
      {R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})",
       "messages[0].content[0].type", 400},
      {R"({"model": "m", "messages": [{"role": "system", "content": [
           {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}, {"role": "user",
           "content": "x"}]})",
       "messages[0].content[0].type", 400},
      {R"({"model": "m", "messages": [{"role": "user", "content": [
           {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]})",
       "messages[0].content[0].image_url.url", 400},
      {R"({"model": "m", "messages": [{"role": "user", "content": [
           {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "max"}}]}]})",
       "messages[0].content[0].image_url.detail", 400},
      {R"({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant",
           "tool_calls": [{"id": "c", "type": "function",
                           "function": {"name": "f", "arguments": "[1]"}}]}]})",
       "messages[1].tool_calls[0].function.arguments", 400},
      {R"({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant",
           "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]})",
       "messages[1].tool_calls[0].id", 400},
      {R"({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]})",
       "messages[0].tool_calls", 400},
      {R"({"model": "m", "messages": [{"role": "function", "name": "f", "content": "x"}]})",
       "messages[0].role", 400},
      {R"({"model": "m", "functions": [{"name": "f"}],
           "messages": [{"role": "user", "content": "x"}]})",
       "functions", 400},
      {R"({"model": "m", "tools": [{"type": "custom", "custom": {"name": "f"}}],
           "messages": [{"role": "user", "content": "x"}]})",
       "tools[0].type", 400},
      {R"({"model": "m", "tools": [{"type": "function", "function": {"parameters": {}}}],
           "messages": [{"role": "user", "content": "x"}]})",
       "tools[0].function.name", 400},
      {R"({"model": "m", "tool_choice": "auto", "messages": [{"role": "user", "content": "x"}]})",
       "tool_choice", 400},
      {R"({"model": "m", "tool_choice": "sometimes",
           "tools": [{"type": "function", "function": {"name": "f"}}],
           "messages": [{"role": "user", "content": "x"}]})",
       "tool_choice", 400},
      {R"({"model": "m", "messages": [{"role": "system", "content": "only a system prompt"}]})",
       "messages", 400},
      {R"({"model": "m", "messages": [{"role": "tool", "content": "x"}]})",
       "messages[0].tool_call_id", 400},
      {R"({"model": "m", "tools": [], "messages": [{"role": "user", "content": "x"}]})", "tools",
       400},
      {R"({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]})", "n", 400},
      {R"({"model": "m", "top_logprobs": 2, "messages": [{"role": "user", "content": "x"}]})",
       "top_logprobs", 400},
      {R"({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]})",
       "max_tokens", 400},
      {R"({"model": "m", "temperature": 3, "messages": [{"role": "user", "content": "x"}]})",
       "temperature", 400},
      {R"({"model": "m", "stop": ["a", 1], "messages": [{"role": "user", "content": "x"}]})",
       "stop[1]", 400},
      {R"({"model": "m", "response_format": {"type": "xml"},
           "messages": [{"role": "user", "content": "x"}]})",
       "response_format.type", 400},
      {R"({"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "x"}]})",
       "stream", 400},
  };
  for (const row& r : rows) {
    INFO(r.body);
    const auto [param, status] = refusal(r.body);
    CHECK(param == r.param);
    CHECK(status == r.status);
  }
  // Nested far too deep for the recursive copies that would follow: refused before parsing.
  const std::string deep = R"({"model": "m", "metadata": )" + std::string(100000, '[') +
                           std::string(100000, ']') +
                           R"(, "messages": [{"role": "user", "content": "x"}]})";
  try {
    (void)parse_chat_request(deep);
    FAIL("parsed");
  } catch (const bad_request& e) {
    CHECK_THAT(e.what(), Catch::Contains("deeper than 128"));
  }
}

TEST_CASE("a completion written as text is the chat.completion OpenAI sends", "[gateway]") {
  keel::llm::chat_response reply;
  reply.text = "line 1\n\"quoted\" \xc3\xa9t\xc3\xa9 \x01 bad:\xff";
  reply.finish_reason = "max_tokens";
  reply.usage.input = 7;
  reply.usage.output = 9;
  const std::string text = keel::gateway::completion_body(reply, "chatcmpl-9", 1700000001, "r");
  // Members in OpenAI's order, not sorted.
  CHECK(text.rfind(R"({"id":"chatcmpl-9","object":"chat.completion","created":1700000001,)", 0) ==
        0);
  const json expected = {
      {"id", "chatcmpl-9"},
      {"object", "chat.completion"},
      {"created", 1700000001},
      {"model", "r"},
      {"choices",
       json::array({{{"index", 0},
                     {"message",
                      {{"role", "assistant"},
                       {"content", "line 1\n\"quoted\" \xc3\xa9t\xc3\xa9 \x01 bad:\xef\xbf\xbd"},
                       {"refusal", nullptr}}},
                     {"logprobs", nullptr},
                     {"finish_reason", "length"}}})},
      {"usage", {{"prompt_tokens", 7}, {"completion_tokens", 9}, {"total_tokens", 16}}},
      {"system_fingerprint", nullptr}};
  CHECK(json::parse(text) == expected);

  // Only tool calls: content null, the calls in OpenAI's shape.
  reply.text.clear();
  reply.finish_reason = "tool_use";
  reply.tool_calls.emplace_back("call_1", "get_weather", R"({"city":"Paris"})");
  reply.tool_calls.emplace_back("call_2", "f", "{}");
  const json j = json::parse(keel::gateway::completion_body(reply, "id", 0, "r"));
  const json& m = j["choices"][0]["message"];
  CHECK(m["content"].is_null());
  CHECK(m["tool_calls"] == json::parse(R"([{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                        {"id": "call_2", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}])"));
  CHECK(m["tool_calls"][1]["function"]["name"] == "f");
  CHECK(j["choices"][0]["finish_reason"] == "tool_calls");
}

TEST_CASE("a reply becomes a chat.completion with OpenAI's finish reasons", "[gateway]") {
  keel::llm::chat_response reply;
  reply.text = "hi";
  reply.finish_reason = "end_turn";
  reply.usage.input = 3;
  reply.usage.output = 2;
  json j = json::parse(keel::gateway::completion_body(reply, "chatcmpl-1", 1700000000, "route"));
  CHECK(j["object"] == "chat.completion");
  CHECK(j["model"] == "route");  // the provider did not say
  CHECK(j["choices"][0]["message"]["content"] == "hi");
  CHECK(j["choices"][0]["finish_reason"] == "stop");
  CHECK(j["usage"]["total_tokens"] == 5);
  reply.model = "claude-x";
  CHECK(json::parse(keel::gateway::completion_body(reply, "id", 0, "route"))["model"] ==
        "claude-x");
  CHECK(keel::gateway::openai_finish_reason("max_tokens") == "length");
  CHECK(keel::gateway::openai_finish_reason("tool_use") == "tool_calls");
  CHECK(keel::gateway::openai_finish_reason("guardrail_intervened") == "content_filter");
  CHECK(keel::gateway::openai_finish_reason("") == "stop");
  // Only OpenAI's four reach a caller (before: "pause_turn" and "model_context_window_exceeded"
  // passed through, which the SDKs' types do not know).
  CHECK(keel::gateway::openai_finish_reason("model_context_window_exceeded") == "length");
  CHECK(keel::gateway::openai_finish_reason("refusal") == "content_filter");
  CHECK(keel::gateway::openai_finish_reason("pause_turn") == "stop");
  CHECK(keel::gateway::openai_finish_reason("something_new") == "stop");
}

TEST_CASE("a content filter or refusal is answered as OpenAI answers it, a completion",
          "[gateway]") {
  // Before: a 400 content_filter error, which the SDKs raise as BadRequestError.
  keel::llm::chat_response partial;
  partial.text = "partial";
  partial.finish_reason = "guardrail_intervened";
  keel::llm::provider_error_info info(200, "bedrock", "", "stopReason guardrail_intervened");
  info.filtered_reply = std::make_shared<const keel::llm::chat_response>(partial);
  const auto error = std::make_exception_ptr(
      keel::llm::provider_error(keel::llm::errc::content_filtered, std::move(info)));
  CHECK(keel::gateway::is_content_filter(error));
  const auto reply = keel::gateway::filtered_reply(error);
  REQUIRE(reply != nullptr);
  json j = json::parse(keel::gateway::completion_body(*reply, "id", 0, "route"));
  CHECK(j["choices"][0]["finish_reason"] == "content_filter");
  CHECK(j["choices"][0]["message"]["content"] == "partial");
  CHECK(j["choices"][0]["message"]["refusal"] == nullptr);
  // OpenAI's refusal: content null, the refusal, finish reason as sent.
  keel::llm::chat_response refused;
  refused.refusal = "I can't help with that.";
  refused.finish_reason = "stop";
  j = json::parse(keel::gateway::completion_body(refused, "id", 0, "route"));
  CHECK(j["choices"][0]["message"]["content"] == nullptr);
  CHECK(j["choices"][0]["message"]["refusal"] == "I can't help with that.");
  CHECK(j["choices"][0]["finish_reason"] == "stop");
  // A stream's filter after its first delta: the call's error is stream_interrupted around it.
  const auto in_stream = std::make_exception_ptr(keel::llm::provider_error(
      keel::llm::errc::content_filtered,
      keel::llm::provider_error_info(200, "openai", "content_filter", "finish_reason")));
  const auto cut = std::make_exception_ptr(
      keel::failure(keel::make_error_code(keel::error::stream_interrupted), "cut", {in_stream}));
  CHECK(keel::gateway::is_content_filter(cut));
  // Any other error is not one.
  const auto other = std::make_exception_ptr(keel::llm::provider_error(
      keel::llm::errc::overloaded, keel::llm::provider_error_info(529, "anthropic", "", "x")));
  CHECK_FALSE(keel::gateway::is_content_filter(other));
  CHECK(keel::gateway::filtered_reply(other) == nullptr);
}

TEST_CASE("a failed call is answered in OpenAI's error shape, with when to try again",
          "[gateway]") {
  using keel::llm::errc;
  using namespace std::chrono_literals;
  // Rate limited after keel's retries: a 429 with the server's delay.
  const auto exhausted = std::make_exception_ptr(
      keel::failure(keel::make_error_code(keel::error::retries_exhausted),
                    "retries exhausted after 3 attempts", {provider(errc::rate_limited, 429, 2s)}));
  auto e = keel::gateway::error_answer(exhausted);
  CHECK(e.status == 429);
  CHECK(e.body["error"]["code"] == "rate_limit_exceeded");
  REQUIRE(e.retry_after);
  CHECK(*e.retry_after == 2s);

  // The provider refused keel's key: not the caller's fault, not the caller's key.
  e = keel::gateway::error_answer(provider(errc::auth, 401));
  CHECK(e.status == 502);
  CHECK(e.body["error"]["code"] == "upstream_auth");

  e = keel::gateway::error_answer(provider(errc::context_length_exceeded, 400));
  CHECK(e.status == 400);
  CHECK(e.body["error"]["param"] == "messages");

  e = keel::gateway::error_answer(provider(errc::overloaded, 529));
  CHECK(e.status == 503);

  // An open breaker: 503 with its remaining break.
  e = keel::gateway::error_answer(std::make_exception_ptr(
      keel::failure(keel::make_error_code(keel::error::circuit_open), "circuit open", {}, 4500ms)));
  CHECK(e.status == 503);
  CHECK(e.body["error"]["code"] == "circuit_open");
  REQUIRE(e.retry_after);
  CHECK(*e.retry_after == 4500ms);

  e = keel::gateway::error_answer(std::make_exception_ptr(
      keel::failure(keel::make_error_code(keel::error::deadline_exceeded), "deadline")));
  CHECK(e.status == 504);

  // The retry budget gave up on a 503: said so.
  e = keel::gateway::error_answer(std::make_exception_ptr(
      keel::failure(keel::make_error_code(keel::error::budget_exhausted), "budget exhausted",
                    {provider(errc::server_error, 503)})));
  CHECK(e.status == 502);
  CHECK(e.body["error"]["message"].get<std::string>().find("retry budget") != std::string::npos);

  // A transport error that never reached a provider.
  e = keel::gateway::error_answer(std::make_exception_ptr(
      boost::system::system_error(make_error_code(boost::asio::error::connection_refused))));
  CHECK(e.status == 502);
  CHECK(e.body["error"]["code"] == "upstream_unreachable");

  // The same as keel's HTTP client throws it (a keel::failure with the socket's code), after
  // the retries: still unreachable, not the error's class ("connection").
  const auto refused = std::make_exception_ptr(keel::failure(
      make_error_code(boost::asio::error::connection_refused), "keel.http: connect: refused"));
  for (const auto& err : {refused, std::make_exception_ptr(keel::failure(
                                       keel::make_error_code(keel::error::retries_exhausted),
                                       "retries exhausted after 2 attempts", {refused}))}) {
    e = keel::gateway::error_answer(err);
    CHECK(e.status == 502);
    CHECK(e.body["error"]["code"] == "upstream_unreachable");
  }
  e = keel::gateway::error_answer(std::make_exception_ptr(
      keel::failure(make_error_code(boost::asio::error::timed_out), "keel.http: read: timed out")));
  CHECK(e.status == 504);
  CHECK(e.body["error"]["code"] == "upstream_timeout");
  // A permanent transport error keeps its class: what to fix (keel's TLS trust, a limit).
  e = keel::gateway::error_answer(std::make_exception_ptr(
      keel::failure(keel::http::make_error_code(keel::http::error::tls_verification_failed),
                    "keel.http: TLS handshake failed")));
  CHECK(e.status == 502);
  CHECK(e.body["error"]["code"] == "tls");
}

namespace {

// keel serve's parts on one io_context: the mock, a client of it, the gateway in front.
struct gateway_rig {
  // `traced`: the client and the gateway record spans into `spans`.
  explicit gateway_rig(const char* config, keel::gateway::server_options so = {},
                       bool traced = false, keel::testing::mock_options mo = {.seed = 1})
      : tracer(ctx.get_executor(), spans, {.seed = 9}),
        mock(ctx, std::move(mo)),
        client(ctx.get_executor(), (mock.start(), client::make_config(config, mock.base_url())), {},
               {.seed = 1, .tracer = traced ? &tracer : nullptr}),
        http(ctx.get_executor(), keel::http::client_options{}),
        gateway(ctx.get_executor(), client,
                (so.models = {"m"}, so.tracer = traced ? &tracer : nullptr, so)) {
    gateway.start();
  }

  // Sends `method path` with `body` to the gateway and runs the context until it answers.
  keel::http::response send(const std::string& method, const std::string& path,
                            const std::string& body = {}) {
    return send(method, path, body, {});
  }

  // As above, with extra header fields.
  keel::http::response send(const std::string& method, const std::string& path,
                            const std::string& body,
                            const std::vector<std::pair<std::string, std::string>>& headers) {
    keel::http::request req(method, gateway.base_url() + path);
    req.body = body;
    for (const auto& [name, value] : headers) {
      req.set(name, value);
    }
    if (!body.empty()) {
      req.set("content-type", "application/json");
    }
    auto o = run_one(ctx, http.send(req));
    REQUIRE_FALSE(o.error);
    return *o.value;
  }

  asio::io_context ctx;
  keel::otlp::memory_exporter spans;
  keel::trace::tracer tracer;
  keel::testing::mock_llm_server mock;
  keel::llm::client client;
  keel::http::client http;
  keel::gateway::server gateway;
};

constexpr const char* one_entry = R"({
  "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}],
  "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.001}}}
})";

const std::string hello = R"({"model": "m", "messages": [{"role": "user", "content": "hello"}]})";

// Writes `bytes` to the gateway on a new connection and returns everything it answers until it
// closes the connection.
std::string exchange_raw(gateway_rig& rig, const std::string& bytes) {
  asio::ip::tcp::socket sock(rig.ctx);
  sock.connect({asio::ip::make_address("127.0.0.1"), rig.gateway.port()});
  std::string got;
  bool done = false;
  asio::co_spawn(
      rig.ctx,
      [&]() -> asio::awaitable<void> {
        co_await asio::async_write(sock, asio::buffer(bytes), asio::use_awaitable);
        std::array<char, 4096> buf{};
        for (;;) {
          auto [ec, n] =
              co_await sock.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
          if (ec) {
            break;
          }
          got.append(buf.data(), n);
        }
        done = true;
      },
      asio::detached);
  REQUIRE(run_real(rig.ctx, [&] { return done; }));
  return got;
}

}  // namespace

TEST_CASE("keel serve answers a chat completion through the client's retries", "[gateway]") {
  gateway_rig rig(one_entry);
  keel::testing::fault_plan plan;
  plan.script = {keel::testing::fault_kind::rate_limit, keel::testing::fault_kind::ok};
  plan.retry_after = std::chrono::milliseconds(1);
  rig.mock.set_plan("m", plan);

  const keel::http::response res = rig.send("POST", "/v1/chat/completions", hello);
  REQUIRE(res.status == 200);
  const json j = json::parse(res.body);
  CHECK(j["object"] == "chat.completion");
  CHECK(j["choices"][0]["message"]["content"] == "mock answer to: hello");
  CHECK(j["usage"]["total_tokens"].get<int>() > 0);
  CHECK(std::string(res.headers.find("x-request-id").value_or("")).rfind("req_keel_", 0) == 0);
  // The 429 was keel's to retry: the caller saw one answer, the provider two requests.
  CHECK(rig.mock.stats().model("m").requests == 2);
  CHECK(rig.gateway.stats().completions == 1);
}

TEST_CASE("keel serve answers what it cannot serve in OpenAI's shapes", "[gateway]") {
  keel::gateway::server_options so;
  so.max_request_body = 1024;
  gateway_rig rig(one_entry, so);

  keel::http::response res =
      rig.send("POST", "/v1/chat/completions",
               R"({"model": "gpt-x", "messages": [{"role": "user", "content": "hello"}]})");
  CHECK(res.status == 404);
  CHECK(json::parse(res.body)["error"]["code"] == "model_not_found");

  res = rig.send("POST", "/v1/chat/completions", R"({"model": "m", "messages": 1})");
  CHECK(res.status == 400);
  CHECK(json::parse(res.body)["error"]["param"] == "messages");

  res = rig.send("POST", "/v1/chat/completions",
                 R"({"model": "m", "messages": [{"role": "user", "content": ")" +
                     std::string(2000, 'x') + R"("}]})");
  CHECK(res.status == 413);

  res = rig.send("GET", "/v1/chat/completions");
  CHECK(res.status == 405);
  res = rig.send("GET", "/v1/embeddings");
  CHECK(res.status == 404);
  CHECK(json::parse(res.body)["error"]["code"] == "unknown_url");

  res = rig.send("GET", "/v1/models");
  REQUIRE(res.status == 200);
  CHECK(json::parse(res.body)["data"][0]["id"] == "m");
  res = rig.send("GET", "/healthz");
  CHECK(res.status == 200);
  CHECK(rig.mock.stats().total.requests == 0);  // nothing above reached the provider
}

TEST_CASE("keel serve answers a failed call with the status and retry-after the caller needs",
          "[gateway]") {
  gateway_rig rig(one_entry);
  keel::testing::fault_plan plan;
  plan.script = {keel::testing::fault_kind::quota_exhausted};
  rig.mock.set_plan("m", plan);
  keel::http::response res = rig.send("POST", "/v1/chat/completions", hello);
  CHECK(res.status == 429);
  CHECK(json::parse(res.body)["error"]["code"] == "insufficient_quota");
  // The key never shows.
  CHECK(res.body.find("sk-test-KEY000001") == std::string::npos);
}

namespace {

// Sends one completion to a mock that answers after `latency`, starts draining the gateway with
// `grace` once the call is in flight, and runs until both the drain and the call are done.
outcome<keel::http::response> drain_during_call(gateway_rig& rig, std::chrono::milliseconds latency,
                                                std::chrono::milliseconds grace) {
  rig.mock.set_plan("m", keel::testing::fault_plan().with_latency(latency));
  keel::http::request req("POST", rig.gateway.base_url() + "/v1/chat/completions");
  req.body = hello;
  outcome<keel::http::response> answer;
  spawn(rig.ctx, rig.http.send(req), answer);
  bool drained = false;
  REQUIRE(run_real(rig.ctx, [&] { return rig.gateway.stats().in_flight == 1; }));
  asio::co_spawn(
      rig.ctx,
      [&]() -> asio::awaitable<void> {
        co_await rig.gateway.drain(grace);
        drained = true;
      },
      asio::detached);
  REQUIRE(run_real(rig.ctx, [&] { return drained && answer.done; }));
  return answer;
}

}  // namespace

TEST_CASE("draining lets a call in flight finish and refuses new connections", "[gateway]") {
  gateway_rig rig(one_entry);
  const auto answer =
      drain_during_call(rig, std::chrono::milliseconds(50), std::chrono::seconds(10));
  REQUIRE_FALSE(answer.error);
  CHECK(answer.value->status == 200);  // finished within the grace
  CHECK(rig.gateway.stats().completions == 1);
  // The listener is closed: a new caller is not served.
  auto late = run_one(
      rig.ctx, rig.http.send(keel::http::request("GET", rig.gateway.base_url() + "/healthz")));
  CHECK(late.error);
  CHECK(rig.gateway.stats().connections == 1);
}

TEST_CASE("a drain whose grace ends cancels the call and answers 503 shutting_down", "[gateway]") {
  gateway_rig rig(one_entry);
  const auto answer =
      drain_during_call(rig, std::chrono::seconds(30), std::chrono::milliseconds(0));
  REQUIRE_FALSE(answer.error);
  CHECK(answer.value->status == 503);
  CHECK(json::parse(answer.value->body)["error"]["code"] == "shutting_down");
}

namespace {

// The `data:` payloads of a server-sent event stream, in order.
std::vector<std::string> events_of(const std::string& body) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const std::size_t end = body.find("\n\n", at);
    REQUIRE(end != std::string::npos);
    out.push_back(body.substr(at + 6, end - at - 6));
    at = end + 2;
  }
  return out;
}

const std::string streamed =
    R"({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello"}]})";

}  // namespace

TEST_CASE("keel serve streams a reply as OpenAI chat.completion.chunk events", "[gateway]") {
  gateway_rig rig(one_entry);
  keel::testing::fault_plan plan;
  plan.script = {keel::testing::fault_kind::rate_limit, keel::testing::fault_kind::ok};
  plan.retry_after = std::chrono::milliseconds(1);
  rig.mock.set_plan("m", plan);
  const keel::http::response res = rig.send("POST", "/v1/chat/completions", streamed);
  REQUIRE(res.status == 200);
  CHECK(std::string(res.headers.find("content-type").value_or("")).rfind("text/event-stream", 0) ==
        0);
  const auto ev = events_of(res.body);
  REQUIRE(ev.size() >= 5);  // role, text..., finish, usage, [DONE]
  CHECK(ev.back() == "[DONE]");
  const json first = json::parse(ev.front());
  CHECK(first["object"] == "chat.completion.chunk");
  CHECK(first["choices"][0]["delta"]["role"] == "assistant");
  std::string text;
  for (std::size_t i = 1; i + 3 < ev.size(); ++i) {
    text += json::parse(ev[i])["choices"][0]["delta"]["content"].get<std::string>();
  }
  CHECK(text == "mock answer to: hello");
  const json finish = json::parse(ev[ev.size() - 3]);
  CHECK(finish["choices"][0]["finish_reason"] == "stop");
  const json usage = json::parse(ev[ev.size() - 2]);
  CHECK(usage["choices"].empty());
  CHECK(usage["usage"]["total_tokens"].get<int>() > 0);
  // The 429 came before the first delta: retried by keel, unseen by the caller.
  CHECK(rig.mock.stats().model("m").requests == 2);
  CHECK(rig.gateway.stats().completions == 1);
}

TEST_CASE("a streamed call that fails before its first delta gets an ordinary error answer",
          "[gateway]") {
  gateway_rig rig(one_entry);
  keel::testing::fault_plan plan;
  plan.script = {keel::testing::fault_kind::quota_exhausted};
  rig.mock.set_plan("m", plan);
  const keel::http::response res = rig.send("POST", "/v1/chat/completions", streamed);
  CHECK(res.status == 429);
  CHECK(json::parse(res.body)["error"]["code"] == "insufficient_quota");
}

TEST_CASE("a stream cut after its first delta ends with an error event and no [DONE]",
          "[gateway]") {
  gateway_rig rig(one_entry);
  keel::testing::fault_plan plan;
  plan.script = {keel::testing::fault_kind::stream_error};
  plan.stream.fault_after_chunks = 2;
  rig.mock.set_plan("m", plan);
  const keel::http::response res = rig.send("POST", "/v1/chat/completions", streamed);
  REQUIRE(res.status == 200);  // committed before the failure
  const auto ev = events_of(res.body);
  REQUIRE(ev.size() == 4);  // role, two deltas, the error
  const json err = json::parse(ev.back());
  REQUIRE(err.contains("error"));
  CHECK(err["error"]["code"] == "stream_interrupted");
  // Not retried after the commit point.
  CHECK(rig.mock.stats().model("m").requests == 1);
  // The body ended properly, so the connection stays usable: the next request on it is
  // answered (it used to be closed after a keep-alive head, and the caller's next request on
  // the pooled connection met a reset).
  REQUIRE(run_real(rig.ctx, [&] { return rig.gateway.stats().open_connections == 1; }));
  CHECK(rig.send("GET", "/healthz").status == 200);
  CHECK(rig.gateway.stats().connections == 1);
}

TEST_CASE("keel serve passes a content filter on as OpenAI does, whole or streamed", "[gateway]") {
  // A route with a fallback: the call's error is all_fallbacks_failed around the last entry's.
  gateway_rig rig(R"({"config_list": [
      {"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"},
      {"api_type": "openai", "model": "m2", "api_key": "sk-test-KEY000002"}],
      "policy": {"retry": {"max_attempts": 1}}})");
  keel::testing::fault_plan plan;
  plan.script = {keel::testing::fault_kind::content_filter,
                 keel::testing::fault_kind::content_filter};
  rig.mock.set_plan("m", plan);
  rig.mock.set_plan("m2", plan);
  keel::http::response res = rig.send("POST", "/v1/chat/completions", hello);
  REQUIRE(res.status == 200);  // before: 400 content_filter (the SDKs' BadRequestError)
  const json j = json::parse(res.body);
  CHECK(j["choices"][0]["finish_reason"] == "content_filter");
  CHECK(j["object"] == "chat.completion");
  res = rig.send("POST", "/v1/chat/completions", streamed);
  REQUIRE(res.status == 200);
  const auto ev = events_of(res.body);
  REQUIRE(ev.size() >= 3);  // the role, the finish, [DONE]
  CHECK(ev.back() == "[DONE]");
  bool finished = false;
  for (const auto& e : ev) {
    if (e != "[DONE]") {
      const json c = json::parse(e);
      CHECK_FALSE(c.contains("error"));  // before: a stream_interrupted error event
      if (!c["choices"].empty() && c["choices"][0]["finish_reason"] == "content_filter") {
        finished = true;
      }
    }
  }
  CHECK(finished);
  CHECK(rig.mock.stats().model("m").requests == 2);   // neither was retried
  CHECK(rig.mock.stats().model("m2").requests == 2);  // each fell back first
  // Azure's 400 for a filtered prompt stays an error, streamed or not, as Azure answers it.
  gateway_rig azure(one_entry);
  keel::testing::fault_plan azure_plan;
  azure_plan.script = {keel::testing::fault_kind::content_filter,
                       keel::testing::fault_kind::content_filter};
  azure_plan.quirks.azure_content_filter = true;
  azure.mock.set_plan("m", azure_plan);
  CHECK(azure.send("POST", "/v1/chat/completions", hello).status == 400);
  CHECK(azure.send("POST", "/v1/chat/completions", streamed).status == 400);
}

TEST_CASE("keel serve answers Expect: 100-continue before the body is sent", "[gateway][review]") {
  // Before: no 100 Continue, so curl waited a second before every body over 1 KiB.
  gateway_rig rig(one_entry);
  asio::ip::tcp::socket sock(rig.ctx);
  sock.connect({asio::ip::make_address("127.0.0.1"), rig.gateway.port()});
  std::string interim;
  std::string answer;
  bool done = false;
  asio::co_spawn(
      rig.ctx,
      [&]() -> asio::awaitable<void> {
        const std::string head =
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nExpect: 100-continue\r\n"
            "Connection: close\r\nContent-Length: " +
            std::to_string(hello.size()) + "\r\n\r\n";
        co_await asio::async_write(sock, asio::buffer(head), asio::use_awaitable);
        std::array<char, 4096> buf{};
        // Only the head was sent: the gateway must answer it before the body comes.
        while (interim.find("\r\n\r\n") == std::string::npos) {
          auto [ec, n] =
              co_await sock.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
          if (ec) {
            break;
          }
          interim.append(buf.data(), n);
        }
        co_await asio::async_write(sock, asio::buffer(hello), asio::use_awaitable);
        for (;;) {
          auto [ec, n] =
              co_await sock.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
          if (ec) {
            break;
          }
          answer.append(buf.data(), n);
        }
        done = true;
      },
      asio::detached);
  REQUIRE(run_real(rig.ctx, [&] { return done; }));
  CHECK(interim == "HTTP/1.1 100 Continue\r\n\r\n");
  CHECK(answer.rfind("HTTP/1.1 200 OK\r\n", 0) == 0);
  CHECK(answer.find("mock answer to: hello") != std::string::npos);
  // A body over the limit is refused by its Content-Length, with no 100 Continue.
  keel::gateway::server_options small;
  small.max_request_body = 16;
  gateway_rig tight(one_entry, small);
  const std::string refused =
      exchange_raw(tight,
                   "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                   "Content-Length: 5000\r\n\r\n");
  CHECK(refused.rfind("HTTP/1.1 413", 0) == 0);
}

TEST_CASE("keel serve's URL brackets an IPv6 address", "[gateway][review]") {
  keel::gateway::server_options so;
  so.address = "::1";
  try {
    gateway_rig rig(one_entry, so);
    CHECK(rig.gateway.base_url().rfind("http://[::1]:", 0) == 0);
    CHECK(rig.send("GET", "/healthz").status == 200);  // the printed URL is usable
  } catch (const boost::system::system_error& e) {
    WARN("no IPv6 loopback on this machine: " << e.what());
  }
}

TEST_CASE("an HTTP/1.0 caller's stream is not chunked and ends with the connection",
          "[gateway][review]") {
  gateway_rig rig(one_entry);
  const std::string got =
      exchange_raw(rig,
                   "POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                   "Content-Length: " +
                       std::to_string(streamed.size()) + "\r\n\r\n" + streamed);
  const auto split = got.find("\r\n\r\n");
  REQUIRE(split != std::string::npos);
  const std::string head = got.substr(0, split);
  INFO(head);
  CHECK(head.rfind("HTTP/1.0 200 OK\r\n", 0) == 0);
  CHECK_THAT(head, !Catch::Contains("chunked", Catch::CaseSensitive::No));
  CHECK_THAT(head, !Catch::Contains("keep-alive", Catch::CaseSensitive::No));
  // The events themselves, unframed, to the end: the close ends the body.
  const std::string body = got.substr(split + 4);
  CHECK(body.rfind("data: {", 0) == 0);
  CHECK(body.size() >= 14);
  INFO(body.substr(body.size() > 400 ? body.size() - 400 : 0));
  CHECK(body.substr(body.size() - 14) == "data: [DONE]\n\n");
}

TEST_CASE("a request body over the limit gets its 413, not a reset, however much is sent",
          "[gateway][review]") {
  // The SDKs write the whole body before reading: with the socket closed on unread bytes, the
  // kernel's reset destroyed the 413 and they reported EPIPE (and retried the upload).
  keel::gateway::server_options so;
  so.max_request_body = 1024;
  gateway_rig rig(one_entry, so);
  const std::string huge = R"({"model": "m", "messages": [{"role": "user", "content": ")" +
                           std::string(8 << 20, 'x') + R"("}]})";
  const keel::http::response res = rig.send("POST", "/v1/chat/completions", huge);
  CHECK(res.status == 413);
  CHECK(json::parse(res.body)["error"]["code"] == "request_too_large");
}

namespace {

// A rig whose gateway knows two callers: "a" (key sk-caller-a, 60 requests per minute: a burst
// of one) and "b" (key sk-caller-b, one call at a time).
keel::gateway::server_options two_callers() {
  keel::gateway::server_options so;
  keel::llm::serve_client a;
  a.name = "a";
  a.key_sha256 = keel::llm::sigv4::sha256_hex("sk-caller-a");
  a.requests_per_minute = 60;
  keel::llm::serve_client b;
  b.name = "b";
  b.key_sha256 = keel::llm::sigv4::sha256_hex("sk-caller-b");
  b.concurrency = 1;
  so.clients = {a, b};
  return so;
}

keel::http::request completion_as(const std::string& base, const std::string& key) {
  keel::http::request req("POST", base + "/v1/chat/completions");
  req.body = hello;
  if (!key.empty()) {
    req.set("authorization", "Bearer " + key);
  }
  return req;
}

}  // namespace

TEST_CASE("with client keys, keel serve answers only the callers it knows", "[gateway]") {
  gateway_rig rig(one_entry, two_callers());
  auto send = [&](const std::string& key) {
    auto o = run_one(rig.ctx, rig.http.send(completion_as(rig.gateway.base_url(), key)));
    REQUIRE_FALSE(o.error);
    return *o.value;
  };
  keel::http::response res = send("");
  CHECK(res.status == 401);
  CHECK(json::parse(res.body)["error"]["code"] == "missing_api_key");
  res = send("sk-someone-else");
  CHECK(res.status == 401);
  CHECK(json::parse(res.body)["error"]["code"] == "invalid_api_key");
  CHECK(res.body.find("sk-someone-else") == std::string::npos);
  CHECK(rig.mock.stats().total.requests == 0);
  // /healthz needs no key.
  CHECK(rig.send("GET", "/healthz").status == 200);

  // Caller a: 60 per minute, a burst of one: the second request at once is refused with when
  // to come back.
  res = send("sk-caller-a");
  CHECK(res.status == 200);
  res = send("sk-caller-a");
  CHECK(res.status == 429);
  CHECK(json::parse(res.body)["error"]["code"] == "rate_limit_exceeded");
  const auto after = std::string(res.headers.find("retry-after-ms").value_or("0"));
  CHECK(std::stoi(after) > 0);
  CHECK(std::stoi(after) <= 1000);
  CHECK(rig.gateway.stats().limited == 1);
  CHECK(rig.gateway.stats().unauthorized == 2);
  CHECK(rig.mock.stats().total.requests == 1);
}

TEST_CASE("a caller's concurrency limit refuses its extra call at once", "[gateway]") {
  gateway_rig rig(one_entry, two_callers());
  rig.mock.set_plan("m", keel::testing::fault_plan().with_latency(std::chrono::milliseconds(100)));
  outcome<keel::http::response> first;
  outcome<keel::http::response> second;
  spawn(rig.ctx, rig.http.send(completion_as(rig.gateway.base_url(), "sk-caller-b")), first);
  REQUIRE(run_real(rig.ctx, [&] { return rig.gateway.stats().in_flight == 1; }));
  spawn(rig.ctx, rig.http.send(completion_as(rig.gateway.base_url(), "sk-caller-b")), second);
  REQUIRE(run_real(rig.ctx, [&] { return first.done && second.done; }));
  REQUIRE_FALSE(first.error);
  REQUIRE_FALSE(second.error);
  CHECK(first.value->status == 200);
  CHECK(second.value->status == 429);
  CHECK(json::parse(second.value->body)["error"]["code"] == "concurrency_limit_exceeded");
  CHECK(rig.mock.stats().total.requests == 1);
}

TEST_CASE("connections beyond max_connections are closed at once", "[gateway]") {
  keel::gateway::server_options so;
  so.max_connections = 1;
  gateway_rig rig(one_entry, so);
  // One idle connection takes the only place.
  asio::ip::tcp::socket idle(rig.ctx);
  idle.connect({asio::ip::make_address("127.0.0.1"), rig.gateway.port()});
  REQUIRE(run_real(rig.ctx, [&] { return rig.gateway.stats().connections == 1; }));
  keel::http::request req("GET", rig.gateway.base_url() + "/healthz");
  auto refused = run_one(rig.ctx, rig.http.send(req));
  CHECK(refused.error);  // closed without an answer
  CHECK(rig.gateway.stats().refused_connections >= 1);
  // Once the idle one is gone, the next caller is served.
  idle.close();
  REQUIRE(run_real(rig.ctx, [&] { return rig.gateway.stats().open_connections == 0; }));
  auto served = run_one(rig.ctx, rig.http.send(req));
  REQUIRE_FALSE(served.error);
  CHECK(served.value->status == 200);
}

TEST_CASE("keel serve frames each answer exactly: status line, fields, length, body", "[gateway]") {
  gateway_rig rig(one_entry);
  // Three pipelined requests: a 404 and a 200 on HTTP/1.1 (kept alive), then an HTTP/1.0 one
  // without keep-alive, after which the gateway closes the connection.
  const std::string got = exchange_raw(rig,
                                       "GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
                                       "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                       "GET /healthz HTTP/1.0\r\n\r\n");

  struct answer {
    std::string status_line;
    std::vector<std::string> fields;
    std::string body;
  };
  std::vector<answer> answers;
  std::size_t at = 0;
  while (at < got.size()) {
    const std::size_t end = got.find("\r\n\r\n", at);
    REQUIRE(end != std::string::npos);
    answer a;
    std::size_t line = at;
    std::size_t length = 0;
    bool has_length = false;
    while (line < end) {
      const std::size_t eol = got.find("\r\n", line);
      const std::string text = got.substr(line, eol - line);
      if (a.status_line.empty()) {
        a.status_line = text;
      } else {
        a.fields.push_back(text);
        if (text.rfind("Content-Length: ", 0) == 0) {
          length = std::stoul(text.substr(16));
          has_length = true;
        }
      }
      line = eol + 2;
    }
    REQUIRE(has_length);
    REQUIRE(end + 4 + length <= got.size());
    a.body = got.substr(end + 4, length);
    at = end + 4 + length;
    answers.push_back(std::move(a));
  }
  REQUIRE(answers.size() == 3);
  CHECK(answers[0].status_line == "HTTP/1.1 404 Not Found");
  CHECK(answers[1].status_line == "HTTP/1.1 200 OK");
  CHECK(answers[2].status_line == "HTTP/1.0 200 OK");
  for (const answer& a : answers) {
    CHECK(std::count(a.fields.begin(), a.fields.end(), "Server: keel") == 1);
    CHECK(json::accept(a.body));
  }
  CHECK(json::parse(answers[0].body)["error"]["type"] == "invalid_request_error");
  CHECK(answers[1].body == answers[2].body);
  // HTTP/1.1 keeps the connection by default and HTTP/1.0 closes it by default: no answer has a
  // Connection field, and the connection ends after the 1.0 answer.
  for (const answer& a : answers) {
    CHECK(std::none_of(a.fields.begin(), a.fields.end(), [](const std::string& f) {
      return f.rfind("Connection:", 0) == 0 || f.rfind("connection:", 0) == 0;
    }));
    CHECK(std::count_if(a.fields.begin(), a.fields.end(), [](const std::string& f) {
            return f.rfind("Content-Type: application/json", 0) == 0;
          }) == 1);
  }
}

TEST_CASE("a gateway with one route per model sends each to its own client", "[gateway]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server mock(ctx, {.seed = 1});
  mock.start();
  auto config = [&](const char* model) {
    return client::make_config(
        std::string(R"({"config_list": [{"api_type": "openai", "model": ")") + model +
            R"(", "api_key": "sk-test-KEY000001"}]})",
        mock.base_url());
  };
  keel::llm::client fast(ctx.get_executor(), config("fast"), {}, {});
  keel::llm::client smart(ctx.get_executor(), config("smart"), {}, {});
  keel::gateway::server gw(ctx.get_executor(), {{"fast", &fast}, {"smart", &smart}}, {});
  gw.start();
  keel::http::client http(ctx.get_executor(), keel::http::client_options{});
  auto ask = [&](const std::string& model) {
    keel::http::request req("POST", gw.base_url() + "/v1/chat/completions");
    req.body = R"({"model": ")" + model + R"(", "messages": [{"role": "user", "content": "x"}]})";
    auto o = run_one(ctx, http.send(req));
    REQUIRE_FALSE(o.error);
    return *o.value;
  };
  CHECK(ask("smart").status == 200);
  CHECK(ask("smart").status == 200);
  CHECK(ask("fast").status == 200);
  CHECK(ask("other").status == 404);
  CHECK(mock.stats().model("smart").requests == 2);
  CHECK(mock.stats().model("fast").requests == 1);
  auto models = run_one(ctx, http.send(keel::http::request("GET", gw.base_url() + "/v1/models")));
  REQUIRE_FALSE(models.error);
  const json data = json::parse(models.value->body)["data"];
  REQUIRE(data.size() == 2);
  CHECK(data[0]["id"] == "fast");
  CHECK(data[1]["id"] == "smart");

  CHECK_THROWS_AS(keel::gateway::server(ctx.get_executor(), {{"a", &fast}, {"a", &smart}}, {}),
                  std::invalid_argument);
  CHECK_THROWS_AS(keel::gateway::server(ctx.get_executor(), {{"a", nullptr}}, {}),
                  std::invalid_argument);
}

TEST_CASE("an Anthropic-backed route answers the OpenAI caller in OpenAI's shape", "[gateway]") {
  gateway_rig rig(R"({"config_list": [
      {"api_type": "anthropic", "model": "m", "api_key": "sk-ant-test-KEY0001"}]})");
  const keel::http::response res = rig.send("POST", "/v1/chat/completions", hello);
  REQUIRE(res.status == 200);
  const json j = json::parse(res.body);
  CHECK(j["object"] == "chat.completion");
  CHECK(j["choices"][0]["message"]["content"] == "mock answer to: hello");
  CHECK(j["choices"][0]["finish_reason"] == "stop");  // Anthropic's end_turn
  CHECK(j["usage"]["prompt_tokens"].get<int>() > 0);
  // The mock saw an Anthropic messages request.
  CHECK(rig.mock.stats().model("m").last_body.find("\"max_tokens\"") != std::string::npos);
  CHECK(rig.mock.stats().model("m").requests == 1);

  // Streamed too: Anthropic's events become OpenAI chunks.
  const keel::http::response s = rig.send(
      "POST", "/v1/chat/completions",
      R"({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hello"}]})");
  REQUIRE(s.status == 200);
  CHECK(s.body.find("chat.completion.chunk") != std::string::npos);
  CHECK(s.body.find("data: [DONE]") != std::string::npos);
}

TEST_CASE("keel serve traces a request under the caller's traceparent down to the provider",
          "[gateway][trace]") {
  gateway_rig rig(one_entry, {}, true);
  keel::testing::fault_plan plan;
  plan.script = {keel::testing::fault_kind::unavailable, keel::testing::fault_kind::ok};
  rig.mock.set_plan("m", plan);
  const std::string trace = "4bf92f3577b34da6a3ce929d0e0e4736";
  const keel::http::response res =
      rig.send("POST", "/v1/chat/completions", hello,
               {{"traceparent", "00-" + trace + "-00f067aa0ba902b7-01"}, {"tracestate", "a=1"}});
  REQUIRE(res.status == 200);
  auto flushed = run_one(rig.ctx, rig.tracer.flush());
  REQUIRE_FALSE(flushed.error);

  // Two attempts, the call, the request: one trace, each span under the one above it.
  const auto& spans = rig.spans.spans();
  REQUIRE(spans.size() == 4);
  const keel::trace::span_data& server = spans[3];
  const keel::trace::span_data& call = spans[2];
  CHECK(server.name == "POST /v1/chat/completions");
  CHECK(server.kind == keel::trace::span_kind::server);
  CHECK(keel::trace::to_hex(server.parent.data(), 8) == "00f067aa0ba902b7");
  CHECK(server.context.state == "a=1");
  CHECK(std::get<std::int64_t>(*server.find("http.response.status_code")) == 200);
  CHECK(std::get<std::string>(*server.find("gen_ai.request.model")) == "m");
  CHECK(call.parent == server.context.span);
  CHECK(std::get<std::int64_t>(*call.find("keel.attempts")) == 2);
  REQUIRE(call.events.size() == 1);
  CHECK(call.events[0].name == "keel.retry");
  for (int i = 0; i < 2; ++i) {
    CHECK(spans[i].parent == call.context.span);
    CHECK(keel::trace::to_hex(spans[i].context.trace.data(), 16) == trace);
  }
  // The provider saw each attempt's own span as its parent, in the caller's trace.
  const auto sent = rig.mock.stats().model("m").traceparents;
  REQUIRE(sent.size() == 2);
  CHECK(sent[0] == keel::trace::to_traceparent(spans[0].context));
  CHECK(sent[1] == keel::trace::to_traceparent(spans[1].context));
}

TEST_CASE("keel serve joins several tracestate fields and ignores two traceparents",
          "[gateway][trace]") {
  gateway_rig rig(one_entry, {}, true);
  const std::string tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  keel::http::request req("POST", rig.gateway.base_url() + "/v1/chat/completions");
  req.body = hello;
  req.set("content-type", "application/json");
  req.set("traceparent", tp);
  req.headers.add("tracestate", "a=1");
  req.headers.add("tracestate", "b=2");
  REQUIRE(run_one(rig.ctx, rig.http.send(req)).value->status == 200);
  req.headers.add("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
  REQUIRE(run_one(rig.ctx, rig.http.send(req)).value->status == 200);
  REQUIRE_FALSE(run_one(rig.ctx, rig.tracer.flush()).error);
  std::vector<const keel::trace::span_data*> servers;
  for (const auto& s : rig.spans.spans()) {
    if (s.kind == keel::trace::span_kind::server) {
      servers.push_back(&s);
    }
  }
  REQUIRE(servers.size() == 2);
  CHECK(servers[0]->context.state == "a=1,b=2");
  CHECK(keel::trace::to_hex(servers[0]->parent.data(), 8) == "00f067aa0ba902b7");
  // Two traceparent fields: a new trace, not a child of either.
  CHECK(servers[1]->parent == keel::trace::span_id{});
  CHECK(keel::trace::to_hex(servers[1]->context.trace.data(), 16) !=
        "4bf92f3577b34da6a3ce929d0e0e4736");
}

TEST_CASE("keel serve without a tracer passes the caller's traceparent on", "[gateway][trace]") {
  gateway_rig rig(one_entry);
  const std::string tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  REQUIRE(rig.send("POST", "/v1/chat/completions", hello, {{"traceparent", tp}}).status == 200);
  REQUIRE(rig.send("POST", "/v1/chat/completions", hello).status == 200);
  CHECK(rig.mock.stats().model("m").traceparents == std::vector<std::string>{tp});
}

namespace {

// A request with one tool, and the conversation after the model called it.
const std::string with_tool = R"({"model": "m", "messages": [{"role": "user", "content": "Paris?"}],
  "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]})";

std::string after_tool(const std::string& id) {
  return std::string(R"({"model": "m", )") +
         R"("messages": [{"role": "user", "content": [{"type": "text", "text": "Paris?"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]},
    {"role": "assistant", "content": null, "tool_calls": [{"id": ")" +
         id + R"(", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\":\"\"}"}}]},
    {"role": "tool", "tool_call_id": ")" +
         id + R"(", "content": "18C"}],
  "tools": [{"type": "function", "function": {"name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]})";
}

}  // namespace

TEST_CASE("tool calls and images pass through keel serve to each provider and back",
          "[gateway][tools]") {
  struct route {
    const char* config;
    const char* call_marker;    // how the provider's request names the tool
    const char* result_marker;  // how it carries the tool's result
    const char* image_marker;   // how it carries the image
  };
  const std::vector<route> routes = {
      {R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}]})",
       R"("type":"function")", R"("role":"tool")", R"("image_url")"},
      {R"({"config_list": [{"api_type": "anthropic", "model": "m",
           "api_key": "sk-ant-test-KEY0001"}]})",
       R"("input_schema")", R"("tool_result")", R"("media_type":"image/png")"},
      {R"({"config_list": [{"api_type": "bedrock", "model": "m", "aws_region": "us-east-1"}]})",
       R"("toolSpec")", R"("toolResult")", R"("format":"png")"},
  };
  for (const route& rt : routes) {
    INFO(rt.config);
    gateway_rig rig(rt.config);
    // The model calls the tool: an OpenAI completion with tool_calls, whatever the provider.
    const keel::http::response res = rig.send("POST", "/v1/chat/completions", with_tool);
    REQUIRE(res.status == 200);
    CHECK(rig.mock.stats().model("m").last_body.find(rt.call_marker) != std::string::npos);
    const json j = json::parse(res.body);
    const json& msg = j["choices"][0]["message"];
    CHECK(j["choices"][0]["finish_reason"] == "tool_calls");
    CHECK(msg["content"].is_null());
    REQUIRE(msg["tool_calls"].size() == 1);
    const json& call = msg["tool_calls"][0];
    CHECK(call["type"] == "function");
    CHECK(call["function"]["name"] == "get_weather");
    // The mock's arguments are the smallest instance of the schema.
    CHECK(json::parse(call["function"]["arguments"].get<std::string>()) == json{{"city", ""}});
    const std::string id = call["id"].get<std::string>();
    CHECK_FALSE(id.empty());

    // The caller sends the result back (with an image): the provider gets it in its own shape
    // and answers in text.
    const keel::http::response next = rig.send("POST", "/v1/chat/completions", after_tool(id));
    REQUIRE(next.status == 200);
    const std::string& sent = rig.mock.stats().model("m").last_body;
    CHECK(sent.find(rt.result_marker) != std::string::npos);
    CHECK(sent.find(rt.image_marker) != std::string::npos);
    CHECK(sent.find(id) != std::string::npos);
    const json answer = json::parse(next.body);
    CHECK(answer["choices"][0]["finish_reason"] == "stop");
    CHECK(answer["choices"][0]["message"]["content"] == "mock answer to: tool result 18C");

    // Streamed: the call arrives as OpenAI tool_calls deltas whose pieces join to the call.
    std::string stream_body = with_tool;
    stream_body.insert(1, R"("stream": true, )");
    const keel::http::response s = rig.send("POST", "/v1/chat/completions", stream_body);
    REQUIRE(s.status == 200);
    const auto ev = events_of(s.body);
    REQUIRE(ev.size() >= 4);
    CHECK(ev.back() == "[DONE]");
    INFO(s.body);
    std::string name;
    std::string args;
    std::string stream_id;
    std::string finish;
    for (std::size_t i = 0; i + 1 < ev.size(); ++i) {
      const json chunk = json::parse(ev[i]);
      const json& choice = chunk["choices"][0];
      if (!choice["finish_reason"].is_null()) {
        finish = choice["finish_reason"].get<std::string>();
      }
      if (!choice["delta"].contains("tool_calls")) {
        continue;
      }
      const json& piece = choice["delta"]["tool_calls"][0];
      CHECK(piece["index"] == 0);
      if (piece.contains("id")) {
        stream_id += piece["id"].get<std::string>();
        CHECK(piece["type"] == "function");
      }
      if (piece["function"].contains("name")) {
        name += piece["function"]["name"].get<std::string>();
      }
      args += piece["function"]["arguments"].get<std::string>();
    }
    CHECK(name == "get_weather");
    CHECK_FALSE(stream_id.empty());
    CHECK(json::parse(args) == json{{"city", ""}});
    CHECK(finish == "tool_calls");
  }
}

TEST_CASE("what a route's provider cannot take is a 400 naming it", "[gateway][tools]") {
  gateway_rig rig(
      R"({"config_list": [{"api_type": "bedrock", "model": "m", "aws_region": "us-east-1"}]})");
  const keel::http::response res = rig.send("POST", "/v1/chat/completions", R"({"model": "m",
      "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})");
  CHECK(res.status == 400);
  const json j = json::parse(res.body);
  CHECK(j["error"]["type"] == "invalid_request_error");
  CHECK_THAT(j["error"]["message"].get<std::string>(), Catch::Contains("http(s) URL"));
  // Nothing was sent: the request could not be written in Bedrock's shape.
  CHECK(rig.mock.stats().model("m").requests == 0);

  // With a fallback that can take it, the route answers from the fallback at once.
  gateway_rig both(R"({"config_list": [
      {"api_type": "bedrock", "model": "b", "aws_region": "us-east-1"},
      {"api_type": "openai", "model": "o", "api_key": "sk-test-KEY000001"}]})");
  const keel::http::response fell = both.send("POST", "/v1/chat/completions", R"({"model": "m",
      "messages": [{"role": "user", "content": [{"type": "text", "text": "cat?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]})");
  CHECK(fell.status == 200);
  CHECK(json::parse(fell.body)["choices"][0]["message"]["content"] == "mock answer to: cat?");
  CHECK(both.mock.stats().model("b").requests == 0);
  CHECK(both.mock.stats().model("o").requests == 1);
  CHECK(both.mock.stats().model("o").last_body.find("https://example.com/cat.png") !=
        std::string::npos);
}

TEST_CASE("structured output through keel serve is JSON content from every provider",
          "[gateway][response_format]") {
  const char* configs[] = {
      R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}]})",
      R"({"config_list": [{"api_type": "anthropic", "model": "m",
          "api_key": "sk-ant-test-KEY0001"}]})",
      R"({"config_list": [{"api_type": "bedrock", "model": "anthropic.m",
          "aws_region": "us-east-1"}]})",
  };
  const std::string body = R"({"model": "m", "messages": [{"role": "user", "content": "w?"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema":
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}})";
  for (const char* config : configs) {
    INFO(config);
    gateway_rig rig(config);
    const keel::http::response res = rig.send("POST", "/v1/chat/completions", body);
    REQUIRE(res.status == 200);
    const json j = json::parse(res.body);
    const json& choice = j["choices"][0];
    CHECK(choice["finish_reason"] == "stop");
    CHECK_FALSE(choice["message"].contains("tool_calls"));
    // The mock answers with the smallest instance of the schema, as a tool call's input for
    // Anthropic and Bedrock (the answer tool) and as content for OpenAI.
    CHECK(json::parse(choice["message"]["content"].get<std::string>()) == json{{"city", ""}});

    std::string stream_body = body;
    stream_body.insert(1, R"("stream": true, )");
    const keel::http::response s = rig.send("POST", "/v1/chat/completions", stream_body);
    REQUIRE(s.status == 200);
    const auto ev = events_of(s.body);
    REQUIRE(ev.size() >= 3);
    CHECK(ev.back() == "[DONE]");
    std::string content;
    std::string finish;
    for (std::size_t i = 0; i + 1 < ev.size(); ++i) {
      const json chunk = json::parse(ev[i]);
      if (chunk["choices"].empty()) {
        continue;  // a usage chunk
      }
      const json& c = chunk["choices"][0];
      CHECK_FALSE(c["delta"].contains("tool_calls"));
      if (c["delta"].contains("content") && c["delta"]["content"].is_string()) {
        content += c["delta"]["content"].get<std::string>();
      }
      if (!c["finish_reason"].is_null()) {
        finish = c["finish_reason"].get<std::string>();
      }
    }
    CHECK(json::parse(content) == json{{"city", ""}});
    CHECK(finish == "stop");
  }
}

TEST_CASE("a caller that sets no max_tokens gets no limit sent, but to Anthropic",
          "[gateway][max_tokens]") {
  struct route {
    const char* config;
    bool has_limit;
  };
  for (const route& rt : {route{R"({"config_list": [{"api_type": "openai", "model": "m",
                 "api_key": "sk-test-KEY000001"}]})",
                                false},
                          route{R"({"config_list": [{"api_type": "anthropic", "model": "m",
                 "api_key": "sk-ant-test-KEY0001"}]})",
                                true},
                          route{R"({"config_list": [{"api_type": "bedrock", "model": "m",
                 "aws_region": "us-east-1"}]})",
                                false}}) {
    INFO(rt.config);
    gateway_rig rig(rt.config);
    REQUIRE(rig.send("POST", "/v1/chat/completions", hello).status == 200);
    const std::string& sent = rig.mock.stats().model("m").last_body;
    INFO(sent);
    CHECK((sent.find("\"max_tokens\":4096") != std::string::npos) == rt.has_limit);
    CHECK(sent.find("max_completion_tokens") == std::string::npos);
    CHECK(sent.find("maxTokens") == std::string::npos);
    if (!rt.has_limit) {
      CHECK(sent.find("\"max_tokens\"") == std::string::npos);
    }
  }
}

TEST_CASE("a caller keel serve refuses is answered before its body is read", "[gateway][review]") {
  // Before, the whole body (up to max_request_body) was read, and 100 Continue sent, before the
  // key was checked: 60 connections without a key held 250 MB.
  gateway_rig rig(one_entry, two_callers());
  for (const char* auth : {"", "Authorization: Bearer nope\r\n"}) {
    INFO(auth);
    const std::string got =
        exchange_raw(rig, std::string("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n") + auth +
                              "Expect: 100-continue\r\nContent-Length: 3000000\r\n\r\n");
    CHECK(got.rfind("HTTP/1.1 401", 0) == 0);
    CHECK(got.find("100 Continue") == std::string::npos);
    CHECK(got.find(auth[0] == 0 ? "missing_api_key" : "invalid_api_key") != std::string::npos);
  }
  // A target that reads no body answers from the head too.
  const std::string health =
      exchange_raw(rig, "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3000000\r\n\r\n");
  CHECK(health.rfind("HTTP/1.1 405", 0) == 0);
  CHECK(health.find("\r\nAllow: GET, HEAD\r\n") != std::string::npos);
  // A known caller's body is read and answered.
  const auto ok =
      run_one(rig.ctx, rig.http.send(completion_as(rig.gateway.base_url(), "sk-caller-b")));
  REQUIRE_FALSE(ok.error);
  CHECK(ok.value->status == 200);
}

TEST_CASE("HTTP keel serve cannot parse gets a 400 in OpenAI's shape, not a closed connection",
          "[gateway][review]") {
  gateway_rig rig(one_entry);
  for (const char* bad :
       {"HELLO WORLD\r\n\r\n", "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n"
        "Content-Length: 3\r\n\r\n{}"}) {
    INFO(bad);
    const std::string got = exchange_raw(rig, bad);
    REQUIRE(got.rfind("HTTP/1.1 400", 0) == 0);
    const json j = json::parse(got.substr(got.find("\r\n\r\n") + 4));
    CHECK(j["error"]["code"] == "invalid_http");
    CHECK(j["error"]["type"] == "invalid_request_error");
  }
}

TEST_CASE("a chunk extension or trailer cannot grow keel serve's buffer without bound",
          "[gateway][review]") {
  // Beast keeps a chunk's size line and the trailer until each is whole, and neither limit
  // counts them: 300 MB of trailer grew the gateway to 823 MB.
  gateway_rig rig(one_entry);
  const std::string head =
      "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  const std::string trailer = head + "2\r\n{}\r\n0\r\n" + "X-T: " + std::string(300000, 'a');
  const std::string extension = head + "2;a=" + std::string(300000, 'b');
  for (const std::string* bytes : {&trailer, &extension}) {
    const std::string got = exchange_raw(rig, *bytes);
    REQUIRE(got.rfind("HTTP/1.1 400", 0) == 0);
    CHECK(got.find("invalid_http") != std::string::npos);
  }
}

TEST_CASE("a HEAD is answered as a GET, with the head only", "[gateway][review]") {
  // Before, HEAD /healthz got a 405 with a body, which a keep-alive client reads as the start of
  // its next answer (load balancers probe with HEAD).
  gateway_rig rig(one_entry);
  const std::string got =
      exchange_raw(rig, "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  REQUIRE(got.rfind("HTTP/1.1 200", 0) == 0);
  // Content-Length says what a GET would get; nothing follows the head.
  const std::size_t at = got.find("Content-Length: ");
  REQUIRE(at != std::string::npos);
  CHECK(std::stoul(got.substr(at + 16)) == rig.send("GET", "/healthz").body.size());
  CHECK(got.size() == got.find("\r\n\r\n") + 4);
  // Another method is refused with the methods the target takes.
  const std::string put =
      exchange_raw(rig, "PUT /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  REQUIRE(put.rfind("HTTP/1.1 405", 0) == 0);
  CHECK(put.find("Allow: GET, HEAD\r\n") != std::string::npos);
}

TEST_CASE("a drain does not cut off an answer still being written", "[gateway][review]") {
  // Before, the connection counted as idle once the answer was made, and the drain closed it
  // mid-write: the caller got 2.8 MB of a 10 MB answer. A 12 MB /metrics page stands in for a
  // long completion (the mock's answers are short).
  keel::gateway::server_options so;
  const std::string page(12u << 20, '#');
  so.metrics = [&] { return page; };
  gateway_rig rig(one_entry, so);
  asio::ip::tcp::socket sock(rig.ctx);
  sock.open(asio::ip::tcp::v4());
  sock.set_option(asio::socket_base::receive_buffer_size(4096));
  sock.connect({asio::ip::make_address("127.0.0.1"), rig.gateway.port()});
  const std::string request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  bool sent = false;
  asio::async_write(sock, asio::buffer(request), [&](auto, auto) { sent = true; });
  // The answer is made and its write has begun (the caller reads nothing yet).
  REQUIRE(run_real(rig.ctx, [&] { return sent && rig.gateway.stats().requests == 1; }));
  bool drained = false;
  asio::co_spawn(
      rig.ctx,
      [&]() -> asio::awaitable<void> {
        co_await rig.gateway.drain(std::chrono::seconds(30));
        drained = true;
      },
      asio::detached);
  std::string got;
  bool done = false;
  asio::co_spawn(
      rig.ctx,
      [&]() -> asio::awaitable<void> {
        std::vector<char> buf(1 << 16);
        for (;;) {
          auto [ec, n] =
              co_await sock.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
          if (ec) {
            break;
          }
          got.append(buf.data(), n);
        }
        done = true;
      },
      asio::detached);
  REQUIRE(run_real(rig.ctx, [&] { return done && drained; }));
  const std::size_t end = got.find("\r\n\r\n");
  REQUIRE(end != std::string::npos);
  const std::size_t at = got.find("Content-Length: ");
  REQUIRE(at < end);
  const std::size_t length = std::stoul(got.substr(at + 16));
  CHECK(length == page.size());
  CHECK(got.size() - end - 4 == length);
}

TEST_CASE("a caller that hangs up on a stream cancels its call, before or after the first delta",
          "[gateway][review]") {
  // Before, nothing noticed until a write failed: a stream waiting for its first token went on
  // (and retried) up to the deadline for a caller that was gone, and a stalled stream was read
  // until its idle timeout.
  for (const auto fault :
       {keel::testing::fault_kind::stall, keel::testing::fault_kind::stream_stall}) {
    INFO(static_cast<int>(fault));
    gateway_rig rig(R"({
        "config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-test-KEY000001"}],
        "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.001}},
                   "stream": {"first_token_timeout": 60, "idle_timeout": 60}}})");
    keel::testing::stream_settings st;
    st.fault_after_chunks = 1;
    rig.mock.set_plan("m", keel::testing::fault_plan().with_stream(st).with_script({fault}));
    asio::ip::tcp::socket sock(rig.ctx);
    sock.connect({asio::ip::make_address("127.0.0.1"), rig.gateway.port()});
    const std::string request =
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " +
        std::to_string(streamed.size()) + "\r\n\r\n" + streamed;
    asio::write(sock, asio::buffer(request));
    // The provider has the request (and, mid-stream, the caller has the first delta).
    REQUIRE(run_real(rig.ctx, [&] { return rig.mock.stats().model("m").requests == 1; }));
    if (fault == keel::testing::fault_kind::stream_stall) {
      std::string got;
      std::array<char, 4096> buf{};
      bool reading = false;
      REQUIRE(run_real(rig.ctx, [&] {
        if (got.find("\"content\":\"m") != std::string::npos) {
          return !reading;  // no read left pending on these locals
        }
        if (!reading) {
          reading = true;
          sock.async_read_some(asio::buffer(buf), [&](boost::system::error_code ec, std::size_t n) {
            got.append(buf.data(), n);
            reading = ec.failed();  // a failure stops the reads (and the wait times out)
          });
        }
        return false;
      }));
    }
    sock.close();
    // The call is cancelled: the provider's connection is closed and nothing is retried.
    REQUIRE(run_real(rig.ctx, [&] {
      return rig.mock.stats().total.abandoned == 1 && rig.gateway.stats().in_flight == 0;
    }));
    CHECK(rig.mock.stats().model("m").requests == 1);
    CHECK(rig.gateway.stats().completions == 0);
  }
}
