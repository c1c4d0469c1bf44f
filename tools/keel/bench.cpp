// `keel bench`: scenario runs, their measurements, the matrix, the table, JSON and plots.
#include "bench.hpp"

#include <keel/llm/client.hpp>
#include <keel/llm/config.hpp>
#include "jsonl.hpp"
#include "stats.hpp"
#include "svg.hpp"

#include <keel/classify.hpp>
#include <keel/http/client.hpp>
#include <keel/llm/tokens.hpp>
#include <keel/rate_controller.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/version.hpp>

#include <sys/resource.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <thread>
#include <tuple>

namespace keel::cli {

namespace {

namespace asio = boost::asio;
using json = nlohmann::json;
using clock_type = std::chrono::steady_clock;

// The in-process mock's models. On the classic mixes and `mixed` the primary speaks Anthropic's
// format (so that "overloaded" is a real 529) and the keel stack's fallback entry OpenAI's; on
// the other limited mixes the primary speaks OpenAI's (what stock proxies front) and the
// fallback Anthropic's. Both models get the same plan (each its own limiter), but in `outage`.
constexpr const char* anthropic_model = "claude-3-5-haiku-latest";
constexpr const char* openai_model = "gpt-4o-mini";
// The rate-limited mix's server limit, requests per second (also its burst).
constexpr double server_rps = 200;
// The limited mixes' request bucket: nginx `limit_req ... burst=20 nodelay` admits the request
// that finds the zone empty plus 20 more at once, a bucket of 21.
constexpr double limited_burst = 21;
// token_limited's prompts are this many bytes, so that prompt tokens dominate (as in a batch
// of documents) and every prompt costs the mock the same tokens.
constexpr std::size_t token_prompt_bytes = 2000;
// `mixed`'s random failures (5% 503 + 5% 529), drawn after the limiter admitted the attempt.
constexpr double mixed_failure_share = 0.10;
// limit_change: the limit halves at 5 s and returns at 15 s after the mock's start.
constexpr int change_down_ms = 5000;
constexpr int change_up_ms = 15000;
// Connections per host. `keel batch` uses max(64, concurrency); the bench caps it because the
// client and the mock share one process here, and 10,000 connections on each side would exceed
// this machine's 20,000-descriptor limit. A real HTTP client pool is about this size
// (openai-python allows 1,000).
constexpr std::size_t max_connections = 1024;
constexpr double bin_seconds = 0.1;
// Upper edges of the retry-delay histogram, seconds (the last bin is open).
const std::vector<double> delay_edges = {0, 0.001, 0.01, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16};

double seconds_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

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

double round_to(double v, int digits) {
  const double f = std::pow(10.0, digits);
  return std::round(v * f) / f;
}

// The mock server on its own thread and io_context, as a provider would be on another machine
// (here: the second core). Measures its thread's CPU time when it stops.
class bench_mock {
 public:
  bench_mock(const keel::testing::scenario& s, std::uint64_t seed)
      : work_(ctx_.get_executor()), server_(ctx_, options(seed)) {
    server_.set_scenario(s);
    server_.start();
    thread_ = std::thread([this] {
      ctx_.run();
      cpu_seconds_ = cpu_seconds(RUSAGE_THREAD);
    });
  }
  ~bench_mock() { stop(); }
  bench_mock(const bench_mock&) = delete;
  bench_mock& operator=(const bench_mock&) = delete;

  // Stops the server and its thread; returns the thread's CPU seconds.
  double stop() {
    if (thread_.joinable()) {
      asio::post(ctx_, [this] {
        server_.stop();
        work_.reset();
      });
      thread_.join();
    }
    return cpu_seconds_;
  }
  std::string base_url() const { return server_.base_url(); }
  keel::testing::mock_stats stats() const { return server_.stats(); }
  // The limit in force now for `model` (thread-safe: the server takes its lock).
  keel::testing::rate_limits current_limit(const std::string& model) const {
    return server_.current_limit(model);
  }

 private:
  static keel::testing::mock_options options(std::uint64_t seed) {
    keel::testing::mock_options o;
    o.seed = seed;
    return o;
  }
  asio::io_context ctx_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  keel::testing::mock_llm_server server_;
  std::thread thread_;
  double cpu_seconds_ = 0;
};

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

// The tokens the mock charges a prompt of `bytes` ASCII bytes: ceil(bytes / 4) for the prompt
// and for its completion, "mock answer to: " + the prompt's first 40 bytes (the mock's rule,
// docs/mock_llm_server.md).
double mock_tokens(std::size_t bytes) {
  auto tokens = [](std::size_t b) {
    return static_cast<double>(std::max<std::size_t>(1, (b + 3) / 4));
  };
  return tokens(bytes) + tokens(16 + std::min<std::size_t>(40, bytes));
}

std::size_t prompts_for(int concurrency, std::size_t n) {
  const auto c = static_cast<std::size_t>(std::max(1, concurrency));
  return std::max(std::min(n, 200 * c), c);
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) {
    out += (out.empty() ? "" : ", ") + s;
  }
  return out;
}

// Performs one run in a child process, so that its peak RSS is its own.
json run_isolated(const bench_run_spec& spec, const bench_options& opts) {
  int fds[2];
  if (::pipe(fds) != 0) {
    throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  }
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]);
    ::close(fds[1]);
    throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    ::close(fds[0]);
    int rc = 0;
    std::string text;
    try {
      text = run_bench_scenario(spec, opts).dump();
    } catch (const std::exception& e) {
      text = json{{"error", e.what()}}.dump();
      rc = 1;
    }
    std::size_t off = 0;
    while (off < text.size()) {
      const ssize_t w = ::write(fds[1], text.data() + off, text.size() - off);
      if (w < 0 && errno == EINTR) {
        continue;
      }
      if (w <= 0) {
        break;
      }
      off += static_cast<std::size_t>(w);
    }
    ::close(fds[1]);
    ::_exit(rc);  // no atexit handlers or stdio flushes of the parent's state
  }
  ::close(fds[1]);
  std::string text;
  char buf[65536];
  for (;;) {
    const ssize_t r = ::read(fds[0], buf, sizeof buf);
    if (r < 0 && errno == EINTR) {
      continue;
    }
    if (r <= 0) {
      break;
    }
    text.append(buf, static_cast<std::size_t>(r));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  json out = json::parse(text, nullptr, false);
  if (out.is_discarded() || !out.is_object()) {
    std::string why = "the run's process ended without a result";
    if (WIFSIGNALED(status)) {
      why += " (signal " + std::to_string(WTERMSIG(status)) + ")";
    }
    out = json{{"error", why}};
  }
  return out;
}

