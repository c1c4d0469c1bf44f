// keel::trace: spans of calls and attempts, W3C trace context, parent-based sampling and a bounded
// export queue that never blocks a call. Knows nothing of HTTP or of an export format.
#pragma once

// Design
// ------
// keel records the OpenTelemetry data model (a span: trace id, span id, parent, name, kind, start
// and end, attributes, events, status) without the OpenTelemetry C++ SDK, which Debian 12 does
// not package and which would bring gRPC and protobuf into every build. What keel needs is small:
//
// - `span` is a move-only handle. A null handle (no tracer, or a trace that is not sampled) does
//   nothing: every method is one branch, so tracing that is off costs a branch per call site
//   (measured in docs/BENCHMARKS.md). A sampled span records into a `span_data` value it owns.
// - `tracer::start` makes a span: a child of `parent` when the parent is valid (same trace id,
//   the parent's sampled flag decides: parent-based sampling), else a root whose trace is
//   sampled when its trace id's last 8 bytes, read as a number, fall below
//   `sample_ratio` x 2^64 (OpenTelemetry's TraceIdRatioBased rule, so that every process of a
//   fleet keeps the same traces). Ids come from a seeded `keel::random_source`, times from an
//   injected clock (unix nanoseconds), so tests pin both.
// - A span that is not sampled still has a context (trace id, its own span id, flags 00): it is
//   what goes out in `traceparent`, so a server's spans still join the caller's trace.
// - Ending a span moves its data into the tracer's queue (bounded: `max_queue`; a span that
//   does not fit is dropped and counted). One export loop at a time runs on the tracer's
//   executor: it waits `interval` (not when a batch is full or a flush is asked for), hands at
//   most `max_batch` spans to the exporter and awaits it. A slow or failing exporter makes the
//   queue fill and drop spans; it never makes a call wait.
// - `exporter` is an interface (keel/otlp.hpp has OTLP/JSON over HTTP and a JSONL file); a test
//   can collect spans in memory.
//
// Example:
//
//     keel::otlp::file_exporter file{"trace.jsonl"};
//     keel::trace::tracer tracer{io.get_executor(), file, {.service_name = "my-service"}};
//     keel::trace::span call = tracer.start("chat gpt-4o-mini", keel::trace::span_kind::client);
//     call.set("gen_ai.request.model", "gpt-4o-mini");
//     call.add_event("keel.retry", {{"keel.delay_ms", 120.0}});
//     call.end();
//     co_await tracer.flush();   // before the program ends
//
// Thread safety: a tracer and its spans live on one executor (one thread).

#include <keel/random.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <array>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace keel::trace {

/// A 16-byte trace id (all zero: invalid).
using trace_id = std::array<std::uint8_t, 16>;
/// An 8-byte span id (all zero: invalid).
using span_id = std::array<std::uint8_t, 8>;

/// Where a span sits: its trace, itself, the sampled flag and the vendors' `tracestate`.
struct span_context {
  /// The trace.
  trace_id trace{};
  /// The span.
  span_id span{};
  /// W3C trace flags; bit 0 is "sampled".
  std::uint8_t flags = 0;
  /// The W3C `tracestate` value, passed on unchanged ("" when none).
  std::string state;

  /// True if both ids are nonzero.
  bool valid() const noexcept;
  /// True if the sampled flag is set.
  bool sampled() const noexcept { return (flags & 1) != 0; }
};

/// Reads a W3C `traceparent` header value (`00-<32 hex>-<16 hex>-<2 hex>`; a later version's
/// extra fields are ignored, as the spec asks) with its `tracestate`.
/// @returns the context, or nothing when the value is malformed or has a zero id (the spec says
///   to start a new trace then).
std::optional<span_context> parse_traceparent(std::string_view traceparent,
                                              std::string_view tracestate = {});

/// The `traceparent` header value of `c` (version 00).
std::string to_traceparent(const span_context& c);

/// Lower-case hex of `bytes`.
std::string to_hex(const std::uint8_t* bytes, std::size_t n);

/// An attribute value: the OpenTelemetry scalar types and a string array.
using value = std::variant<bool, std::int64_t, double, std::string, std::vector<std::string>>;

/// A named value on a span, an event or the resource.
struct attribute {
  /// The name, e.g. "gen_ai.request.model".
  std::string key;
  /// The value.
  trace::value value;

  // One constructor per type, so that a literal takes its own type (a `const char*` would
  // otherwise become a bool, a double an int).
  /// A value of any attribute type.
  attribute(std::string k, trace::value v) : key(std::move(k)), value(std::move(v)) {}
  /// A string.
  attribute(std::string k, std::string v) : key(std::move(k)), value(std::move(v)) {}
  /// A string.
  attribute(std::string k, const char* v) : key(std::move(k)), value(std::string(v)) {}
  /// A bool.
  attribute(std::string k, bool v) : key(std::move(k)), value(v) {}
  /// An integer.
  attribute(std::string k, int v) : key(std::move(k)), value(std::int64_t{v}) {}
  /// An integer.
  attribute(std::string k, std::int64_t v) : key(std::move(k)), value(v) {}
  /// An integer.
  attribute(std::string k, std::size_t v)
      : key(std::move(k)), value(static_cast<std::int64_t>(v)) {}
  /// A double.
  attribute(std::string k, double v) : key(std::move(k)), value(v) {}
};

