// Parsing and validation of keel::llm::client_config (AG2 config_list + policy).
#include <keel/llm/config.hpp>

#include <keel/llm/aws_shared_files.hpp>

#include <keel/http/client.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/json_depth.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <sstream>
#include <utility>

namespace keel::llm {

namespace {

using json = nlohmann::json;

// Durations and rates have no natural upper bound, but a value such as 1e300 seconds would
// overflow the std::chrono conversions downstream; these limits are far beyond any sane setting.
constexpr double max_seconds = 31536000;  // one year
constexpr double max_rate = 1e12;
constexpr std::size_t max_echo = 40;

// A config's seconds (validated: 0 to max_seconds) as a keel duration, and back.
std::chrono::nanoseconds seconds_ns(double s) {
  return std::chrono::nanoseconds{static_cast<long long>(std::llround(s * 1e9))};
}
double to_seconds(std::chrono::nanoseconds d) {
  return static_cast<double>(d.count()) / 1e9;
}

// JSON pointers of children; nlohmann's json_pointer does the RFC 6901 escaping, so that a key
// such as "meta/llama" still yields an unambiguous path.
std::string child(const std::string& path, std::string_view key) {
  return (nlohmann::json::json_pointer(path) / std::string(key)).to_string();
}

std::string child(const std::string& path, std::size_t index) {
  return (nlohmann::json::json_pointer(path) / index).to_string();
}

// Truncates to at most `max` bytes without splitting a UTF-8 sequence.
std::string truncated(std::string s, std::size_t max) {
  if (s.size() <= max) {
    return s;
  }
  std::size_t cut = max;
  while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) {
    --cut;
  }
  s.resize(cut);
  return s + "...";
}

// A value as it may appear in an error: JSON text, truncated, and with anything that looks like
// a credential masked (a key pasted into the wrong field must not leak through its echo).
std::string shown(const json& v) {
  return keel::llm::redact(
      truncated(v.dump(-1, ' ', false, json::error_handler_t::replace), max_echo), max_echo + 8);
}

std::string echo_text(std::string_view s) {
  return shown(json(std::string(s)));
}

// A value's type only, for secrets: "got a number".
std::string type_only(const json& v) {
  if (v.is_string()) {
    return v.get_ref<const std::string&>().empty() ? "an empty string" : "a string";
  }
  if (v.is_number()) {
    return "a number";
  }
  if (v.is_boolean()) {
    return "a boolean";
  }
  if (v.is_null()) {
    return "null";
  }
  return v.is_array() ? "an array" : "an object";
}

// Where a secret holds a control character, described without showing the value: a key read
// from an environment variable or a file often ends with a newline, which no HTTP header may
// carry (the request would fail at send time, on every item). Empty when there is none.
std::string control_character_in(std::string_view s) {
  const auto bad = [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; };
  const auto it = std::find_if(s.begin(), s.end(), bad);
  if (it == s.end()) {
    return "";
  }
  const unsigned char c = static_cast<unsigned char>(*it);
  std::string name = c == '\n'   ? "a line feed"
                     : c == '\r' ? "a carriage return"
                     : c == '\t' ? "a tab"
                     : c == 0    ? "a NUL byte"
                                 : "a control character";
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02x", c);
  name += std::string(" (") + hex + ")";
  const auto last = std::find_if(s.rbegin(), s.rend(), bad);
  if (last == s.rbegin()) {
    return name + " at the end";
  }
  return name + (it == s.begin() ? " at the start" : " inside it");
}

std::string format_number(double v) {
  if (std::isfinite(v) && std::floor(v) == v && std::fabs(v) < 1e15) {
    return std::to_string(static_cast<long long>(v));
  }
  std::ostringstream os;
  os << v;
  return os.str();
}

std::string join_quoted(std::initializer_list<std::string_view> options, std::string_view last) {
  std::string out;
  std::size_t i = 0;
  for (auto o : options) {
    if (i > 0) {
      out += (i + 1 == options.size()) ? std::string(" ") + std::string(last) + " " : ", ";
    }
    out += "\"" + std::string(o) + "\"";
    ++i;
  }
  return out;
}

// A numeric range: [lo, hi] with open ends as flagged. `hi_shown` false means hi is only a
// sanity limit, mentioned when it is exceeded.
struct num_range {
  double lo;
  bool lo_open;
  double hi;
  bool hi_open = false;
  bool hi_shown = false;

  bool contains(double v) const {
    return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  }

  std::string describe(std::string_view what, bool mention_hi) const {
    if (hi_shown) {
      return std::string(what) + " in " + (lo_open ? "(" : "[") + format_number(lo) + ", " +
             format_number(hi) + (hi_open ? ")" : "]");
    }
    std::string s = std::string(what) + (lo_open ? " > " : " >= ") + format_number(lo);
    if (mention_hi) {
      s += std::string(" and ") + (hi_open ? "< " : "<= ") + format_number(hi);
    }
    return s;
  }
};

constexpr num_range seconds_positive{0, true, max_seconds};
constexpr num_range seconds_non_negative{0, false, max_seconds};
constexpr num_range rate_non_negative{0, false, max_rate};
constexpr num_range growth_factor{1, false, 1e6};

// One validation pass over a document; every failure throws config_error naming the pointer.
class parser {
 public:
  // `base_dir`: where relative paths in the document are taken from ("": the working directory).
  parser(std::string source, const env_lookup& env, std::filesystem::path base_dir = {})
      : source_(std::move(source)), env_(env), base_dir_(std::move(base_dir)) {}