json machine_json() {
  json m;
  m["nproc"] = ::sysconf(_SC_NPROCESSORS_ONLN);
  {
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("model name", 0) == 0) {
        const auto colon = line.find(':');
        m["cpu"] = colon == std::string::npos ? line : line.substr(colon + 2);
        break;
      }
    }
  }
  {
    std::ifstream f("/proc/meminfo");
    std::string key;
    long long kib = 0;
    if (f >> key >> kib && key == "MemTotal:") {
      m["memory_gib"] = round_to(static_cast<double>(kib) / (1024.0 * 1024.0), 1);
    }
  }
  utsname u{};
  if (::uname(&u) == 0) {
    m["kernel"] = std::string(u.sysname) + " " + u.release;
  }
#ifdef __clang__
  m["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  m["compiler"] = std::string("gcc ") + __VERSION__;
#endif
#ifdef NDEBUG
  m["assertions"] = false;
#else
  m["assertions"] = true;
#endif
  m["boost"] = BOOST_LIB_VERSION;
  const std::time_t t = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  m["date"] = date;
  double load[3] = {0, 0, 0};
  if (::getloadavg(load, 3) == 3) {
    m["load_average_at_start"] = {round_to(load[0], 2), round_to(load[1], 2), round_to(load[2], 2)};
  }
  return m;
}

std::string fixed(double v, int decimals) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// ---- plots -----------------------------------------------------------------------------------

const char* policy_color(const std::string& p) {
  if (p == "none") {
    return "#7F7F7F";
  }
  if (p == "naive") {
    return "#D55E00";
  }
  if (p == "exponential") {
    return "#E69F00";
  }
  if (p == "full_jitter") {
    return "#CC79A7";
  }
  if (p == "newcomer") {
    return "#009E73";
  }
  if (p == "keel_limit") {
    return "#56B4E9";
  }
  if (p == "aws_adaptive") {
    return "#000000";
  }
  return "#0072B2";
}

const char* fault_color(const std::string& f) {
  if (f == "clean") {
    return "#009E73";
  }
  if (f == "rate_limited") {
    return "#0072B2";
  }
  if (f == "flaky") {
    return "#CC79A7";
  }
  if (f == "outage") {
    return "#D55E00";
  }
  if (f == "slow") {
    return "#E69F00";
  }
  if (f == "limited") {
    return "#56B4E9";
  }
  if (f == "limit_change") {
    return "#7F7F7F";
  }
  return "#000000";
}

// The number of a rate for labels and file names: "200", "12.5".
std::string rate_label(double r) {
  return r == std::round(r) ? std::to_string(static_cast<long long>(r)) : fixed(r, 2);
}

// A run's mix with its limit: "limited-r200" (the fault alone for the classic mixes).
std::string mix_key(const json& run) {
  const double r = run.value("rate", 0.0);
  return run["fault"].get<std::string>() + (r > 0 ? "-r" + rate_label(r) : "");
}

// The same for titles: "limited at R = 200 r/s".
std::string mix_title(const json& run) {
  const double r = run.value("rate", 0.0);
  return run["fault"].get<std::string>() + (r > 0 ? " at R = " + rate_label(r) + " r/s" : "");
}

// Samples taken once per bin (at its middle), times `scale`.
std::vector<std::pair<double, double>> sampled(const json& values, double scale = 1) {
  std::vector<std::pair<double, double>> pts;
  std::size_t i = 0;
  for (const auto& v : values) {
    pts.emplace_back((static_cast<double>(i) + 0.5) * bin_seconds, v.get<double>() * scale);
    ++i;
  }
  return pts;
}

// The server's request limit over a timeline: a reference line when it never changes, else a
// series.
void add_limit(svg::chart& c, const json& timeline) {
  if (!timeline.contains("limit_rps") || timeline["limit_rps"].empty()) {
    return;
  }
  const json& l = timeline["limit_rps"];
  double lo = std::numeric_limits<double>::infinity();
  double hi = 0;
  for (const auto& v : l) {
    lo = std::min(lo, v.get<double>());
    hi = std::max(hi, v.get<double>());
  }
  if (lo == hi) {
    c.references.push_back({hi, "server limit " + rate_label(hi) + " r/s"});
  } else {
    c.lines.push_back({"server limit", sampled(l), "#000000", true, false});
  }
}

std::vector<std::pair<double, double>> per_second(const json& bins) {
  std::vector<std::pair<double, double>> pts;
  std::size_t i = 0;
  for (const auto& v : bins) {
    pts.emplace_back((static_cast<double>(i) + 0.5) * bin_seconds, v.get<double>() / bin_seconds);
    ++i;
  }
  return pts;
}

svg::chart timeline_chart(const json& run, const std::string& title, double x_max) {
  svg::chart c;
  c.title = title;
  c.x_label = "seconds since the run started (100 ms bins)";
  c.y_label = "per second";
  c.x_min = 0;
  c.x_max = x_max;
  c.height = 260;
  const json& t = run["timeline"];
  c.lines.push_back({"attempts sent", per_second(t["attempts"]), "#E69F00", false, false});
  c.lines.push_back({"retries + fallbacks", per_second(t["repeats"]), "#D55E00", false, false});
  c.lines.push_back({"answered OK", per_second(t["ok"]), "#0072B2", false, false});
  c.lines.push_back({"failed", per_second(t["failed"]), "#000000", true, false});
  add_limit(c, t);
  return c;
}

