// with_retry: run an operation again after retryable failures, with backoff, budget and deadline.
#pragma once

// Overview
// --------
// `co_await keel::with_retry(op, policy)` calls the factory `op()` and awaits the fresh awaitable
// it returns; when that attempt fails, it decides whether to retry:
//
// 1. The failure is classified (`policy.classify`, default `keel::classify`). Cancellation is
//    rethrown at once, never retried. A failure whose condition is not in `policy.retry_on`
//    (default: transient, throttled, timeout), or that `policy.retry_if` rejects, is rethrown
//    unchanged.
// 2. A retryable failure whose condition is in `policy.charge_budget_on` (default: transient,
//    timeout) costs one token of the shared `policy.budget` (if any). Throttled failures are not
//    charged: see "Why throttling does not draw on the budget" below.
// 3. After `policy.max_attempts` attempts (total, including the first) the call fails with
//    `keel::error::retries_exhausted`, the last error as its cause. If the failure was charged
//    and the budget is below half, it fails with `keel::error::budget_exhausted` instead of
//    retrying, unless `policy.exempt_from_budget` says the retry cannot add load now (an open
//    breaker that will hold it).
// 4. The delay is the server's hint (Retry-After) if the failure carried one, clamped to
//    `policy.max_retry_after`; otherwise the policy's backoff for that failure.
// 5. The call has an absolute deadline: `policy.timeout` after the first attempt started, and the
//    enclosing `with_deadline`, whichever is earlier. A sleep that would end past it (plus
//    `policy.min_attempt_time`) is not started: the call fails fast with the original error.
//    (`policy.timeout` bounds retrying; it does not cancel a running attempt — `with_deadline`
//    does.)
// 6. `policy.on_retry` is told (attempt, error, classification, delay), then the call sleeps on a
//    timer of `Clock` and tries again.
//
// A result can be retried too: pass a predicate `retry_if_result(const T&)`; when it returns true
// the result is treated as a transient failure, and when no retry is left the last result is
// returned (not an error).
//
// Why throttling does not draw on the budget: the budget (gRFC A6) exists so that retries cannot
// multiply the load on a provider that is failing. A throttled failure (a 429, a local limiter's
// rejection, an open breaker's `circuit_open`) is the opposite case: the provider is up and has
// said how fast to go, usually with a Retry-After that this loop obeys, and a shared throttler
// paused on that hint holds every caller back. Retrying it adds no load beyond what the server
// asked for. Charging it instead lets a rate-limited batch drain the budget in its first second
// and then fail hundreds of calls after one attempt with `budget_exhausted`, calls the server
// would have answered a second later. So by default only transient and timeout failures take
// tokens and can be refused; a throttled failure is retried while `max_attempts` and the
// deadline allow, and its pacing comes from the hint, the backoff and the throttler. Put
// `condition::throttled` into `charge_budget_on` to budget it like the others.
//
// The success path costs one coroutine frame and nothing else: no timer is created, nothing
// else is allocated, and the budget gets its success token. The timer and backoff state are
// allocated on the first retry. The policy is copied into the frame; with many calls in flight
// under one policy, pass it as `std::shared_ptr<const retry_policy>` to share it instead (saves
// ~0.5 KiB per call).
//
// Example:
//
//     auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
//     policy.on_retry = [](const keel::retry_event& e) { log_warning(e); };
//     std::string reply = co_await keel::with_retry([&] { return call_model(prompt); }, policy);
//
// Cancellation: cancelling the caller during an attempt cancels that attempt and its
// `operation_aborted` propagates; during a backoff sleep it ends the call at once with
// `operation_aborted`. Cancellation is checked after every sleep.
// Thread safety: each call is independent; shared objects the policy points at (budget, random
// source) are thread-safe.

#include <keel/backoff.hpp>
#include <keel/classify.hpp>
#include <keel/clock.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/detail/deadline_executor.hpp>
#include <keel/error.hpp>
#include <keel/random.hpp>
#include <keel/retry_budget.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace keel {

/// What `on_retry` is told before each backoff sleep.
struct retry_event {
  /// The attempt that failed (1 is the first attempt).
  int attempt = 0;
  /// The error it failed with (null when a result was rejected by `retry_if_result`).
  std::exception_ptr error;
  /// How that error was classified.
  keel::classification classification;
  /// How long the call will sleep before the next attempt.
  std::chrono::nanoseconds delay{0};
  /// True if `delay` came from the server's hint rather than the backoff.
  bool from_server_hint = false;
};