  client_config run(const json& doc) {
    client_config c;
    c.source = source_;
    const json* list = nullptr;
    std::string list_path;
    if (doc.is_array()) {
      list = &doc;
    } else if (doc.is_object()) {
      check_keys(doc, "", {"config_list", "policy"});
      if (const auto it = doc.find("policy"); it != doc.end()) {
        c.policy = parse_policy(*it, "/policy");
      }
      list_path = "/config_list";
      const auto it = doc.find("config_list");
      if (it == doc.end()) {
        fail(list_path, "a non-empty array of entries", "nothing");
      }
      list = &*it;
    } else {
      fail("", "an array of entries or an object with \"config_list\"", shown(doc));
    }
    if (!list->is_array() || list->empty()) {
      fail(list_path, "a non-empty array of entries", shown(*list));
    }
    for (std::size_t i = 0; i < list->size(); ++i) {
      c.entries.push_back(parse_entry((*list)[i], child(list_path, i), c.policy));
    }
    return c;
  }

 private:
  [[noreturn]] void fail(const std::string& path, std::string_view expected,
                         std::string_view got) const {
    throw config_error(source_, path,
                       "expected " + std::string(expected) + ", got " + std::string(got));
  }

  void expect_object(const json& j, const std::string& path) const {
    if (!j.is_object()) {
      fail(path, "an object", shown(j));
    }
  }

  void check_keys(const json& j, const std::string& path,
                  std::initializer_list<std::string_view> allowed) const {
    expect_object(j, path);
    for (const auto& [key, value] : j.items()) {
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
        std::string list;
        for (auto a : allowed) {
          list += (list.empty() ? "" : ", ") + std::string(a);
        }
        fail(child(path, key), "one of the keys " + list, "unknown key " + echo_text(key));
      }
    }
  }

  double number(const json& j, const std::string& path, const num_range& r) const {
    if (!j.is_number()) {
      fail(path, r.describe("a number", false), shown(j));
    }
    const double v = j.get<double>();
    if (!r.contains(v)) {
      fail(path, r.describe("a number", !r.hi_shown && v > r.lo), shown(j));
    }
    return v;
  }

  long long integer(const json& j, const std::string& path, const num_range& r) const {
    if (!j.is_number_integer()) {
      fail(path, r.describe("an integer", false), shown(j));
    }
    const bool huge = j.is_number_unsigned() && j.get<std::uint64_t>() > LLONG_MAX;
    const long long v = huge ? LLONG_MAX : j.get<long long>();
    if (huge || !r.contains(static_cast<double>(v))) {
      fail(path, r.describe("an integer", !r.hi_shown && v > r.lo), shown(j));
    }
    return v;
  }

  // AG2's `stop`: one string or an array of them, none empty.
  std::vector<std::string> stop_sequences(const json& j, const std::string& path) const {
    if (j.is_string()) {
      return {string(j, path)};
    }
    if (!j.is_array() || j.empty()) {
      fail(path, "a non-empty string or a non-empty array of them", shown(j));
    }
    std::vector<std::string> out;
    for (std::size_t i = 0; i < j.size(); ++i) {
      out.push_back(string(j[i], child(path, i)));
    }
    return out;
  }

  bool boolean(const json& j, const std::string& path) const {
    if (!j.is_boolean()) {
      fail(path, "true or false", shown(j));
    }
    return j.get<bool>();
  }

  std::string string(const json& j, const std::string& path) const {
    if (!j.is_string() || j.get_ref<const std::string&>().empty()) {
      fail(path, "a non-empty string", shown(j));
    }
    return j.get<std::string>();
  }

  // Like string(), but the value is never echoed.
  std::string secret(const json& j, const std::string& path) const {
    if (!j.is_string() || j.get_ref<const std::string&>().empty()) {
      fail(path, "a non-empty string", type_only(j));
    }
    return j.get<std::string>();
  }

  // A secret that is sent in an HTTP header (API key, AWS credentials) must not hold a control
  // character; `where` names the field (or the variable or profile it came from), never the value.
  void header_safe(const std::string& where, std::string_view value) const {
    if (const std::string c = control_character_in(value); !c.empty()) {
      fail(where,
           "a value without control characters (it is sent in an HTTP header; a trailing "
           "newline from an environment variable or a file?)",
           "a value with " + c + " (not shown)");
    }
  }

  std::string choice(const json& j, const std::string& path,
                     std::initializer_list<std::string_view> options) const {
    if (j.is_string()) {
      const auto& s = j.get_ref<const std::string&>();
      if (std::find(options.begin(), options.end(), s) != options.end()) {
        return s;
      }
    }
    fail(path, join_quoted(options, "or"), shown(j));
  }

  // ---- policy ---------------------------------------------------------------------------------

  keel::backoff parse_backoff(const json& j, const std::string& path, keel::backoff b) const {
    check_keys(j, path, {"kind", "base", "cap", "jitter", "multiplier", "first_retry_immediate"});
    bool immediate = false;
    double base = to_seconds(b.base);
    double cap = to_seconds(b.cap);
    for (const auto& [key, v] : j.items()) {
      const std::string p = child(path, key);
      if (key == "kind") {
        const std::string kind = choice(v, p, {"exponential", "linear", "constant", "immediate"});
        immediate = kind == "immediate";
        if (!immediate) {
          b.shape = *keel::parse_backoff_shape(kind);
        }
      } else if (key == "base") {
        base = number(v, p, seconds_non_negative);
      } else if (key == "cap") {
        cap = number(v, p, seconds_non_negative);
      } else if (key == "jitter") {
        b.jitter = *keel::parse_jitter(
            choice(v, p, {"none", "full", "equal", "decorrelated", "decorrelated_v2"}));
      } else if (key == "multiplier") {
        b.multiplier = number(v, p, growth_factor);
      } else if (key == "first_retry_immediate") {
        b.first_retry_immediate = boolean(v, p);
      }
    }
    if (cap < base) {
      if (j.contains("cap")) {
        fail(child(path, "cap"), "a number >= base (" + format_number(base) + ")", shown(j["cap"]));
      }
      fail(child(path, "base"), "a number <= cap (" + format_number(cap) + ")", shown(j["base"]));
    }
    if (immediate) {
      const bool first = b.first_retry_immediate;
      b = keel::backoff::immediate();
      b.first_retry_immediate = first;
      return b;
    }
    b.base = seconds_ns(base);
    b.cap = seconds_ns(cap);
    return b;
  }

