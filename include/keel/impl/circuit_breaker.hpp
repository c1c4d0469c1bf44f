// Template bodies for keel/circuit_breaker.hpp: the state machine and with_breaker.
#pragma once

#include <keel/circuit_breaker.hpp>
#include <keel/clock.hpp>

#include <boost/asio/cancellation_state.hpp>

#include <boost/asio/this_coro.hpp>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace keel {

namespace detail {

inline void validate(const breaker_policy& p) {
  auto fail = [](const char* what) {
    throw std::invalid_argument(std::string("keel::breaker_policy: ") + what);
  };
  if (p.rule == breaker_policy::trip_rule::consecutive && p.failure_threshold == 0) {
    fail("failure_threshold must be at least 1");
  }
  if (p.rule == breaker_policy::trip_rule::failure_ratio) {
    if (!(p.ratio_threshold > 0.0 && p.ratio_threshold <= 1.0)) {
      fail("ratio_threshold must be in (0, 1]");
    }
    if (p.minimum_throughput == 0) {
      fail("minimum_throughput must be at least 1");
    }
    if (p.window_buckets == 0) {
      fail("window_buckets must be at least 1");
    }
    if (p.sampling_window.count() <= 0 ||
        p.sampling_window / static_cast<std::chrono::nanoseconds::rep>(p.window_buckets) <
            std::chrono::nanoseconds(1)) {
      fail("sampling_window must hold at least 1 ns per bucket");
    }
  }
  if (p.half_open_probes == 0) {
    fail("half_open_probes must be at least 1");
  }
  if (p.break_duration.count() < 0 || p.max_break_duration.count() < 0) {
    fail("break durations must not be negative");
  }
  if (!(p.break_growth >= 1.0) || !std::isfinite(p.break_growth)) {
    fail("break_growth must be a finite number >= 1");
  }
  if (p.slow_call_threshold && p.slow_call_threshold->count() < 0) {
    fail("slow_call_threshold must not be negative");
  }
}

struct breaker_access {
  template <class Clock>
  static auto acquire(basic_circuit_breaker<Clock>& b,
                      std::optional<std::chrono::nanoseconds>& retry_after, breaker_state& seen) {
    return b.acquire(retry_after, seen);
  }
};

inline failure make_rejection(breaker_state seen, std::optional<std::chrono::nanoseconds> retry,
                              bool after_admission = false) {
  std::string what = make_error_code(error::circuit_open).message();
  if (after_admission) {
    what += " (it changed state while the call waited to send)";
    return failure(make_error_code(error::circuit_open), what, {}, retry);
  }
  switch (seen) {
    case breaker_state::isolated:
      what += " (isolated)";
      break;
    case breaker_state::half_open:
      what += " (half-open, every probe slot taken)";
      break;
    default:
      break;
  }
  return failure(make_error_code(error::circuit_open), what, {}, retry);
}

struct no_degraded {};

// A failure seen after the caller was cancelled is the cancellation, whatever the operation
// turned it into (a reset, a deadline): it never counts against the breaker.
template <class Permit>
void settle_failure(Permit& p, const std::exception_ptr& error,
                    const boost::asio::cancellation_state& cs) {
  if (cs.cancelled() != boost::asio::cancellation_type::none) {
    p.record_cancelled();
  } else {
    p.record_failure(error);
  }
}

// Not a catch block with co_await in it: the exception is captured, the permit is settled outside
// the handler, and the original exception object is rethrown unchanged.
template <class Clock, class MakeOp, class Degraded>
boost::asio::awaitable<breaker_op_value_t<MakeOp, Clock>> with_breaker_impl(
    basic_circuit_breaker<Clock>& breaker, MakeOp op, Degraded degraded) {
  using value_type = breaker_op_value_t<MakeOp, Clock>;
  using permit_type = typename basic_circuit_breaker<Clock>::permit;
  auto start = [&](permit_type& granted) {
    if constexpr (breaker_op<MakeOp, permit_type>::takes_permit) {
      return op(granted);
    } else {
      return op();
    }
  };
  std::optional<std::chrono::nanoseconds> retry_after;
  breaker_state seen = breaker_state::closed;
  auto p = breaker_access::acquire(breaker, retry_after, seen);
  if (!p) {
    if constexpr (std::is_same_v<Degraded, no_degraded>) {
      throw make_rejection(seen, retry_after);
    } else if constexpr (std::is_invocable_v<Degraded&, const failure&>) {
      const failure f = make_rejection(seen, retry_after);
      if constexpr (std::is_void_v<value_type>) {
        degraded(f);
        co_return;
      } else {
        co_return degraded(f);
      }
    } else {
      if constexpr (std::is_void_v<value_type>) {
        degraded();
        co_return;
      } else {
        co_return degraded();
      }
    }
  }

  std::exception_ptr error;
  if constexpr (std::is_void_v<value_type>) {
    try {
      co_await start(*p);
    } catch (...) {
      error = std::current_exception();
    }
    if (error) {
      settle_failure(*p, error, co_await boost::asio::this_coro::cancellation_state);
      std::rethrow_exception(error);
    }
    p->record_success();
  } else {
    std::optional<value_type> value;
    try {
      value.emplace(co_await start(*p));
    } catch (...) {
      error = std::current_exception();
    }
    if (error) {
      settle_failure(*p, error, co_await boost::asio::this_coro::cancellation_state);
      std::rethrow_exception(error);
    }
    p->record_success();
    co_return std::move(*value);
  }
}

}  // namespace detail

