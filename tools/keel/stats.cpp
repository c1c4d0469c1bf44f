// Summary and progress of the keel command's batches.
#include "stats.hpp"

#include <algorithm>
#include <cmath>

namespace keel::cli {
namespace {

std::string fmt_seconds(double s) {
  char buf[64];
  if (s < 1) {
    std::snprintf(buf, sizeof buf, "%.0f ms", s * 1000);
  } else if (s < 120) {
    std::snprintf(buf, sizeof buf, "%.2f s", s);
  } else {
    std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60),
                  static_cast<int>(std::fmod(s, 60)));
  }
  return buf;
}

double elapsed(const batch_stats& s) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - s.start).count();
}

std::string join_counts(const std::map<std::string, std::uint64_t>& m) {
  std::vector<std::pair<std::string, std::uint64_t>> v(m.begin(), m.end());
  std::stable_sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second > b.second; });
  std::string out;
  for (const auto& [k, n] : v) {
    out += (out.empty() ? "" : ", ") + std::to_string(n) + " " + k;
  }
  return out;
}

// p50, p90, p99 and the maximum of `values` (seconds), as the summary JSON shows a latency.
nlohmann::json spread_json(const std::vector<double>& values) {
  return {{"p50", percentile(values, 50)},
          {"p90", percentile(values, 90)},
          {"p99", percentile(values, 99)},
          {"max", values.empty() ? 0.0 : *std::max_element(values.begin(), values.end())}};
}

// "p50 12 ms, p90 40 ms, p99 95 ms": `values` (seconds) as the summary table shows a latency.
std::string spread_text(const std::vector<double>& values) {
  return "p50 " + fmt_seconds(percentile(values, 50)) + ", p90 " +
         fmt_seconds(percentile(values, 90)) + ", p99 " + fmt_seconds(percentile(values, 99));
}

}  // namespace

double percentile(std::vector<double> values, double p) {
  if (values.empty()) {
    return 0;
  }
  std::sort(values.begin(), values.end());
  const double rank = std::ceil(p / 100.0 * static_cast<double>(values.size()));
  const auto i =
      static_cast<std::size_t>(std::clamp(rank, 1.0, static_cast<double>(values.size())));
  return values[i - 1];
}

nlohmann::json summary_json(const batch_stats& s) {
  const double wall = s.wall_seconds > 0 ? s.wall_seconds : elapsed(s);
  nlohmann::json j;
  j["items"] = {{"total", s.total},        {"done", s.done},           {"ok", s.ok},
                {"failed", s.failed},      {"cancelled", s.cancelled}, {"skipped", s.skipped},
                {"unwritten", s.unwritten}};
  j["failed_by_class"] = s.failed_by_class;
  j["attempts"] = s.attempts;
  j["attempts_per_item"] =
      s.done ? static_cast<double>(s.attempts) / static_cast<double>(s.done) : 0;
  j["attempts_by_model"] = s.attempts_by_model;
  j["ok_by_model"] = s.ok_by_model;
  j["retries"] = s.retries;
  j["retries_by_cause"] = s.retries_by_cause;
  j["http_429"] = s.http_429;
  j["fallbacks"] = s.fallbacks;
  j["breaker_opens"] = s.breaker_opens;
  j["breaker_holds"] = s.breaker_holds;
  j["hedges"] = s.hedges;
  j["throttle_waits"] = s.throttle_waits;
  j["throttled_seconds"] = s.throttled_seconds;
  j["latency_seconds"] = spread_json(s.latencies);
  if (s.streamed) {
    j["ttft_seconds"] = spread_json(s.first_tokens);
    j["ttft_seconds"]["items"] = s.first_tokens.size();
  }
  j["tokens"] = {{"input", s.tokens_in}, {"output", s.tokens_out}};
  j["cost_usd"] = s.cost;
  j["unpriced_answers"] = s.unpriced;
  j["wall_seconds"] = wall;
  j["items_per_second"] = wall > 0 ? static_cast<double>(s.done) / wall : 0;
  j["seed"] = s.seed;
  return j;
}