  retry_config parse_retry(const json& j, const std::string& path) const {
    check_keys(j, path,
               {"max_attempts", "backoff", "backoff_by_condition", "honour_retry_after",
                "max_retry_after"});
    retry_config r;
    if (j.contains("backoff") || j.contains("backoff_by_condition")) {
      r.backoff_by_condition.clear();  // a named curve replaces the default immediate retry
    }
    // `backoff` first: the per-condition curves start from it whatever the key order.
    if (const auto it = j.find("backoff"); it != j.end()) {
      r.backoff = parse_backoff(*it, child(path, "backoff"), r.backoff);
    }
    for (const auto& [key, v] : j.items()) {
      const std::string p = child(path, key);
      if (key == "max_attempts") {
        r.max_attempts = static_cast<int>(integer(v, p, {1, false, INT_MAX}));
      } else if (key == "backoff_by_condition") {
        check_keys(v, p, {"throttled", "transient", "timeout"});
        for (const auto& [cond, curve] : v.items()) {
          r.backoff_by_condition[*keel::parse_condition(cond)] =
              parse_backoff(curve, child(p, cond), r.backoff);
        }
      } else if (key == "honour_retry_after") {
        r.honour_retry_after = boolean(v, p);
      } else if (key == "max_retry_after") {
        r.max_retry_after = number(v, p, seconds_non_negative);
      }
    }
    return r;
  }

  breaker_config parse_breaker(const json& j, const std::string& path) const {
    check_keys(j, path, {"enabled", "failure_threshold", "break", "break_growth", "max_break"});
    breaker_config b;
    for (const auto& [key, v] : j.items()) {
      const std::string p = child(path, key);
      if (key == "enabled") {
        b.enabled = boolean(v, p);
      } else if (key == "failure_threshold") {
        b.failure_threshold = static_cast<int>(integer(v, p, {1, false, INT_MAX}));
      } else if (key == "break") {
        b.break_duration = number(v, p, seconds_positive);
      } else if (key == "break_growth") {
        b.break_growth = number(v, p, growth_factor);
      } else if (key == "max_break") {
        b.max_break = number(v, p, seconds_positive);
      }
    }
    if (b.max_break < b.break_duration) {
      if (j.contains("max_break")) {
        fail(child(path, "max_break"),
             "a number >= break (" + format_number(b.break_duration) + ")", shown(j["max_break"]));
      }
      fail(child(path, "break"), "a number <= max_break (" + format_number(b.max_break) + ")",
           shown(j["break"]));
    }
    return b;
  }

  budget_config parse_budget(const json& j, const std::string& path) const {
    check_keys(j, path, {"enabled", "max_tokens", "token_ratio"});
    budget_config b;
    for (const auto& [key, v] : j.items()) {
      const std::string p = child(path, key);
      if (key == "enabled") {
        b.enabled = boolean(v, p);
      } else if (key == "max_tokens") {
        b.max_tokens = number(v, p, {0, true, 1e9});
      } else if (key == "token_ratio") {
        b.token_ratio = number(v, p, {0, true, 1, false, true});
      }
    }
    return b;
  }

  rate_limit_config parse_rate_limits(const json& j, const std::string& path) const {
    check_keys(j, path, {"requests_per_minute", "tokens_per_minute", "burst"});
    rate_limit_config r;
    for (const auto& [key, v] : j.items()) {
      const std::string p = child(path, key);
      if (key == "requests_per_minute") {
        r.requests_per_minute = number(v, p, rate_non_negative);
      } else if (key == "tokens_per_minute") {
        r.tokens_per_minute = number(v, p, rate_non_negative);
      } else if (key == "burst") {
        r.burst = number(v, p, rate_non_negative);
      }
    }
    return r;
  }

  policy_config parse_policy(const json& j, const std::string& path) const {
    check_keys(
        j, path,
        {"retry", "deadline", "breaker", "retry_budget", "rate_limits", "concurrency", "queue"});
    policy_config pc;
    for (const auto& [key, v] : j.items()) {
      const std::string p = child(path, key);
      if (key == "retry") {
        pc.retry = parse_retry(v, p);
      } else if (key == "deadline") {
        pc.deadline = number(v, p, seconds_positive);
      } else if (key == "breaker") {
        pc.breaker = parse_breaker(v, p);
      } else if (key == "retry_budget") {
        pc.retry_budget = parse_budget(v, p);
      } else if (key == "rate_limits") {
        pc.rate_limits = parse_rate_limits(v, p);
      } else if (key == "concurrency") {
        pc.concurrency = static_cast<int>(integer(v, p, {1, false, 100000, false, true}));
      } else if (key == "queue") {
        check_keys(v, p, {"max_wait"});
        if (const auto it = v.find("max_wait"); it != v.end()) {
          pc.queue_max_wait = number(*it, child(p, "max_wait"), seconds_non_negative);
        }
      }
    }
    return pc;
  }

