// `keel batch`'s client hooks: what every attempt, retry, fallback, breaker change, rate-limit
// wait and hold adds to the summary, the Prometheus metrics and the log.
#include "batch_detail.hpp"

#include "jsonl.hpp"

#include <keel/llm/error.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace keel::cli::batch_detail {

using nlohmann::json;

namespace {

// The batch item behind a client hook's context: every call of a batch passes its item; `keel
// serve`'s calls pass none (an empty item: no id, no prompt in the logs).
const batch_item& item_of(const void* context) {
  static const batch_item none{};
  return context == nullptr ? none : *static_cast<const batch_item*>(context);
}

double breaker_state_value(keel::breaker_state s) {
  switch (s) {
    case keel::breaker_state::closed:
      return 0;
    case keel::breaker_state::half_open:
      return 1;
    case keel::breaker_state::open:
    case keel::breaker_state::isolated:
      return 2;
  }
  return 0;
}

}  // namespace

std::string seconds_text(std::chrono::nanoseconds d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3fs", std::chrono::duration<double>(d).count());
  return buf;
}

void watch_pacing(llm::bucket_registry& buckets, metrics_registry& m, logger& log) {
  buckets.on_pacing = [&m, &log](const std::string& name, const keel::pacing_state& r,
                                 const keel::pacing_state& t) {
    // Phase changes and new estimates (not every probe step): what the controller learned.
    m.gauge("keel_pacing_rate", "Rate the bucket paces at (requests per second; 0: unlimited).",
            {{"bucket", name}})
        .set(r.rate);
    m.gauge("keel_pacing_estimate",
            "The server's request limit as learned or stated (requests per second; 0: unknown).",
            {{"bucket", name}})
        .set(r.estimate);
    m.gauge("keel_pacing_token_estimate",
            "The server's token limit as learned or stated (tokens per minute; 0: unknown).",
            {{"bucket", name}})
        .set(t.estimate * 60);
    json f;
    f["bucket"] = name;
    f["phase"] = keel::to_string(r.phase);
    if (r.estimate > 0) {
      f["limit_rps"] = std::round(r.estimate * 100) / 100;
      f["rate_rps"] = std::round(r.rate * 100) / 100;
    }
    if (r.noise > 0) {
      f["noise"] = std::round(r.noise * 1000) / 1000;  // 429s refused whatever the rate
    }
    if (t.phase != keel::pacing_phase::unlimited) {
      f["token_phase"] = keel::to_string(t.phase);
      if (t.estimate > 0) {
        f["limit_tpm"] = std::round(t.estimate * 60);
      }
    }
    log.log(log_level::info, "pacing", "", f);
  };
}

