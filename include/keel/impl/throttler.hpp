// Implementation of keel::basic_throttler: lazy refill, the waiter queue and the single timer.
#pragma once

#include <keel/clock.hpp>
#include <keel/detail/queue_timer.hpp>
#include <keel/detail/waiter_queue.hpp>
#include <keel/throttler.hpp>

#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>

namespace keel::detail {

// Rates, capacities and costs from users: negative, NaN and infinite values count as 0 (an
// infinite cost or level would leave debt that no refill ever repays).
inline double throttle_non_negative(double x) noexcept {
  return x > 0 && std::isfinite(x) ? x : 0;
}

inline throttle_cost throttle_normalized(throttle_cost c) noexcept {
  return {throttle_non_negative(c.requests), throttle_non_negative(c.tokens)};
}

// One bucket (requests or LLM tokens). Levels are doubles: rates are fractional and token
// costs are estimates. Two rounding rules keep wake-ups exact: a level within `slack()` of what
// is needed counts as enough, and the refill time is computed for half that slack less, then
// rounded *up* to the clock's tick, so a waiter woken at its instant is always granted and
// never woken early.
struct throttle_bucket {
  double rate = 0;  // units per second; 0 = unlimited
  double capacity = 0;
  double level = 0;

  bool limited() const noexcept { return rate > 0; }
  double slack() const noexcept { return 1e-9 * std::max(1.0, capacity); }
  // A cost above capacity waits for a full bucket (then takes everything, leaving debt).
  double need(double cost) const noexcept { return std::min(cost, capacity); }
  // A call that takes nothing from this bucket (a token-only call's requests) is not held back
  // by it, even when a burst of 0 leaves the level just below zero after every request.
  bool covers(double cost) const noexcept {
    return !limited() || cost <= 0 || level >= need(cost) - slack();
  }
  void refill(double seconds) noexcept {
    if (limited()) {
      level = std::min(capacity, level + rate * seconds);
    }
  }
  void take(double cost) noexcept {
    if (limited()) {
      level -= cost;
    }
  }
  void give_back(double cost) noexcept {
    if (limited()) {
      level = std::min(capacity, level + cost);
    }
  }
  void set_level(double n) noexcept { level = std::min(n, capacity); }
  // Seconds of refill until covers(cost).
  double seconds_until(double cost) const noexcept {
    return covers(cost) ? 0.0 : (need(cost) - level - slack() / 2) / rate;
  }
};

template <class Clock>
class throttler_state : public std::enable_shared_from_this<throttler_state<Clock>> {
 public:
  using time_point = typename Clock::time_point;
  using duration = typename Clock::duration;

  // A queued acquire; lives in the acquiring coroutine's frame.
  struct node : waiter {
    explicit node(throttle_cost c) noexcept : cost(throttle_normalized(c)) {}
    throttle_cost cost;
    time_point enqueued{};
  };

  throttler_state(boost::asio::any_io_executor ex, const throttler_options& o)
      : ex_(ex), timer_(ex), last_(Clock::now()) {
    requests_.rate = throttle_non_negative(o.requests_per_second);
    requests_.capacity = throttle_non_negative(o.burst);
    requests_.level = requests_.capacity;
    tokens_per_minute_ = throttle_non_negative(o.tokens_per_minute);
    token_burst_ = throttle_non_negative(o.token_burst);
    tokens_.rate = tokens_per_minute_ / 60;
    tokens_.capacity = token_capacity();
    tokens_.level = tokens_.capacity;
  }

  const boost::asio::any_io_executor& executor() const noexcept { return ex_; }

  bool try_take(throttle_cost c) {
    c = throttle_normalized(c);
    std::lock_guard lock{mutex_};
    return queue_.empty() && grant(c, Clock::now());
  }

  void enqueue(waiter& w, waiter_handler&& h) {
    auto& n = static_cast<node&>(w);
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      const time_point now = Clock::now();
      n.set_handler(std::move(h));
      if (closed_) {
        batch.add(n, boost::asio::error::operation_aborted);
      } else if (queue_.empty() && grant(n.cost, now)) {
        // The bucket filled up between the failed fast path and this initiation.
        batch.add(n, {});
      } else {
        n.enqueued = now;
        if (queue_.empty()) {
          queued_since_ = std::max(now, paused_until_);
        }
        queue_.push_back(n);
        ++waits_;
        if (queue_.size() == 1) {
          try {
            schedule(now);
          } catch (...) {
            // Arming the timer failed (e.g. bad_alloc): the node lives in a frame that is about
            // to unwind, so it must not stay queued.
            queue_.erase(n);
            --waits_;
            throw;
          }
        }
      }
    }
    batch.complete(ex_);
  }

