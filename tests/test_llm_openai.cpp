// Tests for keel/llm/openai.hpp: request bodies, success parsing and error classification.
#include <keel/classify.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/openai.hpp>

#include "llm_support.hpp"

#include <catch2/catch.hpp>

#include <string>

using namespace std::chrono_literals;
using keel::llm::errc;
using json = nlohmann::json;

namespace {
using keel_test::llm::reply;
using keel_test::llm::t0;

// Every error is checked both ways: read into a tree (`keep_raw`), and read by the scanner that
// builds none, which must decline the body and leave the same error to the tree's reading.
keel::llm::provider_error error_of(const keel::http::response& r) {
  auto e = keel_test::llm::error_of(&keel::llm::openai::parse_response, r, true);
  auto fast = keel_test::llm::error_of(&keel::llm::openai::parse_response, r, false);
  CHECK(fast.llm_code() == e.llm_code());
  CHECK(std::string(fast.what()) == e.what());
  return e;
}

// The mapped fields of two replies are the same.
void check_same(const keel::llm::chat_response& a, const keel::llm::chat_response& b) {
  CHECK(a.text == b.text);
  CHECK(a.finish_reason == b.finish_reason);
  CHECK(a.model == b.model);
  CHECK(a.id == b.id);
  CHECK(a.request_id == b.request_id);
  CHECK(a.usage.input == b.usage.input);
  CHECK(a.usage.output == b.usage.output);
  REQUIRE(a.tool_calls.size() == b.tool_calls.size());
  for (std::size_t i = 0; i < a.tool_calls.size(); ++i) {
    CHECK(a.tool_calls[i].id == b.tool_calls[i].id);
    CHECK(a.tool_calls[i].name == b.tool_calls[i].name);
    CHECK(a.tool_calls[i].arguments == b.tool_calls[i].arguments);
  }
}

std::string err_body(const char* type, const char* code, const char* message) {
  json e = {{"type", type}, {"message", message}, {"param", nullptr}};
  e["code"] = code ? json(code) : json(nullptr);
  return json{{"error", e}}.dump();
}
}  // namespace

TEST_CASE("every provider's body sends invalid UTF-8 in a request as U+FFFD", "[llm][openai]") {
  keel::llm::chat_request req("m", {{"user", "caf\xc3\xa9 \xff\"end\""}}, 16);
  req.system = "sys \xc3(";
  req.metadata = json{{"k", "v"}};
  const std::string want_user = "caf\xc3\xa9 \xef\xbf\xbd\"end\"";
  const std::string want_system = "sys \xef\xbf\xbd(";
  // OpenAI's body is written as text (json_writer); Anthropic's is a tree, dumped the same way.
  const json openai =
      json::parse(keel::llm::build_request(
                      req, keel::llm::endpoint(keel::llm::provider_kind::openai, "http://h", "k"))
                      .body);
  CHECK(openai.at("messages").at(0).at("content") == want_system);
  CHECK(openai.at("messages").at(1).at("content") == want_user);
  const json anthropic = json::parse(
      keel::llm::build_request(
          req, keel::llm::endpoint(keel::llm::provider_kind::anthropic, "http://h", "k"))
          .body);
  CHECK(anthropic.at("system") == want_system);
  CHECK(anthropic.at("messages").at(0).at("content").dump().find("\xef\xbf\xbd") !=
        std::string::npos);
}

