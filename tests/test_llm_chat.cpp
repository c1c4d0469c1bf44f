// Tests for keel/llm/chat.hpp: the request helpers and the dispatch on the endpoint's provider.
#include <keel/llm/chat.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

using json = nlohmann::json;

TEST_CASE("from_prompt makes a one-turn request with a budget and an optional system prompt",
          "[llm][chat]") {
  const auto plain = keel::llm::chat_request::from_prompt("gpt-4o-mini", "Say hi");
  CHECK(plain.model == "gpt-4o-mini");
  REQUIRE(plain.messages.size() == 1);
  CHECK(plain.messages[0].role == "user");
  CHECK(plain.messages[0].content == "Say hi");
  CHECK(plain.max_tokens == 1024);
  CHECK(plain.system.empty());
  CHECK_FALSE(plain.temperature);

  const auto terse =
      keel::llm::chat_request::from_prompt("claude-3-5-haiku-latest", "Say hi", 64, "Be terse.");
  CHECK(terse.max_tokens == 64);
  CHECK(terse.system == "Be terse.");
  REQUIRE(terse.messages.size() == 1);
  CHECK(terse.messages[0].content == "Say hi");
}

TEST_CASE("a from_prompt request goes on the wire like the same request built by hand",
          "[llm][chat]") {
  const auto quick = keel::llm::chat_request::from_prompt("m", "Why jitter?", 128, "Be terse.");
  keel::llm::chat_request by_hand("m", {keel::llm::chat_message("user", "Why jitter?")}, 128);
  by_hand.system = "Be terse.";
  for (const auto kind : {keel::llm::provider_kind::openai, keel::llm::provider_kind::anthropic,
                          keel::llm::provider_kind::bedrock}) {
    CAPTURE(keel::llm::to_string(kind));
    const keel::llm::endpoint ep(kind, "http://127.0.0.1:1", "key", "us-east-1");
    CHECK(json::parse(keel::llm::build_request(quick, ep).body) ==
          json::parse(keel::llm::build_request(by_hand, ep).body));
  }
  const keel::llm::endpoint openai(keel::llm::provider_kind::openai, "http://127.0.0.1:1", "key");
  const json body = json::parse(keel::llm::build_request(quick, openai).body);
  CHECK(body["messages"] == json::parse(R"([{"role":"system","content":"Be terse."},
                                             {"role":"user","content":"Why jitter?"}])"));
  CHECK(body["max_tokens"] == 128);
}

TEST_CASE("a streamed request is the whole request with each provider's stream switch",
          "[llm][chat][stream]") {
  const auto req = keel::llm::chat_request::from_prompt("m", "Why jitter?", 128);
  for (const auto kind : {keel::llm::provider_kind::openai, keel::llm::provider_kind::anthropic,
                          keel::llm::provider_kind::bedrock}) {
    CAPTURE(keel::llm::to_string(kind));
    const keel::llm::endpoint ep(kind, "http://127.0.0.1:1", "key", "us-east-1");
    const keel::http::request whole = keel::llm::build_request(req, ep);
    const keel::http::request streamed = keel::llm::build_stream_request(req, ep);
    json expected = json::parse(whole.body);
    if (kind == keel::llm::provider_kind::bedrock) {
      CHECK(streamed.url == whole.url.substr(0, whole.url.size() - 8) + "converse-stream");
      CHECK(whole.url.ends_with("/converse"));
    } else {
      CHECK(streamed.url == whole.url);
      expected["stream"] = true;
      if (kind == keel::llm::provider_kind::openai) {
        expected["stream_options"] = {{"include_usage", true}};
      }
      CHECK(streamed.headers.find("accept").value_or("") == "text/event-stream");
    }
    CHECK(json::parse(streamed.body) == expected);
  }
}
