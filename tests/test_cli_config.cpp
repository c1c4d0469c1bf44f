// Tests for tools/keel/config.hpp: the keel command's config_list + policy loader.
#include <keel/http/client.hpp>
#include <keel/llm/aws_shared_files.hpp>
#include <keel/llm/config.hpp>
#include <keel/otlp.hpp>

#include <catch2/catch.hpp>

#include <boost/asio/io_context.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

using keel::aws::retry_mode;
using keel::llm::client_config;
using keel::llm::config_error;
using keel::llm::parse_config;
using keel::llm::provider_kind;

namespace {

using env_map = std::map<std::string, std::string>;

keel::llm::env_lookup env_of(env_map vars) {
  return [vars = std::move(vars)](std::string_view name) -> std::optional<std::string> {
    const auto it = vars.find(std::string(name));
    if (it == vars.end()) {
      return std::nullopt;
    }
    return it->second;
  };
}

client_config parse(const std::string& text, env_map env = {}) {
  return parse_config(text, "p.json", env_of(std::move(env)));
}

// The error a config produces; fails the test if it loads.
config_error error_of(const std::string& text, env_map env = {}) {
  try {
    parse(text, std::move(env));
  } catch (const config_error& e) {
    return e;
  }
  FAIL("the config loaded but should not have: " << text);
  return config_error("", "", "");
}

// A directory under the system temp dir, removed with its files at scope exit.
class temp_dir {
 public:
  temp_dir() {
    static int counter = 0;
    path_ =
        std::filesystem::temp_directory_path() /
        ("keel_cli_config_test_" + std::to_string(::getpid()) + "_" + std::to_string(++counter));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }

  // Writes `content` to `name` in the directory and returns its path.
  std::string write(const std::string& name, const std::string& content) const {
    const auto p = path_ / name;
    std::ofstream(p, std::ios::binary) << content;
    return p.string();
  }

  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

constexpr const char* openai_entry = R"({"model": "gpt-4o-mini", "api_key": "sk-dummy-key"})";

std::string with_entry(const std::string& entry_fields) {
  return R"({"config_list": [{"model": "m", "api_key": "k")" +
         (entry_fields.empty() ? "" : ", " + entry_fields) + "}]}";
}

std::string bedrock(const std::string& extra_fields = "") {
  return R"({"config_list": [{"api_type": "bedrock", "model": "anthropic.claude-3-haiku")" +
         (extra_fields.empty() ? "" : ", " + extra_fields) + "}]}";
}

}  // namespace

// ---- shapes and defaults --------------------------------------------------------------------

TEST_CASE("a bare config_list array resolves with every default", "[cli_config]") {
  auto c = parse(std::string("[") + openai_entry + "]");
  CHECK(c.source == "p.json");
  REQUIRE(c.entries.size() == 1);
  const auto& e = c.entries[0];
  CHECK(e.api_type == provider_kind::openai);
  CHECK(e.model == "gpt-4o-mini");
  CHECK(e.base_url.empty());
  CHECK(e.api_key == "sk-dummy-key");
  CHECK_FALSE(e.timeout);
  CHECK_FALSE(e.aws_retry);
  CHECK(e.max_attempts == 6);
  CHECK(e.rate_limits.requests_per_minute == 0);
  CHECK(e.name() == "openai/gpt-4o-mini");

  const auto& p = c.policy;
  CHECK(p.retry.max_attempts == 6);
  CHECK(p.retry.backoff.shape == keel::backoff_shape::exponential);
  CHECK(p.retry.backoff.base == std::chrono::milliseconds(500));
  CHECK(p.retry.backoff.cap == std::chrono::seconds(20));
  CHECK(p.retry.backoff.jitter == keel::jitter::full);
  CHECK(p.retry.backoff.multiplier == 2);
  CHECK_FALSE(p.retry.backoff.first_retry_immediate);
  // The throttling hierarchy's first rung: a transient failure gets one immediate retry.
  REQUIRE(p.retry.backoff_by_condition.size() == 1);
  CHECK(p.retry.backoff_by_condition.at(keel::condition::transient).first_retry_immediate);
  CHECK(p.retry.backoff_by_condition.at(keel::condition::transient).base ==
        std::chrono::milliseconds(500));
  CHECK(p.retry.honour_retry_after);
  CHECK(p.retry.max_retry_after == 60);
  CHECK(p.deadline == 300);
  CHECK(p.breaker.enabled);
  CHECK(p.breaker.failure_threshold == 10);
  CHECK(p.breaker.break_duration == 5);
  CHECK(p.breaker.break_growth == 2);
  CHECK(p.breaker.max_break == 300);
  CHECK(p.breaker.unanswered_grace == 30);
  CHECK(p.retry_budget.enabled);
  CHECK(p.retry_budget.max_tokens == 100);
  CHECK(p.retry_budget.token_ratio == Approx(0.5));
  CHECK(p.rate_limits.burst == 0);
  CHECK(p.concurrency == 16);
  CHECK(p.queue_max_wait == 0);
}

TEST_CASE("the object shape reads config_list and every policy key", "[cli_config]") {
  auto c = parse(R"({
    "config_list": [
      {"model": "gpt-4o-mini", "api_key": "k1", "base_url": "http://127.0.0.1:9", "timeout": 2.5,
       "response_format": {"type": "json_object"}, "tags": ["a", "b"]},
      {"api_type": "anthropic", "model": "claude", "api_key": "k2", "requests_per_minute": 7}
    ],
    "policy": {
      "retry": {"max_attempts": 6, "backoff": {"kind": "linear", "base": 1, "cap": 9,
                "jitter": "equal", "multiplier": 3},
                "backoff_by_condition": {"throttled": {"cap": 30}, "timeout": {"kind": "immediate"}},
                "honour_retry_after": false, "max_retry_after": 10},
      "deadline": 12.5,
      "breaker": {"enabled": false, "failure_threshold": 2, "break": 1, "break_growth": 1.5,
                  "max_break": 4, "unanswered_grace": 0},
      "retry_budget": {"enabled": false, "max_tokens": 10, "token_ratio": 1},
      "rate_limits": {"requests_per_minute": 60, "tokens_per_minute": 1000, "burst": 3},
      "concurrency": 100000,
      "queue": {"max_wait": 0.25}
    }
  })");
  REQUIRE(c.entries.size() == 2);
  const auto& a = c.entries[0];
  CHECK(a.base_url == "http://127.0.0.1:9");
  CHECK(a.timeout == 2.5);
  CHECK(a.response_format == nlohmann::json{{"type", "json_object"}});
  CHECK(a.tags == std::vector<std::string>{"a", "b"});
  CHECK(a.max_attempts == 6);
  const auto& b = c.entries[1];
  CHECK(b.api_type == provider_kind::anthropic);
  CHECK(b.name() == "anthropic/claude");

  const auto& p = c.policy;
  CHECK(p.retry.max_attempts == 6);
  CHECK(p.retry.backoff.shape == keel::backoff_shape::linear);
  CHECK(p.retry.backoff.jitter == keel::jitter::equal);
  CHECK(p.retry.backoff.multiplier == 3);
  // A condition's curve starts from retry.backoff and overrides what it names.
  REQUIRE(p.retry.backoff_by_condition.count(keel::condition::throttled) == 1);
  CHECK(p.retry.backoff_by_condition.at(keel::condition::throttled).shape ==
        keel::backoff_shape::linear);
  CHECK(p.retry.backoff_by_condition.at(keel::condition::throttled).base ==
        std::chrono::seconds(1));
  CHECK(p.retry.backoff_by_condition.at(keel::condition::throttled).cap ==
        std::chrono::seconds(30));
  CHECK(p.retry.backoff_by_condition.at(keel::condition::timeout).base.count() == 0);
  CHECK(keel::llm::to_json(c)["policy"]["retry"]["backoff_by_condition"]["timeout"]["kind"] ==
        "immediate");
  CHECK_FALSE(p.retry.honour_retry_after);
  CHECK(p.retry.max_retry_after == 10);
  CHECK(p.deadline == 12.5);
  CHECK_FALSE(p.breaker.enabled);
  CHECK(p.breaker.failure_threshold == 2);
  CHECK(p.breaker.break_duration == 1);
  CHECK(p.breaker.break_growth == 1.5);
  CHECK(p.breaker.max_break == 4);
  CHECK(p.breaker.unanswered_grace == 0);
  CHECK_FALSE(p.retry_budget.enabled);
  CHECK(p.retry_budget.max_tokens == 10);
  CHECK(p.retry_budget.token_ratio == 1);
  CHECK(p.concurrency == 100000);
  CHECK(p.queue_max_wait == 0.25);
  // Defaults of the fleet's breaker timing (shared.redis off: nothing is shared).
  CHECK(p.shared.breaker_sync == 0.25);
  CHECK(p.shared.probe_timeout == 30);
  CHECK(p.shared.rate_sync == 0.1);
}

