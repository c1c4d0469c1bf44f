// Tests for tools and images in keel/llm/chat.hpp's model, as each wire format (OpenAI, Anthropic,
// Bedrock) sends them and reads them back (issue 18: the gateway passes them through).
#include <keel/llm/anthropic.hpp>
#include <keel/llm/bedrock.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/openai.hpp>

#include "llm_support.hpp"

#include <catch2/catch.hpp>

#include <string>

using keel::llm::errc;
using keel::llm::provider_kind;
using json = nlohmann::json;

namespace {
using keel_test::llm::reply;
using keel_test::llm::t0;

const json weather_schema =
    json::parse(R"({"type":"object","properties":{"city":{"type":"string"}},"required":["city"]})");

// A conversation that used a tool: the user asks, the assistant calls two tools, both results
// come back, the user adds a picture.
keel::llm::chat_request tool_conversation() {
  keel::llm::chat_request req("m", {}, 100);
  req.system = "Be brief.";
  req.messages.emplace_back("user", "Weather in Paris?");
  keel::llm::chat_message call("assistant", "Checking.");
  call.tool_calls.emplace_back("call_1", "get_weather", R"({"city":"Paris"})");
  call.tool_calls.emplace_back("call_2", "get_time", "");
  req.messages.push_back(call);
  keel::llm::chat_message r1("tool", "18C");
  r1.tool_call_id = "call_1";
  keel::llm::chat_message r2("tool", "noon");
  r2.tool_call_id = "call_2";
  req.messages.push_back(r1);
  req.messages.push_back(r2);
  keel::llm::chat_message pic("user", "");
  pic.parts.push_back(keel::llm::content_part::from_text("And this?"));
  pic.parts.push_back(keel::llm::content_part::from_image("data:image/png;base64,iVBORw0K", "low"));
  req.messages.push_back(pic);
  keel::llm::tool_definition weather;
  weather.name = "get_weather";
  weather.description = "Current weather";
  weather.parameters = weather_schema;
  weather.strict = true;
  keel::llm::tool_definition time;
  time.name = "get_time";
  req.tools = {weather, time};
  return req;
}

json body_of(const keel::llm::chat_request& req, provider_kind kind) {
  keel::llm::endpoint ep(kind, "http://h", "k", "us-east-1");
  return json::parse(keel::llm::build_request(req, ep).body);
}

// The provider_error `build_request` throws for `req` on `kind`.
keel::llm::provider_error refusal(const keel::llm::chat_request& req, provider_kind kind) {
  try {
    body_of(req, kind);
  } catch (const keel::llm::provider_error& e) {
    return e;
  }
  FAIL("build_request did not refuse");
  throw std::logic_error("unreachable");
}

}  // namespace

