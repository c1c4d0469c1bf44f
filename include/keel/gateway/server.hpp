// keel::gateway::server: an OpenAI-compatible HTTP/1.1 front for a `keel::llm::client`, so that a
// service in any language gets keel's policy by pointing its SDK's base_url at it (`keel serve`).
#pragma once

// Overview
// --------
// One server per process, on one executor (the client's), Beast inside lib/gateway:
//
//   POST /v1/chat/completions   an OpenAI chat completion through the client's whole policy
//                               (pacing, retries, fallbacks, breakers); see openai_wire.hpp for
//                               the translation, the errors and what is refused
//   GET  /v1/models             the served model names (`server_options::models`)
//   GET  /healthz               200 {"status": "ok"}; 503 {"status": "draining"} while draining
//   GET  /metrics               Prometheus text, when `server_options::metrics` is set
//
// The request's `model` names a route (else a 404 `model_not_found`, as OpenAI answers): one
// client per served model (`keel serve --config a.json --config b.json`: each config is a route
// named by its first entry's model), or one client for `server_options::models`. The call then
// runs that client's chain, each entry with its own model.
//
// Limits, so that no caller holds resources without bound: a request's header block
// (`max_header`, else 431) and body (`max_request_body`, else 413 and the connection closes);
// `Expect: 100-continue` is answered with `100 Continue` once the head has passed those limits;
// `read_timeout` for a whole request to arrive (head and body; a keep-alive connection with no
// request for that long is closed); `write_timeout` for an answer to leave; `max_connections`
// open at once. A call itself is bounded by the client's policy (`policy.deadline`). An accept
// that fails (e.g. out of file descriptors) is retried after 50 ms, not in a busy loop.
//
// Callers: with `clients` configured, `/v1/...` needs `Authorization: Bearer <key>` whose SHA-256
// is a client's `key_sha256` (else 401 `invalid_api_key`, which the SDKs raise as
// AuthenticationError; the key is never echoed). Each client's `requests_per_minute` (a token
// bucket with one second of burst) and `concurrency` are checked before the call: past either,
// a 429 at once (`rate_limit_exceeded` with retry-after, or `concurrency_limit_exceeded`), so
// that one caller cannot take the whole provider quota from the others. `/healthz` needs no key.
// Without `clients`, anyone who can connect is served: listen on loopback (the default) or
// behind a proxy that authenticates.
//
// Streams (`stream: true`): see `impl::stream` in lib/gateway/server.cpp. Nothing goes to the
// caller before the reply's first delta (keel's commit point), so a call that fails before it
// is answered like a non-streamed one; after it, OpenAI `chat.completion.chunk` events in
// chunked encoding, written one by one before the next delta is read (a slow caller slows the
// provider, keel buffers nothing), ending in `data: [DONE]`, or an error event if the stream
// was cut.
//
// Cancellation and shutdown: `drain(grace)` stops accepting, closes idle connections and lets
// calls in flight finish; after `grace` the rest are cancelled (their callers get a 503
// `shutting_down`), and it completes when no connection is left. `stop()` closes everything at
// once. A caller that disconnects while its call runs does not cancel it (the answer is dropped):
// the call's attempts are already paced and counted.
//
// Lifetime: the client must outlive what the server started on the executor: destroy it only
// after `stop()` (or a completed `drain`) and after the io_context has run the sessions to their
// end (e.g. once `run()` returned).
//
// Thread safety: one executor; call every member from it.

#include <keel/llm/client.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace keel::gateway {

/// Where and how a gateway listens.
struct server_options {
  /// The address to listen on (loopback by default: there are no gateway keys yet).
  std::string address = "127.0.0.1";
  /// The port (0: any free one; see `server::port`).
  unsigned short port = 0;
  /// The model names callers may ask for (empty: any).
  std::vector<std::string> models;
  /// The callers allowed, each by the SHA-256 of its key and with its own limits (config
  /// `serve.clients`); empty: no key needed.
  std::vector<keel::llm::serve_client> clients;
  /// The largest request body, bytes.
  std::size_t max_request_body = 4 * 1024 * 1024;
  /// The largest request header block, bytes.
  std::uint32_t max_header = 16 * 1024;
  /// Longest time for a whole request to arrive, and for an idle keep-alive connection.
  std::chrono::milliseconds read_timeout{std::chrono::seconds(30)};
  /// Longest time for an answer to be written.
  std::chrono::milliseconds write_timeout{std::chrono::seconds(30)};
  /// Connections open at once; one more is closed as soon as it is accepted (and counted in
  /// `server_stats::refused_connections`), so that idle or slow callers cannot use up the
  /// process's file descriptors.
  std::size_t max_connections = 4096;
  /// Records a server span per chat completion (`POST /v1/chat/completions`), a child of the
  /// caller's `traceparent`, with the routed client's call under it (not owned; must outlive the
  /// server). Null (the default): no spans; a caller's `traceparent` is still passed on to the
  /// provider.
  keel::trace::tracer* tracer = nullptr;
  /// If set, `GET /metrics` answers what it returns (Prometheus text format; no key needed, like
  /// `/healthz`); else 404.
  std::function<std::string()> metrics;
};

/// What a gateway has done so far.
struct server_stats {
  /// Connections accepted.
  std::uint64_t connections = 0;
  /// Requests read (every path).
  std::uint64_t requests = 0;
  /// Chat completions answered with 200.
  std::uint64_t completions = 0;
  /// Answers with a status >= 400 (every path).
  std::uint64_t errors = 0;
  /// Chat completions running now.
  std::size_t in_flight = 0;
  /// Requests refused for a missing or unknown key (401).
  std::uint64_t unauthorized = 0;
  /// Requests refused for a caller's rate or concurrency limit (429).
  std::uint64_t limited = 0;
  /// Connections closed at once because `max_connections` were open.
  std::uint64_t refused_connections = 0;
  /// Connections open now.
  std::size_t open_connections = 0;
};

/// A model name callers may ask for, and the client (its chain and policy) that answers it.
struct route {
  /// The `model` a request names.
  std::string model;
  /// The client that runs its calls (must outlive the server).
  keel::llm::client* client = nullptr;
};

/// An OpenAI-compatible HTTP/1.1 server in front of `keel::llm::client`s.
class server {
 public:
  /// A server for `client` (which must outlive it), answering `options.models` (any model if
  /// empty); nothing listens until `start()`.
  server(boost::asio::any_io_executor ex, keel::llm::client& client, server_options options);
  /// A server with one route per served model, each to its own client (chain and policy);
  /// `options.models` is ignored. Nothing listens until `start()`.
  /// @throws std::invalid_argument if two routes name the same model or a route has no client.
  server(boost::asio::any_io_executor ex, std::vector<route> routes, server_options options);
  /// Stops (as `stop()`).
  ~server();
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// Binds and listens.
  /// @throws boost::system::system_error if the address cannot be bound.
  void start();

  /// The port it listens on (after `start()`).
  unsigned short port() const noexcept;

  /// `http://address:port`.
  std::string base_url() const;

  /// Stops accepting, closes idle connections, lets calls in flight finish for up to `grace`,
  /// then cancels the rest; completes when no connection is left.
  /// Cancellation: cancelling the drain itself cancels the calls still in flight at once.
  boost::asio::awaitable<void> drain(std::chrono::nanoseconds grace);

  /// Closes the listener and every connection now; calls in flight are cancelled.
  void stop();

  /// Counters so far.
  server_stats stats() const;

 private:
  struct impl;
  std::shared_ptr<impl> impl_;
};

}  // namespace keel::gateway