  // ---- entries --------------------------------------------------------------------------------

  const aws_shared_files& shared_files() {
    if (!shared_files_) {
      shared_files_ = load_aws_shared_files(env_);
    }
    return *shared_files_;
  }

  // A variable's value when it is set and non-empty.
  std::optional<std::string> env_value(std::string_view name) const {
    auto v = env_(name);
    if (v && v->empty()) {
      return std::nullopt;
    }
    return v;
  }

  static std::optional<std::string> ini_value(const ini_section* s, const std::string& key) {
    if (s == nullptr) {
      return std::nullopt;
    }
    const auto it = s->find(key);
    if (it == s->end()) {
      return std::nullopt;
    }
    return it->second;
  }

  std::string files_description() {
    const auto& f = shared_files();
    if (f.credentials_path.empty() && f.config_path.empty()) {
      return "the AWS shared files (none: HOME is not set)";
    }
    return f.credentials_path + " or " + f.config_path;
  }

  entry_config parse_entry(const json& j, const std::string& path, const policy_config& policy) {
    check_keys(j, path,
               {"api_type",
                "model",
                "base_url",
                "api_key",
                "api_key_env",
                "aws_region",
                "aws_access_key",
                "aws_secret_key",
                "aws_session_token",
                "aws_profile_name",
                "total_max_attempts",
                "max_attempts",
                "mode",
                "timeout",
                "response_format",
                "requests_per_minute",
                "tokens_per_minute",
                "tags",
                "temperature",
                "top_p",
                "stop",
                "seed",
                "max_tokens_field",
                "anthropic_version",
                "price",
                "ca_file"});
    entry_config e;
    e.rate_limits = policy.rate_limits;
    e.max_attempts = policy.retry.max_attempts;
    std::string type_name = "openai";
    std::optional<std::string> api_key;
    std::optional<std::string> access_key;
    std::optional<std::string> secret_key;
    std::optional<std::string> session_token;
    keel::aws::retry_config_input retry_in;

    for (const auto& [key, v] : j.items()) {
      const std::string p = child(path, key);
      if (key == "api_type") {
        type_name = choice(v, p, {"openai", "anthropic", "bedrock"});
      } else if (key == "model") {
        e.model = string(v, p);
      } else if (key == "base_url") {
        if (!v.is_string()) {
          fail(p, "a string (an http:// or https:// URL, or \"\")", shown(v));
        }
        e.base_url = v.get<std::string>();
        if (!e.base_url.empty() && !keel::http::valid_url(e.base_url)) {
          // A password in the URL is not echoed back.
          const auto authority = e.base_url.substr(0, e.base_url.find_first_of("/?#", 8));
          fail(p,
               "an http:// or https:// URL with a host, an optional port 1-65535 and no "
               "user:password@ (or \"\")",
               authority.find('@') != std::string::npos
                   ? "a URL with user:password@ (not shown)"
                   : shown(json(keel::http::redact_url(e.base_url))));
        }
      } else if (key == "api_key") {
        api_key = secret(v, p);
      } else if (key == "api_key_env") {
        e.api_key_env = string(v, p);
      } else if (key == "aws_region") {
        e.aws_region = string(v, p);
      } else if (key == "aws_access_key") {
        access_key = secret(v, p);
      } else if (key == "aws_secret_key") {
        secret_key = secret(v, p);
      } else if (key == "aws_session_token") {
        session_token = secret(v, p);
      } else if (key == "aws_profile_name") {
        e.aws_profile_name = string(v, p);
      } else if (key == "total_max_attempts") {
        retry_in.total_max_attempts = integer(v, p, {1, false, INT_MAX});
      } else if (key == "max_attempts") {
        retry_in.max_attempts = integer(v, p, {0, false, INT_MAX - 1});
      } else if (key == "mode") {
        retry_in.mode = choice(v, p, {"legacy", "standard", "adaptive"});
      } else if (key == "timeout") {
        e.timeout = number(v, p, seconds_positive);
      } else if (key == "response_format") {
        expect_object(v, p);
        e.response_format = v;
      } else if (key == "temperature") {
        e.temperature = number(v, p, {0, false, 2, false, true});
      } else if (key == "top_p") {
        e.top_p = number(v, p, {0, false, 1, false, true});
      } else if (key == "stop") {
        e.stop = stop_sequences(v, p);
      } else if (key == "seed") {
        e.seed = integer(v, p, {-9.2e18, false, 9.2e18, false, false});
      } else if (key == "anthropic_version") {
        const std::string ver = string(v, p);
        const bool date = ver.size() == 10 && ver[4] == '-' && ver[7] == '-' &&
                          std::all_of(ver.begin(), ver.end(),
                                      [](char c) { return c == '-' || (c >= '0' && c <= '9'); });
        if (!date) {
          fail(p, "an API version date such as \"2023-06-01\"", shown(v));
        }
        e.anthropic_version = ver;
      } else if (key == "max_tokens_field") {
        const std::string f = choice(v, p, {"auto", "max_tokens", "max_completion_tokens"});
        e.max_tokens_field = f == "max_tokens" ? keel::llm::max_tokens_field::max_tokens
                             : f == "max_completion_tokens"
                                 ? keel::llm::max_tokens_field::max_completion_tokens
                                 : keel::llm::max_tokens_field::automatic;
      } else if (key == "price") {
        if (!v.is_array() || v.size() != 2) {
          fail(p, "[dollars per 1,000 input tokens, dollars per 1,000 output tokens]", shown(v));
        }
        e.price = std::pair{number(v[0], child(p, 0), {0, false, 1e6, false, true}),
                            number(v[1], child(p, 1), {0, false, 1e6, false, true})};
      } else if (key == "requests_per_minute") {
        e.rate_limits.requests_per_minute = number(v, p, rate_non_negative);
      } else if (key == "tokens_per_minute") {
        e.rate_limits.tokens_per_minute = number(v, p, rate_non_negative);
      } else if (key == "ca_file") {
        e.ca_file = string(v, p);
        if (!e.ca_file.empty() && !base_dir_.empty() &&
            std::filesystem::path(e.ca_file).is_relative()) {
          // Beside the config file, as a config's own paths are meant, wherever keel runs from.
          e.ca_file = (base_dir_ / e.ca_file).lexically_normal().string();
        }
        if (const std::string why = unreadable_file(e.ca_file); !why.empty()) {
          fail(p, "a readable PEM file of trusted CA certificates",
               echo_text(e.ca_file) + " (" + why + ")");
        }
      } else if (key == "tags") {
        if (!v.is_array()) {
          fail(p, "an array of strings", shown(v));
        }
        for (std::size_t i = 0; i < v.size(); ++i) {
          if (!v[i].is_string()) {
            fail(child(p, i), "a string", shown(v[i]));
          }
          e.tags.push_back(v[i].get<std::string>());
        }
      }
    }
    if (e.model.empty()) {
      fail(child(path, "model"), "a non-empty string (the key is required)", "nothing");
    }
    e.api_type = type_name == "anthropic" ? keel::llm::provider_kind::anthropic
                 : type_name == "bedrock" ? keel::llm::provider_kind::bedrock
                                          : keel::llm::provider_kind::openai;
    const bool bedrock = e.api_type == keel::llm::provider_kind::bedrock;

    if (bedrock) {
      if (api_key || !e.api_key_env.empty()) {
        fail(child(path, api_key ? "api_key" : "api_key_env"),
             "no API key on a bedrock entry (Bedrock signs requests with AWS credentials)", "one");
      }
      resolve_aws(path, e, std::move(access_key), std::move(secret_key), std::move(session_token));
    } else {
      for (const char* k : {"aws_access_key", "aws_secret_key", "aws_session_token"}) {
        if (j.contains(k)) {
          fail(child(path, k), "no AWS credentials on an entry of api_type " + type_name, "some");
        }
      }
      resolve_api_key(path, e, std::move(api_key), type_name);
    }

    if (bedrock || retry_in.mode) {
      e.aws_retry = resolve_aws_retry(path, e, retry_in);
      e.max_attempts = e.aws_retry->total_max_attempts;
    } else if (retry_in.total_max_attempts) {
      e.max_attempts = static_cast<int>(*retry_in.total_max_attempts);
    } else if (retry_in.max_attempts) {
      e.max_attempts = static_cast<int>(*retry_in.max_attempts) + 1;
    }
    return e;
  }

