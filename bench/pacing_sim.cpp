// pacing_sim: the rate controller against simulated rate limiters, in virtual time (seconds of
// simulated traffic per second of CPU), for tuning and for the matrix in BENCHMARKS.md.
//
// Usage: pacing_sim [--rps R] [--burst B] [--concurrency C] [--prompts N] [--retry-after
// S|none|exact]
//                   [--latency-ms L] [--latency-max-ms L] [--p-error P] [--p-throttle P]
//                   [--tpm T] [--token-burst T]
//                   [--tokens T] [--spread F] [--change AT_S:RPS ...] [--plain] [--advertise]
//                   [--max-attempts K] [--seed S] [--jitter-ms J] [--stall-every-ms E]
//                   [--stall-max-ms S] [--processes P [--follow]] [--timeline] [--matrix]
#include "pacing_sim.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

void print(const char* label, const pacing_sim::server_spec& s, const pacing_sim::client_spec& c,
           const pacing_sim::result& r, bool timeline) {
  // A fleet's processes each take `prompts` items.
  const double items = static_cast<double>(c.prompts * std::max<std::size_t>(1, c.processes));
  const double ideal = s.requests_per_second > 0 ? items / s.requests_per_second : 0;
  std::printf(
      "%-28s R=%-5g c=%-5zu N=%-6zu wall=%7.2fs (%.3fx) ok=%zu failed=%zu attempts=%.3fxN 429=%zu "
      "err=%zu p50=%.3f p99=%.3f  est=%.1f rate=%.1f phase=%s samples=%llu max_noise=%.3f\n",
      label, s.requests_per_second, c.concurrency, c.prompts, r.wall_s,
      ideal > 0 ? r.wall_s / ideal : 0, r.ok, r.failed, static_cast<double>(r.attempts) / items,
      r.rejected, r.errors, r.p50_s, r.p99_s, r.final_requests.estimate, r.final_requests.rate,
      keel::to_string(r.final_requests.phase),
      static_cast<unsigned long long>(r.final_requests.samples), r.max_noise);
  if (timeline) {
    for (std::size_t i = 0; i < r.bins.size(); ++i) {
      std::printf(
          "  t=%5.1f accepted/s=%6.0f rejected/s=%6.0f rate=%8.1f limit=%6.0f est=%8.1f "
          "noise=%.3f %s\n",
          static_cast<double>(i) * 0.1, r.bins[i].accepted * 10, r.bins[i].rejected * 10,
          r.bins[i].rate, r.bins[i].limit, r.bins[i].estimate, r.bins[i].noise,
          keel::to_string(r.bins[i].phase));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  pacing_sim::server_spec s;
  pacing_sim::client_spec c;
  bool timeline = false;
  bool matrix = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    using std::chrono::duration;
    using std::chrono::duration_cast;
    using std::chrono::nanoseconds;
    if (a == "--rps") {
      s.requests_per_second = std::stod(next());
    } else if (a == "--burst") {
      s.burst = std::stod(next());
    } else if (a == "--concurrency") {
      c.concurrency = std::stoul(next());
    } else if (a == "--prompts") {
      c.prompts = std::stoul(next());
    } else if (a == "--retry-after") {
      const std::string v = next();
      if (v == "none") {
        s.retry_after.reset();
      } else if (v == "exact") {
        s.exact_retry_after = true;
      } else {
        s.retry_after = duration_cast<nanoseconds>(duration<double>(std::stod(v)));
      }
    } else if (a == "--latency-ms") {
      s.latency = duration_cast<nanoseconds>(duration<double, std::milli>(std::stod(next())));
    } else if (a == "--latency-max-ms") {
      s.latency_max = duration_cast<nanoseconds>(duration<double, std::milli>(std::stod(next())));
    } else if (a == "--reject-latency-ms") {
      s.reject_latency =
          duration_cast<nanoseconds>(duration<double, std::milli>(std::stod(next())));
    } else if (a == "--jitter-ms") {
      s.arrival_jitter =
          duration_cast<nanoseconds>(duration<double, std::milli>(std::stod(next())));
    } else if (a == "--stall-every-ms") {
      c.stall_every = duration_cast<nanoseconds>(duration<double, std::milli>(std::stod(next())));
    } else if (a == "--stall-max-ms") {
      c.stall_max = duration_cast<nanoseconds>(duration<double, std::milli>(std::stod(next())));
    } else if (a == "--p-error") {
      s.p_error = std::stod(next());
    } else if (a == "--tpm") {
      s.tokens_per_minute = std::stod(next());
    } else if (a == "--token-burst") {
      s.token_burst = std::stod(next());
    } else if (a == "--tokens") {
      c.tokens_per_prompt = std::stod(next());
    } else if (a == "--spread") {
      c.tokens_spread = std::stod(next());
    } else if (a == "--change") {
      const std::string v = next();
      const auto colon = v.find(':');
      pacing_sim::limit_change ch;
      ch.at = duration_cast<nanoseconds>(duration<double>(std::stod(v.substr(0, colon))));
      ch.requests_per_second = std::stod(v.substr(colon + 1));
      s.schedule.push_back(ch);
    } else if (a == "--p-throttle") {
      s.p_throttle = std::stod(next());
    } else if (a == "--processes") {
      c.processes = std::stoul(next());
    } else if (a == "--follow") {
      c.follow_leader = true;
    } else if (a == "--plain") {
      c.paced = false;
    } else if (a == "--advertise") {
      s.advertise = true;
    } else if (a == "--max-attempts") {
      c.max_attempts = std::stoi(next());
    } else if (a == "--seed") {
      c.seed = std::stoull(next());
    } else if (a == "--timeline") {
      timeline = true;
    } else if (a == "--matrix") {
      matrix = true;
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (!matrix) {
    c.prompts = c.prompts ? c.prompts : static_cast<std::size_t>(10 * s.requests_per_second);
    print("run", s, c, pacing_sim::run(s, c), timeline);
    return 0;
  }
  for (const char* ra : {"1", "none"}) {
    for (double r : {50.0, 200.0, 1000.0}) {
      for (std::size_t conc : {16, 64, 256, 1024}) {
        auto ss = s;
        auto cc = c;
        ss.requests_per_second = r;
        if (std::string(ra) == "none") {
          ss.retry_after.reset();
        } else {
          ss.retry_after = std::chrono::seconds(1);
        }
        cc.concurrency = conc;
        cc.prompts = static_cast<std::size_t>(10 * r);
        char label[64];
        std::snprintf(label, sizeof label, "retry-after=%s", ra);
        print(label, ss, cc, pacing_sim::run(ss, cc), false);
      }
    }
  }
  return 0;
}
