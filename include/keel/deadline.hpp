// with_deadline: run an operation against a timer and cancel it when time runs out.
#pragma once

// Overview
// --------
// `co_await keel::with_deadline(op, 10s)` runs `op()` and races it against a timer:
// - the operation completes first (value or error): its outcome is returned or rethrown at once,
//   and the timer is cancelled;
// - the timer expires first: the operation is cancelled through Asio's cancellation (terminal
//   cancellation of its coroutine thread, so the socket or timer it is waiting on completes with
//   `operation_aborted`), keel waits for it to unwind, and throws `keel::failure` with
//   `keel::error::deadline_exceeded` (condition `timeout`). Nothing of the operation runs after
//   `with_deadline` has returned.
//
// Built on `experimental::make_parallel_group(...).async_wait(wait_for_one())`, not on
// `awaitable_operators::operator||`, which drops a fast failure and waits for the timer.
//
// Nested deadlines: the tighter wins. The operation runs on an executor that carries its
// deadline, so code inside it can ask how much time is left (`keel::deadline_of`,
// `keel::current_deadline`); `with_retry` uses this so that it never starts a backoff sleep that
// would end after the enclosing deadline. Work that the operation `co_spawn`s onto its own
// executor inherits that deadline as information only: spawn detached work on
// `keel::without_deadline(ex)`.
//
// Example:
//
//     std::string reply = co_await keel::with_deadline([&] { return call_model(prompt); }, 10s);
//
// Cancellation: cancelling the caller cancels the operation and the timer; the caller sees the
// operation's error (normally `operation_aborted`), never `deadline_exceeded`.
// Thread safety: each call is independent; the operation runs on the caller's executor.

#include <keel/clock.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/detail/deadline_executor.hpp>
#include <keel/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <optional>
#include <type_traits>

