// keel's error model: specific error codes, coarse conditions, and the exception keel throws.
#pragma once

// Overview
// --------
// keel follows Boost.Beast: a *specific* enum (`keel::error`) names what went wrong inside keel,
// and a *coarse* enum (`keel::condition`) says what a caller should do about a failure. Both are
// wired into `boost::system::error_code`, so any error code from anywhere (Asio, a transport, a
// provider layer) can be compared against a condition:
//
//     catch (boost::system::system_error const& e) {
//       if (e.code() == keel::condition::throttled) { ... }
//     }
//
// Design decisions (owned by this header, relied on by every other facility):
// - Inside coroutines a failure is an exception. keel throws `keel::failure` (a
//   `boost::system::system_error`) carrying a keel code, the causes that led to it (every
//   alternative's error for `all_fallbacks_failed`, the last attempt's error for
//   `retries_exhausted`), an optional server delay hint, and the number of attempts made.
// - A transport or provider layer reports its own failures by throwing a class derived from
//   `keel::failure` whose code belongs to its own category; that category maps each code to a
//   `keel::condition` through `default_error_condition`, and the server's Retry-After goes into
//   `retry_after()`. The core never needs to know about HTTP.
// - Cancellation is `boost::asio::error::operation_aborted`, whose condition is
//   `condition::cancelled`. It is never retried, never counts against a breaker or a budget.
// - Which failures are worth retrying: `transient`, `throttled` and `timeout` are; `permanent` and
//   `cancelled` are not. `keel::classify` (classify.hpp) applies this to any exception.
// - Names: `to_string(error)` and `to_string(condition)` are the one table of keel's short names
//   ("retries_exhausted", "throttled", ...) used in configs, records, logs and metrics;
//   `parse_condition` reads a condition name back.
// - What decided a failure: `deciding_cause` follows the wrappers that stand for their cause
//   (`retries_exhausted`, `budget_exhausted`, `all_fallbacks_failed`) through their *last* cause
//   (the last attempt; the last alternative tried) to the error that ended the call, and says
//   which wrapper gave up innermost. `root_cause` is its error.
//
// Thread safety: everything here is immutable after construction and safe to share.

#include <boost/system/error_code.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <exception>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace keel {

/// Specific failures produced by keel's own facilities.
enum class error {
  /// `with_retry` made every attempt its policy allows and the last one failed; the last
  /// attempt's error is the first cause.
  retries_exhausted = 1,
  /// A `with_deadline` timer expired before the operation completed; the operation was cancelled.
  deadline_exceeded,
  /// A circuit breaker is open (or isolated) and rejected the call without running it.
  circuit_open,
  /// A throttler could not grant the request without waiting and the caller asked not to wait.
  throttled,
  /// A shared retry budget had no tokens left for another retry; the cause is the last error.
  budget_exhausted,
  /// A bulkhead's queue was full and the call was rejected without waiting.
  queue_full,
  /// A bulkhead's queue wait was longer than its queue timeout.
  queue_timeout,
  /// Every alternative of `with_fallback` failed; each alternative's error is a cause, in order.
  all_fallbacks_failed,
  /// A streamed reply failed after part of it had reached the caller (its commit point), so it
  /// was not retried; the failure that cut it is the first cause. Its condition is `permanent`:
  /// retrying would repeat what the caller already has, unless the caller discards it first.
  stream_interrupted,
};

/// What a caller should do about a failure; compare any `error_code` against these.
enum class condition {
  /// A passing fault (reset, overload, 5xx): worth retrying with backoff.
  transient = 1,
  /// The server (or a local limiter) asked the caller to slow down: retry after a delay, and pace
  /// everybody else too.
  throttled,
  /// An operation ran out of time: worth retrying if time remains.
  timeout,
  /// Retrying cannot help (bad request, auth, quota exhausted, context too long).
  permanent,
  /// The caller cancelled the operation: never retried, never counted as a failure.
  cancelled,
};

/// The category of `keel::error` codes; its `default_error_condition` maps each code to a
/// `keel::condition`.
const boost::system::error_category& error_category() noexcept;

/// The category of `keel::condition` values; its `equivalent` recognises Asio, system and keel
/// codes, so `ec == keel::condition::transient` works for an Asio `connection_reset`.
const boost::system::error_category& condition_category() noexcept;

