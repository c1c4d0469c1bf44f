// Parsing and validation of keel::llm::client_config (AG2 config_list + policy).
#include <keel/llm/config.hpp>

#include "config_parser.hpp"

#include <keel/http/client.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/strict_json.hpp>

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
using detail::parser;
using detail::to_seconds;

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

namespace {

// `text` with every control character written as \u00XX: a key in a path may hold any (a NUL
// cut the message short, an ESC drove the terminal, a newline split the line).
std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[u >> 4];
      out += hex[u & 0xf];
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

config_error::config_error(std::string source, std::string path, std::string message)
    : std::runtime_error(printable(path.empty() ? source + ": " + message
                                                : source + ": " + path + ": " + message)),
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
  json doc;
  try {
    doc = parse_strict_json(text);
  } catch (const json_refused& e) {
    if (e.problem() == json_problem::duplicate_key) {
      throw config_error(source, e.pointer(), e.what());
    }
    if (e.problem() == json_problem::unusable) {
      throw config_error(source, "", std::string("invalid JSON: ") + e.what());
    }
    const auto [line, column] = line_column(text, e.byte() + 1);
    const std::string at =
        " at line " + std::to_string(line) + ", column " + std::to_string(column);
    throw config_error(source, "",
                       e.problem() == json_problem::too_deep
                           ? "JSON " + std::string(e.what()) + at
                           : "invalid JSON" + at + ": " + e.what());
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
  // Read in blocks up to a bound: /dev/zero or a runaway generated file must not take all
  // memory. No real config comes near it (a thousand entries are well under 1 MiB).
  std::string text;
  char block[65536];
  while (in.read(block, sizeof block) || in.gcount() > 0) {
    text.append(block, static_cast<std::size_t>(in.gcount()));
    if (text.size() > max_config_bytes) {
      throw config_error(file, "",
                         "the config file is larger than " +
                             std::to_string(max_config_bytes >> 20) +
                             " MiB; is it the right file?");
    }
  }
  if (in.bad()) {
    throw config_error(file, "", "cannot read the config file");
  }
  // A relative ca_file is taken from the config file's directory.
  const std::filesystem::path dir = std::filesystem::path(file).parent_path();
  return parse_text(text, file, env, dir.empty() ? std::filesystem::path(".") : dir);
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
        {"max_break", p.breaker.max_break},
        {"unanswered_grace", p.breaker.unanswered_grace}}},
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
      {"stream",
       {{"first_token_timeout", p.stream.first_token_timeout},
        {"idle_timeout", p.stream.idle_timeout},
        {"restartable", p.stream.restartable}}},
      {"hedge",
       {{"enabled", p.hedge.enabled},
        {"max_attempts", p.hedge.max_attempts},
        {"delay", p.hedge.delay},
        {"percentile", p.hedge.percentile},
        {"min_samples", p.hedge.min_samples},
        {"budget_ratio", p.hedge.budget_ratio},
        {"budget_capacity", p.hedge.budget_capacity},
        {"target", p.hedge.to_next ? "next" : "same"}}},
      {"shared",
       {{"redis", p.shared.redis},
        {"key_prefix", p.shared.key_prefix},
        {"username", p.shared.username},
        {"password_env", p.shared.password_env},
        {"timeout", p.shared.timeout},
        {"lease_window", p.shared.lease_window},
        {"breaker_sync", p.shared.breaker_sync},
        {"probe_timeout", p.shared.probe_timeout},
        {"rate_sync", p.shared.rate_sync},
        {"fleet_size", p.shared.fleet_size},
        {"ca_file", p.shared.ca_file}}},
  };
  json clients = json::array();
  for (const serve_client& sc : c.serve.clients) {
    // The digest is not the key, but it is enough to test guesses offline: only its start.
    clients.push_back({{"name", sc.name},
                       {"key_sha256", sc.key_sha256.substr(0, 8) + "..."},
                       {"requests_per_minute", sc.requests_per_minute},
                       {"concurrency", sc.concurrency}});
  }
  return {{"source", c.source},
          {"config_list", std::move(entries)},
          {"policy", std::move(policy)},
          {"serve", {{"clients", std::move(clients)}}},
          {"trace",
           {{"otlp_endpoint",
             redact ? keel::http::redact_url(c.trace.otlp_endpoint) : c.trace.otlp_endpoint},
            {"sample_ratio", c.trace.sample_ratio},
            {"service_name", c.trace.service_name},
            {"headers_env", c.trace.headers_env},
            {"timeout", c.trace.timeout},
            {"xray_ids", c.trace.xray_ids}}}};
}

}  // namespace keel::llm
