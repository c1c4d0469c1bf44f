// with_hedge: send a second copy of a slow call and keep whichever answers first.
#pragma once

// Overview
// --------
// `co_await keel::with_hedge(factory, policy)` starts attempt 0 (the primary) at once. If no
// attempt has *committed* `delay` later, it starts attempt 1 (a hedge), `delay` after that
// attempt 2, and so on, up to `policy.max_attempts` attempts in total (default 2). The first
// attempt to commit wins:
//
// - every other attempt in flight is cancelled with **terminal** cancellation through its own
//   cancellation slot (as `with_deadline` cancels an operation, so keel's HTTP reader closes the
//   connection rather than returning it to the pool);
// - no further hedge starts;
// - `with_hedge` waits for the losers to unwind, then returns the winner's value (or rethrows
//   the winner's error, if it failed after committing). Nothing of any attempt runs after
//   `with_hedge` has returned.
//
// Commit. An ordinary attempt commits when it completes successfully. A streamed attempt must
// commit earlier, when it has its first token and before it hands it to the user, so that only
// one attempt ever delivers tokens: the factory may take a `keel::hedge_attempt&` and call
// `commit()`, which returns true if this attempt won (the others are cancelled right then, not at
// the end) and false if another already won (the attempt should stop: throw
// `operation_aborted`). Factories taking `(keel::hedge_attempt&)`, `(std::size_t index)` and
// `()` are all accepted; index 0 is the primary.
//
// Failures. An attempt that fails before any attempt committed does not start another (retrying
// is `with_retry`'s job: put `with_hedge` inside it) and, from then on, no new hedge starts: a
// failure says something about the provider or the request, and hedging into it doubles the load
// for nothing. Attempts still in flight run on, since one of them may still succeed. When none is
// in flight and none committed, the call throws the primary's failure if the primary failed,
// otherwise the first failure in time. The errors are the attempts' own, unchanged, so the usual
// classification applies: transient, throttled and timeout failures are worth retrying.
//
// Delay. A fixed `policy.delay`, or a percentile (`policy.percentile`, 95 by default) of recent
// latencies in a shared `keel::basic_latency_window` (`policy.latency`); with fewer than
// `policy.min_samples` samples in it, the fixed delay. `with_hedge` records into that window one
// latency per call that commits: when the primary wins, the primary's time to commit; when a
// hedge wins, the time the first hedge started (the delay), since all that is known of the
// primary, which never finished, is that it had not answered by then. The commit time would be
// a closer lower bound, but it adds the hedge's own latency to the sample: when the tail is
// about 1 - percentile of the calls, those samples sit at the percentile and every window
// refresh raised the delay by one hedge latency until it reached the tail itself and hedging
// stopped (bench_hedge, 5% of calls 10x slow, p95: the delay climbed from ~40 ms to 200 ms in 3
// of 9 runs). Recording the delay cannot raise it; the budget keeps it from sinking, because
// calls it refuses record their whole latency. Callers may record other latencies themselves.
//
// Load. Hedging trades extra requests for a shorter tail, so the extra load is capped the way
// Finagle caps retries: a shared `keel::hedge_budget` (`policy.budget`) receives `ratio` (0.05)
// tokens per call and pays one token per hedge; its capacity is bounded, so at most about
// `capacity + ratio * calls` hedges are ever sent (5% extra load in steady state). Optionally the
// hedge is also charged to a `keel::retry_budget` (`policy.retry_budget`): it must allow a retry
// (`try_retry()`) and the hedge takes one of its tokens, as a retried failure does, so that
// hedges and retries share one cap on extra load. A hedge refused by either budget is not sent,
// and the call sends no further hedge.
//
// Design: every attempt is its own coroutine thread (`co_spawn` on the caller's executor, with
// its own cancellation signal), as in `with_deadline`, so that one can be cancelled without the
// others or the caller. The calling coroutine sleeps on a single timer of `Clock`, armed at the
// next hedge instant; attempt completions and commits wake it early by cancelling that timer.
// Not built on a parallel group: the attempts start at different times, the set of attempts is
// decided while the call runs (budgets, failures), and losers must be cancelled at commit time.
//
// Example:
//
//     keel::hedge_budget budget;             // shared by every call to one model
//     keel::latency_window latencies;        // idem
//     keel::hedge_policy policy;
//     policy.delay = 800ms;                  // until the window has min_samples latencies
//     policy.latency = &latencies;
//     policy.budget = &budget;
//     auto attempt = [&] { return call_model(prompt); };
//     std::string reply = co_await keel::with_hedge(attempt, policy);
//
//     // Streamed: commit before the first delta reaches the user.
//     auto stream = [&](keel::hedge_attempt& h) -> boost::asio::awaitable<void> {
//       auto reader = co_await open_stream(prompt);
//       auto delta = co_await reader.next();
//       if (!h.commit()) {
//         throw boost::system::system_error(boost::asio::error::operation_aborted);
//       }
//       for (; delta; delta = co_await reader.next()) { show(*delta); }
//     };
//     co_await keel::with_hedge(stream, policy);
//
// Cancellation: cancelling the caller cancels every attempt (terminal), waits for all of them to
// unwind, and throws `operation_aborted`, unless an attempt had already completed successfully
// as the winner: then its value is returned once the losers have unwound (the cancellation
// reaches losers still unwinding too, cutting a slow cleanup short).
// Thread safety: each call is independent; `hedge_budget` and `basic_latency_window` may be
// shared by calls on any thread. A call runs its attempts and its timer on the caller's
// executor; as with `with_deadline`, on an io_context run by several threads make the call from
// a strand, since commits and completions cancel the other attempts through Asio cancellation
// slots, which are not thread-safe.

