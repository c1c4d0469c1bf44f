// keel::redis::fleet (keel/redis/fleet.hpp).
#include <keel/redis/fleet.hpp>

#include <keel/llm/sigv4.hpp>
#include <keel/redis/client.hpp>
#include <keel/redis/shared_breaker.hpp>
#include <keel/redis/shared_quota.hpp>
#include <keel/redis/shared_rate.hpp>
#include <keel/throttler.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <cmath>
#include <exception>
#include <map>
#include <optional>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace keel::redis {

namespace asio = boost::asio;

namespace {

// A configured number of seconds as whole milliseconds, at least 1.
std::chrono::milliseconds whole_ms(double seconds) {
  return std::chrono::milliseconds(std::max<long long>(1, std::llround(seconds * 1000)));
}

}  // namespace

std::string fleet_key(const std::string& prefix, const keel::llm::entry_config& e,
                      const std::string& dimension) {
  const std::string secret = e.api_key.empty() && e.aws ? e.aws->access_key : e.api_key;
  const std::string fingerprint =
      keel::llm::sigv4::sha256_hex(e.base_url + "\n" + secret).substr(0, 16);
  return prefix + ":" + std::string(keel::llm::to_string(e.api_type)) + ":" + e.model + ":" + "{" +
         fingerprint + "}:" + dimension;
}

// One process's fleet state: the buckets and breakers of its entries, on one Redis connection.
class fleet_impl {
 public:
  fleet_impl(asio::any_io_executor ex, const keel::llm::shared_config& sc,
             const keel::llm::breaker_config& bc, client_options o)
      : ex_(ex), sc_(sc), bc_(bc), redis_(ex, std::move(o)) {}

  asio::awaitable<void> acquire(const keel::llm::entry_config& e, double tokens) {
    if (breaker_sync* bs = refs(e).bs; bs != nullptr && !bs->synced_once && bs->syncing) {
      // This process's first word from the fleet's breaker is on its way (sync_breaker asked
      // at the call's start): a process that joins during the fleet's break waits for it,
      // bounded by the Redis command timeout, rather than sending its first calls into the
      // outage (16 calls at concurrency 32 before). The caller checks the breaker again after.
      (void)co_await bs->first_sync.async_wait(asio::as_tuple(asio::use_awaitable));
      // The sync's own end also wakes the wait with operation_aborted: only the caller's
      // cancellation state tells a cancelled call (which must not go on to an attempt).
      if ((co_await asio::this_coro::cancellation_state).cancelled() !=
          asio::cancellation_type::none) {
        throw boost::system::system_error(asio::error::operation_aborted);
      }
    }
    buckets* b = of(e);
    if (b == nullptr) {
      // No configured limit to share. A learned rate that cannot reach Redis says so here, so
      // that the caller warns and counts it as for a bucket (it keeps to its share meanwhile).
      if (const entry_refs& r = refs(e); r.rs != nullptr && r.rs->error && !*closed_) {
        std::rethrow_exception(r.rs->error);
      }
      co_return;
    }
    co_await b->requests_pacer->acquire(1);
    if (b->tokens_pacer) {
      co_await b->tokens_pacer->acquire(tokens);
    }
    b->local_current = false;  // in the fleet's bucket (again)
  }