// Rate over time for a run with a rate controller: the server's real limit against what the
// controller learned (estimate) and paces at, and what the server admitted. A token-limited run
// is drawn in tokens per second (the controller's in the client's estimated tokens).
svg::chart rate_chart(const json& run) {
  svg::chart c;
  const json& t = run["timeline"];
  const bool tokens = t.contains("limit_tpm") && !t.contains("limit_rps");
  c.title = mix_title(run) + ", " + run["policy"].get<std::string>() + ", concurrency " +
            std::to_string(run["concurrency"].get<int>()) + ", " +
            std::to_string(run["prompts"].get<std::size_t>()) +
            " prompts: " + fixed(run["wall_s"], 1) + " s" +
            (run.value("wall_over_ideal", json()).is_number()
                 ? " (" + fixed(run["wall_over_ideal"], 2) + "x ideal)"
                 : "") +
            ", " + std::to_string(run["http_429"].get<std::uint64_t>()) + " 429s";
  c.x_label = "seconds since the run started (100 ms bins; limit and controller sampled mid-bin)";
  c.x_min = 0;
  c.x_max = std::max(0.1, run["wall_s"].get<double>());
  c.y_min = 0;
  c.width = 1000;
  double top = 0;
  auto note_top = [&top](const json& v, double scale) {
    for (const auto& x : v) {
      top = std::max(top, x.get<double>() * scale);
    }
  };
  if (tokens) {
    // The controller counts the client's token estimates (prompt + max_tokens); the server
    // counts what it charged. Both are drawn as they are: the gap is part of the story.
    c.y_label = "tokens / s (* in client-estimated tokens)";
    c.lines.push_back({"server limit", sampled(t["limit_tpm"], 1 / 60.0), "#000000", true, false});
    note_top(t["limit_tpm"], 1 / 60.0);
    if (t.contains("pacing_estimate_tps")) {
      c.lines.push_back(
          {"learned estimate *", sampled(t["pacing_estimate_tps"]), "#0072B2", true, false});
      c.lines.push_back({"paced rate *", sampled(t["pacing_rate_tps"]), "#E69F00", false, false});
      note_top(t["pacing_estimate_tps"], 1);
    }
    if (t.contains("ok_tokens")) {
      c.lines.push_back(
          {"admitted (OK answers)", per_second(t["ok_tokens"]), "#009E73", false, false});
    }
  } else {
    c.y_label = "requests per second";
    if (t.contains("limit_rps")) {
      c.lines.push_back({"server limit", sampled(t["limit_rps"]), "#000000", true, false});
      note_top(t["limit_rps"], 1);
    }
    if (t.contains("pacing_estimate_rps")) {
      c.lines.push_back(
          {"learned estimate", sampled(t["pacing_estimate_rps"]), "#0072B2", true, false});
      c.lines.push_back({"paced rate", sampled(t["pacing_rate_rps"]), "#E69F00", false, false});
      note_top(t["pacing_estimate_rps"], 1);
    }
    c.lines.push_back({"admitted (OK answers)", per_second(t["ok"]), "#009E73", false, false});
    c.lines.push_back({"429s", per_second(t["http_429"]), "#D55E00", false, false});
  }
  // Startup bursts of 429s reach thousands per second: cut the axis at twice the limit.
  if (top > 0) {
    c.y_max = 2 * top;
  }
  return c;
}

svg::chart cdf_chart(const std::vector<const json*>& runs, const std::string& title) {
  svg::chart c;
  c.title = title;
  c.x_label = "seconds from a prompt's start to its successful answer (log scale)";
  c.y_label = "share of prompts answered OK";
  c.log_x = true;
  c.y_min = 0;
  c.y_max = 1;
  for (const json* r : runs) {
    svg::series s;
    const std::string policy = (*r)["policy"];
    s.name = policy + " (" + fixed(100 * (*r)["success_ratio"].get<double>(), 1) + "% ok)";
    s.color = policy_color(policy);
    for (const auto& p : (*r)["ok_latency_cdf"]) {
      s.points.emplace_back(std::max(1e-4, p[0].get<double>()), p[1].get<double>());
    }
    c.lines.push_back(std::move(s));
  }
  return c;
}

std::string file_safe(std::string s) {
  for (char& ch : s) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_')) {
      ch = '_';
    }
  }
  return s;
}

}  // namespace

// ---- matrix ------------------------------------------------------------------------------------

const std::vector<std::string>& bench_faults() {
  static const std::vector<std::string> v = {
      "clean",   "rate_limited",           "flaky",        "outage",        "slow",
      "limited", "limited_no_retry_after", "limit_change", "token_limited", "mixed"};
  return v;
}

const std::vector<std::string>& bench_policies() {
  static const std::vector<std::string> v = {"none", "naive",    "exponential", "full_jitter",
                                             "keel", "newcomer", "keel_limit",  "aws_adaptive"};
  return v;
}

bool bench_limited_mix(const std::string& fault) {
  return fault == "limited" || fault == "limited_no_retry_after" || fault == "limit_change" ||
         fault == "token_limited" || fault == "mixed";
}

bool bench_paced_policy(const std::string& policy) {
  return policy == "keel" || policy == "newcomer" || policy == "keel_limit";
}

namespace {

// The limited mixes but `mixed` front an OpenAI-format server; see anthropic_model.
bool openai_primary(const std::string& fault) {
  return bench_limited_mix(fault) && fault != "mixed";
}

// The prompts of a limited run at rate R: N = 10·R (an ideal of about 10 s), 15·R for
// limit_change (so the run outlasts the limit's return at 15 s), 3·R with --quick.
std::size_t limited_prompts(const std::string& fault, double rate, const bench_options& o) {
  if (o.prompts) {
    return *o.prompts;
  }
  const double per_rate = fault == "limit_change" ? 15 : o.quick ? 3 : 10;
  return static_cast<std::size_t>(std::max(1.0, std::round(per_rate * rate)));
}

// The policies the default matrix runs on each limited mix (at concurrency 64), chosen to keep
// the default matrix near six minutes: the keel stack as a newcomer configures it everywhere;
// on `limited` also the bench's keel, keel with the limit configured and the AWS SDK's adaptive
// mode; keel with the limit configured where the limit is in tokens; a common client where it
// does not simply collapse (full_jitter on `limited` takes about a minute: run it with
// --policies). Any list can be run with --faults/--policies.
std::vector<std::string> limited_mix_policies(const std::string& fault) {
  if (fault == "limited") {
    return {"newcomer", "keel", "keel_limit", "aws_adaptive"};
  }
  if (fault == "limited_no_retry_after" || fault == "mixed") {
    return {"newcomer", "full_jitter"};
  }
  if (fault == "token_limited") {
    return {"newcomer", "keel_limit"};
  }
  return {"newcomer"};  // limit_change
}

}  // namespace

