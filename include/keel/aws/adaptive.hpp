// The AWS adaptive retry mode's client-side rate limiter: rate clocker, CUBIC, send token bucket.
#pragma once

// Overview
// --------
// `adaptive` mode is `standard` mode plus a client-side send-rate limiter (§5 of the reference,
// botocore's ClientRateLimiter). It is made of three parts, each usable on its own:
//
// * `rate_clocker` measures the response rate in half-second buckets, smoothed 0.8 / 0.2.
// * `cubic_calculator` computes the allowed rate: multiplicative decrease (x0.7) on a throttle,
//   then cubic growth back towards and past the rate at which the throttle happened.
// * `send_token_bucket` paces sends at that rate (1 token per send, capacity = rate, at least 1;
//   fill rate at least 0.5/s). It refills lazily from the time it is given; it never blocks:
//   `wait_time()` says how long an async caller should sleep before trying again.
//
// `adaptive_rate_limiter` combines them. It stays disabled (sends are never delayed) until the
// first throttling response, but tracks the rate from the start. Before every send (retries
// included) call `before_send(now)`: 0 means a token was taken and the request may go; a
// positive value is the time to wait before calling it again. After every response or transport
// exception (successes and final attempts too) call `after_response(is_throttling, now)`.
//
// Time is a `double` in seconds on any monotonic scale (botocore uses wall-clock seconds); it is
// always passed in, never read, so tests are exact.
//
// The constants SDKs expose are settable, defaults unchanged: `adaptive_options::beta` (CUBIC's
// decrease factor, 0.7) and `min_fill_rate` (0.5 tokens/s). For tests, `adaptive_options::
// calculator` replaces the CUBIC calculator with any `rate_calculator` (botocore's injectable
// `rate_adjustor`).
//
// Example:
//
//     keel::aws::adaptive_rate_limiter limiter{now()};      // one per client
//     for (double w = limiter.before_send(now()); w > 0; w = limiter.before_send(now())) {
//       co_await sleep_for(w);                              // non-blocking wait
//     }
//     auto res = co_await send(request);
//     limiter.after_response(keel::aws::is_throttling_code(res.code), now());
//
// Thread safety: `adaptive_rate_limiter` may be used concurrently from any thread (one mutex);
// `rate_clocker`, `cubic_calculator` and `send_token_bucket` are not synchronised.

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <optional>

namespace keel::aws {

/// CUBIC's multiplicative decrease factor (β).
inline constexpr double cubic_beta = 0.7;
/// CUBIC's scale constant (C).
inline constexpr double cubic_scale = 0.4;
/// The rate clocker's smoothing weight of the newest measurement.
inline constexpr double rate_smoothing = 0.8;
/// The rate clocker's measurement bucket, in seconds.
inline constexpr double rate_bucket_seconds = 0.5;
/// The send bucket's minimum fill rate, in tokens per second.
inline constexpr double min_fill_rate = 0.5;
/// The send bucket's minimum capacity, in tokens.
inline constexpr double min_bucket_capacity = 1.0;
/// A new rate is capped at this multiple of the measured send rate.
inline constexpr double max_rate_adjust_scale = 2.0;

/// The measured response rate (botocore's RateClocker), in half-second buckets.
class rate_clocker {
 public:
  /// Starts measuring at `now`; the first bucket boundary is `floor(now)` (whole seconds).
  /// @param now the current time in seconds.
  explicit rate_clocker(double now) noexcept : last_bucket_(std::floor(now)) {}

  /// Records one response at `now` and returns the smoothed rate (responses per second).
  /// @param now the current time in seconds.
  double record(double now) noexcept {
    const double bucket = std::floor(now / rate_bucket_seconds) * rate_bucket_seconds;
    count_ += 1;
    if (bucket > last_bucket_) {
      const double current = count_ / (bucket - last_bucket_);
      rate_ = rate_smoothing * current + (1 - rate_smoothing) * rate_;
      count_ = 0;
      last_bucket_ = bucket;
    }
    return rate_;
  }

  /// The last smoothed rate (0 until a bucket boundary has been crossed).
  double rate() const noexcept { return rate_; }

 private:
  double last_bucket_;
  double count_ = 0;
  double rate_ = 0;
};

/// What the adaptive limiter asks for a new send rate (botocore's `rate_adjustor`): implement it
/// to replace CUBIC, e.g. with a scripted calculator in a test. Called under the limiter's lock.
class rate_calculator {
 public:
  virtual ~rate_calculator() = default;

  /// The rate allowed after a non-throttling response at `t` (tokens per second).
  /// @param t the current time in seconds.
  virtual double success(double t) = 0;