  void cancel_waiter(waiter& w) {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      if (!queue_.contains(w)) {
        return;  // already granted or aborted: the grant wins
      }
      auto& n = static_cast<node&>(w);
      const bool was_head = queue_.front() == &n;
      const time_point now = Clock::now();
      queue_.erase(n);
      wait_time_ += now - n.enqueued;
      if (queue_.empty()) {
        end_queued(now);
      }
      batch.add(n, boost::asio::error::operation_aborted);
      if (was_head) {
        process(now, batch);  // the next waiter may be cheaper, or the queue may be empty
      }
    }
    batch.complete(ex_);
  }

  void shutdown() {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      closed_ = true;
      const time_point now = Clock::now();
      if (!queue_.empty()) {
        end_queued(now);
      }
      while (!queue_.empty()) {
        auto& n = static_cast<node&>(queue_.pop_front());
        wait_time_ += now - n.enqueued;
        batch.add(n, boost::asio::error::operation_aborted);
      }
      disarm();
    }
    batch.complete(ex_);
  }

  void settle(double estimated, double actual) {
    update([&] {
      // Negative and non-finite amounts count as 0, as in costs.
      const double correction = throttle_non_negative(estimated) - throttle_non_negative(actual);
      if (tokens_.limited()) {
        tokens_.set_level(tokens_.level + correction);
      }
    });
  }

  // Gives back what a grant took, without counting it as ungranted.
  void release(throttle_cost c) {
    c = throttle_normalized(c);
    update([&] {
      requests_.give_back(c.requests);
      tokens_.give_back(c.tokens);
    });
  }

  // Gives back a grant whose waiter was cancelled before it could resume.
  void refund(const throttle_cost& c) {
    update([&] {
      requests_.give_back(c.requests);
      tokens_.give_back(c.tokens);
      --granted_;
    });
  }

  void pause_until(time_point t) {
    std::lock_guard lock{mutex_};
    const time_point now = Clock::now();
    refill(now);
    paused_until_ = std::max(paused_until_, t);
    // Time spent paused earns nothing: refill resumes from the end of the pause.
    last_ = std::max(last_, paused_until_);
    if (!queue_.empty()) {
      // Nor is it time the rate held calls back.
      end_queued(now);
      queued_since_ = std::max(now, paused_until_);
      schedule(now);  // a pause only ever delays, so nobody can become ready here
    }
  }

  time_point paused_until() const {
    std::lock_guard lock{mutex_};
    return paused_until_;
  }

  void set_rate(double requests_per_second, double tokens_per_minute) {
    update([&] {
      const bool requests_were_limited = requests_.limited();
      requests_.rate = throttle_non_negative(requests_per_second);
      if (!requests_were_limited) {
        requests_.level = requests_.capacity;
      }
      const bool tokens_were_limited = tokens_.limited();
      tokens_per_minute_ = throttle_non_negative(tokens_per_minute);
      tokens_.rate = tokens_per_minute_ / 60;
      tokens_.capacity = token_capacity();
      tokens_.set_level(tokens_were_limited ? tokens_.level : tokens_.capacity);
    });
  }

  void set_burst(double burst) {
    update([&] {
      requests_.capacity = throttle_non_negative(burst);
      requests_.set_level(requests_.level);
    });
  }

  void set_token_burst(double token_burst) {
    update([&] {
      token_burst_ = throttle_non_negative(token_burst);
      tokens_.capacity = token_capacity();
      tokens_.set_level(tokens_.level);
    });
  }

  void set_available_requests(double n) {
    update([&] {
      if (std::isfinite(n)) {
        requests_.set_level(n);
      }
    });
  }

  void set_available_tokens(double n) {
    update([&] {
      if (std::isfinite(n)) {
        tokens_.set_level(n);
      }
    });
  }

  double available_requests() { return available(requests_); }
  double available_tokens() { return available(tokens_); }

  throttler_options options() const {
    std::lock_guard lock{mutex_};
    return {requests_.rate, requests_.capacity, tokens_per_minute_, token_burst_};
  }

  std::size_t waiters() const {
    std::lock_guard lock{mutex_};
    return queue_.size();
  }
  std::uint64_t total_granted() const {
    std::lock_guard lock{mutex_};
    return granted_;
  }
  std::uint64_t total_waits() const {
    std::lock_guard lock{mutex_};
    return waits_;
  }
  duration total_wait_time() const {
    std::lock_guard lock{mutex_};
    return wait_time_;
  }
  duration total_queued_time() const {
    std::lock_guard lock{mutex_};
    const time_point now = Clock::now();
    return queued_time_ +
           (!queue_.empty() && now > queued_since_ ? now - queued_since_ : duration::zero());
  }

 private:
  double token_capacity() const noexcept {
    return token_burst_ > 0 ? token_burst_ : tokens_per_minute_;
  }

  double available(throttle_bucket& b) {
    std::lock_guard lock{mutex_};
    refill(Clock::now());
    return b.limited() ? b.level : std::numeric_limits<double>::infinity();
  }

  // Refill up to now, apply a change, then grant whoever it unblocked and re-arm the timer.
  template <class Change>
  void update(Change change) {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      const time_point now = Clock::now();
      refill(now);
      change();
      process(now, batch);
    }
    batch.complete(ex_);
  }

  void refill(time_point now) noexcept {
    if (now > last_) {
      const double seconds = std::chrono::duration<double>(now - last_).count();
      requests_.refill(seconds);
      tokens_.refill(seconds);
      last_ = now;
    }
  }

  // Takes `c` if both buckets can pay now; the caller has checked the queue.
  bool grant(const throttle_cost& c, time_point now) noexcept {
    refill(now);
    if (now < paused_until_ || !requests_.covers(c.requests) || !tokens_.covers(c.tokens)) {
      return false;
    }
    requests_.take(c.requests);
    tokens_.take(c.tokens);
    ++granted_;
    return true;
  }

  // The queue became empty at `t` (or a pause began): its time since `queued_since_` counts.
  void end_queued(time_point t) noexcept {
    if (t > queued_since_) {
      queued_time_ += t - queued_since_;
    }
    queued_since_ = t;
  }

  // Grants as many heads as the buckets allow at `t`; a waiter that queued after `t` is not
  // granted at `t` (only reached by catch_up, whose `t` can be in the past).
  void grant_heads(time_point t, completion_batch& batch) {
    while (!queue_.empty()) {
      auto& head = static_cast<node&>(*queue_.front());
      if (head.enqueued > t || !grant(head.cost, t)) {
        break;
      }
      queue_.pop_front();
      wait_time_ += t - head.enqueued;
      if (queue_.empty()) {
        end_queued(t);
      }
      batch.add(head, {});
    }
  }

  // Grants as many heads as the buckets allow, then arms the timer for the new head.
  void process(time_point now, completion_batch& batch) {
    grant_heads(now, batch);
    schedule(now);
  }

  // The instant the head can be paid, refill being accounted up to `t` (or the end of a pause).
  time_point head_due(time_point t) const noexcept {
    const auto& head = static_cast<const node&>(*queue_.front());
    // Cap the wait so a near-zero rate cannot overflow the clock (about three years).
    constexpr double max_seconds = 1e8;
    const double seconds =
        std::min(max_seconds, std::max(requests_.seconds_until(head.cost.requests),
                                       tokens_.seconds_until(head.cost.tokens)));
    return saturating_add(std::max(t, last_),
                          std::chrono::ceil<duration>(std::chrono::duration<double>(seconds)));
  }

  // The timer for a head due at `due` fired at `now`. Timer slack (about 50-100 us on Linux) or a
  // busy thread makes `now` later than `due`; a bucket refilled straight to `now` would cap the
  // tokens earned in between at its capacity and lose the rest, which with a small burst costs
  // a large part of the rate (burst 1 at 2,000/s lost 15%). So the heads that became payable in
  // [due, now) are granted at the instants they became payable, as if the timer had been exact;
  // lateness beyond `max_catch_up` (a stalled thread) is not made up, which bounds the burst
  // that follows a stall to about rate x max_catch_up.
  void catch_up(time_point due, time_point now, completion_batch& batch) {
    constexpr auto max_catch_up = std::chrono::milliseconds(50);
    time_point t = due;
    if (now - due > max_catch_up) {
      t = now - std::chrono::duration_cast<duration>(max_catch_up);
    }
    while (t < now && !queue_.empty()) {
      grant_heads(t, batch);
      if (queue_.empty() || static_cast<const node&>(*queue_.front()).enqueued > t) {
        break;
      }
      const time_point next = head_due(t);
      if (next <= t) {
        break;
      }
      t = next;
    }
  }

  // Arms the timer for the instant the head can be paid; disarms it when nobody waits, so an
  // idle throttler keeps no work on its executor. Called after refill(now), so `last_` is now,
  // or the end of a pause if that is later.
  void schedule(time_point now) {
    if (queue_.empty()) {
      disarm();
      return;
    }
    const time_point at = head_due(now);
    if (timer_.armed() && at == timer_.armed_at()) {
      return;
    }
    timer_.arm(at, [self = this->shared_from_this()](std::uint64_t g) { self->on_timer(g); });
  }

  void disarm() { timer_.disarm(); }

  void on_timer(std::uint64_t generation) {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      const time_point due = timer_.armed_at();
      if (!timer_.take(generation)) {
        return;  // superseded by a re-arm, a disarm or shutdown
      }
      const time_point now = Clock::now();
      catch_up(due, now, batch);
      process(now, batch);
    }
    batch.complete(ex_);
  }

  mutable std::mutex mutex_;
  boost::asio::any_io_executor ex_;
  queue_timer<Clock> timer_;
  waiter_list queue_;
  throttle_bucket requests_;
  throttle_bucket tokens_;
  double tokens_per_minute_ = 0;
  double token_burst_ = 0;
  time_point last_;  // refill is accounted up to here
  time_point paused_until_{};
  bool closed_ = false;
  std::uint64_t granted_ = 0;
  std::uint64_t waits_ = 0;
  duration wait_time_{};
  // Time with a non-empty queue and no pause, accounted up to queued_since_ (while the queue is
  // not empty, counting resumes there: the end of a pause, or when the first caller queued).
  duration queued_time_{};
  time_point queued_since_{};
};

}  // namespace keel::detail

