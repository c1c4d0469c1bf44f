// Implementation of keel::basic_bulkhead: slots, the waiter queue, hand-off and the timeout timer.
#pragma once

#include <keel/bulkhead.hpp>
#include <keel/clock.hpp>
#include <keel/detail/queue_timer.hpp>
#include <keel/detail/waiter_queue.hpp>
#include <keel/error.hpp>

#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <chrono>
#include <memory>
#include <mutex>

namespace keel::detail {

// What a permit points at; type-erases the bulkhead's clock so that `bulkhead_permit` is one type.
class bulkhead_permit_source {
 public:
  virtual void release_slot() noexcept = 0;

 protected:
  virtual ~bulkhead_permit_source() = default;
};

enum class bulkhead_entry { granted, rejected, wait };

template <class Clock>
class bulkhead_state final : public bulkhead_permit_source,
                             public std::enable_shared_from_this<bulkhead_state<Clock>> {
 public:
  using time_point = typename Clock::time_point;
  using duration = typename Clock::duration;

  // A queued acquire; lives in the acquiring coroutine's frame. If the frame is destroyed after
  // a slot was handed to it but before it resumed (its io_context shut down), the slot is
  // given back rather than lost.
  struct node : waiter {
    explicit node(std::shared_ptr<bulkhead_state> s) noexcept : state(std::move(s)) {}
    ~node() {
      if (holds_slot) {
        state->release_slot();
      }
    }
    std::shared_ptr<bulkhead_state> state;
    time_point deadline = time_point::max();
    bool holds_slot = false;  // set under the lock when a slot is handed over
  };

  bulkhead_state(boost::asio::any_io_executor ex, const bulkhead_options& o)
      : ex_(ex), timer_(ex), options_(o) {
    options_.max_concurrent = std::max<std::size_t>(1, options_.max_concurrent);
    if (options_.queue_timeout.count() < 0) {
      options_.queue_timeout = std::chrono::nanoseconds::zero();
    }
  }

  ~bulkhead_state() override = default;

  const boost::asio::any_io_executor& executor() const noexcept { return ex_; }
  const bulkhead_options& options() const noexcept { return options_; }

  bulkhead_entry try_enter(bool may_wait) {
    std::lock_guard lock{mutex_};
    if (in_flight_ < options_.max_concurrent && queue_.empty()) {
      ++in_flight_;
      return bulkhead_entry::granted;
    }
    if (!may_wait) {
      return bulkhead_entry::wait;
    }
    if (queue_.size() >= options_.max_queue) {
      ++rejected_;
      return bulkhead_entry::rejected;
    }
    return bulkhead_entry::wait;
  }

  void enqueue(waiter& w, waiter_handler&& h) {
    auto& n = static_cast<node&>(w);
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      n.set_handler(std::move(h));
      // Things may have changed since try_enter: decide again under this lock.
      if (closed_) {
        batch.add(n, boost::asio::error::operation_aborted);
      } else if (in_flight_ < options_.max_concurrent && queue_.empty()) {
        ++in_flight_;
        n.holds_slot = true;
        batch.add(n, {});
      } else if (queue_.size() >= options_.max_queue) {
        ++rejected_;
        batch.add(n, error::queue_full);
      } else {
        if (options_.queue_timeout.count() > 0) {
          n.deadline = saturating_add(Clock::now(), options_.queue_timeout);
          // FIFO and one timeout for all: the head always has the earliest deadline, so one
          // timer armed for the head serves everybody. If it is armed, it is for an earlier
          // head and will re-arm itself when it fires.
          if (!timer_.armed() && n.deadline != time_point::max()) {
            arm(n.deadline);
          }
        }
        queue_.push_back(n);
      }
    }
    batch.complete(ex_);
  }

