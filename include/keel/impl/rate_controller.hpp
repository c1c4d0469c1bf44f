// Implementation of keel::basic_rate_controller: the rejection log, the per-dimension phases and
// how they are applied to the throttler.
#pragma once

#include <keel/rate_controller.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <mutex>
#include <random>
#include <utility>

namespace keel {

inline const char* to_string(pacing_phase p) noexcept {
  switch (p) {
    case pacing_phase::unlimited:
      return "unlimited";
    case pacing_phase::startup:
      return "startup";
    case pacing_phase::search:
      return "search";
    case pacing_phase::cruise:
      return "cruise";
    case pacing_phase::probe:
      return "probe";
    case pacing_phase::fixed:
      return "fixed";
  }
  return "unknown";
}

}  // namespace keel

namespace keel::detail {

inline double pacing_non_negative(double x) noexcept {
  return x > 0 && std::isfinite(x) ? x : 0;
}

template <class Clock>
class rate_controller_state {
 public:
  using time_point = typename Clock::time_point;
  using duration = typename Clock::duration;
  using ticket = typename basic_rate_controller<Clock>::ticket;

  static constexpr std::size_t req = 0;
  static constexpr std::size_t tok = 1;

  // Rejections kept for estimates (by send time), and the longest span of one estimate: an
  // estimate follows the last two seconds, so a limit that changes is re-measured.
  static constexpr auto log_span = std::chrono::seconds(4);
  static constexpr auto sample_window = std::chrono::seconds(2);
  static constexpr std::size_t max_log = 1 << 16;
  // Send-time bins for the accepted rate of the last second.
  static constexpr auto bin_width = std::chrono::milliseconds(50);
  static constexpr std::size_t bin_count = 240;      // 12 s: a trial looks up to 3 s back, 8 s on
  static constexpr std::int64_t accepted_bins = 20;  // one second
  // The probe gain stops doubling after this many rounds (probe_step x 1023).
  static constexpr int max_probe_round = 10;
  // In startup, answers slower than this free their slot (see free_startup_slot).
  static constexpr auto slot_hold = std::chrono::milliseconds(10);
  // The startup window's cap, calls: more than any batch sends at once.
  static constexpr double max_window = 1e9;
  // How long a 429's latency is remembered: the longest one halves every `latency_half_life`,
  // and the spread of 429 latencies counts those of the last `spread_memory` only. A startup
  // wave whose 429s waited for new connections (100-200 ms on a slow client, against 2 ms once
  // they are open) must not make every later sample look too short to trust.
  static constexpr auto latency_half_life = std::chrono::seconds(1);
  static constexpr auto spread_memory = std::chrono::seconds(1);
  // Rate-independent refusals (see `start_trial`): a trial compares the second (up to
  // `trial_back`) before its 429 with the latest `trial_window` from `trial_half` after it, and
  // ends without a verdict after `trial_max`.
  static constexpr auto trial_half = std::chrono::milliseconds(500);
  static constexpr auto trial_window = std::chrono::seconds(2);
  static constexpr auto trial_back = std::chrono::seconds(3);
  static constexpr auto trial_max = std::chrono::seconds(8);
  static constexpr double trial_calls = 30;  // calls each window needs (and 0.4 s)
  // The shortest gap between events that can be a stall (see update()).
  static constexpr auto stall_min = std::chrono::milliseconds(20);
  // An estimate may not exceed this many times what the server accepted over the last second
  // (see `adopt`).
  static constexpr double max_estimate_gain = 2;

  rate_controller_state(basic_throttler<Clock>& bucket, const rate_controller_options& o)
      : bucket_(bucket), o_(normalized(o)), epoch_(Clock::now()) {
    if (o_.random == nullptr) {
      own_random_ = std::make_unique<random_source>(std::random_device{}());
      o_.random = own_random_.get();
    }
    dims_[req].configured = o_.max_requests_per_second;
    dims_[tok].configured = o_.max_tokens_per_minute / 60;
    for (auto& d : dims_) {
      d.ceiling = d.configured;
      d.last_update = epoch_;
    }
    const throttler_options current = bucket_.options();
    if (dims_[req].configured > 0) {
      dims_[req].phase = pacing_phase::fixed;
      dims_[req].rate = dims_[req].configured;
      // A caller who configured the bucket at this rate chose its burst too: keep it.
      keep_request_burst_ = current.requests_per_second == dims_[req].configured;
    } else {
      dims_[req].phase = pacing_phase::startup;
      window_ = o_.initial_window;
      window_updated_ = epoch_;
      window_growth_ = window_ * std::log(2.0) / startup_tau();
    }
    if (dims_[tok].configured > 0) {
      dims_[tok].phase = pacing_phase::fixed;
      dims_[tok].rate = dims_[tok].configured;
      keep_token_burst_ = current.tokens_per_minute == o_.max_tokens_per_minute;
    }
    apply();
  }

  ticket on_send(throttle_cost cost) {
    ticket t;
    locked([&] { t = send(cost); });
    return t;
  }

  void on_accepted(const ticket& t) {
    locked([&] { accepted(t); });
  }

  void on_abandoned(const ticket& t) {
    locked([&] { abandoned(t); });
  }

  void on_throttled(const ticket& t, limit_kind kind, std::optional<duration> hint) {
    locked([&] { throttled(t, kind, hint); });
  }

  void on_advertised(std::optional<double> rpm, std::optional<double> tpm) {
    locked([&] { advertised(rpm, tpm); });
  }

  void on_follow_probes(double gain) {
    locked([&] {
      probe_follower_ = true;
      in_fleet_ = true;
      followed_gain_ = std::isfinite(gain) ? std::max(0.0, gain) : 0.0;
      update(Clock::now());
    });
  }

  void on_adopt_share(double rps) {
    locked([&] {
      dim& d = dims_[req];
      in_fleet_ = true;
      if (rps > 0 && std::isfinite(rps)) {
        fleet_share_ = rps;
      }
      if (!(rps > 0) || !std::isfinite(rps) || d.reacting || d.ceiling > 0 ||
          d.phase == pacing_phase::fixed || d.phase == pacing_phase::unlimited) {
        return;
      }
      const time_point now = Clock::now();
      const bool learning = d.phase == pacing_phase::startup || d.phase == pacing_phase::search;
      if (!learning && d.estimate == rps) {
        return;  // the share it has
      }
      if (learning) {
        d.phase = pacing_phase::cruise;
        start_plateau(d, now);
      }
      if (rps < d.estimate) {
        // As after a cut of its own (adopt()): the noise filter judges what is refused after
        // sends at the higher rate have settled.
        d.wave_end = std::max(d.wave_end, saturating_add(now, settle_time()));
      }
      d.estimate = rps;
      d.adopted_at = now;
      if (d.phase == pacing_phase::cruise) {
        d.rate = base_rate(req);
      }
      update(now);
    });
  }

  void on_end_probe() {
    locked([&] {
      dim& d = dims_[req];
      if (d.phase != pacing_phase::probe) {
        return;
      }
      const time_point now = Clock::now();
      back_to_plateau(d, now);
      update(now);
    });
  }

  void on_lead() {
    locked([&] {
      in_fleet_ = true;
      if (!probe_follower_) {
        return;
      }
      probe_follower_ = false;
      followed_gain_ = 0;
      const time_point now = Clock::now();
      dim& d = dims_[req];
      if (d.phase == pacing_phase::probe || d.phase == pacing_phase::cruise) {
        back_to_plateau(d, now);  // the leader's probe is over for this one; its own plateau
      }
      update(now);
    });
  }

  pacing_state snapshot(std::size_t di) const {
    std::lock_guard lock{mutex_};
    return snapshot_locked(di);
  }

  basic_throttler<Clock>& bucket() const noexcept { return bucket_; }

 private:
  // Runs `f` under the lock, then tells `on_change` (outside the lock) if a dimension's phase or
  // estimate changed.
  template <class F>
  void locked(F f) {
    bool notify = false;
    pacing_state r;
    pacing_state t;
    {
      std::lock_guard lock{mutex_};
      f();
      r = snapshot_locked(req);
      t = snapshot_locked(tok);
      if (r.phase != told_[req].phase || r.estimate != told_[req].estimate ||
          r.noise != told_[req].noise || t.phase != told_[tok].phase ||
          t.estimate != told_[tok].estimate || t.noise != told_[tok].noise) {
        told_[req] = r;
        told_[tok] = t;
        notify = static_cast<bool>(o_.on_change);
      }
    }
    if (notify) {
      o_.on_change(r, t);
    }
  }