  asio::awaitable<void> acquire_local(const keel::llm::entry_config& e, double tokens) {
    buckets* b = of(e);
    if (b == nullptr) {
      co_return;
    }
    if (!b->local_current) {
      // Cut off from the fleet (again): this process's share, fixed for the outage, starting
      // empty (it was sending at its share of the fleet's rate until now).
      const auto& rl = e.rate_limits;
      const double rate = rl.requests_per_minute / 60;
      const double burst = rl.burst > 0 ? rl.burst : std::max(1.0, rate);
      std::size_t n = 1;  // never reached Redis: alone, as far as it knows
      if (sc_.fleet_size > 0) {
        n = static_cast<std::size_t>(sc_.fleet_size);
      } else if (b->requests_pacer->members() > 0) {
        n = b->requests_pacer->members();
      }
      // At least one request per second, whatever the share.
      const double share = std::max(rate / static_cast<double>(n), std::min(rate, 1.0));
      keel::throttler_options o;
      o.requests_per_second = share;
      o.burst = std::max(1.0, burst * share / rate);
      o.tokens_per_minute = rl.tokens_per_minute * (share / rate);
      if (!b->local) {
        b->local = std::make_unique<keel::throttler>(ex_, o);
      } else {
        b->local->set_rate(o.requests_per_second, o.tokens_per_minute);
        b->local->set_burst(o.burst);
      }
      b->local->set_available_requests(0);
      if (o.tokens_per_minute > 0) {
        b->local->set_available_tokens(0);
      }
      b->local_current = true;
    }
    co_await b->local->acquire(keel::throttle_cost{1, b->tokens ? tokens : 0});
  }

  // Leaves every learned rate this process joined (its share goes to the others and its lead,
  // if it held one, at once, not after its window: up to a minute at a low rate), then closes
  // the connection. Not when its last sync failed: Redis is likely gone, and the run's end must
  // not wait for a timeout. Detached: the io_context's run() returns once it is done.
  void close() {
    if (*closed_) {
      return;
    }
    *closed_ = true;
    std::vector<shared_rate*> joined;
    for (const auto& [key, rs] : rates_) {
      if (rs->last_sync != std::chrono::steady_clock::time_point{} && !rs->error && !rs->failed) {
        joined.push_back(rs->shared.get());
      }
    }
    if (joined.empty()) {
      redis_.close();
      return;
    }
    asio::co_spawn(
        ex_,
        [](std::vector<shared_rate*> rates, client* redis) -> asio::awaitable<void> {
          rate_report leaving;
          leaving.active = false;
          leaving.wants_lead = false;
          for (shared_rate* r : rates) {
            try {
              co_await r->sync(leaving);
            } catch (...) {  // NOLINT(bugprone-empty-catch): it expires after its window instead
            }
          }
          redis->close();
        }(std::move(joined), &redis_),
        asio::detached);
  }

  // ---- the fleet's breaker ----

  void sync_breaker(const keel::llm::entry_config& e, keel::circuit_breaker& breaker) {
    breaker_sync& bs = breaker_of(e);
    const auto now = std::chrono::steady_clock::now();
    if (!*closed_ && !bs.syncing && now - bs.last_sync >= breaker_sync_interval_) {
      bs.syncing = true;
      bs.last_sync = now;
      const std::size_t failures = std::exchange(bs.failures, 0);
      const bool had_success = std::exchange(bs.had_success, false);
      asio::co_spawn(
          ex_,
          [](breaker_sync* b, std::size_t f, bool ok) -> asio::awaitable<void> {
            try {
              b->take(co_await b->shared->sync(f, ok));
            } catch (...) {
              // Redis unreachable: this process's breaker goes on alone (pacing says so), not
              // held by an answer that is getting old.
              b->view.reset();
            }
            b->syncing = false;
            if (!b->synced_once) {
              b->synced_once = true;
              b->first_sync.cancel();  // wakes the calls that wait for it (see acquire)
            }
          }(&bs, failures, had_success),
          asio::detached);
    }
    apply(bs, breaker, now);
  }

  void on_breaker_outcome(const keel::llm::entry_config& e, bool failure) {
    breaker_sync& bs = breaker_of(e);
    if (failure) {
      ++bs.failures;
    } else {
      bs.had_success = true;
      bs.failures = 0;
    }
  }

