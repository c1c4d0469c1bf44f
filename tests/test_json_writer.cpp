// Tests for keel/llm/json_writer.hpp: strings escaped byte for byte as nlohmann escapes them, and
// the structure (commas, keys, nesting) of what the writer writes.
#include <keel/llm/json_writer.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <iterator>
#include <random>
#include <string>

using nlohmann::json;

namespace {

std::string by_nlohmann(const std::string& s) {
  return json(s).dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string by_writer(const std::string& s) {
  std::string out;
  keel::llm::append_json_string(out, s);
  return out;
}

}  // namespace

TEST_CASE("append_json_string escapes every single byte as nlohmann does", "[json_writer]") {
  for (int b = 0; b < 256; ++b) {
    const std::string s = "a" + std::string(1, static_cast<char>(b)) + "z";
    INFO("byte " << b);
    CHECK(by_writer(s) == by_nlohmann(s));
  }
  CHECK(by_writer("") == "\"\"");
  CHECK(by_writer("say \"hi\"\n\\") == R"("say \"hi\"\n\\")");
  CHECK(by_writer(std::string("\x01\x1f", 2)) == R"("\u0001\u001f")");
  CHECK(by_writer("h\xc3\xa9llo") == "\"h\xc3\xa9llo\"");    // valid UTF-8 passes through
  CHECK(by_writer("bad \xc3(") == "\"bad \xef\xbf\xbd(\"");  // invalid: U+FFFD
}

TEST_CASE("append_json_string matches nlohmann on seeded random strings", "[json_writer]") {
  std::mt19937 rng(20261206);
  // Mostly printable ASCII with escapes and, in some strings, bytes >= 0x80 (valid or not).
  std::uniform_int_distribution<int> len(0, 40);
  std::uniform_int_distribution<int> pick(0, 99);
  std::uniform_int_distribution<int> any(0, 255);
  std::uniform_int_distribution<int> ascii(0x20, 0x7e);
  int compared = 0;
  for (int i = 0; i < 5000; ++i) {
    std::string s;
    const int n = len(rng);
    const bool high = i % 3 == 0;
    for (int k = 0; k < n; ++k) {
      const int p = pick(rng);
      if (p < 10) {
        s += static_cast<char>(any(rng) % (high ? 256 : 128));
      } else if (p < 15) {
        s += "\"\\\n\t\b"[p - 10];
      } else {
        s += static_cast<char>(ascii(rng));
      }
    }
    INFO("string " << i);
    REQUIRE(by_writer(s) == by_nlohmann(s));
    ++compared;
  }
  CHECK(compared == 5000);
}

TEST_CASE("append_json_string copies well-formed UTF-8 as nlohmann does", "[json_writer]") {
  // Random code points of every length (1 to 4 bytes, the edges of each range included) between
  // ASCII and escapes, valid throughout; then the same strings with one byte broken.
  std::mt19937 rng(20261206);
  const std::uint32_t edges[] = {0x80,   0x7ff,   0x800,    0xd7ff,  0xe000, 0xfffd,
                                 0xffff, 0x10000, 0x10ffff, 0x1f600, 0xe9,   0x20ac};
  std::uniform_int_distribution<std::uint32_t> cp(0x80, 0x10ffff);
  std::uniform_int_distribution<int> pick(0, 9);
  auto utf8 = [](std::uint32_t c) {
    std::string o;
    if (c < 0x800) {
      o += static_cast<char>(0xc0 | (c >> 6));
    } else if (c < 0x10000) {
      o += static_cast<char>(0xe0 | (c >> 12));
      o += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
    } else {
      o += static_cast<char>(0xf0 | (c >> 18));
      o += static_cast<char>(0x80 | ((c >> 12) & 0x3f));
      o += static_cast<char>(0x80 | ((c >> 6) & 0x3f));
    }
    o += static_cast<char>(0x80 | (c & 0x3f));
    return o;
  };
  int valid = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string s;
    for (int k = 0; k < 12; ++k) {
      const int p = pick(rng);
      if (p < 3) {
        std::uint32_t c =
            p == 0 ? edges[static_cast<std::size_t>(i + k) % std::size(edges)] : cp(rng);
        if (c >= 0xd800 && c <= 0xdfff) {
          c = 0xfffd;  // surrogates are not characters
        }
        s += utf8(c);
      } else if (p < 4) {
        s += "\"\n\\"[k % 3];
      } else {
        s += static_cast<char>('a' + k);
      }
    }
    INFO("string " << i);
    REQUIRE(by_writer(s) == by_nlohmann(s));
    ++valid;
    // Broken: a byte replaced by each kind of trouble (a lone continuation, a lead without its
    // continuation, an overlong lead, a surrogate's lead, a byte never valid).
    std::string broken = s;
    broken[static_cast<std::size_t>(i) % broken.size()] =
        "\x80\xc3\xc0\xed\xff"[static_cast<std::size_t>(i) % 5];
    REQUIRE(by_writer(broken) == by_nlohmann(broken));
  }
  CHECK(valid == 3000);
  CHECK(by_writer("\xe4\xbd\xa0\xe5\xa5\xbd") == "\"\xe4\xbd\xa0\xe5\xa5\xbd\"");
  const std::string surrogate = "\xed\xa0\x80";  // U+D800 written as UTF-8: ill-formed
  CHECK(by_writer(surrogate) == by_nlohmann(surrogate));
  CHECK(by_writer(surrogate).find("\xef\xbf\xbd") != std::string::npos);
}

