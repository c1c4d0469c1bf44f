// Tests of `keel bench` (tools/keel/bench.hpp, svg.hpp) and of llm_client's shared-pacing switch:
// the quick matrix through the real binary (table, results.json, SVG files that parse as XML),
// the matrix rules, the policies' configs and the mixes' scenarios, a short run against a
// limiter that does not advertise its limit (what the controller learned, the rate-over-time
// plot), the SVG helper, and what `client_options::shared_pacing = false` turns off.
#include <keel/llm/client.hpp>
#include "bench.hpp"

#include "jsonl.hpp"
#include "svg.hpp"

#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using nlohmann::json;
using namespace std::chrono_literals;

const std::string keel_binary = KEEL_CLI_PATH;

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A minimal XML well-formedness check for the SVG files: an optional declaration, then exactly
// one root element `svg` in the SVG namespace; every tag closed in order, attribute values
// quoted, `<` never in text or values, `&` only as an entity. Returns "" when the text passes.
std::string svg_problem(const std::string& s) {
  std::size_t i = 0;
  auto skip_ws = [&] {
    while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) {
      ++i;
    }
  };
  auto name_char = [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == ':' || c == '_' || c == '-' ||
           c == '.';
  };
  auto entity_ok = [&](std::size_t at) {
    static const char* const ents[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"};
    for (const char* e : ents) {
      if (s.compare(at, std::char_traits<char>::length(e), e) == 0) {
        return true;
      }
    }
    return s.compare(at, 2, "&#") == 0 && s.find(';', at) != std::string::npos;
  };
  skip_ws();
  if (s.compare(i, 5, "<?xml") == 0) {
    const auto end = s.find("?>", i);
    if (end == std::string::npos) {
      return "unterminated XML declaration";
    }
    i = end + 2;
  }
  std::vector<std::string> stack;
  int roots = 0;
  bool root_ok = false;
  while (i < s.size()) {
    if (s[i] != '<') {
      if (stack.empty() && !std::isspace(static_cast<unsigned char>(s[i]))) {
        return "text outside the root element at " + std::to_string(i);
      }
      if (s[i] == '&' && !entity_ok(i)) {
        return "bare & at " + std::to_string(i);
      }
      ++i;
      continue;
    }
    if (s.compare(i, 4, "<!--") == 0) {
      const auto end = s.find("-->", i);
      if (end == std::string::npos) {
        return "unterminated comment";
      }
      i = end + 3;
      continue;
    }
    if (s.compare(i, 2, "</") == 0) {
      i += 2;
      const std::size_t n0 = i;
      while (i < s.size() && name_char(s[i])) {
        ++i;
      }
      const std::string name = s.substr(n0, i - n0);
      skip_ws();
      if (i >= s.size() || s[i] != '>') {
        return "bad end tag </" + name;
      }
      ++i;
      if (stack.empty() || stack.back() != name) {
        return "end tag </" + name + "> does not match <" +
               (stack.empty() ? std::string("nothing") : stack.back()) + ">";
      }
      stack.pop_back();
      continue;
    }
    ++i;
    const std::size_t n0 = i;
    while (i < s.size() && name_char(s[i])) {
      ++i;
    }
    const std::string name = s.substr(n0, i - n0);
    if (name.empty()) {
      return "stray < at " + std::to_string(n0 - 1);
    }
    std::map<std::string, std::string> attrs;
    bool self_closing = false;
    for (;;) {
      skip_ws();
      if (i >= s.size()) {
        return "unterminated tag <" + name;
      }
      if (s.compare(i, 2, "/>") == 0) {
        i += 2;
        self_closing = true;
        break;
      }
      if (s[i] == '>') {
        ++i;
        break;
      }
      const std::size_t a0 = i;
      while (i < s.size() && name_char(s[i])) {
        ++i;
      }
      const std::string attr = s.substr(a0, i - a0);
      skip_ws();
      if (attr.empty() || i >= s.size() || s[i] != '=') {
        return "bad attribute in <" + name + "> at " + std::to_string(a0);
      }
      ++i;
      skip_ws();
      if (i >= s.size() || (s[i] != '"' && s[i] != '\'')) {
        return "unquoted attribute " + attr + " in <" + name + ">";
      }
      const char q = s[i++];
      const auto end = s.find(q, i);
      if (end == std::string::npos) {
        return "unterminated attribute " + attr;
      }
      const std::string value = s.substr(i, end - i);
      if (value.find('<') != std::string::npos) {
        return "< in attribute " + attr;
      }
      for (std::size_t k = value.find('&'); k != std::string::npos; k = value.find('&', k + 1)) {
        if (!entity_ok(i + k)) {
          return "bare & in attribute " + attr;
        }
      }
      if (!attrs.emplace(attr, value).second) {
        return "duplicate attribute " + attr + " in <" + name + ">";
      }
      i = end + 1;
    }
    if (stack.empty()) {
      ++roots;
      root_ok = name == "svg" && attrs["xmlns"] == "http://www.w3.org/2000/svg";
    }
    if (!self_closing) {
      stack.push_back(name);
    }
  }
  if (!stack.empty()) {
    return "unclosed <" + stack.back() + ">";
  }
  if (roots != 1) {
    return std::to_string(roots) + " root elements";
  }
  return root_ok ? "" : "the root is not <svg xmlns=\"http://www.w3.org/2000/svg\">";
}

