// keel::basic_throttler, a shared token bucket over requests and LLM tokens, and with_throttle.
#pragma once

// Overview
// --------
// A provider account allows so many requests per second and so many LLM tokens per minute. One
// `keel::throttler` per account, shared by every caller, keeps the whole process under both
// limits, so callers wait locally instead of collecting 429s:
//
// - Two buckets, acquired all-or-nothing. A call costs `requests` (usually 1) and `tokens` (an
//   estimate of the LLM tokens it will use); it is granted only when both buckets can pay.
// - Lazy refill. The levels are recomputed from `Clock::now()` whenever the throttler is used;
//   there is no background coroutine, and no timer is armed while nobody waits.
// - Strict FIFO. Once anybody waits, later callers queue behind them, even if they are cheap
//   enough to pass: a large request is never starved by small ones. One timer, armed for the
//   instant the head of the queue can be paid, serves the whole queue.
// - Exact rate under load. A timer fires a little late (Linux timer slack, a busy thread); the
//   waiters that became payable in between are granted as of the instants they became payable,
//   so lateness does not waste tokens (with burst 1 at 2,000/s it used to cost 15% of the rate).
//   Lateness beyond 50 ms (a stalled thread) is not made up, which bounds the catch-up burst.
// - A cost above a bucket's capacity cannot deadlock: it waits for a full bucket, takes
//   everything and leaves the bucket in debt (a negative level) that later callers wait out.
// - `settle` corrects the token estimate once the provider reports real usage; `pause_until`
//   holds everybody after a 429 with Retry-After; `set_rate` and `set_available_*` follow the
//   provider's rate-limit headers.
//
// Example:
//
//     keel::throttler bucket{ex, {.requests_per_second = 50, .burst = 10,
//                                 .tokens_per_minute = 90'000}};
//
//     const double estimate = keel::llm::estimate_tokens(req);
//     co_await bucket.acquire({.requests = 1, .tokens = estimate});
//     keel::llm::chat_response reply = co_await keel::llm::complete(http, ep, req);
//     bucket.settle(estimate, static_cast<double>(reply.usage.input + reply.usage.output));
//
//     // On a 429 with "retry-after: 2": hold every caller, not just this one.
//     bucket.pause_for(2s);
//
//     // Acquire, call and settle with the reported usage in one step (keel::llm::complete):
//     keel::llm::chat_response reply2 = co_await keel::with_throttle(
//         bucket, {.requests = 1, .tokens = estimate},
//         [&] { return keel::llm::complete(http, ep, req); },
//         [](const keel::llm::chat_response& r) { return r.usage.input + r.usage.output; });
//
// `with_throttle(bucket, cost, op)` lives here, beside the throttler, as `with_bulkhead` lives in
// <keel/bulkhead.hpp>: it acquires `cost`, then runs `op()` once. Settling with real usage is an
// optional fourth argument (a function from the result to the tokens actually used) rather than
// a separate facility: it is the one correction every LLM caller wants, and it needs the
// estimate that only the combinator still holds. A call that throws is not settled (its usage is
// unknown, and a request that reached the provider may well have been billed): its estimate
// stays spent.
//
// Failures: `acquire` only ever throws `boost::system::system_error` with
// `boost::asio::error::operation_aborted` (condition `keel::condition::cancelled`, never retried)
// when the waiting coroutine is cancelled or the throttler is destroyed while it waits.
//
// Thread safety: every member function may be called concurrently from any thread (one mutex
// guards the state; the timer runs on the throttler's executor), and a waiter always resumes on
// its own coroutine's executor.

#include <keel/clock.hpp>
#include <keel/detail/awaitable_traits.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <utility>

namespace keel {

/// Settings of a throttler: the refill rates and capacities of its two buckets.
///
/// Every field is optional: a default-constructed `throttler_options` limits nothing.
struct throttler_options {
  /// Requests granted per second; 0 means requests are not limited.
  double requests_per_second = 0;
  /// Capacity of the request bucket: how many requests may start back to back after a quiet
  /// period. 1 (the default) spaces every request evenly; 0 paces like 1 but without any saving.
  double burst = 1;
  /// LLM tokens granted per minute; 0 means tokens are not limited.
  double tokens_per_minute = 0;
  /// Capacity of the token bucket; 0 (the default) means one minute's worth.
  double token_burst = 0;
};

/// What one call takes from a throttler; both parts are taken together or not at all.
struct throttle_cost {
  /// Requests (usually 1; 0 for a call that only spends tokens, which the request bucket then
  /// never holds back). Negative, NaN and infinite values count as 0.
  double requests = 1;
  /// Estimated LLM tokens (prompt + expected completion). Negative, NaN and infinite values
  /// count as 0.
  double tokens = 0;
};

namespace detail {
template <class Clock>
class throttler_state;
}  // namespace detail

/// A shared token bucket over requests and LLM tokens, with a strict FIFO queue of waiters.
///
/// Both buckets start full. Not copyable or movable: share it by reference (or `shared_ptr`).
/// Destroying it completes every waiting `acquire` with `operation_aborted`; it must be destroyed
/// before its executor's execution context, like any Asio I/O object.
///
/// Thread safety: all members may be called concurrently from any thread; waiters resume on
/// their own executor.
template <class Clock = std::chrono::steady_clock>
class basic_throttler {
 public:
  /// The clock that drives refill and waits.
  using clock_type = Clock;
  /// The clock's duration.
  using duration = typename Clock::duration;
  /// The clock's time point.
  using time_point = typename Clock::time_point;
  /// The executor the throttler's timer runs on.
  using executor_type = boost::asio::any_io_executor;

