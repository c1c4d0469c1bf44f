// Tests for keel/llm/bedrock.hpp: Converse request bodies, success parsing, error classification.
#include <keel/classify.hpp>
#include <keel/llm/bedrock.hpp>

#include "llm_support.hpp"

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>

using namespace std::chrono_literals;
using keel::llm::errc;
using json = nlohmann::json;

namespace {
using keel_test::llm::reply;
using keel_test::llm::t0;

keel::llm::provider_error error_of(const keel::http::response& r) {
  return keel_test::llm::error_of(&keel::llm::bedrock::parse_response, r);
}
}  // namespace

TEST_CASE("bedrock build_request makes the Converse call", "[llm][bedrock]") {
  keel::llm::chat_request req("anthropic.claude-3-haiku-20240307-v1:0", {{"user", "Hi"}}, 300);
  req.system = "Be brief.";
  req.temperature = 0.2;
  keel::llm::endpoint ep(keel::llm::provider_kind::bedrock, "", "", "eu-west-1");
  auto r = keel::llm::bedrock::build_request(req, ep);
  CHECK(r.method == "POST");
  CHECK(r.url ==
        "https://bedrock-runtime.eu-west-1.amazonaws.com/model/"
        "anthropic.claude-3-haiku-20240307-v1%3A0/converse");
  CHECK_FALSE(r.headers.find("authorization").has_value());
  CHECK(json::parse(r.body) == json::parse(R"({
    "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
    "system": [{"text": "Be brief."}],
    "inferenceConfig": {"maxTokens": 300, "temperature": 0.2}})"));
  req.top_p = 0.8;
  req.stop = {"a", "b"};
  req.seed = 3;  // Converse has no seed: not sent
  CHECK(json::parse(keel::llm::bedrock::build_request(req, ep).body).at("inferenceConfig") ==
        json::parse(R"({"maxTokens": 300, "temperature": 0.2, "topP": 0.8,
                        "stopSequences": ["a", "b"]})"));

  req.temperature = 1.7;  // OpenAI's scale: Converse's maximum is 1
  CHECK(json::parse(keel::llm::bedrock::build_request(req, ep).body)
            .at("inferenceConfig")
            .at("temperature") == 1.0);
  req.stop = {" "};
  CHECK_THROWS_AS(keel::llm::bedrock::build_request(req, ep), keel::llm::provider_error);
  req.stop.clear();

  keel::llm::endpoint mock(keel::llm::provider_kind::bedrock, "http://127.0.0.1:9000");
  keel::llm::chat_request arn("arn:aws:bedrock:us-east-1:1:inference-profile/x", {{"user", "q"}});
  CHECK(keel::llm::build_request(arn, mock).url ==
        "http://127.0.0.1:9000/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fx/"
        "converse");
  CHECK_THROWS_AS(keel::llm::bedrock::build_request(
                      req, keel::llm::endpoint(keel::llm::provider_kind::bedrock, "")),
                  std::invalid_argument);
}

TEST_CASE("bedrock merges turns of one role and sends no blank text block", "[llm][bedrock]") {
  // Before: two user turns in a row, or an empty assistant turn, went as they were, and
  // Converse refuses both ("must alternate between user and assistant roles", "is blank").
  keel::llm::chat_request req("m", {{"user", "Here is a document"},
                                    {"user", "Summarise it."},
                                    {"assistant", ""},
                                    {"user", "Shorter."}});
  keel::llm::chat_message with_call("assistant", "");
  with_call.tool_calls.emplace_back("t1", "f", "{}");
  req.messages.push_back(with_call);
  keel::llm::chat_message result("tool", "ok");
  result.tool_call_id = "t1";
  req.messages.push_back(result);
  keel::llm::endpoint ep(keel::llm::provider_kind::bedrock, "", "", "eu-west-1");
  const json messages = json::parse(keel::llm::bedrock::build_request(req, ep).body)["messages"];
  REQUIRE(messages.size() == 3);
  CHECK(messages[0]["role"] == "user");
  CHECK(messages[0]["content"] == json::parse(R"([{"text": "Here is a document"},
      {"text": "Summarise it."}, {"text": "Shorter."}])"));
  CHECK(messages[1]["role"] == "assistant");
  CHECK(messages[1]["content"].size() == 1);  // the toolUse, no blank text
  CHECK(messages[1]["content"][0].contains("toolUse"));
  CHECK(messages[2]["role"] == "user");
  CHECK(messages[2]["content"][0].contains("toolResult"));
  // A blank user turn merged into another keeps no blank block.
  keel::llm::chat_request blank_turn("m", {{"user", "Q"}, {"user", "  "}});
  CHECK(json::parse(keel::llm::bedrock::build_request(blank_turn, ep).body)["messages"] ==
        json::parse(R"([{"role": "user", "content": [{"text": "Q"}]}])"));
}