bool have_xmllint() {
  return std::system("command -v xmllint > /dev/null 2>&1") == 0;
}

const json* find_run(const json& runs, const std::string& fault, const std::string& policy,
                     int concurrency) {
  for (const auto& r : runs) {
    if (r.value("fault", "") == fault && r.value("policy", "") == policy &&
        r.value("concurrency", 0) == concurrency) {
      return &r;
    }
  }
  return nullptr;
}

keel::cli::batch_item item(int id) {
  auto r = keel::cli::parse_input_line(
      R"({"id": )" + std::to_string(id) + R"(, "prompt": "hello", "max_tokens": 64})",
      static_cast<std::size_t>(id), 1024);
  REQUIRE(std::holds_alternative<keel::cli::batch_item>(r));
  return std::get<keel::cli::batch_item>(r);
}

// Runs `items` one after the other through `client`; the server shares the context.
std::vector<keel::llm::call_outcome> run(asio::io_context& ctx, keel::llm::client& client,
                                         const std::vector<keel::cli::batch_item>& items) {
  std::vector<keel::llm::call_outcome> out;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        for (const auto& it : items) {
          out.push_back(co_await client.call(it.request, &it));
        }
        ctx.stop();
      },
      asio::detached);
  ctx.run();
  ctx.restart();
  return out;
}

}  // namespace

