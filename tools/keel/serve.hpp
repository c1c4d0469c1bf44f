// `keel serve`: an OpenAI-compatible gateway in front of a configured policy (issue 18).
#pragma once

#include "log.hpp"

#include <keel/llm/config.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace keel::cli {

/// What `keel serve` was asked to do.
struct serve_options {
  /// `ADDR:PORT` to listen on.
  std::string listen = "127.0.0.1:8080";
  /// How long calls in flight may finish after SIGINT/SIGTERM, seconds.
  double grace = 30;
  /// Write spans to this file as OTLP/JSON lines (empty: only the config's
  /// `trace.otlp_endpoint`, if any).
  std::string trace_file;
};

/// Serves `cfgs`, one route per config (its chain of entries answers the model named by its
/// first entry), until SIGINT or SIGTERM, then drains for `o.grace`. Prints the listening
/// address on stdout.
/// @returns the exit status (0 after a clean drain).
/// @throws std::invalid_argument for a bad `--listen`, two configs serving one model, or one
///   caller key in two configs, or two configs with different OTLP endpoints;
///   std::runtime_error naming the address if it cannot listen.
int run_serve(const std::vector<llm::client_config>& cfgs, const serve_options& o, logger& log);

}  // namespace keel::cli