// ---- permit ------------------------------------------------------------------------------------

template <class Clock>
void basic_circuit_breaker<Clock>::permit::record_success(std::chrono::nanoseconds elapsed) {
  if (auto* b = std::exchange(breaker_, nullptr)) {
    const auto& threshold = b->policy_.slow_call_threshold;
    const bool slow = threshold && elapsed > *threshold;
    b->record(*this, slow ? outcome::failure : outcome::success, slow, false);
  }
}

template <class Clock>
void basic_circuit_breaker<Clock>::permit::record_failure(const classification& c) {
  if (breaker_ == nullptr) {
    return;
  }
  if (c.condition == condition::cancelled) {
    record_cancelled();
    return;
  }
  if (breaker_->policy_.counts_as_failure.contains(c.condition)) {
    auto* b = std::exchange(breaker_, nullptr);
    b->record(*this, outcome::failure, false, false);
    return;
  }
  // The provider answered (a 400, a 401...): that says it is up, so it counts like a success,
  // slow-call rule included. Polly and resilience4j treat unhandled outcomes the same way.
  auto* b = std::exchange(breaker_, nullptr);
  const auto elapsed = Clock::now() - start_;
  const auto& threshold = b->policy_.slow_call_threshold;
  const bool slow = threshold && elapsed > *threshold;
  b->record(*this, slow ? outcome::failure : outcome::success, slow, true);
}

template <class Clock>
void basic_circuit_breaker<Clock>::permit::record_failure(const std::exception_ptr& ep) {
  if (breaker_ == nullptr) {
    return;
  }
  classification c;
  if (const auto& custom = breaker_->policy_.classify) {
    try {
      c = custom(ep);
    } catch (...) {
      c.condition = condition::permanent;
    }
  } else {
    c = keel::classify(ep);
  }
  record_failure(c);
}

template <class Clock>
void basic_circuit_breaker<Clock>::permit::record_cancelled() noexcept {
  if (auto* b = std::exchange(breaker_, nullptr)) {
    b->record(*this, outcome::cancelled, false, false);
  }
}

template <class Clock>
bool basic_circuit_breaker<Clock>::permit::still_admitted() const {
  if (breaker_ == nullptr) {
    return false;
  }
  std::lock_guard lock(breaker_->mutex_);
  // An open phase admits nothing, so a permit of the current epoch is of a closed or a
  // half-open phase that is still going on.
  return epoch_ == breaker_->epoch_ || breaker_->state_ == breaker_state::closed;
}

template <class Clock>
void basic_circuit_breaker<Clock>::permit::ensure_admitted() {
  if (still_admitted()) {
    return;
  }
  breaker_state seen = breaker_state::open;
  std::optional<std::chrono::nanoseconds> retry_after;
  if (breaker_ != nullptr) {
    std::lock_guard lock(breaker_->mutex_);
    const auto now = Clock::now();
    seen = breaker_->observed_state(now);
    if (seen == breaker_state::open) {
      retry_after =
          std::chrono::duration_cast<std::chrono::nanoseconds>(breaker_->open_until_ - now);
    }
  }
  record_cancelled();
  throw detail::make_rejection(seen, retry_after, true);
}

// ---- breaker -----------------------------------------------------------------------------------

template <class Clock>
basic_circuit_breaker<Clock>::basic_circuit_breaker(executor_type ex, breaker_policy policy)
    : executor_(std::move(ex)), policy_(std::move(policy)) {
  detail::validate(policy_);
  if (policy_.rule == breaker_policy::trip_rule::failure_ratio) {
    window_.configure(policy_.sampling_window, policy_.window_buckets);
  }
}

template <class Clock>
breaker_state basic_circuit_breaker<Clock>::observed_state(time_point now) const noexcept {
  if (state_ == breaker_state::open && now >= open_until_) {
    return breaker_state::half_open;
  }
  return state_;
}

