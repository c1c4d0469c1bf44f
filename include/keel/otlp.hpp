// keel::otlp: exporters of keel::trace spans in the OpenTelemetry protocol's JSON encoding, over
// HTTP to a collector (OTLP/HTTP) or to a JSONL file.
#pragma once

// Design
// ------
// One encoding for both: an `ExportTraceServiceRequest` in OTLP's JSON form (lowerCamelCase
// field names, trace and span ids in hex, 64-bit integers as decimal strings, enums as numbers),
// which every OpenTelemetry collector accepts on `/v1/traces` with `Content-Type:
// application/json`. The file exporter writes one such request per line: the format of the
// collector's `otlpjsonfile` receiver and `file` exporter, so a file from `keel batch --trace`
// can be replayed into any backend. JSON rather than protobuf because keel already carries
// nlohmann_json and OTLP/HTTP requires collectors to accept both.
//
// Example:
//
//     keel::http::client http{io.get_executor()};
//     keel::otlp::http_exporter otlp{http, "http://127.0.0.1:4318"};
//     keel::trace::tracer tracer{io.get_executor(), otlp};
//
// Thread safety: an exporter lives on its tracer's executor.

#include <keel/trace.hpp>

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace keel::http {
class client;
}  // namespace keel::http

namespace keel::otlp {

/// The OTLP/JSON `ExportTraceServiceRequest` of `spans` from `from` (one line, no newline).
/// Strings that are not valid UTF-8 have the bad bytes replaced (U+FFFD).
std::string to_json(const keel::trace::resource& from,
                    const std::vector<keel::trace::span_data>& spans);

/// Writes each batch as one line of OTLP/JSON to a file.
class file_exporter : public keel::trace::exporter {
 public:
  /// Opens `path` for appending (created if absent): earlier lines are kept.
  /// @throws std::runtime_error naming the file if it cannot be opened.
  explicit file_exporter(const std::string& path);
  ~file_exporter() override;
  file_exporter(const file_exporter&) = delete;
  file_exporter& operator=(const file_exporter&) = delete;

  /// Appends one line and flushes it to the file (a local write, done on the calling thread).
  /// @throws std::runtime_error if the write fails (e.g. the disk is full).
  /// Cancellation: none (it does not suspend).
  boost::asio::awaitable<void> export_spans(const keel::trace::resource& from,
                                            std::vector<keel::trace::span_data> spans) override;

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
};

/// Settings of an `http_exporter`.
struct http_exporter_options {
  /// Longest time one export may take.
  std::chrono::milliseconds timeout{10000};
  /// Extra header fields (e.g. an authorization header for a hosted backend). Their values are
  /// never logged or put in an error message.
  std::vector<std::pair<std::string, std::string>> headers;
};

/// POSTs each batch as OTLP/JSON to a collector.
class http_exporter : public keel::trace::exporter {
 public:
  /// Exports through `http` (must outlive the exporter) to `endpoint`: a base URL such as
  /// `http://127.0.0.1:4318` gets `/v1/traces` appended to its path (as
  /// OTEL_EXPORTER_OTLP_ENDPOINT), before its query if it has one; a URL whose path already ends
  /// in `/v1/traces` is used as it is.
  /// @throws std::invalid_argument if `endpoint` is not an http:// or https:// URL.
  http_exporter(keel::http::client& http, std::string endpoint, http_exporter_options options = {});

  /// Sends one batch and waits for the collector's answer.
  /// @throws the transport's error, `deadline_exceeded` after `timeout`, or std::runtime_error
  ///   naming the status when the collector answers other than 2xx.
  /// Cancellation: ends the send.
  boost::asio::awaitable<void> export_spans(const keel::trace::resource& from,
                                            std::vector<keel::trace::span_data> spans) override;

  /// The URL batches go to.
  const std::string& url() const noexcept { return url_; }

 private:
  keel::http::client* http_;
  std::string url_;
  http_exporter_options options_;
};

/// Collects spans in memory (for tests and for a caller that inspects its own spans).
class memory_exporter : public keel::trace::exporter {
 public:
  /// Appends `spans` to `spans()`.
  /// Cancellation: none (it does not suspend).
  boost::asio::awaitable<void> export_spans(const keel::trace::resource& from,
                                            std::vector<keel::trace::span_data> spans) override;
  /// Every span exported so far, in order.
  const std::vector<keel::trace::span_data>& spans() const noexcept { return spans_; }
  /// The batches exported so far.
  std::size_t batches() const noexcept { return batches_; }

 private:
  std::vector<keel::trace::span_data> spans_;
  std::size_t batches_ = 0;
};

}  // namespace keel::otlp