TEST_CASE("openai build_request maps the generation parameters and the token field",
          "[llm][openai]") {
  keel::llm::chat_request req("gpt-4o-mini", {{"user", "Hi"}}, 64);
  req.top_p = 0.9;
  req.stop = {"END", "\n\n"};
  req.seed = 42;
  const keel::llm::endpoint ep(keel::llm::provider_kind::openai, "http://h", "k");
  json body = json::parse(keel::llm::openai::build_request(req, ep).body);
  CHECK(body.at("top_p") == 0.9);
  CHECK(body.at("stop") == json::array({"END", "\n\n"}));
  CHECK(body.at("seed") == 42);
  CHECK(body.at("max_tokens") == 64);
  CHECK_FALSE(body.contains("max_completion_tokens"));
  // Reasoning models reject max_tokens (issue 13): the automatic field follows the model family.
  for (const char* model : {"o1", "o3-mini", "o4-mini-2025-04-16", "gpt-5", "openai/gpt-5-nano"}) {
    CAPTURE(model);
    CHECK(keel::llm::is_openai_reasoning_model(model));
    req.model = model;
    body = json::parse(keel::llm::openai::build_request(req, ep).body);
    CHECK(body.at("max_completion_tokens") == 64);
    CHECK_FALSE(body.contains("max_tokens"));
  }
  for (const char* model : {"gpt-4o", "gpt-4.1-mini", "llama-3-o1", "omni"}) {
    CAPTURE(model);
    CHECK_FALSE(keel::llm::is_openai_reasoning_model(model));
  }
  // Configured either way.
  req.model = "o3-mini";
  req.token_field = keel::llm::max_tokens_field::max_tokens;
  CHECK(json::parse(keel::llm::openai::build_request(req, ep).body).contains("max_tokens"));
  req.model = "gpt-4o";
  req.token_field = keel::llm::max_tokens_field::max_completion_tokens;
  CHECK(json::parse(keel::llm::openai::build_request(req, ep).body).at("max_completion_tokens") ==
        64);
}

