// keel::http::client: an HTTP/1.1 + TLS client with a keep-alive connection pool per host.
#pragma once

// Overview
// --------
// `keel::http::client` sends a plain `keel::http::request` and returns a `keel::http::response`
// (message.hpp). It keeps a pool of keep-alive connections per (scheme, host, port), speaks
// `http://` and `https://` (SNI and host name verification against the system trust store by
// default), de-chunks responses, and enforces size limits so that a hostile or broken server can
// never make it use unbounded memory. Beast and OpenSSL stay inside lib/http; this header does not
// include them.
//
// Failures are thrown as `keel::failure` whose code classifies correctly (see error.hpp):
// refused, reset and closed connections are `transient`, timeouts are `timeout`, limits, bad URLs
// and certificate failures are `permanent`. The message names the method and the URL (with its
// query string redacted, since some APIs put keys there) and never a header value. The client
// does not retry on its own: wrap `send` in `keel::with_retry`.
//
// Cancellation: `send`, `open` and `response_reader::read_some` support terminal cancellation
// (which `keel::with_deadline` emits). The socket operation in progress completes with
// `operation_aborted`, the connection is closed (a connection that was cancelled or failed in the
// middle of a message is never reused), and the operation throws `operation_aborted`
// (`keel::condition::cancelled`). A connection goes back to the pool only after a complete
// response that allows keep-alive.
//
// Example:
//
//     keel::http::client http{ex, keel::http::client_options{}};
//     keel::http::request req{"POST", "https://api.openai.com/v1/chat/completions"};
//     req.set("authorization", "Bearer " + key);
//     req.set("content-type", "application/json");
//     req.body = body;
//     keel::http::response res = co_await keel::with_deadline([&] { return http.send(req); }, 60s);
//
// Streaming: `open` returns as soon as the status line and header fields have arrived, with a
// `response_reader` whose `read_some` hands over the de-chunked body piece by piece as it
// arrives (server-sent events, AWS event-stream). `send` is `open` followed by reading the body to
// its end, on the same code path.
//
//     keel::http::response_reader body = co_await http.open(req);
//     if (body.head().status != 200) { ... }
//     while (auto piece = co_await keel::with_deadline([&] { return body.read_some(); }, 30s)) {
//       decoder.feed(*piece);
//     }
//
// Thread safety: a client is not thread-safe. Call `send`, `open`, a reader's members (and the
// counters) only from coroutines running on the client's executor; to use one client from
// several threads, give it a strand. The client may be destroyed while sends are in flight only
// if the executor is stopped first (sends keep the pool alive until they finish). A
// `response_reader` may outlive its client: see `response_reader`.

#include <keel/http/message.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace keel::http {

/// TLS settings of a client.
struct tls_options {
  /// Verify the server's certificate chain and host name (default). The system trust store is
  /// used (`set_default_verify_paths`), plus `ca_file` if given. The store is loaded when the
  /// client opens its first TLS connection, on the thread that runs the client (once, tens of
  /// milliseconds; a client of plain-HTTP servers never pays for it); a `ca_file` is loaded when
  /// the client is made, so that a bad one fails there.
  bool verify_peer = true;
  /// A PEM file of extra trusted CA certificates (e.g. a private CA), if any.
  std::optional<std::string> ca_file;
  /// Accept any certificate, for any host name. **Insecure**: anyone on the path can read and
  /// change the traffic, including API keys. Meant only for local test servers; the client prints
  /// a warning to stderr once when it is constructed with this set.
  bool insecure_skip_verify = false;
  /// Resume TLS sessions: the client keeps the latest session ticket each (scheme, host, port)
  /// gave it and offers it on the next connection there, which then skips the certificate
  /// exchange and its verification (the certificate was verified, for the same host name, when
  /// the session began). A server may always decline; the handshake is then a full one.
  bool resume_sessions = true;

  tls_options() = default;
};

