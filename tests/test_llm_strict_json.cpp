// keel::llm::parse_strict_json: what nlohmann accepts, less repeated keys and deep nesting, with
// errors that say where and never quote the text.
#include <keel/llm/strict_json.hpp>

#include <keel/llm/json_depth.hpp>

#include <catch2/catch.hpp>

#include <string>

using keel::llm::json_problem;
using keel::llm::json_refused;
using keel::llm::parse_strict_json;

namespace {

json_refused refusal_of(const std::string& text) {
  try {
    (void)parse_strict_json(text);
  } catch (const json_refused& e) {
    return e;
  }
  FAIL("accepted: " << text);
  return json_refused(json_problem::syntax, 0, {}, "");
}

}  // namespace

TEST_CASE("parse_strict_json reads what nlohmann reads", "[llm][strict_json]") {
  const auto j = parse_strict_json(R"({"a": [1, {"b": "c"}, {"b": "d"}], "e": {"b": 1}})");
  CHECK(j["a"][2]["b"] == "d");
  CHECK(j["e"]["b"] == 1);  // the same key in different objects is fine
  CHECK(parse_strict_json("  7 ") == 7);
}

TEST_CASE("parse_strict_json refuses a repeated key, naming its JSON pointer",
          "[llm][strict_json]") {
  const auto top = refusal_of(R"({"id": 1, "id": 2})");
  CHECK(top.problem() == json_problem::duplicate_key);
  CHECK(top.pointer() == "/id");
  CHECK_THAT(std::string(top.what()), Catch::StartsWith("the key appears twice in one object"));
  // Escaped pointer tokens ('/' as ~1, '~' as ~0) and array indices.
  CHECK(refusal_of(R"({"m": {"a/b": [0, {"~": 1, "~": 2}]}})").pointer() == "/m/a~1b/1/~0");
  CHECK(refusal_of(R"([{"x": 1}, {"y": 1, "y": 1}])").pointer() == "/1/y");
}

TEST_CASE("parse_strict_json says where a syntax error is without quoting the text",
          "[llm][strict_json]") {
  // An unterminated string holding a key: nlohmann's message would end with "last read: ...".
  const std::string text = R"({"api_key": "sk-live-QQSECRET42)";
  const auto e = refusal_of(text);
  CHECK(e.problem() == json_problem::syntax);
  CHECK(e.byte() == text.size());  // it ran out of text
  CHECK_THAT(std::string(e.what()), !Catch::Contains("QQSECRET"));
  CHECK_THAT(std::string(e.what()), !Catch::Contains("json.exception"));
  // What the parser expected stays; a quoted text that contains "; expected " does not.
  CHECK_THAT(std::string(refusal_of(R"({"a" 1})").what()), Catch::EndsWith("; expected ':'"));
  const auto quoted = refusal_of("{\"a\": \"x; expected QQSECRET43\x01\"}");
  CHECK_THAT(std::string(quoted.what()), !Catch::Contains("QQSECRET"));
  const auto bad_byte = refusal_of("{\"a\": \"\xff\"}");
  CHECK(bad_byte.byte() == 7);  // the 0xff
  CHECK_THAT(std::string(bad_byte.what()), Catch::Contains("ill-formed UTF-8 byte"));
}

TEST_CASE("parse_strict_json refuses deep nesting and numbers it cannot hold",
          "[llm][strict_json]") {
  const std::string deep = std::string(200, '[') + std::string(200, ']');
  const auto e = refusal_of(deep);
  CHECK(e.problem() == json_problem::too_deep);
  CHECK(e.byte() == keel::llm::max_json_depth);  // the '[' that opens level 129
  // Placed, and not quoted (before: "number overflow parsing '1e400'", with no position, so a
  // number where a key belongs was echoed).
  const auto big = refusal_of(R"({"n": 1e400})");
  CHECK(big.problem() == json_problem::syntax);
  CHECK(big.byte() == 6);
  CHECK(std::string(big.what()) == "a number too large for a double");
}