TEST_CASE("openai build_request makes the chat completions call", "[llm][openai]") {
  keel::llm::chat_request req("gpt-4o-mini", {{"user", "Hi"}, {"assistant", "Hello"}}, 64);
  req.system = "Be brief.";
  req.temperature = 0.5;
  req.metadata = {{"job", "42"}};
  req.response_format = json{{"type", "object"}, {"properties", {{"a", {{"type", "string"}}}}}};
  keel::llm::endpoint ep(keel::llm::provider_kind::openai, "http://127.0.0.1:8080/", "sk-test");
  auto r = keel::llm::openai::build_request(req, ep);
  CHECK(r.method == "POST");
  CHECK(r.url == "http://127.0.0.1:8080/v1/chat/completions");
  CHECK(r.headers.find("Authorization") == std::optional<std::string_view>("Bearer sk-test"));
  CHECK(r.headers.find("content-type") == std::optional<std::string_view>("application/json"));
  const json expected = json::parse(R"({
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello"}],
    "max_tokens": 64,
    "temperature": 0.5,
    "metadata": {"job": "42"},
    "response_format": {"type": "json_schema", "json_schema": {"name": "response", "strict": true,
        "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}
  })");
  CHECK(json::parse(r.body) == expected);

  // Extra fields follow keel's own, verbatim; one keel writes itself is not sent twice.
  req.extra_fields = {{"frequency_penalty", 0.5},
                      {"top_k", 20},
                      {"model", "other"},
                      {"stream", true},
                      {"temperature", 2}};
  const std::string with_extra = keel::llm::openai::build_request(req, ep).body;
  json expected_extra = expected;
  expected_extra["frequency_penalty"] = 0.5;
  expected_extra["top_k"] = 20;
  CHECK(json::parse(with_extra) == expected_extra);  // a repeated key would take the last value
  CHECK(with_extra.find("\"model\"", with_extra.find("\"model\"") + 1) == std::string::npos);
  CHECK(with_extra.find("\"stream\"") == std::string::npos);
  const std::string stream_body = keel::llm::build_stream_request(req, ep).body;
  CHECK(json::parse(stream_body).at("stream") == true);
  CHECK(stream_body.find("\"stream\"", stream_body.find("\"stream\"") + 1) == std::string::npos);
  // Anthropic and Bedrock have no such fields and do not get them.
  for (const auto kind : {keel::llm::provider_kind::anthropic, keel::llm::provider_kind::bedrock}) {
    const auto other = keel::llm::build_request(
        req, keel::llm::endpoint(kind, "http://127.0.0.1:8080", "sk-test", "eu-west-1"));
    CHECK(other.body.find("frequency_penalty") == std::string::npos);
    CHECK(other.body.find("top_k") == std::string::npos);
  }

  keel::llm::chat_request plain("gpt-4o", {{"user", "x"}});
  auto p =
      keel::llm::build_request(plain, keel::llm::endpoint(keel::llm::provider_kind::openai, ""));
  CHECK(p.url == "https://api.openai.com/v1/chat/completions");
  // The OpenAI SDKs' way of writing a base URL, with the version: not doubled.
  for (const char* base : {"http://h:8000/v1", "http://h:8000/v1/", "http://h:8000"}) {
    CAPTURE(base);
    const auto v = keel::llm::build_request(
        plain, keel::llm::endpoint(keel::llm::provider_kind::openai, base, "sk-test"));
    CHECK(v.url == "http://h:8000/v1/chat/completions");
  }
  // A query in the base URL (Azure's api-version, a gateway's key) stays at the end.
  for (const char* base :
       {"http://h/openai/v1?api-version=2024-06-01", "http://h/openai/v1/?api-version=2024-06-01",
        "http://h/openai?api-version=2024-06-01"}) {
    CAPTURE(base);
    const auto v = keel::llm::build_request(
        plain, keel::llm::endpoint(keel::llm::provider_kind::openai, base, "sk-test"));
    CHECK(v.url == "http://h/openai/v1/chat/completions?api-version=2024-06-01");
    CHECK(keel::llm::build_stream_request(
              plain, keel::llm::endpoint(keel::llm::provider_kind::openai, base, "sk-test"))
              .url == v.url);
  }
  for (auto kind : {keel::llm::provider_kind::anthropic, keel::llm::provider_kind::bedrock}) {
    const keel::llm::endpoint with_query(kind, "http://h:9/p/?k=v&x=1", "sk-test", "us-east-1");
    const std::string whole = keel::llm::build_request(plain, with_query).url;
    const std::string streamed = keel::llm::build_stream_request(plain, with_query).url;
    CAPTURE(whole, streamed);
    if (kind == keel::llm::provider_kind::anthropic) {
      CHECK(whole == "http://h:9/p/v1/messages?k=v&x=1");
      CHECK(streamed == whole);
    } else {
      CHECK(whole == "http://h:9/p/model/gpt-4o/converse?k=v&x=1");
      CHECK(streamed == "http://h:9/p/model/gpt-4o/converse-stream?k=v&x=1");
    }
  }
  CHECK(json::parse(p.body) ==
        json::parse(R"({"model":"gpt-4o","messages":[{"role":"user","content":"x"}],
                        "max_tokens":1024})"));
}

TEST_CASE("openai parse_response reads text, usage, ids and rate limits", "[llm][openai]") {
  auto r = keel::llm::openai::parse_response(
      reply(200,
            R"({"id":"chatcmpl-1","model":"gpt-4o-mini-2024","choices":[{"index":0,
               "message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],
               "usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}})",
            {{"x-request-id", "req_1"}, {"x-ratelimit-remaining-requests", "99"}}),
      t0);
  CHECK(r.text == "Hello!");
  CHECK(r.finish_reason == "stop");
  CHECK(r.model == "gpt-4o-mini-2024");
  CHECK(r.usage.input == 12);
  CHECK(r.usage.output == 3);
  CHECK(r.request_id == "req_1");
  CHECK(r.rate_limits.remaining_requests == 99.0);
  CHECK(r.raw["id"] == "chatcmpl-1");
}

TEST_CASE("openai parse_response without raw reads the same fields as the tree", "[llm][openai]") {
  // Bodies the scanner takes, and valid bodies it declines (a duplicate key, an out-of-range
  // float elsewhere, a BOM): the replies must match either way, and `raw` stays null.
  const std::string bodies[] = {
      R"({"id":"chatcmpl-1","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":
         "assistant","content":"Hello!","refusal":null},"logprobs":null,"finish_reason":"stop"}],
         "usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,
         "prompt_tokens_details":{"cached_tokens":0}},"system_fingerprint":"fp"})",
      " \r\n\t{\"choices\" : [ { \"message\" : { \"content\" : \"spaced\" } } ] } \n",
      R"({"choices":[{"message":{"content":"esc \" \\ \/ \b\f\n\r\t \u00e9 \u20AC \ud83d\ude00 \u0000."}}]})",
      "{\"choices\":[{\"message\":{\"content\":\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"}}]}",
      R"({"ch\u006fices":[{"message":{"content":"escaped key"}}],"model":null,"usage":null})",
      R"({"choices":[{"finish_reason":"tool_calls","message":{"content":null,"refusal":null,
         "tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather",
         "arguments":"{\"city\":\"Paris\"}"}},{"id":null,"function":{"name":"f2",
         "arguments":null}}]}}]})",
      R"({"choices":[{"message":{"content":"a","refusal":7}},{"message":5},[1,{"x":[]}]]})",
      R"({"choices":[{"message":{"content":"n","x":[-0,1.5e-3,2E+2,-12.25,1844674407370955161,
         true,false,null,{},[]]}}],"usage":{"prompt_tokens":0,"completion_tokens":null}})",
      R"({"id":5,"choices":[{"message":{"content":"id not a string"}}]})",
      R"({"model":"a","model":"b","choices":[{"message":{"content":"dup"}}]})",
      R"({"choices":[{"message":{"content":"big float"}}],"x":1e400})",
      R"({"choices":[{"message":{"content":"tiny float"}}],"x":1e-400})",
      "\xef\xbb\xbf{\"choices\":[{\"message\":{\"content\":\"bom\"}}]}",
      R"({"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":9223372036854775807}})",
  };
  for (const auto& body : bodies) {
    INFO(body);
    const auto res = reply(200, body, {{"x-request-id", "req_7"}});
    keel::llm::chat_response tree;
    try {
      tree = keel::llm::openai::parse_response(res, t0);
    } catch (const keel::llm::provider_error& e) {
      // Only the 1e400 body: nlohmann refuses a number it cannot hold.
      CHECK(error_of(res).llm_code() == errc::malformed_response);
      continue;
    }
    const auto fast = keel::llm::openai::parse_response(res, t0, false);
    check_same(fast, tree);
    CHECK(fast.raw.is_null());
    CHECK(!tree.raw.is_null());
  }
  const auto r = keel::llm::openai::parse_response(reply(200, bodies[5]), t0, false);
  REQUIRE(r.tool_calls.size() == 2);
  CHECK(r.tool_calls[0].arguments == R"({"city":"Paris"})");
  CHECK(r.text.empty());
  const auto u = keel::llm::openai::parse_response(reply(200, bodies[2]), t0, false);
  CHECK(u.text ==
        std::string("esc \" \\ / \b\f\n\r\t \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 ") + '\0' + ".");
}

