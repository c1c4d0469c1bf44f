// The keel command's traces: a keel::trace::tracer exporting to a JSONL file (--trace FILE)
// and/or the config's OTLP endpoint (`trace.otlp_endpoint`), flushed at the end of the run.
#pragma once

#include "log.hpp"

#include <keel/http/client.hpp>
#include <keel/llm/config.hpp>
#include <keel/otlp.hpp>
#include <keel/trace.hpp>

#include <boost/asio/io_context.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace keel::cli {

/// Reads OpenTelemetry's `name=value,name=value` header list (values percent-decoded).
/// @throws std::runtime_error naming `source` (an environment variable), never the values, for
///   an entry without `=` or with an empty name.
std::vector<std::pair<std::string, std::string>> parse_otlp_headers(const std::string& text,
                                                                    const std::string& source);

/// Where a command's spans go, and its tracer (null when tracing is off).
class trace_sink {
 public:
  /// A tracer when `file` is not empty (a JSONL file of OTLP/JSON requests) or the config names
  /// an OTLP endpoint (both: each batch goes to both); otherwise none.
  /// @param env reads the header variable (`trace.headers_env`).
  /// @throws std::runtime_error if the file cannot be opened or the header variable is malformed.
  trace_sink(boost::asio::any_io_executor ex, const keel::llm::trace_config& cfg,
             const std::string& file, logger& log, const keel::llm::env_lookup& env);
  ~trace_sink();

  /// The tracer (null when tracing is off).
  keel::trace::tracer* tracer() noexcept { return tracer_.get(); }

  /// Exports what is queued, running `ctx` (whose run has ended) until done, and logs an INFO
  /// line with the counts. Does nothing when tracing is off.
  void finish(boost::asio::io_context& ctx);

 private:
  struct tee;
  logger* log_;
  std::string where_;  // for the log line: the file and/or the URL
  std::unique_ptr<keel::http::client> http_;
  std::vector<std::unique_ptr<keel::trace::exporter>> exporters_;
  std::unique_ptr<keel::trace::exporter> tee_;
  std::unique_ptr<keel::trace::tracer> tracer_;
};

}  // namespace keel::cli
