// Tests for keel/llm/json_depth.hpp: the depth scan finds the byte that crosses the limit, outside
// strings, with escapes honoured.
#include <keel/llm/json_depth.hpp>

#include <catch2/catch.hpp>

#include <random>
#include <string>

namespace {

// The scan as first written: a state machine over every byte.
std::size_t reference(std::string_view text, std::size_t max_depth) {
  std::size_t depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        return i;
      }
    } else if (c == ']' || c == '}') {
      depth -= depth > 0 ? 1 : 0;
    }
  }
  return std::string_view::npos;
}

}  // namespace

TEST_CASE("json_too_deep_at names the byte that opens one level too many", "[json_depth]") {
  CHECK(keel::llm::json_too_deep_at(R"({"a": [1, {"b": 2}]})", 3) == std::string_view::npos);
  CHECK(keel::llm::json_too_deep_at(R"({"a": [1, {"b": [2]}]})", 3) == 16);
  // Brackets inside strings, and an escaped quote that does not end the string, do not count.
  CHECK(keel::llm::json_too_deep_at(R"(["[[[\"[[[", "\\", [1]])", 2) == std::string_view::npos);
  CHECK(keel::llm::json_too_deep_at(R"(["\\", [[1]]])", 2) == 8);
  CHECK(keel::llm::json_too_deep_at("[\"unterminated \\", 0) == 0);
  CHECK(keel::llm::json_too_deep_at("\"\\", 0) == std::string_view::npos);  // ends in an escape
  const std::string deep(keel::llm::max_json_depth + 1, '[');
  CHECK(keel::llm::json_too_deep_at(deep) == keel::llm::max_json_depth);
}

TEST_CASE("json_too_deep_at agrees with a byte-by-byte scan on seeded random text",
          "[json_depth]") {
  std::mt19937 rng(6122026);
  static constexpr char alphabet[] = "[]{}\"\\a ,";
  std::uniform_int_distribution<int> pick(0, sizeof alphabet - 2);
  std::uniform_int_distribution<int> len(0, 60);
  std::uniform_int_distribution<int> limit(0, 6);
  int found = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string s;
    for (int k = len(rng); k > 0; --k) {
      s += alphabet[pick(rng)];
    }
    const auto max_depth = static_cast<std::size_t>(limit(rng));
    const std::size_t want = reference(s, max_depth);
    INFO(s << " at depth " << max_depth);
    REQUIRE(keel::llm::json_too_deep_at(s, max_depth) == want);
    found += want != std::string_view::npos ? 1 : 0;
  }
  CHECK(found > 1000);  // the inputs reach the limit often enough to test both outcomes
}
