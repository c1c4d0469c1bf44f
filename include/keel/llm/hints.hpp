// Server hints in LLM provider responses: retry delays, x-should-retry and rate-limit headers.
#pragma once

// Overview
// --------
// Providers tell clients how long to wait and how much quota is left. These functions parse those
// headers exactly and defensively: a malformed, negative, empty or out-of-range value gives
// `std::nullopt`; nothing here throws or crashes on any input. Surrounding spaces and tabs are
// ignored.
//
// Delay hints and their precedence (`server_delay_hint`, first usable one wins; a malformed
// header is skipped, not fatal):
//   1. `retry-after-ms`: milliseconds, may be fractional ("1500", "12.5");
//   2. `Retry-After`: delta-seconds ("120") or an HTTP-date in any of RFC 9110's three formats
//      (IMF-fixdate, obsolete RFC 850, asctime), turned into a delay from `now`; a date in the
//      past is a zero delay;
//   3. `x-amz-retry-after`: integer milliseconds (AWS).
// No clamping is done here: `retry_policy::max_retry_after` bounds what keel will sleep.
//
// Rate-limit headers (`parse_rate_limits`): OpenAI `x-ratelimit-{limit,remaining,reset}-
// {requests,tokens}` (reset as a Go-style duration: "1s", "6m0s", "20ms", "1h2m3.5s") and
// Anthropic `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,
// reset}` (reset as an RFC 3339 time, turned into a delay from `now`).
//
// Example:
//
//     auto now = std::chrono::system_clock::now();
//     if (auto d = keel::llm::server_delay_hint(res.headers, now)) { /* sleep *d */ }
//     keel::llm::rate_limit_info rl = keel::llm::parse_rate_limits(res.headers, now);
//
// Thread safety: pure functions.

#include <keel/http/message.hpp>

#include <chrono>
#include <optional>
#include <string_view>

namespace keel::llm {

/// Parses `retry-after-ms`: a non-negative decimal number of milliseconds, possibly fractional.
/// @return the delay, or nullopt if malformed, negative or too large for `nanoseconds`.
std::optional<std::chrono::nanoseconds> parse_retry_after_ms(std::string_view value) noexcept;

/// Parses an HTTP-date in any of RFC 9110's formats: IMF-fixdate ("Sun, 06 Nov 1994 08:49:37
/// GMT"), RFC 850 ("Sunday, 06-Nov-94 08:49:37 GMT") and asctime ("Sun Nov  6 08:49:37 1994").
/// @param now used only for RFC 850's two-digit year: a year more than 50 years after `now` is
///   taken to be in the previous century (RFC 9110 §5.6.7).
/// @return the instant, or nullopt if malformed (bad names, out-of-range fields, 31 Feb, ...) or
///   outside what `system_clock` holds (about 1678 to 2261 with libstdc++).
std::optional<std::chrono::system_clock::time_point> parse_http_date(
    std::string_view value, std::chrono::system_clock::time_point now) noexcept;

/// Parses `Retry-After`: delta-seconds (a non-negative integer) or an HTTP-date.
/// @return the delay from `now` (zero for a date in the past), or nullopt if malformed.
std::optional<std::chrono::nanoseconds> parse_retry_after(
    std::string_view value, std::chrono::system_clock::time_point now) noexcept;

/// Parses AWS `x-amz-retry-after`: a plain decimal integer of milliseconds with an optional sign.
/// @return the delay, or nullopt if negative, malformed or too large.
std::optional<std::chrono::nanoseconds> parse_amz_retry_after(std::string_view value) noexcept;

/// Parses `x-should-retry`: "true" or "false" (ASCII case-insensitive).
/// @return the flag, or nullopt for any other value.
std::optional<bool> parse_should_retry(std::string_view value) noexcept;

/// The server's delay hint from a response's headers: `retry-after-ms`, then `Retry-After`, then
/// `x-amz-retry-after`; the first present and well-formed one wins.
/// @return the delay, or nullopt when no usable hint was sent.
std::optional<std::chrono::nanoseconds> server_delay_hint(
    const keel::http::header_list& headers, std::chrono::system_clock::time_point now) noexcept;

/// Parses a Go-style duration as OpenAI sends in `x-ratelimit-reset-*`: one or more
/// `<number><unit>` with units h, m, s, ms, us (or µs), ns and optionally fractional numbers
/// ("1s", "6m0s", "20ms", "1h2m3.5s", "0.5s"), or a bare "0".
/// @return the duration, or nullopt if malformed, negative or too large.
std::optional<std::chrono::nanoseconds> parse_go_duration(std::string_view value) noexcept;

/// Parses an RFC 3339 timestamp ("2024-05-01T12:00:30Z", "2024-05-01T12:00:30.25+02:00").
/// @return the instant, or nullopt if malformed or outside what `system_clock` holds.
std::optional<std::chrono::system_clock::time_point> parse_rfc3339(std::string_view value) noexcept;

/// Live quota as reported by the provider; each field is absent when not sent or malformed.
struct rate_limit_info {
  /// Requests allowed per window.
  std::optional<double> limit_requests;
  /// Requests left in the current window.
  std::optional<double> remaining_requests;
  /// Tokens allowed per window (Anthropic: the most restrictive token limit).
  std::optional<double> limit_tokens;
  /// Tokens left in the current window.
  std::optional<double> remaining_tokens;
  /// Time until the request window resets.
  std::optional<std::chrono::nanoseconds> reset_requests;
  /// Time until the token window resets.
  std::optional<std::chrono::nanoseconds> reset_tokens;
  /// Anthropic input-token limit, remaining and reset.
  std::optional<double> limit_input_tokens, remaining_input_tokens;
  /// Time until the input-token window resets (Anthropic).
  std::optional<std::chrono::nanoseconds> reset_input_tokens;
  /// Anthropic output-token limit, remaining and reset.
  std::optional<double> limit_output_tokens, remaining_output_tokens;
  /// Time until the output-token window resets (Anthropic).
  std::optional<std::chrono::nanoseconds> reset_output_tokens;

  /// True if no field was parsed.
  bool empty() const noexcept {
    return !limit_requests && !remaining_requests && !limit_tokens && !remaining_tokens &&
           !reset_requests && !reset_tokens && !limit_input_tokens && !remaining_input_tokens &&
           !reset_input_tokens && !limit_output_tokens && !remaining_output_tokens &&
           !reset_output_tokens;
  }
};

/// Parses OpenAI and Anthropic rate-limit headers (both sets are read; a field sent by both is
/// taken from OpenAI's). Anthropic reset times become delays from `now` (zero if past).
rate_limit_info parse_rate_limits(const keel::http::header_list& headers,
                                  std::chrono::system_clock::time_point now) noexcept;

}  // namespace keel::llm
