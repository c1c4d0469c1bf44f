// Private to lib/llm: the config parser shared by config.cpp (documents and the public
// functions), config_parser.cpp (values and the policy block) and config_entry.cpp (entries, the
// API key and the AWS credential, region and retry-mode chains).
#pragma once

#include <keel/http/client.hpp>
#include <keel/llm/aws_shared_files.hpp>
#include <keel/llm/config.hpp>
#include <keel/llm/error.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::llm::detail {

using json = nlohmann::json;

// Durations and rates have no natural upper bound, but a value such as 1e300 seconds would
// overflow the std::chrono conversions downstream; these limits are far beyond any sane setting.
inline constexpr double max_seconds = 31536000;  // one year
inline constexpr double max_rate = 1e12;
inline constexpr std::size_t max_echo = 40;

// A config's seconds (validated: 0 to max_seconds) as a keel duration, and back.
inline std::chrono::nanoseconds seconds_ns(double s) {
  return std::chrono::nanoseconds{static_cast<long long>(std::llround(s * 1e9))};
}
inline double to_seconds(std::chrono::nanoseconds d) {
  return static_cast<double>(d.count()) / 1e9;
}

// JSON pointers of children; nlohmann's json_pointer does the RFC 6901 escaping, so that a key
// such as "meta/llama" still yields an unambiguous path.
inline std::string child(const std::string& path, std::string_view key) {
  return (nlohmann::json::json_pointer(path) / std::string(key)).to_string();
}

inline std::string child(const std::string& path, std::size_t index) {
  return (nlohmann::json::json_pointer(path) / index).to_string();
}

// Truncates to at most `max` bytes without splitting a UTF-8 sequence.
inline std::string truncated(std::string s, std::size_t max) {
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
inline std::string shown(const json& v) {
  return keel::llm::redact(
      truncated(v.dump(-1, ' ', false, json::error_handler_t::replace), max_echo), max_echo + 8);
}

inline std::string echo_text(std::string_view s) {
  return shown(json(std::string(s)));
}

// A value's type only, for secrets: "got a number".
inline std::string type_only(const json& v) {
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
inline std::string control_character_in(std::string_view s) {
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

inline std::string format_number(double v) {
  if (std::isfinite(v) && std::floor(v) == v && std::fabs(v) < 1e15) {
    return std::to_string(static_cast<long long>(v));
  }
  std::ostringstream os;
  os << v;
  return os.str();
}

inline std::string join_quoted(std::initializer_list<std::string_view> options,
                               std::string_view last) {
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

inline constexpr num_range seconds_positive{0, true, max_seconds};
inline constexpr num_range seconds_non_negative{0, false, max_seconds};
inline constexpr num_range rate_non_negative{0, false, max_rate};
inline constexpr num_range growth_factor{1, false, 1e6};

// One validation pass over a document; every failure throws config_error naming the pointer.
class parser {
 public:
  // `base_dir`: where relative paths in the document are taken from ("": the working directory).
  parser(std::string source, const env_lookup& env, std::filesystem::path base_dir = {})
      : source_(std::move(source)), env_(env), base_dir_(std::move(base_dir)) {}

  client_config run(const json& doc);

 private:
  [[noreturn]] void fail(const std::string& path, std::string_view expected,
                         std::string_view got) const;

  void expect_object(const json& j, const std::string& path) const;

  void check_keys(const json& j, const std::string& path,
                  std::initializer_list<std::string_view> allowed) const;

  double number(const json& j, const std::string& path, const num_range& r) const;

  long long integer(const json& j, const std::string& path, const num_range& r) const;

  // AG2's `stop`: one string or an array of them, none empty.
  std::vector<std::string> stop_sequences(const json& j, const std::string& path) const;

  bool boolean(const json& j, const std::string& path) const;

  std::string string(const json& j, const std::string& path) const;

  // Like string(), but the value is never echoed.
  std::string secret(const json& j, const std::string& path) const;

  // A secret that is sent in an HTTP header (API key, AWS credentials) must not hold a control
  // character; `where` names the field (or the variable or profile it came from), never the value.
  void header_safe(const std::string& where, std::string_view value) const;

  std::string choice(const json& j, const std::string& path,
                     std::initializer_list<std::string_view> options) const;

  // ---- policy ---------------------------------------------------------------------------------

  keel::backoff parse_backoff(const json& j, const std::string& path, keel::backoff b) const;

  retry_config parse_retry(const json& j, const std::string& path) const;

  breaker_config parse_breaker(const json& j, const std::string& path) const;

  budget_config parse_budget(const json& j, const std::string& path) const;

  rate_limit_config parse_rate_limits(const json& j, const std::string& path) const;

  hedge_config parse_hedge(const json& j, const std::string& path) const;

  shared_config parse_shared(const json& j, const std::string& path) const;

  policy_config parse_policy(const json& j, const std::string& path) const;

  serve_config parse_serve(const json& j, const std::string& path) const;
  trace_config parse_trace(const json& j, const std::string& path) const;

  // ---- entries --------------------------------------------------------------------------------

  const aws_shared_files& shared_files();

  // A variable's value when it is set and non-empty.
  std::optional<std::string> env_value(std::string_view name) const;

  static std::optional<std::string> ini_value(const ini_section* s, const std::string& key);

  std::string files_description();

  entry_config parse_entry(const json& j, const std::string& path, const policy_config& policy);

  void resolve_api_key(const std::string& path, entry_config& e, std::optional<std::string> key,
                       const std::string& type_name) const;

  void resolve_aws(const std::string& path, entry_config& e, std::optional<std::string> access_key,
                   std::optional<std::string> secret_key, std::optional<std::string> session_token);

  // The AWS profile an entry reads (credentials, region, retry settings) and what named it:
  // "aws_profile_name", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", or "" for `default`.
  std::pair<std::string, std::string_view> aws_profile(const entry_config& e) const;

  std::optional<keel::llm::aws_credentials> profile_credentials(const std::string& where,
                                                                const ini_section* s,
                                                                const std::string& profile,
                                                                const std::string& file) const;

  keel::aws::resolved_retry_config resolve_aws_retry(const std::string& path, const entry_config& e,
                                                     const keel::aws::retry_config_input& in);

  std::string source_;
  const env_lookup& env_;
  std::filesystem::path base_dir_;
  std::optional<aws_shared_files> shared_files_;
};

}  // namespace keel::llm::detail
