// The config parser: `config_list` entries, the API key and the AWS credential, region and
// retry-mode chains (entry, environment, shared files).
#include "config_parser.hpp"

#include <keel/llm/error.hpp>
#include <keel/llm/json_depth.hpp>

#include <cstdint>

namespace keel::llm::detail {

const aws_shared_files& parser::shared_files() {
  if (!shared_files_) {
    shared_files_ = load_aws_shared_files(env_);
  }
  return *shared_files_;
}

// A variable's value when it is set and non-empty.
std::optional<std::string> parser::env_value(std::string_view name) const {
  auto v = env_(name);
  if (v && v->empty()) {
    return std::nullopt;
  }
  return v;
}

std::optional<std::string> parser::ini_value(const ini_section* s, const std::string& key) {
  if (s == nullptr) {
    return std::nullopt;
  }
  const auto it = s->find(key);
  if (it == s->end()) {
    return std::nullopt;
  }
  return it->second;
}

std::string parser::files_description() {
  const auto& f = shared_files();
  if (f.credentials_path.empty() && f.config_path.empty()) {
    return "the AWS shared files (none: HOME is not set)";
  }
  return f.credentials_path + " or " + f.config_path;
}

entry_config parser::parse_entry(const json& j, const std::string& path,
                                 const policy_config& policy) {
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
      if (const auto ws = e.base_url.find_first_of(" \t\r\n"); ws != std::string::npos) {
        // Said apart: the generic message left a pasted space (or newline) hard to see.
        fail(p, "a URL without spaces or line breaks (percent-encode a space in a path as %20)",
             "one at byte " + std::to_string(ws));
      }
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
      if (e.base_url.find('#') != std::string::npos) {
        // A fragment is never sent: the requests would silently go to the URL without it.
        fail(p, "a URL without a #fragment",
             shown(json(keel::http::redact_url(e.base_url.substr(0, e.base_url.find('#'))) +
                        "#...")));
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
      // Any 64-bit integer (a range in doubles refused INT64_MAX).
      if (!v.is_number_integer() ||
          (v.is_number_unsigned() &&
           v.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))) {
        fail(p, "a 64-bit integer", shown(v));
      }
      e.seed = v.get<std::int64_t>();
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

void parser::resolve_api_key(const std::string& path, entry_config& e,
                             std::optional<std::string> key, const std::string& type_name) const {
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

void parser::resolve_aws(const std::string& path, entry_config& e,
                         std::optional<std::string> access_key,
                         std::optional<std::string> secret_key,
                         std::optional<std::string> session_token) {
  // Credentials: the entry; then, for a profile the entry names, that profile only; otherwise
  // the environment, then the profile (AWS_PROFILE, AWS_DEFAULT_PROFILE or default), as
  // botocore orders its providers. None at all is fine at load time: the mock server does not
  // check signatures, and a real call fails loudly.
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
  // The profile: aws_profile_name, else AWS_PROFILE, else AWS_DEFAULT_PROFILE, else default.
  const std::pair<std::string, std::string_view> chosen = aws_profile(e);
  const std::string& profile = chosen.first;
  const std::string_view named_by = chosen.second;
  const auto& f = shared_files();
  const bool in_files =
      f.credentials_profile(profile) != nullptr || f.config_profile(profile) != nullptr;
  const std::string profile_where = named_by == "aws_profile_name"
                                        ? child(path, "aws_profile_name")
                                        : path + " (" + std::string(named_by) + ")";
  if (!named_by.empty() && !in_files) {
    // As the SDKs (ProfileNotFound): a named profile that is not there is an error.
    fail(profile_where, "a profile of " + files_description(), echo_text(profile));
  }
  // A profile's static keys: its section of the credentials file, else of the config file (the
  // SDKs read both). A profile that gets its credentials another way keel does not run (an
  // assumed role, SSO, a web identity: these come before static keys in botocore; a
  // credential_process: before keys in the config file) gives none. For a profile named
  // explicitly (aws_profile_name, AWS_PROFILE) that is an error, not a silent fallback or
  // placeholder; the implicit `default` only gives no credentials (mock configs need none).
  auto from_profile = [&]() -> std::optional<keel::llm::aws_credentials> {
    const ini_section* in_credentials = f.credentials_profile(profile);
    const ini_section* in_config = f.config_profile(profile);
    const char* other_way = nullptr;
    for (const ini_section* sec : {in_credentials, in_config}) {
      for (const char* key :
           {"role_arn", "sso_session", "sso_start_url", "web_identity_token_file"}) {
        if (other_way == nullptr && ini_value(sec, key)) {
          other_way = key;
        }
      }
    }
    if (other_way == nullptr) {
      if (auto c =
              profile_credentials(profile_where, in_credentials, profile, f.credentials_path)) {
        return c;
      }
      if (ini_value(in_credentials, "credential_process") ||
          ini_value(in_config, "credential_process")) {
        other_way = "credential_process";
      } else if (auto c = profile_credentials(profile_where, in_config, profile, f.config_path)) {
        return c;
      }
    }
    if (other_way != nullptr && !named_by.empty()) {
      fail(profile_where,
           "aws_access_key_id and aws_secret_access_key in profile " + echo_text(profile) +
               " (keel does not assume roles or run credential_process or SSO; export the "
               "keys, e.g. with `aws configure export-credentials --format env`)",
           std::string("a profile with ") + other_way);
    }
    return std::nullopt;
  };
  if (!e.aws && named_by == "aws_profile_name") {
    // A profile the entry names explicitly: the environment's keys are not used (the SDKs
    // drop the environment provider when a profile is given).
    e.aws = from_profile();
    if (e.aws) {
      e.aws_credentials_source = "profile " + profile;
    }
  }
  if (!e.aws && named_by != "aws_profile_name") {
    auto id = env_value("AWS_ACCESS_KEY_ID");
    auto key = env_value("AWS_SECRET_ACCESS_KEY");
    if (id && key) {
      e.aws = keel::llm::aws_credentials(std::move(*id), std::move(*key),
                                         env_value("AWS_SESSION_TOKEN").value_or(""));
      e.aws_credentials_source = "environment";
    }
  }
  if (!e.aws && named_by != "aws_profile_name" && in_files) {
    e.aws = from_profile();
    if (e.aws) {
      e.aws_credentials_source = "profile " + profile;
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
  std::string region_where = child(path, "aws_region");  // where a bad region came from
  if (e.aws_region.empty()) {
    if (auto r = env_value("AWS_REGION")) {
      e.aws_region = *r;
      region_where = path + " (AWS_REGION)";
    } else if (auto d = env_value("AWS_DEFAULT_REGION")) {
      e.aws_region = *d;
      region_where = path + " (AWS_DEFAULT_REGION)";
    } else if (auto pr = ini_value(f.config_profile(profile), "region"); pr && !pr->empty()) {
      e.aws_region = *pr;
      region_where =
          path + " (region of profile " + echo_text(profile) + " in " + f.config_path + ")";
    }
  }
  // The region becomes part of the host name and of the signature's scope.
  if (!e.aws_region.empty() && !std::all_of(e.aws_region.begin(), e.aws_region.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '-';
      })) {
    fail(region_where,
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

std::pair<std::string, std::string_view> parser::aws_profile(const entry_config& e) const {
  if (!e.aws_profile_name.empty()) {
    return {e.aws_profile_name, "aws_profile_name"};
  }
  for (const std::string_view variable : {"AWS_PROFILE", "AWS_DEFAULT_PROFILE"}) {
    if (auto p = env_value(variable)) {
      return {*p, variable};
    }
  }
  return {"default", ""};
}

std::optional<keel::llm::aws_credentials> parser::profile_credentials(
    const std::string& where, const ini_section* s, const std::string& profile,
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

keel::aws::resolved_retry_config parser::resolve_aws_retry(
    const std::string& path, const entry_config& e, const keel::aws::retry_config_input& in) {
  // Only the winning source is read, so the shared files stay untouched when the entry and
  // the environment settle both values.
  const auto env_mode = env_("AWS_RETRY_MODE");
  const auto env_max = env_("AWS_MAX_ATTEMPTS");
  // The 2.1 switch: revision 2.1 and `standard` as the default mode ("true" only, as the SDKs).
  const auto env_new_retries = env_("AWS_NEW_RETRIES_2026");
  const std::string profile = aws_profile(e).first;
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
    const std::string where = env_max ? path + " (AWS_MAX_ATTEMPTS)" : profile_path("max_attempts");
    fail(where, "an integer from 1 to " + std::to_string(INT_MAX) + " (total attempts)",
         echo_text(env_max ? *env_max : profile_max.value_or("")));
  }
}

}  // namespace keel::llm::detail