std::string summary_table(const batch_stats& s, const std::string& title) {
  const double wall = s.wall_seconds > 0 ? s.wall_seconds : elapsed(s);
  std::string out = title + "\n";
  auto row = [&out](const char* name, const std::string& value) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "  %-15s ", name);  // "failed by class" fills the 15
    out += buf + value + "\n";
  };
  row("items", std::to_string(s.done) + " done: " + std::to_string(s.ok) + " ok, " +
                   std::to_string(s.failed) + " failed, " + std::to_string(s.cancelled) +
                   " cancelled" +
                   (s.skipped ? ", " + std::to_string(s.skipped) + " skipped (already done)" : "") +
                   (s.unwritten ? ", " + std::to_string(s.unwritten) +
                                      " not written (the output failed; --resume runs them again)"
                                : ""));
  if (!s.failed_by_class.empty()) {
    row("failed by class", join_counts(s.failed_by_class));
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "%llu (%.2f per item)",
                static_cast<unsigned long long>(s.attempts),
                s.done ? static_cast<double>(s.attempts) / static_cast<double>(s.done) : 0.0);
  row("attempts", buf);
  if (!s.attempts_by_model.empty()) {
    row("  by model", join_counts(s.attempts_by_model));
  }
  row("retries", std::to_string(s.retries) +
                     (s.retries_by_cause.empty() ? "" : ": " + join_counts(s.retries_by_cause)));
  row("429s seen", std::to_string(s.http_429));
  row("fallbacks",
      std::to_string(s.fallbacks) +
          (s.ok_by_model.empty() ? "" : " (answered by: " + join_counts(s.ok_by_model) + ")"));
  row("breaker opens", std::to_string(s.breaker_opens));
  if (s.breaker_holds > 0) {
    row("breaker holds", std::to_string(s.breaker_holds));
  }
  if (s.hedges > 0) {
    row("hedges", std::to_string(s.hedges));
  }
  // Waits overlap (many attempts wait at once), so the sum is attempt-seconds, not wall time.
  row("throttled",
      std::to_string(s.throttle_waits) + " attempts waited for rate-limit capacity, " +
          fmt_seconds(s.throttle_waits ? s.throttled_seconds / static_cast<double>(s.throttle_waits)
                                       : 0.0) +
          " on average (" + fmt_seconds(s.throttled_seconds) + " summed)");
  row("latency", spread_text(s.latencies));
  if (s.streamed) {
    row("first token", spread_text(s.first_tokens) + " (" + std::to_string(s.first_tokens.size()) +
                           " of " + std::to_string(s.done) + " items had one)");
  }
  row("tokens", "in " + std::to_string(s.tokens_in) + ", out " + std::to_string(s.tokens_out));
  if (s.priced > 0) {
    std::snprintf(buf, sizeof buf, "$%.4f estimated from the configured prices", s.cost);
    row("cost", buf + (s.unpriced ? " (" + std::to_string(s.unpriced) +
                                        " answers from entries without a price not counted)"
                                  : std::string()));
  }
  std::snprintf(buf, sizeof buf, "%s, %.1f items/s", fmt_seconds(wall).c_str(),
                wall > 0 ? static_cast<double>(s.done) / wall : 0.0);
  row("wall time", buf);
  row("seed", std::to_string(s.seed) + " (--seed " + std::to_string(s.seed) +
                  " draws the same jitter again)");
  return out;
}

// ---- progress_display ----------------------------------------------------------------------

progress_display::progress_display(progress_mode mode, std::FILE* out, const batch_stats& s)
    : mode_(mode), out_(out), s_(s) {}

std::string progress_display::render() const {
  const double t = elapsed(s_);
  const double rate = t > 0 ? static_cast<double>(s_.done) / t : 0;
  const std::size_t todo = s_.total > s_.skipped ? s_.total - s_.skipped : 0;
  std::string eta = "?";
  if (todo && rate > 0) {
    eta = fmt_seconds(static_cast<double>(todo > s_.done ? todo - s_.done : 0) / rate);
  }
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "%zu/%s ok %zu failed %zu | in flight %zu | %.1f/s | retries %llu | 429s %llu | "
                "throttle waits %llu (%s) | ETA %s",
                s_.done, todo ? std::to_string(todo).c_str() : "?", s_.ok, s_.failed + s_.cancelled,
                s_.in_flight, rate, static_cast<unsigned long long>(s_.retries),
                static_cast<unsigned long long>(s_.http_429),
                static_cast<unsigned long long>(s_.throttle_waits),
                fmt_seconds(s_.throttled_seconds).c_str(), eta.c_str());
  std::string line = buf;
  if (mode_ == progress_mode::bar && todo) {
    constexpr int width = 24;
    const int filled = static_cast<int>(
        std::min(1.0, static_cast<double>(s_.done) / static_cast<double>(todo)) * width);
    line = "[" + std::string(static_cast<std::size_t>(filled), '#') +
           std::string(static_cast<std::size_t>(width - filled), '.') + "] " + line;
  }
  return line;
}

void progress_display::tick() {
  if (mode_ == progress_mode::quiet) {
    return;
  }
  if (mode_ == progress_mode::bar) {
    std::fprintf(out_, "\r\033[2K%s", render().c_str());
    drawn_ = true;
  } else {
    std::fprintf(out_, "progress: %s\n", render().c_str());
  }
  std::fflush(out_);
}

void progress_display::clear() {
  if (mode_ == progress_mode::bar && drawn_) {
    std::fputs("\r\033[2K", out_);
  }
}

void progress_display::redraw() {
  if (mode_ == progress_mode::bar && drawn_) {
    std::fputs(render().c_str(), out_);
  }
}

void progress_display::finish() {
  if (mode_ == progress_mode::bar && drawn_) {
    std::fputs("\r\033[2K", out_);
    std::fflush(out_);
    drawn_ = false;
  }
}

}  // namespace keel::cli
