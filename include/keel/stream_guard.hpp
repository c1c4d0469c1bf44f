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
//    retried before the commit point) and a message saying which one fired.
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
#include <boost/system/system_error.hpp>

#include <chrono>
#include <cstddef>
#include <exception>
#include <optional>
#include <string>
#include <string_view>

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
    std::optional<typename Clock::time_point> at;
    if (!seen_first_) {
      at = first_deadline_;
    } else if (timeouts_.idle > std::chrono::nanoseconds::zero()) {
      at = saturating_add(Clock::now(), timeouts_.idle);
    }
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
    throw failure(make_error_code(error::deadline_exceeded),
                  first ? "no first token within " + seconds_text(timeouts_.first_token)
                        : "stream idle for " + seconds_text(timeouts_.idle));
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

  stream_timeouts timeouts_;
  std::optional<typename Clock::time_point> first_deadline_;
  bool seen_first_ = false;
};

/// The stream watch on `std::chrono::steady_clock`.
using stream_watch = basic_stream_watch<>;

}  // namespace keel
