// `keel bench`'s matrix: which runs (fault mixes × policies × concurrency × rates), the mock
// scenario of each mix, the client config of each policy and the ideal wall time of a run.
#include "bench.hpp"
#include "bench_detail.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace keel::cli {

namespace bench_detail {

double mock_tokens(std::size_t bytes) {
  auto tokens = [](std::size_t b) {
    return static_cast<double>(std::max<std::size_t>(1, (b + 3) / 4));
  };
  return tokens(bytes) + tokens(16 + std::min<std::size_t>(40, bytes));
}

}  // namespace bench_detail

using namespace bench_detail;

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

}  // namespace keel::cli