template <class Clock>
breaker_state basic_circuit_breaker<Clock>::state() const {
  std::lock_guard lock(mutex_);
  return observed_state(Clock::now());
}

template <class Clock>
auto basic_circuit_breaker<Clock>::open_until() const -> std::optional<time_point> {
  std::lock_guard lock(mutex_);
  if (observed_state(Clock::now()) != breaker_state::open) {
    return std::nullopt;
  }
  return open_until_;
}

template <class Clock>
std::chrono::nanoseconds basic_circuit_breaker<Clock>::remaining_open_time() const {
  std::lock_guard lock(mutex_);
  const auto now = Clock::now();
  if (observed_state(now) != breaker_state::open) {
    return std::chrono::nanoseconds::zero();
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(open_until_ - now);
}

template <class Clock>
breaker_counters basic_circuit_breaker<Clock>::counters() const {
  std::lock_guard lock(mutex_);
  return counters_;
}

template <class Clock>
auto basic_circuit_breaker<Clock>::try_acquire() -> std::optional<permit> {
  std::optional<std::chrono::nanoseconds> retry_after;
  breaker_state seen = breaker_state::closed;
  return acquire(retry_after, seen);
}

template <class Clock>
auto basic_circuit_breaker<Clock>::acquire(std::optional<std::chrono::nanoseconds>& retry_after,
                                           breaker_state& seen) -> std::optional<permit> {
  detail::transition_log log;
  std::optional<permit> result;
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    maybe_half_open(now, log);
    seen = state_;
    switch (state_) {
      case breaker_state::closed:
        ++counters_.admitted;
        result = permit(this, epoch_, now, false);
        break;
      case breaker_state::half_open:
        if (probes_in_flight_ + probe_successes_ < policy_.half_open_probes) {
          ++probes_in_flight_;
          ++counters_.admitted;
          result = permit(this, epoch_, now, true);
        } else {
          ++counters_.rejected;
        }
        break;
      case breaker_state::open:
        ++counters_.rejected;
        retry_after = std::chrono::duration_cast<std::chrono::nanoseconds>(open_until_ - now);
        break;
      case breaker_state::isolated:
        ++counters_.rejected;
        break;
    }
  }
  log.replay(policy_.on_state_change);
  return result;
}

template <class Clock>
void basic_circuit_breaker<Clock>::record(permit& p, outcome o, bool slow,
                                          bool not_counted) noexcept {
  detail::transition_log log;
  {
    std::lock_guard lock(mutex_);
    switch (o) {
      case outcome::success:
        ++counters_.succeeded;
        break;
      case outcome::failure:
        ++counters_.failed;
        break;
      case outcome::cancelled:
        ++counters_.cancelled;
        break;
    }
    if (slow) {
      ++counters_.slow;
    }
    if (not_counted) {
      ++counters_.not_counted;
    }
    if (p.epoch_ != epoch_) {
      // A late answer from an earlier phase: counted above, but it no longer decides anything
      // (its probe slot, if any, was discarded with that phase).
    } else if (state_ == breaker_state::half_open) {
      --probes_in_flight_;
      const auto now = Clock::now();
      if (o == outcome::success) {
        if (++probe_successes_ >= policy_.half_open_probes) {
          transition(breaker_state::closed, now, log);
        }
      } else if (o == outcome::failure) {
        transition(breaker_state::open, now, log);
      }
    } else if (state_ == breaker_state::closed && o != outcome::cancelled) {
      const auto now = Clock::now();
      if (o == outcome::success) {
        consecutive_failures_ = 0;
      } else {
        ++consecutive_failures_;
      }
      window_.record(std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()),
                     o == outcome::failure);
      if (o == outcome::failure && should_trip(now)) {
        transition(breaker_state::open, now, log);
      }
    }
  }
  log.replay(policy_.on_state_change);
}

template <class Clock>
bool basic_circuit_breaker<Clock>::should_trip(time_point now) {
  if (policy_.rule == breaker_policy::trip_rule::consecutive) {
    return consecutive_failures_ >= policy_.failure_threshold;
  }
  const auto t =
      window_.sum(std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()));
  if (t.calls < policy_.minimum_throughput) {
    return false;
  }
  // Division, not ratio * calls: failures/calls and the user's ratio then round the same way, so
  // an exact ratio (3 of 30 against 0.1) trips.
  return static_cast<double>(t.failures) / static_cast<double>(t.calls) >= policy_.ratio_threshold;
}

template <class Clock>
void basic_circuit_breaker<Clock>::maybe_half_open(time_point now, detail::transition_log& log) {
  if (state_ == breaker_state::open && now >= open_until_) {
    transition(breaker_state::half_open, now, log);
  }
}