  void resolve_api_key(const std::string& path, entry_config& e, std::optional<std::string> key,
                       const std::string& type_name) const {
    if (key && !e.api_key_env.empty()) {
      fail(child(path, "api_key_env"), "at most one of api_key and api_key_env", "both");
    }
    if (key) {
      header_safe(child(path, "api_key"), *key);
      e.api_key = std::move(*key);
      return;
    }
    if (e.api_key_env.empty()) {
      fail(child(path, "api_key"), "api_key or api_key_env (one is required for " + type_name + ")",
           "neither");
    }
    const auto value = env_(e.api_key_env);
    if (!value || value->empty()) {
      fail(child(path, "api_key_env"), "the name of a set, non-empty environment variable",
           echo_text(e.api_key_env) + (value ? " (empty)" : " (unset)"));
    }
    header_safe(child(path, "api_key_env") + " (the value of $" + e.api_key_env + ")", *value);
    e.api_key = *value;
  }

  void resolve_aws(const std::string& path, entry_config& e, std::optional<std::string> access_key,
                   std::optional<std::string> secret_key,
                   std::optional<std::string> session_token) {
    // Credentials: the entry, then the named profile, then the environment, then the default
    // profile (botocore's order once an explicit profile is set aside). None at all is fine at
    // load time: the mock server does not check signatures, and a real call fails loudly.
    if (access_key || secret_key || session_token) {
      if (!access_key || !secret_key) {
        const char* missing = !access_key ? "aws_access_key" : "aws_secret_key";
        fail(child(path, missing),
             "a non-empty string (aws_access_key and aws_secret_key go together)", "nothing");
      }
      e.aws = keel::llm::aws_credentials(std::move(*access_key), std::move(*secret_key),
                                         session_token.value_or(""));
      e.aws_credentials_source = "config";
    }
    if (!e.aws_profile_name.empty()) {
      const auto& f = shared_files();
      const ini_section* creds = f.credentials_profile(e.aws_profile_name);
      if (creds == nullptr && f.config_profile(e.aws_profile_name) == nullptr) {
        fail(child(path, "aws_profile_name"), "a profile of " + files_description(),
             echo_text(e.aws_profile_name));
      }
      if (!e.aws) {
        e.aws = profile_credentials(child(path, "aws_profile_name"), creds, e.aws_profile_name,
                                    f.credentials_path);
        if (e.aws) {
          e.aws_credentials_source = "profile " + e.aws_profile_name;
        }
      }
    }
    if (!e.aws) {
      auto id = env_value("AWS_ACCESS_KEY_ID");
      auto key = env_value("AWS_SECRET_ACCESS_KEY");
      if (id && key) {
        e.aws = keel::llm::aws_credentials(std::move(*id), std::move(*key),
                                           env_value("AWS_SESSION_TOKEN").value_or(""));
        e.aws_credentials_source = "environment";
      }
    }
    if (!e.aws && e.aws_profile_name.empty()) {
      const auto& f = shared_files();
      e.aws = profile_credentials(path + " (profile \"default\")", f.credentials_profile("default"),
                                  "default", f.credentials_path);
      if (e.aws) {
        e.aws_credentials_source = "profile default";
      }
    }

    if (e.aws) {
      // Named by where they came from; the values are never shown.
      const auto where = [&](std::string_view entry_key, std::string_view variable,
                             std::string_view profile_key) {
        if (e.aws_credentials_source == "config") {
          return child(path, entry_key);
        }
        if (e.aws_credentials_source == "environment") {
          return path + " (" + std::string(variable) + ")";
        }
        return path + " (" + std::string(profile_key) + " of " + e.aws_credentials_source + ")";
      };
      header_safe(where("aws_access_key", "AWS_ACCESS_KEY_ID", "aws_access_key_id"),
                  e.aws->access_key);
      header_safe(where("aws_secret_key", "AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
                  e.aws->secret_key);
      header_safe(where("aws_session_token", "AWS_SESSION_TOKEN", "aws_session_token"),
                  e.aws->session_token);
    }

    // Region: the entry, AWS_REGION, AWS_DEFAULT_REGION, then the profile's `region`.
    if (e.aws_region.empty()) {
      if (auto r = env_value("AWS_REGION")) {
        e.aws_region = *r;
      } else if (auto d = env_value("AWS_DEFAULT_REGION")) {
        e.aws_region = *d;
      } else {
        const std::string profile =
            e.aws_profile_name.empty() ? std::string("default") : e.aws_profile_name;
        if (auto pr = ini_value(shared_files().config_profile(profile), "region");
            pr && !pr->empty()) {
          e.aws_region = *pr;
        }
      }
    }
    // The region becomes part of the host name and of the signature's scope.
    if (!e.aws_region.empty() && !std::all_of(e.aws_region.begin(), e.aws_region.end(), [](char c) {
          return std::isalnum(static_cast<unsigned char>(c)) || c == '-';
        })) {
      fail(child(path, "aws_region"),
           "a region name of letters, digits and '-' (from aws_region, AWS_REGION, "
           "AWS_DEFAULT_REGION or the AWS profile's region)",
           shown(json(e.aws_region)));
    }
    if (e.aws_region.empty() && e.base_url.empty()) {
      fail(child(path, "aws_region"),
           "a region for a bedrock entry without base_url (aws_region, AWS_REGION, "
           "AWS_DEFAULT_REGION or the AWS profile's region)",
           "nothing");
    }
  }

  std::optional<keel::llm::aws_credentials> profile_credentials(const std::string& where,
                                                                const ini_section* s,
                                                                const std::string& profile,
                                                                const std::string& file) const {
    auto id = ini_value(s, "aws_access_key_id");
    auto key = ini_value(s, "aws_secret_access_key");
    if (id && id->empty()) {
      id.reset();
    }
    if (key && key->empty()) {
      key.reset();
    }
    if (!id && !key) {
      return std::nullopt;
    }
    if (!id || !key) {
      fail(where,
           "both aws_access_key_id and aws_secret_access_key in profile " + echo_text(profile) +
               " of " + file,
           std::string("only ") + (id ? "aws_access_key_id" : "aws_secret_access_key"));
    }
    return keel::llm::aws_credentials(std::move(*id), std::move(*key),
                                      ini_value(s, "aws_session_token").value_or(""));
  }

  keel::aws::resolved_retry_config resolve_aws_retry(const std::string& path, const entry_config& e,
                                                     const keel::aws::retry_config_input& in) {
    // Only the winning source is read, so the shared files stay untouched when the entry and
    // the environment settle both values.
    const auto env_mode = env_("AWS_RETRY_MODE");
    const auto env_max = env_("AWS_MAX_ATTEMPTS");
    // The 2.1 switch: revision 2.1 and `standard` as the default mode ("true" only, as the SDKs).
    const auto env_new_retries = env_("AWS_NEW_RETRIES_2026");
    const std::string profile =
        e.aws_profile_name.empty() ? std::string("default") : e.aws_profile_name;
    std::optional<std::string> profile_mode;
    std::optional<std::string> profile_max;
    if (!in.mode && !env_mode) {
      // (With 2.1 on the default is `standard`, but the profile still wins over the default.)
      profile_mode = ini_value(shared_files().config_profile(profile), "retry_mode");
    }
    if (!in.total_max_attempts && !in.max_attempts && !env_max) {
      profile_max = ini_value(shared_files().config_profile(profile), "max_attempts");
    }
    const auto profile_path = [&](std::string_view setting) {
      return path + " (" + std::string(setting) + " of profile " + echo_text(profile) + " in " +
             shared_files().config_path + ")";
    };

    // Resolve the mode alone first so that a failure can be pinned on the right source.
    keel::aws::retry_config_input mode_only;
    mode_only.mode = in.mode;
    try {
      (void)keel::aws::resolve_retry_config(mode_only, env_mode, std::nullopt, profile_mode,
                                            std::nullopt, env_new_retries);
    } catch (const std::invalid_argument&) {
      const std::string where = env_mode ? path + " (AWS_RETRY_MODE)" : profile_path("retry_mode");
      fail(where, join_quoted({"legacy", "standard", "adaptive"}, "or"),
           echo_text(env_mode ? *env_mode : profile_mode.value_or("")));
    }
    try {
      return keel::aws::resolve_retry_config(in, env_mode, env_max, profile_mode, profile_max,
                                             env_new_retries);
    } catch (const std::invalid_argument&) {
      // Entry values were range-checked above, so the culprit is the variable or the profile.
      const std::string where =
          env_max ? path + " (AWS_MAX_ATTEMPTS)" : profile_path("max_attempts");
      fail(where, "an integer >= 1 (total attempts)",
           echo_text(env_max ? *env_max : profile_max.value_or("")));
    }
  }

  std::string source_;
  const env_lookup& env_;
  std::filesystem::path base_dir_;
  std::optional<aws_shared_files> shared_files_;
};

// 1-based line and column of the byte nlohmann reports (the count of bytes read when the
// error was detected, so the offending byte is the one before it).
std::pair<std::size_t, std::size_t> line_column(std::string_view text, std::size_t bytes_read) {
  const std::size_t at = std::min(bytes_read > 0 ? bytes_read - 1 : 0, text.size());
  std::size_t line = 1;
  std::size_t line_start = 0;
  for (std::size_t i = 0; i < at; ++i) {
    if (text[i] == '\n') {
      ++line;
      line_start = i + 1;
    }
  }
  return {line, at - line_start + 1};
}

// nlohmann's description without its prefix, and without "last read: '...'", which quotes the
// document (possibly an unterminated secret).
std::string parse_error_detail(const std::string& what) {
  std::string_view w = what;
  if (const auto col = w.find("column "); col != std::string_view::npos) {
    if (const auto colon = w.find(": ", col); colon != std::string_view::npos) {
      w.remove_prefix(colon + 2);
    }
  } else if (const auto bracket = w.find("] "); bracket != std::string_view::npos) {
    w.remove_prefix(bracket + 2);
  }
  std::string out(w);
  if (const auto last = out.find("; last read"); last != std::string::npos) {
    const auto expected = out.rfind("; expected ");
    std::string tail = expected != std::string::npos && expected > last ? out.substr(expected) : "";
    out = out.substr(0, last) + tail;
  }
  return keel::llm::redact(out, 200);
}

json redacted_or(bool redact, const std::string& value, const char* mask = "<redacted>") {
  return redact ? json(mask) : json(value);
}

json backoff_json(const keel::backoff& b) {
  const bool immediate = b.shape == keel::backoff_shape::constant && b.base.count() == 0;
  return {{"kind", immediate ? std::string_view("immediate") : keel::to_string(b.shape)},
          {"base", to_seconds(b.base)},
          {"cap", to_seconds(b.cap)},
          {"jitter", keel::to_string(b.jitter)},
          {"multiplier", b.multiplier},
          {"first_retry_immediate", b.first_retry_immediate}};
}

}  // namespace

