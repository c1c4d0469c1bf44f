// keel::redis::shared_breaker: one circuit breaker's state in Redis, shared by every process of
// a fleet that calls the same provider with the same key, with one fleet-wide half-open probe.
#pragma once

// Overview
// --------
// A provider outage seen by one replica should protect the others (issue 16, item 3). Each
// process keeps its own `keel::circuit_breaker` (no Redis round trip per call); this class keeps
// the fleet's copy in a Redis hash and is what a process synchronises with:
//
//     closed:    `failures` counts the fleet's failures since its last success (reported in
//                batches); at `failure_threshold` the fleet opens for `break_duration`
//     open:      until `open_until` (the server's clock) every process keeps its breaker open
//     probing:   once the break is over, the first process to `sync` gets the probe (`probe`);
//                every other is told another process is probing (`probing`), for at most
//                `probe_timeout` more. The probe's success
//                (`closed`) closes the fleet; its failure (`opened`) opens it again; a probe
//                holder that says nothing within `probe_timeout` loses it to the next process
//
// Round trips: `sync` reports the outcomes a process saw since its last sync (failures since its
// last success, and whether there was a success) and answers the fleet's state in one script
// call; a caller syncs at most every `sync_interval` (e.g. 250 ms) while it is making calls, plus
// one call per local state change (`opened`, `closed`). A process that opens on its own failures
// publishes it at once; the others learn it at their next sync.
//
// Decisions:
// - Consecutive failures, fleet-wide, as the `keel` command's local breakers count them: a
//   batch with a success resets the count to the failures after that success; without one, it
//   adds them. Interleaved reports of several processes make this approximate (a success of one
//   process resets failures another reported a moment before), which errs on staying closed.
// - The fleet's break is the one the opener asked for (its own grown break, when a probe
//   failed); a later, longer one wins, a shorter one never cuts it.
// - The server's clock (`TIME`) decides; answers carry durations, which a process adds to its
//   own clock (off by one round trip at most).
//
// Cancellation and errors: as `client::command`. A caller that cannot reach Redis goes on with
// its own breaker alone.
//
// Thread safety: not thread-safe; one executor (the Redis client's).

#include <keel/redis/client.hpp>

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace keel::redis {

/// A shared breaker's key and rule.
struct breaker_options {
  /// The Redis key of the breaker's hash (namespace it per provider, model and key).
  std::string key;
  /// Failures since the fleet's last success that open it.
  std::size_t failure_threshold = 5;
  /// How long the fleet stays open when `failure_threshold` opens it.
  std::chrono::milliseconds break_duration{std::chrono::seconds(60)};
  /// How long a probe may take before another process may probe instead.
  std::chrono::milliseconds probe_timeout{std::chrono::seconds(30)};
  /// How long an unused breaker is kept.
  std::chrono::milliseconds idle_ttl{std::chrono::minutes(10)};
};

/// The fleet's breaker as one process sees it.
struct breaker_view {
  /// What the process should do.
  enum class state {
    /// Calls run.
    closed,
    /// Calls are rejected for `remaining` (the break, or another process's probe).
    open,
    /// This process holds the fleet's one probe: its next call runs as the probe.
    probe,
    /// Another process holds the probe: calls are rejected; look again soon (`remaining` is
    /// the probe's timeout).
    probing,
  };
  /// What the process should do.
  state what = state::closed;
  /// While open: how long until the next look (the break's end, or the probe's timeout).
  std::chrono::milliseconds remaining{0};
  /// Bumped on every opening and closing of the fleet's breaker.
  std::uint64_t epoch = 0;
  /// Names the breaker's hash: a new one (expired, or Redis restarted empty) starts its epochs
  /// again, so epochs compare only within one incarnation.
  std::string incarnation;
};

/// One circuit breaker's state in Redis, shared by every process on the same key.
class shared_breaker {
 public:
  /// The breaker `options.key` reached through `redis` (which must outlive this object), for one
  /// process (named at random: `member()`).
  shared_breaker(client& redis, breaker_options options);

  /// Reports this process's outcomes since its last sync and reads the fleet's state; claims
  /// the fleet's probe for this process when the break is over and nobody holds it.
  /// @param failures failures after the last success of the batch (all of them, without one).
  /// @param had_success whether the batch held a success.
  /// @param now_ms_for_tests the time to use instead of the server's (tests only).
  /// @throws what `client::command` throws.
  /// Cancellation: as `client::command`.
  boost::asio::awaitable<breaker_view> sync(std::size_t failures, bool had_success,
                                            std::optional<long long> now_ms_for_tests = {});

  /// This process's breaker opened (its own failures, or its probe failed): the fleet opens for
  /// `break_duration` from now unless it is open longer already; a probe this process held is
  /// released.
  /// @throws what `client::command` throws.
  /// Cancellation: as `client::command`.
  boost::asio::awaitable<breaker_view> opened(std::chrono::milliseconds break_duration,
                                              std::optional<long long> now_ms_for_tests = {});

  /// This process's breaker closed after a successful probe: the fleet closes and its failure
  /// count starts again.
  /// @throws what `client::command` throws.
  /// Cancellation: as `client::command`.
  boost::asio::awaitable<breaker_view> closed(std::optional<long long> now_ms_for_tests = {});

  /// The options.
  const breaker_options& options() const noexcept { return options_; }
  /// This process's name in the breaker (16 random hex digits).
  const std::string& member() const noexcept { return member_; }

 private:
  boost::asio::awaitable<breaker_view> run(const char* mode, std::optional<long long> now,
                                           std::string a, std::string b);
  client& redis_;
  breaker_options options_;
  std::string member_;
  std::string sha_;
};

}  // namespace keel::redis