  ticket send(throttle_cost cost) {
    const time_point now = Clock::now();
    ticket t;
    t.seq = ++seq_;
    t.sent = now;
    t.tokens = pacing_non_negative(cost.tokens);
    t.tokens_before = tokens_sent_;
    tokens_sent_ += t.tokens;
    max_token_cost_ = std::max(max_token_cost_, t.tokens);
    bin& b = bin_at(now);
    b.sent[req] += 1;
    b.sent[tok] += t.tokens;
    const std::uint64_t waits = bucket_.total_waits();
    if (bucket_.waiters() > 0 || waits != send_waits_seen_) {
      b.queued += 1;
    }
    send_waits_seen_ = waits;
    if (dims_[req].phase == pacing_phase::startup) {
      startup_sends_ = t.seq;
    }
    young_.push_back(young_send{t.seq, t.sent, t.tokens, false});
    update(now);
    return t;
  }

  void accepted(const ticket& t) {
    const time_point now = Clock::now();
    note_answer(t, now);
    resolve(t.seq);
    free_startup_slot(t, now);
    update(now);
  }

  void abandoned(const ticket& t) {
    const time_point now = Clock::now();
    resolve(t.seq);
    free_startup_slot(t, now);
    update(now);
  }

  void throttled(const ticket& t, limit_kind kind, std::optional<duration> hint) {
    const time_point now = Clock::now();
    note_answer(t, now);
    if (t.seq != 0) {
      const std::size_t di = kind == limit_kind::tokens ? tok : req;
      if (di == req && dims_[req].phase == pacing_phase::startup) {
        // What got through before the first 429 bounds the server's burst (plus what it
        // refilled meanwhile): the client's own bursts must stay well below it.
        server_burst_ = static_cast<double>(t.seq - 1);
      } else if (di == req && dims_[req].why == cause::startup && dims_[req].reacting) {
        server_burst_ = std::min(server_burst_, static_cast<double>(t.seq - 1));
      }
      resolve(t.seq);
      count_refused(t);
      note_reject_latency(t, now);
      if (!only_noise(di, t.sent, now)) {
        if (!dims_[di].trial) {
          start_trial(di, now);
        }
        log_rejection(t, di);
        react(di, now, hint);
        on_rejection(di, t);
      }
    }
    update(now);
  }

  void advertised(std::optional<double> rpm, std::optional<double> tpm) {
    bool changed = false;
    if (rpm && pacing_non_negative(*rpm) > 0) {
      changed |= advertise(req, *rpm / 60);
    }
    if (tpm && pacing_non_negative(*tpm) > 0) {
      changed |= advertise(tok, *tpm / 60);
    }
    if (changed) {
      update(Clock::now());
    }
  }

  pacing_state snapshot_locked(std::size_t di) const {
    const dim& d = dims_[di];
    pacing_state s;
    s.phase = d.phase;
    s.rate = d.phase == pacing_phase::startup ? 0 : d.rate;
    s.estimate = d.estimate;
    s.window = di == req && d.phase == pacing_phase::startup ? window_ : 0;
    s.samples = d.samples;
    s.rejections = d.rejections;
    s.noise = d.noise;
    if (d.phase == pacing_phase::probe && base_rate(di) > 0) {
      s.gain = std::max(0.0, d.rate / base_rate(di) - 1);
    }
    return s;
  }

  // What the client was doing when an episode's first rejection came.
  enum class cause { startup, plateau, probe, search, fixed };

  struct rejection {
    std::uint64_t seq;
    time_point sent;
    double tokens;
    double tokens_before;
    std::size_t dim;
  };

  struct dim {
    pacing_phase phase = pacing_phase::unlimited;
    double rate = 0;        // paced rate per second (0: not limited)
    double estimate = 0;    // the server's limit per second (0: unknown)
    double configured = 0;  // configured ceiling per second
    double advertised = 0;  // advertised limit per second
    double ceiling = 0;     // min of the two (0: none)
    std::uint64_t samples = 0;
    std::uint64_t rejections = 0;
    // Reactions on arrival.
    bool reacting = false;  // a rejection arrived and its episode has not ended yet
    cause why = cause::plateau;
    time_point last_arrival{};  // the latest rejection's arrival
    time_point block_until{};   // the longest Retry-After of the episode
    time_point last_halving{};  // search
    double episode_best = 0;    // accepted work of the episode's adopted sample
    double episode_floor = 0;   // lowest estimate the episode's under-measured samples may set
    time_point adopted_at{};    // when the estimate was last set
    // Refusals that do not depend on the rate (see `start_trial`).
    double noise = 0;            // the share refused that a lower rate did not reduce
    time_point noise_updated{};  // when `noise` last followed the refused share
    bool trial = false;          // a cut is being tried
    time_point trial_at{};       // the 429 that started it
    duration trial_back{};       // how far its first window reaches back
    time_point wave_end{};       // sends before it belong to the latest episode's wave
    time_point trial_next{};     // when to look at it next
    pacing_phase trial_phase{};  // the phase, rate and estimate before it
    double trial_rate = 0;
    double trial_estimate = 0;
    double trial_share = 0;  // the fleet's share when it began (0: none)
    // The episode.
    bool in_episode = false;
    rejection first{};
    rejection latest{};
    rejection previous{};  // the last rejection of the previous episode
    cause previous_why = cause::startup;
    // Phase clocks.
    time_point last_growth{};
    time_point plateau_until{};
    duration probe_elapsed{};
    time_point last_update{};
  };

  // A send whose 429 could still be on its way.
  struct young_send {
    std::uint64_t seq;
    time_point sent;
    double tokens;
    bool resolved;  // an answer (or a 429) came back
  };

  struct bin {
    std::int64_t index = -1;
    double sent[2] = {0, 0};
    double rejected[2] = {0, 0};
    double queued = 0;  // requests sent while other calls waited for the bucket
  };

  // Work accepted between two logged rejections (by send time) and their span.
  struct pair_sample {
    double accepted = 0;
    double sent = 0;      // work sent between the two (rejected or not)
    double rejected = 0;  // of which rejected so far
    double span = 0;      // seconds; 0: no sample
    double rate() const noexcept { return span > 0 ? accepted / span : 0; }
  };

  using log_iterator = typename std::deque<rejection>::const_iterator;

  static rate_controller_options normalized(rate_controller_options o) {
    o.max_requests_per_second = pacing_non_negative(o.max_requests_per_second);
    o.max_tokens_per_minute = pacing_non_negative(o.max_tokens_per_minute);
    o.initial_window = std::max(1.0, pacing_non_negative(o.initial_window));
    o.margin = std::clamp(pacing_non_negative(o.margin), 0.0, 0.5);
    o.min_sample = std::max(1.0, pacing_non_negative(o.min_sample));
    o.probe_step = std::clamp(pacing_non_negative(o.probe_step), 1e-4, 1.0);
    o.min_requests_per_second = std::max(1e-6, pacing_non_negative(o.min_requests_per_second));
    o.plateau_max = std::max(o.plateau_max, o.plateau_min);
    o.search_doubling = std::max(o.search_doubling, std::chrono::nanoseconds(1000000));
    o.startup_doubling = std::max(o.startup_doubling, std::chrono::nanoseconds(1000000));
    o.probe_round = std::max(o.probe_round, std::chrono::nanoseconds(1000000));
    return o;
  }

  static double seconds(std::chrono::nanoseconds d) noexcept {
    return std::chrono::duration<double>(d).count();
  }

  template <class Rep, class Period>
  static duration to_duration(std::chrono::duration<Rep, Period> d) noexcept {
    return std::chrono::duration_cast<duration>(d);
  }

  // ---- rates ----

  double mean_token_cost() const noexcept {
    return seq_ > 0 ? std::max(1.0, tokens_sent_ / static_cast<double>(seq_)) : 1.0;
  }

  double min_rate(std::size_t di) const noexcept {
    // Tokens: one typical call's tokens at the minimum request rate.
    return di == req ? o_.min_requests_per_second : o_.min_requests_per_second * mean_token_cost();
  }

  double clamp_rate(std::size_t di, double r) const noexcept {
    const dim& d = dims_[di];
    r = std::max(r, min_rate(di));
    return d.ceiling > 0 ? std::min(r, d.ceiling) : r;
  }

  // The rate of a cruise plateau.
  double base_rate(std::size_t di) const noexcept {
    const dim& d = dims_[di];
    if (d.estimate <= 0) {
      return clamp_rate(di, d.rate);
    }
    // An advertised limit is exact: no margin below it.
    if (d.advertised > 0 && d.estimate >= d.advertised) {
      return clamp_rate(di, d.advertised);
    }
    return clamp_rate(di, (1 - o_.margin) * d.estimate);
  }