TEST_CASE("openai sends tools, tool calls, tool results and image parts in its own shape",
          "[llm][tools][openai]") {
  keel::llm::chat_request req = tool_conversation();
  req.tool_choice = keel::llm::tool_choice_option{keel::llm::tool_choice_mode::named, "get_time"};
  req.parallel_tool_calls = false;
  const json body = body_of(req, provider_kind::openai);
  const json& m = body.at("messages");
  REQUIRE(m.size() == 6);
  CHECK(m[0] == json{{"role", "system"}, {"content", "Be brief."}});
  CHECK(m[2] == json::parse(R"({"role":"assistant","content":"Checking.","tool_calls":[
      {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
      {"id":"call_2","type":"function","function":{"name":"get_time","arguments":""}}]})"));
  CHECK(m[3] == json::parse(R"({"role":"tool","tool_call_id":"call_1","content":"18C"})"));
  CHECK(m[4] == json::parse(R"({"role":"tool","tool_call_id":"call_2","content":"noon"})"));
  CHECK(m[5] == json::parse(R"({"role":"user","content":[{"type":"text","text":"And this?"},
      {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0K","detail":"low"}}]})"));
  CHECK(body.at("tools") == json::parse(R"([
      {"type":"function","function":{"name":"get_weather","description":"Current weather",
       "parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]},
       "strict":true}},
      {"type":"function","function":{"name":"get_time","parameters":{"type":"object"}}}])"));
  CHECK(body.at("tool_choice") ==
        json::parse(R"({"type":"function","function":{"name":"get_time"}})"));
  CHECK(body.at("parallel_tool_calls") == false);
  // An assistant turn of tool calls only has null content, as OpenAI writes it.
  keel::llm::chat_request only("m", {{"user", "x"}});
  keel::llm::chat_message a("assistant", "");
  a.tool_calls.emplace_back("c", "f", "{}");
  only.messages.push_back(a);
  CHECK(body_of(only, provider_kind::openai).at("messages")[1].at("content").is_null());
  for (auto [mode, want] : {std::pair{keel::llm::tool_choice_mode::automatic, "auto"},
                            std::pair{keel::llm::tool_choice_mode::none, "none"},
                            std::pair{keel::llm::tool_choice_mode::required, "required"}}) {
    req.tool_choice = keel::llm::tool_choice_option{mode, ""};
    CHECK(body_of(req, provider_kind::openai).at("tool_choice") == want);
  }
  // No tools: none of the tool fields.
  const json plain = body_of(keel::llm::chat_request("m", {{"user", "x"}}), provider_kind::openai);
  CHECK_FALSE(plain.contains("tools"));
  CHECK_FALSE(plain.contains("tool_choice"));
  CHECK_FALSE(plain.contains("parallel_tool_calls"));
}

TEST_CASE("openai parse_response reads tool calls and null content", "[llm][tools][openai]") {
  const auto r = keel::llm::openai::parse_response(reply(200, R"({"id":"x","model":"gpt-4o",
      "choices":[{"index":0,"finish_reason":"tool_calls","message":{"role":"assistant",
      "content":null,"refusal":null,"tool_calls":[
        {"id":"call_9","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]}}],
      "usage":{"prompt_tokens":5,"completion_tokens":7}})"),
                                                   t0);
  CHECK(r.text.empty());
  CHECK(r.finish_reason == "tool_calls");
  REQUIRE(r.tool_calls.size() == 1);
  CHECK(r.tool_calls[0].id == "call_9");
  CHECK(r.tool_calls[0].name == "get_weather");
  CHECK(r.tool_calls[0].arguments == R"({"city":"Oslo"})");
  // A call without a function name is malformed, named by its path.
  try {
    keel::llm::openai::parse_response(
        reply(200, R"({"choices":[{"index":0,"message":{"content":null,"tool_calls":[
          {"id":"c","type":"function","function":{"arguments":"{}"}}]}}]})"),
        t0);
    FAIL("no error");
  } catch (const keel::llm::provider_error& e) {
    CHECK(e.llm_code() == errc::malformed_response);
    CHECK_THAT(e.message(),
               Catch::Contains("choices[0].message.tool_calls[0].function.name missing"));
  }
}

