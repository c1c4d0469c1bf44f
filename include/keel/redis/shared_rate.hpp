// keel::redis::shared_rate: one learned rate in Redis for every process of a fleet that calls the
// same server with the same key, learned by one of them (the leader) and followed by the others.
#pragma once

// Overview
// --------
// With no configured limit, each process of a fleet learns the server's limit from its 429s
// (keel/rate_controller.hpp). Learning alone, several processes on one key collide: each probes
// above its share at its own random time, the others draw that probe's 429s and cut, and the
// shares walk. Measured against nginx (4 processes x 64 calls, 200 r/s, docs/BENCHMARKS.md) they
// needed 1.25-1.53 attempts per prompt and failed 16 of 4,000 prompts in one run. This is what
// they share instead, in one Redis hash per (provider, model, key) and one script call per
// process per sync (`shared.rate_sync`, 100 ms):
//
//     the limit:  each process still measures its own share (what the server accepted from it
//                 between its rejections). When a process reports a new measurement, the fleet's
//                 limit becomes the sum of the latest estimates of the active processes (those
//                 that synced within `member_window`), scaled by active / reporting processes
//                 when some have no estimate yet (they were sending too), and every process paces
//                 at limit / active (`basic_rate_controller::adopt_share`). Shares become equal,
//                 and a process that leaves gives its share to the others at once (the limit
//                 stays; the count falls).
//     probes:     one process, the leader (a lease of `member_window`, renewed by each sync
//                 while its calls wait for its pacing), probes as it would alone and publishes its
//                 probe's gain; the others raise their rates by that gain at the same time
//                 (`follow_probes`), so the fleet probes as one client. A follower that draws a
//                 429 while it follows a probe says so, and the leader ends the probe
//                 (`end_probe`): the fleet crossed the limit, though the leader, sending a
//                 quarter of the calls, may not have drawn a 429 of its own yet.
//     takeover:   a leader that stops syncing (it finished, stopped calling, or died), or whose
//                 calls no longer wait for its pacing (its probes would not grow), loses the
//                 lead; the next process to sync whose calls wait takes it.
//     pauses:     the controller's block pauses (rejections with nothing accepted for a while: a
//                 quota window exhausted) are shared: each sync reports how long this process's
//                 bucket is paused, the script keeps the latest end, and every process pauses
//                 until then.
//
// Measured in virtual time (tests/pacing_sim.hpp, 4 processes x 64 calls x 1,000 prompts, a
// 200 r/s limiter with burst 20): 1.005-1.038x the ideal wall and 1.04-1.07 attempts per prompt
// over 8 seeds, against 1.10-2.17x and 1.05-1.12 learning alone (more in
// docs/core/rate_controller.md, where it is not better). Against nginx `limit_req`
// (docs/BENCHMARKS.md), with stricter noise trials in a fleet: 20.1-21.0 s for the 20 s job in 8
// of 8 runs, 0 failed, 1.034-1.057 attempts per prompt (one earlier run: 1.14); with Redis killed
// for 5 s, 20.4-20.6 s and 1.035-1.038.
//
// Decisions:
// - Sharing estimates and the probe clock, not one fleet-wide bucket: the estimator needs this
//   process's sends and rejections, which only it sees in time, and pacing locally needs no
//   round trip per call. (A configured limit is shared through `shared_quota` instead.)
// - Equal shares: a fleet whose processes want very different rates (a batch and a sporadic
//   service on one key) leaves the share of a process with less demand unused until the
//   leader's probes find room (for every process alike).
// - The server's clock (`TIME`) decides who is active and who leads. A process syncs at its
//   calls, so one paced at a low rate names a longer window (`rate_report::window`: three calls'
//   time in keel::redis::fleet) and keeps its place and lead between calls seconds apart.
//
// Cancellation and errors: as `client::command`. A process that cannot reach Redis keeps to
// the share it had (keel::redis::fleet: `follow_probes(0)`; its own 429s still cut it) and
// probes no more until Redis answers again.
//
// Thread safety: not thread-safe; one executor (the Redis client's).

