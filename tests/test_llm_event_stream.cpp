// Tests for keel/llm/event_stream.hpp: CRC32, AWS's published messages, splits and every refusal.
#include <keel/llm/event_stream.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using keel::llm::event_stream_header;
using keel::llm::event_stream_header_type;
using keel::llm::event_stream_message;

std::string bytes(std::initializer_list<int> b) {
  std::string s;
  for (int c : b) {
    s.push_back(static_cast<char>(c));
  }
  return s;
}

// Messages from aws-c-event-stream's tests/message_deserializer_test.c (Apache-2.0), which the
// AWS C runtime accepts: checks our CRC and framing against bytes not produced here.
const std::string aws_no_op = bytes({0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x05, 0xc2,
                                     0x48, 0xeb, 0x7d, 0x98, 0xc8, 0xff});
const std::string aws_no_headers =
    bytes({0x00, 0x00, 0x00, 0x1D, 0x00, 0x00, 0x00, 0x00, 0xfd, 0x52, 0x8c, 0x5a, 0x7b, 0x27, 0x66,
           0x6f, 0x6f, 0x27, 0x3a, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7d, 0xc3, 0x65, 0x39, 0x36});
const std::string aws_one_header =
    bytes({0x00, 0x00, 0x00, 0x3D, 0x00, 0x00, 0x00, 0x20, 0x07, 0xFD, 0x83, 0x96, 0x0C}) +
    "content-type" + bytes({0x07, 0x00, 0x10}) + "application/json" + "{'foo':'bar'}" +
    bytes({0x8D, 0x9C, 0x08, 0xB1});

std::string to_u32(std::uint32_t v) {
  return bytes({static_cast<int>(v >> 24), static_cast<int>((v >> 16) & 0xFF),
                static_cast<int>((v >> 8) & 0xFF), static_cast<int>(v & 0xFF)});
}

// Recomputes both CRCs of a message after a test edited it.
std::string fix_crcs(std::string m) {
  m.replace(8, 4, to_u32(keel::llm::crc32(std::string_view(m).substr(0, 8))));
  m.replace(m.size() - 4, 4, to_u32(keel::llm::crc32(std::string_view(m).substr(0, m.size() - 4))));
  return m;
}

struct decoded {
  std::vector<event_stream_message> messages;
  bool ok = true;
  std::string error;
  bool partial = false;
};

decoded decode(std::string_view body, std::size_t max = keel::llm::default_event_stream_max_bytes) {
  keel::llm::event_stream_decoder d(max);
  decoded r;
  r.ok = d.feed(body, r.messages);
  r.error = d.error();
  r.partial = d.partial();
  return r;
}

}  // namespace

TEST_CASE("crc32 is the IEEE CRC with the standard check value", "[llm][event_stream]") {
  CHECK(keel::llm::crc32("123456789") == 0xCBF43926U);
  CHECK(keel::llm::crc32("") == 0U);
  CHECK(keel::llm::crc32("a") == 0xE8B7BE43U);
}

TEST_CASE("event_stream decodes the messages published in aws-c-event-stream's tests",
          "[llm][event_stream]") {
  const auto r = decode(aws_no_op + aws_no_headers + aws_one_header);
  REQUIRE(r.ok);
  REQUIRE(r.messages.size() == 3);
  CHECK(r.messages[0].headers.empty());
  CHECK(r.messages[0].payload.empty());
  CHECK(r.messages[1].payload == "{'foo':'bar'}");
  REQUIRE(r.messages[2].headers.size() == 1);
  CHECK(r.messages[2].headers[0].name == "content-type");
  CHECK(r.messages[2].header("content-type") ==
        std::optional<std::string_view>("application/json"));
  CHECK(r.messages[2].payload == "{'foo':'bar'}");
  CHECK_FALSE(r.partial);
}