keel::backoff default_backoff() {
  return keel::backoff::exponential(std::chrono::milliseconds(500), std::chrono::seconds(20),
                                    keel::jitter::full, 2.0);
}

keel::backoff default_transient_backoff() {
  keel::backoff b = default_backoff();
  b.first_retry_immediate = true;
  return b;
}

std::string unreadable_file(const std::string& path) {
  if (std::error_code ec; std::filesystem::is_directory(path, ec)) {
    return "it is a directory";
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    return err != 0 ? std::strerror(err) : "cannot be opened";
  }
  return "";
}

config_error::config_error(std::string source, std::string path, std::string message)
    : std::runtime_error(path.empty() ? source + ": " + message
                                      : source + ": " + path + ": " + message),
      path_(std::move(path)),
      message_(std::move(message)) {}

env_lookup process_env() {
  return [](std::string_view name) -> std::optional<std::string> {
    if (const char* v = std::getenv(std::string(name).c_str())) {
      return std::string(v);
    }
    return std::nullopt;
  };
}

std::string entry_config::name() const {
  return std::string(keel::llm::to_string(api_type)) + "/" + model;
}

keel::llm::endpoint entry_config::endpoint() const {
  keel::llm::endpoint ep(api_type, base_url, api_key, aws_region);
  if (!anthropic_version.empty()) {
    ep.anthropic_version = anthropic_version;
  }
  return ep;
}