#include <keel/redis/client.hpp>

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstddef>
#include <optional>
#include <string>

namespace keel::redis {

/// A shared learned rate's key and timing.
struct rate_options {
  /// The Redis key of its hash (namespace it per provider, model and key); `<key>:members` and
  /// `<key>:estimates` hold the active processes and their estimates.
  std::string key;
  /// A process is active (counts in the share, may hold the lead) while it synced within this
  /// (or within the longer `rate_report::window` it named).
  std::chrono::milliseconds member_window{std::chrono::seconds(1)};
  /// How long an unused rate is kept (a fleet started again within it begins at its share).
  std::chrono::milliseconds idle_ttl{std::chrono::minutes(10)};
};

/// What one process tells the fleet at a sync.
struct rate_report {
  /// This process makes calls: it is active. A process that stopped calling leaves (its
  /// estimate no longer counts; a lead it held is given up).
  bool active = true;
  /// Its calls wait for its pacing (it wants more than its share): only such a process takes
  /// the lead, and a leader without it gives the lead up (its probes would not grow: a probe
  /// grows only while calls wait).
  bool wants_lead = true;
  /// Its estimate of its share of the limit, requests per second (0: none yet).
  double estimate = 0;
  /// `estimate` is a new measurement of its own (the fleet's limit is summed again).
  bool new_sample = false;
  /// As leader: the gain of its probe now (0: not probing).
  double gain = 0;
  /// As follower: it drew a 429 while it followed a probe since its last sync.
  bool probe_hit = false;
  /// How long its bucket stays paused from now (0: not paused).
  std::chrono::milliseconds pause{0};
  /// How long it stays active (and keeps a lead it holds) without syncing again, if longer than
  /// `rate_options::member_window`: a process paced at a low rate syncs at its calls only, so it
  /// names how far apart they may be.
  std::chrono::milliseconds window{0};
};

/// The fleet's learned rate as one process sees it.
struct rate_view {
  /// This process leads (probes for the fleet).
  bool leader = false;
  /// This process's share of the fleet's limit, requests per second (0: no limit learned yet).
  double share = 0;
  /// The fleet's limit, requests per second (0: none yet).
  double limit = 0;
  /// Active processes, this one included.
  std::size_t members = 0;
  /// As follower: the gain of the leader's probe (0: not probing).
  double gain = 0;
  /// As leader: a follower drew a 429 in this leader's probe (end it).
  bool probe_hit = false;
  /// How long the fleet stays paused from now (0: not paused).
  std::chrono::milliseconds pause{0};
};

/// One learned rate in Redis shared by every process on the same key, with one leader.
class shared_rate {
 public:
  /// The rate `options.key` reached through `redis` (which must outlive this object), for one
  /// process (named at random: `member()`).
  shared_rate(client& redis, rate_options options);

  /// Tells the fleet what this process knows and reads what the fleet knows, in one script
  /// call: renews or takes the lead (or gives it up when `mine.active` is false), records the
  /// estimate, sums the limit again after a new sample, publishes the leader's gain or a
  /// follower's hit, keeps the latest pause.
  /// @param now_ms_for_tests the time to use instead of the server's (tests only).
  /// @throws what `client::command` throws; std::runtime_error if the script answers oddly.
  /// Cancellation: as `client::command`.
  boost::asio::awaitable<rate_view> sync(const rate_report& mine,
                                         std::optional<long long> now_ms_for_tests = {});

  /// The options.
  const rate_options& options() const noexcept { return options_; }
  /// This process's name in the fleet (16 random hex digits).
  const std::string& member() const noexcept { return member_; }

 private:
  client& redis_;
  rate_options options_;
  std::string member_;
  std::string sha_;
};

}  // namespace keel::redis
