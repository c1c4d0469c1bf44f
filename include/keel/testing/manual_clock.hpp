// Virtual time for tests: a manual clock that drives stock Asio timers, and loops that run on it.
#pragma once

// Overview
// --------
// `keel::testing::manual_clock` is a standard-conforming chrono clock whose `now()` only moves
// when a test calls `advance()` (Seastar's design). Any keel facility instantiated with it, and
// any `keel::basic_timer<manual_clock>`, runs in virtual time: the test polls the io_context,
// advances the clock, and timers whose expiry has passed complete. Nothing sleeps, and instants
// are exact:
//
//     keel::testing::manual_clock::reset();
//     boost::asio::io_context ctx;
//     bool done = false;
//     co_spawn(ctx, work(), [&](std::exception_ptr) { done = true; });
//     keel::testing::run_until(ctx, [&] { return done; });
//     CHECK(manual_clock::now() == manual_clock::time_point{100ms});
//
// Time advances in ticks (1 ms by default): an event scheduled at t is observed at the first
// tick at or after t. Choose the tick to match the resolution the test asserts.
//
// Thread safety: `now()` and `advance()` are atomic; the clock is process-wide (like
// `steady_clock`), so tests that use it must not run concurrently with each other.

#include <boost/asio/io_context.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace keel::testing {

/// A clock whose time only moves when told to; drives Asio timers in virtual time.
class manual_clock {
 public:
  using duration = std::chrono::nanoseconds;
  using rep = duration::rep;
  using period = duration::period;
  using time_point = std::chrono::time_point<manual_clock, duration>;
  static constexpr bool is_steady = true;

  /// The current virtual time.
  static time_point now() noexcept { return time_point{duration{now_ns().load()}}; }

  /// Moves the clock forward by `d` (negative values are ignored: the clock is steady).
  static void advance(duration d) noexcept {
    if (d.count() > 0) {
      now_ns().fetch_add(d.count());
    }
  }

  /// Sets the clock back to its epoch; call at the start of every test.
  static void reset() noexcept { now_ns().store(0); }

  /// Asio wait traits that never let the reactor sleep on this clock: the test loop decides
  /// when time moves, so every wait is "check now".
  struct keel_wait_traits {
    static duration to_wait_duration(const duration&) { return duration::zero(); }
    static duration to_wait_duration(const time_point&) { return duration::zero(); }
  };

 private:
  static std::atomic<rep>& now_ns() noexcept {
    static std::atomic<rep> value{0};
    return value;
  }
};

/// Runs every handler that is ready now, restarting the io_context if it had run out of work.
/// @returns the number of handlers run.
inline std::size_t poll_all(boost::asio::io_context& ctx) {
  std::size_t n = 0;
  for (;;) {
    if (ctx.stopped()) {
      ctx.restart();
    }
    const std::size_t ran = ctx.poll();
    n += ran;
    if (ran == 0) {
      return n;
    }
  }
}

/// Runs the io_context in virtual time for `span`, advancing `manual_clock` by `tick` at a time
/// and running every ready handler at each instant.
inline void run_for(boost::asio::io_context& ctx, manual_clock::duration span,
                    manual_clock::duration tick = std::chrono::milliseconds(1)) {
  const auto end = manual_clock::now() + span;
  poll_all(ctx);
  while (manual_clock::now() < end) {
    const auto step = std::min(tick, end - manual_clock::now());
    manual_clock::advance(step);
    poll_all(ctx);
  }
}

/// Runs the io_context in virtual time until `done()` is true or `limit` of virtual time has
/// passed, advancing by `tick`.
/// @returns true if `done()` became true.
template <class Predicate>
bool run_until(boost::asio::io_context& ctx, Predicate done,
               manual_clock::duration limit = std::chrono::hours(1),
               manual_clock::duration tick = std::chrono::milliseconds(1)) {
  const auto end = manual_clock::now() + limit;
  poll_all(ctx);
  while (!done()) {
    if (manual_clock::now() >= end) {
      return false;
    }
    manual_clock::advance(tick);
    poll_all(ctx);
  }
  return true;
}

}  // namespace keel::testing