TEST_CASE("policy.shared reads the fleet breaker's sync interval, probe timeout and rate sync",
          "[cli_config]") {
  const auto c = parse(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "policy": {"shared": {"breaker_sync": 0.05, "probe_timeout": 4.5, "rate_sync": 0.2}}})");
  CHECK(c.policy.shared.breaker_sync == 0.05);
  CHECK(c.policy.shared.probe_timeout == 4.5);
  CHECK(c.policy.shared.rate_sync == 0.2);
  const auto j = keel::llm::to_json(c);
  CHECK(j["policy"]["shared"]["breaker_sync"] == 0.05);
  CHECK(j["policy"]["shared"]["probe_timeout"] == 4.5);
  CHECK(j["policy"]["shared"]["rate_sync"] == 0.2);
}

TEST_CASE("entry rate limits are the policy's overridden key by key", "[cli_config]") {
  auto c = parse(R"({"config_list": [
      {"model": "a", "api_key": "k"},
      {"model": "b", "api_key": "k", "requests_per_minute": 5},
      {"model": "c", "api_key": "k", "tokens_per_minute": 0}],
    "policy": {"rate_limits": {"requests_per_minute": 60, "tokens_per_minute": 9000, "burst": 4}}})");
  CHECK(c.entries[0].rate_limits.requests_per_minute == 60);
  CHECK(c.entries[0].rate_limits.tokens_per_minute == 9000);
  CHECK(c.entries[1].rate_limits.requests_per_minute == 5);
  CHECK(c.entries[1].rate_limits.tokens_per_minute == 9000);
  CHECK(c.entries[1].rate_limits.burst == 4);
  CHECK(c.entries[2].rate_limits.requests_per_minute == 60);
  CHECK(c.entries[2].rate_limits.tokens_per_minute == 0);
}

TEST_CASE("endpoint carries the kind, base URL, key and region of an entry", "[cli_config]") {
  auto c = parse(R"([{"api_type": "anthropic", "model": "claude", "api_key_env": "MY_KEY",
                      "base_url": "http://127.0.0.1:1"},
                     {"api_type": "bedrock", "model": "anthropic.claude", "aws_region": "eu-west-3"}])",
                 {{"MY_KEY", "key-from-env"}});
  auto ep = c.entries[0].endpoint();
  CHECK(ep.kind == provider_kind::anthropic);
  CHECK(ep.base_url == "http://127.0.0.1:1");
  CHECK(ep.api_key == "key-from-env");
  CHECK(c.entries[0].api_key_env == "MY_KEY");
  auto ep2 = c.entries[1].endpoint();
  CHECK(ep2.kind == provider_kind::bedrock);
  CHECK(ep2.region == "eu-west-3");
  CHECK(c.entries[1].name() == "bedrock/anthropic.claude");
}

TEST_CASE("to_json fills in every default and says which retry algorithm applies", "[cli_config]") {
  auto c = parse(R"([{"model": "m", "api_key": "k", "max_attempts": 1},
                     {"api_type": "bedrock", "model": "b", "aws_region": "us-east-1",
                      "mode": "adaptive"}])");
  auto j = keel::llm::to_json(c);
  CHECK(j["source"] == "p.json");
  CHECK(j["config_list"][0]["retry"] == nlohmann::json{{"algorithm", "keel"}, {"max_attempts", 2}});
  CHECK(j["config_list"][0]["timeout"].is_null());
  CHECK(j["config_list"][0]["rate_limits"]["burst"] == 0);
  CHECK(j["config_list"][1]["retry"] == nlohmann::json{{"algorithm", "aws"},
                                                       {"mode", "adaptive"},
                                                       {"total_max_attempts", 3},
                                                       {"revision", "2.0"}});
  CHECK(j["config_list"][1]["aws_credentials_source"] == "");
  CHECK(j["config_list"][1]["aws_region"] == "us-east-1");
  CHECK(j["policy"]["retry"]["backoff"]["jitter"] == "full");
  CHECK(j["policy"]["breaker"]["break"] == 5);
  CHECK(j["policy"]["breaker"]["unanswered_grace"] == 30);
  CHECK(j["policy"]["retry_budget"]["token_ratio"] == 0.5);
  CHECK(j["policy"]["queue"]["max_wait"] == 0);
  CHECK(j["policy"]["concurrency"] == 16);
  // The policy block of the output is itself a valid policy block.
  auto again = parse(nlohmann::json{
      {"config_list", {{{"model", "m"}, {"api_key", "k"}}}},
      {"policy",
       j["policy"]}}.dump());
  CHECK(keel::llm::to_json(again)["policy"] == j["policy"]);
}

#ifdef KEEL_SOURCE_DIR
TEST_CASE("every example config in docs/config loads", "[cli_config]") {
  const env_map env{{"OPENAI_API_KEY", "sk-example-openai"},
                    {"ANTHROPIC_API_KEY", "sk-ant-example"}};
  const std::string dir = std::string(KEEL_SOURCE_DIR) + "/docs/config/";
  int loaded = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    if (f.path().extension() != ".json") {
      continue;
    }
    INFO(f.path().string());
    CHECK_NOTHROW(keel::llm::load_config(f.path().string(), env_of(env)));
    ++loaded;
  }
  CHECK(loaded >= 3);

  auto openai = keel::llm::load_config(dir + "openai.json", env_of(env));
  REQUIRE(openai.entries.size() == 2);
  CHECK(openai.entries[0].api_key == "sk-example-openai");
  CHECK(openai.entries[1].api_type == provider_kind::anthropic);
  CHECK(openai.policy.rate_limits.requests_per_minute > 0);

  auto bedrock_cfg = keel::llm::load_config(dir + "bedrock.json", env_of({}));
  REQUIRE(bedrock_cfg.entries.size() == 2);
  REQUIRE(bedrock_cfg.entries[0].aws_retry);
  CHECK(bedrock_cfg.entries[0].aws_retry->mode == retry_mode::adaptive);
  CHECK(bedrock_cfg.entries[0].aws_region != bedrock_cfg.entries[1].aws_region);

  auto mock = keel::llm::load_config(dir + "mock.json", env_of({}));
  REQUIRE(mock.entries.size() == 3);
  for (const auto& e : mock.entries) {
    CHECK(e.base_url == "http://127.0.0.1:8080");
  }
  CHECK(mock.entries[2].aws_credentials_source == "config");
}
#endif

TEST_CASE("an unreadable config file is an error with an empty path", "[cli_config]") {
  temp_dir dir;
  const std::string missing = dir.file("does-not-exist.json");
  try {
    keel::llm::load_config(missing, env_of({}));
    FAIL("loaded a missing file");
  } catch (const config_error& e) {
    CHECK(e.path().empty());
    CHECK(std::string(e.what()).rfind(missing + ": ", 0) == 0);
  }
  CHECK_THROWS_AS(keel::llm::load_config(dir.file(""), env_of({})), config_error);
  const std::string good = dir.write("good.json", std::string("[") + openai_entry + "]");
  CHECK(keel::llm::load_config(good, env_of({})).source == good);
}

// ---- errors ---------------------------------------------------------------------------------

TEST_CASE("an unknown key is shown whole and safe: control characters escaped, a key masked",
          "[cli_config][review]") {
  // Before: a NUL in a key cut the message at "/0/", an ESC reached the terminal, and a key
  // pasted as a name was masked in the message but printed in the path.
  const auto nul = error_of(R"([{"model": "m", "api_key": "k", "\u0000zz": 1}])");
  CHECK_THAT(std::string(nul.what()), Catch::Contains("\\u0000zz"));
  CHECK_THAT(std::string(nul.what()), Catch::Contains("unknown key"));
  const auto esc = error_of(R"([{"model": "m", "api_key": "k", "\u001b]0;x\u0007": 1}])");
  CHECK(std::string(esc.what()).find('\x1b') == std::string::npos);
  const auto pasted = error_of(R"([{"model": "m", "api_key": "k", "sk-LEAKCHECK123456": 1}])");
  CHECK(std::string(pasted.what()).find("LEAKCHECK") == std::string::npos);
  CHECK(pasted.path() == "/0/[redacted]");
}

TEST_CASE("errors read source, JSON pointer, expected and got", "[cli_config]") {
  auto e = error_of(R"({"config_list": [{"model": "m", "api_key": "k"},
                                        {"model": "m", "api_key": "k", "timeout": "abc"}]})");
  CHECK(std::string(e.what()) ==
        R"(p.json: /config_list/1/timeout: expected a number > 0, got "abc")");
  CHECK(e.path() == "/config_list/1/timeout");
  CHECK(e.message() == R"(expected a number > 0, got "abc")");

  auto u = error_of(with_entry(R"("temprature": 0.2)"));
  CHECK(u.path() == "/config_list/0/temprature");
  CHECK(u.message().find("api_key_env") != std::string::npos);  // lists the allowed keys
  CHECK(u.message().find("unknown key \"temprature\"") != std::string::npos);

  auto long_value = error_of(with_entry(R"("tags": ")" + std::string(200, 'x') + "\""));
  CHECK(long_value.message().size() < 120);
}

