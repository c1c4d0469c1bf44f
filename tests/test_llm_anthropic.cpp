// Tests for keel/llm/anthropic.hpp: request bodies, success parsing and error classification.
#include <keel/classify.hpp>
#include <keel/llm/anthropic.hpp>

#include "llm_support.hpp"

#include <catch2/catch.hpp>

#include <string>

using namespace std::chrono_literals;
using keel::llm::errc;
using json = nlohmann::json;

namespace {
using keel_test::llm::reply;
using keel_test::llm::t0;

keel::llm::provider_error error_of(const keel::http::response& r) {
  return keel_test::llm::error_of(&keel::llm::anthropic::parse_response, r);
}

std::string err_body(const char* type, const char* message) {
  return json{{"type", "error"}, {"error", {{"type", type}, {"message", message}}}}.dump();
}
}  // namespace

TEST_CASE("anthropic build_request makes the messages call", "[llm][anthropic]") {
  keel::llm::chat_request req("claude-3-5-haiku-latest", {{"user", "Hi"}}, 256);
  req.system = "Be brief.";
  req.temperature = 0.0;
  req.metadata = {{"user_id", "u1"}};
  keel::llm::endpoint ep(keel::llm::provider_kind::anthropic, "", "sk-ant-secret");
  // The current version, as @anthropic-ai/sdk 1.x sends it: the key as a bearer token, and no
  // sampling parameters (2026-10-21 removed them).
  auto r = keel::llm::anthropic::build_request(req, ep);
  CHECK(r.method == "POST");
  CHECK(r.url == "https://api.anthropic.com/v1/messages");
  CHECK(r.headers.find("authorization") == std::optional<std::string_view>("Bearer sk-ant-secret"));
  CHECK(r.headers.find("anthropic-version") == std::optional<std::string_view>("2026-10-21"));
  CHECK_FALSE(r.headers.find("x-api-key").has_value());
  CHECK(json::parse(r.body) == json::parse(R"({
    "model": "claude-3-5-haiku-latest", "max_tokens": 256, "system": "Be brief.",
    "messages": [{"role": "user", "content": "Hi"}], "metadata": {"user_id": "u1"}})"));
  // An earlier version, configured: x-api-key, and temperature is sent.
  ep.anthropic_version = "2023-06-01";
  r = keel::llm::anthropic::build_request(req, ep);
  CHECK(r.headers.find("x-api-key") == std::optional<std::string_view>("sk-ant-secret"));
  CHECK(r.headers.find("anthropic-version") == std::optional<std::string_view>("2023-06-01"));
  CHECK_FALSE(r.headers.find("authorization").has_value());
  CHECK(json::parse(r.body) == json::parse(R"({
    "model": "claude-3-5-haiku-latest", "max_tokens": 256, "system": "Be brief.",
    "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.0,
    "metadata": {"user_id": "u1"}})"));
}

TEST_CASE("anthropic build_request maps top_p and stop, and sends no seed", "[llm][anthropic]") {
  keel::llm::chat_request req("claude-3-5-haiku-latest", {{"user", "Hi"}}, 16);
  req.top_p = 0.5;
  req.stop = {"END"};
  req.seed = 7;
  req.token_field = keel::llm::max_tokens_field::max_completion_tokens;  // OpenAI's only
  keel::llm::endpoint ep(keel::llm::provider_kind::anthropic, "", "k");
  ep.anthropic_version = "2025-01-01";  // before 2026-10-21: top_p is still sent
  CHECK(json::parse(keel::llm::anthropic::build_request(req, ep).body) ==
        json::parse(R"({"model": "claude-3-5-haiku-latest", "max_tokens": 16,
    "messages": [{"role": "user", "content": "Hi"}], "top_p": 0.5, "stop_sequences": ["END"]})"));
  // From the probes: OpenAI's ranges and shapes that Anthropic refuses. Temperature above 1 is
  // sent as 1; metadata keeps only user_id (else OpenAI's `user`); a blank stop sequence fails
  // the entry before anything is sent.
  req.temperature = 1.5;
  req.metadata = {{"team", "support"}};
  req.extra_fields = {{"user", "u-7"}, {"frequency_penalty", 1}};
  const json mapped = json::parse(keel::llm::anthropic::build_request(req, ep).body);
  CHECK(mapped.at("temperature") == 1.0);
  CHECK(mapped.at("metadata") == json{{"user_id", "u-7"}});
  CHECK_FALSE(mapped.contains("frequency_penalty"));
  req.metadata = {{"user_id", "u-1"}, {"team", "support"}};
  CHECK(json::parse(keel::llm::anthropic::build_request(req, ep).body).at("metadata") ==
        json{{"user_id", "u-1"}});
  req.metadata = {{"team", "support"}};
  req.extra_fields = nullptr;
  CHECK_FALSE(json::parse(keel::llm::anthropic::build_request(req, ep).body).contains("metadata"));
  for (const std::vector<std::string>& stop : {std::vector<std::string>{"\n"}, {"END", ""}}) {
    req.stop = stop;
    try {
      (void)keel::llm::anthropic::build_request(req, ep);
      FAIL("sent");
    } catch (const keel::llm::provider_error& e) {
      CHECK(e.llm_code() == keel::llm::errc::bad_request);
      CHECK_THAT(std::string(e.what()), Catch::Contains("stop["));
    }
  }
  CHECK(keel::llm::anthropic_bearer_version("2026-10-21"));
  CHECK(keel::llm::anthropic_bearer_version("2027-01-05"));
  CHECK_FALSE(keel::llm::anthropic_bearer_version("2026-10-20"));
}

