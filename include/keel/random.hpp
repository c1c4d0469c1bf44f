// Injected, seedable randomness for jitter: keel never draws from a hidden generator in tests.
#pragma once

// Overview
// --------
// `keel::random_source` is a small SplitMix64 generator with an atomic state, so one seeded
// instance can be shared by thousands of coroutines (and by several threads) without a lock.
// With a fixed seed and a single thread, the sequence it produces is fully deterministic, which
// is what tests need. Policies hold a non-owning pointer to one; when they hold none, keel uses a
// per-thread generator seeded once from `std::random_device`.
//
// Example:
//
//     keel::random_source rng{42};
//     auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
//     policy.random = &rng;
//
// Thread safety: `next()` and `uniform()` may be called concurrently from any thread.

#include <atomic>
#include <cstdint>

namespace keel {

/// A seedable, lock-free source of uniform random numbers for jitter.
class random_source {
 public:
  /// Creates a source whose sequence is determined by `seed`.
  explicit random_source(std::uint64_t seed) noexcept : state_(seed) {}

  random_source(const random_source&) = delete;
  random_source& operator=(const random_source&) = delete;

  /// The next 64 random bits.
  std::uint64_t next() noexcept {
    std::uint64_t z =
        state_.fetch_add(0x9e3779b97f4a7c15ULL, std::memory_order_relaxed) + 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }

  /// A uniform double in [0, 1).
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  /// This thread's default source, seeded once from `std::random_device`.
  static random_source& thread_default();

 private:
  std::atomic<std::uint64_t> state_;
};

}  // namespace keel