llm::client_hooks batch_hooks(const llm::client_config& cfg, batch_stats& st, metrics_registry& m,
                              logger& log) {
  llm::client_hooks hooks;
  // The series every attempt touches, per entry, looked up once: a registry lookup builds and
  // checks a label set (with the entry's name and the bucket bounds copied), which was 3% of
  // keel serve's instructions per request. Series live as long as the registry.
  struct entry_series {
    std::string name;
    keel::cli::histogram* latency = nullptr;
    std::vector<std::pair<std::string, keel::cli::counter*>> attempts;  // by class
  };
  auto series = std::make_shared<std::vector<entry_series>>(cfg.entries.size());
  hooks.on_attempt = [&cfg, &st, &m, series](const llm::attempt_report& r) {
    entry_series& e = (*series)[r.entry];
    if (e.latency == nullptr) {
      e.name = cfg.entries[r.entry].name();
      e.latency =
          &m.histogram("keel_attempt_latency_seconds", "Time from send to answer of each attempt.",
                       latency_buckets, {{"model", e.name}});
    }
    ++st.attempts;
    ++st.attempts_by_model[e.name];
    if (r.status == 429) {
      ++st.http_429;
    }
    std::string cls = llm::error_class(r.error);
    keel::cli::counter* attempts = nullptr;
    for (const auto& [c, counter] : e.attempts) {
      if (c == cls) {
        attempts = counter;
        break;
      }
    }
    if (attempts == nullptr) {
      attempts = &m.counter("keel_attempts_total", "HTTP attempts, by entry and outcome class.",
                            {{"model", e.name}, {"class", cls}});
      e.attempts.emplace_back(std::move(cls), attempts);
    }
    attempts->inc();
    e.latency->observe(r.seconds);
  };
  hooks.on_retry = [&cfg, &st, &m, &log](const llm::retry_report& r) {
    const std::string cause = llm::error_class(r.error);
    ++st.retries;
    ++st.retries_by_cause[cause];
    m.counter("keel_retries_total", "Retries, by the class of the error that caused them.",
              {{"cause", cause}})
        .inc();
    if (log.enabled(log_level::warning)) {
      json f;
      if (r.context != nullptr) {
        f["id"] = item_of(r.context).id;
      }
      f["attempt"] = r.attempt;
      f["class"] = cause;
      if (const int status = llm::error_status(r.error)) {
        f["status"] = status;
      }
      f["delay"] = seconds_text(r.delay);
      if (r.from_server_hint) {
        f["delay_from"] = "server";
      }
      f["model"] = cfg.entries[r.entry].name();
      if (r.context != nullptr) {
        f["prompt"] = item_of(r.context).preview;
      }
      log.log(log_level::warning, "retry", "", f);
    }
  };
  hooks.on_fallback = [&cfg, &st, &m, &log](const void* context, std::size_t from, std::size_t to,
                                            std::exception_ptr e) {
    ++st.fallbacks;
    m.counter("keel_fallbacks_total", "Moves from one entry to the next.",
              {{"from", cfg.entries[from].name()}, {"to", cfg.entries[to].name()}})
        .inc();
    log.log(log_level::info, "fallback", "",
            {{"id", item_of(context).id},
             {"from", cfg.entries[from].name()},
             {"to", cfg.entries[to].name()},
             {"class", llm::error_class(e)}});
  };
  hooks.on_breaker = [&cfg, &st, &m, &log](std::size_t entry, keel::breaker_state from,
                                           keel::breaker_state to) {
    const std::string& name = cfg.entries[entry].name();
    if (to == keel::breaker_state::open) {
      ++st.breaker_opens;
      m.counter("keel_breaker_opens_total", "Times a breaker opened.", {{"model", name}}).inc();
    }
    m.gauge("keel_breaker_state", "Breaker state per entry: 0 closed, 1 half-open, 2 open.",
            {{"model", name}})
        .set(breaker_state_value(to));
    log.log(to == keel::breaker_state::open ? log_level::warning : log_level::info, "breaker", "",
            {{"model", name}, {"from", keel::to_string(from)}, {"to", keel::to_string(to)}});
  };
  hooks.on_throttle_wait = [&cfg, &st, &m](std::size_t entry, std::chrono::nanoseconds d) {
    const double s = std::chrono::duration<double>(d).count();
    ++st.throttle_waits;
    st.throttled_seconds += s;
    m.counter("keel_throttle_waits_total", "Attempts that waited for rate-limit capacity.",
              {{"model", cfg.entries[entry].name()}})
        .inc();
    m.counter("keel_throttle_wait_seconds_total", "Time attempts waited for rate-limit capacity.",
              {{"model", cfg.entries[entry].name()}})
        .inc(s);
  };
  hooks.on_hold = [&cfg, &st, &m, &log](std::size_t entry, const void* context,
                                        std::chrono::nanoseconds left) {
    ++st.breaker_holds;
    m.counter("keel_breaker_holds_total",
              "Times an item waited for an open breaker's probe (no fallback left).",
              {{"model", cfg.entries[entry].name()}})
        .inc();
    if (log.enabled(log_level::debug)) {
      log.log(log_level::debug, "hold", "",
              {{"id", item_of(context).id},
               {"model", cfg.entries[entry].name()},
               {"probe_in", seconds_text(left)}});
    }
  };
  hooks.on_unanswered = [&cfg, &log](std::size_t entry, const std::exception_ptr& last_error) {
    log.log(log_level::warning, "unanswered",
            "no HTTP answer since the first failure (policy.breaker.unanswered_grace): its items "
            "now fail with circuit_open instead of waiting; check base_url, the network and TLS",
            {{"model", cfg.entries[entry].name()},
             {"class", last_error ? llm::error_class(last_error) : std::string("none")}});
  };
  hooks.on_hedge = [&cfg, &st, &m, &log](std::size_t entry, const void* context,
                                         std::size_t attempt, std::size_t to) {
    ++st.hedges;
    m.counter("keel_hedges_total", "Hedged copies of slow attempts (policy.hedge).",
              {{"from", cfg.entries[entry].name()}, {"to", cfg.entries[to].name()}})
        .inc();
    if (log.enabled(log_level::info)) {
      log.log(log_level::info, "hedge", "",
              {{"id", item_of(context).id},
               {"attempt", attempt},
               {"from", cfg.entries[entry].name()},
               {"to", cfg.entries[to].name()}});
    }
  };
  // Redis unreachable (policy.shared): the attempt went on under its own bucket. One WARNING
  // per 10 s at most, with how many attempts it concerned.
  hooks.on_fleet_pacing_error = [&cfg, &m, &log, last = std::chrono::steady_clock::time_point{},
                                 since = std::uint64_t{0}](std::size_t entry,
                                                           const std::exception_ptr& e) mutable {
    ++since;
    m.counter("keel_fleet_pacing_errors_total",
              "Attempts paced by their own process because the shared state (policy.shared) "
              "could not be reached.",
              {{"model", cfg.entries[entry].name()}})
        .inc();
    const auto now = std::chrono::steady_clock::now();
    if (now - last >= std::chrono::seconds(10) && log.enabled(log_level::warning)) {
      log.log(log_level::warning, "fleet_pacing_unavailable",
              "shared pacing unavailable; pacing by this process's local share of the limit",
              {{"model", cfg.entries[entry].name()},
               {"attempts", since},
               {"error", keel::describe(e)}});
      last = now;
      since = 0;
    }
  };
  hooks.on_fleet_pacing_restored = [&cfg, &log](std::size_t entry) {
    if (log.enabled(log_level::warning)) {
      log.log(log_level::warning, "fleet_pacing_restored",
              "shared pacing reachable again; pacing by the fleet's bucket",
              {{"model", cfg.entries[entry].name()}});
    }
  };
  return hooks;
}

}  // namespace keel::cli::batch_detail
