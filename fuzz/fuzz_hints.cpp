// Fuzz target: server hint parsers (Retry-After, HTTP-dates, retry-after-ms, x-amz-retry-after,
// Go durations, RFC 3339, rate-limit headers) of keel/llm/hints.hpp and keel/aws/backoff.hpp.
//
// The whole input is given to every single-value parser, then read as a block of `name: value`
// lines for `server_delay_hint` and `parse_rate_limits`. The parsers promise never to throw or
// crash and to return nullopt for anything malformed; on top of that we check that delays are
// never negative, that `server_delay_hint` agrees with the parsers it is built from, and that the
// two x-amz-retry-after parsers (keel::llm and keel::aws) agree.
#include "fuzz_support.hpp"

#include <keel/aws/backoff.hpp>
#include <keel/llm/hints.hpp>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace {

using std::chrono::nanoseconds;
using std::chrono::system_clock;
using opt_ns = std::optional<nanoseconds>;

// The parsers treat more than this many nanoseconds as out of range (see lib/llm/hints.cpp).
constexpr double max_ns = 9.0e18;

system_clock::time_point at_seconds(std::int64_t s) {
  return system_clock::time_point(
      std::chrono::duration_cast<system_clock::duration>(std::chrono::seconds(s)));
}

bool is_digits(std::string_view s) {
  if (s.empty()) {
    return false;
  }
  for (char c : s) {
    if (c < '0' || c > '9') {
      return false;
    }
  }
  return true;
}

void check_delay(const opt_ns& d) {
  if (d) {
    KEEL_FUZZ_CHECK(d->count() >= 0);
    KEEL_FUZZ_CHECK(static_cast<double>(d->count()) <= max_ns);
  }
}

void check_value(std::string_view v, system_clock::time_point now) {
  const std::string_view t = keel::fuzz::trim(v);

  check_delay(keel::llm::parse_retry_after_ms(v));
  check_delay(keel::llm::parse_go_duration(v));
  (void)keel::llm::parse_rfc3339(v);
  (void)keel::llm::parse_should_retry(v);

  const auto date = keel::llm::parse_http_date(v, now);
  const opt_ns retry_after = keel::llm::parse_retry_after(v, now);
  check_delay(retry_after);
  if (!t.empty() && t.front() >= '0' && t.front() <= '9') {
    // Delta-seconds: an integer, never a date.
    if (retry_after) {
      KEEL_FUZZ_CHECK(is_digits(t));
      // Whole seconds (exact while the product fits a double's 53-bit mantissa).
      if (retry_after->count() < 9'000'000'000'000'000) {
        KEEL_FUZZ_CHECK(retry_after->count() % 1'000'000'000 == 0);
      }
    }
  } else if (date) {
    KEEL_FUZZ_CHECK(retry_after.has_value());
    const nanoseconds expected = *date <= now ? nanoseconds::zero() : nanoseconds(*date - now);
    KEEL_FUZZ_CHECK(*retry_after == expected);
  } else {
    KEEL_FUZZ_CHECK(!retry_after);
  }

  // x-amz-retry-after: keel::llm (nanoseconds, trims spaces) and keel::aws (seconds, strict)
  // read the same grammar; without surrounding whitespace they must agree.
  const opt_ns amz = keel::llm::parse_amz_retry_after(v);
  check_delay(amz);
  if (t.size() == v.size()) {
    const std::optional<double> aws = keel::aws::parse_retry_after(v);
    if (!aws) {
      KEEL_FUZZ_CHECK(!amz);
    } else {
      KEEL_FUZZ_CHECK(*aws >= 0);
      const double ns = *aws * 1e9;
      if (ns < 0.99 * max_ns) {
        KEEL_FUZZ_CHECK(amz.has_value());
        KEEL_FUZZ_CHECK(std::fabs(static_cast<double>(amz->count()) - ns) <= 1.0 + ns * 1e-12);
      } else if (ns > 1.01 * max_ns) {
        KEEL_FUZZ_CHECK(!amz);
      }
    }
  }
}

void check_headers(const keel::http::header_list& h, system_clock::time_point now) {
  // server_delay_hint: retry-after-ms, then Retry-After, then x-amz-retry-after.
  opt_ns expected;
  if (auto v = h.find("retry-after-ms")) {
    expected = keel::llm::parse_retry_after_ms(*v);
  }
  if (!expected) {
    if (auto v = h.find("retry-after")) {
      expected = keel::llm::parse_retry_after(*v, now);
    }
  }
  if (!expected) {
    if (auto v = h.find("x-amz-retry-after")) {
      expected = keel::llm::parse_amz_retry_after(*v);
    }
  }
  const opt_ns hint = keel::llm::server_delay_hint(h, now);
  KEEL_FUZZ_CHECK(hint == expected);

  const keel::llm::rate_limit_info rl = keel::llm::parse_rate_limits(h, now);
  for (const auto& count : {rl.limit_requests, rl.remaining_requests, rl.limit_tokens,
                            rl.remaining_tokens, rl.limit_input_tokens, rl.remaining_input_tokens,
                            rl.limit_output_tokens, rl.remaining_output_tokens}) {
    if (count) {
      KEEL_FUZZ_CHECK(std::isfinite(*count) && *count >= 0);
    }
  }
  for (const auto& reset :
       {rl.reset_requests, rl.reset_tokens, rl.reset_input_tokens, rl.reset_output_tokens}) {
    check_delay(reset);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text = keel::fuzz::as_text(data, size);
  // Two clocks: RFC 850's two-digit years are read relative to now.
  const system_clock::time_point nows[] = {at_seconds(1'780'000'000),  // 2026-05-28
                                           at_seconds(784'111'777)};   // 1994-11-06
  for (const auto now : nows) {
    check_value(text, now);
    keel::http::header_list headers;
    (void)keel::fuzz::read_header_block(text, headers);
    check_headers(headers, now);
  }
  return 0;
}
