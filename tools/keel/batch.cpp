// `keel batch`: workers, records, signals, progress, metrics and the summary.
#include "batch.hpp"

#include <keel/llm/client.hpp>
#include "jsonl.hpp"
#include "line_feed.hpp"
#include "metrics.hpp"

#include <keel/http/client.hpp>
#include <keel/llm/error.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <stdexcept>
#include <unordered_map>

namespace keel::cli {
namespace asio = boost::asio;
using nlohmann::json;

namespace {

// The batch item behind a client hook's context: every call of a run passes its item.
const batch_item& item_of(const void* context) {
  return *static_cast<const batch_item*>(context);
}

const std::vector<double> latency_buckets = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                             1,     2.5,  5,     10,   30,  60,   120};

std::string seconds_text(std::chrono::nanoseconds d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3fs", std::chrono::duration<double>(d).count());
  return buf;
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

// Everything one run shares; lives on run_batch's stack while the io_context runs.
struct run_state {
  const llm::client_config& cfg;
  const batch_options& opts;
  logger& log;
  asio::io_context ctx;
  batch_stats stats;
  metrics_registry metrics;
  line_feed feed;  // after ctx: closed (no more posts to it) before the context goes
  record_writer writer;
  resume_state resume;
  std::unordered_map<std::string, std::size_t> seen;  // key -> first line
  std::vector<asio::cancellation_signal> cancels;
  bool stopping = false;
  int signal_number = 0;
  bool fatal = false;
  std::size_t workers_left = 0;

  run_state(const llm::client_config& c, const batch_options& o, logger& l, std::size_t workers)
      : cfg(c),
        opts(o),
        log(l),
        feed(ctx.get_executor(), o.in),
        writer(o.out, o.fsync),
        cancels(workers),
        workers_left(workers) {}

  // No new items: workers finish the item in hand, and a worker waiting for a line of a pipe
  // stops waiting.
  void stop() {
    stopping = true;
    feed.close();
  }

  void count_item(const std::string& status) {
    metrics.counter("keel_items_total", "Items finished, by outcome.", {{"status", status}}).inc();
  }

  // True if the record was written. A record that could not be written is not counted as done
  // (its item runs again on --resume), and the run stops taking new items.
  bool write(const json& record) {
    try {
      writer.write(record);
      return true;
    } catch (const std::exception& e) {
      if (!fatal) {
        log.log(log_level::error, "output_error", e.what());
      }
      fatal = true;
      stop();
      ++stats.unwritten;
      return false;
    }
  }

  void record_line_failure(std::size_t line, const json& id, const std::string& cls,
                           const std::string& message) {
    json rec;
    rec["id"] = id;
    rec["line"] = line;
    rec["status"] = "failed";
    rec["error"] = {{"class", cls}, {"condition", "permanent"}, {"message", message}};
    rec["attempts"] = 0;
    rec["latency_ms"] = 0;  // every record has it; nothing was sent
    if (!write(rec)) {
      return;
    }
    ++stats.done;
    ++stats.failed;
    ++stats.failed_by_class[cls];
    count_item("failed");
    log.log(log_level::warning, cls, message, {{"line", line}, {"id", id}});
  }
};

}  // namespace

std::uint64_t random_seed() {
  std::random_device device;
  const std::uint64_t hi = device();
  const std::uint64_t lo = device();
  return ((hi << 32) ^ lo) & ((std::uint64_t{1} << 53) - 1);
}

int run_batch(const llm::client_config& cfg, const batch_options& opts, logger& log) {
  namespace fs = std::filesystem;
  if (opts.resume && opts.overwrite) {
    throw std::runtime_error("--resume and --overwrite contradict each other");
  }
  if (opts.out != "-") {
    std::error_code ec;
    if (fs::is_directory(opts.out, ec)) {
      throw std::runtime_error("cannot write results to " + opts.out + ": it is a directory");
    }
    // Only a regular file can hold earlier results (/dev/null and pipes cannot).
    const bool has_results = fs::is_regular_file(opts.out, ec) && fs::file_size(opts.out, ec) > 0;
    if (has_results && !ec && !opts.resume && !opts.overwrite) {
      throw std::runtime_error(opts.out +
                               " already has results; pass --resume to continue it or "
                               "--overwrite to replace it");
    }
    if (opts.in != "-" && fs::equivalent(opts.in, opts.out, ec)) {
      // --overwrite would empty the input before reading it; --resume would read it as results.
      throw std::runtime_error("--in and --out name the same file (" + opts.out +
                               "); write the results to another file");
    }
    // --overwrite empties the file only once the input is open and the metrics port bound
    // (below): a run that cannot start leaves the earlier results alone.
  } else if (opts.resume) {
    throw std::runtime_error("--resume needs --out to be a file");
  }
  // One run per results file, from before --resume reads (and may rewrite) it until the last
  // record: two runs wrote two records per id. Only a file (or one to be created) is locked:
  // /dev/null or a pipe holds no results to protect.
  std::optional<results_lock> lock;
  if (opts.out != "-") {
    std::error_code ec;
    const auto kind = fs::status(opts.out, ec).type();
    if (kind == fs::file_type::regular || kind == fs::file_type::not_found) {
      lock.emplace(opts.out);
    }
  }
  resume_state resumed;
  if (opts.resume) {
    resumed = prepare_resume(opts.out);
  }
  const int concurrency = std::max(1, opts.concurrency.value_or(cfg.policy.concurrency));
  // `concurrency` attempts in flight, and a quarter more workers: an item asleep before a retry
  // (or held at an open breaker) gives its attempt slot to a spare worker's next item. A spare
  // worker waits for a slot with its line read (at most `spare_workers` such lines).
  const std::size_t slots = static_cast<std::size_t>(concurrency);
  run_state rs(cfg, opts, log, slots + llm::spare_workers(slots));
  rs.resume = std::move(resumed);
  if (opts.resume) {
    log.log(log_level::info, "resume", "results file scanned",
            {{"file", opts.out},
             {"kept", rs.resume.kept},
             {"dropped_cancelled", rs.resume.dropped_cancelled},
             {"dropped_duplicates", rs.resume.dropped_duplicates},
             {"dropped_torn_tail", rs.resume.dropped_torn_tail}});
  }
  rs.stats.total = count_items(opts.in).value_or(0);
  rs.stats.seed = opts.seed;
  batch_stats& st = rs.stats;
  log.log(log_level::info, "seed",
          opts.seed_is_random ? "retry jitter seed drawn at random; --seed repeats it"
                              : "retry jitter seed from --seed",
          {{"seed", opts.seed}});
  auto ex = rs.ctx.get_executor();

  // ---- metrics --------------------------------------------------------------------------------
  auto& m = rs.metrics;
  std::unique_ptr<metrics_server> metrics_http;
  if (opts.metrics_port) {
    metrics_http = std::make_unique<metrics_server>(ex, m, "127.0.0.1", *opts.metrics_port);
    metrics_http->start();
    log.log(log_level::info, "metrics", "serving Prometheus metrics",
            {{"url", "http://127.0.0.1:" + std::to_string(metrics_http->port()) + "/metrics"}});
    if (opts.on_metrics_port) {
      opts.on_metrics_port(metrics_http->port());
    }
  }
  // Input open, output open, port bound: only now may --overwrite drop the earlier results.
  if (opts.overwrite) {
    rs.writer.truncate();
  }
  auto& in_flight_gauge = m.gauge("keel_in_flight", "Items being processed.");
  auto& item_latency =
      m.histogram("keel_item_latency_seconds",
                  "Time from start to record of each item, fallbacks included.", latency_buckets);
  for (std::size_t i = 0; i < cfg.entries.size(); ++i) {
    m.gauge("keel_breaker_state", "Breaker state per entry: 0 closed, 1 half-open, 2 open.",
            {{"model", cfg.entries[i].name()}})
        .set(0);
  }

  // ---- client and hooks --------------------------------------------------------------------
  keel::http::client_options ho;
  ho.max_connections_per_host = static_cast<std::size_t>(std::max(64, concurrency));
  llm::http_clients http(ex, ho);  // one per distinct ca_file (a client has one trust store)
  llm::bucket_registry buckets(ex, opts.seed);
  buckets.on_pacing = [&](const std::string& name, const keel::pacing_state& r,
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
    if (t.phase != keel::pacing_phase::unlimited) {
      f["token_phase"] = keel::to_string(t.phase);
      if (t.estimate > 0) {
        f["limit_tpm"] = std::round(t.estimate * 60);
      }
    }
    log.log(log_level::info, "pacing", "", f);
  };
  llm::client_hooks hooks;
  hooks.on_attempt = [&](const llm::attempt_report& r) {
    const std::string& name = cfg.entries[r.entry].name();
    ++st.attempts;
    ++st.attempts_by_model[name];
    if (r.status == 429) {
      ++st.http_429;
    }
    m.counter("keel_attempts_total", "HTTP attempts, by entry and outcome class.",
              {{"model", name}, {"class", llm::error_class(r.error)}})
        .inc();
    m.histogram("keel_attempt_latency_seconds", "Time from send to answer of each attempt.",
                latency_buckets, {{"model", name}})
        .observe(r.seconds);
  };
  hooks.on_retry = [&](const llm::retry_report& r) {
    const std::string cause = llm::error_class(r.error);
    ++st.retries;
    ++st.retries_by_cause[cause];
    m.counter("keel_retries_total", "Retries, by the class of the error that caused them.",
              {{"cause", cause}})
        .inc();
    if (log.enabled(log_level::warning)) {
      json f;
      f["id"] = item_of(r.context).id;
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
      f["prompt"] = item_of(r.context).preview;
      log.log(log_level::warning, "retry", "", f);
    }
  };
  hooks.on_fallback = [&](const void* context, std::size_t from, std::size_t to,
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
  hooks.on_breaker = [&](std::size_t entry, keel::breaker_state from, keel::breaker_state to) {
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
  hooks.on_throttle_wait = [&](std::size_t entry, std::chrono::nanoseconds d) {
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
  hooks.on_hold = [&](std::size_t entry, const void* context, std::chrono::nanoseconds left) {
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
  llm::client_options co;
  co.hold_open_breaker = true;  // an item with no fallback left waits for the probe
  co.attempt_slots = slots;
  llm::client client(ex, cfg, http, buckets, hooks, opts.seed, co);

  // ---- progress ------------------------------------------------------------------------------
  progress_display progress(opts.progress, stderr, st);
  if (opts.progress == progress_mode::bar) {
    log.set_around_line([&] { progress.clear(); }, [&] { progress.redraw(); });
  }
  asio::steady_timer progress_timer(ex);
  bool finished = false;
  if (opts.progress != progress_mode::quiet) {
    const auto period = opts.progress == progress_mode::bar
                            ? std::chrono::milliseconds(100)
                            : std::chrono::milliseconds(static_cast<long long>(
                                  std::max(0.1, opts.progress_interval) * 1000));
    asio::co_spawn(
        ex,
        [&, period]() -> asio::awaitable<void> {
          while (!finished) {
            progress_timer.expires_after(period);
            boost::system::error_code ec;
            co_await progress_timer.async_wait(asio::redirect_error(asio::use_awaitable, ec));
            if (!finished) {
              progress.tick();
            }
          }
        },
        asio::detached);
  }

  // ---- signals -------------------------------------------------------------------------------
  asio::signal_set signals(ex, SIGINT, SIGTERM);
  asio::steady_timer grace_timer(ex);
  auto cancel_all = [&] {
    for (auto& c : rs.cancels) {
      c.emit(asio::cancellation_type::terminal);
    }
  };
  std::function<void()> wait_signal = [&] {
    signals.async_wait([&](const boost::system::error_code& ec, int signo) {
      if (ec || finished) {
        return;
      }
      if (!rs.stopping || rs.signal_number == 0) {
        rs.stop();
        rs.signal_number = signo;
        log.log(
            log_level::warning, "interrupted",
            "no new items; waiting for the items in flight (signal again to cancel them now)",
            {{"signal", signo == SIGINT ? "SIGINT" : "SIGTERM"},
             {"in_flight", st.in_flight},
             {"grace",
              seconds_text(std::chrono::nanoseconds(static_cast<long long>(opts.grace * 1e9)))}});
        grace_timer.expires_after(
            std::chrono::nanoseconds(static_cast<long long>(std::max(0.0, opts.grace) * 1e9)));
        grace_timer.async_wait([&](const boost::system::error_code& gec) {
          if (!gec && !finished) {
            log.log(log_level::warning, "grace_expired", "cancelling the items in flight",
                    {{"in_flight", st.in_flight}});
            cancel_all();
          }
        });
        wait_signal();
      } else {
        log.log(log_level::warning, "interrupted", "second signal: cancelling the items in flight",
                {{"in_flight", st.in_flight}});
        cancel_all();
      }
    });
  };
  wait_signal();

  // ---- workers -------------------------------------------------------------------------------
  const int default_max_tokens = 1024;
  auto shutdown = [&] {
    finished = true;
    rs.feed.close();
    boost::system::error_code ignored;
    signals.cancel(ignored);
    grace_timer.cancel();
    progress_timer.cancel();
    if (metrics_http) {
      metrics_http->stop();
    }
  };
  auto worker = [&]() -> asio::awaitable<void> {
    while (!rs.stopping) {
      std::optional<input_reader::raw_line> raw;
      try {
        raw = co_await rs.feed.next();  // never blocks the thread, even on a pipe
      } catch (const std::exception& e) {
        log.log(log_level::error, "input_error", e.what());
        rs.fatal = true;
        rs.stop();
        break;
      }
      if (!raw) {
        break;
      }
      if (raw->too_long) {
        if (rs.resume.done_lines.count(raw->number)) {
          ++st.skipped;
          continue;
        }
        rs.record_line_failure(raw->number, nullptr, "invalid_input",
                               "line " + std::to_string(raw->number) + " is longer than " +
                                   std::to_string(max_line_bytes) + " bytes");
        continue;
      }
      auto parsed = parse_input_line(raw->text, raw->number, default_max_tokens);
      if (auto* bad = std::get_if<input_error>(&parsed)) {
        if (rs.resume.done_lines.count(bad->line)) {
          ++st.skipped;
          continue;
        }
        rs.record_line_failure(bad->line, bad->id, "invalid_input",
                               "line " + std::to_string(bad->line) + ": " + bad->message);
        continue;
      }
      batch_item item = std::move(std::get<batch_item>(parsed));
      if (auto [it, fresh] = rs.seen.emplace(item.key, item.line); !fresh) {
        if (rs.resume.done_lines.count(item.line)) {
          ++st.skipped;
          continue;
        }
        rs.record_line_failure(item.line, item.id, "duplicate_id",
                               "line " + std::to_string(item.line) + ": id " + item.key +
                                   " was already used on line " + std::to_string(it->second));
        continue;
      }
      if (rs.resume.done_keys.count(item.key)) {
        ++st.skipped;
        continue;
      }
      // An attempt slot, taken only now: a worker waiting for a line of a slow pipe holds none,
      // which would keep a sleeping item from its retry. An item that never got one has not
      // started: after a signal it gets no record, like a line never read (--resume runs it).
      keel::bulkhead_permit slot;
      try {
        slot = co_await client.admit();
      } catch (const boost::system::system_error&) {
        break;  // cancelled (a second signal) while waiting
      }
      if (rs.stopping) {
        break;
      }
      ++st.in_flight;
      in_flight_gauge.set(static_cast<double>(st.in_flight));
      llm::call_outcome out = co_await client.call(item.request, &item, std::move(slot));
      --st.in_flight;
      in_flight_gauge.set(static_cast<double>(st.in_flight));

      json rec;
      rec["id"] = item.id;
      rec["line"] = item.line;
      const llm::entry_config& entry = cfg.entries[out.entry];
      const std::string cls = llm::error_class(out.error);
      if (out.response) {
        const auto& r = *out.response;
        rec["status"] = "ok";
        rec["text"] = r.text;
        rec["model"] =
            r.model.empty()
                ? (out.entry == 0 && !item.request.model.empty() ? item.request.model : entry.model)
                : r.model;
        rec["entry"] = entry.name();
        rec["fallback"] = out.entry != 0;
        rec["finish_reason"] = r.finish_reason;
        rec["usage"] = {{"input", r.usage.input}, {"output", r.usage.output}};
      } else if (cls == "cancelled") {
        rec["status"] = "cancelled";
        rec["error"] = {{"class", "cancelled"},
                        {"condition", "cancelled"},
                        {"message", "interrupted by a signal; rerun with --resume"}};
      } else {
        rec["status"] = "failed";
        rec["error"] = llm::error_json(out.error);
        rec["entry"] = entry.name();
      }
      rec["attempts"] = out.attempts;
      rec["latency_ms"] = std::round(out.seconds * 1e4) / 10;
      if (!item.metadata.is_null()) {
        rec["metadata"] = item.metadata;
      }
      // Tokens were billed whether or not the record could be written.
      if (out.response) {
        if (entry.price) {
          const double cost =
              (static_cast<double>(out.response->usage.input) * entry.price->first +
               static_cast<double>(out.response->usage.output) * entry.price->second) /
              1000;
          rec["cost"] = cost;
          st.cost += cost;
          ++st.priced;
        } else {
          ++st.unpriced;
        }
        st.tokens_in += out.response->usage.input;
        st.tokens_out += out.response->usage.output;
        m.counter("keel_tokens_total", "Tokens billed.", {{"direction", "input"}})
            .inc(static_cast<double>(out.response->usage.input));
        m.counter("keel_tokens_total", "Tokens billed.", {{"direction", "output"}})
            .inc(static_cast<double>(out.response->usage.output));
      }
      // The summary and the metrics count what the results file holds.
      if (!rs.write(rec)) {
        continue;
      }
      if (out.response) {
        ++st.ok;
        ++st.ok_by_model[entry.name()];
        rs.count_item("ok");
      } else if (cls == "cancelled") {
        ++st.cancelled;
        rs.count_item("cancelled");
      } else {
        ++st.failed;
        ++st.failed_by_class[cls];
        rs.count_item("failed");
        log.log(
            log_level::error, "failed", "",
            {{"id", item.id}, {"class", cls}, {"model", entry.name()}, {"attempts", out.attempts}});
      }
      ++st.done;
      st.latencies.push_back(out.seconds);
      item_latency.observe(out.seconds);
    }
  };
  for (std::size_t i = 0; i < rs.cancels.size(); ++i) {
    asio::co_spawn(ex, worker,
                   asio::bind_cancellation_slot(rs.cancels[i].slot(), [&](std::exception_ptr e) {
                     if (e) {
                       try {
                         std::rethrow_exception(e);
                       } catch (const std::exception& ex_) {
                         log.log(log_level::error, "internal_error", ex_.what());
                       }
                       rs.fatal = true;
                       rs.stop();
                     }
                     if (--rs.workers_left == 0) {
                       shutdown();
                     }
                   }));
  }
  rs.ctx.run();
  progress.finish();
  st.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - st.start).count();

  if (opts.print_summary) {
    std::fputs(summary_table(st, opts.title).c_str(), stdout);
    std::fflush(stdout);
  }
  if (!opts.summary_json.empty()) {
    std::ofstream f(opts.summary_json, std::ios::trunc);
    f << summary_json(st).dump(2) << "\n";
    f.flush();
    if (!f) {
      log.log(log_level::error, "summary_error", "cannot write " + opts.summary_json);
      rs.fatal = true;  // an output that could not be written: exit status 2
    }
  }
  if (rs.signal_number != 0) {
    const char* sig = rs.signal_number == SIGINT ? "SIGINT" : "SIGTERM";
    if (opts.out == "-") {
      // --resume needs a results file to read back; standard output cannot be read back.
      std::fprintf(stderr,
                   "keel: interrupted by %s after %zu records, written to standard output. To "
                   "make a run resumable, write its results to a file with --out FILE.\n",
                   sig, st.done);
    } else {
      const std::string hint =
          opts.resume_command.empty() ? "rerun with --resume" : opts.resume_command;
      std::fprintf(stderr,
                   "keel: interrupted by %s after %zu records; nothing is lost. Resume "
                   "with:\n  %s\n",
                   sig, st.done, hint.c_str());
    }
    return 128 + rs.signal_number;
  }
  if (rs.fatal) {
    return 2;
  }
  // 0 only if every item of the input succeeded, including those an earlier run recorded.
  return st.failed + st.cancelled + rs.resume.kept_failed > 0 ? 1 : 0;
}

}  // namespace keel::cli