std::vector<bench_run_spec> bench_matrix(const bench_options& o) {
  const bool external = !o.url.empty();
  if (external && !o.faults.empty()) {
    throw std::invalid_argument(
        "--faults does not apply with --url (the endpoint is the fault mix)");
  }
  for (const auto& f : o.faults) {
    if (!contains(bench_faults(), f)) {
      throw std::invalid_argument("unknown fault mix \"" + f + "\" (" + join(bench_faults()) + ")");
    }
  }
  for (const auto& p : o.policies) {
    if (!contains(bench_policies(), p)) {
      throw std::invalid_argument("unknown policy \"" + p + "\" (" + join(bench_policies()) + ")");
    }
  }
  for (int c : o.concurrency) {
    if (c < 1 || c > 100000) {
      throw std::invalid_argument("concurrency " + std::to_string(c) + " is not in [1, 100000]");
    }
  }
  for (double r : o.rates) {
    if (!(r > 0 && r <= 1e6)) {
      throw std::invalid_argument("rate " + fixed(r, 3) + " is not in (0, 1000000]");
    }
  }
  const std::size_t n = o.prompts.value_or(o.quick ? 200 : 2000);
  if (n == 0) {
    throw std::invalid_argument("--prompts must be at least 1");
  }
  const std::vector<double> rates =
      o.rates.empty() ? std::vector<double>{bench_default_rate} : o.rates;
  std::vector<bench_run_spec> out;
  std::set<std::tuple<std::string, std::string, int, double>> seen;
  auto add = [&](const std::string& f, const std::string& p, int c) {
    if (!bench_limited_mix(f)) {
      if (seen.emplace(f, p, c, 0.0).second) {
        out.push_back({f, p, c, prompts_for(c, n), 0});
      }
      return;
    }
    for (double r : rates) {
      if (seen.emplace(f, p, c, r).second) {
        out.push_back({f, p, c, limited_prompts(f, r, o), r});
      }
    }
  };
  const std::vector<std::string> ext = {"external"};
  // --rate alone keeps the default matrix and changes the limit of its limited runs.
  const bool custom = !o.faults.empty() || !o.policies.empty() || !o.concurrency.empty();
  if (custom) {
    const auto& faults = external ? ext : (o.faults.empty() ? bench_faults() : o.faults);
    const auto& policies = o.policies.empty() ? bench_policies() : o.policies;
    const std::vector<int> conc =
        o.concurrency.empty() ? std::vector<int>{o.quick ? 16 : 64} : o.concurrency;
    for (const auto& f : faults) {
      for (const auto& p : policies) {
        for (int c : conc) {
          add(f, p, c);
        }
      }
    }
    return out;
  }
  if (o.quick) {
    const std::vector<std::string> compared =
        external ? ext : std::vector<std::string>{"clean", "flaky", "rate_limited"};
    for (const auto& f : compared) {
      for (const char* p : {"none", "keel"}) {
        add(f, p, 16);
      }
    }
    for (const auto& f : external ? ext : std::vector<std::string>{"clean", "rate_limited"}) {
      for (int c : {4, 16, 256}) {
        add(f, "keel", c);
      }
    }
    if (!external) {
      add("limited", "newcomer", 16);
      add("limited", "keel", 16);
      add("limited_no_retry_after", "newcomer", 16);
      add("token_limited", "newcomer", 16);
      add("mixed", "newcomer", 16);
    }
    return out;
  }
  const std::vector<std::string> classic = {"clean", "rate_limited", "flaky", "outage", "slow"};
  const std::vector<std::string> common = {"none", "naive", "exponential", "full_jitter", "keel"};
  for (const auto& f : external ? ext : classic) {
    for (const auto& p : common) {
      add(f, p, 64);
    }
  }
  for (const auto& f : external ? ext : std::vector<std::string>{"clean", "rate_limited"}) {
    for (int c : {1, 16, 64, 256, 1024, 10000}) {
      add(f, "keel", c);
    }
  }
  // The common client with the best manners (full jitter, Retry-After obeyed) for contrast.
  for (int c : {1, 16, 64, 256, 1024, 10000}) {
    add(external ? ext.front() : "rate_limited", "full_jitter", c);
  }
  if (external) {
    for (const char* p : {"newcomer", "keel_limit", "aws_adaptive"}) {
      add(ext.front(), p, 64);
    }
    return out;
  }
  for (const auto& f : bench_faults()) {
    if (bench_limited_mix(f)) {
      for (const auto& p : limited_mix_policies(f)) {
        add(f, p, 64);
      }
    }
  }
  return out;
}

std::string bench_scenario_json(const std::string& fault, double rate) {
  if (!contains(bench_faults(), fault)) {
    throw std::invalid_argument("unknown fault mix \"" + fault + "\"");
  }
  if (!(rate > 0)) {
    throw std::invalid_argument("the server limit must be positive");
  }
  auto plan = [&](bool primary) {
    json m;
    if (bench_limited_mix(fault)) {
      // A limiter that does not advertise itself: latency low enough that the limit, not the
      // answers, bounds throughput (mixed: 50 ms, at which 64 calls in flight still allow
      // 1,280 r/s).
      m["latency_ms"] = fault == "mixed" ? json(50) : json{{"min", 0}, {"max", 2}};
      m["rate_limit_headers"] = false;
      if (fault == "token_limited") {
        // Tokens only: R prompts' worth per second, a bucket of 21 prompts' worth.
        const double cost = mock_tokens(token_prompt_bytes);
        m["rate_limit"] = {{"tokens_per_minute", rate * 60 * cost},
                           {"token_burst", limited_burst * cost}};
      } else {
        m["rate_limit"] = {{"requests_per_second", rate}, {"burst", limited_burst}};
      }
      if (fault == "limited_no_retry_after") {
        m["limiter_retry_after"] = "none";
      } else {
        // nginx: `add_header Retry-After 1 always` on the 429 location, whatever the real wait.
        m["limiter_retry_after"] = "constant";
        m["retry_after_ms"] = 1000;
        m["retry_after_format"] = "seconds";
      }
      if (fault == "limit_change") {
        m["rate_schedule"] =
            json::array({{{"at_ms", change_down_ms}, {"requests_per_second", rate / 2}},
                         {{"at_ms", change_up_ms}, {"requests_per_second", rate}}});
      }
      if (fault == "mixed") {
        m["errors"] = {{"unavailable", mixed_failure_share / 2},
                       {"overloaded", mixed_failure_share / 2}};
      }
      return m;
    }
    m["latency_ms"] = {{"min", 10}, {"max", 30}};
    if (fault == "rate_limited") {
      // The limiter's 429s state their exact wait rounded up to whole seconds: "Retry-After: 1".
      m["rate_limit"] = {{"requests_per_second", server_rps}, {"burst", server_rps}};
      m["retry_after_format"] = "seconds";
    } else if (fault == "flaky") {
      m["errors"] = {{"unavailable", 0.05}, {"overloaded", 0.05}};
    } else if (fault == "outage" && primary) {
      m["outages"] = json::array({{{"from_ms", 500}, {"to_ms", 3500}}});
    } else if (fault == "slow") {
      m["latency_ms"] = 50;
    }
    return m;
  };
  const bool openai = openai_primary(fault);
  json s;
  s["models"] = {{openai ? openai_model : anthropic_model, plan(true)},
                 {openai ? anthropic_model : openai_model, plan(false)}};
  return s.dump();
}

