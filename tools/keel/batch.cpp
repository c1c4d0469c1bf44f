// `keel batch`: set-up, progress, the workers and the summary (the signals are handled in
// batch_signals.cpp, the client hooks in batch_hooks.cpp, the records' schema in record.cpp).
#include "batch.hpp"
#include "batch_detail.hpp"
#include "batch_signals.hpp"
#include "fleet_pacing.hpp"

#include <keel/llm/client.hpp>
#include "jsonl.hpp"
#include "line_feed.hpp"
#include "metrics.hpp"
#include "record.hpp"
#include "results_file.hpp"
#include "tracing.hpp"

#include <keel/http/client.hpp>
#include <keel/llm/error.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <unordered_map>

namespace keel::cli {
namespace asio = boost::asio;
using nlohmann::json;
using namespace batch_detail;

namespace {

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
  std::vector<asio::cancellation_signal> cancels;     // one per worker
  bool stopping = false;
  keel::trace::tracer* tracer = nullptr;  // null: no traces
  bool fatal = false;
  std::size_t workers_left = 0;
  gauge* in_flight_gauge = nullptr;
  histogram* item_latency = nullptr;
  histogram* first_token = nullptr;  // --stream only

  run_state(const llm::client_config& c, const batch_options& o, logger& l, std::size_t workers)
      : cfg(c),
        opts(o),
        log(l),
        feed(ctx.get_executor(), o.in),
        writer(o.out, o.fsync),
        cancels(workers),
        workers_left(workers) {}

  // The run's own metrics, registered before the client's (the exposition keeps this order).
  void register_metrics() {
    in_flight_gauge = &metrics.gauge("keel_in_flight", "Items being processed.");
    item_latency = &metrics.histogram("keel_item_latency_seconds",
                                      "Time from start to record of each item, fallbacks included.",
                                      latency_buckets);
    if (opts.stream) {
      first_token = &metrics.histogram(
          "keel_first_token_seconds",
          "Time from start to the first text of each streamed item that got one (--stream).",
          latency_buckets);
    }
    for (std::size_t i = 0; i < cfg.entries.size(); ++i) {
      metrics
          .gauge("keel_breaker_state", "Breaker state per entry: 0 closed, 1 half-open, 2 open.",
                 {{"model", cfg.entries[i].name()}})
          .set(0);
    }
  }

  // No new items: workers finish the item in hand, and a worker waiting for a line of a pipe
  // stops waiting.
  void stop() {
    stopping = true;
    feed.close();
  }

  // Cancels every worker's item in flight (a second signal, or the grace expired).
  void cancel_all() {
    for (auto& c : cancels) {
      c.emit(asio::cancellation_type::terminal);
    }
  }

  void set_in_flight(std::size_t n) {
    stats.in_flight = n;
    in_flight_gauge->set(static_cast<double>(n));
  }

  // The per-item series, looked up once each (the registry keeps them for the run): a lookup
  // builds and checks a label set, 4% of a batch's instructions per item when done every time.
  std::array<counter*, 3> item_series{};   // ok, failed, cancelled
  std::array<counter*, 2> token_series{};  // input, output

  void count_item(const std::string& status) {
    static constexpr std::array<std::string_view, 3> statuses = {"ok", "failed", "cancelled"};
    const auto at = std::find(statuses.begin(), statuses.end(), status);
    if (at == statuses.end()) {
      metrics.counter("keel_items_total", "Items finished, by outcome.", {{"status", status}})
          .inc();
      return;
    }
    counter*& c = item_series[static_cast<std::size_t>(at - statuses.begin())];
    if (c == nullptr) {
      c = &metrics.counter("keel_items_total", "Items finished, by outcome.", {{"status", status}});
    }
    c->inc();
  }

  void count_tokens(std::size_t i, const char* direction, long long n) {
    if (token_series[i] == nullptr) {
      token_series[i] =
          &metrics.counter("keel_tokens_total", "Tokens billed.", {{"direction", direction}});
    }
    token_series[i]->inc(static_cast<double>(n));
  }

