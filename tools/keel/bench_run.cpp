// `keel bench`'s one run: generated prompts through a keel::llm::client with worker coroutines,
// against the in-process mock on its own thread (or --url), every attempt recorded on a
// timeline, and the run's measurements as results.json's run object.
#include "bench.hpp"
#include "bench_detail.hpp"

#include <keel/llm/client.hpp>
#include <keel/llm/config.hpp>
#include "jsonl.hpp"
#include "stats.hpp"

#include <keel/classify.hpp>
#include <keel/http/client.hpp>
#include <keel/llm/tokens.hpp>
#include <keel/rate_controller.hpp>
#include <keel/testing/mock_llm_server.hpp>
#include <keel/testing/mock_llm_thread.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <sys/resource.h>
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace keel::cli {

using namespace bench_detail;

namespace {

namespace asio = boost::asio;

double cpu_seconds(int who) {
  rusage ru{};
  if (::getrusage(who, &ru) != 0) {
    return 0;
  }
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

double peak_rss_mib() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // Linux reports KiB
}

double current_rss_mib() {
  std::ifstream f("/proc/self/statm");
  long long size = 0;
  long long resident = 0;
  if (!(f >> size >> resident)) {
    return 0;
  }
  return static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) /
         (1024.0 * 1024.0);
}

// Everything one run observes, fed by the client's hooks and the workers.
struct recorder {
  clock_type::time_point t0 = clock_type::now();
  clock_type::time_point t_end = t0;
  std::vector<int> attempts_of;  // per item
  std::vector<std::uint32_t> bin_attempts, bin_repeats, bin_ok, bin_failed, bin_429;
  std::vector<std::uint64_t> bin_ok_tokens;  // tokens the server reported for the successes
  std::uint64_t attempts = 0, retries = 0, http_429 = 0, fallbacks = 0, breaker_opens = 0;
  std::uint64_t bucket_waits = 0, delays_from_hint = 0;
  double bucket_wait_s = 0, backoff_429_s = 0;
  std::vector<std::uint64_t> delay_counts = std::vector<std::uint64_t>(delay_edges.size(), 0);
  std::map<int, std::uint64_t> by_status;
  std::map<std::string, std::uint64_t> attempts_by_entry, failed_by_class;
  std::vector<double> latencies, ok_latencies;
  std::size_t ok = 0, failed = 0, fallback_answers = 0;

  explicit recorder(std::size_t items) : attempts_of(items, 0) {}

  template <class T>
  void bump(std::vector<T>& bins, clock_type::time_point t, T by = 1) {
    const double s = std::max(0.0, seconds_between(t0, t));
    const auto i = static_cast<std::size_t>(s / bin_seconds);
    if (bins.size() <= i) {
      bins.resize(i + 1, 0);
    }
    bins[i] += by;
  }

  llm::client_hooks hooks(const llm::client_config& cfg) {
    llm::client_hooks h;
    h.on_attempt = [this, &cfg](const llm::attempt_report& r) {
      const auto sent = clock_type::now() - std::chrono::duration_cast<clock_type::duration>(
                                                std::chrono::duration<double>(r.seconds));
      ++attempts;
      bump(bin_attempts, sent);
      const auto* item = static_cast<const batch_item*>(r.context);
      const std::size_t i = item ? item->line - 1 : 0;
      if (i < attempts_of.size() && attempts_of[i]++ > 0) {
        bump(bin_repeats, sent);
      }
      ++by_status[r.status];
      ++attempts_by_entry[cfg.entries[r.entry].name()];
      if (r.status == 429) {
        ++http_429;
        bump(bin_429, sent);
      }
    };
    h.on_retry = [this](const llm::retry_report& r) {
      ++retries;
      const double d = std::chrono::duration<double>(r.delay).count();
      std::size_t b = 0;
      while (b + 1 < delay_edges.size() && d >= delay_edges[b + 1]) {
        ++b;
      }
      ++delay_counts[b];
      if (r.from_server_hint) {
        ++delays_from_hint;
      }
      if (keel::classify(r.error).condition == keel::condition::throttled) {
        backoff_429_s += d;
      }
    };
    h.on_fallback = [this](const void*, std::size_t, std::size_t, std::exception_ptr) {
      ++fallbacks;
    };
    h.on_breaker = [this](std::size_t, keel::breaker_state, keel::breaker_state to) {
      if (to == keel::breaker_state::open) {
        ++breaker_opens;
      }
    };
    h.on_throttle_wait = [this](std::size_t, std::chrono::nanoseconds d) {
      ++bucket_waits;
      bucket_wait_s += std::chrono::duration<double>(d).count();
    };
    return h;
  }

  void complete(const llm::call_outcome& out) {
    const auto now = clock_type::now();
    t_end = std::max(t_end, now);
    latencies.push_back(out.seconds);
    if (out.response) {
      ++ok;
      ok_latencies.push_back(out.seconds);
      fallback_answers += out.entry != 0 ? 1 : 0;
      bump(bin_ok, now);
      const long long used = out.response->usage.input + out.response->usage.output;
      bump(bin_ok_tokens, now, static_cast<std::uint64_t>(std::max(0LL, used)));
    } else {
      ++failed;
      // The deciding error's class, and why retrying or falling back stopped.
      const json e = llm::error_json(out.error);
      const std::string why = e.value("gave_up", "");
      ++failed_by_class[llm::error_class(out.error) + (why.empty() ? "" : " (" + why + ")")];
      bump(bin_failed, now);
    }
  }
};

json status_map(const std::map<int, std::uint64_t>& m) {
  json j = json::object();
  for (const auto& [status, n] : m) {
    j[std::to_string(status)] = n;
  }
  return j;
}

// `n` prompts; with `pad_to` > 0 every prompt is padded to exactly that many bytes.
std::vector<batch_item> make_items(std::size_t n, std::size_t pad_to = 0) {
  static const char* const topics[] = {
      "the incident report",    "this support ticket", "the release notes",    "the customer email",
      "the meeting transcript", "the pull request",    "the on-call handover", "the postmortem"};
  static const std::string filler =
      " The service answered slowly for an hour while the queue grew, the on-call engineer "
      "raised the worker count, the database connection pool ran dry, and the retries of every "
      "client doubled the load until the circuit breakers opened and the backlog drained.";
  std::vector<batch_item> items;
  items.reserve(n);
  for (std::size_t i = 1; i <= n; ++i) {
    std::string prompt =
        std::string("Summarise ") + topics[i % 8] + " #" + std::to_string(i) + " in two sentences.";
    if (pad_to > 0) {
      while (prompt.size() < pad_to) {
        prompt += filler;
      }
      prompt.resize(pad_to);
    }
    const std::string line = json{{"id", i}, {"prompt", prompt}, {"max_tokens", 128}}.dump();
    auto parsed = parse_input_line(line, i, 1024);
    items.push_back(std::move(std::get<batch_item>(parsed)));
  }
  return items;
}

json pacing_json(const keel::pacing_state& p) {
  return {{"phase", keel::to_string(p.phase)},
          {"rate", round_to(p.rate, 3)},
          {"estimate", round_to(p.estimate, 3)},
          {"window", round_to(p.window, 2)},
          {"samples", p.samples},
          {"rejections", p.rejections}};
}

// What the server allows and what the client's controller believes, sampled once per bin (at
// its middle) on the client's thread.
struct rate_sampler {
  std::vector<double> limit_rps, limit_tpm;    // the mock's limit in force
  std::vector<double> rate_rps, estimate_rps;  // the controller's request dimension
  std::vector<double> rate_tps, estimate_tps;  // its token dimension (estimated tokens)
  std::vector<std::string> phase;              // the request dimension's phase
  bool any_tokens = false;

  void sample(const keel::testing::mock_llm_thread* mock, const std::string& model,
              const keel::rate_controller* controller) {
    if (mock) {
      const auto l = mock->current_limit(model);
      limit_rps.push_back(l.requests_per_second);
      limit_tpm.push_back(l.tokens_per_minute);
    }
    if (controller) {
      const keel::pacing_state r = controller->requests();
      const keel::pacing_state t = controller->tokens();
      rate_rps.push_back(round_to(r.rate, 2));
      estimate_rps.push_back(round_to(r.estimate, 2));
      rate_tps.push_back(round_to(t.rate, 1));
      estimate_tps.push_back(round_to(t.estimate, 1));
      phase.push_back(keel::to_string(r.phase));
      any_tokens = any_tokens || t.phase != keel::pacing_phase::unlimited;
    }
  }

  // Adds the series that carry information to `timeline`, cut to `bins` samples.
  void to_json(json& timeline, std::size_t bins) {
    auto cut = [bins](auto v) {
      v.resize(std::min(v.size(), bins));
      return v;
    };
    auto nonzero = [](const std::vector<double>& v) {
      return std::any_of(v.begin(), v.end(), [](double x) { return x > 0; });
    };
    timeline["sampled_at"] = "the middle of each bin";
    if (nonzero(limit_rps)) {
      timeline["limit_rps"] = cut(limit_rps);
    }
    if (nonzero(limit_tpm)) {
      timeline["limit_tpm"] = cut(limit_tpm);
    }
    if (!phase.empty()) {
      timeline["pacing_phase"] = cut(phase);
      timeline["pacing_rate_rps"] = cut(rate_rps);
      timeline["pacing_estimate_rps"] = cut(estimate_rps);
      if (any_tokens) {
        timeline["pacing_rate_tps"] = cut(rate_tps);
        timeline["pacing_estimate_tps"] = cut(estimate_tps);
      }
    }
  }
};

}  // namespace

