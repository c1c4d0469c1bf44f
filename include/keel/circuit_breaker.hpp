// Circuit breaker: stop calling a failing provider for a while, then probe it before trusting it.
#pragma once

// Overview
// --------
// A `keel::basic_circuit_breaker` watches the outcomes of calls to one dependency (an LLM
// provider, a model, a region). While it is *closed* every call runs. When failures pile up it
// *opens*: calls are rejected at once, without running, for `break_duration`. Then it is
// *half-open*: up to `half_open_probes` calls run as probes; if all of them succeed it closes, if
// any fails it opens again (for a longer break when `break_growth` > 1). `isolate()` forces it
// open until `reset()`.
//
// | state       | a call ...                           | leaves for ...                         |
// | ----------- | ------------------------------------ | -------------------------------------- |
// | `closed`    | runs; its outcome is counted         | `open` when the trip rule fires        |
// | `open`      | is rejected (`error::circuit_open`)  | `half_open` once the break elapsed     |
// | `half_open` | runs as a probe while a slot is free | `closed` (N successes), `open` (1 fail)|
// | `isolated`  | is rejected (`error::circuit_open`)  | `closed` on `reset()`                  |
//
// Trip rules (`breaker_policy`): `consecutive(n, break)` opens after n failures in a row (a success
// resets the run); `failure_ratio(r, min, window, break)` opens when, over the last `window`, at
// least `min` calls completed and failures/calls >= r.
//
// What counts: a failure whose condition is in `counts_as_failure` (default: transient and
// timeout) is a failure; a success slower than `slow_call_threshold` is a failure too. Other
// failures mean the provider answered, so they are recorded as successes: permanent ones such as
// a 400 or a 401, and throttling (a 429, a local limiter's rejection). Throttling is left out by
// default because it says the caller is going too fast, not that the provider is down: pacing
// (a throttler, Retry-After) is the answer to it, and a breaker that opened on a burst of 429s
// would stop every call, paced or not, for a whole break. Put `condition::throttled` back into
// `counts_as_failure` to count it. Cancellation is never counted either way: it only frees the
// call's slot.
//
// There is no timer: open -> half_open is taken lazily, against `Clock::now()`, when the next call
// arrives (`state()` already reports it).
//
// `with_breaker(breaker, op)` runs one operation under the breaker and throws `keel::failure` with
// `error::circuit_open` when rejected. Its `retry_after()` holds the remaining open time, so an
// outer `with_retry` waits exactly until the probe. `with_breaker(breaker, op, degraded)` returns
// `degraded()` instead of throwing. `try_acquire()` is the same admission without coroutines.
//
// Admitted, then held back: a call is admitted when it starts, but it may not send at once; it
// may wait in a rate limiter's queue for a second or more. If the breaker opens meanwhile, the
// call must not go out into the outage the breaker just found: with a bucket paced at 50 r/s and
// 64 calls queued, every queued call would, spending the retry budget on requests that cannot
// succeed. So the operation may take the permit (`op(permit&)` instead of `op()`) and call
// `permit.ensure_admitted()` just before it sends: if the breaker has changed state since it
// admitted the call and is not closed again, the call ends with `circuit_open` (recorded as
// cancelled, never sent), exactly as if it had arrived after the opening.
//
// Example:
//
//     keel::circuit_breaker breaker{ex, keel::breaker_policy::consecutive(5, 60s)};
//     auto op = [&] { return call_model(prompt); };  // your factory of awaitable<std::string>
//     std::string reply = co_await keel::with_breaker(breaker, op);
//     // or answer something useful while the provider is down:
//     auto busy = [] { return std::string("The assistant is busy; please try again shortly."); };
//     std::string r = co_await keel::with_breaker(breaker, op, busy);
//
// Thread safety: every member of `basic_circuit_breaker` may be called concurrently from any
// thread (one mutex guards its state, and `on_state_change` is called after it is released); a
// `permit` belongs to one call at a time.

#include <keel/classify.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/detail/breaker_state.hpp>
#include <keel/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <utility>