TEST_CASE("json_writer writes commas, keys and nesting as JSON", "[json_writer]") {
  std::string out = "prefix:";
  keel::llm::json_writer w(out);
  w.begin_object()
      .key("a")
      .value(1)
      .key("b")
      .begin_array()
      .value("x")
      .value(true)
      .null()
      .begin_object()
      .end_object()
      .begin_array()
      .end_array()
      .value(-7LL)
      .end_array()
      .key("c\"q")
      .value(0.5)
      .key("d")
      .value(json{{"k", {1, 2}}})
      .key("e")
      .value(std::string("s"))
      .key("f")
      .value(false)
      .end_object();
  CHECK(
      out ==
      R"(prefix:{"a":1,"b":["x",true,null,{},[],-7],"c\"q":0.5,"d":{"k":[1,2]},"e":"s","f":false})");
  const json j = json::parse(out.substr(7));
  CHECK(j["b"].size() == 6);
  CHECK(j["c\"q"] == 0.5);
}

TEST_CASE("json_writer prints numbers as nlohmann does", "[json_writer]") {
  for (const double d : {0.0, 0.1, 0.7, 1.0, 1e-7, 123456.789, -2.5}) {
    std::string out;
    keel::llm::json_writer(out).value(d);
    CHECK(out == json(d).dump());
  }
  std::string out;
  keel::llm::json_writer(out)
      .begin_array()
      .value(std::uint64_t{18446744073709551615ULL})
      .value(std::int64_t{-9223372036854775807LL - 1})
      .value(0)
      .end_array();
  CHECK(out == "[18446744073709551615,-9223372036854775808,0]");
}

TEST_CASE("skip_plain_ascii stops at exactly the first byte that needs care", "[json_writer]") {
  // Every byte value at every position of a word and past it, after plain bytes of every kind.
  for (int b = 0; b < 256; ++b) {
    const auto c = static_cast<char>(b);
    const bool plain = b >= 0x20 && b < 0x80 && c != '"' && c != '\\';
    for (std::size_t at = 0; at < 20; ++at) {
      std::string s(24, 'a');
      for (std::size_t i = 0; i < at; ++i) {
        s[i] = static_cast<char>(0x20 + (i * 7) % 0x5f);  // plain, varied
        if (s[i] == '"' || s[i] == '\\') {
          s[i] = '~';
        }
      }
      s[at] = c;
      s[at + 1] = '"';  // a second special byte above the first must not move the answer
      const char* end = s.data() + s.size();
      const char* got = keel::llm::detail::skip_plain_ascii(s.data(), end);
      INFO("byte " << b << " at " << at);
      // Whole words cover every byte up to 23, so the first byte needing care is always found.
      CHECK(got == s.data() + (plain ? at + 1 : at));
    }
  }
}