TEST_CASE("keel bench quick writes a table, results JSON and SVG plots that parse", "[cli_bench]") {
  const fs::path dir = fs::temp_directory_path() / ("keel_cli_bench_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string cmd = "'" + keel_binary + "' bench --quick --seed 3 --out-dir '" +
                          dir.string() + "' > '" + (dir / "stdout.txt").string() + "' 2> '" +
                          (dir / "stderr.txt").string() + "'";
  const int status = std::system(cmd.c_str());
  INFO(read_file(dir / "stderr.txt"));
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);

  const std::string out = read_file(dir / "stdout.txt");
  CHECK(out.find("attempts/prompt") != std::string::npos);
  CHECK(out.find("rate_limited") != std::string::npos);
  CHECK(out.find("target: not measured") != std::string::npos);  // the quick matrix is small
  CHECK(read_file(dir / "table.md").find("| fault | policy |") != std::string::npos);

  const json results = json::parse(read_file(dir / "results.json"));
  REQUIRE(results["machine"]["nproc"].get<int>() >= 1);
  const json& runs = results["runs"];
  REQUIRE(runs.size() == 15);
  for (const auto& r : runs) {
    INFO(r.dump().substr(0, 400));
    REQUIRE_FALSE(r.contains("error"));
    for (const char* key : {"wall_s", "goodput_per_s", "success_ratio", "attempts",
                            "attempts_per_prompt", "ok", "failed", "latency_s", "ok_latency_cdf",
                            "throttled_s", "cpu_s", "rss_mib", "retry_delay_histogram", "timeline",
                            "server", "ideal_s", "wall_over_ideal", "attempts_over_prompts"}) {
      CHECK(r.contains(key));
    }
    // A limiter bounds the limited mixes and rate_limited: they have an ideal; the others not.
    const bool limited = keel::cli::bench_limited_mix(r["fault"]);
    CHECK(r["ideal_s"].is_number() == (limited || r["fault"] == "rate_limited"));
    if (limited) {
      CHECK(r["rate"].get<double>() == 200);
      CHECK(r["prompts"].get<std::size_t>() == 600);  // --quick: 3·R
      CHECK(r["timeline"].contains(r["fault"] == "token_limited" ? "limit_tpm" : "limit_rps"));
    }
    // The shared-pacing policies report their primary bucket's controller.
    CHECK(r.contains("pacing") == keel::cli::bench_paced_policy(r["policy"]));
    CHECK(r["latency_s"].contains("p50"));
    CHECK(r["latency_s"]["p99"].get<double>() >= r["latency_s"]["p50"].get<double>());
    CHECK(r["cpu_s"]["client_thread"].get<double>() > 0);
    CHECK(r["rss_mib"]["peak"].get<double>() > 0);
    const auto prompts = r["prompts"].get<std::uint64_t>();
    const auto attempts = r["attempts"].get<std::uint64_t>();
    CHECK(r["ok"].get<std::uint64_t>() + r["failed"].get<std::uint64_t>() == prompts);
    // Every prompt is attempted at least once (no breaker opens in the quick mixes), and the
    // mock saw exactly the attempts the client reported.
    CHECK(attempts >= prompts);
    CHECK(r["server"]["requests"].get<std::uint64_t>() == attempts);
    // The 100 ms bins account for every attempt and every outcome.
    std::uint64_t binned = 0;
    for (const auto& n : r["timeline"]["attempts"]) {
      binned += n.get<std::uint64_t>();
    }
    CHECK(binned == attempts);
    std::uint64_t done = 0;
    for (const char* k : {"ok", "failed"}) {
      for (const auto& n : r["timeline"][k]) {
        done += n.get<std::uint64_t>();
      }
    }
    CHECK(done == prompts);
    if (r["policy"] == "none") {
      CHECK(attempts == prompts);  // no retry means exactly one attempt per prompt
    }
  }
  // On the flaky mix, keel's stack retries its way to a full success; one attempt cannot.
  const json* none = find_run(runs, "flaky", "none", 16);
  const json* keel = find_run(runs, "flaky", "keel", 16);
  REQUIRE(none);
  REQUIRE(keel);
  CHECK((*none)["success_ratio"].get<double>() < 1.0);
  CHECK((*keel)["success_ratio"].get<double>() >= 0.99);
  CHECK((*keel)["success_ratio"].get<double>() > (*none)["success_ratio"].get<double>());
  CHECK((*keel)["retries"].get<std::uint64_t>() > 0);

  std::vector<fs::path> svgs;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() == ".svg") {
      svgs.push_back(e.path());
    }
  }
  CHECK(svgs.size() >= 5);
  CHECK(fs::exists(dir / "amplification.svg"));
  CHECK(fs::exists(dir / "latency-cdf-flaky-c16.svg"));
  CHECK(fs::exists(dir / "timeline-rate_limited-c16.svg"));
  CHECK(fs::exists(dir / "timeline-limited-r200-c16.svg"));
  CHECK(fs::exists(dir / "rate-limited-r200-newcomer-c16.svg"));
  CHECK(fs::exists(dir / "rate-token_limited-r200-newcomer-c16.svg"));
  const bool xmllint = have_xmllint();
  for (const auto& p : svgs) {
    INFO(p.string());
    CHECK(svg_problem(read_file(p)) == "");
    if (xmllint) {
      CHECK(std::system(("xmllint --noout '" + p.string() + "'").c_str()) == 0);
    }
  }
  fs::remove_all(dir);
}

