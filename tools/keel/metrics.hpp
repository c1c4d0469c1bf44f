// The keel command's Prometheus metrics: a registry of counters, gauges and histograms, and a
// small HTTP server that exposes it at GET /metrics.
#pragma once

// Overview
// --------
// `metrics_registry` owns metric series and renders them in the Prometheus text exposition
// format 0.0.4. A series is identified by its metric name and its label set; asking for the same
// series again returns the same object, so callers may either keep the reference or look the
// series up each time:
//
//   - `counter`: a monotonically increasing value (`inc`).
//   - `gauge`: a value that goes up and down (`set`, `add`).
//   - `histogram`: observations counted into cumulative buckets (`observe`), rendered as
//     `<name>_bucket{le="..."}` (one series per upper bound plus `le="+Inf"`), `<name>_sum` and
//     `<name>_count`.
//
// `render()` writes one `# HELP` and one `# TYPE` line per metric family, families sorted by name
// (byte order), and the family's series in the order they were first registered, each with its
// labels in the order given at registration. Label values and help text are escaped as the
// format requires. Numbers are written so that Prometheus parses them exactly: integers up to
// 2^53 without an exponent ("1000000"), other values in the shortest form that round-trips
// ("0.1", "1e+20"), and the specials as "+Inf", "-Inf" and "NaN".
//
// Names are checked when a series is registered: metric names must match
// `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names `[a-zA-Z_][a-zA-Z0-9_]*` and must not start with
// `__` (reserved by Prometheus); a histogram may not use the label `le`; label values and help
// text must be valid UTF-8. The registry does not enforce naming *conventions* (`_total` on
// counters, base units), which `promtool check metrics` lints.
//
// `metrics_server` serves `registry.render()` over HTTP/1.1 (keep-alive) on an Asio executor, for
// a Prometheus server to scrape. (The registry is implemented in metrics.cpp, the server in
// metrics_server.cpp.)
//
// Example:
//
//     keel::cli::metrics_registry registry;
//     auto& requests = registry.counter("keel_requests_total", "Requests sent to a provider.",
//                                       {{"provider", "openai"}, {"status", "200"}});
//     auto& latency = registry.histogram("keel_request_duration_seconds",
//                                        "Time from sending a request to its complete answer.",
//                                        {0.1, 0.5, 1, 5, 30}, {{"provider", "openai"}});
//     requests.inc();
//     latency.observe(0.42);
//
//     boost::asio::io_context ctx;
//     keel::cli::metrics_server server{ctx.get_executor(), registry, "127.0.0.1", 9464};
//     server.start();  // throws boost::system::system_error if 127.0.0.1:9464 is taken
//     ctx.run();       // curl http://127.0.0.1:9464/metrics
//
// Thread safety: a `metrics_registry` is safe to use from any number of threads. Registration
// and `render()` take one mutex per registry; `counter` and `gauge` updates are lock-free
// (an atomic double updated by compare-and-swap), and each `histogram` has its own mutex so that
// a render sees its buckets, sum and count consistent with each other. A `metrics_server` is not
// thread-safe: it lives on the executor it was given (an io_context run by one thread, or a
// strand), and `start()`, `stop()`, `port()` and its destructor must be called on that executor
// or while it is not running. Rendering for a scrape is safe while other threads update metrics.
//
// Lifetime: the registry must outlive every server that serves it, and the executor's execution
// context must outlive the server.

#include <boost/asio/any_io_executor.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::cli {

/// The labels of one series: (name, value) pairs, rendered in this order. Two label sets with the
/// same pairs in a different order name the same series.
using label_set = std::vector<std::pair<std::string, std::string>>;

class metrics_registry;

/// A monotonically increasing value, e.g. requests sent. Obtained from
/// `metrics_registry::counter`; lives as long as its registry.
class counter {
 public:
  /// Not copyable: callers hold references to the registry's object.
  counter(const counter&) = delete;
  /// Not assignable.
  counter& operator=(const counter&) = delete;

  /// Adds `v` (default 1) to the counter. Lock-free; safe from any thread.
  /// @throws std::invalid_argument if `v` is negative or NaN (a counter never goes down).
  void inc(double v = 1);
  /// The current value (starts at 0).
  double value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  friend class metrics_registry;
  counter() = default;
  std::atomic<double> value_{0};
};

/// A value that goes up and down, e.g. requests in flight. Obtained from
/// `metrics_registry::gauge`; lives as long as its registry.
class gauge {
 public:
  /// Not copyable: callers hold references to the registry's object.
  gauge(const gauge&) = delete;
  /// Not assignable.
  gauge& operator=(const gauge&) = delete;

  /// Sets the gauge to `v` (any value, including infinities and NaN). Lock-free.
  void set(double v) noexcept { value_.store(v, std::memory_order_relaxed); }
  /// Adds `v` (negative to subtract) to the gauge. Lock-free; safe from any thread.
  void add(double v) noexcept;
  /// The current value (starts at 0).
  double value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  friend class metrics_registry;
  gauge() = default;
  std::atomic<double> value_{0};
};

/// Observations counted into buckets by upper bound, e.g. request latencies. Obtained from
/// `metrics_registry::histogram`; lives as long as its registry.
class histogram {
 public:
  /// Not copyable: callers hold references to the registry's object.
  histogram(const histogram&) = delete;
  /// Not assignable.
  histogram& operator=(const histogram&) = delete;