  void on_breaker_change(const keel::llm::entry_config& e, keel::breaker_state,
                         keel::breaker_state to, std::chrono::nanoseconds open_for) {
    if (applying_ || *closed_) {
      return;  // the fleet's own state, brought in by sync_breaker (or closed)
    }
    breaker_sync& bs = breaker_of(e);
    if (to == keel::breaker_state::open) {
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(open_for);
      asio::co_spawn(
          ex_,
          [](breaker_sync* b, std::chrono::milliseconds d) -> asio::awaitable<void> {
            try {
              b->take(co_await b->shared->opened(d));
            } catch (...) {
            }
          }(&bs, ms),
          asio::detached);
    } else if (to == keel::breaker_state::closed) {
      asio::co_spawn(
          ex_,
          [](breaker_sync* b) -> asio::awaitable<void> {
            try {
              b->take(co_await b->shared->closed());
            } catch (...) {
            }
          }(&bs),
          asio::detached);
    }
  }

  // ---- the fleet's learned rate ----

  void sync_pacing(const keel::llm::entry_config& e, keel::rate_controller& pacing) {
    if (e.rate_limits.requests_per_minute > 0) {
      return;  // a configured limit: shared through the fleet's bucket
    }
    rate_sync& rs = rate_of(e);
    const auto now = std::chrono::steady_clock::now();
    // The answer that came since the last call first: the report below is then made by the
    // process as the fleet left it (its role, the probe it follows, the share it took).
    apply_rate(rs, pacing, now);
    if (*closed_ || rs.syncing || now - rs.last_sync < rate_sync_interval_) {
      return;
    }
    rs.syncing = true;
    rs.last_sync = now;
    const keel::pacing_state st = pacing.requests();
    keel::throttler& bucket = pacing.bucket();
    rate_report mine;
    if (st.phase == keel::pacing_phase::cruise || st.phase == keel::pacing_phase::probe) {
      mine.estimate = st.estimate;  // learned (or adopted): this process's share
      // After a failed sync Redis may have restarted empty: the estimate is news to it. (The
      // first process back would otherwise sum the limit from its estimate alone, and the
      // others, with nothing new to report, follow a share of that until a 429: measured
      // against nginx, a quarter of the limit for 15 s.)
      mine.new_sample = st.samples > rs.samples || rs.error != nullptr;
    }
    // Demand beyond its share: calls wait for its pacing now, or did since the last sync.
    const auto queued = bucket.total_queued_time();
    mine.wants_lead = bucket.waiters() > 0 || queued > rs.queued;
    rs.queued = queued;
    mine.gain = rs.leading ? st.gain : 0;
    mine.probe_hit = rs.following_probe && st.rejections > rs.rejections;
    // Its own pause only (a block its controller found), not the fleet's it was told of.
    if (const auto until = bucket.paused_until(); until > now && until > rs.fleet_pause) {
      mine.pause = std::chrono::ceil<std::chrono::milliseconds>(until - now);
    }
    // This process syncs at its calls: at a low rate they are seconds apart, and it must not
    // drop out of the fleet (and its lead) between two of them. Three calls' time, at most a
    // minute.
    if (const double rps = bucket.options().requests_per_second; rps > 0) {
      mine.window = std::chrono::milliseconds(std::llround(std::min(60'000.0, 3'000 / rps)));
    }
    rs.window = std::max(rs.shared->options().member_window, mine.window);
    asio::co_spawn(
        ex_,
        [](rate_sync* r, rate_report m, std::uint64_t samples,
           std::uint64_t rejections) -> asio::awaitable<void> {
          try {
            r->view = co_await r->shared->sync(m);
            r->viewed_at = std::chrono::steady_clock::now();
            r->fresh = true;
            r->error = nullptr;
            // Reported: a sample or a 429 is not reported twice, nor lost by a failed sync.
            r->samples = samples;
            r->rejections = rejections;
          } catch (...) {
            r->failed = true;  // Redis unreachable: keep to the share (see apply_rate)
            r->error = std::current_exception();
          }
          r->syncing = false;
        }(&rs, mine, st.samples, st.rejections),
        asio::detached);
  }

