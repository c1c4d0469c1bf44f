// stream_guard: the commit point and the first-token and idle timeouts of a streamed call.
#pragma once

// Overview
// --------
// A streamed call hands its reply to the caller piece by piece (deltas). Two things make it
// different from a call that returns one value, and this header owns both, with no knowledge of
// HTTP or of any wire format (keel::llm::client uses them for its `stream_call`):
//
// 1. **The commit point** (`keel::stream_commit`, one per call, shared by all its attempts).
//    Until the first delta reaches the caller, a failed attempt is like a failed whole call: it
//    may be retried or fall back. Once a delta has reached the caller, the call is *committed*: a
//    retry would hand the caller text it already has, so no retry or fallback runs (`final()`),
//    unless the caller said the stream may restart (`restartable`). Then the next attempt's first
//    delta carries `restart` (`deliver` returns true): the caller must discard what it has. A
//    failure the caller's own handler threw ends the call whatever `restartable` says
//    (`consumer_failed`). A call that fails past the commit point reports a classified
//    `error::stream_interrupted` (`outcome`) naming how much was delivered, caused by the
//    attempt's error; cancellation by the caller and the consumer's own error stay unchanged.
//    Wire `final()` into `retry_policy::retry_if` and `fallback_policy::should_try`.
//
// 2. **Timeouts of one attempt** (`keel::basic_stream_watch<Clock>`, one per attempt). A
//    first-token timeout runs from the attempt's start (the request, the response head and any
//    bytes before the first delta all count against it: a server that sends a head and then
//    nothing is caught); after the first delta, an idle timeout runs per read (the time the
//    consumer spends between reads is not the server's silence). Both are separate from the
//    call's whole deadline (`with_deadline` around the call, which still applies). Each read goes
//    through `next(op)`, which runs it under `with_deadline` with whatever limit applies now; a
//    timeout throws `keel::failure` with `error::deadline_exceeded` (condition timeout, so it is
//    retried before the commit point) and a message saying which one fired. A read that can be
//    ended from outside (a socket read ends when its connection closes) goes through
//    `next(op, abort)` instead: one timer of the watch, re-armed per read, calls `abort()` when
//    the limit passes, and no coroutine thread is spawned per read (keel::llm::client reads
//    streams this way: an idle stream then holds one pending timer wait, not a `with_deadline`
//    thread and its frames).
//
// Design: the commit point is a plain state object, not a combinator, because what it decides is
// consulted by three combinators at once (retry, fallback and, for hedged streams, `with_hedge`'s
// own commit) and by the code that delivers deltas; a wrapper would have to re-implement them.
// The watch keeps one absolute first-token deadline and converts it to a relative limit per read,
// so a stream that trickles non-text bytes (a head, keep-alive comments, a `message_start`) cannot
// stretch the first-token timeout.
//
// Example (one attempt of a streamed call; `commit` lives in the call, outside `with_retry`):
//
//     keel::stream_commit commit(/*restartable=*/false);
//     keel::retry_policy p;
//     p.retry_if = [&](const std::exception_ptr&, const keel::classification& c) {
//       return !commit.final() && c.retryable();
//     };
//     co_await keel::with_retry([&]() -> boost::asio::awaitable<void> {
//       keel::stream_watch watch({.first_token = 10s, .idle = 30s});
//       auto reader = co_await watch.next([&] { return open(request); });
//       bool first = true;
//       while (auto piece = co_await watch.next([&] { return reader.read(); })) {
//         watch.first_token_seen();
//         const bool restart = commit.deliver(piece->size(), std::exchange(first, false));
//         co_await on_delta(*piece, restart);
//       }
//     }, p);
//
// Thread safety: neither type is thread-safe; use one call's objects from one strand.

#include <keel/clock.hpp>
#include <keel/deadline.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/error.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/system/system_error.hpp>

#include <chrono>
#include <concepts>
#include <cstddef>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace keel {

namespace detail {
/// `s` seconds as a short decimal (0.05 prints "0.05 s"), for messages.
std::string format_seconds(double s);
}  // namespace detail

/// The commit point of one streamed call, shared by all its attempts (retries, fallbacks and
/// hedges).
class stream_commit {
 public:
  /// A call whose attempts may not restart a stream once a delta has reached the caller unless
  /// `restartable`.
  explicit stream_commit(bool restartable = false) noexcept : restartable_(restartable) {}