TEST_CASE("anthropic parse_response joins text blocks and reads usage", "[llm][anthropic]") {
  auto r = keel::llm::anthropic::parse_response(
      reply(200,
            R"({"id":"msg_1","type":"message","role":"assistant","model":"claude-x",
               "content":[{"type":"text","text":"Hello"},{"type":"thinking","thinking":"..."},
                          {"type":"text","text":" world"}],
               "stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":2}})",
            {{"request-id", "req_a"}, {"anthropic-ratelimit-requests-remaining", "49"}}),
      t0);
  CHECK(r.text == "Hello world");
  CHECK(r.finish_reason == "end_turn");
  CHECK(r.model == "claude-x");
  CHECK(r.usage.input == 10);
  CHECK(r.usage.output == 2);
  CHECK(r.request_id == "req_a");
  CHECK(r.rate_limits.remaining_requests == 49.0);

  auto m1 = error_of(reply(200, R"({"content":"x"})"));
  CHECK(m1.llm_code() == errc::malformed_response);
  CHECK(std::string(m1.what()).find("content is not an array") != std::string::npos);
  auto m2 = error_of(reply(200, R"({"content":[{"type":"text"}]})"));
  CHECK(std::string(m2.what()).find("content[0].text missing") != std::string::npos);
  auto m3 = error_of(reply(200, R"({"stop_reason":"end_turn"})"));
  CHECK(std::string(m3.what()).find("content missing") != std::string::npos);
  CHECK(error_of(reply(200, "{truncated")).llm_code() == errc::malformed_response);
  CHECK(error_of(reply(200, R"({"content":[],"stop_reason":"refusal"})")).llm_code() ==
        errc::content_filtered);
  const auto refused = error_of(
      reply(200, R"({"content":[{"type":"text","text":"Sure, here"}],"stop_reason":"refusal"})"));
  REQUIRE(refused.info().filtered_reply != nullptr);
  CHECK(refused.info().filtered_reply->text == "Sure, here");  // the text before the refusal
  CHECK(refused.info().filtered_reply->finish_reason == "refusal");
}

TEST_CASE("anthropic errors are classified per the provider table", "[llm][anthropic]") {
  struct row {
    int status;
    std::string body;
    errc code;
  };
  const row table[] = {
      {429, err_body("rate_limit_error", "Number of requests has exceeded your rate limit"),
       errc::rate_limited},
      {529, err_body("overloaded_error", "Overloaded"), errc::overloaded},
      {500, err_body("api_error", "Internal server error"), errc::server_error},
      {504, err_body("timeout_error", "timeout"), errc::timeout},
      {400, err_body("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
       errc::context_length_exceeded},
      {400, err_body("invalid_request_error", "Your credit balance is too low"),
       errc::quota_exhausted},
      {400, err_body("invalid_request_error", "messages: field required"), errc::bad_request},
      {401, err_body("authentication_error", "invalid x-api-key"), errc::auth},
      {403, err_body("permission_error", "no access"), errc::auth},
      {404, err_body("not_found_error", "model: x"), errc::not_found},
      {413, err_body("request_too_large", "Request exceeds the maximum allowed size"),
       errc::request_too_large},
      {402, err_body("billing_error", "billing"), errc::quota_exhausted},
      {503, "upstream connect error", errc::overloaded},
      {529, "", errc::overloaded},
  };
  for (const auto& t : table) {
    INFO(t.status << " " << t.body);
    auto e = error_of(reply(t.status, t.body, {{"request-id", "req_x"}, {"retry-after", "4"}}));
    CHECK(e.llm_code() == t.code);
    CHECK(e.status() == t.status);
    CHECK(e.provider() == "anthropic");
    CHECK(e.request_id() == "req_x");
    CHECK(e.retry_after() == std::optional<std::chrono::nanoseconds>(4s));
  }
  auto e = error_of(reply(429, err_body("rate_limit_error", "slow")));
  CHECK(e.provider_code() == "rate_limit_error");
  CHECK(keel::classify(std::make_exception_ptr(e)).condition == keel::condition::throttled);
}

TEST_CASE("anthropic classifies a deeply nested error body by its status without parsing it",
          "[llm][anthropic]") {
  // Regression: the error object was copied, and nlohmann::json copies recursively, so a few
  // hundred KB of nesting from a broken or hostile server overflowed the stack. Since issue 13
  // a body nested past keel::llm::max_json_depth is not parsed at all: the status classifies it.
  const std::size_t depth = 500000;
  const std::string body = R"({"type":"error","error":{"type":"overloaded_error","x":)" +
                           std::string(depth, '[') + std::string(depth, ']') + "}}";
  auto e = error_of(reply(529, body));
  CHECK(e.llm_code() == errc::overloaded);
  CHECK(e.provider_code().empty());
}
