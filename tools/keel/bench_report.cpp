// `keel bench`'s report: results.json, table.md (with the retry-delay histograms), the target
// verdict and the table on stdout.
#include "bench.hpp"
#include "bench_detail.hpp"

#include <sys/utsname.h>
#include <unistd.h>
#include <boost/version.hpp>
#include "svg.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

namespace keel::cli {

namespace bench_detail {

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

json bench_results(json machine, json runs, const bench_options& opts, double total) {
  json results;
  results["tool"] = "keel bench";
  results["format"] = 1;
  results["machine"] = std::move(machine);
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
  results["runs"] = std::move(runs);
  return results;
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

void write_bench_report(const json& results, const bench_options& opts, double total) {
  namespace fs = std::filesystem;
  const json& runs = results["runs"];
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
}

}  // namespace bench_detail

using namespace bench_detail;

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

}  // namespace keel::cli