TEST_CASE("each bad config names the exact JSON path of the problem", "[cli_config]") {
  struct bad {
    std::string json;
    std::string path;
    std::string says;  // a substring of the message
  };
  const std::vector<bad> table{
      // Shapes.
      {"3", "", "an array of entries"},
      {"[]", "", "non-empty array"},
      {R"({"config_list": []})", "/config_list", "non-empty array"},
      {R"({"config_list": {}})", "/config_list", "non-empty array"},
      {R"({"policy": {}})", "/config_list", "got nothing"},
      {R"({"config_list": [3]})", "/config_list/0", "an object"},
      {R"([{"model": "m", "api_key": "k", "timeout": "abc"}])", "/0/timeout", "a number > 0"},
      // Unknown keys at every level.
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policies": {}})", "/policies",
       "config_list, policy"},
      {with_entry(R"("a/b": 1)"), "/config_list/0/a~1b", "unknown key"},
      {with_entry(R"("prices": [1, 2])"), "/config_list/0/prices", "unknown key"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retries": {}}})",
       "/policy/retries", "retry_budget"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"max_retries": 1}}})",
       "/policy/retry/max_retries", "backoff_by_condition"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff": {"factor": 2}}}})",
       "/policy/retry/backoff/factor", "multiplier"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff_by_condition": {"rate_limited": {}}}}})",
       "/policy/retry/backoff_by_condition/rate_limited", "throttled, transient, timeout"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff_by_condition": {"throttled": {"bse": 1}}}}})",
       "/policy/retry/backoff_by_condition/throttled/bse", "unknown key"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"breaker": {"threshold": 1}}})",
       "/policy/breaker/threshold", "failure_threshold"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry_budget": {"ratio": 1}}})",
       "/policy/retry_budget/ratio", "token_ratio"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"rate_limits": {"rpm": 1}}})",
       "/policy/rate_limits/rpm", "requests_per_minute"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"queue": {"wait": 1}}})",
       "/policy/queue/wait", "max_wait"},
      // Wrong types and ranges in entries.
      {R"({"config_list": [{"api_key": "k"}]})", "/config_list/0/model", "got nothing"},
      {R"({"config_list": [{"api_key": "k", "model": 5}]})", "/config_list/0/model",
       "non-empty string, got 5"},
      {R"({"config_list": [{"model": "", "api_key": "k"}]})", "/config_list/0/model",
       "non-empty string"},
      {with_entry(R"("api_type": "azure")"), "/config_list/0/api_type",
       R"(expected "openai", "anthropic" or "bedrock", got "azure")"},
      {with_entry(R"("base_url": "ftp://host")"), "/config_list/0/base_url", "http://"},
      // URLs the HTTP client would refuse at every send: caught when the config loads.
      {with_entry(R"("base_url": "http://")"), "/config_list/0/base_url", "with a host"},
      {with_entry(R"("base_url": "http://127.0.0.1:99999")"), "/config_list/0/base_url",
       "port 1-65535"},
      {with_entry(R"("base_url": "http://127.0.0.1:abc")"), "/config_list/0/base_url", "got"},
      {with_entry(R"("base_url": "http://[::1")"), "/config_list/0/base_url", "got"},
      {with_entry(R"("base_url": "http://:80")"), "/config_list/0/base_url", "got"},
      {with_entry(R"("base_url": "http://a b.example")"), "/config_list/0/base_url", "got"},
      {with_entry(R"("base_url": "http://user:QQSECRET15pass@127.0.0.1:1")"),
       "/config_list/0/base_url", "user:password@ (not shown)"},
      {with_entry(R"("base_url": "http://h/v1?key=QQSECRET16#frag")"), "/config_list/0/base_url",
       "a URL without a #fragment"},
      {with_entry(R"("timeout": 0)"), "/config_list/0/timeout", "a number > 0, got 0"},
      {with_entry(R"("timeout": 1e300)"), "/config_list/0/timeout", "<= 31536000"},
      {with_entry(R"("total_max_attempts": 0)"), "/config_list/0/total_max_attempts",
       "an integer >= 1, got 0"},
      {with_entry(R"("max_attempts": -1)"), "/config_list/0/max_attempts",
       "an integer >= 0, got -1"},
      {with_entry(R"("max_attempts": 1.5)"), "/config_list/0/max_attempts", "an integer"},
      {with_entry(R"("mode": "fast")"), "/config_list/0/mode",
       R"("legacy", "standard" or "adaptive", got "fast")"},
      {with_entry(R"("requests_per_minute": -5)"), "/config_list/0/requests_per_minute",
       "a number >= 0"},
      {with_entry(R"("tags": ["ok", 1])"), "/config_list/0/tags/1", "a string, got 1"},
      {with_entry(R"("tags": "x")"), "/config_list/0/tags", "an array of strings"},
      {with_entry(R"("response_format": "json")"), "/config_list/0/response_format", "an object"},
      // Keys and credentials.
      {R"([{"model": "m", "api_key": "k", "api_key_env": "K"}])", "/0/api_key_env",
       "at most one of api_key and api_key_env"},
      {R"([{"model": "m"}])", "/0/api_key", "api_key or api_key_env"},
      {R"([{"model": "m", "api_key_env": "KEEL_TEST_UNSET"}])", "/0/api_key_env",
       "\"KEEL_TEST_UNSET\" (unset)"},
      {R"([{"model": "m", "api_key": ""}])", "/0/api_key", "got an empty string"},
      {bedrock(R"("aws_region": "us-east-1", "aws_access_key": "AKIAEXAMPLE")"),
       "/config_list/0/aws_secret_key", "aws_access_key and aws_secret_key go together"},
      {bedrock(R"("aws_region": "us-east-1", "aws_secret_key": "s")"),
       "/config_list/0/aws_access_key", "go together"},
      {bedrock(R"("aws_region": "us-east-1", "aws_session_token": "t")"),
       "/config_list/0/aws_access_key", "go together"},
      {bedrock(), "/config_list/0/aws_region", "AWS_DEFAULT_REGION"},
      {bedrock(R"("aws_region": "us-east-1", "api_key": "k")"), "/config_list/0/api_key",
       "no API key on a bedrock entry"},
      {with_entry(R"("aws_access_key": "a", "aws_secret_key": "s")"),
       "/config_list/0/aws_access_key", "no AWS credentials on an entry of api_type openai"},
      // Policy ranges.
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"concurrency": 0}})",
       "/policy/concurrency", "an integer in [1, 100000], got 0"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"concurrency": 100001}})",
       "/policy/concurrency", "got 100001"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"deadline": -1}})",
       "/policy/deadline", "a number > 0, got -1"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"max_attempts": 0}}})",
       "/policy/retry/max_attempts", "an integer >= 1"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"honour_retry_after": "yes"}}})",
       "/policy/retry/honour_retry_after", "true or false"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff": {"jitter": "some"}}}})",
       "/policy/retry/backoff/jitter", "\"decorrelated_v2\""},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff": {"kind": "fibonacci"}}}})",
       "/policy/retry/backoff/kind", "\"immediate\""},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff": {"multiplier": 0.5}}}})",
       "/policy/retry/backoff/multiplier", "a number >= 1"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff": {"base": 5, "cap": 1}}}})",
       "/policy/retry/backoff/cap", "a number >= base (5)"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry": {"backoff": {"base": 30}}}})",
       "/policy/retry/backoff/base", "a number <= cap (20)"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"breaker": {"failure_threshold": 0}}})",
       "/policy/breaker/failure_threshold", "an integer >= 1"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"breaker": {"break": 60, "max_break": 10}}})",
       "/policy/breaker/max_break", "a number >= break (60)"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"breaker": {"unanswered_grace": -1}}})",
       "/policy/breaker/unanswered_grace", "a number >= 0"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry_budget": {"token_ratio": 1.5}}})",
       "/policy/retry_budget/token_ratio", "a number in (0, 1], got 1.5"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retry_budget": {"max_tokens": 0}}})",
       "/policy/retry_budget/max_tokens", "a number > 0"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"queue": {"max_wait": -1}}})",
       "/policy/queue/max_wait", "a number >= 0"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": []})", "/policy",
       "an object, got []"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"breaker_sync": 0}}})",
       "/policy/shared/breaker_sync", "a number > 0"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"probe_timeout": "1"}}})",
       "/policy/shared/probe_timeout", "a number > 0"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"rate_sync": -0.1}}})",
       "/policy/shared/rate_sync", "a number > 0"},
      // Redis URLs keel::redis would refuse when the run starts: refused at load, not echoed.
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"redis": "redis://127.0.0.1:6379/0?password=QQSECRET17"}}})",
       "/policy/shared/redis", "no query or fragment"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"redis": "redis://127.0.0.1:6379/QQSECRET18"}}})",
       "/policy/shared/redis", "a database number"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"redis": "redis://127.0.0.1:6379/0#QQSECRET19"}}})",
       "/policy/shared/redis", "not shown"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"redis": "redis://127.0.0.1:99999"}}})",
       "/policy/shared/redis", "a port 1-65535"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"redis": "redis://:6379"}}})",
       "/policy/shared/redis", "a host"},
      // Read as host "::" and port 1 before, and refused only when the run connected.
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"shared": {"redis": "redis://::1/0"}}})",
       "/policy/shared/redis", "an IPv6 address in brackets"},
  };
  for (const auto& row : table) {
    INFO("config: " << row.json);
    const auto e = error_of(row.json);
    CHECK(e.path() == row.path);
    CHECK_THAT(e.message(), Catch::Contains(row.says));
    CHECK_THAT(e.message(), Catch::StartsWith("expected "));
    const std::string prefix = row.path.empty() ? "p.json: " : "p.json: " + row.path + ": ";
    CHECK_THAT(std::string(e.what()), Catch::StartsWith(prefix));
    CHECK_THAT(std::string(e.what()), !Catch::Contains("QQSECRET"));  // secrets never echoed
  }
}