  // ---- send-time bins ----

  std::int64_t bin_index(time_point t) const {
    const auto since = t - epoch_;
    return since.count() <= 0 ? 0 : static_cast<std::int64_t>(since / to_duration(bin_width));
  }

  bin& bin_at(time_point t) {
    const std::int64_t i = bin_index(t);
    bin& b = bins_[static_cast<std::size_t>(i % static_cast<std::int64_t>(bin_count))];
    if (b.index != i) {
      b = bin{};
      b.index = i;
    }
    return b;
  }

  // Work sent over the last second and not rejected, per second.
  double accepted_rate(std::size_t di, time_point now) const {
    const std::int64_t cur = bin_index(now);
    double sum = 0;
    for (const bin& b : bins_) {
      if (b.index >= 0 && b.index > cur - accepted_bins && b.index <= cur) {
        sum += b.sent[di] - b.rejected[di];
      }
    }
    return std::max(0.0, sum);
  }

  // ---- refusals that do not depend on the rate ----
  //
  // A server may refuse a share of calls whatever the rate: a shared pool that is busy with
  // other tenants, a flaky proxy, keel's mock with a `rate_limit` fault. Each such 429 looks like
  // a limit crossed, and the estimators above take the client's own accepted rate for the
  // limit; 429s that keep coming at the same share ratchet it down (5% random 429s and no limit
  // at all took the estimate from 210 r/s to 55 r/s within 4 s, and a batch from thousands of
  // items per second to 26). The difference is an experiment the cut already makes: a
  // token-bucket limiter refuses next to nothing once the client sends clearly below what it
  // accepted, while random refusals keep their share at any rate. So every 429 that starts a
  // reaction (with no trial running) starts a *trial* (`check_trial` has the verdict's rules);
  // a noise verdict undoes the trial's cut (`undo_trial`), and the first one sets the
  // dimension's *noise*. Later 429s within the noise are counted, not reacted to
  // (`only_noise`). The noise fades when the refusals do (`decay_noise`) and never rises after
  // the first verdict: a client slightly above a real limit also sees a small steady share,
  // and learning it as noise would let the client drift above the limit.

  struct counts {
    double sent = 0;
    double rejected = 0;
    double span = 0;  // seconds covered by the bins counted
  };

  // Work sent and refused, by send time, in the bins that overlap [from, to) (clipped to the
  // controller's epoch and to `now`).
  counts window(std::size_t di, time_point from, time_point to, time_point now) const {
    return count_bins(di, from, to, now, false);
  }

  // The same over the whole bins of [from, to) whose requests mostly went while other calls
  // waited for the bucket: what the client sent when the pace held it back, not when it ran
  // out of work (the last second of a batch).
  counts paced_window(std::size_t di, time_point from, time_point to, time_point now) const {
    return count_bins(di, from, to, now, true);
  }

  counts count_bins(std::size_t di, time_point from, time_point to, time_point now,
                    bool paced_only) const {
    counts c;
    from = std::max(from, epoch_);
    to = std::min(to, now);
    if (to <= from) {
      return c;
    }
    const duration w = to_duration(bin_width);
    const std::int64_t lo = (from - epoch_) / w;
    // Paced-only windows count whole bins (the current one is still filling).
    const std::int64_t hi = paced_only ? (to - epoch_) / w : (to - epoch_ + w - duration(1)) / w;
    for (const bin& b : bins_) {
      if (b.index < lo || b.index >= hi) {
        continue;
      }
      if (paced_only && (b.sent[req] <= 0 || b.queued < 0.5 * b.sent[req])) {
        continue;
      }
      c.sent += b.sent[di];
      c.rejected += b.rejected[di];
      if (paced_only) {
        c.span += seconds(w);
      }
    }
    if (!paced_only) {
      const time_point end = std::min(epoch_ + w * hi, now);
      c.span = std::max(0.0, seconds(end - (epoch_ + w * lo)));
    }
    return c;
  }

  // How many calls of `n` the noise may refuse: its share plus the margin, half the noise, or
  // three standard deviations and three calls (a few dozen calls after a cut see clusters of
  // random 429s that a normal approximation calls a limit: 4 of 15 at 5%).
  double noise_bound(std::size_t di, double n) const {
    const double p = dims_[di].noise;
    return std::max({n * (p + o_.margin), n * p * 1.5, n * p + 3 * std::sqrt(n * p * (1 - p)) + 3});
  }

  // True if the 429 just counted for a send at `sent` leaves the share refused within the noise:
  // over the last second, but not before the latest episode's wave or the latest cut (the
  // refusals of a crossing are the reason for a cut already made, and would make every later
  // random 429 look like a limit for a second: after each probe's crossing they walked the
  // estimate from 203 to 155 r/s against nginx at 200 r/s with 5% random 429s). A 429 for a send
  // before that is never noise: the episode measures the limit with it.
  bool only_noise(std::size_t di, time_point sent, time_point now) const {
    const dim& d = dims_[di];
    if (d.noise <= 0 || sent < d.wave_end) {
      return false;
    }
    const counts c =
        window(di, std::max(now - to_duration(std::chrono::seconds(1)), d.wave_end), now, now);
    const double unit = unit_of(di);
    return c.rejected / unit <= noise_bound(di, c.sent / unit);
  }

  // Starts a trial at a 429 if the second before it (or up to `trial_back` at a low rate) sent
  // enough to compare with; if not, the next 429 tries again. Only in cruise, probe or fixed,
  // not before a first estimate (startup, search, unlimited): such a window holds the server's
  // burst, accepted at many times its limit (at 50 r/s with burst 20, 90 r/s over the first half
  // second), and a later window at the limit would look like noise beside it.
  void start_trial(std::size_t di, time_point now) {
    dim& d = dims_[di];
    if (d.phase != pacing_phase::cruise && d.phase != pacing_phase::probe &&
        d.phase != pacing_phase::fixed) {
      return;
    }
    const double unit = unit_of(di);
    for (auto back = to_duration(std::chrono::seconds(1));;
         back += to_duration(std::chrono::seconds(1))) {
      const counts c = window(di, now - back, now, now);
      if (c.sent >= trial_calls * unit && c.span >= 0.4) {
        d.trial_back = back;
        break;
      }
      if (back >= to_duration(trial_back)) {
        return;
      }
    }
    d.trial = true;
    d.trial_at = now;
    d.trial_next = saturating_add(now, settle_time() + to_duration(std::chrono::milliseconds(1)));
    d.trial_phase = d.phase;
    d.trial_rate = d.rate;
    d.trial_estimate = d.estimate;
    d.trial_share = fleet_share_;
  }