/// Something that happened at one instant of a span.
struct event {
  /// The name, e.g. "keel.retry".
  std::string name;
  /// Unix time in nanoseconds.
  std::uint64_t time_unix_nano = 0;
  /// Its attributes.
  std::vector<attribute> attributes;
};

/// What a span stands for (OpenTelemetry's SpanKind numbers).
enum class span_kind { internal = 1, server = 2, client = 3 };

/// How a span ended (OpenTelemetry's status codes).
enum class status_code { unset = 0, ok = 1, error = 2 };

/// A finished span, as exporters receive it.
struct span_data {
  /// Its context (trace, span, flags, tracestate).
  span_context context;
  /// The parent span (all zero: a root).
  span_id parent{};
  /// The name, e.g. "chat gpt-4o-mini".
  std::string name;
  /// Its kind.
  span_kind kind = span_kind::internal;
  /// Unix time in nanoseconds at the start.
  std::uint64_t start_unix_nano = 0;
  /// Unix time in nanoseconds at the end.
  std::uint64_t end_unix_nano = 0;
  /// Its attributes, in the order set (a key set twice keeps its last value).
  std::vector<attribute> attributes;
  /// Its events, in order.
  std::vector<event> events;
  /// Its status.
  status_code status = status_code::unset;
  /// The status's message (only with `status_code::error`).
  std::string status_message;
  /// Attributes not kept (beyond `max_span_attributes`).
  std::uint32_t dropped_attributes = 0;
  /// Events not kept (beyond `max_span_events`).
  std::uint32_t dropped_events = 0;

  /// The value of `key`, or null.
  const trace::value* find(std::string_view key) const noexcept;
};

/// Attributes one span keeps at most (OpenTelemetry's default limit); more are counted.
inline constexpr std::size_t max_span_attributes = 128;
/// Events one span keeps at most (OpenTelemetry's default limit); more are counted.
inline constexpr std::size_t max_span_events = 128;

/// Who is tracing: the `resource` and instrumentation scope of every span a tracer exports.
struct resource {
  /// Resource attributes (`service.name`, `telemetry.sdk.*`, ...).
  std::vector<attribute> attributes;
  /// The instrumentation scope's name ("keel").
  std::string scope_name = "keel";
  /// The instrumentation scope's version (keel's).
  std::string scope_version;
};

/// Receives batches of finished spans.
class exporter {
 public:
  virtual ~exporter() = default;
  /// Delivers `spans` (at most `tracer_options::max_batch`). Awaited by the tracer's export loop
  /// only, one batch at a time.
  /// @throws anything to report a failed delivery: the tracer counts it and drops the batch.
  /// Cancellation: not cancelled by the tracer; an exporter bounds its own time.
  virtual boost::asio::awaitable<void> export_spans(const resource& from,
                                                    std::vector<span_data> spans) = 0;
};

/// A tracer's settings.
struct tracer_options {
  /// `service.name` of the resource.
  std::string service_name = "keel";
  /// Share of root traces sampled, in [0, 1]; a child follows its parent's flag.
  double sample_ratio = 1.0;
  /// Ended spans held for export at most; more are dropped (and counted).
  std::size_t max_queue = 2048;
  /// Spans per exporter call at most.
  std::size_t max_batch = 512;
  /// How long the export loop waits for a batch to fill.
  std::chrono::milliseconds interval{1000};
  /// After the exporter fails a batch, batches are dropped (and counted as failed) without
  /// calling it for this long: a collector that is down costs one export timeout per pause.
  std::chrono::milliseconds failure_pause{30000};
  /// Seeds the ids (0: drawn from `std::random_device`).
  std::uint64_t seed = 0;
  /// Root trace ids in AWS X-Ray's form: the first 4 bytes are the start's Unix time in seconds
  /// (as OpenTelemetry's AWSXRayIdGenerator makes them), so that the AWS X-Ray exporter of an
  /// OpenTelemetry collector can turn them into X-Ray trace ids.
  bool xray_ids = false;
  /// Unix time in nanoseconds (empty: the system clock).
  std::function<std::uint64_t()> now;
  /// Extra resource attributes (e.g. `deployment.environment`).
  std::vector<attribute> resource_attributes;
  /// Called when the exporter fails a batch, with its error and the spans lost (e.g. to log
  /// it); must not throw.
  std::function<void(const std::exception_ptr&, std::size_t)> on_export_error;
};