  /// Records a delta of `bytes` about to reach the caller; call it before handing the delta over.
  /// @param first_of_attempt true for the first delta of an attempt.
  /// @returns true if the caller must discard what it has (the first delta of an attempt after
  ///   an earlier attempt delivered; the delivered counts restart with this delta).
  bool deliver(std::size_t bytes, bool first_of_attempt) noexcept {
    const bool restart = first_of_attempt && committed_;
    if (restart) {
      bytes_ = 0;
      deltas_ = 0;
    }
    committed_ = true;
    bytes_ += bytes;
    ++deltas_;
    return restart;
  }

  /// Records that the caller's own handler failed: no retry or fallback may run.
  void consumer_failed() noexcept { consumer_failed_ = true; }

  /// True once a delta has reached the caller.
  bool committed() const noexcept { return committed_; }

  /// True if the caller allowed a restart past the commit point.
  bool restartable() const noexcept { return restartable_; }

  /// True if the caller's handler failed.
  bool has_consumer_failed() const noexcept { return consumer_failed_; }

  /// True once no further retry or fallback may run: the consumer failed, or the call is
  /// committed and not restartable.
  bool final() const noexcept { return consumer_failed_ || (committed_ && !restartable_); }

  /// Bytes delivered to the caller (since the last restart).
  std::size_t delivered_bytes() const noexcept { return bytes_; }

  /// Deltas delivered to the caller (since the last restart).
  std::size_t delivered_deltas() const noexcept { return deltas_; }

  /// The error to report for a call that ended with `error` after `attempts` attempts.
  /// @param why a short name of the cause for the message (e.g. its error class); may be empty.
  /// @returns `error` unchanged if null, not committed, the consumer's own failure, or a
  ///   cancellation; otherwise a `keel::failure` with `error::stream_interrupted`, `attempts`,
  ///   `error` as its cause, and a message naming the bytes and deltas delivered.
  std::exception_ptr outcome(std::exception_ptr error, int attempts,
                             std::string_view why = {}) const;

 private:
  bool restartable_;
  bool committed_ = false;
  bool consumer_failed_ = false;
  std::size_t bytes_ = 0;
  std::size_t deltas_ = 0;
};

/// The timeouts of one streamed attempt; zero (the default) means none.
struct stream_timeouts {
  /// From the attempt's start until its first delta.
  std::chrono::nanoseconds first_token{0};
  /// Per read once the first delta has come.
  std::chrono::nanoseconds idle{0};
};

/// Watches one streamed attempt: runs each read under the first-token or the idle timeout.
template <class Clock = default_clock>
class basic_stream_watch {
 public:
  /// The attempt starts now (on `Clock`): the first-token timeout runs from here.
  explicit basic_stream_watch(stream_timeouts t) noexcept
      : timeouts_(t),
        first_deadline_(t.first_token > std::chrono::nanoseconds::zero()
                            ? std::optional(saturating_add(Clock::now(), t.first_token))
                            : std::nullopt) {}

  /// Runs one read, `op()`, under the limit that applies now: until `first_token_seen()`, what
  /// is left of the first-token timeout; then the idle timeout; without one, `op()` unbounded.
  /// @param op a callable returning a fresh awaitable; called once.
  /// @returns the read's value.
  /// @throws keel::failure with `error::deadline_exceeded` and a message naming the timeout
  ///   ("no first token within 10 s", "stream idle for 30 s") if it fired first (without calling
  ///   `op` if the first-token deadline has already passed); otherwise what `op` threw.
  /// Cancellation: as `with_deadline`: cancelling the caller cancels the read; its error
  ///   propagates, unchanged.
  template <class MakeOp>
  requires detail::is_op_factory_v<MakeOp> boost::asio::awaitable<detail::op_value_t<MakeOp>> next(
      MakeOp op) {
    const std::optional<typename Clock::time_point> at = limit_at();
    if (!at) {
      co_return co_await op();
    }
    const bool first = !seen_first_;
    try {
      co_return co_await with_deadline_at<Clock>(std::move(op), *at);
    } catch (const boost::system::system_error& e) {
      // Ours only if our deadline has passed: an error of the same code from inside the read
      // (a deadline of its own) is the read's.
      if (e.code() != make_error_code(error::deadline_exceeded) || Clock::now() < *at) {
        throw;
      }
    }
    throw timed_out(first);
  }

