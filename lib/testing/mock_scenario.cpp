// Scenario files for the mock LLM server: JSON to fault plans, with errors naming the JSON path.
#include <keel/llm/strict_json.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <nlohmann/json.hpp>

#include <array>
#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

namespace keel::testing {

namespace {

using json = nlohmann::json;

constexpr std::array<std::pair<fault_kind, std::string_view>, 23> fault_names{{
    {fault_kind::ok, "ok"},
    {fault_kind::rate_limit, "rate_limit"},
    {fault_kind::server_error, "server_error"},
    {fault_kind::unavailable, "unavailable"},
    {fault_kind::overloaded, "overloaded"},
    {fault_kind::throttling, "throttling"},
    {fault_kind::quota_exhausted, "quota_exhausted"},
    {fault_kind::context_length, "context_length"},
    {fault_kind::reset, "reset"},
    {fault_kind::stall, "stall"},
    {fault_kind::truncated, "truncated"},
    {fault_kind::auth, "auth"},
    {fault_kind::not_found, "not_found"},
    {fault_kind::content_filter, "content_filter"},
    {fault_kind::timeout, "timeout"},
    {fault_kind::malformed, "malformed"},
    {fault_kind::bad_request, "bad_request"},
    {fault_kind::stream_drop, "stream_drop"},
    {fault_kind::stream_stall, "stream_stall"},
    {fault_kind::stream_error, "stream_error"},
    {fault_kind::stream_throttled, "stream_throttled"},
    {fault_kind::stream_truncated, "stream_truncated"},
    {fault_kind::stream_corrupt, "stream_corrupt"},
}};

constexpr std::array<std::pair<retry_after_style, std::string_view>, 7> retry_after_names{{
    {retry_after_style::provider, "provider"},
    {retry_after_style::both, "both"},
    {retry_after_style::milliseconds, "milliseconds"},
    {retry_after_style::seconds, "seconds"},
    {retry_after_style::http_date, "http_date"},
    {retry_after_style::amz, "amz"},
    {retry_after_style::none, "none"},
}};

constexpr std::array<std::pair<limiter_retry_after_mode, std::string_view>, 3> limiter_names{{
    {limiter_retry_after_mode::exact, "exact"},
    {limiter_retry_after_mode::constant, "constant"},
    {limiter_retry_after_mode::none, "none"},
}};

// JSON pointers of children; nlohmann's json_pointer does the RFC 6901 escaping, so that a key
// such as "meta/llama" still yields an unambiguous path.
std::string child(const std::string& path, std::string_view key) {
  return (nlohmann::json::json_pointer(path) / std::string(key)).to_string();
}

std::string child(const std::string& path, std::size_t index) {
  return (nlohmann::json::json_pointer(path) / index).to_string();
}

double number(const json& j, const std::string& path, double lo, double hi) {
  if (!j.is_number()) {
    throw scenario_error(path, "expected a number, got " + std::string(j.type_name()));
  }
  const double v = j.get<double>();
  if (!std::isfinite(v) || v < lo || v > hi) {
    std::ostringstream os;
    os << "value " << v << " out of range [" << lo << ", " << hi << "]";
    throw scenario_error(path, os.str());
  }
  return v;
}

std::chrono::milliseconds millis(const json& j, const std::string& path) {
  return std::chrono::milliseconds(
      static_cast<std::int64_t>(number(j, path, 0, 24.0 * 3600 * 1000)));
}

std::string string_of(const json& j, const std::string& path) {
  if (!j.is_string()) {
    throw scenario_error(path, "expected a string, got " + std::string(j.type_name()));
  }
  return j.get<std::string>();
}

const json& array(const json& j, const std::string& path) {
  if (!j.is_array()) {
    throw scenario_error(path, "expected an array, got " + std::string(j.type_name()));
  }
  return j;
}

const json& object(const json& j, const std::string& path) {
  if (!j.is_object()) {
    throw scenario_error(path, "expected an object, got " + std::string(j.type_name()));
  }
  return j;
}

fault_kind kind(const json& j, const std::string& path) {
  if (!j.is_string()) {
    throw scenario_error(path, "expected a fault name string, got " + std::string(j.type_name()));
  }
  const auto name = j.get<std::string>();
  if (auto k = parse_fault_kind(name)) {
    return *k;
  }
  throw scenario_error(path, "unknown fault kind \"" + name + "\"");
}

void unknown_key(const std::string& path, const std::string& key) {
  throw scenario_error(child(path, key), "unknown key");
}

fault_plan parse_plan(const json& j, const std::string& path) {
  object(j, path);
  fault_plan plan;
  for (const auto& [key, v] : j.items()) {
    const std::string p = child(path, key);
    if (key == "latency_ms") {
      if (v.is_number()) {
        plan.with_latency(millis(v, p));
      } else {
        object(v, p);
        for (const auto& [k2, v2] : v.items()) {
          if (k2 == "min") {
            plan.latency_min = millis(v2, child(p, k2));
          } else if (k2 == "max") {
            plan.latency_max = millis(v2, child(p, k2));
          } else {
            unknown_key(p, k2);
          }
        }
        if (!v.contains("max")) {
          plan.latency_max = plan.latency_min;
        }
        if (plan.latency_max < plan.latency_min) {
          throw scenario_error(child(p, "max"), "max is smaller than min");
        }
      }
    } else if (key == "tail") {
      object(v, p);
      bool has_fraction = false;
      bool has_latency = false;
      for (const auto& [k2, v2] : v.items()) {
        if (k2 == "fraction") {
          plan.tail_fraction = number(v2, child(p, k2), 0, 1);
          has_fraction = true;
        } else if (k2 == "latency_ms") {
          plan.tail_latency = millis(v2, child(p, k2));
          has_latency = true;
        } else {
          unknown_key(p, k2);
        }
      }
      if (!has_fraction || !has_latency) {
        throw scenario_error(p, "a tail needs both \"fraction\" and \"latency_ms\"");
      }
    } else if (key == "errors") {
      object(v, p);
      double sum = 0;
      for (const auto& [k2, v2] : v.items()) {
        const auto fk = parse_fault_kind(k2);
        if (!fk) {
          throw scenario_error(child(p, k2), "unknown fault kind");
        }
        const double prob = number(v2, child(p, k2), 0, 1);
        plan.probability[*fk] = prob;
        sum += prob;
      }
      if (sum > 1.0 + 1e-9) {
        throw scenario_error(p, "probabilities add up to more than 1");
      }
    } else if (key == "retry_after_ms") {
      plan.retry_after = millis(v, p);
    } else if (key == "retry_after_format") {
      const std::string name = string_of(v, p);
      const auto style = parse_retry_after_style(name);
      if (!style) {
        throw scenario_error(p, "unknown retry-after format \"" + name +
                                    "\" (expected provider, both, milliseconds, seconds, "
                                    "http_date, amz or none)");
      }
      plan.retry_after_format = *style;
    } else if (key == "limiter_retry_after") {
      const std::string name = string_of(v, p);
      const auto mode = parse_limiter_retry_after_mode(name);
      if (!mode) {
        throw scenario_error(
            p, "unknown limiter retry-after \"" + name + "\" (expected exact, constant or none)");
      }
      plan.limiter_retry_after = *mode;
    } else if (key == "rate_limit_headers") {
      if (!v.is_boolean()) {
        throw scenario_error(p, "expected true or false, got " + std::string(v.type_name()));
      }
      plan.rate_limit_headers = v.get<bool>();
    } else if (key == "quirks") {
      object(v, p);
      for (const auto& [k2, v2] : v.items()) {
        const std::string p2 = child(p, k2);
        bool* flag = k2 == "openai_timeout_408"     ? &plan.quirks.openai_timeout_408
                     : k2 == "azure_content_filter" ? &plan.quirks.azure_content_filter
                                                    : nullptr;
        if (!flag) {
          unknown_key(p, k2);
        }
        if (!v2.is_boolean()) {
          throw scenario_error(p2, "expected true or false, got " + std::string(v2.type_name()));
        }
        *flag = v2.get<bool>();
      }
    } else if (key == "stream") {
      object(v, p);
      for (const auto& [k2, v2] : v.items()) {
        const std::string p2 = child(p, k2);
        if (k2 == "chunk_latency_ms") {
          plan.stream.chunk_latency = millis(v2, p2);
        } else if (k2 == "chunk_bytes") {
          plan.stream.chunk_bytes = static_cast<std::size_t>(number(v2, p2, 1, 1 << 20));
        } else if (k2 == "fault_after_chunks") {
          plan.stream.fault_after_chunks = static_cast<std::size_t>(number(v2, p2, 0, 1e6));
        } else {
          unknown_key(p, k2);
        }
      }
    } else if (key == "rate_schedule") {
      array(v, p);
      for (std::size_t i = 0; i < v.size(); ++i) {
        const std::string pi = child(p, i);
        object(v[i], pi);
        rate_change c;
        bool has_at = false;
        for (const auto& [k2, v2] : v[i].items()) {
          if (k2 == "at_ms") {
            c.at = millis(v2, child(pi, k2));
            has_at = true;
          } else if (k2 == "requests_per_second") {
            c.requests_per_second = number(v2, child(pi, k2), 0, 1e9);
          } else if (k2 == "tokens_per_minute") {
            c.tokens_per_minute = number(v2, child(pi, k2), 0, 1e12);
          } else {
            unknown_key(pi, k2);
          }
        }
        if (!has_at) {
          throw scenario_error(pi, "a rate change needs \"at_ms\"");
        }
        if (!c.requests_per_second && !c.tokens_per_minute) {
          throw scenario_error(
              pi, "a rate change needs \"requests_per_second\" or \"tokens_per_minute\"");
        }
        if (!plan.rate_schedule.empty() && c.at < plan.rate_schedule.back().at) {
          throw scenario_error(child(pi, "at_ms"), "at_ms is before the previous change's");
        }
        plan.rate_schedule.push_back(c);
      }
    } else if (key == "rate_limit") {
      object(v, p);
      for (const auto& [k2, v2] : v.items()) {
        if (k2 == "requests_per_second") {
          plan.requests_per_second = number(v2, child(p, k2), 0, 1e9);
        } else if (k2 == "burst") {
          plan.burst = number(v2, child(p, k2), 0, 1e9);
        } else if (k2 == "tokens_per_minute") {
          plan.tokens_per_minute = number(v2, child(p, k2), 0, 1e12);
        } else if (k2 == "token_burst") {
          plan.token_burst = number(v2, child(p, k2), 0, 1e12);
        } else {
          unknown_key(p, k2);
        }
      }
    } else if (key == "context_window") {
      plan.context_window = static_cast<std::size_t>(number(v, p, 0, 1e12));
    } else if (key == "outages") {
      array(v, p);
      for (std::size_t i = 0; i < v.size(); ++i) {
        const std::string pi = child(p, i);
        object(v[i], pi);
        outage_window w;
        bool has_from = false;
        bool has_to = false;
        for (const auto& [k2, v2] : v[i].items()) {
          if (k2 == "from_ms") {
            w.from = millis(v2, child(pi, k2));
            has_from = true;
          } else if (k2 == "to_ms") {
            w.to = millis(v2, child(pi, k2));
            has_to = true;
          } else {
            unknown_key(pi, k2);
          }
        }
        if (!has_from || !has_to) {
          throw scenario_error(pi, "an outage needs both \"from_ms\" and \"to_ms\"");
        }
        if (w.to < w.from) {
          throw scenario_error(child(pi, "to_ms"), "to_ms is before from_ms");
        }
        plan.outages.push_back(w);
      }
    } else if (key == "script") {
      array(v, p);
      for (std::size_t i = 0; i < v.size(); ++i) {
        plan.script.push_back(kind(v[i], child(p, i)));
      }
    } else {
      unknown_key(path, key);
    }
  }
  return plan;
}

}  // namespace

std::string_view to_string(fault_kind k) noexcept {
  for (const auto& [fk, name] : fault_names) {
    if (fk == k) {
      return name;
    }
  }
  return "unknown";
}

std::optional<fault_kind> parse_fault_kind(std::string_view name) noexcept {
  for (const auto& [fk, n] : fault_names) {
    if (n == name) {
      return fk;
    }
  }
  return std::nullopt;
}

std::string_view to_string(retry_after_style s) noexcept {
  for (const auto& [rs, name] : retry_after_names) {
    if (rs == s) {
      return name;
    }
  }
  return "unknown";
}

std::optional<retry_after_style> parse_retry_after_style(std::string_view name) noexcept {
  for (const auto& [rs, n] : retry_after_names) {
    if (n == name) {
      return rs;
    }
  }
  return std::nullopt;
}

std::string_view to_string(limiter_retry_after_mode m) noexcept {
  for (const auto& [lm, name] : limiter_names) {
    if (lm == m) {
      return name;
    }
  }
  return "unknown";
}

std::optional<limiter_retry_after_mode> parse_limiter_retry_after_mode(
    std::string_view name) noexcept {
  for (const auto& [lm, n] : limiter_names) {
    if (n == name) {
      return lm;
    }
  }
  return std::nullopt;
}

scenario scenario::from_json(std::string_view json_text) {
  json doc;
  try {
    // Strict: a repeated key is refused (nlohmann kept the last), a number too large for a
    // double ("1e400", found by fuzz/fuzz_mock_scenario) is said plainly.
    doc = keel::llm::parse_strict_json(json_text);
  } catch (const keel::llm::json_refused& e) {
    if (e.problem() == keel::llm::json_problem::duplicate_key) {
      throw scenario_error(e.pointer(), e.what());
    }
    throw scenario_error("", std::string("invalid JSON: ") + e.what() +
                                 (e.problem() == keel::llm::json_problem::unusable
                                      ? std::string()
                                      : " (at byte " + std::to_string(e.byte()) + ")"));
  }
  object(doc, "");
  scenario s;
  for (const auto& [key, v] : doc.items()) {
    if (key == "seed") {
      if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<std::int64_t>() >= 0)) {
        throw scenario_error("/seed", "expected a non-negative integer");
      }
      s.seed = v.get<std::uint64_t>();
    } else if (key == "models") {
      object(v, "/models");
      for (const auto& [model, plan] : v.items()) {
        s.plans[model] = parse_plan(plan, child("/models", model));
      }
    } else {
      unknown_key("", key);
    }
  }
  return s;
}

scenario load_scenario(const std::string& file_path) {
  std::ifstream in(file_path, std::ios::binary);
  if (!in) {
    throw scenario_error("", "cannot open scenario file " + file_path);
  }
  std::ostringstream os;
  os << in.rdbuf();
  try {
    return scenario::from_json(os.str());
  } catch (const scenario_error& e) {
    throw scenario_error(e.path(), e.message() + " (in " + file_path + ")");
  }
}

}  // namespace keel::testing