TEST_CASE("the default bench matrix compares policies at 64 and sweeps keel", "[cli_bench]") {
  keel::cli::bench_options o;
  const auto full = keel::cli::bench_matrix(o);
  // 5 classic mixes x 5 policies at 64, plus keel on clean and rate_limited and full_jitter on
  // rate_limited at 6 levels each (64 shared), plus the limited mixes at 64: limited (4
  // policies), limited_no_retry_after (2), limit_change (1), token_limited (2), mixed (2).
  CHECK(full.size() == 25 + 3 * 5 + 4 + 2 + 1 + 2 + 2);
  std::map<int, std::size_t> prompts;
  std::map<std::string, std::vector<std::string>> limited;
  for (const auto& s : full) {
    if (s.fault == "rate_limited" && s.policy == "keel") {
      prompts[s.concurrency] = s.prompts;
    }
    if (keel::cli::bench_limited_mix(s.fault)) {
      limited[s.fault].push_back(s.policy);
      CHECK(s.concurrency == 64);
      CHECK(s.rate == 200);
      // N = 10·R (an ideal of 10 s), limit_change 15·R (the limit comes back at 15 s).
      CHECK(s.prompts == (s.fault == "limit_change" ? 3000u : 2000u));
    } else {
      CHECK(s.rate == 0);
    }
  }
  CHECK(prompts ==
        std::map<int, std::size_t>{
            {1, 200}, {16, 2000}, {64, 2000}, {256, 2000}, {1024, 2000}, {10000, 10000}});
  CHECK(limited["limited"] ==
        std::vector<std::string>{"newcomer", "keel", "keel_limit", "aws_adaptive"});
  CHECK(limited.size() == 5);
  for (const auto& [fault, policies] : limited) {
    INFO(fault);
    CHECK(policies.front() == "newcomer");  // the config most users run, on every limited mix
  }

  // --rate alone keeps the default matrix and moves its limited runs to the rate.
  keel::cli::bench_options slow;
  slow.rates = {50};
  const auto at50 = keel::cli::bench_matrix(slow);
  REQUIRE(at50.size() == full.size());
  for (const auto& s : at50) {
    if (s.fault == "limited") {
      CHECK(s.rate == 50);
      CHECK(s.prompts == 500);
    }
  }

  // The quick matrix: the classic ten and five limited runs at concurrency 16, N = 3·R.
  keel::cli::bench_options quick;
  quick.quick = true;
  const auto q = keel::cli::bench_matrix(quick);
  REQUIRE(q.size() == 15);
  std::size_t quick_limited = 0;
  for (const auto& s : q) {
    if (keel::cli::bench_limited_mix(s.fault)) {
      ++quick_limited;
      CHECK(s.prompts == 600);
      CHECK(s.concurrency == 16);
    }
  }
  CHECK(quick_limited == 5);

  // The issue's sweep in one command: R x concurrency x with/without Retry-After, N = 10·R.
  keel::cli::bench_options sweep;
  sweep.faults = {"limited", "limited_no_retry_after"};
  sweep.policies = {"newcomer", "keel"};
  sweep.concurrency = {16, 64, 256, 1024};
  sweep.rates = {50, 200, 1000};
  const auto cells = keel::cli::bench_matrix(sweep);
  REQUIRE(cells.size() == 2 * 2 * 4 * 3);
  std::set<std::tuple<std::string, std::string, int, double>> distinct;
  for (const auto& s : cells) {
    CHECK(s.prompts == static_cast<std::size_t>(10 * s.rate));
    distinct.emplace(s.fault, s.policy, s.concurrency, s.rate);
  }
  CHECK(distinct.size() == cells.size());
  // A classic mix in the same command runs once, whatever the rates.
  sweep.faults = {"clean", "limited"};
  CHECK(keel::cli::bench_matrix(sweep).size() == 2 * 4 + 2 * 4 * 3);

  keel::cli::bench_options custom;
  custom.faults = {"flaky"};
  custom.policies = {"none", "keel"};
  custom.concurrency = {8, 32};
  custom.prompts = 100;
  const auto cross = keel::cli::bench_matrix(custom);
  REQUIRE(cross.size() == 4);
  CHECK(cross[0].fault == "flaky");
  CHECK(cross[0].prompts == 100);

  keel::cli::bench_options bad;
  bad.faults = {"meteor"};
  CHECK_THROWS_AS(keel::cli::bench_matrix(bad), std::invalid_argument);
  keel::cli::bench_options bad_rate;
  bad_rate.rates = {0};
  CHECK_THROWS_AS(keel::cli::bench_matrix(bad_rate), std::invalid_argument);
  keel::cli::bench_options url_and_faults;
  url_and_faults.url = "http://127.0.0.1:1";
  url_and_faults.faults = {"clean"};
  CHECK_THROWS_AS(keel::cli::bench_matrix(url_and_faults), std::invalid_argument);
}

