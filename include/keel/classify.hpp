// Classifying any failure (exception, error_code, provider error) into a keel condition.
#pragma once

// Overview
// --------
// Every combinator that reacts to failures (`with_retry`, `with_fallback`, `with_breaker`,
// budgets) first asks "what kind of failure is this?". `keel::classify` answers for any
// `std::exception_ptr`:
//
// - `system_error` with `operation_aborted`: `cancelled`;
// - `keel::failure` `retries_exhausted` / `budget_exhausted`: the condition of its last cause;
// - other keel codes: `deadline_exceeded` is `timeout`; `circuit_open`, `throttled`, `queue_full`
//   and `queue_timeout` are `throttled`; `all_fallbacks_failed` is `permanent`;
// - a provider or transport code: whatever its category's `default_error_condition` says;
// - an Asio or system code: reset, refused, aborted, EOF, broken pipe, unreachable and try-again
//   are `transient`; `timed_out` is `timeout`;
// - anything else (`std::bad_alloc`, `std::runtime_error`, ...): `permanent`.
//
// The server delay hint comes from `keel::failure::retry_after()`.
//
// Example:
//
//     keel::classification c = keel::classify(std::current_exception());
//     if (keel::is_retryable(c.condition)) { ... sleep c.retry_after or backoff ... }
//
// Thread safety: pure functions.

#include <keel/error.hpp>

#include <chrono>
#include <exception>
#include <functional>
#include <optional>

namespace keel {

/// The answer to "what kind of failure is this?".
struct classification {
  /// What a caller should do about it.
  keel::condition condition = keel::condition::permanent;
  /// The server's delay hint (Retry-After and friends), if the failure carried one.
  std::optional<std::chrono::nanoseconds> retry_after;
  /// The specific error code, when the failure had one (default-constructed otherwise).
  boost::system::error_code code;
};

/// A function that classifies failures; `with_retry`, `with_fallback` and breakers accept one to
/// replace the default.
using classifier = std::function<classification(const std::exception_ptr&)>;

/// Classifies any failure; see the table in this header. A null `ep` is `permanent`.
classification classify(const std::exception_ptr& ep) noexcept;

/// Classifies an error code (no delay hint).
classification classify(const boost::system::error_code& ec) noexcept;

/// True for the conditions worth retrying: `transient`, `throttled` and `timeout`.
constexpr bool is_retryable(condition c) noexcept {
  return c == condition::transient || c == condition::throttled || c == condition::timeout;
}

/// A small set of conditions, used by policies ("retry on", "fallback on", "counts as failure").
class condition_set {
 public:
  /// The empty set.
  constexpr condition_set() noexcept = default;
  /// The set of the given conditions.
  constexpr condition_set(std::initializer_list<condition> cs) noexcept {
    for (auto c : cs) {
      bits_ |= bit(c);
    }
  }
  /// True if `c` is in the set.
  constexpr bool contains(condition c) const noexcept { return (bits_ & bit(c)) != 0; }
  /// Adds `c`.
  constexpr condition_set& insert(condition c) noexcept {
    bits_ |= bit(c);
    return *this;
  }
  /// Removes `c`.
  constexpr condition_set& erase(condition c) noexcept {
    bits_ &= ~bit(c);
    return *this;
  }
  /// `transient`, `throttled` and `timeout`.
  static constexpr condition_set retryable() noexcept {
    return {condition::transient, condition::throttled, condition::timeout};
  }
  /// Every condition except `cancelled`.
  static constexpr condition_set all_failures() noexcept {
    return {condition::transient, condition::throttled, condition::timeout, condition::permanent};
  }
  friend constexpr bool operator==(condition_set, condition_set) noexcept = default;

 private:
  static constexpr unsigned bit(condition c) noexcept { return 1u << static_cast<unsigned>(c); }
  unsigned bits_ = 0;
};

}  // namespace keel
