// Private: one timer per execution context and clock that serves every pending `with_deadline`.
#pragma once

// Why a shared queue: a timer per call costs two system calls on Linux (`timerfd_settime` when
// the new timer becomes the earliest, and again on cancel), about 3 µs, and an allocated wait
// operation. Calls with deadlines mostly finish long before them, so the timer almost never fires.
// The queue keeps one timer per (execution context, clock) armed at the earliest pending
// deadline (a `queue_timer`, the same generation-checked timer the throttler and bulkhead use
// for their waiter queues) and an intrusive binary heap of entries, one per pending call, each
// living in the caller's coroutine frame. Adding an entry re-arms the timer only if it is now the
// earliest; removing one never touches the timer (the timer may then fire early, find nothing due,
// and re-arm for the new earliest). So calls whose deadlines arrive in order (the usual case: a
// fixed timeout from "now") make no system call at all.
//
// Idle: a pending timer wait is outstanding work and would keep `io_context::run()` from
// returning until it fires. So when the heap becomes empty the wait stops counting as work: on an
// io_context the queue gives the wait's unit of work back (`on_work_finished`) and takes it again
// when an entry is added or the wait completes, exactly as Asio's own reactor task is not counted.
// On other execution contexts it posts one check instead, which cancels the timer if the heap is
// still empty when it runs. Either way a caller that issues calls back to back keeps the timer
// armed without a system call, and a program whose work is done still exits at once.
//
// Firing: the timer's handler takes every due entry off the heap under the lock, then, outside
// it, calls each entry's `fire` (which dispatches to the caller's own executor, so a strand's
// serialisation is kept). An entry's owner that finds its entry already taken (`remove` returns
// false) must wait until its `fire` has run before it frees the entry.
//
// Thread safety: every member is safe to call from any thread; the heap and the timer are guarded
// by one mutex, held only for the heap operation.

#include <keel/clock.hpp>
#include <keel/detail/deadline_executor.hpp>
#include <keel/detail/queue_timer.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/query.hpp>
#include <boost/asio/strand.hpp>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace keel::detail {

/// One pending deadline. Lives in its owner's frame; the queue only links it.
template <class Clock>
struct deadline_entry {
  static constexpr std::size_t not_queued = static_cast<std::size_t>(-1);

  typename Clock::time_point at{};
  /// Called once, from the queue's timer handler and without its lock, when `at` has passed.
  void (*fire)(deadline_entry*) noexcept = nullptr;
  std::size_t index = not_queued;      // position in the heap (guarded by the queue's mutex)
  deadline_entry* next_due = nullptr;  // links the entries one timer handler fires
};

template <class Clock>
class deadline_queue final : public boost::asio::execution_context::service {
 public:
  using time_point = typename Clock::time_point;
  using entry = deadline_entry<Clock>;

  static inline boost::asio::execution_context::id id;

  explicit deadline_queue(boost::asio::execution_context& ctx)
      : boost::asio::execution_context::service(ctx) {}

  /// The queue of the execution context `ex` belongs to.
  static deadline_queue& of(const boost::asio::any_io_executor& ex) {
    return boost::asio::use_service<deadline_queue>(
        boost::asio::query(ex, boost::asio::execution::context));
  }

  /// Queues `e` (whose `at` and `fire` are set); `ex` is any executor of this context, used to
  /// make the timer on first use. Returns false, queuing nothing, once the context is shutting
  /// down.
  bool add(entry& e, const boost::asio::any_io_executor& ex) {
    std::lock_guard lock(mutex_);
    if (shut_down_) {
      return false;
    }
    if (!timer_) {
      timer_.emplace(timer_executor(ex));
    }
    e.index = heap_.size();
    heap_.push_back(&e);
    sift_up(e.index);
    track_wait();
    if (!timer_->armed() || e.at < timer_->armed_at()) {
      try {
        arm(e.at);
      } catch (...) {
        erase_at(e.index);  // the caller's frame is unwinding: leave nothing pointing into it
        if (!heap_.empty()) {
          try {
            arm(heap_.front()->at);  // the cancelled wait served the others; try to restore it
          } catch (...) {
            // Out of memory: the others fire once a later add arms the timer again.
          }
        }
        throw;
      }
    }
    return true;
  }

  /// Takes `e` off the queue. Returns false if the timer has already taken it: then its `fire`
  /// has run or is about to, and the owner must not free `e` until it has.
  bool remove(entry& e) noexcept {
    std::lock_guard lock(mutex_);
    if (e.index == entry::not_queued) {
      return false;
    }
    erase_at(e.index);
    if (heap_.empty() && timer_->armed()) {
      untrack_wait();
    }
    return true;
  }

  /// Entries now queued (for tests).
  std::size_t size() const {
    std::lock_guard lock(mutex_);
    return heap_.size();
  }

 private:
  void shutdown() override {
    std::lock_guard lock(mutex_);
    shut_down_ = true;
    for (entry* e : heap_) {
      e->index = entry::not_queued;  // their frames are being destroyed with the context's handlers
    }
    heap_.clear();
    // The timer must go now: the timer service it belongs to is destroyed before this one.
    timer_.reset();
    timer_executor_.reset();
  }

