// keel: every public facility of the core runtime in one include.
#pragma once

// Overview
// --------
// Including this header gives the whole core: errors and classification, results, clocks,
// randomness, backoff, retry budget, with_retry, with_deadline, with_fallback, the circuit
// breaker and with_breaker, the throttler with with_throttle and its rate controller, the
// bulkhead with with_bulkhead, with_hedge with its budget and latency window, fan_out, and the
// spans of keel::trace. Each also has its own header; include only what you use to keep compile
// times down.
//
// Example:
//
//     #include <keel/keel.hpp>
//     auto reply = co_await keel::with_retry([&] { return call_model(p); }, keel::retry_policy{});

#include <keel/backoff.hpp>
#include <keel/bulkhead.hpp>
#include <keel/circuit_breaker.hpp>
#include <keel/classify.hpp>
#include <keel/clock.hpp>
#include <keel/deadline.hpp>
#include <keel/error.hpp>
#include <keel/fallback.hpp>
#include <keel/fan_out.hpp>
#include <keel/hedge.hpp>
#include <keel/random.hpp>
#include <keel/rate_controller.hpp>
#include <keel/result.hpp>
#include <keel/retry.hpp>
#include <keel/retry_budget.hpp>
#include <keel/stream_guard.hpp>
#include <keel/throttler.hpp>
#include <keel/trace.hpp>