TEST_CASE("openai parse_response without raw declines what the tree refuses", "[llm][openai]") {
  // Each is refused by nlohmann or by the reader of its tree; `error_of` checks that both ways
  // give the same error.
  const std::string bodies[] = {
      R"({"choices":[{"message":{"content":"x"}}],})",
      R"({"choices":[{"message":{"content":"x"}}]} x)",
      R"({"choices":[{"message":{"content":"x"}}])",
      R"({"choices":[{"message":{"content":"\ud800"}}]})",
      R"({"choices":[{"message":{"content":"\udc00"}}]})",
      R"({"choices":[{"message":{"content":"\ud800\u0041"}}]})",
      R"({"choices":[{"message":{"content":"\x"}}]})",
      R"({"choices":[{"message":{"content":"\u12G4"}}]})",
      "{\"choices\":[{\"message\":{\"content\":\"tab\there\"}}]}",
      "{\"choices\":[{\"message\":{\"content\":\"bad \xc3\x28\"}}]}",
      "{\"choices\":[{\"message\":{\"content\":\"overlong \xc0\xaf\"}}]}",
      "{\"choices\":[{\"message\":{\"content\":\"surrogate \xed\xa0\x80\"}}]}",
      "{\"choices\":[{\"message\":{\"content\":\"cut \xe2\x82\"}}]}",
      // A refusal that is not a string is skipped when the content is a string; a broken one
      // must not be skipped from inside it (found by review: each was taken as a reply).
      R"({"choices":[{"message":{"content":"hi","refusal":"\1,"a":1}}]})",
      R"({"choices":[{"message":{"content":"hi","refusal":"\uD800""}}]})",
      R"({"choices":[{"message":{"content":"hi","refusal":"\{"x":[1]}}}]})",
      R"({"choices":[{"message":{"content":"x"}}],"n":01})",
      R"({"choices":[{"message":{"content":"x"}}],"n":1.})",
      R"({"choices":[{"message":{"content":"x"}}],"n":-})",
      R"({"choices":[{"message":{"content":"x"}}],"n":tru})",
      R"({"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":-1}})",
      R"({"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1.0}})",
      R"({"choices":[{"message":{"content":"x"}}],"usage":{"completion_tokens":1e2}})",
      R"({"choices":[{"message":{"content":"x"}}],"usage":5})",
      R"({"choices":[{"message":{"content":"x"}}],"model":5})",
      R"({"choices":[{"finish_reason":5,"message":{"content":"x"}}]})",
      R"({"choices":[{"finish_reason":"content_filter","message":{"content":"x"}}]})",
      R"({"choices":[{"message":{"content":null,"refusal":"I can't"}}]})",
      R"({"choices":[{"message":{"content":null,"refusal":7}}]})",
      R"({"choices":[{"message":{"content":null,"tool_calls":{}}}]})",
      R"({"choices":[{"message":{"content":null,"tool_calls":[5]}}]})",
      R"({"choices":[{"message":{"content":null,"tool_calls":[{"id":"c"}]}}]})",
      R"({"choices":[{"message":{"content":null,"tool_calls":[{"function":{"name":""}}]}}]})",
      R"({"choices":[{"message":{"content":null,"tool_calls":[{"function":{"name":3}}]}}]})",
      R"({"choices":[{"message":{"content":null,"tool_calls":[{"function":[]}]}}]})",
      R"({"choices":[{"message":"x"}]})",
      R"({"choices":["x"]})",
      R"({"choices":[]})",
      R"({"choices":null})",
      "",
      "   ",
      "null",
  };
  for (const auto& body : bodies) {
    INFO(body);
    const auto e = error_of(reply(200, body));
    CHECK((e.llm_code() == errc::malformed_response || e.llm_code() == errc::content_filtered));
  }
}

