// The keel command's logger: levels, text or JSON lines on stderr, secrets redacted.
#pragma once

// Every line is one event: a timestamp, a level, an event name, an optional message and fields.
//
//   text: 2026-11-22T10:00:00.123Z WARNING retry attempt=2 class=rate_limited status=429 ...
//   json: {"ts":"2026-11-22T10:00:00.123Z","level":"warning","event":"retry","attempt":2,...}
//
// Every string (message and field values) passes through keel::llm::redact, so an API key that
// reached an error message from a server is not printed. A hook lets the progress bar clear its
// line before a log line and redraw it after.
//
// Thread safety: one mutex around each line.

#include <nlohmann/json.hpp>

#include <cstdio>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

namespace keel::cli {

/// Log levels, most verbose first.
enum class log_level { debug, info, warning, error, off };

/// Parses "debug", "info", "warning" (or "warn"), "error", "off".
std::optional<log_level> parse_log_level(std::string_view name) noexcept;

/// The name of a level ("debug", ...).
std::string_view to_string(log_level l) noexcept;

/// Line formats.
enum class log_format { text, json };

/// A leveled line logger.
class logger {
 public:
  /// Logs at `level` and above to `out` in `format`.
  explicit logger(log_level level = log_level::warning, log_format format = log_format::text,
                  std::FILE* out = stderr);

  /// True if a line at `l` would be written.
  bool enabled(log_level l) const noexcept { return l >= level_ && level_ != log_level::off; }

  /// Writes one event (`fields` is a JSON object or null).
  void log(log_level l, std::string_view event, std::string_view message,
           const nlohmann::json& fields = nullptr);

  /// Called around every line, with the lock held (the progress bar clears and redraws itself).
  void set_around_line(std::function<void()> before, std::function<void()> after);

  /// The stream lines go to.
  std::FILE* stream() const noexcept { return out_; }

  /// Serialises other writers of the same stream with log lines.
  std::mutex& mutex() noexcept { return mutex_; }

 private:
  log_level level_;
  log_format format_;
  std::FILE* out_;
  std::mutex mutex_;
  std::function<void()> before_, after_;
};

}  // namespace keel::cli