  // Looks at a running trial (every 50 ms once its two halves have been sent): see above.
  void check_trial(std::size_t di, time_point now) {
    dim& d = dims_[di];
    if (!d.trial || now < d.trial_next) {
      return;
    }
    d.trial_next = saturating_add(now, to_duration(std::chrono::milliseconds(50)));
    if (now - d.trial_at >= to_duration(trial_max)) {
      d.trial = false;  // no verdict: the refusals stopped, or the rate never fell
      return;
    }
    const duration settle = settle_time();
    // Before: the second up to the 429 and the sends whose 429s it heralded.
    const counts before = window(di, d.trial_at - d.trial_back, d.trial_at + settle, now);
    const double unit = unit_of(di);
    const time_point half = d.trial_at + to_duration(trial_half);
    if (now < half + to_duration(trial_half) + settle) {
      d.trial_next = half + to_duration(trial_half) + settle;
      return;
    }
    // After: the latest `trial_window`, so that a rate that keeps falling under refusals that
    // keep their share (each random 429 cutting a little: at 30 r/s and 5% one a second) is
    // compared at its lowest, not averaged since the trial began; and only its bins where the
    // pace held calls back: a batch that runs out of work sends less too (its last second
    // passed for noise against a probe above the limit, and left the estimate 40% above it).
    const counts after = paced_window(di, std::max(half, now - settle - to_duration(trial_window)),
                                      now - settle, now);
    if (after.span < 0.4 || after.sent < trial_calls * unit || after.rejected < 3 * unit) {
      return;
    }
    // Of the two windows, `lo` sent at the lower rate. A token-bucket limiter that refused a
    // share of `hi` accepted about its limit there, and refuses next to nothing of `lo` if `lo`
    // sent clearly less than that. So if `lo` sent below 90% of what `hi` got accepted, and its
    // share refused stayed (at least half of `hi`'s, or not lower by two standard errors), the
    // refusals do not depend on the rate.
    // A limit that fell refused next to nothing before its first 429, and one crossed by a
    // probe refuses a share below the margin: `hi` must have refused at least the margin.
    const bool after_lower = after.sent / after.span <= before.sent / before.span;
    const counts& lo = after_lower ? after : before;
    const counts& hi = after_lower ? before : after;
    const double accepted_hi = (hi.sent - hi.rejected) / hi.span;
    const double share_lo = lo.rejected / lo.sent - d.noise;
    const double share_hi = hi.rejected / hi.sent - d.noise;
    const double pooled = (lo.rejected + hi.rejected) / (lo.sent + hi.sent) - d.noise;
    const double error =
        std::sqrt(std::max(0.0, pooled * (1 - pooled)) * (unit / lo.sent + unit / hi.sent));
    // In a fleet the other processes' sends fill the limiter too: a process that cut while the
    // others were still above their shares kept a part of its refusals (a halved share passed
    // within two standard errors of 30-50 calls, and a lower window refused more than the
    // higher), so a verdict there needs half the share kept whatever the sample, and the lower
    // window not to refuse more than twice the higher's (simulated, 4 x 64 calls at 200 r/s
    // with stalls, without `fleet_moved` below: a noise learned in 3 of 40 seeds instead of 6,
    // at most 1.087 attempts per prompt instead of 1.145; docs/core/rate_controller.md).
    const bool kept = in_fleet_ ? share_lo >= 0.5 * share_hi && share_lo <= 2 * share_hi + 2 * error
                                : share_lo >= 0.5 * share_hi || share_hi - share_lo < 2 * error;
    // `lo` must also have sent 5% below the rate paced before the trial: `hi`'s accepted
    // rate includes any burst the limiter let drain (at 50 r/s, burst 20 adds 20 calls to a
    // second), and after a probe's crossing the client paces at the limit again, refused now and
    // then: against nginx at 50 r/s that passed for 3-7% noise, and the probes above the limit
    // that the noise then hid drew twice the 429s.
    const double lo_rate = lo.sent / lo.span;
    // In a fleet, `lo` sending less proves nothing if only this process cut: the others' sends
    // kept the limiter above its rate. The fleet's share (adopt_share()) must have moved with
    // `lo` too, by 10% (the fleet's limit is the sum of its processes' estimates, so it falls
    // when they all cut). Simulated (4 x 64 calls at 200 r/s with stalls, 40 seeds): with the
    // stricter `kept` above, a noise learned in 2 seeds instead of 6, at most 1.050 attempts per
    // prompt instead of 1.145.
    const bool fleet_moved =
        !in_fleet_ || di != req || d.trial_share <= 0 || fleet_share_ <= 0 ||
        (after_lower ? fleet_share_ <= 0.9 * d.trial_share : d.trial_share <= 0.9 * fleet_share_);
    const bool below =
        fleet_moved && lo_rate <= 0.9 * accepted_hi &&
        (d.trial_estimate <= 0 || lo_rate <= 0.95 * (1 - o_.margin) * d.trial_estimate);
    // `hi` must have refused enough to be a crossing: the margin, or half of it if `lo` refused
    // the margin (a 5% noise leaves 5 of 174 calls in one window about as often as 1 in 8).
    const bool refusing =
        share_hi >= o_.margin ||
        (hi.rejected >= 3 * unit && share_hi >= 0.5 * o_.margin && share_lo >= o_.margin);
    if (below && refusing && kept) {
      d.trial = false;
      // Only the first verdict sets the noise; a later one undoes its cut and leaves the noise
      // as it is. Windows of a run that probes a real limit hold the crossings' refusals
      // besides the noise, and taking their share raised 4.5% of noise to 10% and 12.5% within
      // two seconds (nginx, 200 r/s behind 5% random 429s), hiding ever larger crossings.
      if (d.noise <= 0) {
        d.noise = std::min(lo.rejected / lo.sent, hi.rejected / hi.sent);
      }
      d.noise_updated = now;
      undo_trial(di, now);
    }
  }

  // The trial found noise: pacing goes back to where it was before it, and probes up at once.
  // (Trials start only in cruise, probe and fixed: see `start_trial`.)
  void undo_trial(std::size_t di, time_point now) {
    dim& d = dims_[di];
    if (d.trial_phase == pacing_phase::fixed) {
      d.phase = pacing_phase::fixed;
      d.rate = d.trial_rate;
      d.estimate = d.trial_estimate;
    } else {
      d.estimate = std::max(d.estimate, d.trial_estimate);
      d.phase = pacing_phase::cruise;
      d.rate = base_rate(di);
    }
    d.adopted_at = now;
    d.reacting = false;
    d.in_episode = false;
    d.previous = rejection{};  // no sample reaches back across the noise
    if (d.phase == pacing_phase::cruise) {
      // The cuts the noise made were the plateau: probe up from the restored rate at once.
      d.plateau_until = now;
    } else if (d.phase == pacing_phase::fixed && d.estimate > 0) {
      start_plateau(d, now);
    }
  }

  // Once a second, the noise fades if the refusals do (it never rises without a trial: see
  // above).
  void decay_noise(std::size_t di, time_point now) {
    dim& d = dims_[di];
    if (d.noise <= 0 || d.trial || now - d.noise_updated < to_duration(std::chrono::seconds(1))) {
      return;
    }
    d.noise_updated = now;
    const duration settle = settle_time();
    const counts c =
        window(di, now - settle - to_duration(std::chrono::seconds(1)), now - settle, now);
    if (c.sent < 20 * unit_of(di)) {
      return;
    }
    // Only a share well below the noise moves it: following every second's share down (and
    // never up) would walk it to the low end of its sampling spread.
    const double share = c.rejected / c.sent;
    if (share < 0.5 * d.noise) {
      d.noise = 0.7 * d.noise + 0.3 * share;
    }
    if (d.noise < 0.002) {
      d.noise = 0;
    }
  }

  // ---- the rejection log ----

  // Counts a 429 in the bin of its send (if the bin is still kept).
  void count_refused(const ticket& t) {
    const std::int64_t i = bin_index(t.sent);
    bin& b = bins_[static_cast<std::size_t>(i % static_cast<std::int64_t>(bin_count))];
    if (b.index == i) {
      b.rejected[req] += 1;
      b.rejected[tok] += t.tokens;
    }
  }

  void log_rejection(const ticket& t, std::size_t di) {
    // Reports arrive nearly in send order: insert from the back.
    auto it = log_.end();
    while (it != log_.begin() && std::prev(it)->seq > t.seq) {
      --it;
    }
    log_.insert(it, rejection{t.seq, t.sent, t.tokens, t.tokens_before, di});
    while (!log_.empty() &&
           (log_.front().sent < t.sent - to_duration(log_span) || log_.size() > max_log)) {
      log_.pop_front();
    }
  }

  // How long a 429 takes to come back: a slowly decaying maximum.
  void note_reject_latency(const ticket& t, time_point now) {
    const duration latency = now > t.sent ? now - t.sent : duration::zero();
    reject_latency_ = std::max(latency, reject_latency(now));
    reject_latency_at_ = now;
    recent_latencies_[latency_slot_++ % recent_latencies_.size()] = {now, latency};
  }

  // Sends younger than this may still draw a 429 (429s take at most about `reject_latency_` to
  // come back); older ones that were not rejected were accepted, whether or not their answers
  // (which may take seconds) have arrived.
  duration settle_time() const {
    const duration l = reject_latency(Clock::now());
    return l + l / 2 + to_duration(std::chrono::milliseconds(1));
  }

  void prune_young(time_point now) {
    const time_point limit = now - settle_time();
    while (!young_.empty() && (young_.front().sent < limit || young_.size() > max_log)) {
      young_.pop_front();
    }
  }

  void resolve(std::uint64_t seq) {
    auto it = std::lower_bound(young_.begin(), young_.end(), seq,
                               [](const young_send& y, std::uint64_t s) { return y.seq < s; });
    if (it != young_.end() && it->seq == seq) {
      it->resolved = true;
    }
  }

  // Work of young sends strictly between two sequence numbers whose fate is still unknown.
  double unknown_between(std::size_t di, std::uint64_t a, std::uint64_t b) const {
    double n = 0;
    auto it = std::upper_bound(young_.begin(), young_.end(), a,
                               [](std::uint64_t s, const young_send& y) { return s < y.seq; });
    for (; it != young_.end() && it->seq < b; ++it) {
      if (!it->resolved) {
        n += di == req ? 1.0 : it->tokens;
      }
    }
    return n;
  }