namespace {

client_config parse_text(std::string_view text, const std::string& source, const env_lookup& env,
                         const std::filesystem::path& base_dir) {
  if (const auto deep = keel::llm::json_too_deep_at(text); deep != std::string_view::npos) {
    const auto [line, column] = line_column(text, deep + 1);
    throw config_error(source, "",
                       "JSON nested deeper than " + std::to_string(keel::llm::max_json_depth) +
                           " levels at line " + std::to_string(line) + ", column " +
                           std::to_string(column));
  }
  json doc;
  try {
    doc = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    const auto [line, column] = line_column(text, e.byte);
    throw config_error(source, "",
                       "invalid JSON at line " + std::to_string(line) + ", column " +
                           std::to_string(column) + ": " + parse_error_detail(e.what()));
  } catch (const json::exception& e) {
    // Valid syntax the parser still refuses, e.g. a number too large for a double ("1e400").
    throw config_error(source, "", std::string("invalid JSON: ") + e.what());
  }
  return parser(source, env, base_dir).run(doc);
}

}  // namespace

client_config parse_config(std::string_view text, const std::string& source,
                           const env_lookup& env) {
  return parse_text(text, source, env, {});
}

client_config load_config(const std::string& file, const env_lookup& env) {
  if (std::error_code ec; std::filesystem::is_directory(file, ec)) {
    throw config_error(file, "", "cannot read the config file: it is a directory");
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    const int err = errno;
    throw config_error(file, "",
                       std::string("cannot read the config file: ") +
                           (err != 0 ? std::strerror(err) : "open failed"));
  }
  std::ostringstream os;
  os << in.rdbuf();
  if (in.bad()) {
    throw config_error(file, "", "cannot read the config file");
  }
  // A relative ca_file is taken from the config file's directory.
  const std::filesystem::path dir = std::filesystem::path(file).parent_path();
  return parse_text(os.str(), file, env, dir.empty() ? std::filesystem::path(".") : dir);
}