  void on_server_delay(const keel::llm::entry_config& e, std::chrono::nanoseconds delay) {
    buckets* b = of(e);
    if (b == nullptr) {
      return;
    }
    const auto d = std::chrono::ceil<std::chrono::milliseconds>(delay);
    // Detached: the attempt does not wait for Redis; an error here shows in the next acquire.
    asio::co_spawn(
        ex_,
        [](buckets* bk, std::chrono::milliseconds ms,
           std::shared_ptr<const bool> closed) -> asio::awaitable<void> {
          co_await bk->requests->pause(ms);
          if (bk->tokens && !*closed) {  // after close(), no new connection for it
            co_await bk->tokens->pause(ms);
          }
        }(b, d, closed_),
        asio::detached);
  }

 private:
  struct buckets {
    std::unique_ptr<shared_quota> requests;
    std::unique_ptr<shared_pacer> requests_pacer;
    std::unique_ptr<shared_quota> tokens;
    std::unique_ptr<shared_pacer> tokens_pacer;
    // The local share while Redis cannot be reached; `local_current` while it applies.
    std::unique_ptr<keel::throttler> local;
    bool local_current = false;
  };

  // An entry's buckets and breaker, found once per entry: fleet_key hashes the key (SHA-256),
  // which is not for every attempt. Keyed by the entry's address, checked against what names
  // it (a client made later may reuse an address).
  struct breaker_sync;
  struct rate_sync;
  struct entry_refs {
    std::string model, base_url, api_key, aws_key;
    keel::llm::provider_kind api_type{};
    buckets* b = nullptr;
    bool b_known = false;
    breaker_sync* bs = nullptr;
    rate_sync* rs = nullptr;
  };
  entry_refs& refs(const keel::llm::entry_config& e) {
    entry_refs& r = refs_[&e];
    const std::string& aws_key = e.aws ? e.aws->access_key : empty_;
    if (r.model != e.model || r.base_url != e.base_url || r.api_key != e.api_key ||
        r.aws_key != aws_key || r.api_type != e.api_type) {
      r = entry_refs{e.model, e.base_url, e.api_key, aws_key, e.api_type};
    }
    return r;
  }

  buckets* of(const keel::llm::entry_config& e) {
    entry_refs& r = refs(e);
    if (!r.b_known) {
      r.b = find_buckets(e);
      r.b_known = true;
    }
    return r.b;
  }

  buckets* find_buckets(const keel::llm::entry_config& e) {
    const std::string key = fleet_key(sc_.key_prefix, e, "requests");
    auto it = map_.find(key);
    if (it == map_.end()) {
      buckets b;
      const auto window = whole_ms(sc_.lease_window);
      const auto& rl = e.rate_limits;
      if (rl.requests_per_minute > 0) {
        const double rate = rl.requests_per_minute / 60;
        b.requests = std::make_unique<shared_quota>(
            redis_,
            quota_options{
                .key = key, .rate = rate, .burst = rl.burst > 0 ? rl.burst : std::max(1.0, rate)});
        b.requests_pacer = std::make_unique<shared_pacer>(*b.requests, window);
        if (rl.tokens_per_minute > 0) {
          const double trate = rl.tokens_per_minute / 60;
          b.tokens = std::make_unique<shared_quota>(
              redis_, quota_options{.key = fleet_key(sc_.key_prefix, e, "tokens"),
                                    .rate = trate,
                                    .burst = std::max(1.0, trate)});
          b.tokens_pacer = std::make_unique<shared_pacer>(*b.tokens, window);
        }
      }
      it = map_.emplace(key, std::move(b)).first;
    }
    return it->second.requests ? &it->second : nullptr;
  }