namespace keel {

template <class Clock>
basic_throttler<Clock>::basic_throttler(executor_type ex, throttler_options options)
    : state_(std::make_shared<detail::throttler_state<Clock>>(std::move(ex), options)) {}

template <class Clock>
basic_throttler<Clock>::~basic_throttler() {
  state_->shutdown();
}

template <class Clock>
auto basic_throttler<Clock>::get_executor() const noexcept -> executor_type {
  return state_->executor();
}

template <class Clock>
boost::asio::awaitable<void> basic_throttler<Clock>::acquire(throttle_cost cost) {
  if (state_->try_take(cost)) {
    co_return;
  }
  // Slow path: the frame keeps the state alive, since the throttler may be destroyed meanwhile.
  const std::shared_ptr<detail::throttler_state<Clock>> state = state_;
  typename detail::throttler_state<Clock>::node waiter{cost};
  const auto cancellation = co_await boost::asio::this_coro::cancellation_state;
  const boost::asio::cancellation_type_t cancelled_before = cancellation.cancelled();
  co_await detail::async_queue_wait(state, waiter, boost::asio::use_awaitable);
  // A cancellation that arrived after the grant was posted but before this coroutine resumed
  // could no longer remove the waiter: give the grant back rather than lose it.
  if (cancellation.cancelled() != cancelled_before) {
    state->refund(waiter.cost);
    throw boost::system::system_error(boost::asio::error::operation_aborted);
  }
}

template <class Clock>
bool basic_throttler<Clock>::try_acquire(throttle_cost cost) {
  return state_->try_take(cost);
}

template <class Clock>
void basic_throttler<Clock>::settle(double estimated_tokens, double actual_tokens) {
  state_->settle(estimated_tokens, actual_tokens);
}

template <class Clock>
void basic_throttler<Clock>::release(throttle_cost cost) {
  state_->release(cost);
}

template <class Clock>
void basic_throttler<Clock>::pause_until(time_point t) {
  state_->pause_until(t);
}

template <class Clock>
void basic_throttler<Clock>::pause_for(duration d) {
  state_->pause_until(saturating_add(Clock::now(), d));
}

template <class Clock>
auto basic_throttler<Clock>::paused_until() const -> time_point {
  return state_->paused_until();
}

template <class Clock>
void basic_throttler<Clock>::set_rate(double requests_per_second, double tokens_per_minute) {
  state_->set_rate(requests_per_second, tokens_per_minute);
}

template <class Clock>
void basic_throttler<Clock>::set_burst(double burst) {
  state_->set_burst(burst);
}

template <class Clock>
void basic_throttler<Clock>::set_token_burst(double token_burst) {
  state_->set_token_burst(token_burst);
}

template <class Clock>
void basic_throttler<Clock>::set_available_requests(double requests) {
  state_->set_available_requests(requests);
}

template <class Clock>
void basic_throttler<Clock>::set_available_tokens(double tokens) {
  state_->set_available_tokens(tokens);
}

template <class Clock>
double basic_throttler<Clock>::available_requests() const {
  return state_->available_requests();
}

template <class Clock>
double basic_throttler<Clock>::available_tokens() const {
  return state_->available_tokens();
}

template <class Clock>
throttler_options basic_throttler<Clock>::options() const {
  return state_->options();
}

template <class Clock>
std::size_t basic_throttler<Clock>::waiters() const {
  return state_->waiters();
}

template <class Clock>
std::uint64_t basic_throttler<Clock>::total_granted() const {
  return state_->total_granted();
}

template <class Clock>
std::uint64_t basic_throttler<Clock>::total_waits() const {
  return state_->total_waits();
}

template <class Clock>
auto basic_throttler<Clock>::total_wait_time() const -> duration {
  return state_->total_wait_time();
}

template <class Clock>
auto basic_throttler<Clock>::total_queued_time() const -> duration {
  return state_->total_queued_time();
}

}  // namespace keel