namespace keel {

/// The state of a circuit breaker.
enum class breaker_state {
  /// Calls run and their outcomes are counted.
  closed,
  /// Calls are rejected until the break has elapsed.
  open,
  /// Up to `half_open_probes` calls run as probes; the rest are rejected.
  half_open,
  /// Forced open by `isolate()`: every call is rejected until `reset()`.
  isolated,
};

/// The name of a breaker state ("closed", "open", "half_open", "isolated").
constexpr const char* to_string(breaker_state s) noexcept {
  switch (s) {
    case breaker_state::closed:
      return "closed";
    case breaker_state::open:
      return "open";
    case breaker_state::half_open:
      return "half_open";
    case breaker_state::isolated:
      return "isolated";
  }
  return "unknown";
}

/// When a circuit breaker opens, for how long, and what counts as a failure.
///
/// Build one with `consecutive()` or `failure_ratio()` and adjust the public fields.
struct breaker_policy {
  /// Durations in a policy; any `std::chrono::duration` converts to it.
  using duration = std::chrono::nanoseconds;

  /// Which rule opens a closed breaker.
  enum class trip_rule {
    /// `failure_threshold` failures in a row.
    consecutive,
    /// A failure ratio over a sliding time window.
    failure_ratio,
  };

  /// The default policy: `consecutive(5, 60 s)`, counting transient and timeout failures.
  breaker_policy() = default;

  /// Opens after `failures` consecutive failures, for `break_duration`, then admits a probe.
  /// @param failures how many failures in a row open the breaker (at least 1).
  /// @param break_duration how long it stays open before the first probe.
  static breaker_policy consecutive(std::size_t failures = 5,
                                    duration break_duration = std::chrono::seconds(60)) {
    breaker_policy p;
    p.rule = trip_rule::consecutive;
    p.failure_threshold = failures;
    p.break_duration = break_duration;
    return p;
  }

  /// Opens when failures/calls >= `ratio` over the last `sampling_window`, evaluated only once
  /// at least `minimum_throughput` calls completed in that window.
  /// @param ratio the failure ratio that opens the breaker, in (0, 1].
  /// @param minimum_throughput the calls the window must hold before the ratio is trusted.
  /// @param sampling_window how far back outcomes are remembered (to `window_buckets` precision).
  /// @param break_duration how long it stays open before the first probe.
  static breaker_policy failure_ratio(double ratio, std::size_t minimum_throughput,
                                      duration sampling_window, duration break_duration) {
    breaker_policy p;
    p.rule = trip_rule::failure_ratio;
    p.ratio_threshold = ratio;
    p.minimum_throughput = minimum_throughput;
    p.sampling_window = sampling_window;
    p.break_duration = break_duration;
    return p;
  }

  /// The rule that opens a closed breaker.
  trip_rule rule = trip_rule::consecutive;
  /// `consecutive`: failures in a row that open the breaker.
  std::size_t failure_threshold = 5;
  /// `failure_ratio`: the failure ratio (failures / calls) that opens the breaker.
  double ratio_threshold = 0.5;
  /// `failure_ratio`: calls the window must hold before the ratio is evaluated.
  std::size_t minimum_throughput = 100;
  /// `failure_ratio`: how long outcomes are remembered.
  duration sampling_window = std::chrono::seconds(30);
  /// `failure_ratio`: sub-buckets of the window; outcomes expire one bucket
  /// (`sampling_window / window_buckets`) at a time.
  std::size_t window_buckets = 10;

  /// How long the breaker stays open the first time.
  duration break_duration = std::chrono::seconds(60);
  /// Each re-opening without closing in between multiplies the break by this (>= 1).
  double break_growth = 1.0;
  /// The longest a grown break may be; it never shortens `break_duration` itself.
  duration max_break_duration = std::chrono::minutes(10);

  /// Probes admitted concurrently in half-open; all must succeed to close, one failure reopens.
  std::size_t half_open_probes = 1;
  /// A successful call slower than this counts as a failure (the caller still gets its value).
  std::optional<duration> slow_call_threshold;