  // Brings the fleet's last answer into this process's controller (each answer once).
  static void apply_rate(rate_sync& rs, keel::rate_controller& pacing,
                         std::chrono::steady_clock::time_point now) {
    if (rs.failed) {
      // Cut off from the fleet: keep to the share it has (its own 429s still cut it) and probe
      // no more. Four processes probing alone took turns starving each other (against nginx,
      // Redis killed for 5 s: up to 2.2x the limit at the server for 9 s after, 8-9 items
      // failed, and one process's share cut to 8 of 50 r/s).
      rs.failed = false;
      rs.leading = false;
      rs.following_probe = false;
      pacing.follow_probes(0);
      return;
    }
    if (!rs.fresh) {
      return;
    }
    rs.fresh = false;
    if (now - rs.viewed_at > rs.window) {
      return;  // an answer older than this process's place in the fleet says little now
    }
    const rate_view& v = rs.view;
    // A measurement of its own that the fleet has not summed yet wins over the share.
    if (v.share > 0 && pacing.requests().samples == rs.samples) {
      pacing.adopt_share(v.share);
    }
    if (v.leader) {
      pacing.lead();
      if (v.probe_hit) {
        pacing.end_probe();  // a follower drew this probe's 429
      }
      rs.leading = true;
      rs.following_probe = false;
    } else {
      pacing.follow_probes(v.gain);
      rs.leading = false;
      rs.following_probe = v.gain > 0;
    }
    if (v.pause.count() > 0) {
      const auto until = rs.viewed_at + v.pause;
      rs.fleet_pause = std::max(rs.fleet_pause, until);
      if (until > pacing.bucket().paused_until()) {
        pacing.bucket().pause_until(until);
      }
    }
  }

  // One entry's learned rate as the fleet sees it.
  struct rate_sync {
    std::unique_ptr<shared_rate> shared;
    bool syncing = false;
    std::chrono::steady_clock::time_point last_sync{};
    std::uint64_t samples = 0;           // the controller's samples the fleet has been told of
    std::uint64_t rejections = 0;        // ... and its rejections
    keel::throttler::duration queued{};  // the bucket's total_queued_time() at the last report
    std::chrono::milliseconds window{};  // how long this process counts in the fleet unsynced
    std::chrono::steady_clock::time_point fleet_pause{};  // the latest pause the fleet set here
    bool leading = false;                                 // this process probes for the fleet
    bool following_probe = false;  // it follows the leader's probe (a gain above 0)
    bool fresh = false;            // `view` not applied yet
    bool failed = false;           // the last sync could not reach Redis (not applied yet)
    std::exception_ptr error;      // why the last sync failed (null after a success)
    rate_view view;
    std::chrono::steady_clock::time_point viewed_at{};
  };

  rate_sync& rate_of(const keel::llm::entry_config& e) {
    entry_refs& r = refs(e);
    if (r.rs == nullptr) {
      const std::string key = fleet_key(sc_.key_prefix, e, "learned");
      auto it = rates_.find(key);
      if (it == rates_.end()) {
        auto rs = std::make_unique<rate_sync>();
        rs->shared = std::make_unique<shared_rate>(
            redis_, rate_options{.key = key,
                                 // Several syncs missed before a process counts as gone.
                                 .member_window = std::max(std::chrono::milliseconds(1000),
                                                           5 * rate_sync_interval_)});
        rs->window = rs->shared->options().member_window;
        it = rates_.emplace(key, std::move(rs)).first;
      }
      r.rs = it->second.get();
    }
    return *r.rs;
  }

  // One entry's breaker as the fleet sees it.
  struct breaker_sync {
    std::unique_ptr<shared_breaker> shared;
    std::size_t failures = 0;  // since the last success, not yet reported
    bool had_success = false;  // a success not yet reported
    bool syncing = false;
    bool synced_once = false;  // the first sync has answered (or failed)
    // Never expires: cancelled when the first sync ends (acquire waits on it).
    asio::steady_timer first_sync;
    std::chrono::steady_clock::time_point last_sync{};
    // The fleet's last answer, and when it came (its durations count from then).
    std::optional<breaker_view> view;
    std::chrono::steady_clock::time_point viewed_at{};
    std::uint64_t applied_epoch = 0;  // the fleet's epoch this process has followed
    std::string applied_incarnation;  // ... in this incarnation of the fleet's breaker
    bool probe_applied = false;       // this process's breaker was let through for the probe

    explicit breaker_sync(const asio::any_io_executor& ex)
        : first_sync(ex, asio::steady_timer::time_point::max()) {}

