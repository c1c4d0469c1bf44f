// Private: what a circuit breaker keeps under its mutex (sliding window, transition log).
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace keel {

enum class breaker_state;

namespace detail {

// A sliding time window of call outcomes, kept as a fixed ring of sub-buckets. There is no timer:
// each access first moves the ring forward to "now", clearing the buckets that fell out of the
// window. The window is therefore accurate to one bucket width (window / buckets), which is the
// usual trade (resilience4j, Polly) for O(buckets) memory whatever the call rate.
class breaker_window {
 public:
  struct totals {
    std::uint64_t calls = 0;
    std::uint64_t failures = 0;
  };

  void configure(std::chrono::nanoseconds window, std::size_t buckets) {
    buckets_.assign(buckets, bucket{});
    width_ = window / static_cast<std::chrono::nanoseconds::rep>(buckets);
    has_head_ = false;
  }

  void clear() noexcept {
    for (auto& b : buckets_) {
      b = bucket{};
    }
    has_head_ = false;
  }

  void record(std::chrono::nanoseconds now, bool failed) {
    if (buckets_.empty()) {
      return;
    }
    advance(now);
    auto& b = buckets_[slot(head_)];
    ++b.calls;
    if (failed) {
      ++b.failures;
    }
  }

  totals sum(std::chrono::nanoseconds now) {
    advance(now);
    totals t;
    for (const auto& b : buckets_) {
      t.calls += b.calls;
      t.failures += b.failures;
    }
    return t;
  }

 private:
  struct bucket {
    std::uint64_t calls = 0;
    std::uint64_t failures = 0;
  };

  std::int64_t index_of(std::chrono::nanoseconds now) const noexcept {
    // Floor division: a clock whose epoch lies in the future still maps to increasing indices.
    const auto q = now.count() / width_.count();
    return (now.count() % width_.count() < 0) ? q - 1 : q;
  }

  std::size_t slot(std::int64_t index) const noexcept {
    const auto n = static_cast<std::int64_t>(buckets_.size());
    return static_cast<std::size_t>(((index % n) + n) % n);
  }

  void advance(std::chrono::nanoseconds now) noexcept {
    const std::int64_t index = index_of(now);
    if (!has_head_) {
      head_ = index;
      has_head_ = true;
      return;
    }
    if (index <= head_) {
      return;  // Steady clocks never go back; a concurrent reader may be one tick behind.
    }
    const std::int64_t n = static_cast<std::int64_t>(buckets_.size());
    if (index - head_ >= n) {
      for (auto& b : buckets_) {
        b = bucket{};
      }
    } else {
      for (std::int64_t i = head_ + 1; i <= index; ++i) {
        buckets_[slot(i)] = bucket{};
      }
    }
    head_ = index;
  }

  std::vector<bucket> buckets_;
  std::chrono::nanoseconds width_{1};
  std::int64_t head_ = 0;
  bool has_head_ = false;
};

// Transitions taken under the lock, replayed to the user's hook after the lock is released (the
// hook may call back into the breaker, and must never run while we hold the mutex). One public
// call takes at most two transitions: the lazy open -> half_open, then the one it caused.
class transition_log {
 public:
  void push(breaker_state from, breaker_state to) noexcept {
    if (size_ < items_.size()) {
      items_[size_++] = {from, to};
    }
  }

  // noexcept on purpose: a throwing hook would otherwise escape from a permit's destructor or
  // leave a caller not knowing whether its outcome was recorded.
  void replay(const std::function<void(breaker_state, breaker_state)>& hook) const noexcept {
    if (!hook) {
      return;
    }
    for (std::size_t i = 0; i < size_; ++i) {
      hook(items_[i].first, items_[i].second);
    }
  }

 private:
  std::array<std::pair<breaker_state, breaker_state>, 2> items_{};
  std::size_t size_ = 0;
};

// Grants with_breaker access to the breaker's atomic "admit, or tell me why not".
struct breaker_access;

}  // namespace detail
}  // namespace keel