/// How `with_retry` retries: attempts, which failures, backoff, budget, deadline, hooks.
///
/// A value type: copy it freely. Hooks are `std::function`s; keep their captures small (a
/// pointer) so that copying a policy does not allocate. `budget` and `random` are non-owning.
struct retry_policy {
  /// Total attempts, including the first; at least 1.
  int max_attempts = 3;
  /// The backoff per failure; keel's hierarchy by default (see backoff.hpp).
  backoff_strategy backoff = backoff_strategy::hierarchy();
  /// The conditions that are retried.
  condition_set retry_on = condition_set::retryable();
  /// Optional extra say: return false to stop retrying a failure `retry_on` accepted.
  std::function<bool(const std::exception_ptr&, const classification&)> retry_if;
  /// Classifies failures; `keel::classify` when empty.
  keel::classifier classify;
  /// Absolute limit for retrying, measured from the start of the first attempt: no backoff
  /// sleep ends past it and no attempt starts after it. It does not cancel an attempt that is
  /// running; wrap the call in `with_deadline` for that (its deadline is honoured here too).
  std::optional<std::chrono::nanoseconds> timeout;
  /// Whether a server's delay hint replaces the backoff.
  bool honour_retry_after = true;
  /// Largest server hint obeyed; longer hints are clamped to it (a negative value counts as 0).
  std::chrono::nanoseconds max_retry_after = std::chrono::seconds(60);
  /// A retry is not started unless at least this much time would remain before the deadline
  /// after its backoff sleep (the call fails fast with the last error instead). The first
  /// attempt always starts: an enclosing `with_deadline` bounds it.
  std::chrono::nanoseconds min_attempt_time{0};
  /// Shared retry budget (non-owning; may be null).
  retry_budget* budget = nullptr;
  /// The conditions whose retryable failures take a token of `budget` and may be refused with
  /// `budget_exhausted`: transient and timeout by default (a rejected result counts as
  /// transient). Other retried failures, throttling by default, neither take a token nor are
  /// refused: they are paced by the server's hint, the backoff and a throttler instead (see the
  /// header overview). Add `condition::throttled` to budget them too.
  condition_set charge_budget_on{condition::transient, condition::timeout};
  /// Optional: return true to send a retry that `budget` refused anyway, because it cannot add
  /// load now. keel's LLM client says so while the entry's circuit breaker is open or half-open:
  /// the breaker holds the retry until its probe has succeeded, so the budget's purpose is
  /// served without failing the call. The failure is still charged, the refusal still counted
  /// in `budget->denied()`, and `max_attempts` and the deadline still bound the call. Called
  /// with a null exception for a rejected result.
  std::function<bool(const std::exception_ptr&, const classification&)> exempt_from_budget;
  /// Jitter source (non-owning); a per-thread random source when null.
  random_source* random = nullptr;
  /// Called before every backoff sleep (log retries at WARNING here).
  std::function<void(const retry_event&)> on_retry;

  /// The default: 3 attempts, keel's backoff hierarchy.
  retry_policy() = default;

  /// `attempts` total attempts, exponential backoff from `base` with full jitter, capped at `cap`.
  static retry_policy exponential_full_jitter(int attempts, std::chrono::nanoseconds base,
                                              std::chrono::nanoseconds cap);
  /// `attempts` total attempts, all failures of one backoff.
  static retry_policy with_backoff(int attempts, keel::backoff b);
  /// `attempts` total attempts with no delay between them (a naive retry; mostly for tests).
  static retry_policy immediate(int attempts);
  /// One attempt: never retries.
  static retry_policy none();
};

inline retry_policy retry_policy::exponential_full_jitter(int attempts,
                                                          std::chrono::nanoseconds base,
                                                          std::chrono::nanoseconds cap) {
  return with_backoff(attempts, keel::backoff::exponential(base, cap, jitter::full));
}

inline retry_policy retry_policy::with_backoff(int attempts, keel::backoff b) {
  retry_policy p;
  p.max_attempts = attempts;
  p.backoff = backoff_strategy(b);
  return p;
}

inline retry_policy retry_policy::immediate(int attempts) {
  return with_backoff(attempts, keel::backoff::immediate());
}

inline retry_policy retry_policy::none() {
  return with_backoff(1, keel::backoff::immediate());
}

