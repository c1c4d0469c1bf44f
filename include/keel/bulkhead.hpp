// keel::basic_bulkhead: caps how many calls run at once, with a bounded FIFO queue and timeout.
#pragma once

// Overview
// --------
// A bulkhead keeps one slow or failing dependency from tying up every coroutine in the process:
// at most `max_concurrent` calls run through it at once. A caller that finds every slot busy
// waits in a FIFO queue of at most `max_queue` callers for at most `queue_timeout`; beyond that
// it is rejected at once, which sheds load instead of piling it up.
//
// - `acquire()` returns a move-only `bulkhead_permit`; the slot is released when the permit is
//   destroyed (or `release()`d) and handed directly to the oldest waiter, so nobody can slip in
//   between a release and the waiter it was meant for.
// - `with_bulkhead(b, op)` runs a factory's awaitable once while holding a permit.
// - The defaults are Microsoft's standard concurrency limiter: 1000 concurrent calls, no queue.
//
// Example:
//
//     keel::bulkhead pool{ex, {.max_concurrent = 8, .max_queue = 32, .queue_timeout = 2s}};
//
//     auto call = [&] { return keel::llm::complete(http, ep, req); };  // <keel/llm/complete.hpp>
//     keel::llm::chat_response reply = co_await keel::with_bulkhead(pool, call);
//
//     // or by hand:
//     keel::bulkhead_permit permit = co_await pool.acquire();
//     co_await work();  // the slot is released when `permit` goes out of scope
//
// Failures, all thrown from `acquire` (and so from `with_bulkhead` before `op` runs):
// - `keel::failure` with `keel::error::queue_full` when every slot is busy and the queue is full
//   (at once, without suspending); condition `throttled`, so worth retrying after a delay;
// - `keel::failure` with `keel::error::queue_timeout` after waiting `queue_timeout`; condition
//   `throttled`;
// - `boost::system::system_error` with `operation_aborted` when the waiting coroutine is cancelled
//   or the bulkhead is destroyed while it waits (condition `cancelled`, never retried).
//
// Thread safety: every member function may be called concurrently from any thread, and permits
// may be released on any thread (one mutex guards the state; the queue-timeout timer runs on the
// bulkhead's executor); a waiter always resumes on its own coroutine's executor.

#include <keel/clock.hpp>
#include <keel/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>

namespace keel {

/// Settings of a bulkhead.
struct bulkhead_options {
  /// Calls allowed to hold a permit at the same time (at least 1; 0 counts as 1).
  std::size_t max_concurrent = 1000;
  /// Callers allowed to wait for a slot; 0 (the default) rejects at once when all slots are busy.
  std::size_t max_queue = 0;
  /// Longest wait in the queue; zero (the default) waits as long as it takes.
  std::chrono::nanoseconds queue_timeout = std::chrono::nanoseconds::zero();
};

namespace detail {
class bulkhead_permit_source;
template <class Clock>
class bulkhead_state;
}  // namespace detail

/// The right to run one call through a bulkhead; move-only, releases its slot when destroyed.
///
/// A default-constructed or moved-from permit holds no slot. A permit may outlive its bulkhead.
///
/// Thread safety: a permit is a plain value (one owner at a time); releasing it is thread-safe
/// with respect to the bulkhead.
class bulkhead_permit {
 public:
  /// A permit that holds no slot.
  bulkhead_permit() noexcept = default;

  /// Takes the slot of `other`, which then holds none.
  bulkhead_permit(bulkhead_permit&& other) noexcept = default;

  /// Releases this permit's slot, if any, then takes the slot of `other`.
  bulkhead_permit& operator=(bulkhead_permit&& other) noexcept;

  /// Move-only.
  bulkhead_permit(const bulkhead_permit&) = delete;
  /// Move-only.
  bulkhead_permit& operator=(const bulkhead_permit&) = delete;

  /// Releases the slot, if any.
  ~bulkhead_permit() { release(); }

  /// True if this permit holds a slot.
  explicit operator bool() const noexcept { return source_ != nullptr; }

  /// Releases the slot now (handing it to the oldest waiter, if any); no effect without one.
  void release() noexcept;

 private:
  template <class Clock>
  friend class basic_bulkhead;

  explicit bulkhead_permit(std::shared_ptr<detail::bulkhead_permit_source> source) noexcept
      : source_(std::move(source)) {}