namespace keel {

/// The deadline that applies to code running on `ex`, if a `with_deadline` on `Clock` set one.
template <class Clock = default_clock>
std::optional<typename Clock::time_point> deadline_of(
    const boost::asio::any_io_executor& ex) noexcept {
  return detail::deadline_of<Clock>(ex);
}

/// The deadline that applies to the calling coroutine, if any. Does not suspend.
template <class Clock = default_clock>
boost::asio::awaitable<std::optional<typename Clock::time_point>> current_deadline() {
  co_return detail::deadline_of<Clock>(co_await boost::asio::this_coro::executor);
}

/// Time left before the calling coroutine's deadline (`std::nullopt` if it has none; zero if it
/// has passed). Does not suspend.
template <class Clock = default_clock>
boost::asio::awaitable<std::optional<typename Clock::duration>> remaining_time() {
  auto d = detail::deadline_of<Clock>(co_await boost::asio::this_coro::executor);
  if (!d) {
    co_return std::nullopt;
  }
  const auto now = Clock::now();
  co_return *d > now ? *d - now : Clock::duration::zero();
}

/// `ex` without the keel deadline (on `Clock`) it may carry. Spawn detached work on this executor:
/// work spawned onto a deadline-carrying executor would otherwise report the caller's deadline
/// as its own, although nothing enforces it once the caller has returned.
template <class Clock = default_clock>
boost::asio::any_io_executor without_deadline(const boost::asio::any_io_executor& ex) {
  return detail::strip_deadline<Clock>(ex);
}

namespace detail {

template <class MakeOp>
auto run_op_to_optional(MakeOp op)
    -> boost::asio::awaitable<std::conditional_t<std::is_void_v<op_value_t<MakeOp>>, void,
                                                 std::optional<op_value_t<MakeOp>>>> {
  if constexpr (std::is_void_v<op_value_t<MakeOp>>) {
    co_await op();
  } else {
    co_return std::optional<op_value_t<MakeOp>>(co_await op());
  }
}

}  // namespace detail

namespace detail {

/// The body shared by `with_deadline` and `with_deadline_at`: the deadline is `at` if given,
/// else `timeout` after the moment the returned awaitable first runs.
template <class Clock, class MakeOp>
auto deadline_impl(MakeOp op, std::optional<typename Clock::time_point> at,
                   typename Clock::duration timeout) -> boost::asio::awaitable<op_value_t<MakeOp>> {
  namespace asio = boost::asio;
  using T = op_value_t<MakeOp>;
  auto ex = co_await asio::this_coro::executor;
  const auto deadline = at ? *at : saturating_add(Clock::now(), timeout);

  // Code inside sees the tighter of the enclosing deadline and ours. Our own timer is armed even
  // when the enclosing deadline is tighter: work spawned onto a deadline executor (detached work)
  // is not covered by the enclosing timer, so each with_deadline enforces its own.
  const auto outer = detail::deadline_of<Clock>(ex);
  const auto visible = outer && *outer < deadline ? *outer : deadline;
  if (Clock::now() >= deadline) {
    throw failure(error::deadline_exceeded, "deadline exceeded before the operation started");
  }

  basic_timer<Clock> timer(ex, deadline);
  auto group = asio::experimental::make_parallel_group(
      asio::co_spawn(detail::with_deadline_executor<Clock>(ex, visible),
                     detail::run_op_to_optional(std::move(op)), asio::deferred),
      timer.async_wait(asio::deferred));

  // order[0] says who finished first: 0 the operation, 1 the timer. The deadline expired only
  // if the timer finished first, without error, and the caller was not cancelled meanwhile;
  // otherwise the operation's own outcome (value or error) is what the caller gets.
  if constexpr (std::is_void_v<T>) {
    auto [order, op_error, timer_error] =
        co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
    auto cs = co_await asio::this_coro::cancellation_state;
    if (order[0] == 1 && !timer_error && cs.cancelled() == asio::cancellation_type::none) {
      throw failure(error::deadline_exceeded, "deadline exceeded");
    }
    if (op_error) {
      std::rethrow_exception(op_error);
    }
    co_return;
  } else {
    auto [order, op_error, value, timer_error] =
        co_await group.async_wait(asio::experimental::wait_for_one(), asio::use_awaitable);
    auto cs = co_await asio::this_coro::cancellation_state;
    if (order[0] == 1 && !timer_error && cs.cancelled() == asio::cancellation_type::none) {
      throw failure(error::deadline_exceeded, "deadline exceeded");
    }
    if (op_error) {
      std::rethrow_exception(op_error);
    }
    if (!value) {
      throw boost::system::system_error(asio::error::operation_aborted);
    }
    co_return std::move(*value);
  }
}

}  // namespace detail

/// Runs `op()` and cancels it if it has not completed by `deadline`.
///
/// @param op a callable returning a fresh `awaitable<T>`; called once, taken by value.
/// @param deadline the instant on `Clock` at which the operation is cancelled.
/// @returns the operation's value.
/// @throws keel::failure with `error::deadline_exceeded` if the deadline passed first (also,
///   without calling `op`, if it has already passed); otherwise whatever the operation threw.
/// Cancellation: cancelling the caller cancels the operation; its error propagates.
template <class Clock = default_clock, class MakeOp>
requires detail::is_op_factory_v<MakeOp>
auto with_deadline_at(MakeOp op, typename Clock::time_point deadline)
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  return detail::deadline_impl<Clock>(std::move(op), deadline, {});
}

/// Runs `op()` and cancels it if it has not completed within `timeout`, counted from the moment
/// the returned awaitable starts.
///
/// Same semantics as `with_deadline_at`.
template <class Clock = default_clock, class MakeOp, class Rep, class Period>
requires detail::is_op_factory_v<MakeOp>
auto with_deadline(MakeOp op, std::chrono::duration<Rep, Period> timeout)
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  return detail::deadline_impl<Clock>(std::move(op), std::nullopt,
                                      saturating_cast<typename Clock::duration>(timeout));
}

}  // namespace keel