namespace detail {

struct never_retry_result {
  template <class T>
  constexpr bool operator()(const T&) const noexcept {
    return false;
  }
};

inline bool cancellation_requested(const boost::asio::cancellation_state& cs) noexcept {
  return cs.cancelled() != boost::asio::cancellation_type::none;
}

[[noreturn]] inline void throw_aborted() {
  throw boost::system::system_error(boost::asio::error::operation_aborted);
}

inline const retry_policy& policy_of(const retry_policy& p) noexcept {
  return p;
}
inline const retry_policy& policy_of(const std::shared_ptr<const retry_policy>& p) noexcept {
  return *p;
}

/// What only a retrying call needs: made on the first retry, so that the success path's frame
/// carries neither a timer nor backoff state.
template <class Clock>
struct retry_state {
  explicit retry_state(const boost::asio::any_io_executor& ex) : timer(ex) {}
  basic_timer<Clock> timer;
  // One state per condition: jitters that remember the previous delay must not mix curves.
  std::array<backoff_state, 8> backoff{};
};

template <class Clock, class MakeOp, class Policy, class RetryIfResult>
auto retry_impl(MakeOp op, Policy held_policy, RetryIfResult retry_if_result)
    -> boost::asio::awaitable<op_value_t<MakeOp>>;

}  // namespace detail

/// Runs `op()` until it succeeds, a failure is not worth retrying, or the policy gives up.
///
/// @param op a callable returning a fresh `awaitable<T>` per attempt; taken by value.
/// @param policy attempts, backoff, budget, deadline and hooks.
/// @param retry_if_result optional predicate on a successful value; true retries it.
/// @returns the first accepted value (or the last value when `retry_if_result` exhausted the
///   attempts).
/// @throws the attempt's own error if it is not retryable or no time is left for another attempt;
///   `keel::failure` `retries_exhausted` / `budget_exhausted` (cause: the last error; only a
///   failure in `policy.charge_budget_on` can be refused by the budget);
///   `operation_aborted` when cancelled.
/// Cancellation: see the header overview; a backoff sleep is cut short at once.
template <class Clock = default_clock, class MakeOp,
          class RetryIfResult = detail::never_retry_result>
requires detail::is_op_factory_v<MakeOp>
auto with_retry(MakeOp op, retry_policy policy, RetryIfResult retry_if_result = {})
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  return detail::retry_impl<Clock>(std::move(op), std::move(policy), std::move(retry_if_result));
}

/// Same as `with_retry(op, policy, retry_if_result)`, with the policy shared instead of copied
/// into each call: a `retry_policy` is about half a kilobyte, so a program with many calls in
/// flight under one policy saves that much per call (and the copy's time).
///
/// @param policy must not be null; it is kept alive until the call completes.
/// @throws std::invalid_argument if `policy` is null (before anything runs).
/// Cancellation: as `with_retry`.
template <class Clock = default_clock, class MakeOp,
          class RetryIfResult = detail::never_retry_result>
requires detail::is_op_factory_v<MakeOp>
auto with_retry(MakeOp op, std::shared_ptr<const retry_policy> policy,
                RetryIfResult retry_if_result = {})
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  if (!policy) {
    throw std::invalid_argument("keel::with_retry: null retry_policy");
  }
  return detail::retry_impl<Clock>(std::move(op), std::move(policy), std::move(retry_if_result));
}