TEST_CASE("the ideal wall time follows the limiter: burst, rate, schedule and failures",
          "[cli_bench]") {
  keel::cli::bench_run_spec r;
  r.policy = "keel";
  r.concurrency = 64;
  r.fault = "clean";
  r.prompts = 2000;
  CHECK_FALSE(keel::cli::bench_ideal_seconds(r));
  // 21 at once, then 200/s, plus the last answer's mean latency (1 ms).
  r.fault = "limited";
  r.rate = 200;
  CHECK(*keel::cli::bench_ideal_seconds(r) == Approx((2000 - 21) / 200.0 + 0.001));
  r.fault = "token_limited";
  CHECK(*keel::cli::bench_ideal_seconds(r) == Approx((2000 - 21) / 200.0 + 0.001));
  // 21 + 5 s at 200 + 10 s at 100 = 2021 by 15 s; 979 more at 200 r/s.
  r.fault = "limit_change";
  r.prompts = 3000;
  CHECK(*keel::cli::bench_ideal_seconds(r) == Approx(15 + 979 / 200.0 + 0.001));
  // 10% of admitted attempts fail: 2000 / 0.9 attempts; 50 ms latency.
  r.fault = "mixed";
  r.prompts = 2000;
  CHECK(*keel::cli::bench_ideal_seconds(r) == Approx((2000 / 0.9 - 21) / 200.0 + 0.05));
  // At concurrency 1 the answers' latency, not the limit, bounds it.
  r.concurrency = 1;
  CHECK(*keel::cli::bench_ideal_seconds(r) == Approx(2000 / 0.9 * 0.05));
}