llm::client_config bench_config(const bench_run_spec& run, const std::string& base_url,
                                const bench_options& opts) {
  const std::string& policy = run.policy;
  if (!contains(bench_policies(), policy)) {
    throw std::invalid_argument("unknown policy \"" + policy + "\"");
  }
  const bool external = !opts.url.empty();
  const char* env_key = std::getenv("KEEL_BENCH_API_KEY");
  const std::string key = env_key && *env_key ? env_key : "bench-key-not-secret";
  const std::string ext_model = !opts.model.empty()            ? opts.model
                                : opts.api_type == "anthropic" ? std::string(anthropic_model)
                                                               : std::string(openai_model);
  const bool openai = openai_primary(run.fault);
  const std::string primary_type = external ? opts.api_type : openai ? "openai" : "anthropic";
  const std::string primary = external ? ext_model : openai ? openai_model : anthropic_model;
  const std::string fallback_type = external ? opts.api_type : openai ? "anthropic" : "openai";
  const std::string fallback = external ? ext_model : openai ? anthropic_model : openai_model;
  auto parse = [&](const json& doc) {
    return llm::parse_config(doc.dump(), "<keel bench " + policy + ">",
                             [](std::string_view) { return std::optional<std::string>{}; });
  };
  if (policy == "newcomer") {
    // What a newcomer writes: model, where, key (and the wire format when it is not OpenAI's).
    json e = {{"model", primary}, {"base_url", base_url}, {"api_key", key}};
    if (primary_type != "openai") {
      e["api_type"] = primary_type;
    }
    return parse(json::array({e}));
  }
  auto entry = [&](const std::string& type, const std::string& model) {
    // A per-attempt timeout the mock never reaches (its answers take at most 50 ms).
    return json{{"api_type", type},
                {"model", model},
                {"api_key", key},
                {"base_url", base_url},
                {"timeout", 10}};
  };
  json list = json::array();
  list.push_back(entry(primary_type, primary));
  auto backoff = [](const char* jitter) {
    return json{{"kind", "exponential"}, {"base", 0.5}, {"cap", 8}, {"jitter", jitter}};
  };
  json pol;
  json off = {{"enabled", false}};
  if (policy == "none") {
    pol["deadline"] = 120;
    pol["retry"] = {{"max_attempts", 1}};
    pol["breaker"] = off;
    pol["retry_budget"] = off;
  } else if (policy == "naive") {
    pol["deadline"] = 120;
    pol["retry"] = {
        {"max_attempts", 4}, {"backoff", {{"kind", "immediate"}}}, {"honour_retry_after", false}};
    pol["breaker"] = off;
    pol["retry_budget"] = off;
  } else if (policy == "exponential" || policy == "full_jitter") {
    pol["deadline"] = 120;
    pol["retry"] = {{"max_attempts", 4},
                    {"backoff", backoff(policy == "exponential" ? "none" : "full")},
                    {"honour_retry_after", true}};
    pol["breaker"] = off;
    pol["retry_budget"] = off;
  } else if (policy == "aws_adaptive") {
    // The AWS SDKs' adaptive mode (botocore defaults: 3 attempts, its CUBIC token bucket, its
    // retry quota); no keel breaker or budget.
    list[0]["mode"] = "adaptive";
    pol["deadline"] = 120;
    pol["breaker"] = off;
    pol["retry_budget"] = off;
  } else {  // keel, keel_limit
    // keel's defaults (6 attempts, full-jitter exponential 0.5 s capped at 20 s, Retry-After
    // obeyed, retry budget 100 tokens at ratio 0.5, 300 s deadline) but for the breaker's break:
    // the default 30 s (growing to 300 s) is sized for real outages, and the bench compresses
    // its outage into 3 s of a 10 s run; with 30 s the primary would never be probed again
    // after it, and `outage` would measure the fallback, not the recovery.
    pol["breaker"] = {{"break", 1}, {"max_break", 10}};
    if (policy == "keel_limit") {
      // The limit the server enforces, as a user who knows it configures it.
      const double r = run.rate > 0                      ? run.rate
                       : run.fault == "rate_limited"     ? server_rps
                       : external && !opts.rates.empty() ? opts.rates.front()
                       : external                        ? bench_default_rate
                                                         : 0;
      if (run.fault == "token_limited") {
        pol["rate_limits"] = {{"tokens_per_minute", r * 60 * mock_tokens(token_prompt_bytes)}};
      } else if (r > 0) {
        pol["rate_limits"] = {{"requests_per_minute", r * 60}};
      }
    }
    list.push_back(entry(fallback_type, fallback));
  }
  return parse(json{{"config_list", list}, {"policy", pol}});
}

llm::client_config bench_config(const std::string& policy, const std::string& base_url,
                                const bench_options& opts) {
  bench_run_spec run;
  run.fault = "clean";
  run.policy = policy;
  return bench_config(run, base_url, opts);
}

std::optional<double> bench_ideal_seconds(const bench_run_spec& run) {
  if (!bench_limited_mix(run.fault) && run.fault != "rate_limited") {
    return std::nullopt;
  }
  const bool classic = run.fault == "rate_limited";
  const double rate = classic ? server_rps : run.rate;
  if (!(rate > 0)) {
    return std::nullopt;
  }
  // Work and rates in requests (token_limited: prompts, every one costing the same tokens).
  const double work = static_cast<double>(run.prompts) *
                      (run.fault == "mixed" ? 1 / (1 - mixed_failure_share) : 1.0);
  const double burst = classic ? server_rps : limited_burst;
  // The limiter starts full and admits `burst` at once, then refills at the rate in force.
  std::vector<std::pair<double, double>> pieces;  // (from second, rate)
  pieces.emplace_back(0, rate);
  if (run.fault == "limit_change") {
    pieces.emplace_back(change_down_ms / 1000.0, rate / 2);
    pieces.emplace_back(change_up_ms / 1000.0, rate);
  }
  double left = std::max(0.0, work - burst);
  double t = 0;
  for (std::size_t i = 0; i < pieces.size() && left > 0; ++i) {
    const double r = pieces[i].second;
    const double end =
        i + 1 < pieces.size() ? pieces[i + 1].first : std::numeric_limits<double>::infinity();
    const double can = (end - pieces[i].first) * r;
    if (can >= left) {
      t = pieces[i].first + left / r;
      left = 0;
    } else {
      left -= can;
      t = end;
    }
  }
  // The last answer's latency, and what the concurrency allows at the mean latency.
  const double latency = classic ? 0.020 : run.fault == "mixed" ? 0.050 : 0.001;
  const double by_concurrency = work * latency / std::max(1, run.concurrency);
  return std::max(t + latency, by_concurrency);
}

