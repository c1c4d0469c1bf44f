// `keel bench`'s SVG charts: latency CDFs and timelines per mix, concurrency sweeps, retry
// amplification, and the rate controller's view against the server's limit.
#include "bench.hpp"
#include "bench_detail.hpp"

#include "svg.hpp"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace keel::cli {

using namespace bench_detail;

namespace {

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

}  // namespace keel::cli
