// How keel injects time: clocks as template parameters and the Asio timer type for each clock.
#pragma once

// Overview
// --------
// Every keel facility that reads the time or sleeps is a template on a `Clock` (a standard
// chrono clock, `std::chrono::steady_clock` by default). Sleeping uses a stock Asio
// `basic_waitable_timer` on that clock, so tests substitute `keel::testing::manual_clock`
// (testing/manual_clock.hpp) and drive every timer in virtual time without sleeping.
//
// A clock may name the Asio wait traits its timers need with a nested `keel_wait_traits` type;
// otherwise `boost::asio::wait_traits<Clock>` is used.
//
// Example:
//
//     keel::basic_timer<keel::testing::manual_clock> t{ex};
//     t.expires_after(100ms);
//     co_await t.async_wait(boost::asio::use_awaitable);
//
// Thread safety: the aliases are stateless; a timer object is not thread-safe (Asio's rules).

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/basic_waitable_timer.hpp>
#include <boost/asio/wait_traits.hpp>

#include <chrono>
#include <type_traits>

namespace keel {

namespace detail {
template <class Clock, class = void>
struct wait_traits_for {
  using type = boost::asio::wait_traits<Clock>;
};
template <class Clock>
struct wait_traits_for<Clock, std::void_t<typename Clock::keel_wait_traits>> {
  using type = typename Clock::keel_wait_traits;
};
}  // namespace detail

/// The Asio wait traits keel uses for timers on `Clock`.
template <class Clock>
using wait_traits_t = typename detail::wait_traits_for<Clock>::type;

/// The Asio timer keel uses to sleep on `Clock`.
template <class Clock = std::chrono::steady_clock>
using basic_timer =
    boost::asio::basic_waitable_timer<Clock, wait_traits_t<Clock>, boost::asio::any_io_executor>;

/// keel's default clock.
using default_clock = std::chrono::steady_clock;

/// Converts `d` to `Duration`, saturating at its limits instead of overflowing (so that
/// "forever", e.g. `nanoseconds::max()`, stays forever in any unit).
template <class Duration, class Rep, class Period>
constexpr Duration saturating_cast(std::chrono::duration<Rep, Period> d) noexcept {
  if constexpr (std::is_same_v<Duration, std::chrono::duration<Rep, Period>>) {
    return d;
  } else {
    const long double v = std::chrono::duration<long double, typename Duration::period>(d).count();
    if (v >= static_cast<long double>(Duration::max().count())) {
      return Duration::max();
    }
    if (v <= static_cast<long double>(Duration::min().count())) {
      return Duration::min();
    }
    return Duration(static_cast<typename Duration::rep>(v));
  }
}

/// `t + d`, saturating at the time point's limits instead of overflowing.
template <class Clock, class Duration, class Rep, class Period>
constexpr std::chrono::time_point<Clock, Duration> saturating_add(
    std::chrono::time_point<Clock, Duration> t, std::chrono::duration<Rep, Period> d) noexcept {
  using time_point = std::chrono::time_point<Clock, Duration>;
  const Duration step = saturating_cast<Duration>(d);
  const Duration since = t.time_since_epoch();
  if (step > Duration::zero() && since > Duration::max() - step) {
    return time_point::max();
  }
  if (step < Duration::zero() && since < Duration::min() - step) {
    return time_point::min();
  }
  return t + step;
}

}  // namespace keel