#include <keel/clock.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/retry_budget.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace keel {

namespace detail {
class hedge_arbiter;
}  // namespace detail

/// One attempt's handle on its hedged call: which attempt it is, and the commit point.
///
/// Owned by `with_hedge`; valid until the attempt's awaitable completes. Use it only from the
/// attempt's own coroutine.
class hedge_attempt {
 public:
  /// A stand-alone handle, not part of any `with_hedge` call: index 0, and `commit()` always
  /// returns true. Lets an attempt function written for hedging run unhedged.
  hedge_attempt() = default;
  hedge_attempt(const hedge_attempt&) = delete;
  hedge_attempt& operator=(const hedge_attempt&) = delete;

  /// This attempt's index: 0 for the primary, 1 for the first hedge, and so on.
  std::size_t index() const noexcept { return index_; }

  /// Claims the call for this attempt; call it before handing anything to the user.
  /// @returns true if this attempt is (now, or already) the winner: every other attempt in
  ///   flight has been cancelled (terminal) and no further hedge starts; false if another
  ///   attempt won first or the caller was cancelled: this attempt should stop, e.g. by throwing
  ///   `operation_aborted`, and whatever it returns is discarded.
  bool commit() noexcept;

 private:
  friend class detail::hedge_arbiter;

  detail::hedge_arbiter* arbiter_ = nullptr;
  std::size_t index_ = 0;
};

/// What `on_hedge` is told when a hedge starts.
struct hedge_event {
  /// The attempt being started (1 is the first hedge).
  std::size_t attempt = 0;
  /// The hedge delay this call uses (fixed, or from the latency window).
  std::chrono::nanoseconds delay{0};
  /// Time since the call started.
  std::chrono::nanoseconds elapsed{0};
};