  std::shared_ptr<detail::bulkhead_permit_source> source_;
};

/// Caps concurrent calls, with a bounded FIFO queue and a queue timeout.
///
/// Not copyable or movable: share it by reference. Destroying it completes every waiting
/// `acquire` with `operation_aborted`; outstanding permits stay valid. Destroy it before its
/// executor's execution context, like any Asio I/O object.
///
/// Thread safety: all members may be called concurrently from any thread; waiters resume on
/// their own executor.
template <class Clock = std::chrono::steady_clock>
class basic_bulkhead {
 public:
  /// The clock that measures queue timeouts.
  using clock_type = Clock;
  /// The executor the queue-timeout timer runs on.
  using executor_type = boost::asio::any_io_executor;

  /// Creates a bulkhead with every slot free.
  /// @param ex the executor for the queue-timeout timer.
  /// @param options limits; `max_concurrent` 0 counts as 1.
  explicit basic_bulkhead(executor_type ex, bulkhead_options options = {});

  /// Completes every waiting `acquire` with `operation_aborted`.
  ~basic_bulkhead();

  /// Not copyable (nor movable): waiters and the timer refer to it.
  basic_bulkhead(const basic_bulkhead&) = delete;
  /// Not copyable.
  basic_bulkhead& operator=(const basic_bulkhead&) = delete;

  /// The executor the queue-timeout timer runs on.
  executor_type get_executor() const noexcept;

  /// Waits for a free slot, in FIFO order, and returns a permit that holds it.
  ///
  /// With a slot free and nobody queued, returns without suspending.
  /// @throws keel::failure with `error::queue_full` at once if every slot is busy and
  ///   `max_queue` callers already wait (counted by `rejected()`).
  /// @throws keel::failure with `error::queue_timeout` after waiting `queue_timeout`
  ///   (counted by `timed_out()`).
  /// @throws boost::system::system_error with `operation_aborted` if the awaiting coroutine's
  ///   cancellation slot fires (terminal, partial or total) while queued, or the bulkhead is
  ///   destroyed; the waiter leaves the queue and takes no slot. If the cancellation arrives
  ///   after a slot was handed over but before the coroutine resumes, the slot is passed on to
  ///   the next waiter and `acquire` still throws.
  boost::asio::awaitable<bulkhead_permit> acquire();

  /// Takes a slot only if one is free now and nobody is queued.
  /// @returns a permit holding the slot, or an empty permit (no effect on `rejected()`).
  bulkhead_permit try_acquire();

  /// Slots held now (permits alive, including ones handed to waiters not yet resumed).
  std::size_t in_flight() const;

  /// Callers waiting now.
  std::size_t queued() const;

  /// How many `acquire` calls were rejected with `queue_full`.
  std::uint64_t rejected() const;

  /// How many `acquire` calls gave up with `queue_timeout`.
  std::uint64_t timed_out() const;

  /// The settings (with `max_concurrent` at least 1).
  bulkhead_options options() const noexcept;

 private:
  std::shared_ptr<detail::bulkhead_state<Clock>> state_;
};

/// The bulkhead on `std::chrono::steady_clock`.
using bulkhead = basic_bulkhead<>;

namespace detail {
template <class Awaitable>
struct with_bulkhead_value;
template <class T, class Executor>
struct with_bulkhead_value<boost::asio::awaitable<T, Executor>> {
  using type = T;
};
}  // namespace detail

/// Runs `op()` once while holding a permit of `b`.
///
/// @param b the bulkhead; must outlive the call.
/// @param op a callable returning a fresh `awaitable<T>` (T may be void), taken by value so it
///   lives in this coroutine's frame; it is called only after a slot is acquired.
/// @returns what the awaitable returns; the slot is released when it completes or throws.
/// @throws what `acquire` throws (then `op` is never called), or what `op`'s awaitable throws.
///   Cancellation while queued throws `operation_aborted`; once `op` runs, cancellation is
///   the business of `op`'s awaitable.
template <class Clock, class MakeOp>
auto with_bulkhead(basic_bulkhead<Clock>& b, MakeOp op) -> boost::asio::awaitable<
    typename detail::with_bulkhead_value<std::invoke_result_t<MakeOp&>>::type> {
  const bulkhead_permit permit = co_await b.acquire();
  co_return co_await op();
}

}  // namespace keel

#include <keel/impl/bulkhead.hpp>
