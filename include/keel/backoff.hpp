// Backoff curves (constant, linear, exponential), jitter, and per-condition backoff strategies.
#pragma once

// Overview
// --------
// A `keel::backoff` computes how long to wait before retry number k (k = 1 is the wait before
// the second attempt). The curve is constant (`base`), linear (`base·k`) or exponential
// (`base·multiplier^(k-1)`), limited by `cap`; jitter then spreads the waits of concurrent
// callers so that they do not retry in lockstep (Brooker, "Exponential Backoff and Jitter"):
//
// | jitter            | delay for retry k, with t = min(cap, curve(k))                  |
// | ----------------- | ---------------------------------------------------------------- |
// | `none`            | t                                                                |
// | `full`            | uniform [0, t)                                                   |
// | `equal`           | t/2 + uniform [0, t/2)                                           |
// | `decorrelated`    | min(cap, uniform [base, 3·previous delay)), previous starts at base |
// | `decorrelated_v2` | Polly's DecorrelatedJitterV2, capped: the median follows base·2^k     |
//
// `first_retry_immediate` makes retry 1 wait zero and shifts the curve by one ("immediate retry,
// then backoff": the first rung of the throttling hierarchy).
//
// A `keel::backoff_strategy` picks a backoff per failure: by `keel::condition`, or through a
// selector that sees the failure itself (e.g. an HTTP status). `backoff_strategy::hierarchy()` is
// keel's default for LLM APIs: throttled → exponential from 1 s with full jitter; timeout →
// exponential from 1 s; transient → one immediate retry, then exponential from 1 s; all capped at
// 60 s. A server's Retry-After always takes precedence (see retry.hpp).
//
// Example:
//
//     keel::random_source rng{7};
//     keel::backoff b = keel::backoff::exponential(1s, 60s, keel::jitter::full);
//     keel::backoff_state s;
//     auto d1 = b.next_delay(1, s, rng);  // in [0, 1 s)
//     auto d2 = b.next_delay(2, s, rng);  // in [0, 2 s)
//
// Thread safety: `backoff` and `backoff_strategy` are values, safe to share once built;
// `backoff_state` belongs to one call.

#include <keel/classify.hpp>
#include <keel/random.hpp>

#include <array>
#include <chrono>
#include <exception>
#include <functional>
#include <optional>
#include <string_view>

namespace keel {

/// The shape of a backoff curve.
enum class backoff_shape { constant, linear, exponential };

/// How a backoff delay is randomised.
enum class jitter { none, full, equal, decorrelated, decorrelated_v2 };

/// The config name of a shape: "constant", "linear", "exponential".
std::string_view to_string(backoff_shape s) noexcept;

/// The shape named `name` (a name `to_string(backoff_shape)` returns), if any.
std::optional<backoff_shape> parse_backoff_shape(std::string_view name) noexcept;

/// The config name of a jitter: "none", "full", "equal", "decorrelated", "decorrelated_v2".
std::string_view to_string(jitter j) noexcept;

/// The jitter named `name` (a name `to_string(jitter)` returns), if any.
std::optional<jitter> parse_jitter(std::string_view name) noexcept;

/// Per-call state for the jitters that depend on the previous delay.
struct backoff_state {
  /// The previous delay chosen (decorrelated jitter).
  std::chrono::nanoseconds previous{0};
  /// Polly's decorrelated-v2 running value.
  double v2_previous = 0.0;
};

/// A backoff curve with a cap and a jitter.
struct backoff {
  /// Curve shape.
  backoff_shape shape = backoff_shape::exponential;
  /// The first delay of the curve (before jitter).
  std::chrono::nanoseconds base = std::chrono::seconds(1);
  /// Growth factor of the exponential curve.
  double multiplier = 2.0;
  /// Upper bound of any delay.
  std::chrono::nanoseconds cap = std::chrono::seconds(60);
  /// Randomisation applied to the curve.
  keel::jitter jitter = keel::jitter::full;
  /// Retry 1 waits zero; retry k waits what retry k-1 would have.
  bool first_retry_immediate = false;

  /// A constant delay.
  static backoff constant(std::chrono::nanoseconds delay, keel::jitter j = keel::jitter::none);
  /// `base·k`, capped.
  static backoff linear(std::chrono::nanoseconds base, std::chrono::nanoseconds cap,
                        keel::jitter j = keel::jitter::none);
  /// `base·multiplier^(k-1)`, capped.
  static backoff exponential(std::chrono::nanoseconds base, std::chrono::nanoseconds cap,
                             keel::jitter j = keel::jitter::full, double multiplier = 2.0);
  /// Zero delay.
  static backoff immediate();

  /// The un-jittered, capped delay for retry `k` (k >= 1).
  std::chrono::nanoseconds nominal_delay(int k) const noexcept;

  /// The delay before retry `k` (k >= 1), drawing jitter from `rng` and updating `state`.
  std::chrono::nanoseconds next_delay(int k, backoff_state& state,
                                      random_source& rng) const noexcept;
};

/// Chooses a backoff for each failure: by condition, or by a selector that sees the failure.
class backoff_strategy {
 public:
  /// A selector that may pick a backoff from the failure itself; `std::nullopt` falls back to the
  /// per-condition choice.
  using selector =
      std::function<std::optional<backoff>(const std::exception_ptr&, const classification&)>;

  /// Uses `fallback` for every condition.
  backoff_strategy(backoff fallback = backoff{}) : default_(fallback) {}  // NOLINT: implicit

  /// Uses `b` for failures of condition `c`.
  backoff_strategy& on(condition c, backoff b);

  /// Installs a selector consulted before the per-condition table.
  backoff_strategy& select(selector s);

  /// The backoff for this failure.
  backoff choose(const std::exception_ptr& ep, const classification& c) const;

  /// keel's default hierarchy for LLM APIs (see the overview).
  static backoff_strategy hierarchy();

 private:
  backoff default_;
  std::array<std::optional<backoff>, 6> by_condition_{};
  selector select_;
};

}  // namespace keel
