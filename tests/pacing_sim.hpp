// A virtual-time simulation of a batch client against a rate-limited server, for the rate
// controller's tests and for bench/pacing_sim.cpp.
#pragma once

// The server is a model of nginx `limit_req` (GCRA with `burst=b nodelay`: b + 1 requests pass at
// once from idle, then exactly r per second), optionally a token bucket on LLM tokens, a schedule
// of limit changes, a latency and random 5xx faults after admission. The client is what `keel
// batch` does: C workers take items in order; each attempt acquires the shared throttler, tells
// the controller, waits for the server, and on a 429 retries after Retry-After (or a full-jitter
// backoff when there is none), on a 5xx after a backoff. Everything runs on
// `keel::testing::manual_clock`, deterministic for a seed.

#include <keel/random.hpp>
#include <keel/rate_controller.hpp>
#include <keel/testing/manual_clock.hpp>
#include <keel/throttler.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

namespace pacing_sim {

using clock = keel::testing::manual_clock;
using std::chrono::duration;
using std::chrono::microseconds;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;

/// A change of the server's limits at `at` (from the start).
struct limit_change {
  nanoseconds at{0};
  double requests_per_second = 0;
  double tokens_per_minute = 0;
};

/// The simulated server.
struct server_spec {
  double requests_per_second = 200;  // 0: no request limit
  double burst = 20;                 // nginx burst: b + 1 pass at once
  double tokens_per_minute = 0;      // 0: no token limit
  double token_burst = 0;            // token bucket capacity (0: one second's worth)
  std::vector<limit_change> schedule;
  nanoseconds latency{microseconds(200)};         // answer latency of an admitted request
  nanoseconds latency_max{0};                     // > latency: uniform in [latency, latency_max]
  nanoseconds reject_latency{microseconds(200)};  // latency of a 429
  std::optional<nanoseconds> retry_after = std::chrono::seconds(1);  // constant; nullopt: none
  bool exact_retry_after = false;  // the limiter's exact wait instead of the constant
  double p_error = 0;              // probability of a 503 after admission
  double p_throttle = 0;           // probability of a 429 whatever the rate (a busy shared pool)
  nanoseconds arrival_jitter{0};   // each request reaches the server up to this much later
  bool advertise = false;          // send the limit (as rate-limit headers would)
};

/// The simulated client.
struct client_spec {
  std::size_t prompts = 2000;
  std::size_t concurrency = 64;
  int max_attempts = 6;
  nanoseconds backoff_base = milliseconds(500);
  nanoseconds backoff_cap = std::chrono::seconds(20);
  nanoseconds max_retry_after = std::chrono::seconds(60);
  double tokens_per_prompt = 100;  // mean estimated tokens per call
  double tokens_spread = 0;        // uniform +- this fraction
  bool paced = true;               // false: no controller (a plain retry loop)
  // The client process freezes (a loaded CI machine, a VM's steal, a GC-like pause): on average
  // every `stall_every` it runs nothing for a time uniform in [0, stall_max]; then everything
  // that fell due runs at once, late.
  nanoseconds stall_every{0};
  nanoseconds stall_max{0};
  keel::rate_controller_options pacing;
  std::uint64_t seed = 1;
  // A fleet: this many processes, each with `prompts` items, `concurrency` workers and a
  // throttler and controller of its own, against the one server.
  std::size_t processes = 1;
  // The fleet shares what it learns as keel::redis::fleet does (keel/redis/shared_rate.hpp):
  // every `sync_every` each process reports (its estimate, a new sample, its demand, its gain as
  // leader, a 429 in a followed probe) and applies the answer `sync_lag` later (the share, the
  // leader's gain, its role). Pauses and the script's round trip are not modelled.
  bool follow_leader = false;
  nanoseconds sync_every = milliseconds(100);
  nanoseconds sync_lag = microseconds(500);
};

/// One 100 ms bin of the run.
struct bin {
  double accepted = 0;  // admitted by the server, by admission time
  double rejected = 0;
  double rate = 0;            // controller's request rate at the end of the bin
  double limit = 0;           // server's request limit during the bin
  double estimate = 0;        // controller's request estimate at the end of the bin
  double token_rate = 0;      // controller's token rate (per second) at the end of the bin
  double token_estimate = 0;  // controller's token estimate (per second) at the end of the bin
  double noise = 0;           // controller's request noise share at the end of the bin
  keel::pacing_phase phase = keel::pacing_phase::unlimited;  // request phase at the end
};

/// What happened.
struct result {
  double wall_s = 0;
  std::size_t ok = 0;
  std::size_t failed = 0;
  std::size_t attempts = 0;
  std::size_t rejected = 0;
  std::size_t errors = 0;
  double p50_s = 0;
  double p99_s = 0;
  std::vector<bin> bins;
  keel::pacing_state final_requests;
  keel::pacing_state final_tokens;
  double max_noise = 0;  // the highest request noise any process held during the run
  double accepted_in(double from_s, double to_s) const {
    double n = 0;
    for (std::size_t i = 0; i < bins.size(); ++i) {
      const double t = static_cast<double>(i) * 0.1;
      if (t >= from_s - 1e-9 && t + 0.1 <= to_s + 1e-9) {
        n += bins[i].accepted;
      }
    }
    return n;
  }
};

class server_model {
 public:
  explicit server_model(const server_spec& s) : s_(s) {
    rps_ = s.requests_per_second;
    tpm_ = s.tokens_per_minute;
    req_level_ = s.burst + 1;
    tok_level_ = token_capacity();
  }

