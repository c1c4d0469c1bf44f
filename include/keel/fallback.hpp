// with_fallback: try ordered alternatives (another model, tier or region) when one fails.
#pragma once

// Overview
// --------
// `co_await keel::with_fallback(keel::alternatives(primary, secondary, tertiary), policy)` runs
// the first alternative; when it fails with an error the policy accepts, it runs the next one,
// and so on:
//
// - which failures move on: `policy.fallback_on` (default: every condition except `cancelled`);
//   `policy.should_try(error, classification, failed_index, candidate_index)` may further skip a
//   candidate, e.g. a "context too long" error goes straight to the alternative with the larger
//   context window, skipping the ones in between;
// - a failure the policy does not accept is rethrown unchanged, without trying further;
// - cancellation is always rethrown at once;
// - every alternative runs in the caller's coroutine, so it inherits the remaining time of an
//   enclosing `with_deadline` (and an alternative is not started once that time is up);
// - `policy.on_fallback` is told each move (from, to, error);
// - when the last candidate fails, the call throws `keel::failure` with
//   `keel::error::all_fallbacks_failed`, whose `causes()` are every alternative's error in order.
//
// Each alternative is a factory (a callable returning a fresh `awaitable<T>`), typically a whole
// retry stack for one model. The list is type-erased (`std::function`) so that it can be built
// at run time from configuration.
//
// Example:
//
//     std::string reply = co_await keel::with_fallback(keel::alternatives(
//         [&] { return keel::with_retry([&] { return call(big_model, prompt); }, policy); },
//         [&] { return call(small_model, prompt); }));
//
// Cancellation: cancelling the caller cancels the running alternative; no further alternative
// is tried and `operation_aborted` propagates.
// Thread safety: each call is independent.

#include <keel/classify.hpp>
#include <keel/clock.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/detail/deadline_executor.hpp>
#include <keel/error.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/this_coro.hpp>

#include <cstddef>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace keel {

/// One alternative of a fallback chain: a factory of fresh awaitables.
template <class T>
using alternative = std::function<boost::asio::awaitable<T>()>;

/// What `on_fallback` is told when the chain moves on.
struct fallback_event {
  /// The alternative that failed.
  std::size_t from = 0;
  /// The alternative about to run.
  std::size_t to = 0;
  /// Its error.
  std::exception_ptr error;
  /// How that error was classified.
  keel::classification classification;
};

/// Which failures make `with_fallback` move on, and hooks.
struct fallback_policy {
  /// The conditions that move on to the next alternative.
  condition_set fallback_on = condition_set::all_failures();
  /// Optional: may alternative `candidate` run after alternative `failed` failed this way?
  /// Returning false skips that candidate (the next one is asked).
  std::function<bool(const std::exception_ptr&, const classification&, std::size_t failed,
                     std::size_t candidate)>
      should_try;
  /// Classifies failures; `keel::classify` when empty.
  keel::classifier classify;
  /// Called before each alternative after the first.
  std::function<void(const fallback_event&)> on_fallback;

  fallback_policy() = default;
};

/// Builds the alternatives list from factories returning the same `awaitable<T>`.
template <class MakeOp, class... MakeOps>
requires(detail::is_op_factory_v<MakeOp> &&
         (detail::is_op_factory_v<MakeOps> &&
          ...)) std::vector<alternative<detail::op_value_t<MakeOp>>> alternatives(MakeOp first,
                                                                                  MakeOps... rest) {
  std::vector<alternative<detail::op_value_t<MakeOp>>> v;
  v.reserve(1 + sizeof...(rest));
  v.emplace_back(std::move(first));
  (v.emplace_back(std::move(rest)), ...);
  return v;
}

/// Runs the alternatives in order until one succeeds or a failure is not accepted.
///
/// @param alts the alternatives, primary first; each is called at most once.
/// @param policy which failures move on, and hooks.
/// @returns the first successful alternative's value.
/// @throws a failure the policy does not accept, unchanged; `keel::failure`
///   `all_fallbacks_failed` (causes: every error, in order) when no candidate is left;
///   `std::invalid_argument` when `alts` is empty.
/// Cancellation: the running alternative is cancelled; nothing further runs.
template <class T, class Clock = default_clock>
boost::asio::awaitable<T> with_fallback(std::vector<alternative<T>> alts,
                                        fallback_policy policy = {}) {
  if (alts.empty()) {
    throw std::invalid_argument("keel::with_fallback needs at least one alternative");
  }
  std::vector<std::exception_ptr> causes;
  std::size_t index = 0;
  for (;;) {
    std::exception_ptr failed;
    try {
      if constexpr (std::is_void_v<T>) {
        co_await alts[index]();
        co_return;
      } else {
        co_return co_await alts[index]();
      }
    } catch (...) {
      failed = std::current_exception();
    }
    // Cancellation first, whatever the alternative turned it into: never a reason to move on.
    auto cs = co_await boost::asio::this_coro::cancellation_state;
    if (cs.cancelled() != boost::asio::cancellation_type::none) {
      throw boost::system::system_error(boost::asio::error::operation_aborted);
    }
    const classification cls = policy.classify ? policy.classify(failed) : keel::classify(failed);
    if (cls.condition == condition::cancelled || !policy.fallback_on.contains(cls.condition)) {
      std::rethrow_exception(failed);
    }
    causes.push_back(failed);

    std::size_t next = index + 1;
    while (next < alts.size() && policy.should_try &&
           !policy.should_try(failed, cls, index, next)) {
      ++next;
    }
    // Do not start an alternative once the enclosing deadline has passed.
    bool out_of_time = false;
    if (next < alts.size()) {
      auto d = detail::deadline_of<Clock>(co_await boost::asio::this_coro::executor);
      out_of_time = d && Clock::now() >= *d;
    }
    if (next >= alts.size() || out_of_time) {
      std::string what = "all fallbacks failed (" + std::to_string(causes.size()) + " tried)";
      for (std::size_t i = 0; i < causes.size(); ++i) {
        what += i == 0 ? ": " : "; ";
        what += describe(causes[i]);
      }
      throw failure(error::all_fallbacks_failed, what, std::move(causes));
    }
    if (policy.on_fallback) {
      policy.on_fallback(fallback_event{index, next, failed, cls});
    }
    index = next;
  }
}

}  // namespace keel