TEST_CASE("openai malformed success bodies name the JSON path", "[llm][openai]") {
  struct row {
    const char* body;
    const char* says;
  };
  const row table[] = {
      {"not json", "body is not valid JSON"},
      {"[1,2]", "body is not a JSON object"},
      {"{}", "choices missing"},
      // A proxy's failure answered with a 200: what it said, with its key redacted.
      {R"({"error":{"message":"upstream timed out for sk-proj-abcdefghijklmnopqrstuvwx","type":"timeout"}})",
       "choices missing; the body is an error: upstream timed out for [redacted]"},
      {R"({"choices":{}})", "choices is not an array"},
      {R"({"choices":[]})", "choices is empty"},
      {R"({"choices":[{}]})", "choices[0].message missing"},
      {R"({"choices":[{"message":{}}]})", "choices[0].message.content missing"},
      {R"({"choices":[{"message":{"content":7}}]})", "choices[0].message.content is not a string"},
      {R"({"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":"1"}})",
       "usage.prompt_tokens is not a non-negative integer"},
  };
  // A body nested 100,000 deep is refused before nlohmann builds it (its copy and dump recurse).
  const std::string deep =
      R"({"choices":)" + std::string(100000, '[') + std::string(100000, ']') + "}";
  CHECK_THAT(std::string(error_of(reply(200, deep)).what()),
             Catch::Contains("body nests deeper than 128 levels"));
  CHECK(error_of(reply(429, deep)).llm_code() == errc::rate_limited);  // error bodies too
  for (const auto& t : table) {
    INFO(t.body);
    auto e = error_of(reply(200, t.body));
    CHECK(e.llm_code() == errc::malformed_response);
    CHECK(std::string(e.what()).find(t.says) != std::string::npos);
    CHECK(e.code() == keel::condition::permanent);
  }
}