  struct decision {
    bool admitted = true;
    bool tokens = false;
    double wait_s = 0;
  };

  decision arrive(double t, double tokens) {
    apply_schedule(t);
    refill(t);
    decision d;
    double wait = 0;
    if (rps_ > 0 && req_level_ < 1) {
      wait = (1 - req_level_) / rps_;
    }
    if (tpm_ > 0) {
      const double need = std::min(tokens, token_capacity());
      if (tok_level_ < need) {
        const double tw = (need - tok_level_) / (tpm_ / 60);
        if (tw > wait) {
          d.tokens = true;
        }
        wait = std::max(wait, tw);
      }
    }
    if (wait > 0) {
      d.admitted = false;
      d.wait_s = wait;
      return d;
    }
    if (rps_ > 0) {
      req_level_ -= 1;
    }
    if (tpm_ > 0) {
      tok_level_ -= std::min(tokens, token_capacity());
    }
    return d;
  }

  double rps() const { return rps_; }
  double tpm() const { return tpm_; }

 private:
  double token_capacity() const {
    return s_.token_burst > 0 ? s_.token_burst : std::max(1.0, tpm_ / 60);
  }
  void apply_schedule(double t) {
    while (next_ < s_.schedule.size() &&
           t >= std::chrono::duration<double>(s_.schedule[next_].at).count()) {
      refill(t);
      const auto& c = s_.schedule[next_++];
      if (c.requests_per_second > 0) {
        rps_ = c.requests_per_second;
      }
      if (c.tokens_per_minute > 0) {
        tpm_ = c.tokens_per_minute;
      }
    }
  }
  void refill(double t) {
    const double dt = std::max(0.0, t - last_);
    last_ = std::max(last_, t);
    if (rps_ > 0) {
      req_level_ = std::min(s_.burst + 1, req_level_ + dt * rps_);
    }
    if (tpm_ > 0) {
      tok_level_ = std::min(token_capacity(), tok_level_ + dt * tpm_ / 60);
    }
  }

