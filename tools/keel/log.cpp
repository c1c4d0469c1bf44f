// The keel command's logger.
#include "log.hpp"

#include <keel/llm/error.hpp>

#include <chrono>
#include <ctime>

namespace keel::cli {

std::optional<log_level> parse_log_level(std::string_view name) noexcept {
  if (name == "debug") {
    return log_level::debug;
  }
  if (name == "info") {
    return log_level::info;
  }
  if (name == "warning" || name == "warn") {
    return log_level::warning;
  }
  if (name == "error") {
    return log_level::error;
  }
  if (name == "off") {
    return log_level::off;
  }
  return std::nullopt;
}

std::string_view to_string(log_level l) noexcept {
  switch (l) {
    case log_level::debug:
      return "debug";
    case log_level::info:
      return "info";
    case log_level::warning:
      return "warning";
    case log_level::error:
      return "error";
    case log_level::off:
      break;
  }
  return "off";
}

logger::logger(log_level level, log_format format, std::FILE* out)
    : level_(level), format_(format), out_(out) {}

void logger::set_around_line(std::function<void()> before, std::function<void()> after) {
  std::lock_guard lock{mutex_};
  before_ = std::move(before);
  after_ = std::move(after);
}

namespace {

std::string timestamp() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, static_cast<int>(ms));
  return buf;
}

// Redacts every string in a JSON value (recursively).
nlohmann::json redacted(const nlohmann::json& v) {
  if (v.is_string()) {
    return keel::llm::redact(v.get_ref<const std::string&>(), 1000);
  }
  if (v.is_object() || v.is_array()) {
    nlohmann::json out = v;
    for (auto& item : out) {
      item = redacted(item);
    }
    return out;
  }
  return v;
}

bool needs_quotes(const std::string& s) {
  if (s.empty()) {
    return true;
  }
  for (char c : s) {
    if (c == ' ' || c == '"' || c == '=' || static_cast<unsigned char>(c) < 0x20) {
      return true;
    }
  }
  return false;
}

}  // namespace

void logger::log(log_level l, std::string_view event, std::string_view message,
                 const nlohmann::json& fields) {
  if (!enabled(l)) {
    return;
  }
  const nlohmann::json safe_fields = fields.is_object() ? redacted(fields) : nlohmann::json();
  const std::string safe_message = keel::llm::redact(message, 1000);
  std::string line;
  if (format_ == log_format::json) {
    nlohmann::json j;
    j["ts"] = timestamp();
    j["level"] = to_string(l);
    j["event"] = event;
    if (!safe_message.empty()) {
      j["message"] = safe_message;
    }
    if (safe_fields.is_object()) {
      for (const auto& [k, v] : safe_fields.items()) {
        j[k] = v;
      }
    }
    line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } else {
    std::string level{to_string(l)};
    for (auto& c : level) {
      c = static_cast<char>(c - 'a' + 'A');
    }
    line = timestamp() + " " + level + " " + std::string(event);
    if (safe_fields.is_object()) {
      for (const auto& [k, v] : safe_fields.items()) {
        std::string value = v.is_string()
                                ? v.get<std::string>()
                                : v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        if (v.is_string() && needs_quotes(value)) {
          value =
              nlohmann::json(value).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        }
        line += " " + k + "=" + value;
      }
    }
    if (!safe_message.empty()) {
      line += ": " + safe_message;
    }
  }
  line.push_back('\n');
  std::lock_guard lock{mutex_};
  if (before_) {
    before_();
  }
  std::fwrite(line.data(), 1, line.size(), out_);
  if (after_) {
    after_();
  }
  std::fflush(out_);
}

}  // namespace keel::cli