  /// Records a throttling response at `t` and returns the rate allowed after it.
  /// @param rate the rate in force when the throttle happened.
  /// @param t the current time in seconds.
  virtual double throttle(double rate, double t) = 0;
};

/// The CUBIC rate calculator of adaptive mode (botocore's CubicCalculator).
class cubic_calculator final : public rate_calculator {
 public:
  /// Creates a calculator whose last failure is at `now`.
  /// @param now the current time in seconds.
  /// @param starting_max_rate the initial `w_max` (0 in botocore).
  /// @param beta the multiplicative decrease factor β (0.7 in botocore), in (0, 1).
  explicit cubic_calculator(double now, double starting_max_rate = 0,
                            double beta = cubic_beta) noexcept
      : beta_(beta), w_max_(starting_max_rate), last_fail_(now), k_(compute_k(starting_max_rate)) {}

  /// The rate allowed after a success at `t`: `C * (t - last_fail - K)^3 + w_max`.
  /// The state does not change.
  /// @param t the current time in seconds.
  double success(double t) noexcept override { return rate_at(t); }

  /// The same as `success(t)`, on a const calculator.
  /// @param t the current time in seconds.
  double rate_at(double t) const noexcept {
    const double dt = t - last_fail_ - k_;
    return cubic_scale * dt * dt * dt + w_max_;
  }

  /// Records a throttle at `t` with rate `rate` (which becomes `w_max`) and returns `rate * β`.
  /// @param rate the rate in force when the throttle happened (the pre-decrease rate).
  /// @param t the current time in seconds.
  double throttle(double rate, double t) noexcept override {
    w_max_ = rate;
    k_ = compute_k(rate);
    last_fail_ = t;
    return rate * beta_;
  }

  /// The decrease factor β.
  double beta() const noexcept { return beta_; }

  /// The rate at the last throttle (`w_max`).
  double w_max() const noexcept { return w_max_; }

  /// The time from the last throttle until the rate is back at `w_max` (`K`).
  double k() const noexcept { return k_; }

  /// The time of the last throttle (initially the creation time).
  double last_fail() const noexcept { return last_fail_; }

 private:
  double compute_k(double w_max) const noexcept {
    return std::cbrt(w_max * (1 - beta_) / cubic_scale);
  }

  double beta_;
  double w_max_;
  double last_fail_;
  double k_;
};

/// The lazily refilled token bucket that paces sends (botocore's TokenBucket, non-blocking).
class send_token_bucket {
 public:
  /// Tokens within this of the requested amount count as enough, so that a caller who waited
  /// exactly `wait_time()` is not refused on floating-point rounding (reference §9.6).
  static constexpr double rounding_tolerance = 1e-9;

  /// Creates an empty bucket at `rate` whose clock starts at the first `refill` (which only
  /// records the time).
  /// @param rate the fill rate (floored at 0.5) and capacity (floored at 1).
  explicit send_token_bucket(double rate) noexcept { apply_rate(rate); }

  /// Creates an empty bucket at `rate` whose clock starts at `now`, as botocore does.
  /// @param rate the fill rate (floored at 0.5) and capacity (floored at 1).
  /// @param now the current time in seconds.
  send_token_bucket(double rate, double now) noexcept : send_token_bucket(rate) { refill(now); }

  /// Creates an empty bucket at `rate` whose clock starts at `now`, with another minimum fill
  /// rate than botocore's 0.5 tokens/s.
  /// @param rate the fill rate (floored at `min_fill`) and capacity (floored at 1).
  /// @param now the current time in seconds.
  /// @param min_fill the lowest fill rate any `set_rate` may give, in tokens per second (> 0).
  send_token_bucket(double rate, double now, double min_fill) noexcept : min_fill_(min_fill) {
    apply_rate(rate);
    refill(now);
  }

  /// Adds `(now - last) * fill_rate` tokens, up to the capacity; the first call only records
  /// `now`. A `now` earlier than the last refill adds nothing.
  /// @param now the current time in seconds.
  void refill(double now) noexcept {
    if (!last_ts_) {
      last_ts_ = now;
      return;
    }
    const double elapsed = std::max(0.0, now - *last_ts_);
    capacity_ = std::min(max_capacity_, capacity_ + elapsed * fill_rate_);
    last_ts_ = std::max(now, *last_ts_);
  }

  /// Changes the rate at `now`: refills at the old rate, then fill rate = `max(v, 0.5)`,
  /// capacity limit = `v` if `v >= 1` else 1, and the tokens are cut to the new limit.
  /// @param v the new rate in tokens per second.
  /// @param now the current time in seconds.
  void set_rate(double v, double now) noexcept {
    refill(now);
    apply_rate(v);
  }

  /// Refills, then takes `amount` tokens if available.
  /// @param amount the tokens wanted (1 per send).
  /// @param now the current time in seconds.
  /// @return true if the tokens were taken; false (nothing taken) otherwise.
  bool try_acquire(double amount, double now) noexcept {
    refill(now);
    if (amount > capacity_ + rounding_tolerance) {
      return false;
    }
    capacity_ = std::max(0.0, capacity_ - amount);
    return true;
  }