  server_spec s_;
  double rps_ = 0;
  double tpm_ = 0;
  double req_level_ = 0;
  double tok_level_ = 0;
  double last_ = 0;
  std::size_t next_ = 0;
};

namespace asio = boost::asio;

inline double seconds(clock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

/// Runs the batch to the end (or `limit` of virtual time) with time advancing by `tick`.
inline result run(const server_spec& ss, const client_spec& cs,
                  nanoseconds tick = microseconds(100),
                  nanoseconds limit = std::chrono::seconds(600)) {
  clock::reset();
  asio::io_context ctx;
  keel::random_source rng{cs.seed};
  // One process of the fleet (the only one, usually).
  struct process {
    keel::basic_throttler<clock> bucket;
    std::optional<keel::basic_rate_controller<clock>> pacing;
    std::size_t next = 0;
    explicit process(asio::io_context& c) : bucket{c.get_executor()} {}
  };
  std::vector<std::unique_ptr<process>> fleet;
  std::vector<std::unique_ptr<keel::random_source>> plateaus;
  const std::size_t processes = std::max<std::size_t>(1, cs.processes);
  for (std::size_t i = 0; i < processes; ++i) {
    fleet.push_back(std::make_unique<process>(ctx));
    keel::rate_controller_options po = cs.pacing;
    if (po.random == nullptr) {
      if (i == 0) {
        po.random = &rng;
      } else {
        plateaus.push_back(std::make_unique<keel::random_source>(cs.seed * 31 + i));
        po.random = plateaus.back().get();
      }
    }
    if (cs.paced) {
      fleet.back()->pacing.emplace(fleet.back()->bucket, po);
    }
  }
  server_model server{ss};
  result res;
  std::vector<double> latencies;
  std::size_t running = cs.concurrency * processes;
  auto bin_of = [&](double t) -> bin& {
    const auto i = static_cast<std::size_t>(std::max(0.0, t) / 0.1);
    if (res.bins.size() <= i) {
      res.bins.resize(i + 1);
    }
    return res.bins[i];
  };
  auto sleep = [&](nanoseconds d) -> asio::awaitable<void> {
    keel::basic_timer<clock> timer{ctx.get_executor()};
    timer.expires_after(d);
    co_await timer.async_wait(asio::use_awaitable);
  };
  auto backoff = [&](int attempt) {
    const double cap =
        std::min(std::chrono::duration<double>(cs.backoff_cap).count(),
                 std::chrono::duration<double>(cs.backoff_base).count() * std::exp2(attempt - 1));
    return std::chrono::duration_cast<nanoseconds>(duration<double>(rng.uniform() * cap));
  };
  keel::random_source faults{cs.seed * 7919 + 1};
  keel::random_source stalls{cs.seed * 104729 + 3};
  auto item = [&](process& pr) -> asio::awaitable<bool> {
    auto& bucket = pr.bucket;
    auto& pacing = pr.pacing;
    const double tokens = cs.tokens_per_prompt * (1 + cs.tokens_spread * (2 * rng.uniform() - 1));
    for (int attempt = 1;; ++attempt) {
      co_await bucket.acquire({1, tokens});
      typename keel::basic_rate_controller<clock>::ticket ticket{};
      if (pacing) {
        ticket = pacing->on_send({1, tokens});
      }
      ++res.attempts;
      if (ss.arrival_jitter > nanoseconds::zero()) {
        // Requests overtake each other on the way (connections, scheduling).
        co_await sleep(std::chrono::duration_cast<nanoseconds>(duration<double, std::nano>(
            faults.uniform() * static_cast<double>(ss.arrival_jitter.count()))));
      }
      const double t = seconds(clock::now());
      // A random 429 is decided before the limiter, which it does not charge.
      const bool noise = ss.p_throttle > 0 && faults.uniform() < ss.p_throttle;
      const auto d = noise ? server_model::decision{false, false, 0} : server.arrive(t, tokens);
      if (!d.admitted) {
        ++res.rejected;
        bin_of(t).rejected += 1;
        co_await sleep(ss.reject_latency);
        std::optional<nanoseconds> hint;
        if (ss.exact_retry_after) {
          hint = std::chrono::duration_cast<nanoseconds>(duration<double>(d.wait_s));
        } else if (ss.retry_after) {
          hint = *ss.retry_after;
        }
        if (pacing) {
          pacing->on_throttled(
              ticket, d.tokens ? keel::limit_kind::tokens : keel::limit_kind::requests, hint);
        }
        if (attempt >= cs.max_attempts) {
          co_return false;
        }
        co_await sleep(hint ? std::min(*hint, cs.max_retry_after) : backoff(attempt));
        continue;
      }
      bin_of(t).accepted += 1;
      nanoseconds lat = ss.latency;
      if (ss.latency_max > ss.latency) {
        lat += std::chrono::duration_cast<nanoseconds>(duration<double, std::nano>(
            faults.uniform() * static_cast<double>((ss.latency_max - ss.latency).count())));
      }
      const bool error = ss.p_error > 0 && faults.uniform() < ss.p_error;
      co_await sleep(lat);
      if (pacing) {
        pacing->on_accepted(ticket);
        if (ss.advertise) {
          pacing->on_advertised(server.rps() * 60, server.tpm() > 0
                                                       ? std::optional<double>(server.tpm())
                                                       : std::nullopt);
        }
      }
      if (error) {
        ++res.errors;
        if (attempt >= cs.max_attempts) {
          co_return false;
        }
        co_await sleep(backoff(attempt));
        continue;
      }
      co_return true;
    }
  };
  clock::time_point end{};
  for (auto& pr : fleet) {
    for (std::size_t w = 0; w < cs.concurrency; ++w) {
      asio::co_spawn(
          ctx,
          [&, p = pr.get()]() -> asio::awaitable<void> {
            while (p->next < cs.prompts) {
              ++p->next;
              const auto t0 = clock::now();
              const bool ok = co_await item(*p);
              latencies.push_back(std::chrono::duration<double>(clock::now() - t0).count());
              (ok ? res.ok : res.failed) += 1;
              end = std::max(end, clock::now());
            }
            --running;
          },
          asio::detached);
    }
  }
  // The fleet's state, as keel/redis/shared_rate.hpp's script keeps it: each member's latest
  // estimate and last sync, the leader, its published gain, a follower's hit, the limit.
  struct member_entry {
    double estimate = 0;  // 0: none yet
    double at = -1;       // last sync (seconds); -1: never
  };
  std::vector<member_entry> members(processes);
  double fleet_limit = 0;
  double published_gain = 0;
  bool probe_hit = false;
  std::optional<std::size_t> leader;
  if (cs.follow_leader && cs.paced && processes > 1) {
    for (std::size_t i = 0; i < processes; ++i) {
      asio::co_spawn(
          ctx,
          [&, i, p = fleet[i].get()]() -> asio::awaitable<void> {
            // What keel::redis::fleet keeps per process: what it reported, its role.
            std::uint64_t reported_samples = 0;
            std::uint64_t reported_rejections = 0;
            clock::duration queued_seen{};
            bool leading = false;
            bool following = false;
            // Each member syncs every `sync_every`, from a start of its own.
            co_await sleep(std::chrono::duration_cast<nanoseconds>(cs.sync_every * (i + 1)) /
                           static_cast<long>(processes + 1));
            // A member that has started its last item stops syncing, as a process that stops
            // calling does (it then drops out after the member window).
            while (p->next < cs.prompts) {
              const keel::pacing_state st = p->pacing->requests();
              const double t = seconds(clock::now());
              // The report.
              const bool learned =
                  st.phase == keel::pacing_phase::cruise || st.phase == keel::pacing_phase::probe;
              const auto queued = p->bucket.total_queued_time();
              const bool wants_lead = p->bucket.waiters() > 0 || queued > queued_seen;
              queued_seen = queued;
              const bool new_sample = learned && st.samples > reported_samples;
              const bool hit = following && st.rejections > reported_rejections;
              reported_samples = st.samples;
              reported_rejections = st.rejections;
              // The script.
              std::size_t active = 0;
              for (std::size_t j = 0; j < processes; ++j) {
                if (members[j].at >= 0 && t - members[j].at > 1.0) {
                  members[j] = member_entry{};  // gone
                  if (leader == j) {
                    leader.reset();
                    published_gain = 0;
                    probe_hit = false;
                  }
                }
              }
              members[i].at = t;
              if (learned) {
                members[i].estimate = st.estimate;
              }
              double sum = 0;
              std::size_t reporting = 0;
              for (const member_entry& m : members) {
                if (m.at >= 0) {
                  ++active;
                  if (m.estimate > 0) {
                    sum += m.estimate;
                    ++reporting;
                  }
                }
              }
              if (leader == i && !wants_lead) {
                leader.reset();
                published_gain = 0;
                probe_hit = false;
              } else if (!leader && wants_lead) {
                leader = i;
              }
              bool answer_hit = false;
              double answer_gain = 0;
              if (leader == i) {
                published_gain = leading ? st.gain : 0;
                answer_hit = probe_hit;
                probe_hit = false;
              } else {
                answer_gain = published_gain;
                if (hit && published_gain > 0) {
                  probe_hit = true;
                }
              }
              if (new_sample && reporting > 0) {
                fleet_limit = sum * static_cast<double>(active) / static_cast<double>(reporting);
              }
              const double share = fleet_limit > 0 ? fleet_limit / static_cast<double>(active) : 0;
              const bool is_leader = leader == i;
              // The answer, applied a little later.
              co_await sleep(cs.sync_lag);
              if (share > 0 && p->pacing->requests().samples == reported_samples) {
                p->pacing->adopt_share(share);
              }
              if (is_leader) {
                p->pacing->lead();
                if (answer_hit) {
                  p->pacing->end_probe();
                }
              } else {
                p->pacing->follow_probes(answer_gain);
              }
              leading = is_leader;
              following = !is_leader && answer_gain > 0;
              co_await sleep(cs.sync_every - cs.sync_lag);
            }
          },
          asio::detached);
    }
  }
  auto& pacing = fleet[0]->pacing;
  keel::testing::run_until(
      ctx,
      [&] {
        // Every tick overwrites its bin, so each bin ends with the state at its last tick. (A
        // sample taken only when t * 10 crossed an integer missed the bins whose start
        // bin_of() rounds down, e.g. 4.1 / 0.1 = 40.999..., and left them at rate 0.)
        bin& b = bin_of(seconds(clock::now()));
        b.limit = server.rps();
        for (const auto& pr : fleet) {
          if (pr->pacing) {
            res.max_noise = std::max(res.max_noise, pr->pacing->requests().noise);
          }
        }
        if (pacing) {
          const keel::pacing_state r = pacing->requests();
          const keel::pacing_state k = pacing->tokens();
          b.rate = r.rate;
          b.estimate = r.estimate;
          b.noise = r.noise;
          b.phase = r.phase;
          b.token_rate = k.rate;
          b.token_estimate = k.estimate;
        }
        if (cs.stall_every > nanoseconds::zero() && cs.stall_max > nanoseconds::zero() &&
            stalls.uniform() <
                static_cast<double>(tick.count()) / static_cast<double>(cs.stall_every.count())) {
          clock::advance(std::chrono::duration_cast<nanoseconds>(duration<double, std::nano>(
              stalls.uniform() * static_cast<double>(cs.stall_max.count()))));
        }
        return running == 0;
      },
      limit, tick);
  res.wall_s = seconds(end);
  std::sort(latencies.begin(), latencies.end());
  if (!latencies.empty()) {
    res.p50_s = latencies[latencies.size() / 2];
    res.p99_s = latencies[std::min(latencies.size() - 1, latencies.size() * 99 / 100)];
  }
  if (pacing) {
    res.final_requests = pacing->requests();
    res.final_tokens = pacing->tokens();
  }
  return res;
}

}  // namespace pacing_sim