TEST_CASE("anthropic gets tool_use and merged tool_result blocks, tools and base64 images",
          "[llm][tools][anthropic]") {
  keel::llm::chat_request req = tool_conversation();
  req.tool_choice =
      keel::llm::tool_choice_option{keel::llm::tool_choice_mode::required, std::string()};
  req.parallel_tool_calls = false;
  const json body = body_of(req, provider_kind::anthropic);
  CHECK(body.at("system") == "Be brief.");
  const json& m = body.at("messages");
  REQUIRE(m.size() == 3);
  CHECK(m[0] == json{{"role", "user"}, {"content", "Weather in Paris?"}});
  CHECK(m[1] == json::parse(R"({"role":"assistant","content":[{"type":"text","text":"Checking."},
      {"type":"tool_use","id":"call_1","name":"get_weather","input":{"city":"Paris"}},
      {"type":"tool_use","id":"call_2","name":"get_time","input":{}}]})"));
  // Both results and the next user turn form one user message, results first.
  CHECK(m[2] == json::parse(R"({"role":"user","content":[
      {"type":"tool_result","tool_use_id":"call_1","content":"18C"},
      {"type":"tool_result","tool_use_id":"call_2","content":"noon"},
      {"type":"text","text":"And this?"},
      {"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0K"}}]})"));
  CHECK(body.at("tools") == json::parse(R"([
      {"name":"get_weather","description":"Current weather",
       "input_schema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}},
      {"name":"get_time","input_schema":{"type":"object"}}])"));
  CHECK(body.at("tool_choice") ==
        json::parse(R"({"type":"any","disable_parallel_tool_use":true})"));
  req.parallel_tool_calls.reset();
  for (auto [choice, want] :
       {std::pair{keel::llm::tool_choice_option{keel::llm::tool_choice_mode::automatic, ""},
                  R"({"type":"auto"})"},
        std::pair{keel::llm::tool_choice_option{keel::llm::tool_choice_mode::none, ""},
                  R"({"type":"none"})"},
        std::pair{keel::llm::tool_choice_option{keel::llm::tool_choice_mode::named, "get_time"},
                  R"({"type":"tool","name":"get_time"})"}}) {
    req.tool_choice = choice;
    CHECK(body_of(req, provider_kind::anthropic).at("tool_choice") == json::parse(want));
  }
  // parallel_tool_calls false alone: an automatic choice that disables it.
  req.tool_choice.reset();
  req.parallel_tool_calls = false;
  CHECK(body_of(req, provider_kind::anthropic).at("tool_choice") ==
        json::parse(R"({"type":"auto","disable_parallel_tool_use":true})"));
  // An http image goes as a URL source.
  keel::llm::chat_request web("m", {});
  keel::llm::chat_message u("user", "");
  u.parts.push_back(keel::llm::content_part::from_image("https://example.com/cat.jpg"));
  web.messages.push_back(u);
  CHECK(body_of(web, provider_kind::anthropic).at("messages")[0].at("content")[0] ==
        json::parse(
            R"({"type":"image","source":{"type":"url","url":"https://example.com/cat.jpg"}})"));
}

TEST_CASE("anthropic and bedrock refuse what they cannot take, naming the part",
          "[llm][tools][anthropic][bedrock]") {
  keel::llm::chat_request bad_args("m", {{"user", "x"}});
  keel::llm::chat_message a("assistant", "");
  a.tool_calls.emplace_back("c", "f", "[1,2]");
  bad_args.messages.push_back(a);
  for (provider_kind kind : {provider_kind::anthropic, provider_kind::bedrock}) {
    const auto e = refusal(bad_args, kind);
    CHECK(e.llm_code() == errc::bad_request);
    CHECK(e.status() == 0);
    CHECK(e.provider_code() == "unsupported_content");
    CHECK_THAT(e.message(), Catch::Contains("messages[1].tool_calls[0].arguments"));
  }
  keel::llm::chat_request tiff("m", {});
  keel::llm::chat_message u("user", "");
  u.parts.push_back(keel::llm::content_part::from_text("see"));
  u.parts.push_back(keel::llm::content_part::from_image("data:image/tiff;base64,AAAA"));
  tiff.messages.push_back(u);
  for (provider_kind kind : {provider_kind::anthropic, provider_kind::bedrock}) {
    CHECK_THAT(refusal(tiff, kind).message(),
               Catch::Contains("messages[0].content[1]") && Catch::Contains("image/tiff"));
  }
  // OpenAI passes both on: it fetches URLs and validates the rest itself.
  CHECK_NOTHROW(body_of(bad_args, provider_kind::openai));
  CHECK_NOTHROW(body_of(tiff, provider_kind::openai));
  // Bedrock takes bytes only.
  keel::llm::chat_request web("m", {});
  keel::llm::chat_message w("user", "");
  w.parts.push_back(keel::llm::content_part::from_image("https://example.com/cat.png"));
  web.messages.push_back(w);
  CHECK_THAT(refusal(web, provider_kind::bedrock).message(),
             Catch::Contains("messages[0].content[0]") && Catch::Contains("not by http(s) URL"));
  CHECK_NOTHROW(body_of(web, provider_kind::anthropic));
}

TEST_CASE("bedrock withholds tools for tool_choice none, declaring those the history called",
          "[llm][tools][bedrock]") {
  // Converse has no "none", and refuses toolUse/toolResult blocks without a toolConfig: the
  // request's tools are withheld and the ones the conversation called are declared by name.
  keel::llm::chat_request none = tool_conversation();
  none.tool_choice = keel::llm::tool_choice_option{keel::llm::tool_choice_mode::none, ""};
  CHECK(body_of(none, provider_kind::bedrock).at("toolConfig") == json::parse(R"({"tools":[
      {"toolSpec":{"name":"get_weather","inputSchema":{"json":{"type":"object"}}}},
      {"toolSpec":{"name":"get_time","inputSchema":{"json":{"type":"object"}}}}]})"));
  // The same for a final turn sent with no tools at all.
  none.tool_choice.reset();
  none.tools.clear();
  CHECK(body_of(none, provider_kind::bedrock).at("toolConfig").at("tools").size() == 2);
  // A conversation without tool calls gets no toolConfig; nor a tool choice without tools,
  // on any provider.
  keel::llm::chat_request plain("m", {{"user", "x"}});
  plain.tool_choice = keel::llm::tool_choice_option{keel::llm::tool_choice_mode::none, ""};
  plain.parallel_tool_calls = false;
  CHECK_FALSE(body_of(plain, provider_kind::bedrock).contains("toolConfig"));
  for (provider_kind kind : {provider_kind::openai, provider_kind::anthropic}) {
    const json b = body_of(plain, kind);
    CHECK_FALSE(b.contains("tool_choice"));
    CHECK_FALSE(b.contains("parallel_tool_calls"));
  }
}

TEST_CASE("anthropic parse_response reads tool_use blocks as tool calls",
          "[llm][tools][anthropic]") {
  const auto r = keel::llm::anthropic::parse_response(
      reply(200, R"({"id":"msg_1","model":"claude-x","stop_reason":"tool_use","content":[
          {"type":"text","text":"Let me check."},
          {"type":"tool_use","id":"toolu_01","name":"get_weather","input":{"city":"Paris","days":2}}],
          "usage":{"input_tokens":3,"output_tokens":4}})"),
      t0);
  CHECK(r.text == "Let me check.");
  CHECK(r.finish_reason == "tool_use");
  REQUIRE(r.tool_calls.size() == 1);
  CHECK(r.tool_calls[0].id == "toolu_01");
  CHECK(r.tool_calls[0].name == "get_weather");
  CHECK(json::parse(r.tool_calls[0].arguments) == json{{"city", "Paris"}, {"days", 2}});
  CHECK_THROWS_AS(keel::llm::anthropic::parse_response(
                      reply(200, R"({"content":[{"type":"tool_use","id":"t","name":"f"}]})"), t0),
                  keel::llm::provider_error);
}

