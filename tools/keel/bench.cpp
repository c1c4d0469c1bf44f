// `keel bench`: the driver (every run of the matrix, each in a child process) and the helpers
// its files share; the matrix, one run, the report and the plots have files of their own (see
// bench_detail.hpp).
#include "bench.hpp"
#include "bench_detail.hpp"

#include <sys/wait.h>
#include <unistd.h>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace keel::cli {

namespace bench_detail {

double seconds_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double round_to(double v, int digits) {
  const double f = std::pow(10.0, digits);
  return std::round(v * f) / f;
}

std::string fixed(double v, int decimals) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

// The number of a rate for labels and file names: "200", "12.5".
std::string rate_label(double r) {
  return r == std::round(r) ? std::to_string(static_cast<long long>(r)) : fixed(r, 2);
}

}  // namespace bench_detail

using namespace bench_detail;

namespace {

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
  write_bench_report(bench_results(machine, std::move(runs), opts, total), opts, total);
  return errors ? 1 : 0;
}

}  // namespace keel::cli