  // The timer's handler runs on the context's plain executor where we can find it, so that it is
  // not serialised behind a strand that happened to make the first call.
  // The queue keeps this executor for the context's lifetime, so it must not count as work: a
  // caller's `outstanding_work.tracked` executor would keep `run()` from ever returning.
  boost::asio::any_io_executor timer_executor(const boost::asio::any_io_executor& ex) {
    namespace execution = boost::asio::execution;
    boost::asio::any_io_executor plain =
        boost::asio::prefer(strip_deadline<Clock>(ex), execution::outstanding_work.untracked);
    if (auto* s = plain.target<boost::asio::strand<io_executor>>()) {
      plain = s->get_inner_executor();
    }
    timer_executor_ = plain;
#if !defined(BOOST_ASIO_NO_TS_EXECUTORS)
    if (auto* io = plain.target<io_executor>()) {
      io_ = *io;
    }
#endif
    return plain;
  }

  // The wait in progress counts as outstanding work again (mutex_ held).
  void track_wait() noexcept {
#if !defined(BOOST_ASIO_NO_TS_EXECUTORS)
    if (untracked_) {
      untracked_ = false;
      io_->on_work_started();
    }
#endif
  }

  // The heap is empty: stop the wait in progress from keeping the context running (mutex_ held).
  // Called from a caller's handler, so the context's work count cannot reach zero here.
  void untrack_wait() noexcept {
#if !defined(BOOST_ASIO_NO_TS_EXECUTORS)
    if (io_) {
      if (!untracked_) {
        untracked_ = true;
        io_->on_work_finished();
      }
      return;
    }
#endif
    if (!idle_check_posted_) {
      // Posting never runs the function inline, so holding the lock is safe. If it cannot
      // allocate, the timer merely stays armed until it fires.
      try {
        boost::asio::post(*timer_executor_, [this] { on_idle_check(); });
        idle_check_posted_ = true;
      } catch (...) {
      }
    }
  }

  void arm(time_point at) {  // mutex_ held
    track_wait();            // the wait being superseded completes as tracked work
    timer_->arm(at, [this](std::uint64_t generation) { on_timer(generation); });
  }

  void on_timer(std::uint64_t generation) {
    entry* due = nullptr;
    {
      std::lock_guard lock(mutex_);
      if (shut_down_ || !timer_->take(generation)) {
        return;  // a newer wait superseded this one, or the idle check cancelled it
      }
      track_wait();  // the scheduler counts this completion as the end of a unit of work
      const auto now = Clock::now();
      entry** tail = &due;
      while (!heap_.empty() && heap_.front()->at <= now) {
        entry* e = heap_.front();
        erase_at(0);
        e->next_due = nullptr;
        *tail = e;
        tail = &e->next_due;
      }
      if (!heap_.empty()) {
        arm(heap_.front()->at);
      }
    }
    while (due) {
      entry* e = due;
      due = e->next_due;  // read first: `fire` may let the owner free `e`
      e->fire(e);
    }
  }

  void on_idle_check() {
    std::lock_guard lock(mutex_);
    idle_check_posted_ = false;
    if (heap_.empty() && timer_) {
      timer_->disarm();
    }
  }

  // ---- intrusive binary min-heap on `at` -----------------------------------------------------
  void place(std::size_t i, entry* e) noexcept {
    heap_[i] = e;
    e->index = i;
  }

  void sift_up(std::size_t i) noexcept {
    entry* e = heap_[i];
    while (i > 0) {
      const std::size_t parent = (i - 1) / 2;
      if (!(e->at < heap_[parent]->at)) {
        break;
      }
      place(i, heap_[parent]);
      i = parent;
    }
    place(i, e);
  }

  void sift_down(std::size_t i) noexcept {
    entry* e = heap_[i];
    const std::size_t n = heap_.size();
    for (;;) {
      std::size_t child = 2 * i + 1;
      if (child >= n) {
        break;
      }
      if (child + 1 < n && heap_[child + 1]->at < heap_[child]->at) {
        ++child;
      }
      if (!(heap_[child]->at < e->at)) {
        break;
      }
      place(i, heap_[child]);
      i = child;
    }
    place(i, e);
  }

  void erase_at(std::size_t i) noexcept {
    entry* gone = heap_[i];
    entry* last = heap_.back();
    heap_.pop_back();
    gone->index = entry::not_queued;
    if (gone != last) {
      place(i, last);
      if (i > 0 && last->at < heap_[(i - 1) / 2]->at) {
        sift_up(i);
      } else {
        sift_down(i);
      }
    }
  }

  mutable std::mutex mutex_;
  std::vector<entry*> heap_;
  std::optional<queue_timer<Clock>> timer_;  // armed for the heap's front, or idle
  std::optional<boost::asio::any_io_executor> timer_executor_;
#if !defined(BOOST_ASIO_NO_TS_EXECUTORS)
  std::optional<io_executor> io_;  // set when the timer lives on an io_context
#endif
  bool untracked_ = false;  // the wait in progress no longer counts as the context's work
  bool idle_check_posted_ = false;
  bool shut_down_ = false;
};

}  // namespace keel::detail