namespace detail {

template <class Clock, class MakeOp, class Policy, class RetryIfResult>
auto retry_impl(MakeOp op, Policy held_policy, RetryIfResult retry_if_result)
    -> boost::asio::awaitable<op_value_t<MakeOp>> {
  const retry_policy& policy = policy_of(held_policy);
  namespace asio = boost::asio;
  using T = op_value_t<MakeOp>;
  using clock_duration = typename Clock::duration;

  std::optional<typename Clock::time_point> deadline;
  if (policy.timeout) {
    deadline = saturating_add(Clock::now(), *policy.timeout);
  }
  bool outer_deadline_checked = false;
  auto cs = co_await asio::this_coro::cancellation_state;
  std::unique_ptr<retry_state<Clock>> slow;  // made on the first retry
  const int max_attempts = std::max(policy.max_attempts, 1);

  for (int attempt = 1;; ++attempt) {
    std::exception_ptr failed;
    classification cls;
    // Holds a value that `retry_if_result` rejected, to return if no retry is left.
    std::optional<std::conditional_t<std::is_void_v<T>, bool, T>> rejected;

    try {
      if constexpr (std::is_void_v<T>) {
        co_await op();
        if (policy.budget) {
          policy.budget->on_success();
        }
        co_return;
      } else {
        T value = co_await op();
        if (!retry_if_result(std::as_const(value))) {
          if (policy.budget) {
            policy.budget->on_success();
          }
          co_return value;
        }
        rejected.emplace(std::move(value));
        cls.condition = condition::transient;
      }
    } catch (...) {
      failed = std::current_exception();
    }
    // Cancellation first, whatever the attempt turned it into (a reset, a deadline): a
    // cancelled call is never retried and never charged to the budget.
    if (cancellation_requested(cs)) {
      throw_aborted();
    }

    auto return_rejected_or_throw = [&](auto&& thrower) -> T {
      if constexpr (!std::is_void_v<T>) {
        if (rejected) {
          return std::move(*rejected);
        }
      }
      thrower();
      std::terminate();  // unreachable: thrower throws
    };

    if (failed) {
      cls = policy.classify ? policy.classify(failed) : keel::classify(failed);
      if (cls.condition == condition::cancelled) {
        std::rethrow_exception(failed);
      }
      const bool retryable = policy.retry_on.contains(cls.condition) &&
                             (!policy.retry_if || policy.retry_if(failed, cls));
      if (!retryable) {
        std::rethrow_exception(failed);
      }
    } else if (!policy.retry_on.contains(cls.condition) ||
               (policy.retry_if && !policy.retry_if(nullptr, cls))) {
      // A rejected result obeys the same rules as a failure of condition `transient`.
      co_return return_rejected_or_throw([] {});
    }
    // Only failures the budget is for are charged (and can be refused); see the overview.
    retry_budget* const charged =
        policy.charge_budget_on.contains(cls.condition) ? policy.budget : nullptr;
    if (charged) {
      charged->on_failure();
    }
    if (attempt >= max_attempts) {
      co_return return_rejected_or_throw(
          [&] { throw_failure(error::retries_exhausted, failed, attempt); });
    }
    if (charged && !charged->try_retry() &&
        !(policy.exempt_from_budget && policy.exempt_from_budget(failed, cls))) {
      co_return return_rejected_or_throw(
          [&] { throw_failure(error::budget_exhausted, failed, attempt); });
    }

    // The effective deadline: the policy's own, or the enclosing with_deadline's if earlier.
    if (!slow) {
      slow = std::make_unique<retry_state<Clock>>(co_await asio::this_coro::executor);
    }
    if (!outer_deadline_checked) {
      outer_deadline_checked = true;
      if (auto outer = deadline_of<Clock>(slow->timer.get_executor());
          outer && (!deadline || *outer < *deadline)) {
        deadline = outer;
      }
    }

    std::chrono::nanoseconds delay{0};
    bool from_hint = false;
    if (policy.honour_retry_after && cls.retry_after) {
      const auto cap = std::max(policy.max_retry_after, std::chrono::nanoseconds::zero());
      delay = std::clamp(*cls.retry_after, std::chrono::nanoseconds::zero(), cap);
      from_hint = true;
    } else {
      random_source& rng = policy.random ? *policy.random : random_source::thread_default();
      auto& bstate = slow->backoff[static_cast<std::size_t>(cls.condition) % slow->backoff.size()];
      delay = policy.backoff.choose(failed, cls).next_delay(attempt, bstate, rng);
    }

    if (deadline) {
      const auto resume_at =
          saturating_add(saturating_add(Clock::now(), delay), policy.min_attempt_time);
      if (resume_at >= *deadline) {
        // Sleeping would end past the deadline: fail fast with what actually went wrong.
        co_return return_rejected_or_throw([&] { std::rethrow_exception(failed); });
      }
    }

    if (policy.on_retry) {
      policy.on_retry(retry_event{attempt, failed, cls, delay, from_hint});
    }
    if (delay > std::chrono::nanoseconds::zero()) {
      slow->timer.expires_after(saturating_cast<clock_duration>(delay));
      co_await slow->timer.async_wait(asio::use_awaitable);
    }
    if (cancellation_requested(cs)) {
      throw_aborted();
    }
  }
}

}  // namespace detail

}  // namespace keel
