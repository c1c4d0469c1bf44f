// keel::redis::shared_quota and shared_pacer: one token bucket in Redis shared by every process
// that names the same key, leased in batches so that a process rarely asks Redis.
#pragma once

// Overview
// --------
// A provider's rate limit belongs to an API key, not to a process (issue 16). `shared_quota` keeps
// one token bucket per key in a Redis hash and takes tokens from it with a Lua script, which runs
// atomically on the server and reads the **server's** clock (`TIME`), so every process of a
// fleet sees one bucket on one clock:
//
//     refill:  tokens = min(burst, tokens + (now - ts) * rate)      (not during a pause)
//     lease:   granted = min(want, tokens); tokens -= granted
//     answer:  granted, and how long until what was not granted could be (0 if all was)
//
// A new bucket (first use, or a Redis restarted empty) starts **empty**: the fleet may have been
// sending at the limit until then (on its local shares while Redis was away), and a full bucket
// on top of that is a burst the server refuses. Each lease may name its pacer; the script keeps
// them in a sorted set `<key>:members` by last lease and answers how many leased within
// `member_window`, which is how a process knows its share of the limit (limit / members) when
// Redis is later out of reach.
//
// `pause(d)` is the fleet-wide Retry-After: until `now + d` nothing is granted, the bucket is
// emptied, and it refills from zero at the pause's end, so the fleet restarts at the bucket's
// rate, never in a synchronized burst of everyone's backlog.
//
// `shared_pacer` is what a caller uses per request: `co_await pacer.acquire(1)` takes from a local
// pool. A lease is sized from this process's own demand (what it took per second since its last
// lease, smoothed, times `lease_window`), at least 16 requests' worth (so a request costs at most
// 1/16 of a round trip) and at most `rate * lease_window`. The next lease starts when the pool
// falls below half a lease, so callers seldom wait for a round trip. One lease is in flight at a
// time and it is shared by every waiter of the process. After a short grant (other processes
// drain the bucket too) the process waits at least one window before leasing again. Measured
// (docs/BENCHMARKS.md): 1,000 requests/s across 1-8 processes, 0.02-0.064 round trips per
// request, acquire p99 0.13-0.17 ms on loopback. The fleet's total stays within
// `burst + rate * t` plus what the processes hold leased and unused.
//
// Decisions:
// - A token bucket rather than GCRA: keel's local throttler is a bucket with the same rate and
//   burst, partial grants fit leases, and the pause needs a level to empty.
// - The script is loaded with `SCRIPT LOAD` and run with `EVALSHA`; a server that answers
//   `NOSCRIPT` (restarted empty) gets it loaded again, once per call.
// - The hash expires (`PEXPIRE`) after `idle_ttl` unused, so abandoned keys do not accumulate.
// - Rates are the caller's (configured or learned; the last caller's rate and burst apply to the
//   refill it triggers). What controllers learn with no configured limit is shared by
//   `shared_rate` (keel/redis/shared_rate.hpp), not through a bucket.
// - Errors are the Redis client's (keel/redis/client.hpp): fast, with a command timeout, so a
//   caller can fall back to a local limit.
//
// Cancellation: as `client::command` for `lease` and `pause`. A cancelled `acquire` takes nothing
// from the pool; a lease runs detached from the callers that wait for it, so the tokens it
// brings go to the pool even if they are all cancelled. The quota and its Redis client must
// outlive the pacer and any lease in flight (run the io_context until they are done).
//
// Thread safety: not thread-safe; one executor (the Redis client's).

#include <keel/redis/client.hpp>

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace keel::redis {

/// A shared bucket's key and limits.
struct quota_options {
  /// The Redis key of the bucket (namespace it: e.g. "keel:{fingerprint}:requests").
  std::string key;
  /// Tokens per second the bucket refills.
  double rate = 0;
  /// The bucket's capacity (at least the largest single lease).
  double burst = 1;
  /// How long an unused bucket is kept.
  std::chrono::milliseconds idle_ttl{std::chrono::minutes(10)};
  /// A member (a pacer) counts as active while it leased within this time.
  std::chrono::milliseconds member_window{std::chrono::seconds(5)};
};

/// What one lease got.
struct lease_result {
  /// Tokens granted (between 0 and what was asked).
  double granted = 0;
  /// When what was not granted could be: 0 if everything was granted; during a pause, the
  /// pause's end.
  std::chrono::nanoseconds retry_after{0};
  /// Members that leased from the bucket within `member_window`, this one included; 0 when the
  /// lease named no member.
  std::size_t members = 0;
};

/// One token bucket in Redis shared by every process on the same key.
class shared_quota {
 public:
  /// A bucket `options.key` reached through `redis` (which must outlive this object).
  shared_quota(client& redis, quota_options options);

  /// Takes up to `want` tokens from the shared bucket, atomically, on the server's clock.
  /// @param now_ms_for_tests the time to use instead of the server's (tests only).
  /// @param member if not empty, the caller's name in the bucket's member set (key
  ///   `<key>:members`), which the answer counts.
  /// @throws what `client::command` throws; std::runtime_error if the script answers oddly.
  /// Cancellation: as `client::command`.
  boost::asio::awaitable<lease_result> lease(double want,
                                             std::optional<long long> now_ms_for_tests = {},
                                             std::string member = {});

  /// Pauses the bucket for everyone for `d` from now (server time): nothing is granted until
  /// then, and it refills from empty at the end. A longer pause already set is kept.
  /// @throws what `client::command` throws.
  /// Cancellation: as `client::command`.
  boost::asio::awaitable<void> pause(std::chrono::milliseconds d,
                                     std::optional<long long> now_ms_for_tests = {});

  /// The options.
  const quota_options& options() const noexcept { return options_; }

 private:
  // Runs `script` by its SHA (`sha`, loaded on first use and again after NOSCRIPT); `what`
  // names it in errors.
  boost::asio::awaitable<reply> run(const std::string& script, std::string& sha, const char* what,
                                    std::vector<std::string> keys, std::vector<std::string> argv);
  client& redis_;
  quota_options options_;
  std::string lease_sha_;
  std::string pause_sha_;
};

/// Paces one process's requests from a `shared_quota`, leasing in batches.
class shared_pacer {
 public:
  /// Leases `lease_window` of `quota`'s rate at a time (at least what a caller needs).
  explicit shared_pacer(shared_quota& quota,
                        std::chrono::milliseconds lease_window = std::chrono::milliseconds(50));
  ~shared_pacer();

  /// Waits until `cost` tokens are available to this process and takes them.
  /// @throws what `shared_quota::lease` throws (the caller falls back to a local limit); the
  ///   pool is kept.
  /// Cancellation: terminal or partial cancellation ends the wait with `operation_aborted`,
  ///   taking nothing.
  boost::asio::awaitable<void> acquire(double cost);

  /// Tokens leased and not yet taken.
  double pooled() const noexcept;
  /// Leases made (script calls).
  std::uint64_t leases() const noexcept;
  /// Acquires granted.
  std::uint64_t granted() const noexcept;
  /// Processes (pacers) that leased from the bucket within its `member_window`, this one
  /// included, as the last successful lease counted them; 0 before the first. What a process's
  /// share of the limit is when the bucket cannot be reached.
  std::size_t members() const noexcept;

 private:
  struct state;
  static boost::asio::awaitable<void> lease_task(std::shared_ptr<state> st, double want);
  std::shared_ptr<state> state_;
};

}  // namespace keel::redis