  /// The conditions that count as failures: transient and timeout by default. Throttling is
  /// not in it (a 429 asks the caller to slow down, which is pacing's business; the provider is
  /// up), nor are permanent errors (the provider answered); add `condition::throttled` to
  /// count 429s too. Cancellation never counts, whatever this holds.
  condition_set counts_as_failure{condition::transient, condition::timeout};
  /// Classifies failures; empty means `keel::classify`. Must not throw (a throw is `permanent`).
  classifier classify;
  /// Called after each state change, outside the breaker's lock, on the thread whose call caused
  /// it (so calls from different threads may overlap). Must not throw (std::terminate).
  std::function<void(breaker_state from, breaker_state to)> on_state_change;
};

/// Running totals of what a breaker saw since it was constructed (`reset()` keeps them).
struct breaker_counters {
  /// Calls admitted (probes included).
  std::uint64_t admitted = 0;
  /// Calls recorded as successes, including failures outside `counts_as_failure`.
  std::uint64_t succeeded = 0;
  /// Calls recorded as failures, including slow calls.
  std::uint64_t failed = 0;
  /// Successes slower than `slow_call_threshold` (also in `failed`).
  std::uint64_t slow = 0;
  /// Failures outside `counts_as_failure` (also in `succeeded`).
  std::uint64_t not_counted = 0;
  /// Calls cancelled or abandoned: neither success nor failure.
  std::uint64_t cancelled = 0;
  /// Calls rejected without running.
  std::uint64_t rejected = 0;
  /// Times the breaker opened (isolation not included).
  std::uint64_t opened = 0;
};

/// A circuit breaker on `Clock`: rejects calls to a failing dependency, then probes it.
///
/// Thread safety: every member may be called concurrently from any thread; one mutex guards the
/// state and `on_state_change` is called after it is released. The breaker needs no timer: it is
/// associated with an executor (`get_executor()`) but never posts to it.
template <class Clock = std::chrono::steady_clock>
class basic_circuit_breaker {
 public:
  /// The clock the breaker reads.
  using clock_type = Clock;
  /// An instant on `Clock`.
  using time_point = typename Clock::time_point;
  /// The executor the breaker is associated with.
  using executor_type = boost::asio::any_io_executor;

  /// The right to run one call: obtained from `try_acquire()`, spent by recording one outcome.
  ///
  /// Move-only. Destroying a permit without an outcome records it as cancelled, so a half-open
  /// probe slot is never leaked. Only the first outcome recorded counts; later ones are ignored.
  /// An outcome that arrives after the breaker changed state (e.g. a closed-state call ending
  /// after the breaker opened) updates the counters but not the state. The breaker must outlive
  /// its permits. Thread safety: a permit belongs to one call; do not share it between threads.
  class permit {
   public:
    /// Takes over `other`'s pending call; `other` holds nothing afterwards.
    permit(permit&& other) noexcept
        : breaker_(std::exchange(other.breaker_, nullptr)),
          epoch_(other.epoch_),
          start_(other.start_),
          probe_(other.probe_) {}

    /// Records this permit's pending call as cancelled, then takes over `other`'s.
    permit& operator=(permit&& other) noexcept {
      if (this != &other) {
        record_cancelled();
        breaker_ = std::exchange(other.breaker_, nullptr);
        epoch_ = other.epoch_;
        start_ = other.start_;
        probe_ = other.probe_;
      }
      return *this;
    }

    /// Not copyable: one permit, one outcome.
    permit(const permit&) = delete;
    /// Not copyable.
    permit& operator=(const permit&) = delete;

    /// Records the call as cancelled if no outcome was recorded.
    ~permit() { record_cancelled(); }

    /// True until an outcome is recorded (or the permit is moved from).
    bool pending() const noexcept { return breaker_ != nullptr; }

    /// True if the call was admitted as a half-open probe.
    bool is_probe() const noexcept { return probe_; }

    /// When the call was admitted (`Clock::now()` at `try_acquire()`).
    time_point start_time() const noexcept { return start_; }

    /// Records a success that took `Clock::now() - start_time()`.
    /// May call `on_state_change` (half-open -> closed) on this thread.
    void record_success() {
      record_success(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start_));
    }

    /// Records a success that took `elapsed`; slower than `slow_call_threshold` is a failure.
    /// May call `on_state_change` on this thread.
    void record_success(std::chrono::nanoseconds elapsed);

    /// Records a failure that took `Clock::now() - start_time()`: a failure if its condition is
    /// in `counts_as_failure`, cancelled if it is `cancelled`, otherwise a success.
    /// May call `on_state_change` on this thread.
    void record_failure(const classification& c);

    /// Classifies `ep` with the policy's classifier, then records it as `record_failure(c)`.
    void record_failure(const std::exception_ptr& ep);