TEST_CASE("a JSON syntax error names the line and column", "[cli_config]") {
  const std::string text =
      "{\n"
      "  \"config_list\": [\n"
      "    {\"model\": \"m\", \"api_key\": \"k\",}\n"
      "  ]\n"
      "}\n";
  const auto e = error_of(text);
  CHECK(e.path().empty());
  CHECK_THAT(std::string(e.what()),
             Catch::StartsWith("p.json: invalid JSON at line 3, column 35: "));

  const auto first = error_of("");
  CHECK_THAT(first.message(), Catch::StartsWith("invalid JSON at line 1, column 1"));
  const auto later = error_of("[\n\n  {\"model\": \"m\"\n  ]");
  CHECK_THAT(later.message(), Catch::StartsWith("invalid JSON at line 4, column 3"));
}

TEST_CASE("a key given twice in one object of a config is refused with its JSON pointer",
          "[cli_config][review]") {
  // nlohmann keeps the last, another parser the first: the config would mean two things.
  const auto e = error_of(R"({"config_list": [{"model": "a", "api_key": "k", "model": "b"}]})");
  CHECK(e.path() == "/config_list/0/model");
  CHECK_THAT(e.message(), Catch::StartsWith("the key appears twice in one object"));
  const auto policy = error_of(
      R"({"config_list": [{"model": "a", "api_key": "k"}], "policy": {"retry": {"max_attempts": 3, "max_attempts": 9}}})");
  CHECK(policy.path() == "/policy/retry/max_attempts");
  // Too large a number: what is wrong, without the parser's exception id.
  CHECK(error_of(R"([{"model": "a", "api_key": "k", "timeout": 1e400}])").message() ==
        "invalid JSON at line 1, column 44: a number too large for a double");
}

TEST_CASE("a config nested 60,000 objects deep is refused naming line and column",
          "[cli_config][hardening]") {
  // Before: `keel config check` with such a response_format died of a stack overflow.
  std::string deep = "[\n  {\"model\": \"m\", \"api_key\": \"k\", \"response_format\": ";
  for (int i = 0; i < 60000; ++i) {
    deep += "{\"a\": ";
  }
  deep += "1" + std::string(60000, '}') + "}\n]";
  const auto e = error_of(deep);
  CHECK(e.path().empty());
  // Level 3 opens at column 53 of line 2, each level after it 6 columns on: 129 at 53 + 126 * 6.
  CHECK(e.message() ==
        "JSON nested deeper than 128 levels at line 2, column " + std::to_string(53 + 126 * 6));
}

// ---- retry resolution -----------------------------------------------------------------------

TEST_CASE("keel-native attempts take total_max_attempts over max_attempts over the policy",
          "[cli_config]") {
  auto c = parse(R"({"config_list": [
      {"model": "a", "api_key": "k", "total_max_attempts": 7, "max_attempts": 2},
      {"model": "b", "api_key": "k", "max_attempts": 2},
      {"model": "c", "api_key": "k", "max_attempts": 0},
      {"model": "d", "api_key": "k"}],
    "policy": {"retry": {"max_attempts": 6}}})");
  CHECK(c.entries[0].max_attempts == 7);
  CHECK(c.entries[1].max_attempts == 3);
  CHECK(c.entries[2].max_attempts == 1);
  CHECK(c.entries[3].max_attempts == 6);
  for (const auto& e : c.entries) {
    CHECK_FALSE(e.aws_retry);
  }
}

TEST_CASE("a keel-native entry ignores AWS_MAX_ATTEMPTS and AWS_RETRY_MODE", "[cli_config]") {
  auto c = parse(std::string("[") + openai_entry + "]",
                 {{"AWS_MAX_ATTEMPTS", "9"}, {"AWS_RETRY_MODE", "adaptive"}});
  CHECK_FALSE(c.entries[0].aws_retry);
  CHECK(c.entries[0].max_attempts == keel::llm::retry_config{}.max_attempts);
  // Not even read: an invalid value does not fail a config that does not use it.
  CHECK_NOTHROW(parse(std::string("[") + openai_entry + "]",
                      {{"AWS_MAX_ATTEMPTS", "many"}, {"AWS_RETRY_MODE", "fast"}}));
}

TEST_CASE("an entry with mode uses AWS semantics whatever its api_type", "[cli_config]") {
  auto c = parse(with_entry(R"("mode": "standard")"), {{"AWS_MAX_ATTEMPTS", "6"}});
  REQUIRE(c.entries[0].aws_retry);
  CHECK(c.entries[0].aws_retry->mode == retry_mode::standard);
  CHECK(c.entries[0].aws_retry->total_max_attempts == 6);
  CHECK(c.entries[0].max_attempts == 6);
}

TEST_CASE("AWS attempts come from the entry then AWS_MAX_ATTEMPTS then the profile then the mode",
          "[cli_config]") {
  temp_dir dir;
  const std::string cfg = dir.write("config", "[default]\nmax_attempts = 8\n");
  const std::string base_fields = R"("aws_region": "us-east-1", "mode": "standard")";
  const auto attempts = [&](const std::string& extra, env_map env) {
    auto c = parse(bedrock(base_fields + extra), std::move(env));
    REQUIRE(c.entries[0].aws_retry);
    return c.entries[0].aws_retry->total_max_attempts;
  };
  const env_map all{{"AWS_MAX_ATTEMPTS", "9"}, {"AWS_CONFIG_FILE", cfg}};
  CHECK(attempts(R"(, "total_max_attempts": 6, "max_attempts": 1)", all) == 6);
  CHECK(attempts(R"(, "max_attempts": 1)", all) == 2);
  CHECK(attempts("", all) == 9);
  CHECK(attempts("", {{"AWS_CONFIG_FILE", cfg}}) == 8);
  CHECK(attempts("", {{"AWS_CONFIG_FILE", dir.file("missing")}}) == 3);
  // A bedrock entry without mode defaults to legacy (5 attempts).
  auto legacy = parse(bedrock(R"("aws_region": "us-east-1")"));
  REQUIRE(legacy.entries[0].aws_retry);
  CHECK(legacy.entries[0].aws_retry->mode == retry_mode::legacy);
  CHECK(legacy.entries[0].aws_retry->total_max_attempts == 5);
  // An entry value wins even over an invalid variable, which is then not read.
  CHECK(attempts(R"(, "total_max_attempts": 2)", {{"AWS_MAX_ATTEMPTS", "many"}}) == 2);
}

TEST_CASE("AWS_NEW_RETRIES_2026=true gives AWS entries revision 2.1 and standard by default",
          "[cli_config]") {
  auto on = parse(bedrock(R"("aws_region": "us-east-1")"), {{"AWS_NEW_RETRIES_2026", "true"}});
  REQUIRE(on.entries[0].aws_retry);
  CHECK(on.entries[0].aws_retry->revision == keel::aws::retry_revision::v2_1);
  CHECK(on.entries[0].aws_retry->mode == retry_mode::standard);
  CHECK(on.entries[0].aws_retry->total_max_attempts == 3);
  CHECK(keel::llm::to_json(on, true)["config_list"][0]["retry"]["revision"] == "2.1");
  auto off = parse(bedrock(R"("aws_region": "us-east-1")"), {{"AWS_NEW_RETRIES_2026", "false"}});
  CHECK(off.entries[0].aws_retry->revision == keel::aws::retry_revision::v2_0);
  CHECK(off.entries[0].aws_retry->mode == retry_mode::legacy);
  auto explicit_mode = parse(bedrock(R"("aws_region": "us-east-1", "mode": "adaptive")"),
                             {{"AWS_NEW_RETRIES_2026", "true"}});
  CHECK(explicit_mode.entries[0].aws_retry->mode == retry_mode::adaptive);
}

TEST_CASE("the AWS mode comes from the entry then AWS_RETRY_MODE then the profile",
          "[cli_config]") {
  temp_dir dir;
  const std::string cfg = dir.write("config", "[profile team]\nretry_mode = standard\n");
  const auto mode = [&](const std::string& extra, env_map env) {
    auto c = parse(bedrock(R"("aws_region": "us-east-1")" + extra), std::move(env));
    return c.entries[0].aws_retry->mode;
  };
  const env_map env{{"AWS_RETRY_MODE", "adaptive"}, {"AWS_CONFIG_FILE", cfg}};
  CHECK(mode(R"(, "mode": "legacy")", env) == retry_mode::legacy);
  CHECK(mode("", env) == retry_mode::adaptive);
  CHECK(mode(R"(, "aws_profile_name": "team")", {{"AWS_CONFIG_FILE", cfg}}) ==
        retry_mode::standard);
  CHECK(mode("", {{"AWS_CONFIG_FILE", cfg}}) == retry_mode::legacy);
}

