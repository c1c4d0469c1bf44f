// Private: the one timer that serves a whole queue of waiters (throttler, bulkhead).
#pragma once

// Why: a queue of 10,000 waiters needs one timer, armed for the head, not one per waiter. The
// owner re-arms and disarms it under its own mutex; a completion that was already queued when
// the timer was re-armed or disarmed arrives with success, so each arming gets a generation
// number and the handler ignores stale ones (`take`). The timer counts as armed only once its
// wait is really pending, so an `async_wait` that throws (bad_alloc) leaves a consistent state.
//
// Thread safety: every member must be called under the owner's mutex.

#include <keel/clock.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/error.hpp>

#include <cstdint>
#include <utility>

namespace keel::detail {

template <class Clock>
class queue_timer {
 public:
  using time_point = typename Clock::time_point;

  explicit queue_timer(const boost::asio::any_io_executor& ex) : timer_(ex) {}

  /// True while a current wait is pending.
  bool armed() const noexcept { return armed_; }

  /// The instant the current wait ends (meaningful while armed).
  time_point armed_at() const noexcept { return armed_at_; }

  /// Arms (or re-arms) for `at`; when it fires, `on_fire(generation)` runs on the timer's
  /// executor, and must pass `generation` to `take` under the owner's lock.
  template <class OnFire>
  void arm(time_point at, OnFire on_fire) {
    // Not armed until the new wait is pending: if `async_wait` throws, the wait just cancelled
    // must not still count as armed (nothing would fire, and an owner that tracks the wait as
    // work would release work that does not exist).
    armed_ = false;
    timer_.expires_at(at);  // cancels a pending wait; its handler sees operation_aborted
    const std::uint64_t generation = ++generation_;
    timer_.async_wait(
        [f = std::move(on_fire), generation](const boost::system::error_code& ec) mutable {
          if (ec != boost::asio::error::operation_aborted) {
            f(generation);
          }
        });
    armed_ = true;
    armed_at_ = at;
  }

  /// Cancels the pending wait, if any, so that an idle owner keeps no work on its executor.
  void disarm() {
    if (armed_) {
      armed_ = false;
      ++generation_;
      timer_.cancel();
    }
  }

  /// In the firing handler, under the owner's lock: true if this firing is the current one
  /// (the timer is then no longer armed); false for a stale completion, which must be ignored.
  bool take(std::uint64_t generation) noexcept {
    if (!armed_ || generation != generation_) {
      return false;
    }
    armed_ = false;
    return true;
  }

 private:
  basic_timer<Clock> timer_;
  time_point armed_at_{};
  std::uint64_t generation_ = 0;
  bool armed_ = false;
};

}  // namespace keel::detail