    /// Records the call as neither success nor failure, freeing its probe slot if it had one.
    void record_cancelled() noexcept;

    /// True if the call may still go out now: no outcome is recorded yet and the breaker is in
    /// the phase that admitted the call (closed, or half-open with this call as a probe), or is
    /// closed again. False once it has opened, been isolated, or moved to a new half-open phase
    /// since. Takes no transition and calls no hook.
    bool still_admitted() const;

    /// Returns if `still_admitted()`; otherwise records the call as cancelled (it never ran; a
    /// probe slot is freed) and throws `keel::failure` with `error::circuit_open`, whose
    /// `retry_after()` is the remaining open time while the breaker is open. Call it just
    /// before sending, after any wait (see "Admitted, then held back" in the overview).
    void ensure_admitted();

   private:
    friend class basic_circuit_breaker;
    permit(basic_circuit_breaker* b, std::uint64_t epoch, time_point start, bool probe) noexcept
        : breaker_(b), epoch_(epoch), start_(start), probe_(probe) {}

    basic_circuit_breaker* breaker_ = nullptr;
    std::uint64_t epoch_ = 0;
    time_point start_{};
    bool probe_ = false;
  };

  /// Constructs a closed breaker.
  /// @param ex the executor the breaker is associated with (returned by `get_executor()`).
  /// @param policy when to open, for how long, and what counts as a failure.
  /// @throws std::invalid_argument if the policy is inconsistent (zero thresholds, a ratio
  /// outside (0, 1], an empty window, zero probes, negative durations, `break_growth` < 1).
  basic_circuit_breaker(executor_type ex, breaker_policy policy);

  /// Not copyable or movable: permits and running calls point at it.
  basic_circuit_breaker(const basic_circuit_breaker&) = delete;
  /// Not copyable or movable.
  basic_circuit_breaker& operator=(const basic_circuit_breaker&) = delete;

  /// The executor the breaker is associated with.
  executor_type get_executor() const noexcept { return executor_; }

  /// The policy the breaker was built with.
  const breaker_policy& policy() const noexcept { return policy_; }

  /// The current state; reports `half_open` as soon as the break has elapsed, although the
  /// transition (and its `on_state_change` call) is taken when the next call arrives.
  breaker_state state() const;

  /// When the current break ends, while the breaker is open; `nullopt` in any other state
  /// (isolation has no end).
  std::optional<time_point> open_until() const;

  /// The time left until the first probe while open; zero in any other state.
  std::chrono::nanoseconds remaining_open_time() const;

  /// Asks to run one call now: a permit if it is admitted, `nullopt` if it is rejected (open,
  /// isolated, or half-open with every probe slot taken; counted in `rejected_count()`).
  /// May take the lazy open -> half_open transition and call `on_state_change` on this thread.
  std::optional<permit> try_acquire();

  /// Opens the breaker until `until`, or moves the end of its current break there (earlier or
  /// later): calls are rejected until then, then it is half-open as usual. For a break decided
  /// elsewhere, e.g. by a fleet's shared breaker (keel::redis::shared_breaker). A closed or
  /// half-open breaker opens (calling `on_state_change`) only if `until` is in the future; such
  /// an opening is not counted in `opened_count()` and does not grow this breaker's own later
  /// breaks. An open breaker whose break is over is extended without passing through half-open.
  /// Isolation is kept. Outcomes of calls already running no longer change the state when it
  /// opens.
  void force_open_until(time_point until);

  /// Forces the breaker open until `reset()`: every call is rejected. Outcomes of calls already
  /// running no longer change the state.
  void isolate();

  /// Closes the breaker by hand: clears the failure counts and the break growth. Outcomes of
  /// calls already running no longer change the state.
  void reset();

  /// Running totals of admissions, outcomes, rejections and openings.
  breaker_counters counters() const;

  /// How many times the breaker opened.
  std::uint64_t opened_count() const { return counters().opened; }

  /// How many calls were rejected without running.
  std::uint64_t rejected_count() const { return counters().rejected; }

 private:
  friend struct detail::breaker_access;
  enum class outcome { success, failure, cancelled };