TEST_CASE("an invalid AWS variable fails at load naming the variable", "[cli_config]") {
  const std::string text = bedrock(R"("aws_region": "us-east-1")");
  auto e = error_of(text, {{"AWS_MAX_ATTEMPTS", "many"}});
  CHECK(e.path() == "/config_list/0 (AWS_MAX_ATTEMPTS)");
  CHECK(e.message() == R"(expected an integer from 1 to 2147483647 (total attempts), got "many")");
  CHECK(error_of(text, {{"AWS_MAX_ATTEMPTS", "0"}}).path() == "/config_list/0 (AWS_MAX_ATTEMPTS)");
  // Over INT_MAX: the message said ">= 1", which the value is.
  CHECK_THAT(error_of(text, {{"AWS_MAX_ATTEMPTS", "3000000000"}}).message(),
             Catch::StartsWith("expected an integer from 1 to 2147483647"));
  auto m = error_of(text, {{"AWS_RETRY_MODE", "fast"}});
  CHECK(m.path() == "/config_list/0 (AWS_RETRY_MODE)");
  CHECK_THAT(m.message(), Catch::EndsWith(R"(got "fast")"));
}

TEST_CASE("config messages name a space in base_url and the bound of a huge number",
          "[cli_config][review]") {
  // A space in base_url is named, with where it is (and the URL is not echoed).
  const auto space = error_of(with_entry(R"("base_url": "https://api.example.com /v1")"));
  CHECK(space.path() == "/config_list/0/base_url");
  CHECK(space.message() ==
        "expected a URL without spaces or line breaks (percent-encode a space "
        "in a path as %20), got one at byte 23");
  // A Redis username without a password would log in as `default` unnoticed.
  const auto user = error_of(
      R"({"config_list": [{"model": "m", "api_key": "k"}],
          "policy": {"shared": {"redis": "redis://127.0.0.1:6379/0", "username": "app"}}})");
  CHECK(user.path() == "/policy/shared/username");
  CHECK_THAT(user.message(), Catch::Contains("KEEL_REDIS_PASSWORD"));
  // A number too large to be an integer is told the bound too.
  CHECK_THAT(error_of(with_entry(R"("total_max_attempts": 1e308)")).message(),
             Catch::StartsWith("expected an integer >= 1 and <= 2147483647"));
}

TEST_CASE("an invalid profile retry setting fails naming the profile and file", "[cli_config]") {
  temp_dir dir;
  const std::string cfg = dir.write("config", "[default]\nmax_attempts = lots\nretry_mode = x\n");
  auto e = error_of(bedrock(R"("aws_region": "us-east-1", "mode": "standard")"),
                    {{"AWS_CONFIG_FILE", cfg}});
  CHECK(e.path() == "/config_list/0 (max_attempts of profile \"default\" in " + cfg + ")");
  auto m = error_of(bedrock(R"("aws_region": "us-east-1")"), {{"AWS_CONFIG_FILE", cfg}});
  CHECK(m.path() == "/config_list/0 (retry_mode of profile \"default\" in " + cfg + ")");
}

// ---- credentials and region -----------------------------------------------------------------

TEST_CASE("bedrock credentials and region come from a named profile", "[cli_config]") {
  temp_dir dir;
  const std::string creds = dir.write("credentials",
                                      "# comment\n"
                                      "[default]\n"
                                      "aws_access_key_id = AKIADEFAULT000000000\n"
                                      "aws_secret_access_key = default-secret\n"
                                      "\n"
                                      "[dev]\n"
                                      "  aws_access_key_id=AKIADEV0000000000000  \n"
                                      "aws_secret_access_key = dev-secret\n"
                                      "; another comment\n"
                                      "aws_session_token = dev-token\n");
  const std::string cfg = dir.write("config",
                                    "[default]\n"
                                    "region = ap-south-1\n"
                                    "[profile dev]\n"
                                    "region = eu-west-1\n"
                                    "retry_mode = adaptive\n"
                                    "max_attempts = 7\n");
  const env_map files{{"AWS_SHARED_CREDENTIALS_FILE", creds}, {"AWS_CONFIG_FILE", cfg}};

  auto c = parse(bedrock(R"("aws_profile_name": "dev")"), files);
  const auto& e = c.entries[0];
  REQUIRE(e.aws);
  CHECK(e.aws->access_key == "AKIADEV0000000000000");
  CHECK(e.aws->secret_key == "dev-secret");
  CHECK(e.aws->session_token == "dev-token");
  CHECK(e.aws_credentials_source == "profile dev");
  CHECK(e.aws_region == "eu-west-1");
  REQUIRE(e.aws_retry);
  CHECK(e.aws_retry->mode == retry_mode::adaptive);
  CHECK(e.aws_retry->total_max_attempts == 7);

  // Entry credentials beat the profile; the profile still gives the region.
  auto inline_creds =
      parse(bedrock(R"("aws_profile_name": "dev", "aws_access_key": "AKIAINLINE0000000000",
                 "aws_secret_key": "inline-secret")"),
            files);
  CHECK(inline_creds.entries[0].aws_credentials_source == "config");
  CHECK(inline_creds.entries[0].aws->access_key == "AKIAINLINE0000000000");
  CHECK(inline_creds.entries[0].aws_region == "eu-west-1");

  // Without a profile name: the environment, then the default profile.
  env_map with_env = files;
  with_env["AWS_ACCESS_KEY_ID"] = "AKIAENV0000000000000";
  with_env["AWS_SECRET_ACCESS_KEY"] = "env-secret";
  with_env["AWS_SESSION_TOKEN"] = "env-token";
  auto from_env = parse(bedrock(), with_env);
  CHECK(from_env.entries[0].aws_credentials_source == "environment");
  CHECK(from_env.entries[0].aws->session_token == "env-token");
  CHECK(from_env.entries[0].aws_region == "ap-south-1");
  auto from_default = parse(bedrock(), files);
  CHECK(from_default.entries[0].aws_credentials_source == "profile default");
  CHECK(from_default.entries[0].aws->access_key == "AKIADEFAULT000000000");
}

TEST_CASE("AWS_PROFILE picks the profile; keys in the config file count; no silent fallback",
          "[cli_config][review]") {
  // Before: AWS_PROFILE was never read (keel signed as [default] in its region), keys kept in
  // ~/.aws/config were never used, and a named profile without keys fell back to the
  // environment's, which no SDK does.
  temp_dir dir;
  const std::string creds = dir.write("credentials",
                                      "[default]\n"
                                      "aws_access_key_id = AKIADEFAULT000000000\n"
                                      "aws_secret_access_key = default-secret\n"
                                      "[prod]\n"
                                      "aws_access_key_id = AKIAPROD000000000000\n"
                                      "aws_secret_access_key = prod-secret\n");
  const std::string cfg = dir.write("config",
                                    "[default]\nregion = us-east-1\n"
                                    "[profile prod]\nregion = eu-west-3\nretry_mode = standard\n"
                                    "[profile cfgonly]\nregion = ap-south-1\n"
                                    "aws_access_key_id = AKIACONFIGONLY000000\n"
                                    "aws_secret_access_key = cfg-secret\n"
                                    "[profile proc]\ncredential_process = /bin/true\n"
                                    "[profile regiononly]\nregion = us-west-2\n");
  const env_map files{{"AWS_SHARED_CREDENTIALS_FILE", creds}, {"AWS_CONFIG_FILE", cfg}};
  env_map prod = files;
  prod["AWS_PROFILE"] = "prod";
  const auto by_env = parse(bedrock(), prod).entries[0];
  CHECK(by_env.aws_credentials_source == "profile prod");
  CHECK(by_env.aws->access_key == "AKIAPROD000000000000");
  CHECK(by_env.aws_region == "eu-west-3");
  REQUIRE(by_env.aws_retry);
  CHECK(by_env.aws_retry->mode == retry_mode::standard);
  env_map legacy_name = files;
  legacy_name["AWS_DEFAULT_PROFILE"] = "prod";
  CHECK(parse(bedrock(), legacy_name).entries[0].aws_credentials_source == "profile prod");
  // The environment's keys still come before a profile named by the environment (botocore).
  env_map with_keys = prod;
  with_keys["AWS_ACCESS_KEY_ID"] = "AKIAENV0000000000000";
  with_keys["AWS_SECRET_ACCESS_KEY"] = "env-secret";
  CHECK(parse(bedrock(), with_keys).entries[0].aws_credentials_source == "environment");
  // Keys in the config file's section.
  const auto cfg_only = parse(bedrock(R"("aws_profile_name": "cfgonly")"), files).entries[0];
  CHECK(cfg_only.aws->access_key == "AKIACONFIGONLY000000");
  CHECK(cfg_only.aws_region == "ap-south-1");
  // A profile the entry names, without keys: not the environment's.
  env_map env_keys = files;
  env_keys["AWS_ACCESS_KEY_ID"] = "AKIAENV0000000000000";
  env_keys["AWS_SECRET_ACCESS_KEY"] = "env-secret";
  const auto region_only =
      parse(bedrock(R"("aws_profile_name": "regiononly")"), env_keys).entries[0];
  CHECK_FALSE(region_only.aws);
  CHECK(region_only.aws_region == "us-west-2");
  // A credential_process profile is an error, not a silent fallback or placeholder.
  const auto proc = error_of(bedrock(R"("aws_profile_name": "proc")"), env_keys);
  CHECK(proc.path() == "/config_list/0/aws_profile_name");
  CHECK_THAT(proc.message(), Catch::Contains("credential_process"));
  // A role with keys beside it: botocore assumes the role; keel cannot, so refuses.
  temp_dir more;
  const std::string role_cfg = more.write("config",
                                          "[default]\nregion = us-east-1\nsso_session = corp\n"
                                          "[profile role]\nrole_arn = arn:aws:iam::1:role/r\n"
                                          "aws_access_key_id = AKIABASE000000000000\n"
                                          "aws_secret_access_key = base-secret\n");
  const env_map roles{{"AWS_SHARED_CREDENTIALS_FILE", more.file("none")},
                      {"AWS_CONFIG_FILE", role_cfg}};
  CHECK_THAT(error_of(bedrock(R"("aws_profile_name": "role")"), roles).message(),
             Catch::Contains("role_arn"));
  // The implicit default profile with SSO: no credentials, and a mock config still loads.
  CHECK_FALSE(parse(bedrock(), roles).entries[0].aws);
  // A profile AWS_PROFILE names that is in neither file is an error naming the variable.
  env_map nope = files;
  nope["AWS_PROFILE"] = "nope";
  CHECK_THAT(std::string(error_of(bedrock(R"("aws_region": "us-east-1")"), nope).what()),
             Catch::Contains("(AWS_PROFILE)"));
}

TEST_CASE(
    "the region comes from aws_region then AWS_REGION then AWS_DEFAULT_REGION then the "
    "profile",
    "[cli_config]") {
  temp_dir dir;
  const std::string cfg = dir.write("config", "[default]\nregion = ap-south-1\n");
  const auto region = [&](const std::string& fields, env_map env) {
    env["AWS_CONFIG_FILE"] = cfg;
    return parse(bedrock(fields), std::move(env)).entries[0].aws_region;
  };
  const env_map both{{"AWS_REGION", "us-west-1"}, {"AWS_DEFAULT_REGION", "us-west-2"}};
  CHECK(region(R"("aws_region": "eu-north-1")", both) == "eu-north-1");
  CHECK(region("", both) == "us-west-1");
  CHECK(region("", {{"AWS_DEFAULT_REGION", "us-west-2"}}) == "us-west-2");
  CHECK(region("", {}) == "ap-south-1");
  // With a base_url a region is optional.
  auto c = parse(bedrock(R"("base_url": "http://127.0.0.1:8080")"));
  CHECK(c.entries[0].aws_region.empty());
}

TEST_CASE("a bad region names where it came from; a seed takes any 64-bit integer",
          "[cli_config][review]") {
  // Before: AWS_REGION's bad value was reported at /0/aws_region, which the file does not have,
  // and INT64_MAX was refused as a seed.
  const auto bad = error_of(bedrock(""), {{"AWS_REGION", "us east"}});
  CHECK_THAT(std::string(bad.what()), Catch::Contains("(AWS_REGION)"));
  CHECK(parse(R"([{"model": "m", "api_key": "k", "seed": 9223372036854775807}])").entries[0].seed ==
        std::optional<std::int64_t>(INT64_MAX));
  CHECK(error_of(R"([{"model": "m", "api_key": "k", "seed": 9223372036854775808}])").path() ==
        "/0/seed");
}

TEST_CASE("a bedrock entry without any credentials loads with none", "[cli_config]") {
  auto c = parse(bedrock(R"("aws_region": "us-east-1")"),
                 {{"AWS_ACCESS_KEY_ID", "AKIAONLYHALF00000000"}});
  CHECK_FALSE(c.entries[0].aws);
  CHECK(c.entries[0].aws_credentials_source.empty());
  CHECK(keel::llm::to_json(c)["config_list"][0]["aws_credentials_source"] == "");
}

TEST_CASE("a missing profile or a half key pair in a profile is an error", "[cli_config]") {
  temp_dir dir;
  const std::string creds =
      dir.write("credentials", "[half]\naws_access_key_id = AKIAHALF000000000000\n");
  const std::string cfg = dir.write("config", "[profile other]\nregion = us-east-1\n");
  const env_map files{{"AWS_SHARED_CREDENTIALS_FILE", creds}, {"AWS_CONFIG_FILE", cfg}};
  auto missing =
      error_of(bedrock(R"("aws_region": "us-east-1", "aws_profile_name": "nope")"), files);
  CHECK(missing.path() == "/config_list/0/aws_profile_name");
  CHECK_THAT(missing.message(), Catch::Contains(creds));
  auto half = error_of(bedrock(R"("aws_region": "us-east-1", "aws_profile_name": "half")"), files);
  CHECK(half.path() == "/config_list/0/aws_profile_name");
  CHECK_THAT(half.message(), Catch::Contains("got only aws_access_key_id"));
  CHECK_THAT(half.message(), !Catch::Contains("AKIAHALF"));
}

TEST_CASE("the INI reader skips comments and nested blocks and trims whitespace", "[cli_config]") {
  auto ini = keel::llm::parse_ini(
      "top = ignored\n"
      "[default]\n"
      "  Region   =   us-east-1  \r\n"
      "# region = wrong\n"
      "; region = wrong\n"
      "s3 =\n"
      "  max_concurrent_requests = 20\n"
      "output: json\n"
      "[ profile  dev ]\n"
      "region=eu-west-1\n");
  REQUIRE(ini.count("default") == 1);
  CHECK(ini["default"]["region"] == "us-east-1");
  CHECK(ini["default"]["s3"] == "");
  CHECK(ini["default"].count("max_concurrent_requests") == 0);
  CHECK(ini["default"]["output"] == "json");
  CHECK(ini.size() == 2);
  keel::llm::aws_shared_files files;
  files.config = ini;
  REQUIRE(files.config_profile("dev") != nullptr);
  CHECK(files.config_profile("dev")->at("region") == "eu-west-1");
  CHECK(files.config_profile("default")->at("region") == "us-east-1");
  CHECK(files.config_profile("prod") == nullptr);
  CHECK(keel::llm::read_ini_file("/nonexistent/keel/ini").empty());
}

// ---- secrets --------------------------------------------------------------------------------

TEST_CASE("secrets never appear in redacted JSON or in errors", "[cli_config]") {
  const std::vector<std::string> secrets{"sk-test-SECRET123", "sk-env-SECRET456",
                                         "AKIATESTSECRET789XYZ", "aws-secret-SECRET000",
                                         "session-SECRET111"};
  const env_map env{{"MY_OPENAI_KEY", "sk-env-SECRET456"}};
  const std::string good = R"({"config_list": [
      {"model": "a", "api_key": "sk-test-SECRET123"},
      {"api_type": "anthropic", "model": "b", "api_key_env": "MY_OPENAI_KEY"},
      {"api_type": "bedrock", "model": "c", "aws_region": "us-east-1",
       "aws_access_key": "AKIATESTSECRET789XYZ", "aws_secret_key": "aws-secret-SECRET000",
       "aws_session_token": "session-SECRET111"}]})";
  auto c = parse(good, env);
  const std::string redacted = keel::llm::to_json(c).dump();
  for (const auto& s : secrets) {
    INFO(s);
    CHECK(redacted.find(s) == std::string::npos);
  }
  auto j = keel::llm::to_json(c);
  CHECK(j["config_list"][0]["api_key"] == "<redacted>");
  CHECK(j["config_list"][1]["api_key"] == "<from $MY_OPENAI_KEY>");
  CHECK(j["config_list"][2]["aws_access_key"] == "<redacted>");
  CHECK(j["config_list"][2]["aws_secret_key"] == "<redacted>");
  CHECK(j["config_list"][2]["aws_session_token"] == "<redacted>");
  CHECK(j["config_list"][2]["aws_credentials_source"] == "config");
  const std::string plain = keel::llm::to_json(c, false).dump();
  for (const auto& s : secrets) {
    CHECK(plain.find(s) != std::string::npos);
  }

  const std::vector<std::string> bad{
      // A later mistake in a config that holds secrets.
      R"({"config_list": [{"model": "a", "api_key": "sk-test-SECRET123", "timeout": "abc"}]})",
      R"({"config_list": [{"model": "a", "api_key": "sk-test-SECRET123", "api_key_env": "MY_OPENAI_KEY"}]})",
      // A secret in the wrong place or of the wrong type.
      R"({"config_list": [{"model": "a", "api_key": ["sk-test-SECRET123"]}]})",
      R"({"config_list": [{"model": "a", "api_key": "k", "tags": "sk-test-SECRET123"}]})",
      R"({"config_list": [{"model": "sk-test-SECRET123", "api_key": "k", "mode": 1}]})",
      R"({"config_list": [{"model": "a", "apikey": "sk-test-SECRET123"}]})",
      R"({"config_list": [{"model": "a", "api_key_env": "sk-test-SECRET123"}]})",
      R"({"config_list": [{"model": "a", "api_key": "k", "base_url": "sk-test-SECRET123"}]})",
      R"({"config_list": [{"model": "a", "api_key": "k",
          "base_url": "https://me:sk-test-SECRET123@example.com"}]})",
      R"({"config_list": [{"api_type": "bedrock", "model": "c", "aws_region": "us-east-1",
          "aws_access_key": "AKIATESTSECRET789XYZ"}]})",
      R"({"config_list": [{"api_type": "bedrock", "model": "c", "aws_region": "us-east-1",
          "aws_secret_key": "aws-secret-SECRET000", "aws_session_token": 5}]})",
      R"({"config_list": [{"api_type": "bedrock", "model": "c", "aws_region": "us-east-1",
          "aws_access_key": "AKIATESTSECRET789XYZ", "aws_secret_key": ["aws-secret-SECRET000"]}]})",
      // Unterminated secret: the parser's "last read" must not leak it.
      R"({"config_list": [{"model": "a", "api_key": "sk-test-SECRET123)",
      "{\"config_list\": [{\"model\": \"a\", \"api_key\": \"sk-test-SECRET123\n\"}]}",
  };
  for (const auto& text : bad) {
    INFO(text);
    const auto e = error_of(text, env);
    const std::string what = e.what();
    for (const auto& s : secrets) {
      CHECK(what.find(s) == std::string::npos);
    }
  }
}