TEST_CASE("bedrock gets toolUse, merged toolResult blocks, toolConfig and image bytes",
          "[llm][tools][bedrock]") {
  keel::llm::chat_request req = tool_conversation();
  req.tool_choice = keel::llm::tool_choice_option{keel::llm::tool_choice_mode::named, "get_time"};
  req.parallel_tool_calls = false;  // Bedrock has no such switch: not sent
  const json body = body_of(req, provider_kind::bedrock);
  const json& m = body.at("messages");
  REQUIRE(m.size() == 3);
  CHECK(m[1] == json::parse(R"({"role":"assistant","content":[{"text":"Checking."},
      {"toolUse":{"toolUseId":"call_1","name":"get_weather","input":{"city":"Paris"}}},
      {"toolUse":{"toolUseId":"call_2","name":"get_time","input":{}}}]})"));
  CHECK(m[2] == json::parse(R"({"role":"user","content":[
      {"toolResult":{"toolUseId":"call_1","content":[{"text":"18C"}]}},
      {"toolResult":{"toolUseId":"call_2","content":[{"text":"noon"}]}},
      {"text":"And this?"},
      {"image":{"format":"png","source":{"bytes":"iVBORw0K"}}}]})"));
  CHECK(body.at("toolConfig") == json::parse(R"({"tools":[
      {"toolSpec":{"name":"get_weather","description":"Current weather","inputSchema":{"json":
        {"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}},
      {"toolSpec":{"name":"get_time","inputSchema":{"json":{"type":"object"}}}}],
      "toolChoice":{"tool":{"name":"get_time"}}})"));
  req.tool_choice = keel::llm::tool_choice_option{keel::llm::tool_choice_mode::required, ""};
  CHECK(body_of(req, provider_kind::bedrock).at("toolConfig").at("toolChoice") ==
        json::parse(R"({"any":{}})"));
  req.tool_choice.reset();
  CHECK_FALSE(body_of(req, provider_kind::bedrock).at("toolConfig").contains("toolChoice"));
  // An assistant turn of tool calls only has no empty text block (Bedrock refuses blank text).
  keel::llm::chat_request only("m", {{"user", "x"}});
  keel::llm::chat_message a("assistant", "");
  a.tool_calls.emplace_back("c", "f", "{}");
  only.messages.push_back(a);
  CHECK(body_of(only, provider_kind::bedrock).at("messages")[1].at("content") ==
        json::parse(R"([{"toolUse":{"toolUseId":"c","name":"f","input":{}}}])"));
}

TEST_CASE("bedrock parse_response reads toolUse blocks as tool calls", "[llm][tools][bedrock]") {
  const auto r = keel::llm::bedrock::parse_response(
      reply(200, R"({"output":{"message":{"role":"assistant","content":[
          {"toolUse":{"toolUseId":"tooluse_1","name":"get_weather","input":{"city":"Lima"}}}]}},
          "stopReason":"tool_use","usage":{"inputTokens":1,"outputTokens":2}})"),
      t0);
  CHECK(r.text.empty());
  CHECK(r.finish_reason == "tool_use");
  REQUIRE(r.tool_calls.size() == 1);
  CHECK(r.tool_calls[0].id == "tooluse_1");
  CHECK(json::parse(r.tool_calls[0].arguments) == json{{"city", "Lima"}});
}