  std::optional<permit> acquire(std::optional<std::chrono::nanoseconds>& retry_after,
                                breaker_state& seen);
  void record(permit& p, outcome o, bool slow, bool not_counted) noexcept;
  void maybe_half_open(time_point now, detail::transition_log& log);
  void transition(breaker_state to, time_point now, detail::transition_log& log);
  void clear_counts() noexcept;
  bool should_trip(time_point now);
  std::chrono::nanoseconds next_break() const noexcept;
  breaker_state observed_state(time_point now) const noexcept;

  const executor_type executor_;
  const breaker_policy policy_;

  mutable std::mutex mutex_;
  breaker_state state_ = breaker_state::closed;
  // Bumped on every transition and reset: an outcome only moves the state if its permit was
  // issued in the current epoch, so late answers from an earlier phase cannot, say, close a
  // breaker that has since reopened.
  std::uint64_t epoch_ = 0;
  time_point open_until_{};
  std::size_t consecutive_failures_ = 0;
  detail::breaker_window window_;
  std::size_t probes_in_flight_ = 0;
  std::size_t probe_successes_ = 0;
  std::size_t opens_in_a_row_ = 0;
  breaker_counters counters_;
};

/// A circuit breaker on `std::chrono::steady_clock`.
using circuit_breaker = basic_circuit_breaker<>;

namespace detail {

/// What a breaker's operation factory returns: `op(permit&)` if it takes the permit, else `op()`.
template <class MakeOp, class Permit>
struct breaker_op {
  static constexpr bool takes_permit = std::is_invocable_v<MakeOp&, Permit&>;
  using awaitable_type =
      typename std::conditional_t<takes_permit, std::invoke_result<MakeOp&, Permit&>,
                                  std::invoke_result<MakeOp&>>::type;
  using value_type = typename awaitable_traits<awaitable_type>::value_type;
  static constexpr bool valid =
      awaitable_traits<awaitable_type>::is_awaitable &&
      std::is_same_v<typename awaitable_traits<awaitable_type>::executor_type,
                     boost::asio::any_io_executor>;
};

template <class MakeOp, class Clock>
using breaker_op_value_t =
    typename breaker_op<MakeOp, typename basic_circuit_breaker<Clock>::permit>::value_type;

}  // namespace detail

/// Runs `op()` once if `breaker` admits it, and records its outcome.
///
/// @param breaker the breaker; it must outlive the returned awaitable.
/// @param op a factory returning a fresh `boost::asio::awaitable<T>`; taken by value and kept in
/// the coroutine frame; called at most once. It may instead take the call's permit
/// (`op(basic_circuit_breaker<Clock>::permit&)`), to call `ensure_admitted()` on it after a wait
/// and just before it sends; it must not record an outcome on it (with_breaker does).
/// @returns the operation's value. A success slower than `slow_call_threshold` is still returned
/// (and counted as a failure).
/// @throws `keel::failure` with `error::circuit_open` if rejected, without calling `op`; its
/// `retry_after()` is the remaining open time while open, `nullopt` when isolated or when every
/// half-open probe slot is taken. Any exception from the operation is rethrown unchanged, after
/// being classified and recorded.
///
/// Cancellation: the operation is what gets cancelled (it runs in this coroutine and sees its
/// cancellation slot). A failure classified `cancelled` is recorded as neither success nor
/// failure, frees the probe slot and propagates. If the coroutine is destroyed before the
/// operation completes, the call is recorded as cancelled too.
template <class Clock, class MakeOp>
boost::asio::awaitable<detail::breaker_op_value_t<MakeOp, Clock>> with_breaker(
    basic_circuit_breaker<Clock>& breaker, MakeOp op);

/// Runs `op()` once if `breaker` admits it; if rejected, returns `degraded()` instead of throwing.
///
/// @param degraded a callable returning something convertible to `T` (or void when `T` is
/// void), invoked without arguments or with the `const keel::failure&` that would have been
/// thrown; taken by value, called only when the call is rejected.
/// Everything else (recording, rethrowing, cancellation) is as for `with_breaker(breaker, op)`.
template <class Clock, class MakeOp, class Degraded>
boost::asio::awaitable<detail::breaker_op_value_t<MakeOp, Clock>> with_breaker(
    basic_circuit_breaker<Clock>& breaker, MakeOp op, Degraded degraded);

}  // namespace keel

#include <keel/impl/circuit_breaker.hpp>