  // True if the record was written. A record that could not be written is not counted as done
  // (its item runs again on --resume), and the run stops taking new items.
  bool write(const json& record) { return write_line(record_text(record)); }
  bool write_line(std::string line) {
    try {
      writer.write_line(std::move(line));
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
    if (!write(line_failure_record(line, id, cls, message))) {
      return;
    }
    ++stats.done;
    ++stats.failed;
    ++stats.failed_by_class[cls];
    count_item("failed");
    log.log(log_level::warning, cls, message, {{"line", line}, {"id", id}});
  }

  // Writes the record of an item the client ran and counts it into the summary and metrics.
  void record_outcome(const batch_item& item, const llm::call_outcome& out) {
    batch_stats& st = stats;
    const llm::entry_config& entry = cfg.entries[out.entry];
    const std::string cls = llm::error_class(out.error);
    const std::optional<double> cost =
        out.response ? answer_cost(entry, *out.response) : std::nullopt;
    std::string rec = outcome_line(item, out, entry, cost, opts.stream);
    // Tokens were billed whether or not the record could be written.
    if (out.response) {
      if (cost) {
        st.cost += *cost;
        ++st.priced;
      } else {
        ++st.unpriced;
      }
      st.tokens_in += out.response->usage.input;
      st.tokens_out += out.response->usage.output;
      count_tokens(0, "input", out.response->usage.input);
      count_tokens(1, "output", out.response->usage.output);
    }
    // The summary and the metrics count what the results file holds.
    if (!write_line(std::move(rec))) {
      return;
    }
    if (out.response) {
      ++st.ok;
      ++st.ok_by_model[entry.name()];
      count_item("ok");
    } else if (cls == "cancelled") {
      ++st.cancelled;
      count_item("cancelled");
    } else {
      ++st.failed;
      ++st.failed_by_class[cls];
      count_item("failed");
      log.log(
          log_level::error, "failed", "",
          {{"id", item.id}, {"class", cls}, {"model", entry.name()}, {"attempts", out.attempts}});
    }
    ++st.done;
    st.latencies.push_back(out.seconds);
    item_latency->observe(out.seconds);
    if (opts.stream && out.first_token_seconds) {
      st.first_tokens.push_back(*out.first_token_seconds);
      first_token->observe(*out.first_token_seconds);
    }
  }
};

// True if `a` and `b` name one file: the same path once made absolute with symlinks resolved
// (as far as the path exists), or the same existing file. A results file a fresh run is about
// to create does not exist yet, so `equivalent` alone missed `--out r.jsonl --summary-json
// ./r.jsonl`, and the summary then replaced the results.
bool same_file(const std::string& a, const std::string& b) {
  namespace fs = std::filesystem;
  std::error_code ec1, ec2;
  if (a == b || fs::equivalent(a, b, ec1)) {
    return true;
  }
  const fs::path ca = fs::weakly_canonical(fs::absolute(a, ec1), ec1);
  const fs::path cb = fs::weakly_canonical(fs::absolute(b, ec2), ec2);
  return !ec1 && !ec2 && ca == cb;
}

// True if `path` may be written: it exists and is writable, or its directory is.
bool writable(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::exists(path, ec)) {
    return ::access(path.c_str(), W_OK) == 0;
  }
  const fs::path dir = fs::absolute(path, ec).parent_path();
  return ::access(dir.empty() ? "." : dir.c_str(), W_OK | X_OK) == 0;
}

// Checks that `opts.out` may take this run's records (not a directory, not the input, earlier
// results only with --resume or --overwrite) and locks it for the run into `lock`.
// @throws std::runtime_error if it may not, or another run holds it.
void claim_output(const batch_options& opts, std::optional<results_lock>& lock) {
  namespace fs = std::filesystem;
  if (opts.resume && opts.overwrite) {
    throw std::runtime_error("--resume and --overwrite contradict each other");
  }
  // The side outputs: spans appended to the results or to the input would corrupt them, and
  // the summary (written at the end, truncating) would replace them.
  const std::pair<const char*, const std::string*> side[] = {
      {"--trace", &opts.trace_file}, {"--summary-json", &opts.summary_json}};
  const std::pair<const char*, const std::string*> named[] = {
      {"--out", &opts.out}, {"--in", &opts.in}, side[0]};
  for (const auto& [flag, file] : side) {
    if (file->empty()) {
      continue;
    }
    for (const auto& [other_flag, other] : named) {
      if (other != file && !other->empty() && *other != "-" && same_file(*other, *file)) {
        throw std::runtime_error(std::string(flag) + " names the same file as " + other_flag +
                                 " (" + *file + "); write it to another file");
      }
    }
  }
  if (opts.out != "-") {
    std::error_code ec;
    if (fs::is_directory(opts.out, ec)) {
      throw std::runtime_error("cannot write results to " + opts.out + ": it is a directory");
    }
    if (opts.in != "-" && fs::equivalent(opts.in, opts.out, ec)) {
      // --overwrite would empty the input before reading it; --resume would read it as results.
      // (Checked first: "already has results" would be the wrong advice.)
      throw std::runtime_error("--in and --out name the same file (" + opts.out +
                               "); write the results to another file");
    }
    // Only a regular file can hold earlier results (/dev/null and pipes cannot).
    const bool has_results = fs::is_regular_file(opts.out, ec) && fs::file_size(opts.out, ec) > 0;
    if (has_results && !ec && !opts.resume && !opts.overwrite) {
      throw std::runtime_error(opts.out +
                               " already has results; pass --resume to continue it or "
                               "--overwrite to replace it");
    }
    // --overwrite empties the file only once the input is open and the metrics port bound
    // (run_batch): a run that cannot start leaves the earlier results alone.
  } else if (opts.resume) {
    throw std::runtime_error("--resume needs --out to be a file");
  }
  // One run per results file, from before --resume reads (and may rewrite) it until the last
  // record: two runs wrote two records per id. Only a file (or one to be created) is locked:
  // /dev/null or a pipe holds no results to protect.
  if (opts.out != "-") {
    std::error_code ec;
    const auto kind = fs::status(opts.out, ec).type();
    if (kind == fs::file_type::regular || kind == fs::file_type::not_found) {
      lock.emplace(opts.out);
    }
  }
  if (!opts.summary_json.empty() && !writable(opts.summary_json)) {
    // Found now rather than after the whole run (and after --overwrite emptied the results);
    // checked without creating or opening it (a FIFO would block).
    throw std::runtime_error("cannot write the summary to " + opts.summary_json + ": " +
                             std::strerror(errno));
  }
}

// Ticks the progress display every 100 ms (the bar) or every --progress-interval (lines) until
// `stop()`; `--progress quiet` never ticks.
class progress_ticker {
 public:
  progress_ticker(asio::any_io_executor ex, progress_display& progress, const batch_options& opts)
      : timer_(ex), progress_(progress) {
    if (opts.progress == progress_mode::quiet) {
      return;
    }
    const auto period = opts.progress == progress_mode::bar
                            ? std::chrono::milliseconds(100)
                            : std::chrono::milliseconds(static_cast<long long>(
                                  std::max(0.1, opts.progress_interval) * 1000));
    asio::co_spawn(ex, tick_every(period), asio::detached);
  }