TEST_CASE("event_stream encodes those messages byte for byte", "[llm][event_stream]") {
  CHECK(keel::llm::encode_event_stream_message({}, "") == aws_no_op);
  CHECK(keel::llm::encode_event_stream_message({}, "{'foo':'bar'}") == aws_no_headers);
  CHECK(keel::llm::encode_event_stream_message(
            {event_stream_header("content-type", event_stream_header_type::string,
                                 "application/json")},
            "{'foo':'bar'}") == aws_one_header);
}

TEST_CASE("event_stream gives the same messages for every split of the body",
          "[llm][event_stream]") {
  const std::string body =
      aws_one_header +
      keel::llm::encode_event_stream_message(
          {event_stream_header(":event-type", event_stream_header_type::string, "metadata"),
           event_stream_header("flag", event_stream_header_type::bool_true, ""),
           event_stream_header("off", event_stream_header_type::bool_false, ""),
           event_stream_header("b", event_stream_header_type::byte, "\x01"),
           event_stream_header("s", event_stream_header_type::int16, std::string("\0\2", 2)),
           event_stream_header("i", event_stream_header_type::int32, std::string("\0\0\0\3", 4)),
           event_stream_header("l", event_stream_header_type::int64, std::string(8, '\4')),
           event_stream_header("a", event_stream_header_type::byte_array, std::string("\0\1", 2)),
           event_stream_header("t", event_stream_header_type::timestamp, std::string(8, '\5')),
           event_stream_header("u", event_stream_header_type::uuid, std::string(16, '\6'))},
          "{\"usage\":{}}") +
      aws_no_op;
  const auto whole = decode(body);
  REQUIRE(whole.ok);
  REQUIRE(whole.messages.size() == 3);
  REQUIRE(whole.messages[1].headers.size() == 10);
  CHECK(whole.messages[1].headers[9].type == event_stream_header_type::uuid);
  CHECK(whole.messages[1].headers[9].value == std::string(16, '\6'));
  CHECK(whole.messages[1].headers[7].value == std::string("\0\1", 2));
  CHECK(whole.messages[1].header(":event-type") == std::optional<std::string_view>("metadata"));
  CHECK_FALSE(whole.messages[1].header("flag").has_value());  // not a string header
  auto same = [&](const std::vector<event_stream_message>& got) {
    REQUIRE(got.size() == whole.messages.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      CHECK(got[i].payload == whole.messages[i].payload);
      REQUIRE(got[i].headers.size() == whole.messages[i].headers.size());
      for (std::size_t h = 0; h < got[i].headers.size(); ++h) {
        CHECK(got[i].headers[h].name == whole.messages[i].headers[h].name);
        CHECK(got[i].headers[h].type == whole.messages[i].headers[h].type);
        CHECK(got[i].headers[h].value == whole.messages[i].headers[h].value);
      }
    }
  };
  for (std::size_t cut = 0; cut <= body.size(); ++cut) {
    keel::llm::event_stream_decoder d;
    std::vector<event_stream_message> out;
    REQUIRE(d.feed(std::string_view(body).substr(0, cut), out));
    CHECK(d.partial() == (cut != 0 && cut != aws_one_header.size() &&
                          cut != body.size() - aws_no_op.size() && cut != body.size()));
    REQUIRE(d.feed(std::string_view(body).substr(cut), out));
    same(out);
  }
  keel::llm::event_stream_decoder d;
  std::vector<event_stream_message> out;
  for (char c : body) {
    REQUIRE(d.feed(std::string_view(&c, 1), out));
  }
  same(out);
  CHECK_FALSE(d.partial());
}