TEST_CASE("naming a backoff replaces the default immediate retry of transient failures",
          "[cli_config]") {
  const auto env = [](std::string_view) { return std::optional<std::string>{}; };
  const auto one = [&](const char* retry) {
    return keel::llm::parse_config(std::string(R"({"config_list": [{"model": "m", "api_key": "k"}],
                                                   "policy": {"retry": )") +
                                       retry + "}}",
                                   "<test>", env)
        .policy.retry;
  };
  CHECK(one(R"({"max_attempts": 3})").backoff_by_condition.count(keel::condition::transient) == 1);
  CHECK(one(R"({"backoff": {"kind": "constant", "base": 0.1}})").backoff_by_condition.empty());
  const auto by = one(R"({"backoff_by_condition": {"throttled": {"base": 2, "cap": 30}}})");
  CHECK(by.backoff_by_condition.size() == 1);
  CHECK(by.backoff_by_condition.count(keel::condition::throttled) == 1);
  // The key itself, on any curve.
  const auto imm = one(R"({"backoff": {"first_retry_immediate": true}})");
  CHECK(imm.backoff.first_retry_immediate);
  CHECK_THROWS_WITH(one(R"({"backoff": {"first_retry_immediate": 1}})"),
                    Catch::Contains("/policy/retry/backoff/first_retry_immediate"));
}

TEST_CASE("AG2 generation parameters and price are accepted and checked", "[cli_config]") {
  // An AG2 config list with these keys was refused as a whole (issue 13).
  const auto c = parse(R"([{"model": "gpt-4o", "api_key": "k", "temperature": 0.7, "top_p": 1,
                             "stop": ["\n\n", "END"], "seed": -3, "price": [0.0025, 0.01],
                             "max_tokens_field": "max_completion_tokens"},
                            {"model": "m2", "api_key": "k", "stop": "X"}])");
  const auto& e = c.entries.at(0);
  CHECK(e.temperature == 0.7);
  CHECK(e.top_p == 1.0);
  CHECK(e.stop == std::vector<std::string>{"\n\n", "END"});
  CHECK(e.seed == -3);
  REQUIRE(e.price);
  CHECK(e.price->first == 0.0025);
  CHECK(e.price->second == 0.01);
  CHECK(e.max_tokens_field == keel::llm::max_tokens_field::max_completion_tokens);
  CHECK(c.entries.at(1).stop == std::vector<std::string>{"X"});
  CHECK(c.entries.at(1).max_tokens_field == keel::llm::max_tokens_field::automatic);
  const auto printed = keel::llm::to_json(c, true);
  CHECK(printed.at("config_list").at(0).at("price") == nlohmann::json{0.0025, 0.01});
  CHECK(printed.at("config_list").at(0).at("max_tokens_field") == "max_completion_tokens");

  struct bad {
    const char* text;
    const char* path;
  };
  for (const bad& b : std::vector<bad>{
           {R"([{"model": "m", "api_key": "k", "temperature": 2.5}])", "/0/temperature"},
           {R"([{"model": "m", "api_key": "k", "top_p": "high"}])", "/0/top_p"},
           {R"([{"model": "m", "api_key": "k", "stop": []}])", "/0/stop"},
           {R"([{"model": "m", "api_key": "k", "stop": ["a", ""]}])", "/0/stop/1"},
           {R"([{"model": "m", "api_key": "k", "seed": 1.5}])", "/0/seed"},
           {R"([{"model": "m", "api_key": "k", "price": [1]}])", "/0/price"},
           {R"([{"model": "m", "api_key": "k", "price": [1, -2]}])", "/0/price/1"},
           {R"([{"model": "m", "api_key": "k", "max_tokens_field": "tokens"}])",
            "/0/max_tokens_field"},
       }) {
    INFO(b.text);
    CHECK(error_of(b.text).path() == b.path);
  }
}