/// Limits and settings of a client; the defaults suit LLM APIs.
struct client_options {
  /// At most this many connections (busy or idle) per (scheme, host, port); further sends wait
  /// in FIFO order for one to become free.
  std::size_t max_connections_per_host = 64;
  /// An idle pooled connection older than this is closed instead of reused.
  std::chrono::steady_clock::duration idle_timeout = std::chrono::seconds(90);
  /// A connection is closed after this many requests.
  std::size_t max_requests_per_connection = 1000;
  /// Time allowed for TCP connect plus TLS handshake (`error::connect_timeout`).
  std::chrono::steady_clock::duration connect_timeout = std::chrono::seconds(10);
  /// Time allowed for writing the request and reading the whole response
  /// (`error::request_timeout`); `std::nullopt` for none. 600 s like the official SDKs.
  /// For `client::open` it covers writing the request and reading the status line and header
  /// fields only: a streamed body may legitimately take longer than any whole-request bound, so
  /// `response_reader::read_some` has no timeout of its own. Bound it with the deadlines that
  /// fit a stream (time to first piece, idle time between pieces) through `keel::with_deadline`
  /// or cancellation.
  std::optional<std::chrono::steady_clock::duration> request_timeout = std::chrono::seconds(600);
  /// Largest accepted response body in bytes (`error::body_too_large`). For
  /// `response_reader::read_some` it bounds the total over all reads.
  std::size_t max_response_body = 16 * 1024 * 1024;
  /// Most accepted response header fields (`error::too_many_headers`).
  std::size_t max_header_count = 100;
  /// Largest accepted response header (status line and fields) in bytes
  /// (`error::header_too_large`). It also bounds, plus one 64 KiB read, the bytes of a chunked
  /// body's metadata waiting to be parsed (a chunk-size line with its extensions, the trailer
  /// section), which Beast itself does not limit; a single field over 65,535 bytes, which
  /// Beast cannot store, is `error::header_too_large` too.
  std::size_t max_header_bytes = 64 * 1024;
  /// The User-Agent sent when a request has none.
  std::string user_agent = "keel/0.1";
  /// TLS settings.
  tls_options tls;

  client_options() = default;
};

/// True if `client::send` accepts `url`: `http://` or `https://`, a host (IPv6 in brackets), an
/// optional port 1-65535, no `user:password@`, no spaces or control characters. Lets a
/// configuration be checked before anything is sent. No I/O (no name lookup), so nothing to
/// cancel.
bool valid_url(std::string_view url);

/// `url` as it may be shown in errors, logs and printed configs: the value of every query
/// parameter becomes `<redacted>` (a parameter without `=` wholly), `user:password@` becomes
/// `<redacted>@` and a fragment is dropped; scheme, host, port, path and parameter names stay.
/// Some APIs take the key in the query (`?key=...`). No I/O.
/// Example: `redact_url("https://h/v1?key=abc&alt=json")` is
/// `"https://h/v1?key=<redacted>&alt=<redacted>"`.
std::string redact_url(std::string_view url);

class client;

/// A response whose status line and header fields have arrived and whose body is read piece by
/// piece, as it arrives; returned by `client::open`. It owns the response's connection: the
/// connection goes back to the client's pool when the body has been read to its end (and keep-alive
/// allows it), and is closed if the reader is closed, destroyed or fails before that. Until then
/// it holds one of its host's `max_connections_per_host` slots, so a reader left unread makes
/// other sends to that host wait. Movable, not copyable.
///
/// The reader keeps the client's internals (pool, TLS context) alive, so it stays usable after its
/// client is destroyed (the executor must still run); its connection is then closed at the end of
/// the body instead of pooled. Thread safety: as the client's (its executor only).
class response_reader {
 public:
  /// Takes over `other`'s response; `other` is left without one (as after `close()`).
  response_reader(response_reader&& other) noexcept;
  /// Closes this reader's connection (unless its body was read to its end) and takes over
  /// `other`'s response.
  response_reader& operator=(response_reader&& other) noexcept;
  response_reader(const response_reader&) = delete;
  response_reader& operator=(const response_reader&) = delete;
  /// Closes the connection at once unless the body was read to its end. Must not run while a
  /// `read_some` is in progress (as for any Asio I/O object).
  ~response_reader();

  /// The status, reason and header fields of the final (non-1xx) response; its `body` is empty.
  /// Not for a moved-from reader.
  const response& head() const noexcept;