template <class Clock>
std::chrono::nanoseconds basic_circuit_breaker<Clock>::next_break() const noexcept {
  const auto base = policy_.break_duration;
  if (opens_in_a_row_ <= 1 || policy_.break_growth == 1.0) {
    return base;
  }
  const auto cap = std::max(base, policy_.max_break_duration);
  // In double so that growth^k cannot overflow; clamped before converting back.
  const double grown = static_cast<double>(base.count()) *
                       std::pow(policy_.break_growth, static_cast<double>(opens_in_a_row_ - 1));
  if (!(grown < static_cast<double>(cap.count()))) {
    return cap;
  }
  return std::chrono::nanoseconds(static_cast<std::chrono::nanoseconds::rep>(grown));
}

template <class Clock>
void basic_circuit_breaker<Clock>::clear_counts() noexcept {
  consecutive_failures_ = 0;
  window_.clear();
  probes_in_flight_ = 0;
  probe_successes_ = 0;
}

template <class Clock>
void basic_circuit_breaker<Clock>::transition(breaker_state to, time_point now,
                                              detail::transition_log& log) {
  const breaker_state from = state_;
  state_ = to;
  ++epoch_;
  clear_counts();
  switch (to) {
    case breaker_state::open: {
      ++opens_in_a_row_;
      ++counters_.opened;
      // ceil: a break never ends before its full length on a coarser clock.
      const auto length = std::chrono::ceil<typename Clock::duration>(next_break());
      open_until_ = saturating_add(now, length);
      break;
    }
    case breaker_state::closed:
      opens_in_a_row_ = 0;
      break;
    case breaker_state::half_open:
    case breaker_state::isolated:
      break;
  }
  log.push(from, to);
}

template <class Clock>
void basic_circuit_breaker<Clock>::force_open_until(time_point until) {
  detail::transition_log log;
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    if (state_ == breaker_state::open) {
      // Earlier or later, and a break already over is extended without a half-open in between;
      // at or past `until`, the next call finds it half-open.
      open_until_ = until;
    } else if ((state_ == breaker_state::closed || state_ == breaker_state::half_open) &&
               until > now) {
      // Not one of this breaker's own openings: no growth of its later breaks, not counted.
      const breaker_state from = state_;
      state_ = breaker_state::open;
      ++epoch_;
      clear_counts();
      open_until_ = until;
      log.push(from, breaker_state::open);
    }
  }
  log.replay(policy_.on_state_change);
}

template <class Clock>
void basic_circuit_breaker<Clock>::isolate() {
  detail::transition_log log;
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    maybe_half_open(now, log);
    if (state_ != breaker_state::isolated) {
      transition(breaker_state::isolated, now, log);
    }
  }
  log.replay(policy_.on_state_change);
}

template <class Clock>
void basic_circuit_breaker<Clock>::reset() {
  detail::transition_log log;
  {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    maybe_half_open(now, log);
    if (state_ != breaker_state::closed) {
      transition(breaker_state::closed, now, log);
    } else {
      ++epoch_;
      clear_counts();
      opens_in_a_row_ = 0;
    }
  }
  log.replay(policy_.on_state_change);
}

// ---- with_breaker ------------------------------------------------------------------------------

template <class Clock, class MakeOp>
boost::asio::awaitable<detail::breaker_op_value_t<MakeOp, Clock>> with_breaker(
    basic_circuit_breaker<Clock>& breaker, MakeOp op) {
  static_assert(detail::breaker_op<MakeOp, typename basic_circuit_breaker<Clock>::permit>::valid,
                "with_breaker: op must be a callable returning boost::asio::awaitable<T>");
  return detail::with_breaker_impl(breaker, std::move(op), detail::no_degraded{});
}

template <class Clock, class MakeOp, class Degraded>
boost::asio::awaitable<detail::breaker_op_value_t<MakeOp, Clock>> with_breaker(
    basic_circuit_breaker<Clock>& breaker, MakeOp op, Degraded degraded) {
  static_assert(detail::breaker_op<MakeOp, typename basic_circuit_breaker<Clock>::permit>::valid,
                "with_breaker: op must be a callable returning boost::asio::awaitable<T>");
  using value_type = detail::breaker_op_value_t<MakeOp, Clock>;
  static_assert(std::is_invocable_r_v<value_type, Degraded&, const failure&> ||
                    std::is_invocable_r_v<value_type, Degraded&>,
                "with_breaker: degraded must return something convertible to the op's value");
  return detail::with_breaker_impl(breaker, std::move(op), std::move(degraded));
}

}  // namespace keel