  log_iterator find_logged(std::uint64_t seq) const {
    auto it = std::lower_bound(log_.begin(), log_.end(), seq,
                               [](const rejection& r, std::uint64_t s) { return r.seq < s; });
    return it != log_.end() && it->seq == seq ? it : log_.end();
  }

  pair_sample sample_between(std::size_t di, log_iterator first, log_iterator last) const {
    pair_sample p;
    if (first == log_.end() || last == log_.end() || first->seq >= last->seq) {
      return p;
    }
    double sent_between = 0;
    double rejected_between = 0;
    if (di == req) {
      sent_between = static_cast<double>(last->seq - first->seq - 1);
      rejected_between = static_cast<double>(std::distance(first, last) - 1);
    } else {
      sent_between = last->tokens_before - (first->tokens_before + first->tokens);
      for (auto it = std::next(first); it != last; ++it) {
        rejected_between += it->tokens;
      }
    }
    // Sends between them whose 429 may still come are not counted: a wave of 429s is reported
    // in any order, and counting its unreported members as accepted would invent a rate.
    p.sent = sent_between;
    p.rejected = rejected_between;
    p.accepted =
        std::max(0.0, sent_between - rejected_between - unknown_between(di, first->seq, last->seq));
    p.span = std::max(0.0, std::chrono::duration<double>(last->sent - first->sent).count());
    return p;
  }

  // Enough accepted work between the two rejections for a rate (or a second between them).
  // The span must also be long against how much the time a 429 takes to come back varies:
  // calls reach the server in about their send order, but only about (connections being
  // opened, requests written on different connections), so a pair of rejections closer than
  // that spread may bracket calls that the server saw before the first of them.
  // The work of one call: 1 request, or the mean token cost.
  double unit_of(std::size_t di) const noexcept { return di == req ? 1.0 : mean_token_cost(); }

  bool usable(std::size_t di, const pair_sample& p, double needed) const {
    const double unit = unit_of(di);
    const double min_span = std::max(0.002, 4 * seconds(latency_spread()));
    return p.span >= min_span && p.accepted > 0 &&
           (p.accepted >= needed * unit || (p.span >= 1.0 && p.accepted >= 2 * unit));
  }

  // The episode's sample: from its oldest rejection within `sample_window` of the latest one.
  pair_sample episode_sample(std::size_t di) const {
    const dim& d = dims_[di];
    const time_point from = d.latest.sent - to_duration(sample_window);
    auto first = std::lower_bound(log_.begin(), log_.end(), d.first.seq,
                                  [](const rejection& r, std::uint64_t s) { return r.seq < s; });
    while (first != log_.end() && (first->sent < from || first->dim != di)) {
      ++first;
    }
    return sample_between(di, first, find_logged(d.latest.seq));
  }

  // The sample from the previous episode's last rejection to `r`. Exact while the paced rate
  // kept the server's bucket from filling up in between (a plateau at (1 - margin) x r refills
  // it by margin x r per second), a lower bound otherwise.
  pair_sample cross_sample(std::size_t di, const rejection& r) const {
    const dim& d = dims_[di];
    if (d.previous.seq == 0 || r.sent - d.previous.sent > to_duration(sample_window)) {
      return {};
    }
    return sample_between(di, find_logged(d.previous.seq), find_logged(r.seq));
  }

  // True if the client sent at about the plateau's rate between the previous episode and `r`.
  bool paced(std::size_t di, const rejection& r, const pair_sample& x) const {
    const dim& d = dims_[di];
    if (x.span <= 0) {
      return false;
    }
    const double sent = di == req
                            ? static_cast<double>(r.seq - d.previous.seq - 1)
                            : r.tokens_before - (d.previous.tokens_before + d.previous.tokens);
    return sent / x.span >= 0.9 * base_rate(di);
  }

  // ---- reactions ----

  // On arrival of a 429: stop raising the rate at once; estimates wait for final rejections.
  void react(std::size_t di, time_point now, std::optional<duration> hint) {
    dim& d = dims_[di];
    ++d.rejections;
    if (d.reacting && d.phase == pacing_phase::search && now - d.last_arrival >= search_hold(d)) {
      // Search grew the rate again since the last 429 (the startup wave, or a crossing that
      // was halved): this one is a new crossing, with a cause of its own.
      end_episode(di, now);
    }
    if (!d.reacting) {
      d.reacting = true;
      d.wave_end = saturating_add(now, settle_time());
      d.block_until = time_point{};
      switch (d.phase) {
        case pacing_phase::startup:
          // The first 429: the window ends; pace at what the server accepted over the last
          // second and search upwards from there.
          d.phase = pacing_phase::search;
          d.rate = std::max(o_.min_requests_per_second, accepted_rate(req, now));
          d.why = cause::startup;
          break;
        case pacing_phase::unlimited:
          d.phase = pacing_phase::search;
          d.rate = std::max(min_rate(di), accepted_rate(di, now));
          d.why = cause::startup;
          break;
        case pacing_phase::search:
          d.why = cause::search;
          break;
        case pacing_phase::probe:
          // Stop raising the rate, but hold it: the episode's rejections measure the limit.
          d.phase = pacing_phase::cruise;
          d.why = cause::probe;
          break;
        case pacing_phase::cruise:
          d.why = cause::plateau;
          break;
        case pacing_phase::fixed:
          d.why = cause::fixed;
          break;
      }
    }
    if (d.phase == pacing_phase::search && d.why == cause::search &&
        now - d.last_halving >= halving_gap()) {
      // Search: the rate crossed the limit. Halve it (at most once per round trip of a 429,
      // so that one wave of 429s halves it once): growth brings it back above the limit soon,
      // and the next crossing measures it.
      d.rate = clamp_rate(di, d.rate / 2);
      d.last_halving = now;
    }
    d.last_arrival = now;
    d.last_growth = now;
    if (hint && *hint > duration::zero()) {
      const auto capped = std::min<duration>(*hint, to_duration(o_.max_pause));
      d.block_until = std::max(d.block_until, saturating_add(now, capped));
    }
  }

  // Feeds a 429 to its dimension's episode.
  void on_rejection(std::size_t di, const ticket& t) {
    dim& d = dims_[di];
    const rejection r{t.seq, t.sent, t.tokens, t.tokens_before, di};
    if (!d.in_episode) {
      d.in_episode = true;
      d.first = r;
      d.latest = r;
      open_episode(di, r);
      return;
    }
    if (r.seq < d.first.seq) {
      d.first = r;
    }
    // Only a 429 that extends the episode is evaluated: a late report from inside its span
    // (a 429 slower than the ones before) may find its wave's other members already counted
    // as accepted, and would inflate the sample; the next extending 429 counts it.
    if (r.seq > d.latest.seq) {
      d.latest = r;
      continue_episode(di);
    }
  }

  void adopt(std::size_t di, double estimate) {
    dim& d = dims_[di];
    const double before = d.estimate;
    // After a stall (see update()) the process sends its backlog within a millisecond, the
    // server serves it in its own order, and a sample's span says little: 14 calls over 2 ms
    // said 6,800 r/s against a limit of 100. Within a second of a stall, the estimate is
    // capped at `max_estimate_gain` x what the server accepted over the last second (of the
    // time since the first call, if shorter). Probes raise a cap that was too low.
    // The second is wall time, stalls included: the server's bucket refilled during them, so
    // per second the process ran, a backlog sent at once measured up to 1.5 x the limit (and
    // at R = 200 one simulated run took 1.54 attempts per item), while per wall second the
    // server never accepts more than its limit and burst.
    if (const time_point now = Clock::now();
        last_stall_ != time_point{} && now - last_stall_ <= to_duration(std::chrono::seconds(1))) {
      const counts c = window(di, now - to_duration(std::chrono::seconds(1)), now, now);
      if (c.span > 0 && c.sent > c.rejected) {
        const double recent = (c.sent - c.rejected) / std::max(c.span, 0.1);
        estimate = std::min(estimate, max_estimate_gain * recent);
      }
    }
    d.estimate = d.advertised > 0 ? std::min(estimate, d.advertised) : estimate;
    d.adopted_at = Clock::now();
    if (d.estimate < before) {
      // Sends before the cut took effect went at the higher rate: the noise filter judges the
      // share refused since (see `only_noise`).
      d.wave_end = std::max(d.wave_end, saturating_add(d.adopted_at, settle_time()));
    }
    ++d.samples;
    d.phase = pacing_phase::cruise;
    d.rate = base_rate(di);
  }

