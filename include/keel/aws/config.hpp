// AWS retry configuration: the retry mode and total max attempts, resolved with botocore
// precedence.
#pragma once

// Overview
// --------
// `resolve_retry_config` turns the sources botocore consults into one `resolved_retry_config`
// (§1.1 of the reference). Highest priority first:
//
// | setting            | sources                                                                |
// | ------------------ | ---------------------------------------------------------------------- |
// | mode               | client `mode`; env `AWS_RETRY_MODE`; profile `retry_mode`; `legacy`     |
// | total max attempts | client `total_max_attempts` (then `max_attempts` is ignored); client    |
// |                    | `max_attempts` + 1 (it counts *retries*); env `AWS_MAX_ATTEMPTS`;       |
// |                    | profile `max_attempts` (both already totals); mode default: legacy 5,  |
// |                    | standard and adaptive 3                                                |
//
// `AWS_NEW_RETRIES_2026=true` (the 2.1 switch; exactly "true", as the Go and PHP SDKs read it:
// any other value, or none, leaves 2.0) selects revision 2.1 of the standard algorithm
// (`resolved_retry_config::revision`) and makes `standard` the default mode. Like botocore's
// `defaults_mode`, it replaces only the default link of the mode chain: an explicit client, env
// or profile mode still wins, and the max-attempts default follows the resolved mode.
//
// Validation, all reported as `std::invalid_argument` naming the setting and the bad value:
// a mode other than `legacy`/`standard`/`adaptive` (case-sensitive, env included); a total
// below 1 (e.g. `AWS_MAX_ATTEMPTS=0`); a client `max_attempts` below 0; an env or profile value
// that is not an integer. Only the source that wins is validated.
//
// Not covered: session-level variables, `defaults_mode`, and service-specific defaults (legacy
// DynamoDB 10, 2.1 DynamoDB 4); pass those as client values.
//
// Example:
//
//     keel::aws::retry_config_input client;
//     client.mode = "adaptive";
//     auto env = keel::aws::read_retry_env();
//     auto cfg = keel::aws::resolve_retry_config(client, env.mode, env.max_attempts,
//                                                std::nullopt, std::nullopt, env.new_retries_2026);
//     // cfg.mode == retry_mode::adaptive, cfg.total_max_attempts == 3 unless the env says
//     otherwise
//
// Thread safety: `resolve_retry_config` is pure. `read_retry_env` calls `std::getenv`, which
// must not race with changes to the environment.

#include <charconv>
#include <climits>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace keel::aws {

/// The AWS SDK retry modes.
enum class retry_mode {
  /// The data-driven `_retry.json` policies: no quota, uncapped exponential backoff.
  legacy,
  /// The standard algorithm: transient/throttling classification, retry quota, capped backoff.
  standard,
  /// Standard plus the client-side CUBIC send-rate limiter.
  adaptive,
};

/// The revision of the standard algorithm (costs and backoff) a client follows.
enum class retry_revision {
  /// The SDKs' current default: costs 5 / 10 (timeout) / 5, backoff `rand·min(2^(n−1), 20)`,
  /// x-amz-retry-after ignored.
  v2_0,
  /// `AWS_NEW_RETRIES_2026=true`: costs 14 / 14 / 5 (throttling), backoff scaled 0.05 (1 for
  /// throttling), x-amz-retry-after honoured up to 5 s beyond the backoff.
  v2_1,
};

/// The retry settings from a client's configuration (botocore `Config(retries={...})`).
struct retry_config_input {
  /// `retries.mode`: "legacy", "standard" or "adaptive".
  std::optional<std::string> mode;
  /// `retries.total_max_attempts`: attempts including the first; wins over `max_attempts`.
  std::optional<long long> total_max_attempts;
  /// `retries.max_attempts`: the number of *retries* (total = value + 1).
  std::optional<long long> max_attempts;
};

/// The effective retry settings of a client.
struct resolved_retry_config {
  /// The retry mode.
  retry_mode mode = retry_mode::legacy;
  /// The maximum number of attempts, including the first (at least 1).
  int total_max_attempts = 5;
  /// The standard algorithm's revision: 2.1 when `AWS_NEW_RETRIES_2026` is "true", else 2.0.
  retry_revision revision = retry_revision::v2_0;
};

/// The retry settings read from the process environment.
struct retry_env {
  /// `AWS_RETRY_MODE`, if set.
  std::optional<std::string> mode;
  /// `AWS_MAX_ATTEMPTS`, if set.
  std::optional<std::string> max_attempts;
  /// `AWS_NEW_RETRIES_2026`, if set.
  std::optional<std::string> new_retries_2026;
};

/// True if an `AWS_NEW_RETRIES_2026` value turns the 2.1 behaviour on: exactly "true" (the Go
/// and PHP SDKs' test); anything else, or no value, leaves 2.0.
/// @param value the variable's value, if set.
constexpr bool new_retries_enabled(const std::optional<std::string_view>& value) noexcept {
  return value && *value == "true";
}

/// The name of a retry mode as the SDKs spell it ("legacy", "standard", "adaptive").
constexpr std::string_view to_string(retry_mode m) noexcept {
  switch (m) {
    case retry_mode::standard:
      return "standard";
    case retry_mode::adaptive:
      return "adaptive";
    case retry_mode::legacy:
      break;
  }
  return "legacy";
}

/// The default total max attempts of a mode: 5 for legacy, 3 for standard and adaptive.
constexpr int default_total_max_attempts(retry_mode m) noexcept {
  return m == retry_mode::legacy ? 5 : 3;
}

