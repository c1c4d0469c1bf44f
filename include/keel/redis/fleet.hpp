// keel::redis::fleet: what a `keel::llm::client` shares with the other processes of a fleet
// through Redis (`policy.shared`, issue 16): one bucket and one breaker per entry.
#pragma once

// Overview
// --------
// Every entry with a configured `rate_limits.requests_per_minute` (and, if configured,
// `tokens_per_minute`) gets a `keel::redis::shared_quota` holding that limit for the whole fleet
// and a `keel::redis::shared_pacer` leasing from it for this process. Keys are
// `<key_prefix>:<provider>:<model>:{<fingerprint>}:requests` (and `:tokens`), the fingerprint being
// the first 16 hex digits of SHA-256 of the entry's base URL and API key (or AWS access key):
// processes that use the same key against the same server share one bucket, and the key itself
// is never in Redis. An entry with no configured limit shares what its processes learn instead
// (`sync_pacing`, keel/redis/shared_rate.hpp, key `...:{<fingerprint>}:learned`): the fleet's
// limit summed from the processes' measured shares, an equal share each, and one process's
// probes followed by all; while its syncs cannot reach Redis, each process keeps to its last
// share (its own 429s still cut it, it probes no more) and `acquire` throws the sync's error
// (so the client warns and counts it, as for a bucket). A 429's Retry-After pauses the fleet's
// bucket. When Redis cannot be
// reached within `policy.shared.timeout`, `acquire` throws and the client goes on under the entry's
// own bucket and `acquire_local`: a local bucket at this process's share of the limit, fixed when
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
// `keel::redis::shared_breaker` under `...:{<fingerprint>}:breaker`. `on_breaker_outcome` counts
// this process's failures since its last success; `sync_breaker` (before each call under the
// breaker) sends them and reads the fleet's state in one detached script call at most every
// 250 ms, and brings the last answer into the process's breaker: the fleet's break
// (`force_open_until`), a short hold while another process probes, the end of the break when
// this process holds the probe, and `reset` after a close this process has not seen. A change of
// the process's own breaker (`on_breaker_change`: opened, or closed by its probe) is published
// at once; changes that `sync_breaker` made are not published back. With Redis unreachable, each
// breaker goes on alone.
//
// Example:
//
//     auto cfg = keel::llm::load_config("keel.json");   // with policy.shared.redis
//     keel::redis::fleet fleet(ex, cfg);                 // one per process (a Redis connection)
//     keel::llm::client_options o;
//     o.fleet = &fleet;
//     keel::llm::client client(ex, cfg, {}, o);
//     ...
//     fleet.close();  // at the end, so that the io_context can finish
//
// Cancellation: as `keel::llm::fleet_pacing`; the Redis commands it spawns on its own (pauses,
// breaker syncs) run detached and end when `close()` closes the connection; after `close()` it
// starts no more of them. Lifetime: like `shared_pacer`, destroy it only after `close()` and
// after the io_context has run what it started (e.g. once `run()` returned), not while its
// detached commands may still resume.
//
// Thread safety: one executor, like the client.

#include <keel/llm/client.hpp>
#include <keel/llm/config.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <memory>
#include <string>

namespace keel::redis {

/// The Redis key of `e`'s state `what` ("requests", "tokens", "breaker") under `prefix`:
/// `<prefix>:<provider>:<model>:{<fingerprint>}:<what>`, the fingerprint being the first 16 hex
/// digits of SHA-256 of the entry's base URL and API key (or AWS access key id): never the key.
/// The braces are a Redis Cluster hash tag: an entry's keys (and a bucket's member set) share a
/// slot, so its scripts may touch them together.
std::string fleet_key(const std::string& prefix, const keel::llm::entry_config& e,
                      const std::string& what);

/// `policy.shared` on Redis: the fleet's pacing and breakers for a `keel::llm::client`.
class fleet final : public keel::llm::fleet_pacing {
 public:
  /// A fleet on `cfg.policy.shared.redis` (one Redis connection, opened at the first command).
  /// @throws keel::llm::config_error naming `/policy/shared/redis` (empty or bad URL) or
  ///   `/policy/shared/ca_file` (a CA file that cannot be loaded).
  fleet(boost::asio::any_io_executor ex, const keel::llm::client_config& cfg);
  ~fleet() override;
  fleet(const fleet&) = delete;
  fleet& operator=(const fleet&) = delete;

  /// See `keel::llm::fleet_pacing::acquire`: the fleet's bucket of the entry (if it has a
  /// configured limit). @throws what the Redis client throws when Redis cannot be reached.
  boost::asio::awaitable<void> acquire(const keel::llm::entry_config& entry,
                                       double tokens) override;
  /// This process's share of the limit while Redis cannot be reached.
  boost::asio::awaitable<void> acquire_local(const keel::llm::entry_config& entry,
                                             double tokens) override;
  /// Pauses the fleet's bucket (detached).
  void on_server_delay(const keel::llm::entry_config& entry,
                       std::chrono::nanoseconds delay) override;
  /// Shares what `pacing` learned for an entry with no configured limit (keel/redis/
  /// shared_rate.hpp): reports its estimate, adopts the fleet's share, and leads or follows the
  /// fleet's probes; syncs at most every `shared.rate_sync` (detached) and applies each answer
  /// at the next call. With Redis unreachable, `pacing` keeps to its share and probes no more.
  void sync_pacing(const keel::llm::entry_config& entry, keel::rate_controller& pacing) override;
  /// Brings the fleet's breaker state into `breaker`; syncs at most every 250 ms (detached).
  void sync_breaker(const keel::llm::entry_config& entry, keel::circuit_breaker& breaker) override;
  /// Counts an outcome for the next sync.
  void on_breaker_outcome(const keel::llm::entry_config& entry, bool failure) override;
  /// Publishes this process's breaker opening or closing (detached).
  void on_breaker_change(const keel::llm::entry_config& entry, keel::breaker_state from,
                         keel::breaker_state to, std::chrono::nanoseconds open_for) override;
  /// Leaves the fleet and closes the Redis connection: for every learned rate this process
  /// joined (unless its last sync failed) one last sync says it is gone, so that its share and
  /// any lead it held pass to the others at once rather than after its window (up to a minute
  /// at a low rate); then the connection closes. Detached (each step bounded by the connection's
  /// `command_timeout`); the io_context's `run()` returns once it is done. Commands in flight
  /// when the connection closes fail; later ones connect again. Calling it again does nothing.
  void close() override;

 private:
  std::unique_ptr<class fleet_impl> impl_;
};

}  // namespace keel::redis