// ---- one run -----------------------------------------------------------------------------------

namespace {

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

  void sample(const bench_mock* mock, const std::string& model,
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
  std::unique_ptr<bench_mock> mock;
  std::string url = opts.url;
  if (url.empty()) {
    mock = std::make_unique<bench_mock>(
        keel::testing::scenario::from_json(
            bench_scenario_json(spec.fault, spec.rate > 0 ? spec.rate : bench_default_rate)),
        opts.seed);
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
        {"client_estimate", items.empty() ? 0 : keel::llm::estimate_tokens(items.front().request)}};
  }
  if (!pacing.is_null()) {
    j["pacing"] = pacing;
  }
  if (mock) {
    j["server"] = server;
  }
  return j;
}

// ---- reporting ---------------------------------------------------------------------------------

json bench_target(const json& runs) {
  for (const auto& r : runs) {
    if (r.contains("error") || r.value("fault", "") != "rate_limited" ||
        r.value("policy", "") != "keel" || r.value("concurrency", 0) != 64 ||
        r.value("prompts", 0) != 2000) {
      continue;
    }
    const double prompts = 2000;
    const double ideal = prompts / server_rps;
    const double wall = r["wall_s"];
    const std::uint64_t failed = r["failed"];
    const std::uint64_t attempts = r["attempts"];
    json t;
    t["workload"] =
        "rate-limited server (200 r/s, Retry-After: 1), 2,000 prompts, concurrency 64, keel";
    t["wall_s"] = wall;
    t["ideal_s"] = ideal;
    t["wall_vs_ideal_pct"] = round_to((wall - ideal) / ideal * 100, 2);
    t["wall_ok"] = std::fabs(wall - ideal) <= 0.05 * ideal;
    t["failed"] = failed;
    t["failed_ok"] = failed == 0;
    t["attempts"] = attempts;
    t["attempts_limit"] = 1.1 * prompts;
    t["attempts_ok"] = static_cast<double>(attempts) <= 1.1 * prompts;
    t["hit"] =
        t["wall_ok"].get<bool>() && t["failed_ok"].get<bool>() && t["attempts_ok"].get<bool>();
    return t;
  }
  return nullptr;
}

std::string bench_table(const json& runs, bool markdown) {
  struct column {
    const char* name;
    bool left;
  };
  // "R" is a limited mix's server limit; "learned" the primary bucket controller's final
  // estimate (requests/s; token_limited: client-estimated tokens/s), blank without one.
  const std::vector<column> cols = {
      {"fault", true},        {"policy", true},           {"conc", false},
      {"R", false},           {"prompts", false},         {"wall s", false},
      {"wall/ideal", false},  {"goodput/s", false},       {"ok %", false},
      {"failed", false},      {"attempts/prompt", false}, {"429s", false},
      {"learned", false},     {"p50 s", false},           {"p99 s", false},
      {"throttled s", false}, {"client CPU s", false},    {"peak RSS MiB", false}};
  std::vector<std::vector<std::string>> rows;
  for (const auto& r : runs) {
    if (r.contains("error")) {
      std::vector<std::string> row(cols.size());
      row[0] = r.value("fault", "?");
      row[1] = r.value("policy", "?");
      row[5] = "error: " + r["error"].get<std::string>();
      rows.push_back(std::move(row));
      continue;
    }
    const double rate = r.value("rate", 0.0);
    std::string learned;
    if (r.contains("pacing")) {
      const json& p = r["pacing"];
      const bool tokens = r["fault"] == "token_limited" && p["tokens"]["estimate"] > 0;
      learned = fixed(p[tokens ? "tokens" : "requests"]["estimate"], 0);
    }
    rows.push_back(
        {r["fault"].get<std::string>(), r["policy"].get<std::string>(),
         std::to_string(r["concurrency"].get<int>()), rate > 0 ? rate_label(rate) : "",
         std::to_string(r["prompts"].get<std::size_t>()), fixed(r["wall_s"], 2),
         r.value("wall_over_ideal", json()).is_number() ? fixed(r["wall_over_ideal"], 2) : "",
         fixed(r["goodput_per_s"], 0), fixed(100 * r["success_ratio"].get<double>(), 1),
         std::to_string(r["failed"].get<std::uint64_t>()), fixed(r["attempts_per_prompt"], 2),
         std::to_string(r["http_429"].get<std::uint64_t>()), learned,
         fixed(r["latency_s"]["p50"], 3), fixed(r["latency_s"]["p99"], 3),
         fixed(r["throttled_s"]["total"], 1), fixed(r["cpu_s"]["client_thread"], 2),
         fixed(r["rss_mib"]["peak"], 0)});
  }
  std::vector<std::size_t> width(cols.size());
  for (std::size_t c = 0; c < cols.size(); ++c) {
    width[c] = std::strlen(cols[c].name);
    for (const auto& row : rows) {
      width[c] = std::max(width[c], row[c].size());
    }
  }
  auto cell = [&](const std::string& s, std::size_t c) {
    const std::string pad(width[c] - std::min(width[c], s.size()), ' ');
    return cols[c].left ? s + pad : pad + s;
  };
  std::string out;
  auto line = [&](const std::vector<std::string>& v) {
    for (std::size_t c = 0; c < cols.size(); ++c) {
      out += markdown ? "| " + v[c] + " " : cell(v[c], c) + "  ";
    }
    if (markdown) {
      out += "|";
    } else {
      while (!out.empty() && out.back() == ' ') {
        out.pop_back();
      }
    }
    out += "\n";
  };
  std::vector<std::string> header;
  for (const auto& c : cols) {
    header.push_back(c.name);
  }
  line(header);
  if (markdown) {
    for (const auto& c : cols) {
      out += c.left ? "| --- " : "| ---: ";
    }
    out += "|\n";
  }
  for (const auto& row : rows) {
    line(row);
  }
  return out;
}