/// Makes an `error_code` from a keel error.
inline boost::system::error_code make_error_code(error e) noexcept {
  return {static_cast<int>(e), error_category()};
}

/// Makes an `error_condition` from a keel condition.
inline boost::system::error_condition make_error_condition(condition c) noexcept {
  return {static_cast<int>(c), condition_category()};
}

/// Maps any error code to the keel condition that describes it.
///
/// Asio's `operation_aborted` (and `std::errc::operation_canceled`) is `cancelled`; network
/// failures (reset, refused, EOF, broken pipe, unreachable) are `transient`; `timed_out` is
/// `timeout`; a code whose category maps it to a keel condition gets that condition; anything else
/// is `permanent`.
condition condition_of(const boost::system::error_code& ec) noexcept;

/// The exception keel throws: a `system_error` with a code, its causes, a server delay hint and
/// an attempt count.
///
/// Derive from it to report a provider or transport failure with its own code category.
class failure : public boost::system::system_error {
 public:
  /// Constructs a failure.
  /// @param ec the specific error.
  /// @param what a human-readable description (never a secret).
  /// @param causes the errors that led to this one, oldest first.
  /// @param retry_after the server's delay hint, if it sent one.
  failure(boost::system::error_code ec, const std::string& what,
          std::vector<std::exception_ptr> causes = {},
          std::optional<std::chrono::nanoseconds> retry_after = std::nullopt);

  /// The description given at construction (without the "[category:value]" suffix that
  /// `boost::system::system_error` would add).
  const char* what() const noexcept override { return what_.c_str(); }

  /// The errors that led to this one (every alternative's error for `all_fallbacks_failed`).
  const std::vector<std::exception_ptr>& causes() const noexcept { return causes_; }

  /// The server's delay hint (Retry-After), if any.
  std::optional<std::chrono::nanoseconds> retry_after() const noexcept { return retry_after_; }

  /// How many attempts were made before this failure was raised (0 if not applicable).
  int attempts() const noexcept { return attempts_; }

  /// Sets the attempt count (used by `with_retry`).
  void set_attempts(int n) noexcept { attempts_ = n; }

 private:
  std::string what_;
  std::vector<std::exception_ptr> causes_;
  std::optional<std::chrono::nanoseconds> retry_after_;
  int attempts_ = 0;
};

/// Throws `keel::failure` for a keel error, with an optional cause.
[[noreturn]] void throw_failure(error e, std::exception_ptr cause = nullptr, int attempts = 0);

/// The short name of a keel error: "retries_exhausted", "deadline_exceeded", "circuit_open",
/// "throttled", "budget_exhausted", "queue_full", "queue_timeout", "all_fallbacks_failed",
/// "stream_interrupted" ("unknown" for a value outside the enum).
std::string_view to_string(error e) noexcept;

/// The short name of a condition: "transient", "throttled", "timeout", "permanent",
/// "cancelled" ("unknown" for a value outside the enum).
std::string_view to_string(condition c) noexcept;

/// The condition named `name` (one of the names `to_string(condition)` returns), if any.
std::optional<condition> parse_condition(std::string_view name) noexcept;

/// What decided a failure (see `deciding_cause`).
struct decided_by {
  /// The error that ended the call (never a retries_exhausted, budget_exhausted or
  /// all_fallbacks_failed wrapper that has causes); null for a null input.
  std::exception_ptr error;
  /// The innermost wrapper that gave up (`retries_exhausted`, `budget_exhausted` or
  /// `all_fallbacks_failed`): why retrying or falling back stopped. Empty if there was none.
  std::optional<keel::error> gave_up;
};

/// Follows `retries_exhausted`, `budget_exhausted` and `all_fallbacks_failed` failures through
/// their last cause (the last attempt; the last alternative tried) to the error that decided
/// the outcome, at most 64 levels deep.
decided_by deciding_cause(const std::exception_ptr& ep);

/// `deciding_cause(ep).error`: the error that ended the call; `ep` itself if it is not one of
/// the wrappers `deciding_cause` follows.
std::exception_ptr root_cause(std::exception_ptr ep);

/// A short description of any exception (its `what()`, or "unknown exception").
std::string describe(const std::exception_ptr& ep);

}  // namespace keel

namespace boost::system {
template <>
struct is_error_code_enum<keel::error> : std::true_type {};
template <>
struct is_error_condition_enum<keel::condition> : std::true_type {};
}  // namespace boost::system