  /// Creates a throttler whose buckets start full.
  /// @param ex the executor for the throttler's single timer (any thread of it may run it).
  /// @param options rates and capacities; negative, NaN and infinite values count as 0.
  explicit basic_throttler(executor_type ex, throttler_options options = {});

  /// Completes every waiting `acquire` with `operation_aborted`.
  ~basic_throttler();

  /// Not copyable (nor movable): waiters and the timer refer to it.
  basic_throttler(const basic_throttler&) = delete;
  /// Not copyable.
  basic_throttler& operator=(const basic_throttler&) = delete;

  /// The executor the throttler's timer runs on.
  executor_type get_executor() const noexcept;

  /// Waits until `cost` can be taken from both buckets, in FIFO order, then takes it.
  ///
  /// When nobody is queued and both buckets can pay now, returns without suspending, without
  /// allocating a handler and without touching a timer. Otherwise joins the back of the queue;
  /// nobody overtakes a queued waiter. A part of `cost` larger than its bucket's capacity waits for
  /// a full bucket, takes everything and leaves debt.
  /// @param cost requests and estimated LLM tokens (default: one request, no tokens).
  /// @throws boost::system::system_error with `operation_aborted` if the awaiting coroutine's
  ///   cancellation slot fires (terminal, partial or total) while queued, or the throttler is
  ///   destroyed. A cancelled waiter takes nothing and leaves the queue at once; the waiters
  ///   behind it are re-evaluated. If the cancellation arrives after the grant but before the
  ///   coroutine resumes, the grant is given back and `acquire` still throws. An `acquire`
  ///   granted without waiting does not check for cancellation (it has nothing to cancel).
  boost::asio::awaitable<void> acquire(throttle_cost cost = {});

  /// Takes `cost` only if both buckets can pay now and nobody is queued.
  /// @returns true if taken; false (nothing taken) otherwise.
  bool try_acquire(throttle_cost cost = {});

  /// Corrects the token bucket once a call's real usage is known.
  ///
  /// Gives back `estimated_tokens - actual_tokens` (up to the capacity) or, if the call used
  /// more than estimated, charges the difference, possibly leaving debt. Waiters that the
  /// correction unblocks are granted at once. No effect when tokens are not limited. Negative,
  /// NaN and infinite amounts count as 0, as in `throttle_cost`.
  void settle(double estimated_tokens, double actual_tokens);

  /// Gives back what a grant took (a call that was never sent, a finished call's slot when the
  /// request bucket is used as a window), up to each bucket's capacity. Waiters it unblocks are
  /// granted at once. Negative, NaN and infinite amounts count as 0, as in `throttle_cost`.
  void release(throttle_cost cost);

  /// Grants nothing to anybody before `t` (e.g. a 429's Retry-After instant).
  ///
  /// Later calls may extend the pause, never shorten it. The buckets do not refill while paused:
  /// once the pause ends, queued waiters are released at the configured rate from the levels
  /// the buckets had when the pause began, not in one burst.
  void pause_until(time_point t);

  /// Same as `pause_until(Clock::now() + d)`.
  void pause_for(duration d);

  /// The end of the current (or last) pause; the clock's epoch if never paused.
  time_point paused_until() const;

  /// Changes both rates at run time (0 = unlimited), e.g. from a provider's rate-limit headers.
  ///
  /// The buckets are first refilled at the old rates up to now; the timer is re-armed for the
  /// head of the queue at the new rate. A dimension that becomes limited starts full. With
  /// `token_burst` 0 the token capacity follows the new per-minute rate.
  void set_rate(double requests_per_second, double tokens_per_minute);

  /// Changes the request bucket's capacity; a level above it is cut down to it.
  void set_burst(double burst);

  /// Changes the token bucket's capacity (0 = one minute's worth); a level above it is cut.
  void set_token_burst(double token_burst);

  /// Sets the request level (e.g. from `x-ratelimit-remaining-requests`), capped at capacity.
  /// A negative value is debt; NaN and infinite values are ignored.
  void set_available_requests(double requests);

  /// Sets the token level (e.g. from `x-ratelimit-remaining-tokens`), capped at capacity.
  /// A negative value is debt; NaN and infinite values are ignored.
  void set_available_tokens(double tokens);

  /// Requests available now (negative when in debt; infinity when requests are not limited).
  double available_requests() const;

  /// LLM tokens available now (negative when in debt; infinity when tokens are not limited).
  double available_tokens() const;

