// A retry budget shared by many calls, so that retries cannot turn an outage into a retry storm.
#pragma once

// Overview
// --------
// keel's budget is gRPC's retry throttling (gRFC A6), chosen over Finagle's percentage budget
// because it needs no clock and reacts within a handful of failures: the budget holds `tokens`,
// starting at `max_tokens`; every *retryable* failed attempt takes 1 token, every successful call
// gives back `token_ratio`; while `tokens <= max_tokens / 2` no retry is sent (the failing
// attempt's error is reported as `keel::error::budget_exhausted` with that error as its cause).
// In steady state this allows about one retry per `1/token_ratio` successes; during an outage,
// after `max_tokens/2` failures every call makes exactly one attempt until successes refill it.
//
// Permanent failures (nothing would retry them) and cancellations do not touch the budget, and
// `with_retry` charges only the conditions in `retry_policy::charge_budget_on` (transient and
// timeout by default): a throttled failure is paced by the server's hint and the throttler, not
// refused by the budget (retry.hpp says why). Tokens are counted in thousandths, as gRPC does,
// so `token_ratio` has three decimals.
//
// Sizing `token_ratio` (r) for an LLM batch: the budget drains while failed attempts per success
// exceed r, i.e. while the failure rate of attempts is above r / (1 + r). With the class
// defaults below (10 tokens, r = 0.1, gRPC's own example) that is ~9%: a batch whose provider
// answers 10% of requests with a 503 loses about 0.01 token per prompt and, after a few hundred
// prompts (sooner after a run of bad luck: 5 failures in a row take 10 tokens to the half-way
// line), refuses retries that would have succeeded. LLM providers routinely sit at a few percent
// of 5xx/529, with bursts above that, so size the budget for the failure rate a batch should
// *tolerate*: r = 0.5 drains only above ~33% failures (an outage, which the budget is for), and
// a larger `max_tokens` (100) absorbs bursts. The `keel` command uses {100, 0.5}. The class
// defaults stay at gRPC's values for code that already relies on them.
//
// Example:
//
//     keel::retry_budget budget{100, 0.5};  // shared by every call to one provider
//     auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
//     policy.budget = &budget;
//
// Thread safety: every member may be called concurrently from any thread (lock-free atomics).

#include <atomic>
#include <cstdint>

namespace keel {

/// gRFC A6 retry throttling tokens, shared by every call that points at it.
class retry_budget {
 public:
  /// Creates a full budget.
  /// @param max_tokens the capacity; retries stop at half of it. Must be > 0.
  /// @param token_ratio tokens returned per success (three decimals are kept); the budget
  ///   drains while the failure rate of attempts exceeds token_ratio / (1 + token_ratio): ~9%
  ///   for the default 0.1, ~33% for 0.5 (see the overview for sizing it for an LLM batch).
  explicit retry_budget(double max_tokens = 10, double token_ratio = 0.1) noexcept
      : max_milli_(static_cast<std::int64_t>(max_tokens * 1000)),
        ratio_milli_(static_cast<std::int64_t>(token_ratio * 1000)),
        milli_(max_milli_) {}

  retry_budget(const retry_budget&) = delete;
  retry_budget& operator=(const retry_budget&) = delete;

  /// Records a successful call: returns `token_ratio` tokens, up to `max_tokens`.
  void on_success() noexcept { add(ratio_milli_); }

  /// Records a retryable failed attempt: takes one token, down to zero.
  void on_failure() noexcept { add(-1000); }

  /// True if a retry may be sent now (`tokens > max_tokens / 2`).
  bool can_retry() const noexcept {
    return milli_.load(std::memory_order_relaxed) * 2 > max_milli_;
  }

  /// Asks for permission to retry and counts a refusal.
  bool try_retry() noexcept {
    if (can_retry()) {
      return true;
    }
    denied_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }

  /// The tokens left.
  double tokens() const noexcept { return static_cast<double>(milli_.load()) / 1000.0; }

  /// The capacity.
  double max_tokens() const noexcept { return static_cast<double>(max_milli_) / 1000.0; }

  /// How many retries this budget has refused.
  std::uint64_t denied() const noexcept { return denied_.load(); }

 private:
  void add(std::int64_t delta) noexcept {
    std::int64_t cur = milli_.load(std::memory_order_relaxed);
    for (;;) {
      std::int64_t next = cur + delta;
      if (next < 0) {
        next = 0;
      }
      if (next > max_milli_) {
        next = max_milli_;
      }
      if (milli_.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
        return;
      }
    }
  }

  const std::int64_t max_milli_;
  const std::int64_t ratio_milli_;
  std::atomic<std::int64_t> milli_;
  std::atomic<std::uint64_t> denied_{0};
};

}  // namespace keel