  /// Reads the next piece of the body (de-chunked): completes as soon as at least one body byte
  /// is available, with every body byte the connection has delivered so far (at most one read,
  /// 64 KiB over TCP and 16 KiB over TLS, plus what arrived with the header; it never waits to
  /// fill a buffer). Between reads, and over TCP while a read waits for the next bytes, the
  /// reader holds no read buffer, so an idle stream costs a few KiB. Returns an empty
  /// optional once the body has ended (a piece is never empty). A body framed by Content-Length,
  /// by chunked encoding or by the server closing the connection all work; a HEAD response, a
  /// 204 or a 304 has no body and returns an empty optional at once.
  ///
  /// When the body ends (`done()` becomes true, possibly with the last piece), the connection
  /// goes back to the client's pool if keep-alive allows.
  /// @throws keel::failure with `error::body_too_large` when the total body would exceed
  /// `client_options::max_response_body` (a Content-Length that exceeds it is refused at the
  /// first read, before any byte of it is returned), `error::truncated_response` when the peer
  /// closes in the middle of the body, `error::protocol_error` for a malformed chunked encoding,
  /// `error::header_too_large` for chunk metadata or trailers over `max_header_bytes`, or an Asio
  /// network code (reset). Any failure closes the connection at once; later calls throw
  /// `operation_aborted`. After `close()` (or on a moved-from reader) it throws
  /// `operation_aborted`.
  /// No timeout of its own (`client_options::request_timeout` ended with `open`): use
  /// `keel::with_deadline` for first-piece and idle deadlines.
  /// Cancellation: terminal cancellation (what `keel::with_deadline` emits) aborts the socket
  /// read, closes the connection at once (the server sees the close) and throws
  /// `operation_aborted`; bytes read in that call are lost, so the reader cannot be resumed.
  /// While the read waits for the server's next bytes, the socket is closed inside the
  /// cancellation handler itself, before the coroutine runs again. The reader must outlive the
  /// operation and must not be read by two operations at once.
  boost::asio::awaitable<std::optional<std::string>> read_some();

  /// True once the end of the body has been read (the last piece may still be in the hands of
  /// the caller: then the next `read_some` returns an empty optional).
  bool done() const noexcept;

  /// How many body bytes `read_some` has returned so far.
  std::size_t bytes_read() const noexcept;

  /// Abandons the body: closes the connection at once, so the server sees the close (an LLM
  /// stops generating and billing), and frees its pool slot. Does nothing if the body was read
  /// to its end or the reader is already closed. A `read_some` in progress completes with
  /// `operation_aborted`.
  void close() noexcept;

 private:
  friend class client;
  struct state;
  explicit response_reader(std::unique_ptr<state> s) noexcept;
  std::unique_ptr<state> state_;
};

/// An HTTP/1.1 client with a keep-alive connection pool per host.
class client {
 public:
  /// Creates a client whose connections and timers run on `ex`.
  /// @throws boost::system::system_error if the TLS settings cannot be applied (e.g. `ca_file`
  /// cannot be read).
  client(boost::asio::any_io_executor ex, client_options options);
  /// Closes idle connections. See the thread-safety note about sends in flight.
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// Sends `req` and returns the complete response (any final status; a 5xx is a response, not
  /// an exception). Interim 1xx responses (100 Continue, 103 Early Hints) are read past; a status
  /// below 100, or 101 Switching Protocols, is `error::protocol_error`.
  ///
  /// Reuses an idle pooled connection to the same (scheme, host, port) when there is one,
  /// otherwise opens one if the host has fewer than `max_connections_per_host`, otherwise waits
  /// in FIFO order. Adds Host, User-Agent (if absent) and Content-Length.
  /// @throws keel::failure with a `keel::http::error` (limits, bad URL, timeouts, protocol and
  /// TLS failures) or an Asio network code (refused, reset, host not found); the message names
  /// the method and URL, never a header value.
  /// Cancellation: terminal cancellation aborts the pool wait or socket operation in progress,
  /// closes the connection, and throws `operation_aborted`.
  boost::asio::awaitable<response> send(request req);

  /// Sends `req` and returns once the final response's status line and header fields have
  /// arrived, with a reader for its body (any final status: a 5xx is a reader too). Everything
  /// up to the header is as `send`: URL and header checks, the pool, connect and TLS, Host,
  /// User-Agent and Content-Length, interim 1xx responses read past, the header limits, and the
  /// same errors. `client_options::request_timeout` covers writing the request and reading the
  /// header only; the body has no timeout of its own (see `response_reader::read_some`).
  /// @throws keel::failure as `send` does (but never `body_too_large`: the body is not read yet).
  /// Cancellation: terminal cancellation aborts the pool wait or socket operation in progress,
  /// closes the connection, and throws `operation_aborted`.
  boost::asio::awaitable<response_reader> open(request req);

  /// The executor the client runs on.
  boost::asio::any_io_executor get_executor() const noexcept;
  /// How many connections this client has opened (TCP connects that succeeded), for tests.
  std::size_t connections_opened() const noexcept;
  /// How many TLS connections resumed a session (see `tls_options::resume_sessions`).
  std::size_t tls_sessions_resumed() const noexcept;
  /// How many idle connections sit in the pool now, over all hosts, for tests.
  std::size_t pooled_idle() const noexcept;

 private:
  friend class response_reader;
  struct impl;
  std::shared_ptr<impl> impl_;
};

}  // namespace keel::http