std::vector<std::string> write_bench_plots(const json& results, const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> written;
  const json& runs = results["runs"];
  auto save = [&](const std::string& name, const std::string& text) {
    svg::write_file((fs::path(dir) / name).string(), text);
    written.push_back(name);
  };
  std::map<std::pair<std::string, int>, std::vector<const json*>> by_mix;             // policies
  std::map<std::pair<std::string, std::string>, std::vector<const json*>> by_policy;  // sweeps
  for (const auto& r : runs) {
    if (r.contains("error")) {
      continue;
    }
    by_mix[{mix_key(r), r["concurrency"]}].push_back(&r);
    by_policy[{mix_key(r), r["policy"]}].push_back(&r);
  }
  std::set<const json*> plotted;
  auto mix_plots = [&](const std::string& mix, int conc, const std::vector<const json*>& rs) {
    const std::string suffix = file_safe(mix) + "-c" + std::to_string(conc);
    const std::string what = mix_title(*rs.front()) + ", concurrency " + std::to_string(conc) +
                             ", " + std::to_string((*rs.front())["prompts"].get<std::size_t>()) +
                             " prompts";
    save("latency-cdf-" + suffix + ".svg",
         svg::render(cdf_chart(rs, "Latency of successful answers by policy: " + what)));
    double x_max = 0;
    for (const json* r : rs) {
      x_max = std::max(x_max, (*r)["wall_s"].get<double>());
    }
    std::vector<svg::chart> panels;
    for (const json* r : rs) {
      panels.push_back(
          timeline_chart(*r,
                         (*r)["policy"].get<std::string>() + ": " + fixed((*r)["wall_s"], 1) +
                             " s, " + fixed(100 * (*r)["success_ratio"].get<double>(), 1) +
                             "% ok, " + fixed((*r)["attempts_per_prompt"], 2) + " attempts/prompt",
                         std::max(0.1, x_max)));
      plotted.insert(r);
    }
    save("timeline-" + suffix + ".svg",
         svg::render_column("Attempts and answers over time: " + what, panels));
  };
  for (const auto& [key, rs] : by_mix) {
    if (rs.size() >= 2) {
      mix_plots(key.first, key.second, rs);
    }
  }

  svg::chart amp, goodput, success, p99;
  amp.title = "Retry amplification: attempts per prompt";
  goodput.title = "Goodput: successful answers per second";
  success.title = "Success ratio: share of prompts answered OK";
  p99.title = "p99 latency of a prompt (successes and failures)";
  for (auto* c : {&amp, &goodput, &success, &p99}) {
    c->log_x = true;
    c->x_label = "concurrency (items in flight, log scale)";
  }
  amp.y_label = "attempts / prompt";
  goodput.y_label = "answers / s";
  success.y_label = "share";
  success.y_min = 0;
  success.y_max = 1;
  p99.y_label = "seconds";
  amp.references.push_back({1.0, "one attempt per prompt"});
  for (const auto& [key, rs0] : by_policy) {
    std::vector<const json*> rs = rs0;
    std::sort(rs.begin(), rs.end(), [](const json* a, const json* b) {
      return (*a)["concurrency"].get<int>() < (*b)["concurrency"].get<int>();
    });
    if (rs.size() < 2) {
      continue;
    }
    const auto& [mix, policy] = key;
    const std::string name = mix_title(*rs.front()) + " / " + policy;
    svg::series a{name,
                  {},
                  policy == "keel" ? fault_color((*rs.front())["fault"]) : policy_color(policy),
                  policy != "keel",
                  true};
    svg::series g = a;
    svg::series k = a;
    svg::series q = a;
    double x_max = 0;
    std::vector<svg::chart> panels;
    for (const json* r : rs) {
      const double c = (*r)["concurrency"].get<int>();
      a.points.emplace_back(c, (*r)["attempts_per_prompt"].get<double>());
      g.points.emplace_back(c, (*r)["goodput_per_s"].get<double>());
      k.points.emplace_back(c, (*r)["success_ratio"].get<double>());
      q.points.emplace_back(c, (*r)["latency_s"]["p99"].get<double>());
      x_max = std::max(x_max, (*r)["wall_s"].get<double>());
    }
    for (const json* r : rs) {
      panels.push_back(
          timeline_chart(*r,
                         "concurrency " + std::to_string((*r)["concurrency"].get<int>()) + " (" +
                             std::to_string((*r)["prompts"].get<std::size_t>()) +
                             " prompts): " + fixed((*r)["wall_s"], 1) + " s, " +
                             fixed(100 * (*r)["success_ratio"].get<double>(), 1) + "% ok, " +
                             fixed((*r)["attempts_per_prompt"], 2) + " attempts/prompt",
                         std::max(0.1, x_max)));
      plotted.insert(r);
    }
    save("timeline-sweep-" + file_safe(mix) + "-" + file_safe(policy) + ".svg",
         svg::render_column("Concurrency sweep over time: " + name, panels));
    amp.lines.push_back(std::move(a));
    goodput.lines.push_back(std::move(g));
    success.lines.push_back(std::move(k));
    p99.lines.push_back(std::move(q));
  }
  if (!amp.lines.empty()) {
    save("amplification.svg", svg::render_column("keel bench: behaviour as concurrency grows",
                                                 {amp, goodput, success, p99}));
  }
  // A run that is in no comparison still gets its own plots.
  for (const auto& [key, rs] : by_mix) {
    if (rs.size() == 1 && !plotted.count(rs.front())) {
      mix_plots(key.first, key.second, rs);
    }
  }
  // What the rate controller learned, per run that has one, against a limiter (or --url).
  for (const auto& r : runs) {
    if (r.contains("error") || !r.contains("pacing")) {
      continue;
    }
    const json& t = r["timeline"];
    if (!(t.contains("limit_rps") || t.contains("limit_tpm") || r["fault"] == "external")) {
      continue;
    }
    save("rate-" + file_safe(mix_key(r)) + "-" + file_safe(r["policy"]) + "-c" +
             std::to_string(r["concurrency"].get<int>()) + ".svg",
         svg::render_column(
             "Rate over time: real limit vs learned estimate vs paced rate vs admitted",
             {rate_chart(r)}));
  }
  return written;
}

namespace {

// The retry-delay histograms of the runs that retried, as a Markdown table.
std::string retry_histogram_table(const json& runs) {
  auto label = [](double lo, double hi) {
    auto t = [](double v) { return v < 1 ? fixed(v * 1000, 0) + " ms" : fixed(v, 0) + " s"; };
    if (lo == 0) {
      return "< " + t(hi);
    }
    return std::isinf(hi) ? "≥ " + t(lo) : t(lo) + "–" + t(hi);
  };
  std::string out = "| fault | policy | conc | retries | from Retry-After |";
  std::string rule = "| --- | --- | ---: | ---: | ---: |";
  for (std::size_t b = 0; b < delay_edges.size(); ++b) {
    const double hi =
        b + 1 < delay_edges.size() ? delay_edges[b + 1] : std::numeric_limits<double>::infinity();
    out += " " + label(delay_edges[b], hi) + " |";
    rule += " ---: |";
  }
  out += "\n" + rule + "\n";
  bool any = false;
  for (const auto& r : runs) {
    if (r.contains("error") || r["retries"].get<std::uint64_t>() == 0) {
      continue;
    }
    any = true;
    const json& h = r["retry_delay_histogram"];
    out += "| " + r["fault"].get<std::string>() + " | " + r["policy"].get<std::string>() + " | " +
           std::to_string(r["concurrency"].get<int>()) + " | " +
           std::to_string(r["retries"].get<std::uint64_t>()) + " | " +
           std::to_string(h["from_server_hint"].get<std::uint64_t>()) + " |";
    for (const auto& n : h["counts"]) {
      out += " " + std::to_string(n.get<std::uint64_t>()) + " |";
    }
    out += "\n";
  }
  return any ? out : std::string();
}

}  // namespace

