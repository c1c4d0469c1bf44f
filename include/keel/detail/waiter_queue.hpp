// Private: the FIFO of suspended coroutines shared by keel's throttler and bulkhead.
#pragma once

// How it works
// ------------
// A waiting coroutine owns its queue node: the node is a local in the coroutine's frame, and the
// frame stays alive until the node's handler is invoked, so the queue never allocates a node and
// never frees one. The owner of a queue (throttler or bulkhead state) keeps its own mutex and
// does every queue operation under it; handlers are only ever *taken* under the lock (into a
// `completion_batch`) and *completed* after the lock is released, by posting them, so no user
// code ever runs under keel's lock and no coroutine resumes inside the cancellation handler that
// removed it (Asio forbids clearing a cancellation slot from inside its own handler, and the
// awaitable machinery clears the slot when the coroutine resumes).
//
// Cancellation: the initiation installs a `waiter_cancellation` in the handler's cancellation
// slot (the type-erased handler's own slot) before the node becomes visible to other threads. When
// it fires it asks the owner to remove the node; if the node has already left the queue (granted,
// timed out, aborted) the request is ignored, so a cancellation racing a grant loses nothing: the
// grant wins.
//
// Asio 1.26 pitfall: `any_completion_handler`'s move *assignment* recurses forever (it copies
// `other` through its unconstrained converting constructor). Only move-construct and swap here.

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/append.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/post.hpp>
#include <boost/assert.hpp>
#include <boost/system/error_code.hpp>

#include <cstddef>
#include <memory>
#include <utility>

namespace keel::detail {

/// The completion handler of a suspended waiter.
using waiter_handler = boost::asio::any_completion_handler<void(boost::system::error_code)>;

class waiter_list;
class completion_batch;

/// A queue node; derive from it to add what the owner needs (cost, deadline...).
class waiter {
 public:
  waiter() = default;
  waiter(const waiter&) = delete;
  waiter& operator=(const waiter&) = delete;
  ~waiter() { BOOST_ASSERT(list_ == nullptr); }

  /// Stores the handler to complete (move-construct + swap: see the pitfall above).
  void set_handler(waiter_handler&& h) noexcept { waiter_handler(std::move(h)).swap(handler_); }

 private:
  friend class waiter_list;
  friend class completion_batch;

  waiter* prev_ = nullptr;
  waiter* next_ = nullptr;
  const waiter_list* list_ = nullptr;  // the list this node is in, if any
  waiter* done_next_ = nullptr;        // link in a completion_batch
  boost::system::error_code result_;
  waiter_handler handler_;
};

/// An intrusive FIFO of waiters. Not synchronised: the owner locks.
class waiter_list {
 public:
  waiter_list() = default;
  waiter_list(const waiter_list&) = delete;
  waiter_list& operator=(const waiter_list&) = delete;

  bool empty() const noexcept { return head_ == nullptr; }
  std::size_t size() const noexcept { return size_; }
  waiter* front() const noexcept { return head_; }
  bool contains(const waiter& w) const noexcept { return w.list_ == this; }

  void push_back(waiter& w) noexcept {
    BOOST_ASSERT(w.list_ == nullptr);
    w.list_ = this;
    w.prev_ = tail_;
    w.next_ = nullptr;
    (tail_ != nullptr ? tail_->next_ : head_) = &w;
    tail_ = &w;
    ++size_;
  }

  void erase(waiter& w) noexcept {
    BOOST_ASSERT(contains(w));
    (w.prev_ != nullptr ? w.prev_->next_ : head_) = w.next_;
    (w.next_ != nullptr ? w.next_->prev_ : tail_) = w.prev_;
    w.prev_ = w.next_ = nullptr;
    w.list_ = nullptr;
    --size_;
  }

  waiter& pop_front() noexcept {
    BOOST_ASSERT(head_ != nullptr);
    waiter& w = *head_;
    erase(w);
    return w;
  }