/// What a tracer did, for metrics.
struct tracer_stats {
  /// Spans started that were sampled.
  std::uint64_t sampled = 0;
  /// Spans handed to the exporter whose batch it accepted.
  std::uint64_t exported = 0;
  /// Spans dropped because the queue was full.
  std::uint64_t dropped = 0;
  /// Spans lost in batches the exporter failed.
  std::uint64_t failed = 0;
  /// Exporter calls that threw.
  std::uint64_t failed_exports = 0;
};

class tracer;
namespace detail {
struct tracer_state;
}  // namespace detail

/// A span being recorded, or nothing (a null handle does nothing). Move-only; the destructor
/// ends it.
class span {
 public:
  /// A null span: records nothing, has an invalid context.
  span() = default;
  span(span&& other) noexcept;
  span& operator=(span&& other) noexcept;
  span(const span&) = delete;
  span& operator=(const span&) = delete;
  /// Ends the span if it has not ended.
  ~span() { end(); }

  /// True while the span records (sampled and not ended).
  bool recording() const noexcept { return data_ != nullptr; }
  /// Its context: what to propagate (valid whenever a tracer made it, sampled or not).
  const span_context& context() const noexcept { return context_; }

  // Every setter tests for a null span before it builds anything: with tracing off a call site
  // costs one branch per call.
  /// Sets `key` (replacing an earlier value of the same key).
  void set(std::string_view key, trace::value v) {
    if (data_) {
      set_value(key, std::move(v));
    }
  }
  /// Sets a string attribute (not the bool a `const char*` would become).
  void set(std::string_view key, const char* v) {
    if (data_) {
      set_value(key, std::string(v));
    }
  }
  /// Sets a string attribute.
  void set(std::string_view key, std::string v) {
    if (data_) {
      set_value(key, std::move(v));
    }
  }
  /// Sets a bool attribute.
  void set(std::string_view key, bool v) {
    if (data_) {
      set_value(key, v);
    }
  }
  /// Sets an integer attribute.
  void set(std::string_view key, int v) {
    if (data_) {
      set_value(key, std::int64_t{v});
    }
  }
  /// Sets an integer attribute.
  void set(std::string_view key, std::int64_t v) {
    if (data_) {
      set_value(key, v);
    }
  }
  /// Sets an integer attribute.
  void set(std::string_view key, std::size_t v) {
    if (data_) {
      set_value(key, static_cast<std::int64_t>(v));
    }
  }
  /// Sets a double attribute.
  void set(std::string_view key, double v) {
    if (data_) {
      set_value(key, v);
    }
  }
  /// Adds an event at the current time. Its attributes are built before the call even on a null
  /// span: on a hot path, build them under `if (s.recording())`.
  void add_event(std::string_view name, std::vector<attribute> attributes = {});
  /// Marks the span failed: status error with `message`, and `error.type` = `type`.
  void set_error(std::string_view type, std::string_view message);
  /// Marks the span successful (status ok).
  void set_ok();
  /// Renames the span (a name known only once the span is known to record).
  void set_name(std::string name);
  /// Ends the span and queues it for export; later calls do nothing.
  void end() {
    if (data_) {
      finish();
    }
  }

 private:
  friend class tracer;
  void set_value(std::string_view key, trace::value v);
  void finish();
  std::shared_ptr<detail::tracer_state> owner_;  // keeps the queue alive while the span is open
  span_context context_;
  std::unique_ptr<span_data> data_;
};

/// Makes spans and exports them in batches (see the header comment).
class tracer {
 public:
  /// A tracer exporting to `exp`, which must outlive the tracer (and an export in flight when the
  /// tracer is destroyed). Destroying the tracer drops what is still queued: `flush` first.
  tracer(boost::asio::any_io_executor ex, exporter& exp, tracer_options options = {});
  ~tracer();
  tracer(const tracer&) = delete;
  tracer& operator=(const tracer&) = delete;

  /// Starts a span named `name`: a child of `parent` when it is valid (and sampled as the
  /// parent is), else a root (sampled by `sample_ratio`). A span that is not sampled is null but
  /// has a context to propagate.
  span start(std::string_view name, span_kind kind, const span_context* parent = nullptr);

  /// Unix time in nanoseconds by the tracer's clock.
  std::uint64_t now() const;

  /// Exports every queued span, then returns (waits for an export in flight first); returns at
  /// once when the tracer is destroyed meanwhile. The awaitable holds the tracer's state, so it
  /// may outlive the tracer.
  /// Cancellation: the wait ends with `operation_aborted`; what was queued stays queued.
  boost::asio::awaitable<void> flush();

  /// Counters so far.
  tracer_stats stats() const noexcept;

  /// The resource every span is exported with.
  const trace::resource& resource() const noexcept;

 private:
  std::shared_ptr<detail::tracer_state> state_;
};

}  // namespace keel::trace
