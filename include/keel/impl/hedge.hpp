// Implementation of keel::with_hedge: the attempts' arbiter, the race state and the call's loop.
#pragma once

#include <keel/clock.hpp>
#include <keel/deadline.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/hedge.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/this_coro.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace keel {

namespace detail {

/// The part of one `with_hedge` call that does not depend on the clock or the value type: who
/// won, which attempts run, and their cancellation signals. Lives in the call's frame, which
/// outlives every attempt (the call waits for all of them), so attempts hold plain pointers to it.
/// Everything here runs on the caller's executor (see the header's thread-safety note).
class hedge_arbiter {
 public:
  static constexpr std::size_t none = static_cast<std::size_t>(-1);

  struct attempt_slot {
    boost::asio::cancellation_signal cancel;  // bound to the attempt's coroutine thread
    hedge_attempt handle;
    bool running = false;
    std::exception_ptr error;  // its failure, if it failed before any attempt committed
  };

  explicit hedge_arbiter(std::size_t n) : slots(std::make_unique<attempt_slot[]>(n)), count(n) {
    for (std::size_t i = 0; i < n; ++i) {
      slots[i].handle.arbiter_ = this;
      slots[i].handle.index_ = i;
    }
  }
  hedge_arbiter(const hedge_arbiter&) = delete;
  hedge_arbiter& operator=(const hedge_arbiter&) = delete;

  /// The commit point: the first attempt to get here wins and every other one is cancelled now.
  bool try_commit(std::size_t i) noexcept {
    if (winner == i) {
      return true;
    }
    if (winner != none || caller_cancelled) {
      return false;
    }
    winner = i;
    cancel_running(i);
    on_commit();
    return true;
  }

  /// Terminal cancellation of every running attempt except `except`. Asio cancellation handlers
  /// post their completions, so no attempt's completion runs inside this loop.
  void cancel_running(std::size_t except) noexcept {
    for (std::size_t j = 0; j < count; ++j) {
      if (j != except && slots[j].running) {
        slots[j].cancel.emit(boost::asio::cancellation_type::terminal);
      }
    }
  }

  /// Records attempt `i`'s failure, unless a winner or the caller's cancellation makes it moot
  /// (a loser's unwinding error is expected and means nothing).
  void record_failure(std::size_t i, std::exception_ptr e) noexcept {
    if (winner != none || caller_cancelled) {
      return;
    }
    failed = true;
    slots[i].error = std::move(e);
    if (first_failure == none) {
      first_failure = i;
    }
  }

  /// True if another hedge may start now: none committed, none failed, caller not cancelled.
  bool may_hedge() const noexcept {
    return started < count && winner == none && !failed && !caller_cancelled;
  }

  /// The failure to report when no attempt committed: the primary's, else the first in time.
  std::exception_ptr failure_to_report() const noexcept {
    if (slots[0].error) {
      return slots[0].error;
    }
    return first_failure == none ? nullptr : slots[first_failure].error;
  }

  std::unique_ptr<attempt_slot[]> slots;
  std::size_t count;
  std::size_t started = 0;
  std::size_t in_flight = 0;
  std::size_t winner = none;
  std::size_t first_failure = none;
  bool failed = false;
  bool caller_cancelled = false;
  bool aborted = false;  // the caller was cancelled before a winner's value was in hand

 protected:
  ~hedge_arbiter() = default;
  virtual void on_commit() noexcept = 0;
};

/// Runs one attempt as the body of its coroutine thread; `op` lives in the call's frame.
template <class V, class MakeOp>
boost::asio::awaitable<std::optional<V>> hedge_body(MakeOp& op, hedge_attempt& h) {
  if constexpr (std::is_void_v<hedge_value_t<MakeOp>>) {
    co_await invoke_hedge_factory(op, h);
    co_return std::optional<V>(std::in_place);
  } else {
    co_return std::optional<V>(co_await invoke_hedge_factory(op, h));
  }
}

/// Waits on the call's timer as an async operation that ignores the awaiting coroutine's
/// cancellation slot: the call keeps its own handler in that slot (forwarding the caller's
/// cancellation to every attempt), which a plain `async_wait(use_awaitable)` would replace. It
/// completes with no error code (awaiting one would throw on `operation_aborted`, which is how
/// the call is woken): the caller looks at the clock and the race instead.
template <class Timer>
struct hedge_wait {
  Timer& timer;

