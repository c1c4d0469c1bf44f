// `keel bench`: scenario runs, their measurements, the matrix, the table, JSON and plots.
#include "bench.hpp"

#include "client.hpp"
#include "config.hpp"
#include "jsonl.hpp"
#include "stats.hpp"
#include "svg.hpp"

#include <keel/classify.hpp>
#include <keel/http/client.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
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

// The in-process mock's models: the primary speaks Anthropic's format (so that "overloaded" is a
// real 529), the keel stack's fallback entry OpenAI's.
constexpr const char* primary_model = "claude-3-5-haiku-latest";
constexpr const char* fallback_model = "gpt-4o-mini";
// The rate-limited mix's server limit, requests per second (also its burst).
constexpr double server_rps = 200;
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
  std::uint64_t attempts = 0, retries = 0, http_429 = 0, fallbacks = 0, breaker_opens = 0;
  std::uint64_t bucket_waits = 0, delays_from_hint = 0;
  double bucket_wait_s = 0, backoff_429_s = 0;
  std::vector<std::uint64_t> delay_counts = std::vector<std::uint64_t>(delay_edges.size(), 0);
  std::map<int, std::uint64_t> by_status;
  std::map<std::string, std::uint64_t> attempts_by_entry, failed_by_class;
  std::vector<double> latencies, ok_latencies;
  std::size_t ok = 0, failed = 0, fallback_answers = 0;

  explicit recorder(std::size_t items) : attempts_of(items, 0) {}

  void bump(std::vector<std::uint32_t>& bins, clock_type::time_point t) {
    const double s = std::max(0.0, seconds_between(t0, t));
    const auto i = static_cast<std::size_t>(s / bin_seconds);
    if (bins.size() <= i) {
      bins.resize(i + 1, 0);
    }
    ++bins[i];
  }

  client_hooks hooks(const config& cfg) {
    client_hooks h;
    h.on_attempt = [this, &cfg](const attempt_report& r) {
      const auto sent = clock_type::now() - std::chrono::duration_cast<clock_type::duration>(
                                                std::chrono::duration<double>(r.seconds));
      ++attempts;
      bump(bin_attempts, sent);
      const std::size_t i = r.item ? r.item->line - 1 : 0;
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
    h.on_retry = [this](const retry_report& r) {
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
    h.on_fallback = [this](const batch_item&, std::size_t, std::size_t, std::exception_ptr) {
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

  void complete(const call_outcome& out) {
    const auto now = clock_type::now();
    t_end = std::max(t_end, now);
    latencies.push_back(out.seconds);
    if (out.response) {
      ++ok;
      ok_latencies.push_back(out.seconds);
      fallback_answers += out.entry != 0 ? 1 : 0;
      bump(bin_ok, now);
    } else {
      ++failed;
      // The deciding error's class, and why retrying or falling back stopped.
      const json e = error_json(out.error);
      const std::string why = e.value("gave_up", "");
      ++failed_by_class[error_class(out.error) + (why.empty() ? "" : " (" + why + ")")];
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

std::vector<batch_item> make_items(std::size_t n) {
  static const char* const topics[] = {
      "the incident report",    "this support ticket", "the release notes",    "the customer email",
      "the meeting transcript", "the pull request",    "the on-call handover", "the postmortem"};
  std::vector<batch_item> items;
  items.reserve(n);
  for (std::size_t i = 1; i <= n; ++i) {
    const std::string line = R"({"id": )" + std::to_string(i) + R"(, "prompt": "Summarise )" +
                             topics[i % 8] + " #" + std::to_string(i) +
                             R"( in two sentences.", "max_tokens": 128})";
    auto parsed = parse_input_line(line, i, 1024);
    items.push_back(std::move(std::get<batch_item>(parsed)));
  }
  return items;
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
  return "#000000";
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
  if (run.value("fault", "") == "rate_limited" && run.contains("server")) {
    c.references.push_back({server_rps, "server limit 200 r/s"});
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
  static const std::vector<std::string> v = {"clean", "rate_limited", "flaky", "outage", "slow"};
  return v;
}

const std::vector<std::string>& bench_policies() {
  static const std::vector<std::string> v = {"none", "naive", "exponential", "full_jitter", "keel"};
  return v;
}

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
  const std::size_t n = o.prompts.value_or(o.quick ? 200 : 2000);
  if (n == 0) {
    throw std::invalid_argument("--prompts must be at least 1");
  }
  std::vector<bench_run_spec> out;
  std::set<std::tuple<std::string, std::string, int>> seen;
  auto add = [&](const std::string& f, const std::string& p, int c) {
    if (seen.emplace(f, p, c).second) {
      out.push_back({f, p, c, prompts_for(c, n)});
    }
  };
  const std::vector<std::string> ext = {"external"};
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
    return out;
  }
  for (const auto& f : external ? ext : bench_faults()) {
    for (const auto& p : bench_policies()) {
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
  return out;
}

std::string bench_scenario_json(const std::string& fault) {
  if (!contains(bench_faults(), fault)) {
    throw std::invalid_argument("unknown fault mix \"" + fault + "\"");
  }
  auto plan = [&](bool primary) {
    json m;
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
  json s;
  s["models"] = {{primary_model, plan(true)}, {fallback_model, plan(false)}};
  return s.dump();
}

config bench_config(const std::string& policy, const std::string& base_url,
                    const bench_options& opts) {
  if (!contains(bench_policies(), policy)) {
    throw std::invalid_argument("unknown policy \"" + policy + "\"");
  }
  const bool external = !opts.url.empty();
  const char* env_key = std::getenv("KEEL_BENCH_API_KEY");
  const std::string key = env_key && *env_key ? env_key : "bench-key-not-secret";
  auto entry = [&](const std::string& type, const std::string& model) {
    return json{{"api_type", type},
                {"model", model},
                {"api_key", key},
                {"base_url", base_url},
                {"timeout", 10}};
  };
  const std::string ext_model = !opts.model.empty()            ? opts.model
                                : opts.api_type == "anthropic" ? std::string(primary_model)
                                                               : std::string(fallback_model);
  json list = json::array();
  list.push_back(external ? entry(opts.api_type, ext_model) : entry("anthropic", primary_model));
  auto backoff = [](const char* jitter) {
    return json{{"kind", "exponential"}, {"base", 0.5}, {"cap", 8}, {"jitter", jitter}};
  };
  json pol;
  pol["deadline"] = 120;
  json off = {{"enabled", false}};
  if (policy == "none") {
    pol["retry"] = {{"max_attempts", 1}};
    pol["breaker"] = off;
    pol["retry_budget"] = off;
  } else if (policy == "naive") {
    pol["retry"] = {
        {"max_attempts", 4}, {"backoff", {{"kind", "immediate"}}}, {"honour_retry_after", false}};
    pol["breaker"] = off;
    pol["retry_budget"] = off;
  } else if (policy == "exponential" || policy == "full_jitter") {
    pol["retry"] = {{"max_attempts", 4},
                    {"backoff", backoff(policy == "exponential" ? "none" : "full")},
                    {"honour_retry_after", true}};
    pol["breaker"] = off;
    pol["retry_budget"] = off;
  } else {  // keel
    pol["retry"] = {
        {"max_attempts", 4}, {"backoff", backoff("full")}, {"honour_retry_after", true}};
    pol["breaker"] = {{"enabled", true},
                      {"failure_threshold", 5},
                      {"break", 1},
                      {"break_growth", 2},
                      {"max_break", 10}};
    pol["retry_budget"] = {{"enabled", true}, {"max_tokens", 100}, {"token_ratio", 0.1}};
    list.push_back(external ? entry(opts.api_type, ext_model) : entry("openai", fallback_model));
  }
  const json doc = {{"config_list", list}, {"policy", pol}};
  return parse_config(doc.dump(), "<keel bench " + policy + ">",
                      [](std::string_view) { return std::optional<std::string>{}; });
}

// ---- one run -----------------------------------------------------------------------------------

json run_bench_scenario(const bench_run_spec& spec, const bench_options& opts) {
  const double rss_start = current_rss_mib();
  std::unique_ptr<bench_mock> mock;
  std::string url = opts.url;
  if (url.empty()) {
    mock = std::make_unique<bench_mock>(
        keel::testing::scenario::from_json(bench_scenario_json(spec.fault)), opts.seed);
    url = mock->base_url();
  }
  const config cfg = bench_config(spec.policy, url, opts);
  const std::vector<batch_item> items = make_items(spec.prompts);
  recorder rec(items.size());
  double client_cpu = 0;
  {
    asio::io_context ctx(1);
    auto ex = ctx.get_executor();
    keel::http::client_options ho;
    ho.max_connections_per_host =
        std::min(max_connections, static_cast<std::size_t>(std::max(1, spec.concurrency)));
    keel::http::client http(ex, ho);
    bucket_registry buckets(ex);
    client_options co;
    co.shared_pacing = spec.policy == "keel";
    llm_client client(ex, cfg, http, buckets, rec.hooks(cfg), opts.seed, co);

    std::size_t next = 0;
    std::size_t running = static_cast<std::size_t>(std::max(1, spec.concurrency));
    const double cpu0 = cpu_seconds(RUSAGE_THREAD);
    rec.t0 = clock_type::now();
    rec.t_end = rec.t0;
    const std::size_t workers = running;
    for (std::size_t w = 0; w < workers; ++w) {
      asio::co_spawn(
          ctx,
          [&]() -> asio::awaitable<void> {
            while (next < items.size()) {
              const std::size_t i = next++;
              const call_outcome out = co_await client.call(items[i]);
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
  j["endpoint"] = opts.url.empty() ? "in-process mock" : opts.url;
  j["wall_s"] = round_to(wall, 4);
  j["ok"] = rec.ok;
  j["failed"] = rec.failed;
  j["success_ratio"] = round_to(static_cast<double>(rec.ok) / prompts, 5);
  j["goodput_per_s"] = round_to(wall > 0 ? static_cast<double>(rec.ok) / wall : 0, 2);
  j["attempts"] = rec.attempts;
  j["attempts_per_prompt"] = round_to(static_cast<double>(rec.attempts) / prompts, 4);
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
  const std::vector<column> cols = {
      {"fault", true},        {"policy", true},           {"conc", false},
      {"prompts", false},     {"wall s", false},          {"goodput/s", false},
      {"ok %", false},        {"attempts/prompt", false}, {"p50 s", false},
      {"p99 s", false},       {"throttled s", false},     {"client CPU s", false},
      {"peak RSS MiB", false}};
  std::vector<std::vector<std::string>> rows;
  for (const auto& r : runs) {
    if (r.contains("error")) {
      rows.push_back({r.value("fault", "?"), r.value("policy", "?"), "", "",
                      "error: " + r["error"].get<std::string>(), "", "", "", "", "", "", "", ""});
      continue;
    }
    rows.push_back({r["fault"].get<std::string>(), r["policy"].get<std::string>(),
                    std::to_string(r["concurrency"].get<int>()),
                    std::to_string(r["prompts"].get<std::size_t>()), fixed(r["wall_s"], 2),
                    fixed(r["goodput_per_s"], 0), fixed(100 * r["success_ratio"].get<double>(), 1),
                    fixed(r["attempts_per_prompt"], 2), fixed(r["latency_s"]["p50"], 3),
                    fixed(r["latency_s"]["p99"], 3), fixed(r["throttled_s"]["total"], 1),
                    fixed(r["cpu_s"]["client_thread"], 2), fixed(r["rss_mib"]["peak"], 0)});
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
    by_mix[{r["fault"], r["concurrency"]}].push_back(&r);
    by_policy[{r["fault"], r["policy"]}].push_back(&r);
  }
  std::set<const json*> plotted;
  auto mix_plots = [&](const std::string& fault, int conc, const std::vector<const json*>& rs) {
    const std::string suffix = file_safe(fault) + "-c" + std::to_string(conc);
    const std::string what = fault + ", concurrency " + std::to_string(conc) + ", " +
                             std::to_string((*rs.front())["prompts"].get<std::size_t>()) +
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
    const auto& [fault, policy] = key;
    const std::string name = fault + " / " + policy;
    svg::series a{name,
                  {},
                  policy == "keel" ? fault_color(fault) : policy_color(policy),
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
    save("timeline-sweep-" + file_safe(fault) + "-" + file_safe(policy) + ".svg",
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
    }
    if (opts.progress) {
      if (r.contains("error")) {
        std::fprintf(stderr, "  [%zu/%zu] %s / %s c=%d: error: %s\n", i + 1, specs.size(),
                     s.fault.c_str(), s.policy.c_str(), s.concurrency,
                     r["error"].get<std::string>().c_str());
      } else {
        std::fprintf(stderr,
                     "  [%zu/%zu] %-12s %-11s c=%-5d %6zu prompts: %7.2f s, %5.1f%% ok, %.2f "
                     "attempts/prompt\n",
                     i + 1, specs.size(), s.fault.c_str(), s.policy.c_str(), s.concurrency,
                     s.prompts, r["wall_s"].get<double>(), 100 * r["success_ratio"].get<double>(),
                     r["attempts_per_prompt"].get<double>());
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