  // The first rejection of an episode.
  void open_episode(std::size_t di, const rejection& r) {
    dim& d = dims_[di];
    const pair_sample x = cross_sample(di, r);
    const bool cross = usable(di, x, o_.min_sample);
    d.episode_best = 0;
    d.episode_floor = d.estimate * (1 - o_.margin);
    const std::uint64_t samples_before = d.samples;
    // Rounds of 429s a Retry-After apart with nothing accepted in between: a block.
    if (d.previous.seq != 0) {
      if (refused_all(di, sample_between(di, find_logged(d.previous.seq), find_logged(r.seq)))) {
        pause_block(di);
      }
    }
    switch (d.why) {
      case cause::probe:
        // If the rejections bracketing the plateau and the probe say the limit is about where
        // it was, take their rate and cut back at once (one 429 per probe). The server's bucket
        // may have filled up during the plateau (it holds only tens of milliseconds of a fast
        // limit), which makes that pair under-measure: a probe never lowers the estimate
        // (plateau rejections do). If they say the limit rose, they under-measure it: keep
        // holding the probe's rate so that the episode's own rejections measure it.
        if (cross && x.rate() >= d.estimate && x.rate() <= 1.1 * d.estimate) {
          adopt(di, x.rate());
        }
        break;
      case cause::plateau: {
        // A rejection at the plateau's rate: the limit may be below the estimate. If it fell
        // below the plateau, a share of what was sent since the last rejection was refused, and
        // the pair measures the limit if the client kept sending at the plateau's rate in
        // between (callers all waiting out Retry-Afters leave the server idle, and the pair then
        // under-measures). But a tight bucket (nginx `burst=20` at 1000 r/s holds 20 ms) also
        // refuses an odd call of a plateau below its limit, when the scheduler bunches a few
        // sends: then almost everything sent was accepted, and the pair measures the client's
        // own rate, not the limit. Cutting to it at every such rejection ratcheted an estimate
        // of 999 r/s down to 511 in 2.4 s; such a rejection lowers the estimate by the share
        // refused instead (probes win it back).
        const double own = di == req ? 1.0 : r.tokens;
        const double refused = cross ? (x.rejected + own) / (x.sent + own) : 1.0;
        if (refused < o_.margin) {
          adopt(di, d.estimate * (1 - refused));
        } else if (cross && paced(di, r, x)) {
          adopt(di, std::min(x.rate(), d.estimate));
        } else {
          adopt(di, d.estimate * (1 - o_.margin));
        }
        break;
      }
      case cause::fixed:
        // A configured or advertised rate draws 429s: measure the real one (if the client kept
        // the server busy in between; callers parked by Retry-Afters make the pair say little).
        if (cross && paced(di, r, x)) {
          adopt(di, x.rate());
        }
        break;
      case cause::startup:
        break;
      case cause::search:
        // Two crossings close together bracket a stretch where the client paced near the limit
        // (halved below it, then grew back above it): their pair measures it. The first
        // crossing's pair with the startup wave spans a stretch far below the limit, where the
        // server's bucket filled up: not a measurement.
        if (d.previous_why == cause::search &&
            seconds(r.sent - d.previous.sent) <= 6 * search_tau()) {
          const pair_sample c = cross_sample(di, r);
          if (usable(di, c, std::min(3.0, o_.min_sample))) {
            adopt(di, c.rate());
          }
        }
        break;
    }
    if (d.samples != samples_before) {
      d.episode_best = std::max(x.accepted, 1.0);
    }
  }

  // A later rejection of the same episode: its own sample measures the limit now.
  void continue_episode(std::size_t di) {
    dim& d = dims_[di];
    const pair_sample p = episode_sample(di);
    // Search takes a coarse sample (the rate it holds draws 429s until one comes); later
    // rejections of the episode refine it.
    // A held probe takes a precise one unless few calls wait for the bucket: then the 429s it
    // draws would soon leave every caller waiting out a Retry-After and nobody sending.
    const bool coarse =
        d.why == cause::search || d.why == cause::startup ||
        (d.why == cause::probe &&
         bucket_.waiters() < static_cast<std::size_t>(std::ceil(o_.min_sample / 2)));
    const double needed = coarse ? std::min(3.0, o_.min_sample) : o_.min_sample;
    // A later sample replaces the episode's estimate only if it counts more accepted work (it is
    // more precise): a pair across a plateau is far more precise than the first few 429s of the
    // probe that ended it.
    // A 429 for a call sent after the last estimate was adopted means the limit is lower still
    // (it changed): then a lower sample wins whatever its precision.
    if (usable(di, p, needed)) {
      double rate = p.rate();
      // A sample below the estimate measures the server only if the client kept sending at
      // about the paced rate over it: callers parked by Retry-Afters leave the server's bucket
      // to refill unseen, and the sample under-measures (at concurrency 16 against 1000 r/s,
      // one wave of 429s with Retry-After: 1 parked 15 of 16 callers, and a 0.2 s sample said
      // 111 r/s; the probes back up took 4 s). Such a sample lowers the estimate by at most
      // the margin.
      // The margin is taken from the estimate the episode opened with, once per episode: a
      // bunch of sends refused together (a tight bucket, 20 ms at 1000 r/s, and the scheduler
      // bunching a few sends) each came after the previous cut, and a margin per rejection cut
      // 968 r/s to 857 in 5 ms.
      if (d.estimate > 0 && rate < d.estimate && p.sent < 0.9 * base_rate(di) * p.span) {
        rate = std::max(rate, std::min(d.estimate, d.episode_floor));
      }
      if (p.accepted > d.episode_best || (rate < d.estimate && d.latest.sent > d.adopted_at)) {
        if (d.why == cause::probe && d.estimate > 0 && p.accepted < o_.min_sample * unit_of(di)) {
          // A coarse probe sample (few calls left to draw 429s with) moves a known estimate
          // by at most 10%: three calls over a few milliseconds are not worth more.
          rate = std::clamp(rate, d.estimate / 1.1, d.estimate * 1.1);
        }
        adopt(di, rate);
        d.episode_best = p.accepted;
      }
      return;
    }
    // Callers all parked by the last episode's Retry-After send nothing between it and this
    // one: the calls they send when it ends, all refused, are the evidence.
    if (refused_all(di, p) ||
        (d.previous.seq != 0 && refused_all(di, sample_between(di, find_logged(d.previous.seq),
                                                               find_logged(d.latest.seq))))) {
      pause_block(di);
    }
  }

  // Rejections at least `block_span` apart with a call's work or more sent between them and
  // every bit of it refused (a call whose answer is still to come may have been accepted).
  bool refused_all(std::size_t di, const pair_sample& p) const {
    return p.span > 0 && p.span >= seconds(o_.block_span) && p.sent >= unit_of(di) &&
           p.sent - p.rejected <= 0;
  }

  // Nothing got through for a while: the server refuses everybody (a block), whatever the rate.
  // Pause everybody for the longest Retry-After of the episode (without one there is nothing to
  // wait for but the rate), then go on at the rate learned before.
  void pause_block(std::size_t di) {
    const dim& d = dims_[di];
    if (d.block_until > Clock::now()) {
      bucket_.pause_until(d.block_until);
    }
  }

  bool advertise(std::size_t di, double per_second) {
    dim& d = dims_[di];
    if (d.advertised == per_second) {
      return false;
    }
    d.advertised = per_second;
    d.ceiling = d.configured > 0 ? std::min(d.configured, per_second) : per_second;
    switch (d.phase) {
      case pacing_phase::unlimited:
      case pacing_phase::startup:
      case pacing_phase::search:
      case pacing_phase::fixed:
        d.phase = pacing_phase::fixed;
        d.estimate = per_second;
        d.rate = d.ceiling;
        if (di == req) {
        }
        break;
      case pacing_phase::cruise:
      case pacing_phase::probe:
        d.estimate = d.estimate > 0 ? std::min(d.estimate, per_second) : per_second;
        d.rate = std::min(d.rate, d.ceiling);
        break;
    }
    return true;
  }

  // ---- the clock ----

  // How much the latency of the last second's 429s varied (their order at the server is that
  // uncertain).
  duration latency_spread() const {
    const std::size_t n = std::min<std::size_t>(latency_slot_, recent_latencies_.size());
    const time_point from = Clock::now() - to_duration(spread_memory);
    duration lo = duration::max();
    duration hi = duration::zero();
    for (std::size_t i = 0; i < n; ++i) {
      if (recent_latencies_[i].first >= from) {
        lo = std::min(lo, recent_latencies_[i].second);
        hi = std::max(hi, recent_latencies_[i].second);
      }
    }
    return hi > lo ? hi - lo : duration::zero();
  }