TEST_CASE("openai errors are classified per the provider table", "[llm][openai]") {
  struct row {
    int status;
    std::string body;
    errc code;
    const char* provider_code;
  };
  const row table[] = {
      {429, err_body("requests", "rate_limit_exceeded", "Rate limit reached"), errc::rate_limited,
       "rate_limit_exceeded"},
      {429, err_body("insufficient_quota", "insufficient_quota", "You exceeded your quota"),
       errc::quota_exhausted, "insufficient_quota"},
      {429, err_body("billing", "billing_hard_limit_reached", "Billing limit"),
       errc::quota_exhausted, "billing_hard_limit_reached"},
      {400, err_body("invalid_request_error", "context_length_exceeded", "too long"),
       errc::context_length_exceeded, "context_length_exceeded"},
      {400, err_body("invalid_request_error", nullptr, "This model's maximum context length is 8k"),
       errc::context_length_exceeded, "invalid_request_error"},
      {400, err_body("invalid_request_error", "content_filter", "filtered"), errc::content_filtered,
       "content_filter"},
      {400, err_body("invalid_request_error", "invalid_value", "bad"), errc::bad_request,
       "invalid_value"},
      {401, err_body("invalid_request_error", "invalid_api_key", "Incorrect API key sk-abcdef12"),
       errc::auth, "invalid_api_key"},
      {403, err_body("invalid_request_error", "unsupported_country_region_territory", "no"),
       errc::auth, "unsupported_country_region_territory"},
      {404, err_body("invalid_request_error", "model_not_found", "no model"), errc::not_found,
       "model_not_found"},
      {408, "", errc::timeout, ""},
      {409, "", errc::server_error, ""},
      {500, err_body("server_error", nullptr, "oops"), errc::server_error, "server_error"},
      {502, "<html>Bad Gateway</html>", errc::server_error, ""},
      {503, "", errc::overloaded, ""},
      {504, "", errc::timeout, ""},
      {422, "", errc::bad_request, ""},
  };
  for (const auto& t : table) {
    INFO(t.status << " " << t.body);
    auto e = error_of(reply(t.status, t.body, {{"x-request-id", "req_9"}}));
    CHECK(e.llm_code() == t.code);
    CHECK(e.status() == t.status);
    CHECK(e.provider() == "openai");
    CHECK(e.provider_code() == t.provider_code);
    CHECK(e.request_id() == "req_9");
  }
  auto auth =
      error_of(reply(401, err_body("x", "invalid_api_key", "Incorrect API key sk-abcdef12")));
  CHECK(std::string(auth.what()).find("sk-abcdef12") == std::string::npos);
}

