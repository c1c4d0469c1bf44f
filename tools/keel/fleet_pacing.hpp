// `policy.shared`: the keel command's fleet state (keel::llm::fleet_pacing) on Redis: one shared
// bucket and one shared breaker per entry (issue 16).
#pragma once

// Design
// ------
// Every entry with a configured `rate_limits.requests_per_minute` (and, if configured,
// `tokens_per_minute`) gets a `keel::redis::shared_quota` holding that limit for the whole fleet
// and a `keel::redis::shared_pacer` leasing from it for this process. Keys are
// `<key_prefix>:<provider>:<model>:<fingerprint>:requests` (and `:tokens`), the fingerprint being
// the first 16 hex digits of SHA-256 of the entry's base URL and API key (or AWS access key):
// processes that use the same key against the same server share one bucket, and the key itself
// is never in Redis. An entry with no configured limit is not shared (sharing a learned rate is
// not built yet). A 429's Retry-After pauses the fleet's bucket. When Redis cannot be reached
// within `policy.shared.timeout`, `acquire` throws and the client goes on under the entry's own
// bucket and `acquire_local`: a local bucket at this process's share of the limit, fixed when
// the outage starts and starting empty. The share is `limit / policy.shared.fleet_size` when the
// size is given; otherwise `limit / members`, the processes that leased from the fleet's bucket
// in its last 5 s as the last lease counted them (the whole limit if it never reached Redis); at
// least 1/s. The Redis client tries again after its reconnect delay (0.1 s doubling to 2 s), so
// a process rejoins the fleet's bucket within about 2 s of Redis returning; an empty, restarted
// server gets the scripts again and a new bucket, which starts empty. Measured against nginx
// (docs/BENCHMARKS.md): the staggered rejoins of 4 processes cost 4-17 429s and one fleet-wide
// Retry-After pause; keeping the local share for 2 s after a rejoin did not do better.
//
// Breakers: with `policy.breaker` on, every entry's breaker is shared through a
// `keel::redis::shared_breaker` under `...:<fingerprint>:breaker`. `on_breaker_outcome` counts
// this process's failures since its last success; `sync_breaker` (before each call under the
// breaker) sends them and reads the fleet's state in one detached script call at most every
// 250 ms, and brings the last answer into the process's breaker: the fleet's break
// (`force_open_until`), a short hold while another process probes, the end of the break when
// this process holds the probe, and `reset` after a close this process has not seen. A change of
// the process's own breaker (`on_breaker_change`: opened, or closed by its probe) is published
// at once; changes that `sync_breaker` made are not published back. With Redis unreachable, each
// breaker goes on alone.
//
// Built only with keel::redis (hiredis); otherwise `make_fleet_pacing` throws a config error.
//
// Thread safety: one executor, like the client.

#include <keel/llm/client.hpp>
#include <keel/llm/config.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <memory>

namespace keel::cli {

/// A fleet pacing the batch closes when it ends (its Redis connection would keep the run going).
class closable_fleet_pacing : public llm::fleet_pacing {
 public:
  /// Closes the connection; later acquires connect again.
  virtual void close() = 0;
};

/// The fleet pacing `cfg.policy.shared` asks for, or null when it names no Redis.
/// @throws llm::config_error if this keel was built without Redis support, or the URL is bad.
std::unique_ptr<closable_fleet_pacing> make_fleet_pacing(boost::asio::any_io_executor ex,
                                                         const llm::client_config& cfg);

/// The Redis key of `e`'s bucket for `dimension` ("requests" or "tokens") under `prefix`.
std::string fleet_key(const std::string& prefix, const llm::entry_config& e,
                      const std::string& dimension);

}  // namespace keel::cli