  void cancel_waiter(waiter& w) {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      if (!queue_.contains(w)) {
        return;  // already handed a slot, timed out or aborted: that outcome wins
      }
      queue_.erase(w);
      batch.add(w, boost::asio::error::operation_aborted);
      if (queue_.empty()) {
        disarm();
      }
    }
    batch.complete(ex_);
  }

  void release_slot() noexcept override {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      if (queue_.empty()) {
        --in_flight_;
      } else {
        // Hand the slot straight to the oldest waiter: in_flight_ does not change.
        auto& n = static_cast<node&>(queue_.pop_front());
        n.holds_slot = true;
        batch.add(n, {});
        if (queue_.empty()) {
          disarm();
        }
      }
    }
    batch.complete(ex_);
  }

  void shutdown() {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      closed_ = true;
      while (!queue_.empty()) {
        batch.add(queue_.pop_front(), boost::asio::error::operation_aborted);
      }
      disarm();
    }
    batch.complete(ex_);
  }

  std::size_t in_flight() const {
    std::lock_guard lock{mutex_};
    return in_flight_;
  }
  std::size_t queued() const {
    std::lock_guard lock{mutex_};
    return queue_.size();
  }
  std::uint64_t rejected() const {
    std::lock_guard lock{mutex_};
    return rejected_;
  }
  std::uint64_t timed_out() const {
    std::lock_guard lock{mutex_};
    return timed_out_;
  }

 private:
  void arm(time_point at) {
    timer_.arm(at, [self = this->shared_from_this()](std::uint64_t g) { self->on_timer(g); });
  }

  // Called when the queue empties, so that an idle bulkhead keeps no work on its executor.
  void disarm() { timer_.disarm(); }

  void on_timer(std::uint64_t generation) {
    completion_batch batch;
    {
      std::lock_guard lock{mutex_};
      if (!timer_.take(generation)) {
        return;  // superseded by a re-arm, a disarm or shutdown
      }
      const time_point now = Clock::now();
      while (!queue_.empty() && static_cast<node&>(*queue_.front()).deadline <= now) {
        ++timed_out_;
        batch.add(queue_.pop_front(), error::queue_timeout);
      }
      if (!queue_.empty() && static_cast<node&>(*queue_.front()).deadline != time_point::max()) {
        arm(static_cast<node&>(*queue_.front()).deadline);
      }
    }
    batch.complete(ex_);
  }

  mutable std::mutex mutex_;
  boost::asio::any_io_executor ex_;
  queue_timer<Clock> timer_;
  bulkhead_options options_;
  waiter_list queue_;
  std::size_t in_flight_ = 0;
  std::uint64_t rejected_ = 0;
  std::uint64_t timed_out_ = 0;
  bool closed_ = false;
};

}  // namespace keel::detail

namespace keel {

inline bulkhead_permit& bulkhead_permit::operator=(bulkhead_permit&& other) noexcept {
  if (this != &other) {
    release();
    source_ = std::move(other.source_);
  }
  return *this;
}

inline void bulkhead_permit::release() noexcept {
  if (source_ != nullptr) {
    std::shared_ptr<detail::bulkhead_permit_source> source = std::move(source_);
    source->release_slot();
  }
}

template <class Clock>
basic_bulkhead<Clock>::basic_bulkhead(executor_type ex, bulkhead_options options)
    : state_(std::make_shared<detail::bulkhead_state<Clock>>(std::move(ex), options)) {}

template <class Clock>
basic_bulkhead<Clock>::~basic_bulkhead() {
  state_->shutdown();
}

template <class Clock>
auto basic_bulkhead<Clock>::get_executor() const noexcept -> executor_type {
  return state_->executor();
}

template <class Clock>
boost::asio::awaitable<bulkhead_permit> basic_bulkhead<Clock>::acquire() {
  switch (state_->try_enter(true)) {
    case detail::bulkhead_entry::granted:
      co_return bulkhead_permit(state_);
    case detail::bulkhead_entry::rejected:
      throw_failure(error::queue_full);
    case detail::bulkhead_entry::wait:
      break;
  }
  // Slow path: the node keeps the state alive, since the bulkhead may be destroyed meanwhile.
  typename detail::bulkhead_state<Clock>::node waiter{state_};
  const auto cancellation = co_await boost::asio::this_coro::cancellation_state;
  const boost::asio::cancellation_type_t cancelled_before = cancellation.cancelled();
  boost::system::error_code ec;
  co_await detail::async_queue_wait(waiter.state, waiter,
                                    boost::asio::redirect_error(boost::asio::use_awaitable, ec));
  if (!ec) {
    waiter.holds_slot = false;  // the permit owns it now
    bulkhead_permit permit(waiter.state);
    // A cancellation that arrived after the hand-off was posted but before this coroutine
    // resumed could no longer remove the waiter: pass the slot on rather than hold it.
    if (cancellation.cancelled() != cancelled_before) {
      permit.release();
      throw boost::system::system_error(boost::asio::error::operation_aborted);
    }
    co_return permit;
  }
  if (ec == error::queue_full) {
    throw_failure(error::queue_full);
  }
  if (ec == error::queue_timeout) {
    throw_failure(error::queue_timeout);
  }
  throw boost::system::system_error(ec);
}

template <class Clock>
bulkhead_permit basic_bulkhead<Clock>::try_acquire() {
  if (state_->try_enter(false) == detail::bulkhead_entry::granted) {
    return bulkhead_permit(state_);
  }
  return {};
}

template <class Clock>
std::size_t basic_bulkhead<Clock>::in_flight() const {
  return state_->in_flight();
}

template <class Clock>
std::size_t basic_bulkhead<Clock>::queued() const {
  return state_->queued();
}

template <class Clock>
std::uint64_t basic_bulkhead<Clock>::rejected() const {
  return state_->rejected();
}

template <class Clock>
std::uint64_t basic_bulkhead<Clock>::timed_out() const {
  return state_->timed_out();
}

template <class Clock>
bulkhead_options basic_bulkhead<Clock>::options() const noexcept {
  return state_->options();
}

}  // namespace keel