nlohmann::json to_json(const client_config& c, bool redact) {
  json entries = json::array();
  for (const auto& e : c.entries) {
    json j;
    j["name"] = e.name();
    j["api_type"] = std::string(keel::llm::to_string(e.api_type));
    j["model"] = e.model;
    // A key can ride in the query (`?key=...`): its values are never printed.
    j["base_url"] = redact ? keel::http::redact_url(e.base_url) : e.base_url;
    if (e.api_type == keel::llm::provider_kind::bedrock) {
      j["aws_region"] = e.aws_region;
      j["aws_credentials_source"] = e.aws_credentials_source;
      if (e.aws) {
        j["aws_access_key"] = redacted_or(redact, e.aws->access_key);
        j["aws_secret_key"] = redacted_or(redact, e.aws->secret_key);
        if (!e.aws->session_token.empty()) {
          j["aws_session_token"] = redacted_or(redact, e.aws->session_token);
        }
      }
    } else {
      if (e.api_key_env.empty()) {
        j["api_key"] = redacted_or(redact, e.api_key);
      } else {
        const std::string mask = "<from $" + e.api_key_env + ">";
        j["api_key"] = redacted_or(redact, e.api_key, mask.c_str());
        j["api_key_env"] = e.api_key_env;
      }
      if (!e.aws_region.empty()) {
        j["aws_region"] = e.aws_region;
      }
    }
    if (!e.aws_profile_name.empty()) {
      j["aws_profile_name"] = e.aws_profile_name;
    }
    j["timeout"] = e.timeout ? json(*e.timeout) : json(nullptr);
    if (e.response_format) {
      j["response_format"] = *e.response_format;
    }
    if (e.temperature) {
      j["temperature"] = *e.temperature;
    }
    if (e.top_p) {
      j["top_p"] = *e.top_p;
    }
    if (!e.stop.empty()) {
      j["stop"] = e.stop;
    }
    if (e.seed) {
      j["seed"] = *e.seed;
    }
    if (e.api_type == keel::llm::provider_kind::anthropic) {
      j["anthropic_version"] = e.anthropic_version.empty()
                                   ? std::string(keel::llm::anthropic_current_version)
                                   : e.anthropic_version;
    }
    if (e.api_type == keel::llm::provider_kind::openai) {
      j["max_tokens_field"] =
          e.max_tokens_field == keel::llm::max_tokens_field::max_tokens ? "max_tokens"
          : e.max_tokens_field == keel::llm::max_tokens_field::max_completion_tokens
              ? "max_completion_tokens"
              : "auto";
    }
    if (e.price) {
      j["price"] = {e.price->first, e.price->second};
    }
    j["ca_file"] = e.ca_file.empty() ? json(nullptr) : json(e.ca_file);
    j["tags"] = e.tags;
    j["rate_limits"] = {{"requests_per_minute", e.rate_limits.requests_per_minute},
                        {"tokens_per_minute", e.rate_limits.tokens_per_minute},
                        {"burst", e.rate_limits.burst}};
    if (e.aws_retry) {
      j["retry"] = {
          {"algorithm", "aws"},
          {"mode", std::string(keel::aws::to_string(e.aws_retry->mode))},
          {"total_max_attempts", e.aws_retry->total_max_attempts},
          {"revision", e.aws_retry->revision == keel::aws::retry_revision::v2_1 ? "2.1" : "2.0"}};
    } else {
      j["retry"] = {{"algorithm", "keel"}, {"max_attempts", e.max_attempts}};
    }
    entries.push_back(std::move(j));
  }

  const auto& p = c.policy;
  json by_condition = json::object();
  for (const auto& [cond, b] : p.retry.backoff_by_condition) {
    by_condition[std::string(keel::to_string(cond))] = backoff_json(b);
  }
  json policy = {
      {"retry",
       {{"max_attempts", p.retry.max_attempts},
        {"backoff", backoff_json(p.retry.backoff)},
        {"backoff_by_condition", by_condition},
        {"honour_retry_after", p.retry.honour_retry_after},
        {"max_retry_after", p.retry.max_retry_after}}},
      {"deadline", p.deadline},
      {"breaker",
       {{"enabled", p.breaker.enabled},
        {"failure_threshold", p.breaker.failure_threshold},
        {"break", p.breaker.break_duration},
        {"break_growth", p.breaker.break_growth},
        {"max_break", p.breaker.max_break}}},
      {"retry_budget",
       {{"enabled", p.retry_budget.enabled},
        {"max_tokens", p.retry_budget.max_tokens},
        {"token_ratio", p.retry_budget.token_ratio}}},
      {"rate_limits",
       {{"requests_per_minute", p.rate_limits.requests_per_minute},
        {"tokens_per_minute", p.rate_limits.tokens_per_minute},
        {"burst", p.rate_limits.burst}}},
      {"concurrency", p.concurrency},
      {"queue", {{"max_wait", p.queue_max_wait}}},
  };
  return {{"source", c.source}, {"config_list", std::move(entries)}, {"policy", std::move(policy)}};
}

}  // namespace keel::llm