int run_bench(const bench_options& opts) {
  namespace fs = std::filesystem;
  const std::vector<bench_run_spec> specs = bench_matrix(opts);
  fs::create_directories(opts.out_dir);
  if (opts.progress) {
    std::fprintf(stderr, "keel bench: %zu runs against %s; results in %s\n", specs.size(),
                 opts.url.empty() ? "the in-process mock" : opts.url.c_str(), opts.out_dir.c_str());
  }
  const json machine = machine_json();  // before the runs: the date and load at the start
  const auto t0 = clock_type::now();
  json runs = json::array();
  int errors = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto& s = specs[i];
    json r;
    try {
      r = opts.fork ? run_isolated(s, opts) : run_bench_scenario(s, opts);
    } catch (const std::exception& e) {
      r = json{{"error", e.what()}};
    }
    if (r.contains("error")) {
      ++errors;
      r["fault"] = s.fault;
      r["policy"] = s.policy;
      r["concurrency"] = s.concurrency;
      r["prompts"] = s.prompts;
      if (s.rate > 0) {
        r["rate"] = s.rate;
      }
    }
    if (opts.progress) {
      if (r.contains("error")) {
        std::fprintf(stderr, "  [%zu/%zu] %s / %s c=%d: error: %s\n", i + 1, specs.size(),
                     s.fault.c_str(), s.policy.c_str(), s.concurrency,
                     r["error"].get<std::string>().c_str());
      } else {
        const std::string vs_ideal = r.value("wall_over_ideal", json()).is_number()
                                         ? " (" + fixed(r["wall_over_ideal"], 2) + "x ideal)"
                                         : "";
        const std::string rate = s.rate > 0 ? " R=" + rate_label(s.rate) : "";
        std::fprintf(stderr,
                     "  [%zu/%zu] %-22s %-12s c=%-5d%s %6zu prompts: %7.2f s%s, %5.1f%% ok, %.2f "
                     "attempts/prompt, %llu 429s\n",
                     i + 1, specs.size(), s.fault.c_str(), s.policy.c_str(), s.concurrency,
                     rate.c_str(), s.prompts, r["wall_s"].get<double>(), vs_ideal.c_str(),
                     100 * r["success_ratio"].get<double>(), r["attempts_per_prompt"].get<double>(),
                     static_cast<unsigned long long>(r["http_429"].get<std::uint64_t>()));
      }
    }
    runs.push_back(std::move(r));
  }
  const double total = seconds_between(t0, clock_type::now());

  json results;
  results["tool"] = "keel bench";
  results["format"] = 1;
  results["machine"] = machine;
  json o;
  o["quick"] = opts.quick;
  o["endpoint"] = opts.url.empty() ? "in-process mock" : opts.url;
  o["seed"] = opts.seed;
  o["rates"] = opts.rates.empty() ? std::vector<double>{bench_default_rate} : opts.rates;
  o["fork_per_run"] = opts.fork;
  o["max_connections_per_host"] = max_connections;
  results["options"] = o;
  results["total_wall_s"] = round_to(total, 2);
  if (double load[3]; ::getloadavg(load, 3) == 3) {
    results["machine"]["load_average_at_end"] = {round_to(load[0], 2), round_to(load[1], 2),
                                                 round_to(load[2], 2)};
  }
  results["target"] = bench_target(runs);
  results["runs"] = runs;

  // results.json: the metadata pretty, one run per line (the runs carry long arrays).
  {
    std::string text = "{\n";
    for (const auto& [k, v] : results.items()) {
      if (k != "runs") {
        text += "  " + json(k).dump() + ": " + v.dump() + ",\n";
      }
    }
    text += "  \"runs\": [\n";
    for (std::size_t i = 0; i < runs.size(); ++i) {
      text += "    " + runs[i].dump() + (i + 1 < runs.size() ? ",\n" : "\n");
    }
    text += "  ]\n}\n";
    svg::write_file((fs::path(opts.out_dir) / "results.json").string(), text);
  }
  const json& target = results["target"];
  std::string verdict;
  if (target.is_null()) {
    verdict =
        "target: not measured (needs the rate_limited / keel run at concurrency 64 with "
        "2000 prompts)\n";
  } else {
    verdict = std::string("target (") + target["workload"].get<std::string>() +
              "): " + (target["hit"].get<bool>() ? "HIT" : "MISS") + ": wall " +
              fixed(target["wall_s"], 2) + " s vs ideal " + fixed(target["ideal_s"], 1) + " s (" +
              (target["wall_vs_ideal_pct"].get<double>() >= 0 ? "+" : "") +
              fixed(target["wall_vs_ideal_pct"], 1) + "%, limit ±5%), " +
              std::to_string(target["failed"].get<std::uint64_t>()) + " failed, " +
              std::to_string(target["attempts"].get<std::uint64_t>()) + " attempts (limit " +
              fixed(target["attempts_limit"], 0) + ")\n";
  }
  {
    std::string md = bench_table(runs, true);
    md += "\n" + verdict;
    if (const std::string h = retry_histogram_table(runs); !h.empty()) {
      md += "\nRetry delays (the sleep before each retry, by the delay's size):\n\n" + h;
    }
    svg::write_file((fs::path(opts.out_dir) / "table.md").string(), md);
  }
  const auto plots = write_bench_plots(results, opts.out_dir);

  std::fputs(bench_table(runs, false).c_str(), stdout);
  std::printf("\n%s", verdict.c_str());
  std::printf("%zu runs in %.0f s; wrote results.json, table.md and %zu SVG plots to %s\n",
              runs.size(), total, plots.size(), opts.out_dir.c_str());
  std::fflush(stdout);
  return errors ? 1 : 0;
}

}  // namespace keel::cli