TEST_CASE("event_stream refuses bad CRCs, lengths and headers", "[llm][event_stream]") {
  SECTION("prelude CRC") {
    std::string m = aws_one_header;
    m[9] = static_cast<char>(m[9] ^ 0x01);
    const auto r = decode(m);
    CHECK_FALSE(r.ok);
    CHECK(r.error.find("prelude CRC mismatch") != std::string::npos);
    CHECK(r.messages.empty());
  }
  SECTION("a length changed without its prelude CRC is caught before the lengths are used") {
    std::string m = aws_one_header;
    m[0] = '\x7f';  // would announce a 2 GiB message
    const auto r = decode(m);
    CHECK_FALSE(r.ok);
    CHECK(r.error.find("prelude CRC mismatch") != std::string::npos);
  }
  SECTION("message CRC, payload byte flipped") {
    std::string m = aws_one_header;
    m[m.size() - 6] = 'X';
    const auto r = decode(aws_no_op + m);
    CHECK_FALSE(r.ok);
    CHECK(r.error.find("message CRC mismatch") != std::string::npos);
    CHECK(r.messages.size() == 1);  // the good message before it was delivered
  }
  SECTION("message CRC itself damaged") {
    std::string m = aws_no_headers;
    m.back() = static_cast<char>(m.back() ^ 0x80);
    CHECK(decode(m).error.find("message CRC mismatch") != std::string::npos);
  }
  SECTION("unknown header type") {
    std::string m = aws_one_header;
    m[12 + 1 + 12] = '\x0a';  // the type byte after "content-type": 10 does not exist
    const auto r = decode(fix_crcs(m));
    CHECK_FALSE(r.ok);
    CHECK(r.error.find("unknown value type 10") != std::string::npos);
  }
  SECTION("a string header longer than the headers section") {
    std::string m = aws_one_header;
    m[12 + 1 + 12 + 1 + 1] = '\x40';  // value length 0x0040 > what is left
    CHECK(decode(fix_crcs(m)).error.find("runs past the headers section") != std::string::npos);
  }
  SECTION("headers length beyond the message") {
    std::string m = aws_no_headers;
    m.replace(4, 4, to_u32(0x100));
    CHECK(decode(fix_crcs(m)).error.find("does not fit") != std::string::npos);
  }
  SECTION("total length below the minimum") {
    std::string m = aws_no_op;
    m.replace(0, 4, to_u32(12));
    CHECK(decode(fix_crcs(m)).error.find("below 16") != std::string::npos);
  }
  SECTION("a message over the bound is refused from its prelude, before it is buffered") {
    const std::string m = keel::llm::encode_event_stream_message({}, std::string(100, 'x'));
    keel::llm::event_stream_decoder d(64);
    std::vector<event_stream_message> out;
    CHECK_FALSE(d.feed(std::string_view(m).substr(0, 12), out));
    CHECK(d.error().find("exceeds the limit of 64") != std::string::npos);
    CHECK_FALSE(d.partial());
    CHECK(decode(m, 116).ok);  // exactly at the bound is accepted
  }
  SECTION("the decoder stays failed") {
    std::string m = aws_no_op;
    m[9] = 0;
    keel::llm::event_stream_decoder d;
    std::vector<event_stream_message> out;
    CHECK_FALSE(d.feed(m, out));
    CHECK_FALSE(d.feed(aws_no_op, out));
    CHECK(out.empty());
  }
}

TEST_CASE("event_stream reports a message cut short as partial", "[llm][event_stream]") {
  for (std::size_t cut = 1; cut < aws_one_header.size(); ++cut) {
    const auto r = decode(std::string_view(aws_one_header).substr(0, cut));
    CHECK(r.ok);
    CHECK(r.partial);
    CHECK(r.messages.empty());
  }
}

TEST_CASE("encode_event_stream_message refuses values that do not fit their type",
          "[llm][event_stream]") {
  CHECK_THROWS_AS(keel::llm::encode_event_stream_message(
                      {event_stream_header("i", event_stream_header_type::int32, "12")}, ""),
                  std::length_error);
  CHECK_THROWS_AS(
      keel::llm::encode_event_stream_message(
          {event_stream_header(std::string(256, 'n'), event_stream_header_type::string, "")}, ""),
      std::length_error);
}
