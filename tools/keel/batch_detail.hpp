// `keel batch`'s private declarations, shared by batch.cpp (set-up, workers, summary),
// batch_signals.cpp (SIGINT/SIGTERM) and batch_hooks.cpp (the client hooks: summary counts,
// metrics and log lines).
#pragma once

// The records a batch writes, and reads back on --resume, are in record.hpp.

#include <keel/llm/client.hpp>
#include <keel/llm/config.hpp>
#include "log.hpp"
#include "metrics.hpp"
#include "stats.hpp"

#include <chrono>
#include <string>
#include <vector>

namespace keel::cli::batch_detail {

/// Upper bounds of the item and attempt latency histograms, seconds.
inline const std::vector<double> latency_buckets = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                    1,     2.5,  5,     10,   30,  60,   120};

/// `d` as log lines show a delay: seconds with three decimals and a unit, "1.250s".
std::string seconds_text(std::chrono::nanoseconds d);

/// Sets `buckets.on_pacing`: every phase change or new estimate of a bucket's rate controller
/// sets the keel_pacing_* gauges and logs a `pacing` line at INFO.
/// @param m and @param log must outlive `buckets`' use of the callback.
void watch_pacing(llm::bucket_registry& buckets, metrics_registry& m, logger& log);

/// The client hooks of a batch run: each attempt, retry, fallback, breaker change, rate-limit
/// wait and breaker hold counts into `st` and the metrics `m`, and retries (WARNING), fallbacks
/// (INFO), breaker changes and holds (DEBUG) are logged. Every call's context must be its
/// `batch_item`, or null (`keel serve`: the logs then name no item).
/// @param cfg, @param st, @param m and @param log must outlive the client the hooks go to.
llm::client_hooks batch_hooks(const llm::client_config& cfg, batch_stats& st, metrics_registry& m,
                              logger& log);

}  // namespace keel::cli::batch_detail