  /// Runs one read, `op()`, under the same limit as `next(op)`, enforced by calling `abort()`
  /// instead of cancelling the read: the cheap form for a read that can be ended from outside
  /// (a socket read ends when its connection is closed). No coroutine thread is spawned: one
  /// timer of the watch, re-armed per read, calls `abort()` if the limit passes first.
  /// @param op a callable returning a fresh awaitable; called once.
  /// @param abort called (at most once, on the caller's executor, while `op()` is in progress)
  ///   when the limit passes; it must make `op()` complete soon, with any value or error.
  /// @returns the read's value.
  /// @throws keel::failure with `error::deadline_exceeded` naming the timeout if the limit passed
  ///   first (then what the read returned or threw is discarded; without calling `op` if the
  ///   first-token deadline has already passed); otherwise what `op` threw.
  /// Cancellation: the read runs in the caller's coroutine, so cancelling the caller cancels it
  ///   as if `next` were not there; its error propagates, unchanged.
  template <class MakeOp, class Abort>
  requires detail::is_op_factory_v<MakeOp> && std::invocable<Abort&>
      boost::asio::awaitable<detail::op_value_t<MakeOp>> next(MakeOp op, Abort abort) {
    using T = detail::op_value_t<MakeOp>;
    const std::optional<typename Clock::time_point> at = limit_at();
    if (!at) {
      co_return co_await op();
    }
    const bool first = !seen_first_;
    if (Clock::now() >= *at) {
      throw timed_out(first);
    }
    if (!timer_) {
      timer_.emplace(co_await boost::asio::this_coro::executor);
      armed_ = std::make_shared<arming>();
    }
    // The timer's handler may run after this read has finished (its expiry was already queued)
    // or after the watch is gone: it acts only while `active`, which the read's end clears.
    armed_->active = true;
    armed_->fired = false;
    armed_->abort = &abort;
    armed_->call = [](void* a) { (*static_cast<Abort*>(a))(); };
    timer_->expires_at(*at);
    timer_->async_wait([a = armed_](const boost::system::error_code& ec) {
      if (!ec && a->active) {
        a->active = false;
        a->fired = true;
        a->call(a->abort);
      }
    });
    struct disarm {
      basic_stream_watch& w;
      ~disarm() {
        w.armed_->active = false;
        w.timer_->cancel();
      }
    };
    if constexpr (std::is_void_v<T>) {
      try {
        disarm guard{*this};
        co_await op();
      } catch (...) {
        if (!armed_->fired) {
          throw;
        }
      }
      if (armed_->fired) {
        throw timed_out(first);
      }
    } else {
      std::optional<T> value;
      try {
        disarm guard{*this};
        value.emplace(co_await op());
      } catch (...) {
        if (!armed_->fired) {
          throw;
        }
      }
      if (armed_->fired) {
        throw timed_out(first);
      }
      co_return std::move(*value);
    }
  }

  /// Records that the first delta has come: later reads are under the idle timeout.
  void first_token_seen() noexcept { seen_first_ = true; }

  /// True once `first_token_seen()` was called.
  bool seen_first_token() const noexcept { return seen_first_; }

  /// The timeouts this watch applies.
  const stream_timeouts& timeouts() const noexcept { return timeouts_; }

 private:
  static std::string seconds_text(std::chrono::nanoseconds d) {
    return detail::format_seconds(std::chrono::duration<double>(d).count());
  }

  // What applies to the next read: the first-token deadline, or now + the idle timeout.
  std::optional<typename Clock::time_point> limit_at() const {
    if (!seen_first_) {
      return first_deadline_;
    }
    if (timeouts_.idle > std::chrono::nanoseconds::zero()) {
      return saturating_add(Clock::now(), timeouts_.idle);
    }
    return std::nullopt;
  }

  failure timed_out(bool first) const {
    return failure(make_error_code(error::deadline_exceeded),
                   first ? "no first token within " + seconds_text(timeouts_.first_token)
                         : "stream idle for " + seconds_text(timeouts_.idle));
  }

  // Shared with the timer's pending handler, which may outlive a read or the watch.
  struct arming {
    bool active = false;
    bool fired = false;
    void* abort = nullptr;
    void (*call)(void*) = nullptr;
  };

  stream_timeouts timeouts_;
  std::optional<typename Clock::time_point> first_deadline_;
  bool seen_first_ = false;
  std::optional<basic_timer<Clock>> timer_;
  std::shared_ptr<arming> armed_;
};

/// The stream watch on `std::chrono::steady_clock`.
using stream_watch = basic_stream_watch<>;

}  // namespace keel