TEST_CASE("response_format reaches anthropic and bedrock as a tool the model must call",
          "[llm][tools][response_format]") {
  // A Bedrock model of a family whose tool choice Converse lets keel force.
  keel::llm::chat_request req("us.anthropic.claude-3-5-haiku-20241022-v1:0", {{"user", "Weather?"}},
                              0);
  req.response_format =
      json{{"type", "json_schema"}, {"json_schema", {{"name", "w"}, {"schema", weather_schema}}}};
  const json anthropic = body_of(req, provider_kind::anthropic);
  REQUIRE(anthropic.at("tools").size() == 1);
  const json& tool = anthropic.at("tools")[0];
  CHECK(tool.at("name") == keel::llm::answer_tool_name);
  CHECK(tool.at("input_schema") == weather_schema);
  CHECK_FALSE(tool.at("description").get<std::string>().empty());
  CHECK(anthropic.at("tool_choice") == json{{"type", "tool"}, {"name", "keel_response_format"}});
  const json bedrock = body_of(req, provider_kind::bedrock);
  CHECK(bedrock.at("toolConfig").at("tools")[0].at("toolSpec").at("inputSchema").at("json") ==
        weather_schema);
  CHECK(bedrock.at("toolConfig").at("toolChoice") ==
        json{{"tool", {{"name", "keel_response_format"}}}});
  // OpenAI gets it verbatim and no tool.
  const json openai = body_of(req, provider_kind::openai);
  CHECK(openai.at("response_format") == *req.response_format);
  CHECK_FALSE(openai.contains("tools"));

  // json_object: any object.
  req.response_format = json{{"type", "json_object"}};
  CHECK(body_of(req, provider_kind::anthropic).at("tools")[0].at("input_schema") ==
        json{{"type", "object"}});
  // A bare schema (wrapped for OpenAI) is the tool's schema as it is.
  req.response_format = weather_schema;
  CHECK(body_of(req, provider_kind::anthropic).at("tools")[0].at("input_schema") == weather_schema);
  CHECK(body_of(req, provider_kind::bedrock)
            .at("toolConfig")
            .at("tools")[0]
            .at("toolSpec")
            .at("inputSchema")
            .at("json") == weather_schema);
  // Bedrock models whose tool choice cannot be forced (Llama, Cohere, ...) get nothing, as
  // before: Converse would refuse the request.
  keel::llm::chat_request llama = req;
  llama.model = "meta.llama3-70b-instruct-v1:0";
  CHECK_FALSE(body_of(llama, provider_kind::bedrock).contains("toolConfig"));
  llama.model = "anthropic.claude-v2:1";  // Claude 2 takes no tools on Converse
  CHECK_FALSE(body_of(llama, provider_kind::bedrock).contains("toolConfig"));
  llama.model = "arn:aws:bedrock:us-east-1::foundation-model/amazon.nova-pro-v1:0";
  CHECK(body_of(llama, provider_kind::bedrock).contains("toolConfig"));
  // "text": nothing to ask for.
  req.response_format = json{{"type", "text"}};
  CHECK_FALSE(body_of(req, provider_kind::anthropic).contains("tools"));
  CHECK_FALSE(body_of(req, provider_kind::bedrock).contains("toolConfig"));

  // With the request's own tools and an automatic choice, the model must call one of them or
  // the answer tool; with "required" or a named tool, no answer tool; with "none", the answer
  // alone (Anthropic keeps the own tools declared: the conversation may have called them).
  keel::llm::chat_request tools = tool_conversation();
  tools.model = "anthropic.claude-3-haiku-20240307-v1:0";
  tools.response_format = json{{"type", "json_object"}};
  json a = body_of(tools, provider_kind::anthropic);
  CHECK(a.at("tools").size() == 3);
  CHECK(a.at("tools")[2].at("name") == "keel_response_format");
  CHECK(a.at("tool_choice") == json{{"type", "any"}});
  json b = body_of(tools, provider_kind::bedrock);
  CHECK(b.at("toolConfig").at("tools").size() == 3);
  CHECK(b.at("toolConfig").at("toolChoice") == json{{"any", json::object()}});
  tools.tool_choice = keel::llm::tool_choice_option{keel::llm::tool_choice_mode::required, ""};
  CHECK(body_of(tools, provider_kind::anthropic).at("tools").size() == 2);
  CHECK(body_of(tools, provider_kind::bedrock).at("toolConfig").at("tools").size() == 2);
  tools.tool_choice = keel::llm::tool_choice_option{keel::llm::tool_choice_mode::none, ""};
  a = body_of(tools, provider_kind::anthropic);
  CHECK(a.at("tools").size() == 3);
  CHECK(a.at("tool_choice") == json{{"type", "tool"}, {"name", "keel_response_format"}});
  b = body_of(tools, provider_kind::bedrock);
  // Bedrock: the history's tools (declared by name) and the answer tool, forced.
  CHECK(b.at("toolConfig").at("tools").size() == 3);
  CHECK(b.at("toolConfig").at("toolChoice") == json{{"tool", {{"name", "keel_response_format"}}}});
}