TEST_CASE("an Anthropic entry's API version reaches its endpoint", "[cli_config]") {
  const auto c = parse(R"([{"api_type": "anthropic", "model": "m", "api_key": "k"},
                            {"api_type": "anthropic", "model": "m", "api_key": "k",
                             "anthropic_version": "2023-06-01"}])");
  CHECK(c.entries.at(0).endpoint().anthropic_version == "2026-10-21");
  CHECK(c.entries.at(1).endpoint().anthropic_version == "2023-06-01");
  CHECK(keel::llm::to_json(c, true).at("config_list").at(1).at("anthropic_version") ==
        "2023-06-01");
  CHECK(error_of(R"([{"api_type": "anthropic", "model": "m", "api_key": "k",
                     "anthropic_version": "latest"}])")
            .path() == "/0/anthropic_version");
}

// ---- values that end up in headers, URLs and TLS ------------------------------------------

TEST_CASE(
    "a credential with a control character is refused at load naming the field, not the value",
    "[cli_config]") {
  const std::string key = "sk-test-NEWLINE123";
  // Inline, with the newline a copy-paste or `echo` leaves.
  auto inline_key = error_of(R"([{"model": "a", "api_key": "k"}, {"model": "b", "api_key": ")" +
                             key + R"(\n"}])");
  CHECK(inline_key.path() == "/1/api_key");
  CHECK_THAT(inline_key.message(), Catch::Contains("a line feed (0x0a) at the end"));
  CHECK_THAT(inline_key.message(), Catch::Contains("HTTP header"));
  CHECK_THAT(std::string(inline_key.what()), !Catch::Contains(key));
  // From api_key_env (`export KEY=$(cat key.txt)` keeps no newline, `read` or a .env file may).
  auto from_env = error_of(R"([{"api_type": "anthropic", "model": "b", "api_key_env": "MY_KEY"}])",
                           {{"MY_KEY", key + "\r\n"}});
  CHECK(from_env.path() == "/0/api_key_env (the value of $MY_KEY)");
  CHECK_THAT(from_env.message(), Catch::Contains("a carriage return (0x0d)"));
  CHECK_THAT(std::string(from_env.what()), !Catch::Contains(key));
  // AWS credentials: inline, and from the environment.
  auto aws_inline = error_of(bedrock(R"("aws_region": "us-east-1",
      "aws_access_key": "AKIATESTCTRL00000000", "aws_secret_key": "aws-secret-\tCTRL000")"));
  CHECK(aws_inline.path() == "/config_list/0/aws_secret_key");
  CHECK_THAT(aws_inline.message(), Catch::Contains("a tab (0x09) inside it"));
  CHECK_THAT(std::string(aws_inline.what()), !Catch::Contains("CTRL000"));
  auto aws_env = error_of(bedrock(R"("aws_region": "us-east-1")"),
                          {{"AWS_ACCESS_KEY_ID", "AKIATESTCTRL00000000"},
                           {"AWS_SECRET_ACCESS_KEY", "env-secret-CTRL111"},
                           {"AWS_SESSION_TOKEN", "token-CTRL222\n"}});
  CHECK(aws_env.path() == "/config_list/0 (AWS_SESSION_TOKEN)");
  CHECK_THAT(std::string(aws_env.what()), !Catch::Contains("CTRL"));
  // The region goes into the host name.
  auto region = error_of(bedrock(), {{"AWS_REGION", "us-east-1\n"}});
  CHECK(region.path() == "/config_list/0 (AWS_REGION)");  // named where it came from
  // Clean values still load.
  CHECK(
      parse(R"([{"model": "a", "api_key_env": "MY_KEY"}])", {{"MY_KEY", key}}).entries[0].api_key ==
      key);
}