TEST_CASE("bedrock parse_response reads output, stopReason and usage", "[llm][bedrock]") {
  auto r = keel::llm::parse_response(
      reply(
          200,
          R"({"output":{"message":{"role":"assistant","content":[{"text":"Hi "},{"text":"there"}]}},
               "stopReason":"end_turn","usage":{"inputTokens":5,"outputTokens":2,"totalTokens":7},
               "metrics":{"latencyMs":100}})",
          {{"x-amzn-RequestId", "aws-req-1"}}),
      keel::llm::provider_kind::bedrock, t0);
  CHECK(r.text == "Hi there");
  CHECK(r.finish_reason == "end_turn");
  CHECK(r.usage.input == 5);
  CHECK(r.usage.output == 2);
  CHECK(r.request_id == "aws-req-1");

  auto m = error_of(reply(200, R"({"output":{}})"));
  CHECK(m.llm_code() == errc::malformed_response);
  CHECK(std::string(m.what()).find("output.message missing") != std::string::npos);
  auto m2 = error_of(reply(200, R"({"output":{"message":{"content":[{"text":1}]}}})"));
  CHECK(std::string(m2.what()).find("output.message.content[0].text is not a string") !=
        std::string::npos);
  const auto blocked = error_of(reply(200, R"({"output":{"message":{"content":[{"text":"x"}]}},
                                               "stopReason":"guardrail_intervened"})"));
  CHECK(blocked.llm_code() == errc::content_filtered);
  REQUIRE(blocked.info().filtered_reply != nullptr);
  CHECK(blocked.info().filtered_reply->text == "x");
}

TEST_CASE("bedrock errors are classified by x-amzn-ErrorType or __type", "[llm][bedrock]") {
  struct row {
    int status;
    const char* type;
    const char* message;
    errc code;
  };
  const row table[] = {
      {429, "ThrottlingException", "Too many requests", errc::rate_limited},
      {503, "ServiceUnavailableException", "unavailable", errc::overloaded},
      {500, "InternalServerException", "internal", errc::server_error},
      {408, "ModelTimeoutException", "timed out", errc::timeout},
      {429, "ModelNotReadyException", "not ready", errc::overloaded},
      {400, "ValidationException", "Input is too long for requested model.",
       errc::context_length_exceeded},
      {400, "ValidationException", "prompt has too many tokens", errc::context_length_exceeded},
      {400, "ValidationException", "Malformed input request", errc::bad_request},
      {403, "AccessDeniedException", "denied", errc::auth},
      {404, "ResourceNotFoundException", "no model", errc::not_found},
      {424, "ModelErrorException", "model failed", errc::server_error},
      {400, "ServiceQuotaExceededException", "quota", errc::quota_exhausted},
  };
  for (const auto& t : table) {
    INFO(t.type << " " << t.message);
    // From the header (with the ":..." suffix AWS adds) and a lower-case "message".
    auto h = error_of(reply(t.status, json{{"message", t.message}}.dump(),
                            {{"x-amzn-ErrorType", std::string(t.type) + ":http://internal/"},
                             {"x-amzn-RequestId", "r1"}}));
    CHECK(h.llm_code() == t.code);
    CHECK(h.provider_code() == t.type);
    CHECK(h.provider() == "bedrock");
    CHECK(h.request_id() == "r1");
    // From the body's __type (namespaced) and "Message".
    auto b = error_of(reply(t.status, json{{"__type", std::string("com.amazon.coral#") + t.type},
                                           {"Message", t.message}}
                                          .dump()));
    CHECK(b.llm_code() == t.code);
    CHECK(b.provider_code() == t.type);
  }
  auto throttled = error_of(reply(
      429, "{}", {{"x-amzn-ErrorType", "ThrottlingException"}, {"x-amz-retry-after", "750"}}));
  auto c = keel::classify(std::make_exception_ptr(throttled));
  CHECK(c.condition == keel::condition::throttled);
  CHECK(c.retry_after == std::optional<std::chrono::nanoseconds>(750ms));
  CHECK(error_of(reply(502, "<html>")).llm_code() == errc::server_error);
}