    void take(const breaker_view& v) {
      if (v.what != breaker_view::state::probe) {
        probe_applied = false;
      }
      view = v;
      viewed_at = std::chrono::steady_clock::now();
    }
  };

  breaker_sync& breaker_of(const keel::llm::entry_config& e) {
    entry_refs& r = refs(e);
    if (r.bs == nullptr) {
      r.bs = &find_breaker(e);
    }
    return *r.bs;
  }

  breaker_sync& find_breaker(const keel::llm::entry_config& e) {
    const std::string key = fleet_key(sc_.key_prefix, e, "breaker");
    auto it = breakers_.find(key);
    if (it == breakers_.end()) {
      auto bs = std::make_unique<breaker_sync>(ex_);
      bs->shared = std::make_unique<shared_breaker>(
          redis_,
          breaker_options{
              .key = key,
              .failure_threshold = static_cast<std::size_t>(std::max(1, bc_.failure_threshold)),
              .break_duration = whole_ms(bc_.break_duration),
              // A probe is one call: give it its whole timeout before another may probe.
              .probe_timeout = std::max(probe_timeout_, std::chrono::milliseconds(std::llround(
                                                            2000 * e.timeout.value_or(0.0))))});
      it = breakers_.emplace(key, std::move(bs)).first;
    }
    return *it->second;
  }

  // Brings the fleet's last answer into this process's breaker.
  void apply(breaker_sync& bs, keel::circuit_breaker& breaker,
             std::chrono::steady_clock::time_point now) {
    if (!bs.view) {
      return;
    }
    using state = breaker_view::state;
    const breaker_view& v = *bs.view;
    const keel::breaker_state local = breaker.state();
    if (v.incarnation != bs.applied_incarnation && v.what != state::closed) {
      bs.applied_epoch = 0;  // a new incarnation: its epochs start again
      bs.applied_incarnation = v.incarnation;
    }
    // Changes made here are the fleet's: on_breaker_change must not publish them back.
    struct applying_guard {
      bool& flag;
      explicit applying_guard(bool& f) : flag(f) { flag = true; }
      ~applying_guard() { flag = false; }
      applying_guard(const applying_guard&) = delete;
      applying_guard& operator=(const applying_guard&) = delete;
    } guard(applying_);
    switch (v.what) {
      case state::open: {
        // The fleet's break: this process keeps to it, to its end.
        const auto until = bs.viewed_at + v.remaining;
        if (until > now) {
          if (local != keel::breaker_state::open || !breaker.open_until() ||
              *breaker.open_until() < until) {
            breaker.force_open_until(until);
          }
        } else if (now - until < breaker_sync_interval_ * 8) {
          // Over, by this (old) answer: no probe of its own before asking the fleet who probes.
          breaker.force_open_until(now + breaker_sync_interval_);
          bs.last_sync = {};
        }
        bs.applied_epoch = std::max(bs.applied_epoch, v.epoch);
        break;
      }
      case state::probing:
        // Another process probes: stay open, but only until the next look, so that its
        // success reaches this process within a sync interval (and never past the probe's
        // timeout).
        if (const auto until = std::min(now + breaker_sync_interval_, bs.viewed_at + v.remaining);
            until > now) {
          breaker.force_open_until(until);
        }
        bs.applied_epoch = std::max(bs.applied_epoch, v.epoch);
        break;
      case state::probe:
        // This process probes for the fleet (once): its breaker is half-open at its next call,
        // whose outcome it then tells the fleet (closed, or open again).
        if (!bs.probe_applied) {
          breaker.force_open_until(now + std::chrono::microseconds(1));
        }
        bs.probe_applied = true;
        bs.applied_epoch = std::max(bs.applied_epoch, v.epoch);
        break;
      case state::closed:
        // Closed by another process's probe since this one followed the fleet (or a new
        // incarnation of the fleet's breaker, whose epochs start again).
        if (v.epoch > bs.applied_epoch || v.incarnation != bs.applied_incarnation) {
          if (local == keel::breaker_state::open || local == keel::breaker_state::half_open) {
            breaker.reset();
          }
          bs.applied_epoch = v.epoch;
          bs.applied_incarnation = v.incarnation;
        }
        break;
    }
  }