  template <class CompletionToken>
  requires boost::asio::completion_token_for<CompletionToken, void()>
  auto operator()(CompletionToken&& token) && {
    return boost::asio::async_initiate<CompletionToken, void()>(
        [](auto handler, Timer* t) {
          t->async_wait(
              [h = std::move(handler)](boost::system::error_code) mutable { std::move(h)(); });
        },
        token, &timer);
  }
};

/// One call's race: the arbiter plus the clock-dependent parts (the timer that wakes the call,
/// the latency window) and the winner's outcome.
template <class Clock, class V>
class hedge_race final : public hedge_arbiter {
 public:
  hedge_race(const boost::asio::any_io_executor& ex, std::size_t n,
             basic_latency_window<Clock>* latency, typename Clock::time_point start)
      : hedge_arbiter(n), wake(ex), latency_(latency), start_(start) {}

  /// Starts attempt `started` as its own coroutine thread on `ex`, bound to its slot's signal.
  template <class MakeOp>
  void start(const boost::asio::any_io_executor& ex, MakeOp& op) noexcept {
    const std::size_t i = started++;
    if (i == 1) {
      first_hedge_at_ = Clock::now();
    }
    attempt_slot& s = slots[i];
    s.running = true;
    ++in_flight;
    try {
      using outcome = typename spawn_with_slot<std::optional<V>>::outcome;
      spawn_with_slot<std::optional<V>>{ex, hedge_body<V>(op, s.handle), s.cancel.slot()}(
          [this, i](outcome o) { on_done(i, std::get<0>(o), std::move(std::get<1>(o))); });
    } catch (...) {
      // Nothing was spawned (an allocation failed): the attempt failed before it began.
      s.running = false;
      --in_flight;
      record_failure(i, std::current_exception());
    }
  }

  /// The caller's cancellation: every attempt is cancelled, no hedge starts, and the call ends
  /// with `operation_aborted` unless the winner's value is already in hand.
  void on_caller_cancel() noexcept {
    caller_cancelled = true;
    if (!value) {
      aborted = true;
    }
    cancel_running(none);
    wake.cancel();
  }

  /// Ends the call after an internal error (a throwing hook): cancels everything, like the caller.
  void abandon() noexcept {
    caller_cancelled = true;
    cancel_running(none);
  }

  basic_timer<Clock> wake;          // sleeps until the next hedge; events cancel it
  std::optional<V> value;           // the winner's value
  std::exception_ptr winner_error;  // the winner's failure after it committed

 private:
  void on_commit() noexcept override {
    if (latency_) {
      // The primary's latency when it won; when a hedge won, all that is known is that the
      // primary had not answered when the first hedge went out (see the header: recording the
      // commit time fed the hedge's own latency back into the delay).
      latency_->record((winner == 0 || !first_hedge_at_ ? Clock::now() : *first_hedge_at_) -
                       start_);
    }
    wake.cancel();  // the loop re-arms the timer: no further hedge
  }

  void on_done(std::size_t i, std::exception_ptr e, std::optional<V> v) noexcept {
    slots[i].running = false;
    --in_flight;
    if (!e && v) {
      // Completing successfully is an ordinary attempt's commit; a value that comes too late
      // (another attempt won, or the caller was cancelled) is dropped.
      if (try_commit(i)) {
        value = std::move(v);
      }
    } else {
      if (!e) {
        e = std::make_exception_ptr(
            boost::system::system_error(boost::asio::error::operation_aborted));
      }
      if (winner == i) {
        winner_error = e;
      } else {
        record_failure(i, e);
      }
    }
    wake.cancel();
  }

