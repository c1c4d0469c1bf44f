// Tests for keel/llm/json_scan.hpp: what the reader takes, what it declines, and that every text
// it takes is one nlohmann accepts with the same values.
#include <keel/llm/json_scan.hpp>

#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

using keel::llm::json_scan;
using json = nlohmann::json;

namespace {

// Reads any value into a tree, as far as the reader's interface allows (numbers as doubles):
// false if the reader declines.
bool read(json_scan& s, json& out) {
  switch (s.peek()) {
    case json_scan::kind::object:
      out = json::object();
      return s.object([&](std::string_view k) { return read(s, out[std::string(k)]); });
    case json_scan::kind::array:
      out = json::array();
      return s.array([&](std::size_t) {
        out.push_back(nullptr);
        return read(s, out.back());
      });
    case json_scan::kind::string: {
      std::string v;
      const bool ok = s.string(v);
      out = v;
      return ok;
    }
    case json_scan::kind::number: {
      double v = 0;
      const bool ok = s.number(v);
      out = v;
      return ok;
    }
    case json_scan::kind::boolean: {
      bool v = false;
      const bool ok = s.boolean(v);
      out = v;
      return ok;
    }
    case json_scan::kind::null:
      out = nullptr;
      return s.null();
    case json_scan::kind::none:
      return false;
  }
  return false;
}

// The whole text read (or skipped): taken or declined.
bool takes(const std::string& text, json* out = nullptr) {
  json_scan s(text);
  json ignored;
  return read(s, out ? *out : ignored) && s.at_end();
}
bool skips(const std::string& text) {
  json_scan s(text);
  return s.skip() && s.at_end();
}

}  // namespace

TEST_CASE("json_scan reads what nlohmann reads, with the same values", "[json_scan]") {
  const std::vector<std::string> texts = {
      R"({})",
      R"([])",
      " {\"a\" :\t[1, -2, 0, -0, 3.25, 1e3, 2E-2, 1.5e+2, true, false, null, \"s\"] }\r\n",
      R"({"nested":{"x":[[],[{}],{"y":{"z":[null]}}]}})",
      R"("esc \" \\ \/ \b\f\n\r\t \u0041\u00e9\u20ac\ud83d\ude00\u0000 end")",
      "\"utf-8 caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf \xed\x9f\xbf\"",
      R"({"k\u0065y":1,"":2})",
      "9223372036854775807",
      "123456789012345678",
      "1.7976931348623157e308",
  };
  for (const auto& t : texts) {
    INFO(t);
    json got;
    REQUIRE(takes(t, &got));
    CHECK(skips(t));
    // Compare through a double-only copy (the reader reads every number as a double).
    const json want_doubles = json::parse(t, [](int, json::parse_event_t, json& v) {
      if (v.is_number()) {
        v = v.get<double>();
      }
      return true;
    });
    CHECK(got == want_doubles);
  }
}

TEST_CASE("json_scan declines invalid text and what it does not take", "[json_scan]") {
  const std::vector<std::string> invalid = {
      "",
      " ",
      "{",
      "}",
      "[1,]",
      "{\"a\":1,}",
      "{\"a\" 1}",
      "{1:2}",
      "[1 2]",
      "01",
      "1.",
      ".5",
      "-",
      "1e",
      "+1",
      "tru",
      "nul",
      "falsey",
      "\"open",
      "\"\\x\"",
      "\"\\u12G4\"",
      "\"\\ud800\"",
      "\"\\udc00\"",
      "\"\\ud800\\u0041\"",
      "\"tab\there\"",
      "\"\xc3\x28\"",
      "\"\xc0\xaf\"",
      "\"\xed\xa0\x80\"",
      "\"\xe2\x82\"",
      "\"\xf4\x90\x80\x80\"",
      "\"\xff\"",
      "{} {}",
      "[] x",
  };
  for (const auto& t : invalid) {
    INFO(t);
    CHECK_FALSE(takes(t));
    CHECK_FALSE(skips(t));
    CHECK_FALSE(json::accept(t));  // nlohmann refuses each as well
  }
  // Valid JSON the reader declines, leaving it to nlohmann.
  const std::vector<std::string> declined = {
      "1e400",                 // nlohmann refuses it too ("number overflow")
      "12345678901234567890",  // beyond 64 bits: nlohmann would hold a double
      "\xef\xbb\xbf{}",        // a byte-order mark
      std::string(200, '[') + std::string(200, ']'),  // deeper than max_json_depth
  };
  for (const auto& t : declined) {
    INFO(t.substr(0, 20));
    CHECK_FALSE(skips(t));
  }
}

TEST_CASE("json_scan counts only non-negative integers a long long holds", "[json_scan]") {
  auto count = [](const std::string& t, long long& v) {
    json_scan s(t);
    return s.count(v) && s.at_end();
  };
  long long v = -1;
  CHECK(count("0", v));
  CHECK(v == 0);
  CHECK(count(" 9223372036854775807 ", v));
  CHECK(v == 9223372036854775807LL);
  for (const char* t : {"-1", "-0", "1.0", "1e2", "9223372036854775808", "\"1\"", "null"}) {
    INFO(t);
    CHECK_FALSE(count(t, v));
  }
  // A number read as a double: an integer converts as nlohmann's get<double> does (-0 is 0).
  json_scan z("-0");
  double d = 1;
  REQUIRE(z.number(d));
  CHECK(d == 0);
  CHECK_FALSE(std::signbit(d));
}

TEST_CASE("json_scan hands each key to the caller and stops when it declines", "[json_scan]") {
  json_scan s(R"({"a": 1, "skip": {"x": [1, 2]}, "b": "two", "c": 3})");
  std::vector<std::string> keys;
  std::string b;
  const bool ok = s.object([&](std::string_view k) {
    keys.emplace_back(k);
    if (k == "b") {
      return s.string(b);
    }
    if (k == "c") {
      return false;  // the caller declines: the whole read does
    }
    return s.skip();
  });
  CHECK_FALSE(ok);
  CHECK(keys == std::vector<std::string>{"a", "skip", "b", "c"});
  CHECK(b == "two");
}

TEST_CASE("json_scan reads an optional string and declines a member given twice", "[json_scan]") {
  std::string out = "old";
  json_scan nul("null");
  CHECK(nul.optional_string(out));
  CHECK(out.empty());
  json_scan str(R"("a\u0062")");
  CHECK(str.optional_string(out));
  CHECK(out == "ab");
  for (const char* t : {"1", "[]", "{}", "true"}) {
    INFO(t);
    json_scan s(t);
    CHECK_FALSE(s.optional_string(out));
    CHECK(s.skip());  // declined without reading: the value is still there, whole
    CHECK(s.at_end());
  }
  // A member read twice: the second read declines the whole object.
  json_scan dup(R"({"k": "a", "k": "b"})");
  bool seen = false;
  CHECK_FALSE(dup.object(
      [&](std::string_view) { return json_scan::first_time(seen) && dup.optional_string(out); }));
  CHECK(out == "a");
}