  asio::any_io_executor ex_;
  keel::llm::shared_config sc_;
  // A sync at most this often per entry while calls are made (`shared.breaker_sync`).
  std::chrono::milliseconds breaker_sync_interval_ = whole_ms(sc_.breaker_sync);
  // A probe silent this long (or twice the entry's timeout, if longer) is given to another
  // process (`shared.probe_timeout`).
  std::chrono::milliseconds probe_timeout_ = whole_ms(sc_.probe_timeout);
  // A learned-rate sync at most this often per entry while calls are made (`shared.rate_sync`).
  std::chrono::milliseconds rate_sync_interval_ = whole_ms(sc_.rate_sync);
  keel::llm::breaker_config bc_;
  std::map<std::string, std::unique_ptr<breaker_sync>> breakers_;
  std::map<std::string, std::unique_ptr<rate_sync>> rates_;
  std::unordered_map<const keel::llm::entry_config*, entry_refs> refs_;
  const std::string empty_;
  bool applying_ = false;
  std::shared_ptr<bool> closed_ = std::make_shared<bool>(false);
  client redis_;
  std::map<std::string, buckets> map_;
};

namespace {

client_options options_of(const keel::llm::client_config& cfg) {
  const keel::llm::shared_config& sc = cfg.policy.shared;
  if (sc.redis.empty()) {
    throw keel::llm::config_error(cfg.source, "/policy/shared/redis", "no Redis URL");
  }
  client_options o;
  try {
    o.server = parse_url(sc.redis);
  } catch (const std::invalid_argument& e) {
    throw keel::llm::config_error(cfg.source, "/policy/shared/redis", e.what());
  }
  o.server.username = sc.username;
  o.server.password = sc.password;
  o.ca_file = sc.ca_file;
  o.command_timeout = whole_ms(sc.timeout);
  o.connect_timeout = std::max(o.command_timeout, std::chrono::milliseconds(250));
  return o;
}

}  // namespace

fleet::fleet(asio::any_io_executor ex, const keel::llm::client_config& cfg) {
  client_options o = options_of(cfg);
  try {
    impl_ = std::make_unique<fleet_impl>(ex, cfg.policy.shared, cfg.policy.breaker, std::move(o));
  } catch (const boost::system::system_error& e) {  // the CA file (TLS)
    throw keel::llm::config_error(
        cfg.source, "/policy/shared/ca_file",
        "cannot load \"" + cfg.policy.shared.ca_file + "\": " + e.code().message());
  }
}

fleet::~fleet() = default;

asio::awaitable<void> fleet::acquire(const keel::llm::entry_config& e, double tokens) {
  return impl_->acquire(e, tokens);
}

asio::awaitable<void> fleet::acquire_local(const keel::llm::entry_config& e, double tokens) {
  return impl_->acquire_local(e, tokens);
}

void fleet::on_server_delay(const keel::llm::entry_config& e, std::chrono::nanoseconds d) {
  impl_->on_server_delay(e, d);
}

void fleet::sync_pacing(const keel::llm::entry_config& e, keel::rate_controller& pacing) {
  impl_->sync_pacing(e, pacing);
}

void fleet::sync_breaker(const keel::llm::entry_config& e, keel::circuit_breaker& b) {
  impl_->sync_breaker(e, b);
}

void fleet::on_breaker_outcome(const keel::llm::entry_config& e, bool failure) {
  impl_->on_breaker_outcome(e, failure);
}

void fleet::on_breaker_change(const keel::llm::entry_config& e, keel::breaker_state from,
                              keel::breaker_state to, std::chrono::nanoseconds open_for) {
  impl_->on_breaker_change(e, from, to, open_for);
}

void fleet::close() {
  impl_->close();
}

}  // namespace keel::redis