TEST_CASE("bench policies map to client configs", "[cli_bench]") {
  keel::cli::bench_options o;
  const auto none = keel::cli::bench_config("none", "http://127.0.0.1:1", o);
  CHECK(none.entries.size() == 1);
  CHECK(none.entries[0].max_attempts == 1);
  CHECK_FALSE(none.policy.breaker.enabled);
  CHECK_FALSE(none.policy.retry_budget.enabled);
  const auto naive = keel::cli::bench_config("naive", "http://127.0.0.1:1", o);
  CHECK(naive.policy.retry.backoff.base.count() == 0);
  CHECK(naive.policy.retry.backoff.shape == keel::backoff_shape::constant);
  CHECK_FALSE(naive.policy.retry.honour_retry_after);
  const auto expo = keel::cli::bench_config("exponential", "http://127.0.0.1:1", o);
  CHECK(expo.policy.retry.backoff.jitter == keel::jitter::none);

  // keel: keel's defaults but for the breaker's break, which the bench scales to its runs.
  const keel::llm::policy_config defaults;
  const auto keel = keel::cli::bench_config("keel", "http://127.0.0.1:1", o);
  REQUIRE(keel.entries.size() == 2);
  CHECK(keel.entries[1].base_url == "http://127.0.0.1:1");
  CHECK(keel.policy.breaker.enabled);
  CHECK(keel.policy.breaker.break_duration == 1);
  CHECK(keel.policy.breaker.failure_threshold == defaults.breaker.failure_threshold);
  CHECK(keel.policy.retry_budget.enabled);
  CHECK(keel.policy.retry_budget.token_ratio == defaults.retry_budget.token_ratio);
  CHECK(keel.policy.retry_budget.max_tokens == defaults.retry_budget.max_tokens);
  CHECK(keel.policy.retry.max_attempts == defaults.retry.max_attempts);
  CHECK(keel.policy.retry.backoff.jitter == keel::jitter::full);
  CHECK(keel.policy.retry.backoff.cap == defaults.retry.backoff.cap);
  CHECK(keel.policy.deadline == defaults.deadline);
  CHECK(keel.policy.rate_limits.requests_per_minute == 0);

  // newcomer: one entry, nothing but model, base_url and key; every policy value the default.
  const auto newcomer = keel::cli::bench_config("newcomer", "http://127.0.0.1:1", o);
  REQUIRE(newcomer.entries.size() == 1);
  const auto& e = newcomer.entries[0];
  CHECK(e.base_url == "http://127.0.0.1:1");
  CHECK_FALSE(e.timeout.has_value());
  CHECK_FALSE(e.aws_retry.has_value());
  CHECK(e.rate_limits.requests_per_minute == 0);
  CHECK(e.max_attempts == defaults.retry.max_attempts);
  keel::llm::client_config plain;
  plain.entries = {e};
  plain.policy = defaults;
  CHECK(keel::llm::to_json(newcomer)["policy"] == keel::llm::to_json(plain)["policy"]);
  // On an OpenAI-format mix the entry has exactly the three keys (api_type is the default).
  keel::cli::bench_run_spec lim;
  lim.fault = "limited";
  lim.policy = "newcomer";
  lim.rate = 100;
  const auto n2 = keel::cli::bench_config(lim, "http://127.0.0.1:1", o);
  REQUIRE(n2.entries.size() == 1);
  CHECK(n2.entries[0].api_type == keel::llm::provider_kind::openai);
  CHECK(n2.entries[0].model == "gpt-4o-mini");

  // keel_limit: keel with the server's true limit configured.
  lim.policy = "keel_limit";
  const auto kl = keel::cli::bench_config(lim, "http://127.0.0.1:1", o);
  REQUIRE(kl.entries.size() == 2);
  CHECK(kl.entries[0].rate_limits.requests_per_minute == 6000);
  CHECK(kl.entries[0].api_type == keel::llm::provider_kind::openai);
  lim.fault = "token_limited";
  const auto kt = keel::cli::bench_config(lim, "http://127.0.0.1:1", o);
  CHECK(kt.entries[0].rate_limits.requests_per_minute == 0);
  CHECK(kt.entries[0].rate_limits.tokens_per_minute == 100 * 60 * (500 + 14));
  CHECK(keel::cli::bench_config("keel_limit", "http://127.0.0.1:1", o)
            .policy.rate_limits.requests_per_minute == 0);  // clean has no limit to configure

  // aws_adaptive: one entry in AWS adaptive mode, with its default 3 attempts.
  const auto aws = keel::cli::bench_config("aws_adaptive", "http://127.0.0.1:1", o);
  REQUIRE(aws.entries.size() == 1);
  REQUIRE(aws.entries[0].aws_retry);
  CHECK(aws.entries[0].aws_retry->mode == keel::aws::retry_mode::adaptive);
  CHECK(aws.entries[0].aws_retry->total_max_attempts == 3);

  CHECK(keel::cli::bench_paced_policy("newcomer"));
  CHECK(keel::cli::bench_paced_policy("keel_limit"));
  CHECK_FALSE(keel::cli::bench_paced_policy("aws_adaptive"));
  CHECK_FALSE(keel::cli::bench_paced_policy("full_jitter"));

  // The scenarios parse as mock scenarios.
  for (const auto& f : keel::cli::bench_faults()) {
    CHECK_NOTHROW(keel::testing::scenario::from_json(keel::cli::bench_scenario_json(f)));
  }
  CHECK_THROWS_AS(keel::cli::bench_config("yolo", "http://127.0.0.1:1", o), std::invalid_argument);
}

TEST_CASE("the limited mixes are limiters that do not advertise their limits", "[cli_bench]") {
  using keel::testing::limiter_retry_after_mode;
  using keel::testing::retry_after_style;
  for (const auto& f : keel::cli::bench_faults()) {
    if (!keel::cli::bench_limited_mix(f)) {
      continue;
    }
    DYNAMIC_SECTION(f) {
      const auto s = keel::testing::scenario::from_json(keel::cli::bench_scenario_json(f, 100));
      REQUIRE(s.plans.size() == 2);  // the primary and the keel stack's fallback
      for (const auto& [model, p] : s.plans) {
        INFO(model);
        CHECK_FALSE(p.rate_limit_headers);
        if (f == "limited_no_retry_after") {
          CHECK(p.limiter_retry_after == limiter_retry_after_mode::none);
        } else {
          // nginx's "Retry-After: 1" whatever the real wait.
          CHECK(p.limiter_retry_after == limiter_retry_after_mode::constant);
          CHECK(p.retry_after == 1000ms);
          CHECK(p.retry_after_format == retry_after_style::seconds);
        }
        if (f == "token_limited") {
          CHECK(p.requests_per_second == 0);
          CHECK(p.tokens_per_minute == 100 * 60 * (500 + 14));  // 2,000-byte prompts
          CHECK(p.token_burst == 21 * (500 + 14));
        } else {
          CHECK(p.requests_per_second == 100);
          CHECK(p.burst == 21);  // nginx burst=20 nodelay
          CHECK(p.tokens_per_minute == 0);
        }
        if (f == "limit_change") {
          CHECK(p.limits_at(4999ms).requests_per_second == 100);
          CHECK(p.limits_at(5000ms).requests_per_second == 50);
          CHECK(p.limits_at(15000ms).requests_per_second == 100);
        } else {
          CHECK(p.rate_schedule.empty());
        }
        if (f == "mixed") {
          CHECK(p.probability.at(fault_kind::unavailable) == Approx(0.05));
          CHECK(p.probability.at(fault_kind::overloaded) == Approx(0.05));
          CHECK(p.latency_min == 50ms);
        } else {
          CHECK(p.probability.empty());
          CHECK(p.latency_max <= 2ms);
        }
      }
    }
  }
  // The advertising limiter of rate_limited is unchanged.
  const auto rl =
      keel::testing::scenario::from_json(keel::cli::bench_scenario_json("rate_limited"));
  CHECK(rl.plans.begin()->second.rate_limit_headers);
  CHECK_THROWS_AS(keel::cli::bench_scenario_json("limited", 0), std::invalid_argument);
}

