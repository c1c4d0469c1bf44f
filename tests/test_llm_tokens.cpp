// Tests for keel/llm/tokens.hpp: the conservative token estimate.
#include <keel/llm/tokens.hpp>

#include <catch2/catch.hpp>

#include <type_traits>

#include <string>

TEST_CASE("estimate_tokens counts text, per-message overhead and the reply budget",
          "[llm][tokens]") {
  keel::llm::chat_request req("m", {}, 0);
  CHECK(keel::llm::estimate_tokens(req) == 3);  // reply priming only

  req.messages.emplace_back("user", std::string(8, 'a'));  // 2 tokens + 4
  CHECK(keel::llm::estimate_tokens(req) == 3 + 2 + 4);

  req.messages.emplace_back("assistant", "abcde");  // 5 bytes rounds up to 2 tokens + 4
  req.system = "x";                                 // 1 token + 4
  req.max_tokens = 100;
  CHECK(keel::llm::estimate_tokens(req) == 3 + (2 + 4) + (2 + 4) + (1 + 4) + 100);

  req.max_tokens = -5;  // a nonsensical budget does not lower the estimate
  CHECK(keel::llm::estimate_tokens(req) == 3 + (2 + 4) + (2 + 4) + (1 + 4));
}

TEST_CASE("estimate_tokens counts text parts, images, tool calls and tool definitions",
          "[llm][tokens][tools]") {
  keel::llm::chat_request req("m", {}, 0);
  keel::llm::chat_message u("user", "");
  u.parts.push_back(keel::llm::content_part::from_text(std::string(8, 'a')));  // 2
  u.parts.push_back(keel::llm::content_part::from_image("data:image/png;base64,AAAA"));
  req.messages.push_back(u);
  CHECK(keel::llm::estimate_tokens(req) == 3 + 4 + 2 + keel::llm::tokens_per_image);
  keel::llm::chat_message a("assistant", "");
  a.tool_calls.emplace_back("id", "abcd", std::string(12, 'x'));  // 1 + 3 + 4
  req.messages.push_back(a);
  keel::llm::tool_definition t;
  t.name = "abcd";                                               // 1
  t.description = std::string(16, 'd');                          // 4
  t.parameters = nlohmann::json::parse(R"({"type":"object"})");  // 17 bytes: 5
  req.tools.push_back(t);
  CHECK(keel::llm::estimate_tokens(req) ==
        3 + (4 + 2 + keel::llm::tokens_per_image) + (4 + 1 + 3 + 4) + (1 + 4 + 4 + 5));
}

TEST_CASE("estimate_tokens errs high on non-Latin text", "[llm][tokens]") {
  keel::llm::chat_request req("m", {{"user", "\xE4\xBD\xA0\xE5\xA5\xBD"}}, 0);  // two CJK chars
  CHECK(keel::llm::estimate_tokens(req) == 3 + 2 + 4);
}

TEST_CASE("token counts meet the throttler as doubles: the estimate and the usage total",
          "[llm][tokens]") {
  static_assert(
      std::is_same_v<decltype(keel::llm::estimate_tokens(keel::llm::chat_request{})), double>);
  keel::llm::token_usage u;
  u.input = 12;
  u.output = 30;
  CHECK(u.total() == 42.0);
  keel::llm::chat_request req("m", {{"user", "abcd"}}, 10);
  CHECK(keel::llm::estimate_tokens(req) == 3.0 + (1 + 4) + 10);
}