/// A Finagle-style cap on hedges, shared by many calls: each call deposits `ratio` tokens, each
/// hedge withdraws one.
///
/// Starts full; holds at most `capacity` tokens, so over any stretch of `n` calls at most about
/// `capacity + ratio * n` hedges are sent. Tokens are counted in thousandths (three decimals of
/// `ratio` are kept). Unlike Finagle's budget, deposits do not expire after a time: the bounded
/// capacity is what keeps a quiet spell from saving up a burst. Thread safety: every member may
/// be called concurrently from any thread (lock-free atomics).
class hedge_budget {
 public:
  /// Creates a full budget.
  /// @param ratio tokens deposited per call: the steady-state fraction of calls that may hedge.
  /// @param capacity the most tokens held (and the initial balance); at least 1 to allow hedges.
  explicit hedge_budget(double ratio = 0.05, double capacity = 10) noexcept
      : ratio_milli_(to_milli(ratio)), max_milli_(to_milli(capacity)), milli_(max_milli_) {}

  hedge_budget(const hedge_budget&) = delete;
  hedge_budget& operator=(const hedge_budget&) = delete;

  /// Records one call: deposits `ratio` tokens, up to `capacity`. `with_hedge` calls it once
  /// per call.
  void deposit() noexcept {
    std::int64_t cur = milli_.load(std::memory_order_relaxed);
    for (;;) {
      const std::int64_t next = std::min(cur + ratio_milli_, max_milli_);
      if (next == cur || milli_.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
        return;
      }
    }
  }

  /// Takes one token for a hedge if there is one, and counts a refusal if not.
  /// @returns true if the hedge may be sent.
  bool try_withdraw() noexcept {
    std::int64_t cur = milli_.load(std::memory_order_relaxed);
    for (;;) {
      if (cur < 1000) {
        denied_.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
      if (milli_.compare_exchange_weak(cur, cur - 1000, std::memory_order_relaxed)) {
        granted_.fetch_add(1, std::memory_order_relaxed);
        return true;
      }
    }
  }

  /// The tokens held now.
  double tokens() const noexcept { return static_cast<double>(milli_.load()) / 1000.0; }
  /// The most tokens held.
  double capacity() const noexcept { return static_cast<double>(max_milli_) / 1000.0; }
  /// Tokens deposited per call.
  double ratio() const noexcept { return static_cast<double>(ratio_milli_) / 1000.0; }
  /// Hedges this budget has allowed.
  std::uint64_t granted() const noexcept { return granted_.load(); }
  /// Hedges this budget has refused.
  std::uint64_t denied() const noexcept { return denied_.load(); }

 private:
  static std::int64_t to_milli(double v) noexcept {
    return v > 0 ? static_cast<std::int64_t>(std::llround(v * 1000)) : 0;
  }

  const std::int64_t ratio_milli_;
  const std::int64_t max_milli_;
  std::atomic<std::int64_t> milli_;
  std::atomic<std::uint64_t> granted_{0};
  std::atomic<std::uint64_t> denied_{0};
};

/// The last `capacity` latencies of a call, shared by many calls, answering percentiles.
///
/// Design: a ring of the most recent samples plus a sorted snapshot of it, re-sorted when a
/// percentile is asked for and at least `refresh_every` samples have arrived since the last sort
/// (or the snapshot is empty). `record` is O(1); `percentile` is an O(1) look-up, plus, once per
/// `refresh_every` records, a sort of `capacity` values (35 µs for 1024, measured with -O2 on a
/// loaded 2-core VM; record + percentile came to 0.68 µs a call with the defaults): at 10,000
/// calls/s about 7 ms of CPU per second. Chosen over a log-bucket histogram because the ring
/// forgets old samples by itself (a histogram needs decay or rotating generations to stay
/// "recent"), and its percentiles are exact sample values rather than bucket bounds. The price is
/// that a percentile may lag by up to `refresh_every` samples. Thread safety: every member may be
/// called concurrently from any thread (one mutex; a sort holds it).
template <class Clock = default_clock>
class basic_latency_window {
 public:
  /// The samples' type.
  using duration = typename Clock::duration;

  /// Creates an empty window.
  /// @param capacity how many recent samples are kept (at least 1).
  /// @param refresh_every how many new samples make the sorted snapshot stale (at least 1; 1
  ///   makes every percentile exact at the cost of a sort per query after a record).
  explicit basic_latency_window(std::size_t capacity = 1024, std::size_t refresh_every = 64)
      : capacity_(std::max<std::size_t>(capacity, 1)),
        refresh_every_(std::max<std::size_t>(refresh_every, 1)) {
    ring_.reserve(capacity_);
    sorted_.reserve(capacity_);
  }