namespace detail {

inline retry_mode parse_retry_mode(std::string_view value, std::string_view setting) {
  if (value == "legacy") {
    return retry_mode::legacy;
  }
  if (value == "standard") {
    return retry_mode::standard;
  }
  if (value == "adaptive") {
    return retry_mode::adaptive;
  }
  throw std::invalid_argument("invalid retry mode in " + std::string(setting) + ": '" +
                              std::string(value) +
                              "' (expected 'legacy', 'standard' or 'adaptive')");
}

// Like Python's int() for the cases that matter: surrounding whitespace, an optional sign and
// decimal digits. '_' separators are not accepted.
inline long long parse_integer_setting(std::string_view value, std::string_view setting) {
  constexpr std::string_view space = " \t\n\r\f\v";
  const auto first = value.find_first_not_of(space);
  std::string_view digits =
      first == std::string_view::npos ? std::string_view{} : value.substr(first);
  digits = digits.substr(0, digits.find_last_not_of(space) + 1);
  if (!digits.empty() && digits.front() == '+') {
    digits.remove_prefix(1);
  }
  long long n = 0;
  const char* end = digits.data() + digits.size();
  auto [ptr, ec] = std::from_chars(digits.data(), end, n);
  if (digits.empty() || digits.front() == '+' || ec != std::errc{} || ptr != end) {
    throw std::invalid_argument(std::string(setting) + " must be an integer, got '" +
                                std::string(value) + "'");
  }
  return n;
}

inline int checked_total(long long total, std::string_view setting) {
  if (total < 1) {
    throw std::invalid_argument(std::string(setting) +
                                " must be at least 1 (total attempts), got " +
                                std::to_string(total));
  }
  if (total > INT_MAX) {
    throw std::invalid_argument(std::string(setting) + " is too large: " + std::to_string(total));
  }
  return static_cast<int>(total);
}

}  // namespace detail

/// Resolves the retry mode and total max attempts with botocore's precedence (§1.1).
/// @param client the client configuration's retry settings.
/// @param env_mode the value of `AWS_RETRY_MODE`, if set.
/// @param env_max_attempts the value of `AWS_MAX_ATTEMPTS`, if set (a total).
/// @param profile_mode the shared-config profile's `retry_mode`, if set.
/// @param profile_max_attempts the profile's `max_attempts`, if set (a total).
/// @param env_new_retries the value of `AWS_NEW_RETRIES_2026`, if set: "true" selects revision
///   2.1 and makes `standard` the default mode (explicit modes still win).
/// @return the effective mode, total max attempts and revision.
/// @throws std::invalid_argument for an unknown mode, a total below 1, a client `max_attempts`
///   below 0 or a non-integer env/profile value; the message names the setting and the value.
inline resolved_retry_config resolve_retry_config(const retry_config_input& client,
                                                  std::optional<std::string> env_mode,
                                                  std::optional<std::string> env_max_attempts,
                                                  std::optional<std::string> profile_mode,
                                                  std::optional<std::string> profile_max_attempts,
                                                  std::optional<std::string> env_new_retries = {}) {
  resolved_retry_config out;
  const bool v2_1 = new_retries_enabled(env_new_retries);
  out.revision = v2_1 ? retry_revision::v2_1 : retry_revision::v2_0;
  if (client.mode) {
    out.mode = detail::parse_retry_mode(*client.mode, "retries.mode");
  } else if (env_mode) {
    out.mode = detail::parse_retry_mode(*env_mode, "AWS_RETRY_MODE");
  } else if (profile_mode) {
    out.mode = detail::parse_retry_mode(*profile_mode, "profile retry_mode");
  } else {
    out.mode = v2_1 ? retry_mode::standard : retry_mode::legacy;
  }

  if (client.total_max_attempts) {
    out.total_max_attempts =
        detail::checked_total(*client.total_max_attempts, "retries.total_max_attempts");
  } else if (client.max_attempts) {
    if (*client.max_attempts < 0) {
      throw std::invalid_argument("retries.max_attempts must be at least 0 (retries), got " +
                                  std::to_string(*client.max_attempts));
    }
    if (*client.max_attempts >= INT_MAX) {
      throw std::invalid_argument("retries.max_attempts is too large: " +
                                  std::to_string(*client.max_attempts));
    }
    out.total_max_attempts = static_cast<int>(*client.max_attempts) + 1;
  } else if (env_max_attempts) {
    out.total_max_attempts = detail::checked_total(
        detail::parse_integer_setting(*env_max_attempts, "AWS_MAX_ATTEMPTS"), "AWS_MAX_ATTEMPTS");
  } else if (profile_max_attempts) {
    out.total_max_attempts = detail::checked_total(
        detail::parse_integer_setting(*profile_max_attempts, "profile max_attempts"),
        "profile max_attempts");
  } else {
    out.total_max_attempts = default_total_max_attempts(out.mode);
  }
  return out;
}

/// Reads `AWS_RETRY_MODE`, `AWS_MAX_ATTEMPTS` and `AWS_NEW_RETRIES_2026` from the process
/// environment.
/// @return the values that are set (possibly empty strings); unset variables are empty optionals.
inline retry_env read_retry_env() {
  retry_env env;
  if (const char* m = std::getenv("AWS_RETRY_MODE")) {
    env.mode = m;
  }
  if (const char* n = std::getenv("AWS_MAX_ATTEMPTS")) {
    env.max_attempts = n;
  }
  if (const char* v = std::getenv("AWS_NEW_RETRIES_2026")) {
    env.new_retries_2026 = v;
  }
  return env;
}

}  // namespace keel::aws