json run_bench_scenario(const bench_run_spec& spec, const bench_options& opts) {
  const double rss_start = current_rss_mib();
  std::unique_ptr<keel::testing::mock_llm_thread> mock;
  std::string url = opts.url;
  if (url.empty()) {
    keel::testing::mock_options mo;
    mo.seed = opts.seed;
    mock = std::make_unique<keel::testing::mock_llm_thread>(
        keel::testing::scenario::from_json(
            bench_scenario_json(spec.fault, spec.rate > 0 ? spec.rate : bench_default_rate)),
        mo);
    url = mock->base_url();
  }
  const llm::client_config cfg = bench_config(spec, url, opts);
  const bool token_mix = spec.fault == "token_limited";
  const std::vector<batch_item> items =
      make_items(spec.prompts, token_mix ? token_prompt_bytes : 0);
  recorder rec(items.size());
  rate_sampler sampler;
  json pacing = nullptr;
  double client_cpu = 0;
  {
    asio::io_context ctx(1);
    auto ex = ctx.get_executor();
    keel::http::client_options ho;
    ho.max_connections_per_host =
        std::min(max_connections, static_cast<std::size_t>(std::max(1, spec.concurrency)));
    keel::http::client http(ex, ho);
    llm::bucket_registry buckets(ex, opts.seed);
    llm::client_options co;
    co.shared_pacing = bench_paced_policy(spec.policy);
    co.hold_open_breaker = co.shared_pacing;  // as `keel batch`
    co.keep_raw = false;                      // as `keel batch`
    // keel's policies run as `keel batch` does: attempt slots, and spare workers that use the
    // slots of sleeping items. The common clients hold their worker while they sleep.
    const std::size_t slots = static_cast<std::size_t>(std::max(1, spec.concurrency));
    if (co.shared_pacing) {
      co.attempt_slots = slots;
    }
    llm::client client(ex, cfg, http, buckets, rec.hooks(cfg), opts.seed, co);
    // The primary entry's bucket (created by the client) and its controller, if it has one.
    keel::throttler& primary_bucket = buckets.get(cfg.entries.front());
    const keel::rate_controller* controller = buckets.pacing(primary_bucket);

    std::size_t next = 0;
    std::size_t running = slots + (co.attempt_slots > 0 ? llm::spare_workers(slots) : 0);
    const double cpu0 = cpu_seconds(RUSAGE_THREAD);
    rec.t0 = clock_type::now();
    rec.t_end = rec.t0;
    const std::size_t workers = running;
    // Samples the real limit and the controller at the middle of every 100 ms bin until the
    // last worker stops the context (which abandons this coroutine where it waits).
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          asio::steady_timer timer(ctx);
          for (std::size_t k = 0;; ++k) {
            timer.expires_at(rec.t0 + std::chrono::duration_cast<clock_type::duration>(
                                          std::chrono::duration<double>((k + 0.5) * bin_seconds)));
            co_await timer.async_wait(asio::use_awaitable);
            sampler.sample(mock.get(), cfg.entries.front().model, controller);
          }
        },
        asio::detached);
    for (std::size_t w = 0; w < workers; ++w) {
      asio::co_spawn(
          ctx,
          [&]() -> asio::awaitable<void> {
            while (next < items.size()) {
              const std::size_t i = next++;
              const llm::call_outcome out = co_await client.call(items[i].request, &items[i]);
              rec.complete(out);
            }
            // Idle pooled connections keep the context busy: stop it after the last worker.
            if (--running == 0) {
              ctx.stop();
            }
          },
          [](std::exception_ptr e) {
            if (e) {
              std::rethrow_exception(e);
            }
          });
    }
    ctx.run();
    client_cpu = cpu_seconds(RUSAGE_THREAD) - cpu0;
    if (controller) {
      pacing = {{"bucket", cfg.entries.front().name()},
                {"requests", pacing_json(controller->requests())},
                {"tokens", pacing_json(controller->tokens())}};
    }
  }
  json server;
  double mock_cpu = 0;
  if (mock) {
    const auto st = mock->stats();
    server["requests"] = st.total.requests;
    server["by_status"] = status_map(st.total.by_status);
    mock_cpu = mock->stop();
  }

  const double wall = seconds_between(rec.t0, rec.t_end);
  const double prompts = static_cast<double>(spec.prompts);
  json j;
  j["fault"] = spec.fault;
  j["policy"] = spec.policy;
  j["concurrency"] = spec.concurrency;
  j["prompts"] = spec.prompts;
  if (spec.rate > 0) {
    j["rate"] = spec.rate;
  }
  j["endpoint"] = opts.url.empty() ? "in-process mock" : opts.url;
  j["wall_s"] = round_to(wall, 4);
  const std::optional<double> ideal = mock ? bench_ideal_seconds(spec) : std::nullopt;
  j["ideal_s"] = ideal ? json(round_to(*ideal, 4)) : json(nullptr);
  j["wall_over_ideal"] = ideal && *ideal > 0 ? json(round_to(wall / *ideal, 4)) : json(nullptr);
  j["ok"] = rec.ok;
  j["failed"] = rec.failed;
  j["success_ratio"] = round_to(static_cast<double>(rec.ok) / prompts, 5);
  j["goodput_per_s"] = round_to(wall > 0 ? static_cast<double>(rec.ok) / wall : 0, 2);
  j["attempts"] = rec.attempts;
  j["attempts_per_prompt"] = round_to(static_cast<double>(rec.attempts) / prompts, 4);
  j["attempts_over_prompts"] = j["attempts_per_prompt"];
  j["retries"] = rec.retries;
  j["fallbacks"] = rec.fallbacks;
  j["fallback_answers"] = rec.fallback_answers;
  j["breaker_opens"] = rec.breaker_opens;
  j["http_429"] = rec.http_429;
  j["attempts_by_status"] = status_map(rec.by_status);
  j["attempts_by_entry"] = rec.attempts_by_entry;
  j["failed_by_class"] = rec.failed_by_class;
  double sum = 0;
  for (double v : rec.latencies) {
    sum += v;
  }
  j["latency_s"] = {
      {"p50", round_to(percentile(rec.latencies, 50), 4)},
      {"p90", round_to(percentile(rec.latencies, 90), 4)},
      {"p99", round_to(percentile(rec.latencies, 99), 4)},
      {"max", round_to(percentile(rec.latencies, 100), 4)},
      {"mean",
       round_to(rec.latencies.empty() ? 0 : sum / static_cast<double>(rec.latencies.size()), 4)}};
  // CDF of successful answers as a share of all prompts: it levels off at the success ratio.
  std::sort(rec.ok_latencies.begin(), rec.ok_latencies.end());
  json cdf = json::array();
  if (!rec.ok_latencies.empty()) {
    const std::size_t n = rec.ok_latencies.size();
    std::size_t last = n;  // none yet
    for (int k = 0; k <= 200; ++k) {
      const auto i = static_cast<std::size_t>(
          std::llround(static_cast<double>(k) / 200.0 * static_cast<double>(n - 1)));
      if (i == last) {
        continue;
      }
      last = i;
      cdf.push_back(
          {round_to(rec.ok_latencies[i], 5), round_to(static_cast<double>(i + 1) / prompts, 5)});
    }
  }
  j["ok_latency_cdf"] = cdf;
  j["throttled_s"] = {{"total", round_to(rec.bucket_wait_s + rec.backoff_429_s, 3)},
                      {"bucket_wait", round_to(rec.bucket_wait_s, 3)},
                      {"backoff_after_429", round_to(rec.backoff_429_s, 3)},
                      {"bucket_waits", rec.bucket_waits}};
  j["cpu_s"] = {{"client_thread", round_to(client_cpu, 3)},
                {"mock_thread", round_to(mock_cpu, 3)},
                {"process", round_to(cpu_seconds(RUSAGE_SELF), 3)}};
  j["rss_mib"] = {{"peak", round_to(peak_rss_mib(), 1)}, {"at_start", round_to(rss_start, 1)}};
  json edges = json::array();
  for (double e : delay_edges) {
    edges.push_back(e);
  }
  j["retry_delay_histogram"] = {{"lower_edges_s", edges},
                                {"counts", rec.delay_counts},
                                {"from_server_hint", rec.delays_from_hint}};
  // Every bin array covers the whole run.
  const auto bins = static_cast<std::size_t>(std::ceil(wall / bin_seconds));
  for (auto* v :
       {&rec.bin_attempts, &rec.bin_repeats, &rec.bin_ok, &rec.bin_failed, &rec.bin_429}) {
    v->resize(std::max(bins, v->size()), 0);
  }
  j["timeline"] = {{"bin_s", bin_seconds},       {"attempts", rec.bin_attempts},
                   {"repeats", rec.bin_repeats}, {"ok", rec.bin_ok},
                   {"failed", rec.bin_failed},   {"http_429", rec.bin_429}};
  sampler.to_json(j["timeline"], bins);
  if (token_mix) {
    rec.bin_ok_tokens.resize(std::max(bins, rec.bin_ok_tokens.size()), 0);
    j["timeline"]["ok_tokens"] = rec.bin_ok_tokens;
    j["token_cost"] = {
        {"server", mock_tokens(token_prompt_bytes)},
        {"client_estimate", items.empty() ? 0
                                          : static_cast<long long>(keel::llm::estimate_tokens(
                                                items.front().request))}};
  }
  if (!pacing.is_null()) {
    j["pacing"] = pacing;
  }
  if (mock) {
    j["server"] = server;
  }
  return j;
}

}  // namespace keel::cli