TEST_CASE("a call of the answer tool comes back as the reply's text",
          "[llm][tools][response_format]") {
  const auto a = keel::llm::anthropic::parse_response(
      reply(200, R"({"id":"msg_1","model":"claude-x","stop_reason":"tool_use","content":[
          {"type":"tool_use","id":"toolu_01","name":"keel_response_format","input":{"city":"Paris"}}],
          "usage":{"input_tokens":3,"output_tokens":4}})"),
      t0);
  CHECK(json::parse(a.text) == json{{"city", "Paris"}});
  CHECK(a.tool_calls.empty());
  CHECK(a.finish_reason == "end_turn");
  // Beside a real call (tool choice "any"), the finish stays tool_use; a cut answer stays
  // max_tokens.
  const auto both = keel::llm::anthropic::parse_response(
      reply(200, R"({"stop_reason":"tool_use","content":[{"type":"text","text":"prose"},
          {"type":"tool_use","id":"t1","name":"get_time","input":{}},
          {"type":"tool_use","id":"t2","name":"keel_response_format","input":{"a":1}}]})"),
      t0);
  CHECK(both.text == R"({"a":1})");
  REQUIRE(both.tool_calls.size() == 1);
  CHECK(both.tool_calls[0].name == "get_time");
  CHECK(both.finish_reason == "tool_use");
  const auto cut =
      keel::llm::anthropic::parse_response(reply(200, R"({"stop_reason":"max_tokens","content":[
          {"type":"tool_use","id":"t","name":"keel_response_format","input":{}}]})"),
                                           t0);
  CHECK(cut.text == "{}");
  CHECK(cut.finish_reason == "max_tokens");

  const auto b = keel::llm::bedrock::parse_response(
      reply(200, R"({"output":{"message":{"role":"assistant","content":[
          {"toolUse":{"toolUseId":"tooluse_1","name":"keel_response_format","input":{"city":"Lima"}}}]}},
          "stopReason":"tool_use","usage":{"inputTokens":1,"outputTokens":2}})"),
      t0);
  CHECK(json::parse(b.text) == json{{"city", "Lima"}});
  CHECK(b.tool_calls.empty());
  CHECK(b.finish_reason == "end_turn");
  // OpenAI's reply is never unwrapped: a tool of that name there is the caller's.
  const auto o = keel::llm::openai::parse_response(
      reply(200, R"({"choices":[{"message":{"role":"assistant","content":null,"tool_calls":[
          {"id":"c","type":"function","function":{"name":"keel_response_format","arguments":"{}"}}]},
          "finish_reason":"tool_calls"}]})"),
      t0);
  CHECK(o.tool_calls.size() == 1);
}