  // How long a 429 takes to come back: the longest latency seen, halving every
  // `latency_half_life` since.
  duration reject_latency(time_point now) const {
    if (reject_latency_ == duration::zero() || now <= reject_latency_at_) {
      return reject_latency_;
    }
    const double halvings = std::chrono::duration<double>(now - reject_latency_at_).count() /
                            seconds(latency_half_life);
    return to_duration(
        std::chrono::duration<double>(seconds(reject_latency_) * std::exp2(-halvings)));
  }

  // Two 429s closer than this belong to one wave.
  duration halving_gap() const {
    return std::max(2 * reject_latency(Clock::now()), to_duration(std::chrono::milliseconds(10)));
  }

  // Search's doubling time, seconds: no faster than the 429s can answer (doubling while the
  // last doubling's 429s are still on their way overshoots by more than a doubling).
  double search_tau() const {
    return std::max(seconds(o_.search_doubling), 2 * seconds(reject_latency(Clock::now())));
  }

  // In startup, an answer that took at least `slot_hold` gives its call's slot back: a server
  // that answers in 50 ms would otherwise hold the next calls of a batch of 16 until the ramp
  // earned them. A faster answer gives nothing back: a server that answers in a millisecond
  // would pull a whole window of calls into its first 429s, parking every caller of a small
  // batch for its Retry-After.
  void free_startup_slot(const ticket& t, time_point now) {
    if (t.seq != 0 && t.seq <= startup_sends_ && dims_[req].phase == pacing_phase::startup &&
        now - t.sent >= to_duration(slot_hold)) {
      slots_freed_ += 1;
    }
  }

  // The startup ramp's doubling time, seconds (see update()).
  double startup_tau() const {
    const double fastest = seconds(o_.startup_doubling);
    if (fastest_answer_ == duration::max()) {
      return 4 * fastest;
    }
    return std::clamp(std::chrono::duration<double>(fastest_answer_).count(), fastest, 4 * fastest);
  }

  void note_answer(const ticket& t, time_point now) {
    if (t.seq != 0 && now > t.sent) {
      fastest_answer_ = std::min<duration>(fastest_answer_, now - t.sent);
    }
  }

  duration search_hold(const dim& d) const {
    // If the rate is still well above the limit, another 429 comes within two calls' time.
    const double s = std::clamp(2 / std::max(d.rate, 1e-9), 0.01, 0.25);
    return to_duration(std::chrono::duration<double>(s));
  }

  void start_plateau(dim& d, time_point now) {
    const double u = o_.random->uniform();
    const auto span = o_.plateau_max - o_.plateau_min;
    const auto wait =
        o_.plateau_min +
        std::chrono::duration_cast<std::chrono::nanoseconds>(
            std::chrono::duration<double, std::nano>(u * static_cast<double>(span.count())));
    d.plateau_until = saturating_add(now, to_duration(wait));
  }

  // The request rate back to its plateau (a probe ended without a 429 of its own, or a
  // follower leads now): the plateau's rate, and a new plateau from now.
  void back_to_plateau(dim& d, time_point now) {
    d.phase = pacing_phase::cruise;
    d.rate = base_rate(req);
    start_plateau(d, now);
  }

  void end_episode(std::size_t di, time_point now) {
    dim& d = dims_[di];
    d.reacting = false;
    if (d.in_episode) {
      d.in_episode = false;
      d.previous = d.latest;
      d.previous_why = d.why;
    }
    if (d.phase == pacing_phase::cruise) {
      d.rate = base_rate(di);  // a held probe rate that measured nothing falls back
      start_plateau(d, now);
    } else if (d.phase == pacing_phase::fixed && d.estimate > 0) {
      start_plateau(d, now);
    }
  }

  // A probe round's length, seconds.
  double probe_round_s(std::size_t di) const {
    return std::max({seconds(o_.probe_round), o_.min_sample / std::max(base_rate(di), 1e-9),
                     2 * seconds(reject_latency(Clock::now()))});
  }

  // Advances every dimension to `now`: final rejections, episode ends, growth; then applies.
  void update(time_point now) {
    // Growth is earned only by time in which the rate held calls back (the bucket had a queue
    // and no pause). Time in which nobody waited proves nothing: when a wave of 429s had every
    // caller sleep out Retry-After: 1, the second of silence was credited to search as 7 and 18
    // doublings, and 64 callers went into the limit at once, every second (a slow process,
    // here a sanitizer build, sent the whole first window before the first 429 came back).
    const duration queued_total = bucket_.total_queued_time();
    const duration queued =
        queued_total > queued_seen_ ? queued_total - queued_seen_ : duration::zero();
    queued_seen_ = std::max(queued_seen_, queued_total);
    prune_young(now);
    // A *stall*: the rate held calls back for long enough to grant at least two, and nothing
    // happened (every grant and every answer comes here). The process ran nothing: a loaded
    // machine, a VM's steal time, a debugger. Growth is earned by calls going out at the paced
    // rate, and none went, so after a stall the ramp, search and probes grow by at most one
    // step. Crediting a 300 ms stall doubled search's rate 12 times, and the backlog went into
    // the limit at once. (Whether calls wait *now* says nothing: when the process resumes, the
    // bucket's timer may grant every waiter before the controller hears of the first.)
    const duration gap = now > last_event_ ? now - last_event_ : duration::zero();
    last_event_ = std::max(last_event_, now);
    const bool stalled = gap >= to_duration(stall_min) && applied_.requests_per_second > 0 &&
                         seconds(std::min(gap, queued)) * applied_.requests_per_second >= 2;
    if (stalled) {
      last_stall_ = now;
    }
    if (dims_[req].phase == pacing_phase::startup) {
      // The ramp doubles every `startup_doubling` whatever the answers (an LLM's answer can
      // take seconds: waiting for it would cost the first calls a round trip). After the first
      // `initial_window` calls the throttler grants at the ramp's growth rate, so against a fast
      // burst-limited server the first 429 comes back before the next few calls go (answers do
      // not free slots: a window refilled by 1 ms answers let a whole window through, into the
      // 429 that put every caller of a small batch to sleep for its Retry-After). Each grant
      // brings the controller here, so the ramp needs no timer.
      //
      // It doubles once per round trip as far as it is known (the fastest answer so far), within
      // [startup_doubling, 4 x startup_doubling], and at the slow end until a first answer: a
      // remote server's 429s take a network round trip to come back, and a ramp doubling every
      // 25 ms would send 16 x 2^(RTT / 25 ms) calls into a burst limit before hearing of it.
      const double tau = startup_tau();
      if (now > window_updated_) {
        // Capped: a server that never throttles would otherwise double it to infinity.
        // After a stall, at most one doubling (see `stalled`).
        window_ = std::min(max_window,
                           window_ * std::exp2(std::min(stalled ? 1.0 : 40.0,
                                                        seconds(now - window_updated_) / tau)));
        window_updated_ = now;
      }
      window_growth_ = window_ * std::log(2.0) / tau;
    }
    for (std::size_t di = 0; di < dims_.size(); ++di) {
      dim& d = dims_[di];
      const duration dt = now > d.last_update ? now - d.last_update : duration::zero();
      d.last_update = std::max(d.last_update, now);
      check_trial(di, now);
      decay_noise(di, now);
      // An episode ends after `quiet` without a 429.
      if (d.reacting && now - d.last_arrival >= to_duration(o_.quiet)) {
        end_episode(di, now);
      }
      switch (d.phase) {
        case pacing_phase::search:
          if (now - d.last_arrival >= search_hold(d) && queued > duration::zero()) {
            const double doublings =
                seconds(std::min<duration>(now - d.last_growth, queued)) / search_tau();
            d.rate = clamp_rate(di, d.rate * std::exp2(std::min(doublings, stalled ? 1.0 : 30.0)));
          }
          d.last_growth = now;
          break;
        case pacing_phase::cruise:
          if (di == req && probe_follower_) {
            // A follower probes when the leader does (see follow_probes()).
            if (!d.reacting && followed_gain_ > 0 &&
                (d.ceiling <= 0 || base_rate(di) < d.ceiling)) {
              d.phase = pacing_phase::probe;
              d.probe_elapsed = duration::zero();
            }
          } else if (!d.reacting && d.plateau_until != time_point{} && now >= d.plateau_until &&
                     (d.ceiling <= 0 || base_rate(di) < d.ceiling)) {
            d.phase = pacing_phase::probe;
            d.probe_elapsed = duration::zero();
          }
          break;
        case pacing_phase::probe: {
          // Only time in which the rate held calls back; after a stall, one round at most.
          duration credit = std::min(dt, queued);
          if (stalled) {
            credit =
                std::min(credit, to_duration(std::chrono::duration<double>(probe_round_s(di))));
          }
          d.probe_elapsed += credit;
          break;
        }
        default:
          break;
      }
      if (d.phase == pacing_phase::probe && di == req && probe_follower_) {
        // The leader's gain, on this process's own plateau rate; its end ends this probe.
        if (followed_gain_ > 0) {
          d.rate = clamp_rate(di, base_rate(di) * (1 + followed_gain_));
        } else {
          d.phase = pacing_phase::cruise;  // a follower's plateau does not end in a probe
          d.rate = base_rate(di);
        }
      } else if (d.phase == pacing_phase::probe) {
        // A round lasts long enough for `min_sample` calls, so that at low rates the gain does
        // not double faster than the server's burst (which hides the limit) can drain.
        // A round also lasts two 429 round trips, so that a round's 429s arrive before the
        // next round raises the rate again.
        const double round_s = probe_round_s(di);
        const int k = static_cast<int>(std::min<double>(
            max_probe_round,
            std::floor(std::chrono::duration<double>(d.probe_elapsed).count() / round_s) + 1));
        if (k == max_probe_round && d.estimate > 0 &&
            d.probe_elapsed >=
                to_duration(std::chrono::duration<double>(round_s * (max_probe_round + 1)))) {
          // The last round went by with no 429 (or only noise) while calls waited for the
          // bucket: the server took all of it. Its accepted rate is a floor of the limit; probe on
          // from there (a server with no limit but random 429s would otherwise cap the client at
          // the last round's gain).
          // The four whole bins before the current one (200 ms).
          const duration w = to_duration(bin_width);
          const time_point edge = epoch_ + w * bin_index(now);
          const counts c = window(di, edge - 4 * w, edge, now);
          if (c.span > 0 && (c.sent - c.rejected) / c.span > d.estimate) {
            d.estimate = (c.sent - c.rejected) / c.span;
            ++d.samples;  // a measurement too (a fleet sums it: keel/redis/shared_rate.hpp)
          }
          d.adopted_at = now;
          d.probe_elapsed = duration::zero();
        }
        const double gain = o_.probe_step * (std::exp2(k) - 1);
        d.rate = clamp_rate(di, base_rate(di) * (1 + gain));
      }
    }
    apply();
  }