  void stop() {
    stopped_ = true;
    timer_.cancel();
  }

 private:
  asio::awaitable<void> tick_every(std::chrono::milliseconds period) {
    while (!stopped_) {
      timer_.expires_after(period);
      boost::system::error_code ec;
      co_await timer_.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      if (!stopped_) {
        progress_.tick();
      }
    }
  }

  asio::steady_timer timer_;
  progress_display& progress_;
  bool stopped_ = false;
};

// Logs what --resume kept of the results file and what it dropped.
void log_resume(const run_state& rs) {
  const batch_options& opts = rs.opts;
  if (opts.resume) {
    rs.log.log(log_level::info, "resume", "results file scanned",
               {{"file", opts.out},
                {"kept", rs.resume.kept},
                {"dropped_cancelled", rs.resume.dropped_cancelled},
                {"dropped_duplicates", rs.resume.dropped_duplicates},
                {"dropped_line_records", rs.resume.dropped_line_records},
                {"dropped_torn_tail", rs.resume.dropped_torn_tail}});
  }
}

// Logs the retry jitter's seed, so that a run's draws can be repeated.
void log_seed(const run_state& rs) {
  rs.log.log(log_level::info, "seed",
             rs.opts.seed_is_random ? "retry jitter seed drawn at random; --seed repeats it"
                                    : "retry jitter seed from --seed",
             {{"seed", rs.opts.seed}});
}

// Starts the Prometheus endpoint if --metrics-port asks for one (nullptr if not).
std::unique_ptr<metrics_server> start_metrics_server(run_state& rs) {
  const batch_options& opts = rs.opts;
  if (!opts.metrics_port) {
    return nullptr;
  }
  auto server = std::make_unique<metrics_server>(rs.ctx.get_executor(), rs.metrics, "127.0.0.1",
                                                 *opts.metrics_port);
  server->start();
  rs.log.log(log_level::info, "metrics", "serving Prometheus metrics",
             {{"url", "http://127.0.0.1:" + std::to_string(server->port()) + "/metrics"}});
  if (opts.on_metrics_port) {
    opts.on_metrics_port(server->port());
  }
  return server;
}

// The next item of the input to run. Lines that cannot run (too long, invalid, a duplicate id)
// get their failure record here (again on --resume, which dropped the earlier one: the line may
// have been fixed since); items an earlier run finished are skipped by id. nullopt at the end
// of the input, once the run stops, or after a read error (which stops the run).
asio::awaitable<std::optional<batch_item>> next_item(run_state& rs) {
  constexpr int default_max_tokens = 1024;
  batch_stats& st = rs.stats;
  while (!rs.stopping) {
    std::optional<input_reader::raw_line> raw;
    try {
      raw = co_await rs.feed.next();  // never blocks the thread, even on a pipe
    } catch (const std::exception& e) {
      rs.log.log(log_level::error, "input_error", e.what());
      rs.fatal = true;
      rs.stop();
      break;
    }
    if (!raw) {
      break;
    }
    const auto& shard = rs.opts.shard;
    if (raw->too_long) {
      if (shard && shard_of_line(raw->number, shard->count) != shard->index) {
        continue;  // another shard's line
      }
      rs.record_line_failure(raw->number, nullptr, record_invalid_input,
                             "line " + std::to_string(raw->number) + " is longer than " +
                                 std::to_string(max_line_bytes) + " bytes");
      continue;
    }
    auto parsed = parse_input_line(raw->text, raw->number, default_max_tokens);
    if (auto* bad = std::get_if<input_error>(&parsed)) {
      if (shard && shard_of_line(bad->line, shard->count) != shard->index) {
        continue;
      }
      rs.record_line_failure(bad->line, bad->id, record_invalid_input,
                             "line " + std::to_string(bad->line) + ": " + bad->message);
      continue;
    }
    batch_item item = std::move(std::get<batch_item>(parsed));
    if (shard && shard_of_key(item.key, shard->count) != shard->index) {
      continue;  // by id, so that a repeated id meets its first use in the same shard
    }
    if (auto [it, fresh] = rs.seen.emplace(item.key, item.line); !fresh) {
      rs.record_line_failure(item.line, item.id, record_duplicate_id,
                             "line " + std::to_string(item.line) + ": id " + item.key +
                                 " was already used on line " + std::to_string(it->second));
      continue;
    }
    if (rs.resume.done_keys.count(item.key)) {
      ++st.skipped;
      continue;
    }
    co_return std::move(item);
  }
  co_return std::nullopt;
}

// Runs `item` through the client: as one call, or streamed with --stream. A streamed reply's
// deltas are not kept: the outcome's response holds the whole text (only the last attempt's, if
// a restartable stream started over), with any echoed credential replaced, as a call's does.
// With traces on, each item is a trace of its own: the item's span (its id and line, and the
// time it waited for an attempt slot), the call's span under it, and the attempts'.
asio::awaitable<llm::call_outcome> run_item(const run_state& rs, llm::client& client,
                                            const batch_item& item, keel::bulkhead_permit slot) {
  keel::trace::span span;
  if (rs.tracer) {
    span = rs.tracer->start("keel batch item", keel::trace::span_kind::internal);
    if (span.recording()) {
      span.set("keel.item.id", item.id.is_string() ? item.id.get<std::string>() : item.key);
      span.set("keel.item.line", static_cast<std::int64_t>(item.line));
    }
  }
  const keel::trace::span_context* parent = span.context().valid() ? &span.context() : nullptr;
  llm::call_outcome out;
  if (!rs.opts.stream) {
    out = co_await client.call(item.request, &item, std::move(slot), parent);
  } else {
    const llm::delta_handler ignore = [](const llm::stream_delta&) -> asio::awaitable<void> {
      co_return;
    };
    out = co_await client.stream_call(item.request, ignore, {}, &item, std::move(slot), parent);
  }
  if (span.recording()) {
    span.set("keel.attempts", out.attempts);
    if (out.error) {
      std::string what;
      try {
        std::rethrow_exception(out.error);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      span.set_error(llm::error_class(out.error), what);
    } else {
      span.set_ok();
    }
  }
  co_return out;
}

// One worker: items one at a time until the input ends or the run stops.
asio::awaitable<void> work(run_state& rs, llm::client& client) {
  while (!rs.stopping) {
    std::optional<batch_item> item = co_await next_item(rs);
    if (!item) {
      break;
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
    rs.set_in_flight(rs.stats.in_flight + 1);
    const llm::call_outcome out = co_await run_item(rs, client, *item, std::move(slot));
    rs.set_in_flight(rs.stats.in_flight - 1);
    rs.record_outcome(*item, out);
  }
}

// Spawns one worker per cancellation signal of `rs`; `shutdown` runs when the last one ends. A
// worker that throws logs `internal_error` and makes the run fatal (exit status 2).
// @param shutdown must outlive the io_context's run.
void spawn_workers(run_state& rs, llm::client& client, const std::function<void()>& shutdown) {
  for (auto& cancel : rs.cancels) {
    asio::co_spawn(
        rs.ctx, work(rs, client),
        asio::bind_cancellation_slot(cancel.slot(), [&rs, &shutdown](std::exception_ptr e) {
          if (e) {
            try {
              std::rethrow_exception(e);
            } catch (const std::exception& ex) {
              rs.log.log(log_level::error, "internal_error", ex.what());
            }
            rs.fatal = true;
            rs.stop();
          }
          if (--rs.workers_left == 0) {
            shutdown();
          }
        }));
  }
}

// The run is over: prints the summary table, writes the summary JSON, says how to resume after
// a signal, and returns the exit status (128 + signal, 2 fatal, 1 if any item failed, else 0).
int finish_run(run_state& rs, int signal_number) {
  const batch_options& opts = rs.opts;
  const batch_stats& st = rs.stats;
  if (rs.writer.removed()) {
    // Every record went to a file with no name: the run must not say that anything was kept.
    rs.log.log(log_level::error, "output_error",
               opts.out + " was deleted during the run; the " +
                   std::to_string(rs.writer.written()) +
                   " records written to it are gone. Run the batch again.");
    rs.fatal = true;
  }
  if (opts.print_summary) {
    std::fputs(summary_table(st, opts.title).c_str(), stdout);
    std::fflush(stdout);
  }
  if (!opts.summary_json.empty()) {
    std::ofstream f(opts.summary_json, std::ios::trunc);
    f << summary_json(st).dump(2) << "\n";
    f.flush();
    if (!f) {
      rs.log.log(log_level::error, "summary_error", "cannot write " + opts.summary_json);
      rs.fatal = true;  // an output that could not be written: exit status 2
    }
  }
  if (signal_number != 0) {
    const char* sig = signal_number == SIGINT ? "SIGINT" : "SIGTERM";
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
    return 128 + signal_number;
  }
  if (rs.fatal) {
    return 2;
  }
  // 0 only if every item of the input succeeded, including those an earlier run recorded.
  return st.failed + st.cancelled + rs.resume.kept_failed > 0 ? 1 : 0;
}

}  // namespace

std::uint64_t random_seed() {
  std::random_device device;
  const std::uint64_t hi = device();
  const std::uint64_t lo = device();
  return ((hi << 32) ^ lo) & ((std::uint64_t{1} << 53) - 1);
}

int run_batch(const llm::client_config& cfg, const batch_options& opts, logger& log) {
  // ---- set-up --------------------------------------------------------------------------------
  std::optional<results_lock> lock;
  if (!cfg.source.empty() && std::filesystem::exists(cfg.source)) {
    // With --overwrite the config was replaced by the results (without, the refusal said the
    // config "already has results"); the summary replaced it at the end; spans were appended.
    for (const auto& [flag, file] :
         {std::pair{"--out", &opts.out}, std::pair{"--summary-json", &opts.summary_json},
          std::pair{"--trace", &opts.trace_file}}) {
      if (!file->empty() && *file != "-" && same_file(*file, cfg.source)) {
        throw std::runtime_error(std::string(flag) + " names the config file (" + *file +
                                 "); write it to another file");
      }
    }
  }
  claim_output(opts, lock);
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
  log_resume(rs);
  // A shard's share of the lines is known only as they are read: no total for its progress.
  rs.stats.total = opts.shard ? 0 : count_items(opts.in).value_or(0);
  rs.stats.seed = opts.seed;
  rs.stats.streamed = opts.stream;
  log_seed(rs);
  auto ex = rs.ctx.get_executor();
  // policy.shared (Redis), made before --overwrite may drop anything: a bad URL is a config error.
  const std::unique_ptr<llm::fleet_pacing> fleet = make_fleet_pacing(ex, cfg);
  const std::unique_ptr<metrics_server> metrics_http = start_metrics_server(rs);
  // Input open, output open, port bound: only now may --overwrite drop the earlier results.
  if (opts.overwrite) {
    rs.writer.truncate();
  }
  rs.register_metrics();

  keel::http::client_options ho;
  ho.max_connections_per_host = static_cast<std::size_t>(std::max(64, concurrency));
  llm::http_clients http(ex, ho);  // one per distinct ca_file (a client has one trust store)
  llm::bucket_registry buckets(ex, opts.seed);
  watch_pacing(buckets, rs.metrics, log);
  const llm::client_hooks hooks = batch_hooks(cfg, rs.stats, rs.metrics, log);
  trace_sink traces(ex, cfg.trace, opts.trace_file, log, llm::process_env());
  rs.tracer = traces.tracer();
  llm::client_options co;
  co.keep_raw = false;          // output records hold the mapped fields only
  co.hold_open_breaker = true;  // an item with no fallback left waits for the probe
  co.attempt_slots = slots;
  co.fleet = fleet.get();
  co.tracer = traces.tracer();
  llm::client client(ex, cfg, http, buckets, hooks, opts.seed, co);

  progress_display progress(opts.progress, stderr, rs.stats);
  if (opts.progress == progress_mode::bar) {
    log.set_around_line([&] { progress.clear(); }, [&] { progress.redraw(); });
  }
  progress_ticker ticker(ex, progress, opts);
  batch_signals signals(
      ex, opts.grace, log, rs.stats, [&] { rs.stop(); }, [&] { rs.cancel_all(); });
  signals.start();

  // ---- run -----------------------------------------------------------------------------------
  const std::function<void()> shutdown = [&] {
    rs.feed.close();
    signals.close();
    ticker.stop();
    if (metrics_http) {
      metrics_http->stop();
    }
    if (fleet) {
      fleet->close();
    }
  };
  spawn_workers(rs, client, shutdown);
  rs.ctx.run();
  traces.finish(rs.ctx);
  progress.finish();
  rs.stats.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - rs.stats.start).count();

  // ---- summary -------------------------------------------------------------------------------
  return finish_run(rs, signals.signal_number());
}

}  // namespace keel::cli