TEST_CASE("openai 3xx is a redirect naming its Location without the query; 413 is too large",
          "[llm][openai]") {
  auto moved =
      error_of(reply(301, "", {{"location", "https://u:pw@api.example/v1/chat?key=SECRETQ"}}));
  CHECK(moved.llm_code() == errc::redirect);
  CHECK(moved.status() == 301);
  CHECK(keel::classify(std::make_exception_ptr(moved)).condition == keel::condition::permanent);
  CHECK_THAT(moved.message(), Catch::Contains("redirected to https://api.example/v1/chat;"));
  CHECK_THAT(std::string(moved.what()), !Catch::Contains("SECRETQ"));
  CHECK_THAT(std::string(moved.what()), !Catch::Contains("pw@"));
  CHECK(error_of(reply(308, "")).message().find("(no Location header)") != std::string::npos);
  auto big = error_of(reply(413, err_body("invalid_request_error", "request_too_large", "big")));
  CHECK(big.llm_code() == errc::request_too_large);
  CHECK(keel::classify(std::make_exception_ptr(big)).condition == keel::condition::permanent);
}

TEST_CASE("openai errors carry the retry hint and honour x-should-retry", "[llm][openai]") {
  auto e = error_of(reply(429, err_body("requests", "rate_limit_exceeded", "slow down"),
                          {{"retry-after-ms", "1200"}, {"retry-after", "2"}}));
  auto ep = std::make_exception_ptr(e);
  auto c = keel::classify(ep);
  CHECK(c.condition == keel::condition::throttled);
  CHECK(c.retry_after == std::optional<std::chrono::nanoseconds>(1200ms));

  auto forced =
      error_of(reply(400, err_body("x", "odd", "retry me"), {{"x-should-retry", "true"}}));
  CHECK(forced.llm_code() == errc::server_error);
  CHECK(forced.should_retry() == std::optional<bool>(true));
  auto quota = error_of(reply(429, err_body("insufficient_quota", "insufficient_quota", "q"),
                              {{"x-should-retry", "true"}}));
  CHECK(quota.llm_code() == errc::quota_exhausted);
  auto no = error_of(reply(500, "", {{"x-should-retry", "false"}}));
  CHECK(no.llm_code() == errc::server_error);
  CHECK(no.should_retry() == std::optional<bool>(false));
}

TEST_CASE("openai content filter and refusals on 200 are content_filtered", "[llm][openai]") {
  auto f = error_of(
      reply(200, R"({"choices":[{"message":{"content":"partial"},"finish_reason":"content_filter"}],
              "usage":{"prompt_tokens":3,"completion_tokens":1}})"));
  CHECK(f.llm_code() == errc::content_filtered);
  // What came with the filter, for a caller that passes it on (keel serve).
  REQUIRE(f.info().filtered_reply != nullptr);
  CHECK(f.info().filtered_reply->text == "partial");
  CHECK(f.info().filtered_reply->finish_reason == "content_filter");
  CHECK(f.info().filtered_reply->usage.input == 3);
  CHECK(f.info().filtered_reply->refusal.empty());
  auto r = error_of(reply(
      200,
      R"({"choices":[{"message":{"content":null,"refusal":"I can't"},"finish_reason":"stop"}]})"));
  CHECK(r.llm_code() == errc::content_filtered);
  REQUIRE(r.info().filtered_reply != nullptr);
  CHECK(r.info().filtered_reply->refusal == "I can't");
  CHECK(r.info().filtered_reply->text.empty());
}

TEST_CASE("openai classifies a deeply nested error body by its status without parsing it",
          "[llm][openai]") {
  // Regression: the error object was copied, and nlohmann::json copies recursively, so a few
  // hundred KB of nesting from a broken or hostile server overflowed the stack. Since issue 13
  // a body nested past keel::llm::max_json_depth is not parsed at all: the status classifies it.
  const std::size_t depth = 500000;
  const std::string body = R"({"error":{"type":"requests","code":"rate_limit_exceeded","x":)" +
                           std::string(depth, '[') + std::string(depth, ']') + "}}";
  auto e = error_of(reply(429, body));
  CHECK(e.llm_code() == errc::rate_limited);
  CHECK(e.provider_code().empty());
}
