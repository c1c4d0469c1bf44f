// Tests for keel/llm/hints.hpp: Retry-After and friends, HTTP-dates, durations, rate limits.
#include <keel/llm/hints.hpp>

#include <catch2/catch.hpp>

#include <optional>
#include <string>

using namespace std::chrono_literals;
using std::chrono::nanoseconds;
using std::chrono::system_clock;
using opt_ns = std::optional<nanoseconds>;

namespace {
// Sun, 06 Nov 1994 08:49:37 GMT is 784111777 seconds after the epoch.
const system_clock::time_point nov_6_1994 =
    system_clock::time_point(std::chrono::duration_cast<system_clock::duration>(784111777s));
const system_clock::time_point now_2026 = system_clock::time_point(
    std::chrono::duration_cast<system_clock::duration>(1'780'000'000s));  // 2026-05-28
}  // namespace

TEST_CASE("retry-after-ms accepts non-negative milliseconds and ignores the rest", "[llm][hints]") {
  const std::string huge(400, '9');
  struct row {
    std::string in;
    opt_ns out;
  };
  const row table[] = {
      {"1500", nanoseconds(1500ms)},
      {"0", nanoseconds(0)},
      {"12.5", nanoseconds(12'500'000)},
      {"  250\t", nanoseconds(250ms)},
      {"3.", nanoseconds(3ms)},
      {"", std::nullopt},
      {"   ", std::nullopt},
      {"-5", std::nullopt},
      {"+5", std::nullopt},
      {"abc", std::nullopt},
      {"1e3", std::nullopt},
      {"inf", std::nullopt},
      {"nan", std::nullopt},
      {".5", std::nullopt},
      {"10 ms", std::nullopt},
      {"99999999999999999999999999", std::nullopt},
      {huge, std::nullopt},
  };
  for (const auto& r : table) {
    INFO("'" << r.in << "'");
    CHECK(keel::llm::parse_retry_after_ms(r.in) == r.out);
  }
}

TEST_CASE("HTTP-dates parse in all three RFC 9110 formats", "[llm][hints]") {
  const auto now = now_2026;
  CHECK(keel::llm::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT", now) == nov_6_1994);
  CHECK(keel::llm::parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", now) == nov_6_1994);
  CHECK(keel::llm::parse_http_date("Sun Nov  6 08:49:37 1994", now) == nov_6_1994);
  CHECK(keel::llm::parse_http_date("Sun Nov 16 08:49:37 1994", now) == nov_6_1994 + 240h);
  CHECK(keel::llm::parse_http_date("Thu, 29 Feb 2024 23:59:59 GMT", now).has_value());

  const char* junk[] = {
      "",
      "Sun, 06 Nov 1994 08:49:37 UTC",
      "Sun, 6 Nov 1994 08:49:37 GMT",
      "sun, 06 Nov 1994 08:49:37 GMT",
      "Sun, 06 Nov 1994 08:49:37 GMT trailing",
      "Sun, 06 Nov 1994 24:00:00 GMT",
      "Sun, 06 Nov 1994 08:60:00 GMT",
      "Fri, 30 Feb 2024 10:00:00 GMT",
      "Thu, 29 Feb 2023 10:00:00 GMT",
      "Sun, 06 Foo 1994 08:49:37 GMT",
      "Sun, 06 Nov 1994 08:49",
      "Sunday, 06-Nov-1994 08:49:37 GMT",
      "Sun Nov 6 08:49:37 1994",
      "Sun Nov  6 08:49:37 94",
      "Sun, 00 Nov 1994 08:49:37 GMT",
  };
  for (const char* j : junk) {
    INFO("'" << j << "'");
    CHECK_FALSE(keel::llm::parse_http_date(j, now).has_value());
  }
}

TEST_CASE("RFC 850 two-digit years are read within 50 years of now", "[llm][hints]") {
  auto year_of = [](system_clock::time_point t) {
    auto s = std::chrono::duration_cast<std::chrono::seconds>(t.time_since_epoch()).count();
    return s;
  };
  // now = 2026: "76" is 50 years ahead (2076, kept); "77" is 51 years ahead (-> 1977).
  auto y2076 = keel::llm::parse_http_date("Friday, 01-Jan-76 00:00:00 GMT", now_2026);
  auto y1977 = keel::llm::parse_http_date("Saturday, 01-Jan-77 00:00:00 GMT", now_2026);
  auto y2030 = keel::llm::parse_http_date("Tuesday, 01-Jan-30 00:00:00 GMT", now_2026);
  REQUIRE(y2076);
  REQUIRE(y1977);
  REQUIRE(y2030);
  CHECK(year_of(*y2076) == 3345062400);  // 2076-01-01
  CHECK(year_of(*y1977) == 220924800);   // 1977-01-01
  CHECK(year_of(*y2030) == 1893456000);  // 2030-01-01
}

TEST_CASE("Retry-After is delta-seconds or a date relative to now", "[llm][hints]") {
  const auto now = nov_6_1994 - 30s;
  struct row {
    const char* in;
    opt_ns out;
  };
  const row table[] = {
      {"120", nanoseconds(120s)},
      {" 0 ", nanoseconds(0)},
      {"Sun, 06 Nov 1994 08:49:37 GMT", nanoseconds(30s)},
      {"Sunday, 06-Nov-94 08:49:37 GMT", nanoseconds(30s)},
      {"Sun Nov  6 08:49:37 1994", nanoseconds(30s)},
      {"Sat, 05 Nov 1994 08:49:37 GMT", nanoseconds(0)},  // in the past
      {"-1", std::nullopt},
      {"1.5", std::nullopt},
      {"12abc", std::nullopt},
      {"", std::nullopt},
      {"soon", std::nullopt},
      {"99999999999999999999", std::nullopt},
      {"9223372036854775807", std::nullopt},
  };
  for (const auto& r : table) {
    INFO("'" << r.in << "'");
    CHECK(keel::llm::parse_retry_after(r.in, now) == r.out);
  }
}

TEST_CASE("x-amz-retry-after and x-should-retry parse strictly", "[llm][hints]") {
  CHECK(keel::llm::parse_amz_retry_after("1500") == opt_ns(1500ms));
  CHECK(keel::llm::parse_amz_retry_after("+20") == opt_ns(20ms));
  CHECK(keel::llm::parse_amz_retry_after("-0") == opt_ns(0ms));
  CHECK(keel::llm::parse_amz_retry_after("-5") == std::nullopt);
  CHECK(keel::llm::parse_amz_retry_after("1.5") == std::nullopt);
  CHECK(keel::llm::parse_amz_retry_after("") == std::nullopt);
  CHECK(keel::llm::parse_amz_retry_after("+") == std::nullopt);
  CHECK(keel::llm::parse_amz_retry_after("0x10") == std::nullopt);
  CHECK(keel::llm::parse_amz_retry_after("99999999999999999999") == std::nullopt);

  CHECK(keel::llm::parse_should_retry("true") == std::optional<bool>(true));
  CHECK(keel::llm::parse_should_retry(" FALSE ") == std::optional<bool>(false));
  CHECK(keel::llm::parse_should_retry("yes") == std::nullopt);
  CHECK(keel::llm::parse_should_retry("") == std::nullopt);
  CHECK(keel::llm::parse_should_retry("1") == std::nullopt);
}

TEST_CASE("server_delay_hint prefers retry-after-ms, then Retry-After, then AWS", "[llm][hints]") {
  const auto now = nov_6_1994;
  using keel::http::header_list;
  CHECK(
      keel::llm::server_delay_hint(
          header_list{{"Retry-After", "7"}, {"retry-after-ms", "250"}, {"x-amz-retry-after", "9"}},
          now) == opt_ns(250ms));
  CHECK(keel::llm::server_delay_hint(header_list{{"RETRY-AFTER", "7"}, {"x-amz-retry-after", "9"}},
                                     now) == opt_ns(7s));
  CHECK(keel::llm::server_delay_hint(header_list{{"x-amz-retry-after", "9"}}, now) == opt_ns(9ms));
  // A malformed higher-precedence hint is skipped, not fatal.
  CHECK(keel::llm::server_delay_hint(header_list{{"retry-after-ms", "junk"}, {"Retry-After", "3"}},
                                     now) == opt_ns(3s));
  CHECK(keel::llm::server_delay_hint(header_list{{"Retry-After", "junk"}}, now) == std::nullopt);
  CHECK(keel::llm::server_delay_hint(header_list{}, now) == std::nullopt);
}

TEST_CASE("Go durations from OpenAI reset headers parse exactly", "[llm][hints]") {
  struct row {
    const char* in;
    opt_ns out;
  };
  const row table[] = {
      {"1s", nanoseconds(1s)},
      {"6m0s", nanoseconds(6min)},
      {"20ms", nanoseconds(20ms)},
      {"1h2m3.5s", nanoseconds(1h + 2min + 3500ms)},
      {"0.5s", nanoseconds(500ms)},
      {"0", nanoseconds(0)},
      {"15us", nanoseconds(15us)},
      {"7ns", nanoseconds(7)},
      {"", std::nullopt},
      {"1", std::nullopt},
      {"-1s", std::nullopt},
      {"1d", std::nullopt},
      {"s", std::nullopt},
      {"1s junk", std::nullopt},
      {"9999999999999h", std::nullopt},
  };
  for (const auto& r : table) {
    INFO("'" << r.in << "'");
    CHECK(keel::llm::parse_go_duration(r.in) == r.out);
  }
}

TEST_CASE("RFC 3339 timestamps parse with fractions and offsets", "[llm][hints]") {
  CHECK(keel::llm::parse_rfc3339("1994-11-06T08:49:37Z") == nov_6_1994);
  CHECK(keel::llm::parse_rfc3339("1994-11-06T10:49:37+02:00") == nov_6_1994);
  CHECK(keel::llm::parse_rfc3339("1994-11-06T08:49:37.25Z") == nov_6_1994 + 250ms);
  CHECK_FALSE(keel::llm::parse_rfc3339("1994-11-06 08:49").has_value());
  CHECK_FALSE(keel::llm::parse_rfc3339("1994-13-06T08:49:37Z").has_value());
  CHECK_FALSE(keel::llm::parse_rfc3339("1994-11-06T08:49:37").has_value());
  CHECK_FALSE(keel::llm::parse_rfc3339("1994-11-06T08:49:37.Z").has_value());
  CHECK_FALSE(keel::llm::parse_rfc3339("").has_value());
}

TEST_CASE("dates that system_clock cannot hold are out of range, not undefined", "[llm][hints]") {
  // Regression (fuzz/fuzz_hints): well-formed dates before 1678 or after 2261 overflowed the
  // int64 nanoseconds of system_clock (signed overflow, undefined behaviour).
  const char* dates[] = {
      "Fri, 31 Dec 9999 23:59:59 GMT",
      "Mon, 01 Jan 0001 00:00:00 GMT",
      "Fri Dec 31 23:59:59 9999",
      "Sat, 12 Apr 2262 00:00:00 GMT",
  };
  for (const char* d : dates) {
    INFO("'" << d << "'");
    CHECK_FALSE(keel::llm::parse_http_date(d, now_2026).has_value());
    CHECK_FALSE(keel::llm::parse_retry_after(d, now_2026).has_value());
  }
  CHECK_FALSE(keel::llm::parse_rfc3339("4052-05-28T00:00:06Z").has_value());
  CHECK_FALSE(keel::llm::parse_rfc3339("0001-01-01T00:00:00+23:59").has_value());
  CHECK(keel::llm::parse_rfc3339("2261-12-31T23:59:59.999999999-23:59").has_value());
  CHECK(keel::llm::parse_http_date("Sat, 01 Jan 1678 00:00:00 GMT", now_2026).has_value());
  const keel::http::header_list far{{"anthropic-ratelimit-tokens-reset", "4052-05-28T00:00:06Z"}};
  CHECK_FALSE(keel::llm::parse_rate_limits(far, now_2026).reset_tokens.has_value());
}

TEST_CASE("rate-limit headers from OpenAI and Anthropic fill rate_limit_info", "[llm][hints]") {
  using keel::http::header_list;
  const header_list openai{
      {"x-ratelimit-limit-requests", "10000"},       {"x-ratelimit-remaining-requests", "9999"},
      {"x-ratelimit-reset-requests", "6m0s"},        {"x-ratelimit-limit-tokens", "2000000"},
      {"x-ratelimit-remaining-tokens", " 1999500 "}, {"x-ratelimit-reset-tokens", "20ms"}};
  auto o = keel::llm::parse_rate_limits(openai, nov_6_1994);
  CHECK(o.limit_requests == 10000.0);
  CHECK(o.remaining_requests == 9999.0);
  CHECK(o.reset_requests == opt_ns(6min));
  CHECK(o.limit_tokens == 2000000.0);
  CHECK(o.remaining_tokens == 1999500.0);
  CHECK(o.reset_tokens == opt_ns(20ms));

  const header_list anthropic{{"anthropic-ratelimit-requests-limit", "50"},
                              {"anthropic-ratelimit-requests-remaining", "49"},
                              {"anthropic-ratelimit-requests-reset", "1994-11-06T08:50:07Z"},
                              {"anthropic-ratelimit-tokens-limit", "junk"},
                              {"anthropic-ratelimit-tokens-reset", "1990-01-01T00:00:00Z"},
                              {"anthropic-ratelimit-input-tokens-limit", "40000"},
                              {"anthropic-ratelimit-output-tokens-remaining", "7000"},
                              {"anthropic-ratelimit-output-tokens-reset", "not a time"}};
  auto a = keel::llm::parse_rate_limits(anthropic, nov_6_1994);
  CHECK(a.limit_requests == 50.0);
  CHECK(a.remaining_requests == 49.0);
  CHECK(a.reset_requests == opt_ns(30s));
  CHECK_FALSE(a.limit_tokens.has_value());
  CHECK(a.reset_tokens == opt_ns(0s));
  CHECK(a.limit_input_tokens == 40000.0);
  CHECK(a.remaining_output_tokens == 7000.0);
  CHECK_FALSE(a.reset_output_tokens.has_value());

  CHECK(keel::llm::parse_rate_limits(header_list{{"x-ratelimit-limit-requests", "-1"}}, nov_6_1994)
            .empty());
}