  /// The current settings (after any `set_rate` and `set_*burst`).
  throttler_options options() const;

  /// How many `acquire` calls are queued now.
  std::size_t waiters() const;

  /// How many acquisitions have been granted (`acquire`, with or without waiting, and
  /// successful `try_acquire`).
  std::uint64_t total_granted() const;

  /// How many `acquire` calls had to join the queue (granted, cancelled or aborted since).
  std::uint64_t total_waits() const;

  /// Total time spent queued by waiters that have left the queue (granted, cancelled, aborted).
  duration total_wait_time() const;

  /// Total time during which the rate held calls back: at least one `acquire` was queued and
  /// the bucket was not paused, up to now. Unlike `total_wait_time` it counts time once however
  /// many wait, and counts the present wait. An adaptive controller grows its rate by this time
  /// only: time when nobody waits (callers sleeping out a Retry-After) proves nothing about the
  /// server.
  duration total_queued_time() const;

 private:
  std::shared_ptr<detail::throttler_state<Clock>> state_;
};

/// The throttler on `std::chrono::steady_clock`.
using throttler = basic_throttler<>;

namespace detail {
// `F` maps the non-void result of the factory `MakeOp` to a token count.
template <class F, class MakeOp>
concept settles_result =
    is_op_factory_v<MakeOp> && !std::is_void_v<op_value_t<MakeOp>> &&
    std::is_invocable_v<F&, const op_value_t<MakeOp>&> &&
    std::convertible_to<std::invoke_result_t<F&, const op_value_t<MakeOp>&>, double>;
}  // namespace detail

/// Acquires `cost` from `bucket`, then runs `op()` once.
///
/// The cost is not given back when `op` completes: a throttler meters starts, not concurrency
/// (use `with_bulkhead` to cap calls in flight). Use the overload with `actual_tokens` to correct
/// the token estimate once the result is known.
/// @param bucket the throttler; must outlive the call.
/// @param cost requests and estimated LLM tokens to take, as for `acquire`.
/// @param op a callable returning a fresh `boost::asio::awaitable<T>` (T may be void), taken by
///   value so it lives in this coroutine's frame; called once, only after `cost` is granted.
/// @returns what the awaitable returns.
/// @throws what `acquire` throws (then `op` is never called), or what `op`'s awaitable throws
///   (rethrown unchanged; the cost stays spent).
///
/// Cancellation: while queued in the throttler, cancellation (terminal, partial or total, as the
/// coroutine's cancellation state lets through) makes `acquire` throw `operation_aborted`: the
/// waiter leaves the queue having taken nothing (a grant that raced with the cancellation is
/// given back), the waiters behind it are re-evaluated, and `op` is never called. A cancellation
/// requested before the call starts throws at its first `co_await` (Asio's `throw_if_cancelled`,
/// on by default), before anything is taken. Once `op` runs, cancellation is the business of
/// `op`'s awaitable; what it throws (typically `operation_aborted`) propagates and the cost is
/// not given back.
template <class Clock, class MakeOp>
requires detail::is_op_factory_v<MakeOp>
auto with_throttle(basic_throttler<Clock>& bucket, throttle_cost cost, MakeOp op)
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  co_await bucket.acquire(cost);
  co_return co_await op();
}

/// Acquires `cost` from `bucket`, runs `op()` once, then settles the token estimate with the
/// tokens the result reports.
///
/// On success, calls `bucket.settle(cost.tokens, actual_tokens(result))` before returning the
/// result: unused tokens are given back, an overrun is charged. A call that throws is not settled.
/// @param bucket the throttler; must outlive the call.
/// @param cost requests and estimated LLM tokens to take, as for `acquire`.
/// @param op a callable returning a fresh `boost::asio::awaitable<T>` with non-void T, taken by
///   value; called once, only after `cost` is granted.
/// @param actual_tokens a callable taking `const T&` and returning the tokens actually used
///   (convertible to double; e.g. `[](const auto& r) { return r.usage.input + r.usage.output; }`
///   for a `keel::llm::chat_response`), taken by value; called only when `op`'s awaitable
///   returns.
/// @returns what the awaitable returns.
/// @throws what `acquire` throws (then `op` is never called), what `op`'s awaitable throws
///   (unsettled), or what `actual_tokens` throws (unsettled; the result is lost).
///
/// Cancellation: as for the three-argument overload; a call cancelled while `op` runs is not
/// settled, so its whole estimate stays spent.
template <class Clock, class MakeOp, class ActualTokens>
requires detail::settles_result<ActualTokens, MakeOp>
auto with_throttle(basic_throttler<Clock>& bucket, throttle_cost cost, MakeOp op,
                   ActualTokens actual_tokens)
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  co_await bucket.acquire(cost);
  detail::op_value_t<MakeOp> result = co_await op();
  const double used = static_cast<double>(std::invoke(actual_tokens, std::as_const(result)));
  bucket.settle(cost.tokens, used);
  co_return result;
}

}  // namespace keel

#include <keel/impl/throttler.hpp>