TEST_CASE("a newcomer's config learns a limiter's unadvertised limit within 25%", "[cli_bench]") {
  // 300 prompts against 100 r/s (an ideal of about 2.8 s), 32 in flight, in this process.
  keel::cli::bench_options o;
  o.fork = false;
  o.progress = false;
  keel::cli::bench_run_spec spec;
  spec.fault = "limited";
  spec.policy = "newcomer";
  spec.concurrency = 32;
  spec.prompts = 300;
  spec.rate = 100;
  const json r = keel::cli::run_bench_scenario(spec, o);
  INFO(r.dump().substr(0, 2000));
  CHECK(r["ok"].get<std::size_t>() == 300);
  CHECK(r["rate"].get<double>() == 100);
  CHECK(r["ideal_s"].get<double>() == Approx((300 - 21) / 100.0 + 0.001));
  CHECK(r["wall_over_ideal"].get<double>() > 0.9);
  REQUIRE(r.contains("pacing"));
  const json& p = r["pacing"]["requests"];
  CHECK(p["estimate"].get<double>() >= 75);
  CHECK(p["estimate"].get<double>() <= 125);
  CHECK(p["samples"].get<std::uint64_t>() >= 1);
  CHECK(p["rejections"].get<std::uint64_t>() >= 1);
  CHECK(r["pacing"]["bucket"] == "openai/gpt-4o-mini");
  // The timeline samples the real limit (100 r/s throughout) and what the controller learned.
  const json& t = r["timeline"];
  REQUIRE(t.contains("limit_rps"));
  REQUIRE(t.contains("pacing_estimate_rps"));
  REQUIRE(t.contains("pacing_rate_rps"));
  REQUIRE(t.contains("pacing_phase"));
  CHECK(t["limit_rps"].size() >= 20);
  for (const auto& v : t["limit_rps"]) {
    CHECK(v.get<double>() == 100);
  }
  CHECK(t["pacing_estimate_rps"].size() == t["limit_rps"].size());
  CHECK(t["pacing_estimate_rps"].back().get<double>() > 0);
  const std::string last = t["pacing_phase"].back();
  CHECK((last == "cruise" || last == "probe"));

  // Its rate-over-time plot is a well-formed SVG with the four series.
  const fs::path dir =
      fs::temp_directory_path() / ("keel_cli_bench_rate_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto written = keel::cli::write_bench_plots(json{{"runs", json::array({r})}}, dir.string());
  const fs::path rate_svg = dir / "rate-limited-r100-newcomer-c32.svg";
  CHECK(std::find(written.begin(), written.end(), rate_svg.filename().string()) != written.end());
  REQUIRE(fs::exists(rate_svg));
  const std::string doc = read_file(rate_svg);
  CHECK(svg_problem(doc) == "");
  for (const char* series : {"server limit", "learned estimate", "paced rate", "admitted"}) {
    CHECK(doc.find(series) != std::string::npos);
  }
  if (have_xmllint()) {
    CHECK(std::system(("xmllint --noout '" + rate_svg.string() + "'").c_str()) == 0);
  }
  fs::remove_all(dir);
}

TEST_CASE("the svg helper renders a standalone document with log ticks and escaped text",
          "[cli_bench]") {
  CHECK(keel::cli::svg::log_ticks(1, 10000) == std::vector<double>{1, 10, 100, 1000, 10000});
  CHECK(keel::cli::svg::log_ticks(0.01, 1) ==
        std::vector<double>{0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1});
  CHECK(keel::cli::svg::linear_ticks(0, 10, 5) == std::vector<double>{0, 2, 4, 6, 8, 10});
  CHECK(keel::cli::svg::format_tick(10000) == "10k");
  CHECK(keel::cli::svg::format_tick(0.25) == "0.25");
  CHECK(keel::cli::svg::format_tick(1500000) == "1.5M");
  CHECK(keel::cli::svg::escape("a<b & \"c\"") == "a&lt;b &amp; &quot;c&quot;");

  keel::cli::svg::chart c;
  c.title = "p99 <latency> & \"friends\"";
  c.x_label = "concurrency";
  c.log_x = true;
  c.lines.push_back({"keel", {{1, 1.0}, {64, 1.0}, {10000, 1.9}, {0, 5}}, "", false, true});
  c.references.push_back({1.0, "one attempt"});
  const std::string doc = keel::cli::svg::render(c);
  CHECK(svg_problem(doc) == "");
  CHECK(doc.find("p99 &lt;latency&gt; &amp; &quot;friends&quot;") != std::string::npos);
  CHECK(doc.find(">10k</text>") != std::string::npos);
  CHECK(doc.find("<polyline") != std::string::npos);
  // The x = 0 point cannot be drawn on a log axis: three markers, not four.
  std::size_t circles = 0;
  for (auto p = doc.find("<circle"); p != std::string::npos; p = doc.find("<circle", p + 1)) {
    ++circles;
  }
  CHECK(circles == 3 + 1);  // + the legend's marker
  const std::string column = keel::cli::svg::render_column("two", {c, keel::cli::svg::chart{}});
  CHECK(svg_problem(column) == "");
  CHECK(column.find("no data") != std::string::npos);
  // The checker itself rejects what a browser would.
  CHECK(svg_problem("<svg xmlns=\"http://www.w3.org/2000/svg\"><g></svg>") != "");
  CHECK(svg_problem("<svg xmlns=\"http://www.w3.org/2000/svg\"><text>a & b</text></svg>") != "");
  CHECK(svg_problem("<html></html>") != "");
}

TEST_CASE("with shared pacing off no limit is learned", "[cli_bench]") {
  for (const bool pacing : {true, false}) {
    DYNAMIC_SECTION("shared_pacing " << pacing) {
      asio::io_context ctx;
      keel::testing::mock_llm_server server(ctx);
      server.set_plan("m", fault_plan{}
                               .with_script({fault_kind::rate_limit})
                               .with_retry_after(20ms)
                               .with_rate_limit(100));
      server.start();
      keel::http::client http(ctx.get_executor(), {});
      keel::llm::bucket_registry buckets(ctx.get_executor());
      auto cfg = keel::llm::parse_config(
          R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "k"}],
              "policy": {"retry": {"max_attempts": 2}}})",
          "<test>", [](std::string_view) { return std::optional<std::string>{}; });
      cfg.entries[0].base_url = server.base_url();
      keel::llm::client_options co;
      co.shared_pacing = pacing;
      keel::llm::client client(ctx.get_executor(), cfg, http, buckets, {}, 1, co);
      const auto out = run(ctx, client, {item(1)});
      REQUIRE(out[0].response);
      CHECK(out[0].attempts == 2);
      REQUIRE(buckets.all().size() == 1);
      const keel::throttler& bucket = *buckets.all()[0].second;
      // One 429 pauses nobody either way (a Retry-After is about one request).
      CHECK(bucket.paused_until() == keel::throttler::time_point{});
      if (pacing) {
        // The reply's headers taught the controller 100 r/s.
        REQUIRE(buckets.pacing(bucket) != nullptr);
        CHECK(buckets.pacing(bucket)->requests().estimate == Approx(100));
        CHECK(bucket.options().requests_per_second == Approx(100));
      } else {
        CHECK(buckets.pacing(bucket) == nullptr);
        CHECK(bucket.options().requests_per_second == 0);
      }
    }
  }
}