  /// Records one observation: it counts in every bucket whose upper bound is >= `v` (and in
  /// `+Inf`), and is added to the sum. A NaN counts only in `+Inf` and makes the sum NaN, as in
  /// the Prometheus client libraries. Takes this histogram's mutex; safe from any thread.
  void observe(double v);
  /// How many observations were recorded.
  std::uint64_t count() const;
  /// The sum of all observations.
  double sum() const;

 private:
  friend class metrics_registry;
  explicit histogram(std::vector<double> upper_bounds);

  std::vector<double> upper_bounds_;    // strictly increasing, finite; +Inf is implicit
  mutable std::mutex mu_;               // guards the three below
  std::vector<std::uint64_t> buckets_;  // per bucket, not cumulative; one extra for +Inf
  std::uint64_t count_ = 0;
  double sum_ = 0;
};

/// A set of metric families that renders itself in the Prometheus text format 0.0.4.
class metrics_registry {
 public:
  /// Creates an empty registry (`render()` returns "").
  metrics_registry();
  /// Destroys every series; references obtained from the registry dangle afterwards.
  ~metrics_registry();
  /// Not copyable: callers hold references into the registry.
  metrics_registry(const metrics_registry&) = delete;
  /// Not assignable.
  metrics_registry& operator=(const metrics_registry&) = delete;

  /// The counter series `name{labels}`, created at 0 on first use. The reference stays valid
  /// for the registry's lifetime; the same name and label set (in any order) return the same
  /// object. The family's help is the one given first; later `help` arguments are ignored.
  /// @throws std::invalid_argument if the metric name, a label name or a label value is invalid
  /// (see the overview) or a label name repeats.
  /// @throws std::logic_error if `name` is already registered with another type, or would
  /// clash with a histogram's `_bucket`, `_sum` or `_count` series.
  keel::cli::counter& counter(std::string_view name, std::string_view help, label_set labels = {});

  /// The gauge series `name{labels}`, created at 0 on first use. Same identity, lifetime and
  /// errors as `counter()`.
  keel::cli::gauge& gauge(std::string_view name, std::string_view help, label_set labels = {});

  /// The histogram series `name{labels}` with buckets `upper_bounds`, created empty on first
  /// use. `upper_bounds` must be strictly increasing and finite; a trailing `+Inf` is accepted
  /// and dropped (the `+Inf` bucket is always rendered). Same identity and lifetime as
  /// `counter()`.
  /// @throws std::invalid_argument for an invalid name or label (as `counter()`), the label
  /// name `le`, or invalid bounds.
  /// @throws std::logic_error if `name` is already registered with another type or other
  /// bounds, or its `_bucket`, `_sum` or `_count` series would clash with another family.
  keel::cli::histogram& histogram(std::string_view name, std::string_view help,
                                  std::vector<double> upper_bounds, label_set labels = {});

  /// Every family in the text exposition format 0.0.4 (see the overview), ending with a newline
  /// unless the registry is empty. Safe from any thread while metrics are updated.
  std::string render() const;

 private:
  enum class kind : unsigned char;
  struct family;
  // The family `name`, created if absent; throws on a type or bucket conflict (under mu_).
  family& family_for(std::string_view name, std::string_view help, kind type,
                     const std::vector<double>* bounds);

  mutable std::mutex mu_;  // guards families_ (the map and every family's series list)
  std::map<std::string, std::unique_ptr<family>, std::less<>> families_;
};

/// An HTTP/1.1 server that answers `GET /metrics` with a registry's rendering.
///
/// Routes: `GET` (or `HEAD`) `/metrics`, with or without a query string, answers 200 with
/// `Content-Type: text/plain; version=0.0.4; charset=utf-8` and `registry.render()` as the body
/// (rendered afresh for each request). Any other path answers 404; another method on
/// `/metrics` answers 405 with `Allow: GET, HEAD`. Connections are kept alive as HTTP/1.1
/// allows. A request whose header exceeds 64 KiB answers 431, one whose body exceeds 64 KiB
/// answers 413, a malformed one 400; each of those closes the connection. A connection that
/// sends no complete request within 120 s, or does not take a response within 120 s, is closed.
class metrics_server {
 public:
  /// Creates a server that will listen on `address`:`port` (port 0: an ephemeral port) and run
  /// on `ex`. Nothing is bound until `start()`. `registry` must outlive the server.
  metrics_server(boost::asio::any_io_executor ex, const metrics_registry& registry,
                 std::string address = "127.0.0.1", unsigned short port = 0);
  /// Stops the server (see `stop()`).
  ~metrics_server();
  /// Not copyable.
  metrics_server(const metrics_server&) = delete;
  /// Not assignable.
  metrics_server& operator=(const metrics_server&) = delete;

  /// Binds and listens, then accepts connections on the executor. Does nothing if the server is
  /// already running.
  /// @throws boost::system::system_error whose message names the address and port if the
  /// address is invalid or cannot be bound (e.g. the port is taken); the server can then be
  /// started again.
  /// @throws std::logic_error if the server was stopped (a stopped server is not restarted).
  void start();

  /// The port the server listens on (the ephemeral one when constructed with port 0); 0 until
  /// `start()` succeeds.
  unsigned short port() const noexcept;

  /// Stops serving; idempotent. Closes the acceptor and every open connection at once: a request
  /// being read or a response being written is abandoned (its client sees the connection close
  /// without a complete response), and a request already read is not answered. Does not block;
  /// the sessions finish on the executor, and `render()` is never called after `stop()` returns.
  void stop();

 private:
  struct impl;
  std::shared_ptr<impl> impl_;
};

}  // namespace keel::cli