  basic_latency_window<Clock>* latency_;
  typename Clock::time_point start_;
  std::optional<typename Clock::time_point> first_hedge_at_;  // when attempt 1 started
};

template <class Clock>
bool hedge_allowed(const basic_hedge_policy<Clock>& policy) {
  // The retry budget is asked first and charged last, so that a refusal by the hedge budget
  // takes nothing from it.
  if (policy.retry_budget && !policy.retry_budget->try_retry()) {
    return false;
  }
  if (policy.budget && !policy.budget->try_withdraw()) {
    return false;
  }
  if (policy.retry_budget) {
    policy.retry_budget->on_failure();
  }
  return true;
}

template <class Clock, class MakeOp>
auto hedge_impl(MakeOp op, basic_hedge_policy<Clock> policy)
    -> boost::asio::awaitable<hedge_value_t<MakeOp>> {
  namespace asio = boost::asio;
  using T = hedge_value_t<MakeOp>;
  using V = deadline_value_t<T>;
  using clock_duration = typename Clock::duration;

  const asio::any_io_executor ex = co_await asio::this_coro::executor;
  auto cs = co_await asio::this_coro::cancellation_state;
  const bool throw_if_cancelled = co_await asio::this_coro::throw_if_cancelled();
  if (throw_if_cancelled && cs.cancelled() != asio::cancellation_type::none) {
    throw boost::system::system_error(asio::error::operation_aborted);
  }

  const std::size_t max_attempts = std::max<std::size_t>(policy.max_attempts, 1);
  const auto start = Clock::now();
  if (policy.budget) {
    policy.budget->deposit();
  }
  std::chrono::nanoseconds delay = std::max(policy.delay, std::chrono::nanoseconds::zero());
  if (policy.latency) {
    if (auto p = policy.latency->percentile(policy.percentile, policy.min_samples)) {
      delay = saturating_cast<std::chrono::nanoseconds>(*p);
    }
  }
  const auto step = saturating_cast<clock_duration>(delay);
  auto next_at = saturating_add(start, step);

  hedge_race<Clock, V> race(ex, max_attempts, policy.latency, start);
  bool hedging = max_attempts > 1;
  std::exception_ptr internal;

  // From here until every attempt has finished nothing may throw out of this frame (the attempts
  // point into it), and waiting must go on after the caller's cancellation: the wait does not
  // throw on a cancelled thread while this is off. The caller's own setting is restored below.
  co_await asio::this_coro::throw_if_cancelled(false);
  race.start(ex, op);
  for (;;) {
    try {
      hedging = hedging && race.may_hedge();
      if (hedging && Clock::now() >= next_at) {
        if (!hedge_allowed(policy)) {
          hedging = false;  // refused: this call sends no further hedge
          continue;
        }
        if (policy.on_hedge) {
          policy.on_hedge(
              hedge_event{race.started, delay,
                          saturating_cast<std::chrono::nanoseconds>(Clock::now() - start)});
        }
        race.start(ex, op);
        next_at = saturating_add(next_at, step);
        continue;
      }
      if (race.in_flight == 0) {
        break;
      }
      race.wake.expires_at(hedging ? next_at : Clock::time_point::max());
    } catch (...) {
      internal = std::current_exception();
      hedging = false;
      race.abandon();
      if (race.in_flight == 0) {
        break;
      }
    }
    // The slot is cleared each time the wait completes, so the handler is put back every time.
    if (auto caller = cs.slot(); caller.is_connected()) {
      caller.assign([&race](asio::cancellation_type) { race.on_caller_cancel(); });
    }
    co_await hedge_wait<basic_timer<Clock>>{race.wake};
  }
  co_await asio::this_coro::throw_if_cancelled(throw_if_cancelled);

  if (internal) {
    std::rethrow_exception(internal);
  }
  if (race.aborted) {
    throw boost::system::system_error(asio::error::operation_aborted);
  }
  if (race.winner != hedge_arbiter::none) {
    if (race.winner_error) {
      std::rethrow_exception(race.winner_error);
    }
    if (!race.value) {  // the winner committed, then returned after the caller's cancellation
      throw boost::system::system_error(asio::error::operation_aborted);
    }
    if constexpr (!std::is_void_v<T>) {
      co_return std::move(*race.value);
    } else {
      co_return;
    }
  }
  if (auto first = race.failure_to_report()) {
    std::rethrow_exception(first);
  }
  throw boost::system::system_error(asio::error::operation_aborted);
}

}  // namespace detail

inline bool hedge_attempt::commit() noexcept {
  return arbiter_ ? arbiter_->try_commit(index_) : true;
}

}  // namespace keel