  /// Refills, then returns how long until `amount` tokens are available at the current fill
  /// rate: 0 if they are available now. Takes nothing.
  /// @param amount the tokens wanted.
  /// @param now the current time in seconds.
  /// @return the wait in seconds (a rate change may shorten or lengthen it).
  double wait_time(double amount, double now) noexcept {
    refill(now);
    if (amount <= capacity_ + rounding_tolerance) {
      return 0;
    }
    return (amount - capacity_) / fill_rate_;
  }

  /// The lowest fill rate `set_rate` may give, in tokens per second.
  double min_fill() const noexcept { return min_fill_; }

  /// The fill rate in tokens per second (botocore's `max_rate`).
  double fill_rate() const noexcept { return fill_rate_; }

  /// The capacity limit in tokens.
  double max_capacity() const noexcept { return max_capacity_; }

  /// The tokens held after the last refill.
  double capacity() const noexcept { return capacity_; }

 private:
  void apply_rate(double v) noexcept {
    fill_rate_ = std::max(v, min_fill_);
    max_capacity_ = v >= 1 ? v : min_bucket_capacity;
    capacity_ = std::min(capacity_, max_capacity_);
  }

  double min_fill_ = min_fill_rate;
  double fill_rate_ = min_fill_rate;
  double max_capacity_ = min_bucket_capacity;
  double capacity_ = 0;
  std::optional<double> last_ts_;
};

/// The adaptive limiter's settable constants and injectable parts; the defaults are botocore's.
struct adaptive_options {
  /// CUBIC's multiplicative decrease factor β, in (0, 1).
  double beta = cubic_beta;
  /// The send bucket's minimum fill rate in tokens per second (> 0).
  double min_fill_rate = keel::aws::min_fill_rate;
  /// Replaces the CUBIC calculator (then `beta` is unused); null: a `cubic_calculator` started
  /// at the limiter's creation time. Shared so that a test can keep a handle on it.
  std::shared_ptr<rate_calculator> calculator;

  /// botocore's constants and the CUBIC calculator.
  adaptive_options() = default;
};

/// The adaptive mode's client-side rate limiter (botocore's ClientRateLimiter), one per client.
class adaptive_rate_limiter {
 public:
  /// Creates a disabled limiter at `now` with a bucket at rate 1, as botocore does.
  /// @param now the current time in seconds.
  /// @param opts the constants (β, minimum fill rate) and an optional rate calculator.
  explicit adaptive_rate_limiter(double now, adaptive_options opts = {})
      : clocker_(now),
        calculator_(opts.calculator ? std::move(opts.calculator)
                                    : std::make_shared<cubic_calculator>(now, 0.0, opts.beta)),
        bucket_(1.0, now, opts.min_fill_rate) {}

  adaptive_rate_limiter(const adaptive_rate_limiter&) = delete;
  adaptive_rate_limiter& operator=(const adaptive_rate_limiter&) = delete;

  /// Call before every send, retries included. Returns 0 when the send may go now (a token
  /// was taken, or the limiter is not enabled yet); otherwise the seconds to wait before
  /// calling again (nothing was taken).
  /// @param now the current time in seconds.
  double before_send(double now) noexcept {
    std::lock_guard lock{mutex_};
    if (!enabled_) {
      return 0;
    }
    const double wait = bucket_.wait_time(1, now);
    if (wait > 0) {
      return wait;
    }
    bucket_.try_acquire(1, now);
    return 0;
  }

  /// Call after every response or transport exception (which counts as non-throttling),
  /// including successes and final attempts: measures the rate and updates the bucket's rate.
  /// The first throttling response enables the limiter.
  /// @param is_throttling the response is a throttling error (§2 predicate).
  /// @param now the current time in seconds.
  /// @return the bucket's new fill rate.
  double after_response(bool is_throttling, double now) noexcept {
    std::lock_guard lock{mutex_};
    const double measured = clocker_.record(now);
    double next = 0;
    if (!is_throttling) {
      next = calculator_->success(now);
    } else {
      const double r = enabled_ ? std::min(measured, bucket_.fill_rate()) : measured;
      next = calculator_->throttle(r, now);
      enabled_ = true;
    }
    bucket_.set_rate(std::min(next, max_rate_adjust_scale * measured), now);
    return bucket_.fill_rate();
  }

  /// True once a throttling response has been seen.
  bool enabled() const {
    std::lock_guard lock{mutex_};
    return enabled_;
  }

  /// The last measured response rate.
  double measured_rate() const {
    std::lock_guard lock{mutex_};
    return clocker_.rate();
  }

  /// The send bucket's current fill rate.
  double fill_rate() const {
    std::lock_guard lock{mutex_};
    return bucket_.fill_rate();
  }

 private:
  mutable std::mutex mutex_;
  rate_clocker clocker_;
  std::shared_ptr<rate_calculator> calculator_;
  send_token_bucket bucket_;
  bool enabled_ = false;
};

}  // namespace keel::aws
