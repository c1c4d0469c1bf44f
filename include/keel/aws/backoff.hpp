// AWS SDK retry delays: standard 2.0, standard 2.1 (with x-amz-retry-after) and legacy backoff.
#pragma once

// Overview
// --------
// Pure delay formulas, in seconds, for the failed attempt `attempt` (1-based: 1 is the initial
// request, so the delay before attempt 2 is `..._delay(rand, 1)`). `rand` is a uniform draw on
// [0, 1) supplied by the caller (e.g. from `keel::random_source`); passing 1 gives the
// "pinned-jitter" upper bounds used by the cross-SDK tests.
//
// | function                   | formula                                                     |
// | -------------------------- | ----------------------------------------------------------- |
// | `standard_delay_v2_0`      | `rand * min(2^(n-1), 20)`; x-amz-retry-after ignored         |
// | `standard_delay_v2_1`      | `rand * min(scale * 2^(n-1), 20)`, scale 1 (throttling),     |
// |                            | 0.05 (other), 0.025 (other, DynamoDB / DynamoDB Streams)     |
// | `apply_retry_after`        | 2.1 only: `max(t, min(ra, t + 5))` for a valid header        |
// | `legacy_delay`             | `rand * 2^(n-1)`, no cap                                     |
//
// Example:
//
//     double t = keel::aws::standard_delay_v2_1(rng.uniform(), attempt, /*throttling*/ false);
//     double delay = keel::aws::apply_retry_after(t, res["x-amz-retry-after"]);  // up to t + 5
//
// Thread safety: every function is pure and may be called concurrently.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <optional>
#include <string_view>

namespace keel::aws {

/// The standard mode's maximum computed backoff, in seconds.
inline constexpr double max_backoff_seconds = 20.0;

/// The longest time the 2.1 x-amz-retry-after rule may add beyond the computed backoff.
inline constexpr double max_retry_after_extension_seconds = 5.0;

namespace detail {
/// 2^(attempt-1), treating attempts below 1 as 1.
inline double exp2_attempt(int attempt) noexcept {
  return std::ldexp(1.0, (attempt < 1 ? 1 : attempt) - 1);
}
}  // namespace detail

/// Standard 2.0 backoff: `rand * min(2^(n-1), 20)` seconds (1, 2, 4, 8, 16, 20, 20… at rand 1).
/// @param rand a uniform draw on [0, 1).
/// @param attempt the failed attempt's number, from 1.
/// @param max_backoff the cap in seconds (botocore's 20 unless an SDK setting changes it).
inline double standard_delay_v2_0(double rand, int attempt,
                                  double max_backoff = max_backoff_seconds) noexcept {
  return rand * std::min(detail::exp2_attempt(attempt), max_backoff);
}

/// The 2.1 backoff scale for a failure: 1.0 for throttling, else 0.05, or 0.025 for DynamoDB.
/// @param is_throttling the failure is a throttling error.
/// @param is_dynamodb the service is `dynamodb` or `dynamodb-streams`.
constexpr double standard_v2_1_scale(bool is_throttling, bool is_dynamodb = false) noexcept {
  if (is_throttling) {
    return 1.0;
  }
  return is_dynamodb ? 0.025 : 0.05;
}

/// Standard 2.1 backoff before x-amz-retry-after: `rand * min(scale * 2^(n-1), 20)` seconds.
/// @param rand a uniform draw on [0, 1).
/// @param attempt the failed attempt's number, from 1.
/// @param is_throttling the failure is a throttling error (scale 1.0).
/// @param is_dynamodb the service is `dynamodb` or `dynamodb-streams` (scale 0.025).
/// @param max_backoff the cap in seconds (botocore's 20 unless an SDK setting changes it).
inline double standard_delay_v2_1(double rand, int attempt, bool is_throttling,
                                  bool is_dynamodb = false,
                                  double max_backoff = max_backoff_seconds) noexcept {
  const double scale = standard_v2_1_scale(is_throttling, is_dynamodb);
  return rand * std::min(scale * detail::exp2_attempt(attempt), max_backoff);
}

/// Parses an `x-amz-retry-after` header: a plain decimal integer of milliseconds with an
/// optional sign. Anything else (whitespace, separators, fractions, overflow) or a negative
/// value is treated as absent.
/// @param header the header value.
/// @return the delay in seconds, or nothing if the header is invalid.
inline std::optional<double> parse_retry_after(std::string_view header) noexcept {
  if (!header.empty() && header.front() == '+') {
    header.remove_prefix(1);
    if (!header.empty() && (header.front() == '-' || header.front() == '+')) {
      return std::nullopt;
    }
  }
  if (header.empty()) {
    return std::nullopt;
  }
  long long ms = 0;
  const char* end = header.data() + header.size();
  auto [ptr, ec] = std::from_chars(header.data(), end, ms);
  if (ec != std::errc{} || ptr != end || ms < 0) {
    return std::nullopt;
  }
  return static_cast<double>(ms) / 1000.0;
}

/// Applies the 2.1 x-amz-retry-after rule to a computed backoff `t`: with a valid header of
/// `ra` seconds the delay is `max(t, min(ra, t + 5))` (so it may exceed 20 s); otherwise `t`.
/// @param t the computed backoff in seconds (`standard_delay_v2_1`).
/// @param header the header value, or nothing if the response had none.
inline double apply_retry_after(double t, std::optional<std::string_view> header) noexcept {
  if (!header) {
    return t;
  }
  const std::optional<double> ra = parse_retry_after(*header);
  if (!ra) {
    return t;
  }
  return std::max(t, std::min(*ra, t + max_retry_after_extension_seconds));
}

/// Legacy backoff with the global defaults: `rand * 2^(n-1)` seconds, with no cap.
/// @param rand a uniform draw on [0, 1) (the legacy "base").
/// @param attempt the failed attempt's number, from 1.
inline double legacy_delay(double rand, int attempt) noexcept {
  return rand * detail::exp2_attempt(attempt);
}

}  // namespace keel::aws