 private:
  waiter* head_ = nullptr;
  waiter* tail_ = nullptr;
  std::size_t size_ = 0;
};

/// Waiters that have left their queue and whose handlers are to be completed once the owner's
/// lock is released. Lives on the stack of the function that took the lock.
class completion_batch {
 public:
  completion_batch() = default;
  completion_batch(const completion_batch&) = delete;
  completion_batch& operator=(const completion_batch&) = delete;
  ~completion_batch() { BOOST_ASSERT(head_ == nullptr); }

  /// Adds `w` (already out of its queue, handler set) to complete with `ec`; call under the lock.
  void add(waiter& w, boost::system::error_code ec) noexcept {
    BOOST_ASSERT(w.list_ == nullptr);
    w.result_ = ec;
    w.done_next_ = nullptr;
    (tail_ != nullptr ? tail_->done_next_ : head_) = &w;
    tail_ = &w;
  }

  /// Posts every handler, in order, through `ex` to the handler's own associated executor; call
  /// without the lock. A node is not touched once its handler is posted: its coroutine may
  /// already be running on another thread and destroy it.
  template <class Executor>
  void complete(const Executor& ex) {
    waiter* w = head_;
    head_ = tail_ = nullptr;
    while (w != nullptr) {
      waiter* next = w->done_next_;
      const boost::system::error_code ec = w->result_;
      waiter_handler h(std::move(w->handler_));
      boost::asio::post(ex, boost::asio::append(std::move(h), ec));
      w = next;
    }
  }

 private:
  waiter* head_ = nullptr;
  waiter* tail_ = nullptr;
};

/// The cancellation handler installed in a waiter's slot: asks the owner to remove the waiter.
/// Holds the owner alive, since a cancellation may be emitted after the owner's public object is
/// gone (its waiters were aborted but have not resumed yet).
template <class Owner>
class waiter_cancellation {
 public:
  waiter_cancellation(std::shared_ptr<Owner> owner, waiter& w) noexcept
      : owner_(std::move(owner)), waiter_(&w) {}

  void operator()(boost::asio::cancellation_type_t type) {
    constexpr auto accepted = boost::asio::cancellation_type::terminal |
                              boost::asio::cancellation_type::partial |
                              boost::asio::cancellation_type::total;
    // Removing a waiter has no side effect at all, so every kind of cancellation is honoured.
    if ((type & accepted) != boost::asio::cancellation_type::none) {
      owner_->cancel_waiter(*waiter_);
    }
  }

 private:
  std::shared_ptr<Owner> owner_;
  waiter* waiter_;
};

/// Initiation of a queue wait: installs cancellation, then hands the handler to the owner.
template <class Owner>
struct initiate_queue_wait {
  std::shared_ptr<Owner> owner;
  waiter* node;

  template <class Handler>
  void operator()(Handler&& handler) {
    // Type-erase first: any_completion_handler installs its own forwarding handler in the
    // original slot and exposes a fresh slot of its own, which is where ours must go.
    waiter_handler h(std::forward<Handler>(handler));
    auto slot = h.get_cancellation_slot();
    if (slot.is_connected()) {
      slot.template emplace<waiter_cancellation<Owner>>(owner, *node);
    }
    owner->enqueue(*node, std::move(h));
  }
};

/// Suspends until `owner` completes `node` (the caller's frame must hold `node`).
///
/// `Owner` provides `enqueue(waiter&, waiter_handler&&)`, which either queues the node or puts it
/// straight into a completion batch, and `cancel_waiter(waiter&)`, which removes a still-queued
/// node and completes it with `operation_aborted`.
template <class Owner, class CompletionToken>
auto async_queue_wait(std::shared_ptr<Owner> owner, waiter& node, CompletionToken&& token) {
  return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
      initiate_queue_wait<Owner>{std::move(owner), &node}, token);
}

}  // namespace keel::detail