  basic_latency_window(const basic_latency_window&) = delete;
  basic_latency_window& operator=(const basic_latency_window&) = delete;

  /// Records one latency (negative values count as zero), replacing the oldest sample when full.
  void record(duration d) {
    d = std::max(d, duration::zero());
    std::lock_guard lock(mutex_);
    if (ring_.size() < capacity_) {
      ring_.push_back(d);
    } else {
      ring_[next_] = d;
    }
    next_ = (next_ + 1) % capacity_;
    ++since_sort_;
  }

  /// Records the time from `start` to now on `Clock`.
  void record_since(typename Clock::time_point start) { record(Clock::now() - start); }

  /// The `p`th percentile (nearest rank, 0 to 100) of the samples held.
  /// @param p the percentile; clamped to [0, 100]: 0 is the smallest sample, 100 the largest.
  /// @param min_samples the fewest samples for an answer.
  /// @returns the percentile, or `std::nullopt` with fewer than `max(min_samples, 1)` samples.
  std::optional<duration> percentile(double p, std::size_t min_samples = 1) const {
    std::lock_guard lock(mutex_);
    if (ring_.size() < std::max<std::size_t>(min_samples, 1)) {
      return std::nullopt;
    }
    if (sorted_.empty() || since_sort_ >= refresh_every_) {
      sorted_.assign(ring_.begin(), ring_.end());
      std::sort(sorted_.begin(), sorted_.end());
      since_sort_ = 0;
    }
    const double q = std::clamp(p, 0.0, 100.0) / 100.0;
    const auto n = static_cast<double>(sorted_.size());
    auto rank = static_cast<std::size_t>(std::ceil(q * n));  // nearest rank, 1-based
    rank = std::clamp<std::size_t>(rank, 1, sorted_.size());
    return sorted_[rank - 1];
  }

  /// How many samples are held (at most `capacity()`).
  std::size_t size() const {
    std::lock_guard lock(mutex_);
    return ring_.size();
  }

  /// How many samples the window keeps.
  std::size_t capacity() const noexcept { return capacity_; }

  /// Forgets every sample.
  void clear() {
    std::lock_guard lock(mutex_);
    ring_.clear();
    sorted_.clear();
    next_ = 0;
    since_sort_ = 0;
  }

 private:
  const std::size_t capacity_;
  const std::size_t refresh_every_;
  mutable std::mutex mutex_;
  std::vector<duration> ring_;
  std::size_t next_ = 0;
  mutable std::vector<duration> sorted_;
  mutable std::size_t since_sort_ = 0;
};

/// A latency window on keel's default clock.
using latency_window = basic_latency_window<>;

/// When `with_hedge` hedges, how many attempts, what caps the extra load, and hooks.
///
/// A value type: copy it freely. `latency`, `budget` and `retry_budget` are non-owning and may
/// be null; they must outlive every call that uses the policy.
template <class Clock = default_clock>
struct basic_hedge_policy {
  /// Total attempts, the primary included; at least 1 (1 never hedges).
  std::size_t max_attempts = 2;
  /// The hedge delay when no latency window is given or it holds fewer than `min_samples`
  /// samples: attempt k starts k delays after the call (negative counts as zero).
  std::chrono::nanoseconds delay = std::chrono::seconds(1);
  /// Optional shared latency window: the delay is its `percentile`th percentile, and the call
  /// records its time to commit into it.
  basic_latency_window<Clock>* latency = nullptr;
  /// The percentile of `latency` used as the delay (0 to 100).
  double percentile = 95.0;
  /// The fewest samples in `latency` for its percentile to be used.
  std::size_t min_samples = 20;
  /// Optional shared cap on hedges: each call deposits, each hedge withdraws one token.
  hedge_budget* budget = nullptr;
  /// Optional retry budget a hedge is also charged to: it must allow a retry (`try_retry()`),
  /// and the hedge takes one token (as a retried failure does). `with_hedge` never gives tokens
  /// back: successes refill it where `with_retry` (or your code) records them.
  keel::retry_budget* retry_budget = nullptr;
  /// Called when a hedge starts (log or count hedges here).
  std::function<void(const hedge_event&)> on_hedge;

