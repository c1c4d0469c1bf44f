// The config parser: typed values with their JSON paths, and the `policy` block.
#include "config_parser.hpp"

#include <keel/llm/error.hpp>
#include <keel/llm/json_depth.hpp>

#include <algorithm>
#include <cctype>

namespace keel::llm::detail {

client_config parser::run(const json& doc) {
  client_config c;
  c.source = source_;
  const json* list = nullptr;
  std::string list_path;
  if (doc.is_array()) {
    list = &doc;
  } else if (doc.is_object()) {
    check_keys(doc, "", {"config_list", "policy", "serve", "trace"});
    if (const auto it = doc.find("policy"); it != doc.end()) {
      c.policy = parse_policy(*it, "/policy");
    }
    if (const auto it = doc.find("serve"); it != doc.end()) {
      c.serve = parse_serve(*it, "/serve");
    }
    if (const auto it = doc.find("trace"); it != doc.end()) {
      c.trace = parse_trace(*it, "/trace");
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

void parser::fail(const std::string& path, std::string_view expected, std::string_view got) const {
  throw config_error(source_, path,
                     "expected " + std::string(expected) + ", got " + std::string(got));
}

void parser::expect_object(const json& j, const std::string& path) const {
  if (!j.is_object()) {
    fail(path, "an object", shown(j));
  }
}

void parser::check_keys(const json& j, const std::string& path,
                        std::initializer_list<std::string_view> allowed) const {
  expect_object(j, path);
  for (const auto& [key, value] : j.items()) {
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
      std::string list;
      for (auto a : allowed) {
        list += (list.empty() ? "" : ", ") + std::string(a);
      }
      // A key that looks like a credential (a key pasted as a name) is masked in the path too.
      const std::string shown_key = echo_text(key);
      const bool masked = shown_key.find("[redacted]") != std::string::npos;
      fail(child(path, masked ? std::string_view("[redacted]") : std::string_view(key)),
           "one of the keys " + list, "unknown key " + shown_key);
    }
  }
}

double parser::number(const json& j, const std::string& path, const num_range& r) const {
  if (!j.is_number()) {
    fail(path, r.describe("a number", false), shown(j));
  }
  const double v = j.get<double>();
  if (!r.contains(v)) {
    fail(path, r.describe("a number", !r.hi_shown && v > r.lo), shown(j));
  }
  return v;
}

long long parser::integer(const json& j, const std::string& path, const num_range& r) const {
  if (!j.is_number_integer()) {
    // A number past the bound (1e308) is told the bound too, not only that it is no integer.
    fail(path, r.describe("an integer", !r.hi_shown && j.is_number() && j.get<double>() > r.hi),
         shown(j));
  }
  const bool huge = j.is_number_unsigned() && j.get<std::uint64_t>() > LLONG_MAX;
  const long long v = huge ? LLONG_MAX : j.get<long long>();
  if (huge || !r.contains(static_cast<double>(v))) {
    fail(path, r.describe("an integer", !r.hi_shown && v > r.lo), shown(j));
  }
  return v;
}

// AG2's `stop`: one string or an array of them, none empty.
std::vector<std::string> parser::stop_sequences(const json& j, const std::string& path) const {
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

bool parser::boolean(const json& j, const std::string& path) const {
  if (!j.is_boolean()) {
    fail(path, "true or false", shown(j));
  }
  return j.get<bool>();
}

std::string parser::string(const json& j, const std::string& path) const {
  if (!j.is_string() || j.get_ref<const std::string&>().empty()) {
    fail(path, "a non-empty string", shown(j));
  }
  return j.get<std::string>();
}

// Like string(), but the value is never echoed.
std::string parser::secret(const json& j, const std::string& path) const {
  if (!j.is_string() || j.get_ref<const std::string&>().empty()) {
    fail(path, "a non-empty string", type_only(j));
  }
  return j.get<std::string>();
}

// A secret that is sent in an HTTP header (API key, AWS credentials) must not hold a control
// character; `where` names the field (or the variable or profile it came from), never the value.
void parser::header_safe(const std::string& where, std::string_view value) const {
  if (const std::string c = control_character_in(value); !c.empty()) {
    fail(where,
         "a value without control characters (it is sent in an HTTP header; a trailing "
         "newline from an environment variable or a file?)",
         "a value with " + c + " (not shown)");
  }
}

std::string parser::choice(const json& j, const std::string& path,
                           std::initializer_list<std::string_view> options) const {
  if (j.is_string()) {
    const auto& s = j.get_ref<const std::string&>();
    if (std::find(options.begin(), options.end(), s) != options.end()) {
      return s;
    }
  }
  fail(path, join_quoted(options, "or"), shown(j));
}

keel::backoff parser::parse_backoff(const json& j, const std::string& path, keel::backoff b) const {
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

retry_config parser::parse_retry(const json& j, const std::string& path) const {
  check_keys(
      j, path,
      {"max_attempts", "backoff", "backoff_by_condition", "honour_retry_after", "max_retry_after"});
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

breaker_config parser::parse_breaker(const json& j, const std::string& path) const {
  check_keys(
      j, path,
      {"enabled", "failure_threshold", "break", "break_growth", "max_break", "unanswered_grace"});
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
    } else if (key == "unanswered_grace") {
      b.unanswered_grace = number(v, p, seconds_non_negative);
    }
  }
  if (b.max_break < b.break_duration) {
    if (j.contains("max_break")) {
      fail(child(path, "max_break"), "a number >= break (" + format_number(b.break_duration) + ")",
           shown(j["max_break"]));
    }
    fail(child(path, "break"), "a number <= max_break (" + format_number(b.max_break) + ")",
         shown(j["break"]));
  }
  return b;
}

budget_config parser::parse_budget(const json& j, const std::string& path) const {
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

hedge_config parser::parse_hedge(const json& j, const std::string& path) const {
  check_keys(j, path,
             {"enabled", "max_attempts", "delay", "percentile", "min_samples", "budget_ratio",
              "budget_capacity", "target"});
  hedge_config h;
  for (const auto& [key, v] : j.items()) {
    const std::string p = child(path, key);
    if (key == "enabled") {
      h.enabled = boolean(v, p);
    } else if (key == "max_attempts") {
      h.max_attempts = static_cast<int>(integer(v, p, {2, false, 10, false, true}));
    } else if (key == "delay") {
      h.delay = number(v, p, seconds_positive);
    } else if (key == "percentile") {
      h.percentile = number(v, p, {0, false, 100, false, true});
    } else if (key == "min_samples") {
      h.min_samples = static_cast<int>(integer(v, p, {1, false, 1024, false, true}));
    } else if (key == "budget_ratio") {
      h.budget_ratio = number(v, p, {0, false, 1, false, true});
    } else if (key == "budget_capacity") {
      h.budget_capacity = number(v, p, {0, false, 1e6});
    } else if (key == "target") {
      h.to_next = choice(v, p, {"same", "next"}) == "next";
    }
  }
  return h;
}

rate_limit_config parser::parse_rate_limits(const json& j, const std::string& path) const {
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

serve_config parser::parse_serve(const json& j, const std::string& path) const {
  check_keys(j, path, {"clients"});
  serve_config sc;
  const auto it = j.find("clients");
  if (it == j.end()) {
    return sc;
  }
  const std::string list = child(path, "clients");
  if (!it->is_array()) {
    fail(list, "an array of clients", shown(*it));
  }
  for (std::size_t i = 0; i < it->size(); ++i) {
    const json& cj = (*it)[i];
    const std::string cp = child(list, i);
    check_keys(cj, cp, {"name", "key_sha256", "requests_per_minute", "concurrency"});
    serve_client c;
    for (const auto& [key, v] : cj.items()) {
      const std::string p = child(cp, key);
      if (key == "name") {
        c.name = string(v, p);
      } else if (key == "key_sha256") {
        // A digest, never the key: a 64-digit hex string, so that a key pasted here by mistake
        // is refused (and not echoed).
        if (!v.is_string()) {
          fail(p, "the SHA-256 of the key as 64 hex digits", shown(v));
        }
        std::string h = v.get<std::string>();
        const bool hex = h.size() == 64 && std::all_of(h.begin(), h.end(), [](char ch) {
                           return std::isxdigit(static_cast<unsigned char>(ch)) != 0;
                         });
        if (!hex) {
          fail(p,
               "the SHA-256 of the key as 64 hex digits (printf %s \"$KEY\" | sha256sum), not "
               "the key",
               "a string of " + std::to_string(h.size()) + " characters (not shown)");
        }
        std::transform(h.begin(), h.end(), h.begin(),
                       [](char ch) { return static_cast<char>(std::tolower(ch)); });
        c.key_sha256 = std::move(h);
      } else if (key == "requests_per_minute") {
        c.requests_per_minute = number(v, p, rate_non_negative);
      } else if (key == "concurrency") {
        c.concurrency = static_cast<int>(integer(v, p, {0, false, 1000000}));
      }
    }
    if (c.name.empty()) {
      fail(child(cp, "name"), "a non-empty name",
           c.name.empty() && cj.contains("name") ? "\"\"" : "nothing");
    }
    if (c.key_sha256.empty()) {
      fail(child(cp, "key_sha256"), "the SHA-256 of the key as 64 hex digits", "nothing");
    }
    for (const serve_client& other : sc.clients) {
      if (other.name == c.name) {
        fail(child(cp, "name"), "a name no other client has", echo_text(c.name));
      }
      if (other.key_sha256 == c.key_sha256) {
        fail(child(cp, "key_sha256"), "a key no other client has",
             "the key of " + echo_text(other.name));
      }
    }
    sc.clients.push_back(std::move(c));
  }
  return sc;
}

trace_config parser::parse_trace(const json& j, const std::string& path) const {
  check_keys(
      j, path,
      {"otlp_endpoint", "sample_ratio", "service_name", "headers_env", "timeout", "xray_ids"});
  trace_config tc;
  for (const auto& [key, v] : j.items()) {
    const std::string p = child(path, key);
    if (key == "otlp_endpoint") {
      tc.otlp_endpoint = string(v, p);
      const std::string& e = tc.otlp_endpoint;
      const std::size_t scheme = e.find("://");
      const std::size_t host = scheme == std::string::npos ? 0 : scheme + 3;
      const std::size_t path_at = e.find_first_of("/?#", host);
      const std::string authority =
          e.substr(host, path_at == std::string::npos ? std::string::npos : path_at - host);
      if (authority.find('@') != std::string::npos) {
        // Credentials in the URL would be printed with it: not echoed, and refused.
        fail(p, "a URL without user:password@ (put credentials in the headers_env variable)",
             "a URL with credentials (not shown)");
      }
      if (!e.empty() && !keel::http::valid_url(e)) {
        // Checked here as base_url is: a URL the exporter cannot use lost every span at run
        // time. Shown with its query values redacted (a collector's token).
        fail(p, "an http:// or https:// URL with a host and an optional port 1-65535 (or \"\")",
             echo_text(keel::http::redact_url(e)));
      }
      if (e.find('#') != std::string::npos) {
        fail(p, "a URL without a #fragment",
             echo_text(keel::http::redact_url(e.substr(0, e.find('#'))) + "#..."));
      }
    } else if (key == "sample_ratio") {
      tc.sample_ratio = number(v, p, {0, false, 1, false, true});
    } else if (key == "service_name") {
      tc.service_name = string(v, p);
      if (tc.service_name.empty()) {
        fail(p, "a non-empty name", "\"\"");
      }
    } else if (key == "headers_env") {
      tc.headers_env = string(v, p);
    } else if (key == "timeout") {
      tc.timeout = number(v, p, seconds_positive);
    } else if (key == "xray_ids") {
      tc.xray_ids = boolean(v, p);
    }
  }
  return tc;
}

namespace {

// The shape keel::redis::parse_url accepts (minus credentials, refused before): the scheme,
// a host, an optional port 1-65535 and an optional database number, nothing else.
bool redis_url_ok(std::string_view url) {
  for (std::string_view scheme : {"redis://", "rediss://"}) {
    if (url.substr(0, scheme.size()) == scheme) {
      url.remove_prefix(scheme.size());
      if (url.find_first_of("?#") != std::string_view::npos) {
        return false;
      }
      const auto all_digits = [](std::string_view d) {
        return !d.empty() && d.size() <= 9 &&
               std::all_of(d.begin(), d.end(), [](char c) { return c >= '0' && c <= '9'; });
      };
      std::string_view hostport = url.substr(0, url.find('/'));
      if (const auto slash = url.find('/'); slash != std::string_view::npos) {
        const std::string_view db = url.substr(slash + 1);
        if (!db.empty() && !all_digits(db)) {
          return false;
        }
      }
      if (const auto colon = hostport.rfind(':');
          colon != std::string_view::npos && hostport.find(']', colon) == std::string_view::npos) {
        const std::string_view port = hostport.substr(colon + 1);
        if (!all_digits(port) || std::stoul(std::string(port)) == 0 ||
            std::stoul(std::string(port)) > 65535) {
          return false;
        }
        hostport = hostport.substr(0, colon);
      }
      if (hostport.size() >= 2 && hostport.front() == '[' && hostport.back() == ']') {
        hostport = hostport.substr(1, hostport.size() - 2);
      } else if (hostport.find_first_of(":[]") != std::string_view::npos) {
        return false;  // an IPv6 address not bracketed (redis://::1/0 is host "::", port 1)
      }
      return !hostport.empty();
    }
  }
  return false;
}

}  // namespace

shared_config parser::parse_shared(const json& j, const std::string& path) const {
  check_keys(j, path,
             {"redis", "key_prefix", "username", "password_env", "timeout", "lease_window",
              "fleet_size", "ca_file", "breaker_sync", "probe_timeout", "rate_sync"});
  shared_config sc;
  for (const auto& [key, v] : j.items()) {
    const std::string p = child(path, key);
    if (key == "redis") {
      if (v.is_string() && v.get_ref<const std::string&>().empty()) {
        continue;  // "": off (what --print-config shows when it is)
      }
      sc.redis = string(v, p);
      if (sc.redis.find('@') != std::string::npos) {
        // First, and never echoed: it holds a credential (whatever else is wrong with it).
        fail(p,
             "a URL without credentials (put the password in the environment variable named by "
             "password_env)",
             "a URL with credentials");
      }
      if (!redis_url_ok(sc.redis)) {
        // Checked here as keel::redis::parse_url checks it when the run starts, so that a
        // config that loads is one that runs. Not echoed: a password put in the path, query or
        // fragment by mistake would be printed.
        fail(p,
             "a redis://host[:port][/db] or rediss:// (TLS) URL: a host (an IPv6 address in "
             "brackets), a port 1-65535, a database number, no query or fragment",
             "a URL not of that form (not shown: it may hold a credential)");
      }
    } else if (key == "key_prefix") {
      sc.key_prefix = string(v, p);
    } else if (key == "password_env") {
      sc.password_env = string(v, p);
    } else if (key == "username") {
      if (v.is_string() && v.get_ref<const std::string&>().empty()) {
        continue;  // "": the default user (what --print-config shows)
      }
      sc.username = string(v, p);
    } else if (key == "timeout") {
      sc.timeout = number(v, p, seconds_positive);
    } else if (key == "lease_window") {
      sc.lease_window = number(v, p, seconds_positive);
    } else if (key == "breaker_sync") {
      sc.breaker_sync = number(v, p, seconds_positive);
    } else if (key == "probe_timeout") {
      sc.probe_timeout = number(v, p, seconds_positive);
    } else if (key == "rate_sync") {
      sc.rate_sync = number(v, p, seconds_positive);
    } else if (key == "ca_file") {
      if (v.is_string() && v.get_ref<const std::string&>().empty()) {
        continue;  // "": the system's trust store (what --print-config shows)
      }
      sc.ca_file = string(v, p);
    } else if (key == "fleet_size") {
      sc.fleet_size = static_cast<int>(integer(v, p, {0, false, 100000, false, true}));
    }
  }
  if (!sc.redis.empty()) {
    if (auto pw = env_(sc.password_env); pw && !pw->empty()) {
      sc.password = *pw;
    }
    if (!sc.username.empty() && sc.password.empty()) {
      // Without a password no AUTH is sent, and the fleet would log in as `default` unnoticed.
      fail(child(path, "username"), "a password in $" + sc.password_env + " with a username",
           "none set");
    }
  }
  return sc;
}

policy_config parser::parse_policy(const json& j, const std::string& path) const {
  check_keys(j, path,
             {"retry", "deadline", "breaker", "retry_budget", "rate_limits", "concurrency", "queue",
              "stream", "hedge", "shared"});
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
    } else if (key == "stream") {
      check_keys(v, p, {"first_token_timeout", "idle_timeout", "restartable"});
      for (const auto& [skey, sv] : v.items()) {
        const std::string sp = child(p, skey);
        if (skey == "first_token_timeout") {
          pc.stream.first_token_timeout = number(sv, sp, seconds_non_negative);
        } else if (skey == "idle_timeout") {
          pc.stream.idle_timeout = number(sv, sp, seconds_non_negative);
        } else if (skey == "restartable") {
          pc.stream.restartable = boolean(sv, sp);
        }
      }
    } else if (key == "hedge") {
      pc.hedge = parse_hedge(v, p);
    } else if (key == "shared") {
      pc.shared = parse_shared(v, p);
    }
  }
  return pc;
}

}  // namespace keel::llm::detail
