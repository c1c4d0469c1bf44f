// AWS SDK error classification: the standard-mode transient/throttling rules and legacy policies.
#pragma once

// Overview
// --------
// Pure predicates over what one attempt produced: the HTTP status (0 when there was no
// response), the parsed AWS error code (`Error.Code`, empty when there is none) and whether the
// attempt raised a transport exception (connection, read/connect timeout, SSL, proxy, streaming).
//
// * `standard` / `adaptive` modes (§2 of the reference): an attempt is retryable when it is
//   *transient* (codes `RequestTimeout`, `RequestTimeoutException`, `PriorRequestNotComplete`;
//   status 500/502/503/504; any transport exception) or *throttling* (a fixed list of codes,
//   whatever the status). A bare 429 is **not** retryable in standard mode.
// * `legacy` mode (§6, the global `_retry.json` policies): status 500/502/503/504/509/429;
//   status 400 with one of five throttling codes; socket errors.
//
// Callers check `attempt < max_attempts` first; these functions only classify. Modeled
// `retryable` error shapes and the service-specific cases (STS `IDPCommunicationError`,
// DynamoDB CRC32, legacy per-service policies) are not covered here.
//
// Example:
//
//     bool retry = attempt < max_attempts &&
//                  keel::aws::standard_retryable(503, "ServiceUnavailable", false, false);
//     bool throttled = keel::aws::is_throttling_code("ThrottlingException");  // adaptive input
//
// Thread safety: every function is pure and may be called concurrently.

#include <array>
#include <cstddef>
#include <string_view>

namespace keel::aws {

/// The error codes that the standard mode treats as throttling (§2.2), whatever the status.
inline constexpr std::array<std::string_view, 14> throttling_codes{
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
};

/// The error codes that the standard mode treats as transient (§2.1).
inline constexpr std::array<std::string_view, 3> transient_codes{
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
};

/// The error codes that the legacy global policy retries with status 400 (§6).
inline constexpr std::array<std::string_view, 5> legacy_throttling_codes{
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "ProvisionedThroughputExceededException",
};

namespace detail {
template <std::size_t N>
constexpr bool contains(const std::array<std::string_view, N>& list,
                        std::string_view code) noexcept {
  for (std::string_view c : list) {
    if (c == code) {
      return true;
    }
  }
  return false;
}
}  // namespace detail

/// True if `code` is in the fixed throttling list (the adaptive mode's "is throttling" input).
/// @param code the parsed AWS error code (case-sensitive; empty means none).
constexpr bool is_throttling_code(std::string_view code) noexcept {
  return detail::contains(throttling_codes, code);
}

/// True if `code` is one of the transient error codes.
/// @param code the parsed AWS error code (case-sensitive; empty means none).
constexpr bool is_transient_code(std::string_view code) noexcept {
  return detail::contains(transient_codes, code);
}

/// True if an attempt's outcome is transient in standard mode: a transient code, status
/// 500/502/503/504 with any code, or a transport exception (a timeout is one).
/// @param status the HTTP status, or 0 if there was no response.
/// @param code the parsed AWS error code, or empty.
/// @param is_transport_error the attempt raised a transport exception.
/// @param is_timeout the attempt raised a connect or read timeout.
constexpr bool is_transient(int status, std::string_view code, bool is_transport_error,
                            bool is_timeout) noexcept {
  return is_transport_error || is_timeout || is_transient_code(code) || status == 500 ||
         status == 502 || status == 503 || status == 504;
}

/// True if standard (or adaptive) mode retries this outcome, before the max-attempts check:
/// transient or throttling. A 429 without a known code is not retryable.
/// @param status the HTTP status, or 0 if there was no response.
/// @param code the parsed AWS error code, or empty.
/// @param is_transport_error the attempt raised a transport exception.
/// @param is_timeout the attempt raised a connect or read timeout.
constexpr bool standard_retryable(int status, std::string_view code, bool is_transport_error,
                                  bool is_timeout) noexcept {
  return is_transient(status, code, is_transport_error, is_timeout) || is_throttling_code(code);
}

/// True if the legacy mode's global default policies retry this outcome, before the
/// max-attempts check: status 500/502/503/504/509/429; status 400 with a legacy throttling code;
/// or a socket error (connect/read timeout, endpoint connection, proxy, SSL, closed connection).
/// Other exceptions (e.g. response-streaming errors) are not retried in legacy mode.
/// @param status the HTTP status, or 0 if there was no response.
/// @param code the parsed AWS error code, or empty.
/// @param is_socket_error the attempt raised an exception of the socket-error family.
constexpr bool legacy_retryable(int status, std::string_view code, bool is_socket_error) noexcept {
  if (is_socket_error) {
    return true;
  }
  switch (status) {
    case 500:
    case 502:
    case 503:
    case 504:
    case 509:
    case 429:
      return true;
    case 400:
      return detail::contains(legacy_throttling_codes, code);
    default:
      return false;
  }
}

}  // namespace keel::aws
