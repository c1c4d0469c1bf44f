// Tests for keel/llm/sse.hpp: the server-sent events decoder's field rules, line ends and bounds.
#include <keel/llm/sse.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

namespace {

using keel::llm::sse_event;

// "event|data|id" per event, events separated by "\n--\n".
std::string show(const std::vector<sse_event>& events) {
  std::string s;
  for (const auto& e : events) {
    s += e.event + "|" + e.data + "|" + e.id + "\n--\n";
  }
  return s;
}

std::vector<sse_event> decode(std::string_view body, std::size_t piece = 0) {
  keel::llm::sse_decoder d;
  std::vector<sse_event> out;
  if (piece == 0) {
    REQUIRE(d.feed(body, out));
  } else {
    for (std::size_t i = 0; i < body.size(); i += piece) {
      REQUIRE(d.feed(body.substr(i, piece), out));
    }
  }
  d.finish(out);
  return out;
}

}  // namespace

TEST_CASE("sse joins data lines, names events, keeps ids and skips comments", "[llm][sse]") {
  const std::string body =
      ": a comment\n"
      "event: first\n"
      "data: one\n"
      "data:two\n"
      "data\n"
      "id: 7\n"
      "\n"
      "data:  leading space kept after the first\n"
      "\n"
      "event: no-data\n"
      "\n"
      "unknown: field\n"
      "data: third\n"
      "\n";
  const auto events = decode(body);
  REQUIRE(events.size() == 3);
  CHECK(events[0].event == "first");
  CHECK(events[0].data == "one\ntwo\n");
  CHECK(events[0].id == "7");
  CHECK(events[1].event.empty());
  CHECK(events[1].data == " leading space kept after the first");
  CHECK(events[1].id == "7");  // the last event id persists
  // "event: no-data" had no data: not dispatched, and its name does not leak into the next.
  CHECK(events[2].event.empty());
  CHECK(events[2].data == "third");
}

TEST_CASE("sse accepts CRLF, LF and CR line ends, split anywhere, and a BOM", "[llm][sse]") {
  const std::string lf = "event: a\ndata: x\n\ndata: y\ndata: z\n\n";
  std::string crlf;
  std::string cr;
  for (char c : lf) {
    crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
    cr += c == '\n' ? '\r' : c;
  }
  const std::string expected = show(decode(lf));
  CHECK(expected == "a|x|\n--\n|y\nz|\n--\n");
  for (const std::string& body : {lf, crlf, cr, "\xEF\xBB\xBF" + crlf}) {
    CHECK(show(decode(body)) == expected);
    CHECK(show(decode(body, 1)) == expected);
    for (std::size_t cut = 0; cut <= body.size(); ++cut) {
      keel::llm::sse_decoder d;
      std::vector<sse_event> out;
      REQUIRE(d.feed(std::string_view(body).substr(0, cut), out));
      REQUIRE(d.feed(std::string_view(body).substr(cut), out));
      CHECK_FALSE(d.finish(out));
      CHECK(show(out) == expected);
    }
  }
}

TEST_CASE("sse does not take a BOM-like prefix that is not a BOM", "[llm][sse]") {
  // "\xEF" then 'd': the held byte is line content, so the field is "\xEF" "data".
  const auto events = decode(
      "\xEF"
      "data: x\n\ndata: y\n\n",
      1);
  REQUIRE(events.size() == 1);
  CHECK(events[0].data == "y");
}

TEST_CASE("sse finish dispatches a complete event missing its blank line", "[llm][sse]") {
  keel::llm::sse_decoder d;
  std::vector<sse_event> out;
  REQUIRE(d.feed("data: [DONE]\n", out));
  CHECK(out.empty());
  CHECK_FALSE(d.finish(out));
  REQUIRE(out.size() == 1);
  CHECK(out[0].data == "[DONE]");

  // A line cut before its end is discarded and reported.
  keel::llm::sse_decoder cut;
  std::vector<sse_event> none;
  REQUIRE(cut.feed("data: [DON", none));
  CHECK(cut.finish(none));
  CHECK(none.empty());
}

TEST_CASE("sse keeps a numeric retry and ignores others", "[llm][sse]") {
  keel::llm::sse_decoder d;
  std::vector<sse_event> out;
  REQUIRE(d.feed("retry: 1500\n\nretry: 2x\n\n", out));
  CHECK(d.retry_ms() == 1500);
  CHECK(out.empty());
}

TEST_CASE("sse fails on a line or event larger than its bound, before buffering more",
          "[llm][sse]") {
  SECTION("a line without an end, fed a byte at a time") {
    keel::llm::sse_decoder d(64);
    std::vector<sse_event> out;
    std::size_t fed = 0;
    bool ok = true;
    while (ok && fed < 1000) {
      ok = d.feed("a", out);
      ++fed;
    }
    CHECK_FALSE(ok);
    CHECK(fed == 65);  // failed as soon as the line passed 64 bytes
    CHECK(d.failed());
    CHECK(d.error().find("longer than 64") != std::string::npos);
    CHECK_FALSE(d.feed("\n\n", out));  // stays failed
  }
  SECTION("an event whose data lines add up past the bound") {
    keel::llm::sse_decoder d(64);
    std::vector<sse_event> out;
    const std::string line = "data: " + std::string(30, 'x') + "\n";
    CHECK(d.feed(line, out));
    CHECK_FALSE(d.feed(line + line, out));
    CHECK(d.error().find("data is longer than 64") != std::string::npos);
    CHECK(out.empty());
  }
  SECTION("events within the bound pass") {
    keel::llm::sse_decoder d(64);
    std::vector<sse_event> out;
    const std::string body = "data: " + std::string(50, 'x') + "\n\n";
    CHECK(d.feed(body + body, out));
    CHECK(out.size() == 2);
  }
}