TEST_CASE("a request without max_tokens sends no limit, but to anthropic, which requires one",
          "[llm][max_tokens]") {
  keel::llm::chat_request req("gpt-4o", {{"user", "x"}}, 0);
  const json openai = body_of(req, provider_kind::openai);
  CHECK_FALSE(openai.contains("max_tokens"));
  CHECK_FALSE(openai.contains("max_completion_tokens"));
  req.model = "o3-mini";
  CHECK_FALSE(body_of(req, provider_kind::openai).contains("max_completion_tokens"));
  CHECK(body_of(req, provider_kind::anthropic).at("max_tokens") ==
        keel::llm::anthropic_default_max_tokens);
  CHECK_FALSE(body_of(req, provider_kind::bedrock).contains("inferenceConfig"));
  req.temperature = 0.5;
  CHECK(body_of(req, provider_kind::bedrock).at("inferenceConfig") == json{{"temperature", 0.5}});
  // Given, it goes everywhere.
  req.max_tokens = 7;
  CHECK(body_of(req, provider_kind::openai).at("max_completion_tokens") == 7);
  CHECK(body_of(req, provider_kind::anthropic).at("max_tokens") == 7);
  CHECK(body_of(req, provider_kind::bedrock).at("inferenceConfig").at("maxTokens") == 7);
}
