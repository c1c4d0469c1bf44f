// The AWS standard-mode retry quota (botocore's RetryQuota) and the per-call cost bookkeeping.
#pragma once

// Overview
// --------
// In the AWS SDKs' `standard` and `adaptive` retry modes every client owns one retry quota: a
// counter that starts full at 500. Each retry must first take a cost from it (all or nothing);
// when none is left the failing attempt's error is returned with no retry. A call that ends with
// a 2xx response gives back the cost of its *last* retry, or 1 (the "no-retry increment") when it
// succeeded on the first attempt. Non-2xx endings and transport exceptions give back nothing.
//
// `quota_costs` holds the per-retry costs of the two revisions of the standard algorithm:
// 2.0 (the SDKs' shipping default: 5 per retry, 10 after a timeout) and 2.1 (14 per retry or
// timeout, 5 per throttling error). `standard_call_state` is the per-call `recorded_cost` rule.
//
// Everything here is pure: no clocks, no Asio.
//
// Example:
//
//     keel::aws::retry_quota quota;                           // one per client
//     keel::aws::standard_call_state call{quota};             // one per API call
//     // attempt 1 failed with 503 and is retryable:
//     if (!call.try_acquire_retry(/*is_timeout*/ false, /*is_throttling*/ false)) {
//       /* RetryQuotaReached: return the 503 */
//     }
//     // ... attempt 2 succeeded with 200:
//     call.on_call_finished(200);                             // gives back 5
//
// Thread safety: `retry_quota` may be used concurrently from any thread (lock-free atomics);
// a `standard_call_state` belongs to one call and must not be shared.

#include <atomic>
#include <optional>

namespace keel::aws {

/// The per-retry quota costs of one revision of the standard retry algorithm.
struct quota_costs {
  /// Cost of a retry after a non-throttling error response or a non-timeout exception.
  int retry = 5;
  /// Cost of a retry after a connect or read timeout.
  int timeout = 10;
  /// Cost of a retry after a throttling error (the §2 "is throttling" predicate).
  int throttling = 5;
  /// Amount given back when a call succeeds (2xx) without having acquired anything.
  int no_retry_increment = 1;

  /// The standard 2.0 costs (5 / 10 / 5 / 1), the SDKs' current default.
  static constexpr quota_costs v2_0() noexcept { return quota_costs{}; }

  /// The standard 2.1 costs (14 / 14 / 5 / 1).
  static constexpr quota_costs v2_1() noexcept { return quota_costs{14, 14, 5, 1}; }

  /// The cost of one retry of a failure of this kind.
  /// @param is_timeout the attempt failed with a connect or read timeout.
  /// @param is_throttling the attempt failed with a throttling error.
  /// @return `throttling` if throttling, else `timeout` if a timeout, else `retry`.
  constexpr int cost_for(bool is_timeout, bool is_throttling) const noexcept {
    if (is_throttling) {
      return throttling;
    }
    return is_timeout ? timeout : retry;
  }
};

/// A client's retry quota: `0 <= available() <= max()`, starting full.
class retry_quota {
 public:
  /// botocore's initial (and maximum) quota.
  static constexpr int default_capacity = 500;

  /// Creates a full quota.
  /// @param capacity the initial and maximum amount; negative values are treated as 0.
  explicit retry_quota(int capacity = default_capacity) noexcept
      : max_(capacity < 0 ? 0 : capacity), available_(max_) {}

  retry_quota(const retry_quota&) = delete;
  retry_quota& operator=(const retry_quota&) = delete;

  /// Takes `cost` if at least that much is available; otherwise changes nothing.
  /// @param cost a non-negative amount.
  /// @return true if the cost was taken (the retry may proceed).
  bool acquire(int cost) noexcept {
    int cur = available_.load(std::memory_order_relaxed);
    do {
      if (cost > cur) {
        return false;
      }
    } while (!available_.compare_exchange_weak(cur, cur - cost, std::memory_order_acq_rel,
                                               std::memory_order_relaxed));
    return true;
  }

  /// Gives back `cost`, without exceeding `max()` (a no-op when already full).
  /// @param cost a non-negative amount.
  void release(int cost) noexcept {
    int cur = available_.load(std::memory_order_relaxed);
    int next = 0;
    do {
      next = cur + cost > max_ ? max_ : cur + cost;
    } while (!available_.compare_exchange_weak(cur, next, std::memory_order_acq_rel,
                                               std::memory_order_relaxed));
  }

  /// The amount available now.
  int available() const noexcept { return available_.load(std::memory_order_acquire); }

  /// The maximum (and initial) amount.
  int max() const noexcept { return max_; }

 private:
  const int max_;
  std::atomic<int> available_;
};

/// The quota bookkeeping of one standard-mode call (botocore's `recorded_cost`, §3).
class standard_call_state {
 public:
  /// Starts a call that draws on `quota`, which must outlive this object.
  /// @param quota the client's shared quota.
  /// @param costs the revision's costs (2.0 by default).
  explicit standard_call_state(retry_quota& quota, quota_costs costs = quota_costs::v2_0()) noexcept
      : quota_(&quota), costs_(costs) {}

  /// Asks the quota for the cost of a retry of a retryable failed attempt.
  /// On success the cost becomes the recorded cost (overwriting any earlier one).
  /// @param is_timeout the attempt failed with a connect or read timeout.
  /// @param is_throttling the attempt failed with a throttling error.
  /// @return false if the quota refused (botocore's `RetryQuotaReached`: do not retry).
  bool try_acquire_retry(bool is_timeout, bool is_throttling) noexcept {
    const int cost = costs_.cost_for(is_timeout, is_throttling);
    if (!quota_->acquire(cost)) {
      return false;
    }
    recorded_cost_ = cost;
    return true;
  }

  /// Records that the call finished with an HTTP response of status `status`: a 2xx gives back
  /// the last retry's cost, or the no-retry increment if nothing was acquired; any other status
  /// gives back nothing. (A call that ends with a transport exception must not call this.)
  /// @param status the final HTTP status.
  void on_call_finished(int status) noexcept {
    if (status < 200 || status > 299) {
      return;
    }
    quota_->release(recorded_cost_ ? *recorded_cost_ : costs_.no_retry_increment);
  }

  /// The cost of the most recent successful acquisition, if any.
  std::optional<int> recorded_cost() const noexcept { return recorded_cost_; }

 private:
  retry_quota* quota_;
  quota_costs costs_;
  std::optional<int> recorded_cost_;
};

}  // namespace keel::aws