TEST_CASE("base_url query values never appear in the printed config or in errors", "[cli_config]") {
  auto c = parse(
      R"([{"model": "a", "api_key": "k", "base_url": "https://gw.example/v1?key=AIzaSECRET123&alt=json"}])");
  auto printed = keel::llm::to_json(c)["config_list"][0]["base_url"];
  CHECK(printed == "https://gw.example/v1?key=<redacted>&alt=<redacted>");
  CHECK(keel::llm::to_json(c, false)["config_list"][0]["base_url"] ==
        "https://gw.example/v1?key=AIzaSECRET123&alt=json");
  // An invalid base_url is echoed with its query values hidden.
  auto bad = error_of(
      R"([{"model": "a", "api_key": "k", "base_url": "https://gw.example:0/v1?key=AIzaSECRET123"}])");
  CHECK(bad.path() == "/0/base_url");
  CHECK_THAT(bad.message(), Catch::Contains("key=<redacted>"));
  CHECK_THAT(std::string(bad.what()), !Catch::Contains("AIzaSECRET123"));
}

TEST_CASE("ca_file must name a readable file and is printed", "[cli_config]") {
  temp_dir dir;
  const std::string pem = dir.write("ca.pem", "-----BEGIN CERTIFICATE-----\n");
  auto c = parse(R"([{"model": "a", "api_key": "k", "ca_file": ")" + pem + R"("},
                     {"model": "b", "api_key": "k"}])");
  CHECK(c.entries[0].ca_file == pem);
  CHECK(c.entries[1].ca_file.empty());
  CHECK(keel::llm::to_json(c)["config_list"][0]["ca_file"] == pem);
  CHECK(keel::llm::to_json(c)["config_list"][1]["ca_file"].is_null());
  auto missing =
      error_of(R"([{"model": "a", "api_key": "k", "ca_file": ")" + dir.file("nope.pem") + R"("}])");
  CHECK(missing.path() == "/0/ca_file");
  CHECK_THAT(missing.message(), Catch::Contains("No such file or directory"));
  auto directory =
      error_of(R"([{"model": "a", "api_key": "k", "ca_file": ")" + dir.file("") + R"("}])");
  CHECK_THAT(directory.message(), Catch::Contains("it is a directory"));
  CHECK(error_of(R"([{"model": "a", "api_key": "k", "ca_file": 3}])").path() == "/0/ca_file");
}

TEST_CASE("a config file that never ends is refused, not read into all memory",
          "[cli_config][review]") {
  // Before: /dev/zero grew until std::bad_alloc (no file named).
  try {
    (void)keel::llm::load_config("/dev/zero", env_of({}));
    FAIL("read");
  } catch (const keel::llm::config_error& e) {
    CHECK(std::string(e.what()).rfind("/dev/zero: ", 0) == 0);
    CHECK_THAT(e.message(), Catch::Contains("larger than 64 MiB"));
  }
}

TEST_CASE("a relative ca_file is taken from the config file's directory", "[cli_config]") {
  temp_dir dir;
  const std::string pem = dir.write("ca.pem", "-----BEGIN CERTIFICATE-----\n");
  const std::string file =
      dir.write("policy.json", R"([{"model": "a", "api_key": "k", "ca_file": "ca.pem"}])");
  // The working directory (the test's) holds no ca.pem: found beside the config, or refused.
  REQUIRE_FALSE(std::filesystem::exists("ca.pem"));
  const auto c = keel::llm::load_config(file, env_of({}));
  CHECK(std::filesystem::equivalent(c.entries[0].ca_file, pem));
  CHECK(std::filesystem::path(c.entries[0].ca_file).is_absolute() ==
        std::filesystem::path(file).is_absolute());
  // An absolute path is kept as written; parse_config (no file) keeps the working directory.
  const std::string abs =
      dir.write("abs.json", R"([{"model": "a", "api_key": "k", "ca_file": ")" + pem + R"("}])");
  CHECK(keel::llm::load_config(abs, env_of({})).entries[0].ca_file == pem);
  CHECK(error_of(R"([{"model": "a", "api_key": "k", "ca_file": "ca.pem"}])").path() ==
        "/0/ca_file");
}

TEST_CASE("the serve block reads each client's key digest and limits", "[cli_config]") {
  const std::string digest(64, 'A');
  const auto c = parse(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "serve": {"clients": [
      {"name": "svc-a", "key_sha256": ")" +
                       digest + R"(", "requests_per_minute": 600,
       "concurrency": 8},
      {"name": "svc-b", "key_sha256": ")" +
                       std::string(64, 'b') + R"("}]}})");
  REQUIRE(c.serve.clients.size() == 2);
  CHECK(c.serve.clients[0].name == "svc-a");
  CHECK(c.serve.clients[0].key_sha256 == std::string(64, 'a'));  // lowercased
  CHECK(c.serve.clients[0].requests_per_minute == 600);
  CHECK(c.serve.clients[0].concurrency == 8);
  CHECK(c.serve.clients[1].requests_per_minute == 0);
  // --print-config shows only the digest's start.
  const auto j = keel::llm::to_json(c);
  CHECK(j["serve"]["clients"][0]["key_sha256"] == "aaaaaaaa...");
  CHECK(j.dump().find(std::string(64, 'a')) == std::string::npos);
  CHECK(parse(R"({"config_list": [{"model": "m", "api_key": "k"}]})").serve.clients.empty());
}

TEST_CASE("a serve client with a key instead of its digest is refused without echoing it",
          "[cli_config]") {
  const auto e = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "serve": {"clients": [{"name": "a", "key_sha256": "sk-live-secret-key-123"}]}})");
  CHECK(e.path() == "/serve/clients/0/key_sha256");
  CHECK_THAT(e.message(), Catch::Contains("not the key"));
  CHECK(std::string(e.what()).find("sk-live-secret") == std::string::npos);

  const std::string d(64, 'c');
  const auto dup = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "serve": {"clients": [{"name": "a", "key_sha256": ")" +
                            d + R"("},
                          {"name": "b", "key_sha256": ")" +
                            d + R"("}]}})");
  CHECK(dup.path() == "/serve/clients/1/key_sha256");
  const auto unnamed = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "serve": {"clients": [{"key_sha256": ")" +
                                d + R"("}]}})");
  CHECK(unnamed.path() == "/serve/clients/0/name");
  const auto unknown = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "serve": {"clientz": []}})");
  CHECK(unknown.path() == "/serve/clientz");
}

TEST_CASE("the trace block names the collector, the sampling and the service", "[cli_config]") {
  const auto c = parse(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "trace": {"otlp_endpoint": "http://127.0.0.1:4318", "sample_ratio": 0.25,
              "service_name": "batch-jobs", "headers_env": "MY_OTLP_HEADERS", "timeout": 3,
              "xray_ids": true}})");
  CHECK(c.trace.otlp_endpoint == "http://127.0.0.1:4318");
  CHECK(c.trace.sample_ratio == 0.25);
  CHECK(c.trace.service_name == "batch-jobs");
  CHECK(c.trace.headers_env == "MY_OTLP_HEADERS");
  CHECK(c.trace.timeout == 3);
  CHECK(c.trace.xray_ids);
  CHECK(keel::llm::to_json(c)["trace"]["sample_ratio"] == 0.25);
  // Defaults: no endpoint (no export), everything sampled.
  const auto d = parse(R"({"config_list": [{"model": "m", "api_key": "k"}]})");
  CHECK(d.trace.otlp_endpoint.empty());
  CHECK(d.trace.sample_ratio == 1);
  CHECK(d.trace.headers_env == "OTEL_EXPORTER_OTLP_HEADERS");

  const auto ratio = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "trace": {"sample_ratio": 2}})");
  CHECK(ratio.path() == "/trace/sample_ratio");
  const auto scheme = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "trace": {"otlp_endpoint": "127.0.0.1:4318"}})");
  CHECK(scheme.path() == "/trace/otlp_endpoint");
  // Credentials in the URL are refused and not echoed.
  const auto creds = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "trace": {"otlp_endpoint": "https://user:hunter2pass@collector.example/v1/traces"}})");
  CHECK(creds.path() == "/trace/otlp_endpoint");
  CHECK(std::string(creds.what()).find("hunter2pass") == std::string::npos);
  // A URL the exporter could not use is refused at load (before: every span was lost at run
  // time), with a collector's token in the query never shown.
  for (const char* bad : {"http://", "http://h:99999/", "http://h:abc/",
                          "http://h/a b?token=T0KEN1", "http://h/x?token=T0KEN1#frag"}) {
    INFO(bad);
    const auto e = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
      "trace": {"otlp_endpoint": ")" +
                            std::string(bad) + R"("}})");
    CHECK(e.path() == "/trace/otlp_endpoint");
    CHECK(std::string(e.what()).find("T0KEN1") == std::string::npos);
  }
  const auto tokened = keel::llm::parse_config(
      R"({"config_list": [{"model": "m", "api_key": "k"}],
          "trace": {"otlp_endpoint": "http://127.0.0.1:4318/otlp?token=T0KEN1"}})",
      "<test>", [](std::string_view) { return std::optional<std::string>{}; });
  CHECK(keel::llm::to_json(tokened, true).dump().find("T0KEN1") == std::string::npos);
  boost::asio::io_context io;
  keel::http::client http(io.get_executor(), {});
  CHECK(keel::otlp::http_exporter(http, tokened.trace.otlp_endpoint).url() ==
        "http://127.0.0.1:4318/otlp/v1/traces?token=T0KEN1");  // before: ...?token=T0KEN1/v1/traces
  const auto unknown = error_of(R"({"config_list": [{"model": "m", "api_key": "k"}],
    "trace": {"endpoint": "http://x"}})");
  CHECK(unknown.path() == "/trace/endpoint");
}