  /// The default: 2 attempts, hedge after 1 s, no window, no budget.
  basic_hedge_policy() = default;
};

/// A hedge policy on keel's default clock.
using hedge_policy = basic_hedge_policy<>;

namespace detail {

/// What an attempt factory is called with: `(hedge_attempt&)`, else `(std::size_t)`, else `()`.
template <class MakeOp>
decltype(auto) invoke_hedge_factory(MakeOp& op, hedge_attempt& h) {
  if constexpr (std::is_invocable_v<MakeOp&, hedge_attempt&>) {
    return op(h);
  } else if constexpr (std::is_invocable_v<MakeOp&, std::size_t>) {
    return op(h.index());
  } else {
    return op();
  }
}

template <class MakeOp>
using hedge_awaitable_t =
    decltype(invoke_hedge_factory(std::declval<MakeOp&>(), std::declval<hedge_attempt&>()));

/// The value type of a hedged factory's awaitable.
template <class MakeOp>
using hedge_value_t = typename awaitable_traits<hedge_awaitable_t<MakeOp>>::value_type;

/// True for `boost::asio::awaitable<T>` on `any_io_executor`, what every keel factory returns.
template <class A>
inline constexpr bool is_any_io_awaitable_v = false;
template <class T>
inline constexpr bool is_any_io_awaitable_v<boost::asio::awaitable<T>> = true;

/// Callable as `with_hedge` calls a factory.
template <class MakeOp>
concept hedge_invocable = std::is_invocable_v<MakeOp&, hedge_attempt&> ||
    std::is_invocable_v<MakeOp&, std::size_t> || std::is_invocable_v<MakeOp&>;

/// A factory `with_hedge` accepts: callable as above, returning a fresh `awaitable<T>` on
/// `any_io_executor`.
template <class MakeOp>
concept hedge_factory = hedge_invocable<MakeOp> && is_any_io_awaitable_v<hedge_awaitable_t<MakeOp>>;

template <class Clock, class MakeOp>
auto hedge_impl(MakeOp op, basic_hedge_policy<Clock> policy)
    -> boost::asio::awaitable<hedge_value_t<MakeOp>>;

}  // namespace detail

/// Runs `op` and, while no attempt has committed, hedges it with further attempts after the
/// policy's delay; returns the value of the first attempt to commit.
///
/// @param op a factory returning a fresh `awaitable<T>` per attempt, called once per attempt
///   with `(keel::hedge_attempt&)`, `(std::size_t index)` or `()`, whichever it accepts (in
///   that order); taken by value.
/// @param policy attempts, delay, budgets and hooks; `Clock` is deduced from it.
/// @returns the winner's value, after every other attempt has unwound.
/// @throws the winner's error if it failed after committing; when no attempt committed, the
///   primary's failure if it failed, otherwise the first failure; `operation_aborted` when the
///   caller was cancelled (see the header overview).
/// Cancellation: caller cancellation cancels every attempt (terminal) and waits for them; a
/// commit cancels the other attempts (terminal) at once; nothing of any attempt runs after the
/// call completes.
template <class Clock = default_clock, class MakeOp>
requires detail::hedge_factory<MakeOp>
auto with_hedge(MakeOp op, basic_hedge_policy<Clock> policy = {})
    -> boost::asio::awaitable<detail::hedge_value_t<MakeOp>> {
  return detail::hedge_impl<Clock>(std::move(op), std::move(policy));
}

}  // namespace keel

#include <keel/impl/hedge.hpp>