  // Pushes the rates and bursts to the throttler when they changed.
  void apply() {
    const dim& r = dims_[req];
    const dim& t = dims_[tok];
    const double burst_s = seconds(o_.burst_time);
    double rps = 0;
    double burst = 1;
    if (r.phase == pacing_phase::startup) {
      rps = window_growth_;
      burst = window_;
    } else if (r.rate > 0) {
      rps = r.rate;
      burst = std::max(1.0, r.rate * burst_s);
      if (server_burst_ > 0) {
        // A client burst beyond the server's own (nginx burst=20 at 1000 r/s is 21 ms) comes
        // back as a wave of 429s, each parking a caller for its Retry-After.
        burst = std::max(1.0, std::min(burst, std::floor(server_burst_ / 2)));
      }
    }
    const double tpm = t.rate > 0 ? t.rate * 60 : 0;
    double token_burst = 0;
    if (t.rate > 0 && t.phase != pacing_phase::fixed) {
      token_burst = std::max(t.rate * burst_s, max_token_cost_);
    }
    const bool keep_burst = keep_request_burst_ && r.phase == pacing_phase::fixed;
    const bool keep_tburst = keep_token_burst_ && t.phase == pacing_phase::fixed;
    if (!keep_burst && burst != applied_.burst) {
      bucket_.set_burst(burst);
      applied_.burst = burst;
    }
    if (slots_freed_ > 0) {
      if (r.phase == pacing_phase::startup) {
        bucket_.release({slots_freed_, 0});
      }
      slots_freed_ = 0;
    }
    if (!keep_tburst && token_burst != applied_.token_burst) {
      bucket_.set_token_burst(token_burst);
      applied_.token_burst = token_burst;
    }
    if (!same(rps, applied_.requests_per_second) || !same(tpm, applied_.tokens_per_minute)) {
      bucket_.set_rate(rps, tpm);
      applied_.requests_per_second = rps;
      applied_.tokens_per_minute = tpm;
    }
  }

  // Rates within 0.1% are the same (each set_rate re-arms the throttler's timer).
  static bool same(double a, double b) noexcept {
    return a == b || std::abs(a - b) <= 1e-3 * std::max(std::abs(a), std::abs(b));
  }

  mutable std::mutex mutex_;
  basic_throttler<Clock>& bucket_;
  rate_controller_options o_;
  std::unique_ptr<random_source> own_random_;
  time_point epoch_;
  std::array<dim, 2> dims_{};
  std::array<pacing_state, 2> told_{};  // what on_change was last told
  std::array<bin, bin_count> bins_{};
  std::deque<rejection> log_;
  std::deque<young_send> young_;
  duration reject_latency_{};  // see reject_latency()
  time_point reject_latency_at_{};
  std::array<std::pair<time_point, duration>, 32> recent_latencies_{};  // the last 32 429s'
  std::size_t latency_slot_ = 0;
  std::uint64_t seq_ = 0;
  double tokens_sent_ = 0;
  double max_token_cost_ = 0;
  double window_ = 0;
  time_point window_updated_{};
  duration fastest_answer_ = duration::max();  // the quickest answer or 429 so far
  double window_growth_ = 0;                   // the startup window's growth, calls per second
  double slots_freed_ = 0;                     // startup slots to give back to the bucket
  std::uint64_t startup_sends_ = 0;            // sends made in startup (their slots may come back)
  double server_burst_ = 0;                    // calls accepted before the first 429 (0: not seen)
  bool probe_follower_ = false;                // see follow_probes()
  double fleet_share_ = 0;    // the latest share a fleet gave (adopt_share(), adopted or not)
  bool in_fleet_ = false;     // told by a fleet: adopt_share(), lead() or follow_probes()
  double followed_gain_ = 0;  // the leader's probe gain (follow_probes())
  duration queued_seen_{};    // the bucket's total_queued_time() at the last look
  std::uint64_t send_waits_seen_ = 0;  // the bucket's total_waits() at the last send
  bool keep_request_burst_ = false;
  bool keep_token_burst_ = false;
  throttler_options applied_{-1, -1, -1, -1};
  time_point last_event_{};  // the latest update (see `stalled` in update())
  time_point last_stall_{};  // the end of the latest stall
};

}  // namespace keel::detail

namespace keel {

template <class Clock>
basic_rate_controller<Clock>::basic_rate_controller(basic_throttler<Clock>& bucket,
                                                    rate_controller_options options)
    : state_(std::make_unique<detail::rate_controller_state<Clock>>(bucket, options)) {}

template <class Clock>
basic_rate_controller<Clock>::~basic_rate_controller() = default;

template <class Clock>
auto basic_rate_controller<Clock>::on_send(throttle_cost cost) -> ticket {
  return state_->on_send(cost);
}

template <class Clock>
void basic_rate_controller<Clock>::on_accepted(const ticket& t) {
  state_->on_accepted(t);
}

template <class Clock>
void basic_rate_controller<Clock>::on_throttled(const ticket& t, limit_kind kind,
                                                std::optional<duration> retry_after) {
  state_->on_throttled(t, kind, retry_after);
}

template <class Clock>
void basic_rate_controller<Clock>::on_abandoned(const ticket& t) {
  state_->on_abandoned(t);
}

template <class Clock>
void basic_rate_controller<Clock>::on_advertised(std::optional<double> requests_per_minute,
                                                 std::optional<double> tokens_per_minute) {
  state_->on_advertised(requests_per_minute, tokens_per_minute);
}

template <class Clock>
void basic_rate_controller<Clock>::follow_probes(double gain) {
  state_->on_follow_probes(gain);
}

template <class Clock>
void basic_rate_controller<Clock>::adopt_share(double requests_per_second) {
  state_->on_adopt_share(requests_per_second);
}

template <class Clock>
void basic_rate_controller<Clock>::end_probe() {
  state_->on_end_probe();
}

template <class Clock>
void basic_rate_controller<Clock>::lead() {
  state_->on_lead();
}

template <class Clock>
pacing_state basic_rate_controller<Clock>::requests() const {
  return state_->snapshot(detail::rate_controller_state<Clock>::req);
}

template <class Clock>
pacing_state basic_rate_controller<Clock>::tokens() const {
  return state_->snapshot(detail::rate_controller_state<Clock>::tok);
}

template <class Clock>
basic_throttler<Clock>& basic_rate_controller<Clock>::bucket() const noexcept {
  return state_->bucket();
}

}  // namespace keel
