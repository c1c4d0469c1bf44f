// keel::redis::client: an asynchronous, pipelined Redis client on Asio, for state that several
// keel processes share (issue 16: a fleet-wide quota, learned rate and breaker).
#pragma once

// Overview
// --------
// `co_await redis.command({"INCRBY", key, "5"})` sends one command and completes with its reply.
// Every command goes out on one TCP connection per client, **pipelined**: commands issued while
// earlier ones are in flight are appended to the same output buffer and written together, and
// replies are matched to commands in order (RESP guarantees it). A thousand coroutines that each
// issue a command in the same turn of the io_context cost a handful of socket writes, not a
// thousand round trips. Nothing ever blocks the thread: connecting, writing and reading are Asio
// operations.
//
// Decisions:
// - **Parsing** is hiredis's `redisReader` (Debian `libhiredis-dev`), fed with the bytes Asio
//   reads; hiredis does no I/O here. Commands are framed by hand (a RESP array of bulk strings:
//   three lines of code, written straight into the output buffer). The reader stays inside
//   lib/redis: this header needs neither hiredis nor Beast.
// - **One timer per command** is both its timeout and its wake-up: the reply (or the
//   connection's failure) cancels it. A command that times out closes the connection: its reply
//   may still come, and a server that fails to answer in time is treated as gone, so the next
//   command reconnects rather than queueing behind it.
// - **Failures are fast.** A connection that fails to work (a refused or timed-out connect, a
//   refused login such as a wrong password or a database out of range, a command with no reply
//   in time, a close before any reply) fails the commands waiting on it and, for
//   `reconnect_delay` (doubling per failure up to `max_reconnect_delay`, reset by the first
//   reply to a command that is not an error), every new command fails at once
//   without touching the network, so a dead Redis costs callers nothing but an
//   error they can fall back on (keel's shared pacing falls back to a local limit).
// - **TLS** (`rediss://`): Asio's OpenSSL stream over the same socket; the certificate is
//   verified (chain and host name, RFC 6125 via `ssl::host_name_verification`) unless
//   `verify_peer` is off, and the handshake counts against `connect_timeout`.
// - **Secrets**: the password (`endpoint::password`, usually from an environment variable) is
//   sent in `AUTH` and appears in no error message, log or `to_string`.
// - **Bounds**: at most `max_pending` commands in flight (more fail at once with `queue_full`);
//   unparsed reply bytes are capped by `max_reply_bytes` (a protocol error past it).
//
// Cancellation: cancelling a `command` (terminal or partial, as `with_deadline` emits) completes
// it at once with `operation_aborted`; the command may still run on the server, and its reply is
// discarded when it comes. The connection stays open.
//
// Example:
//
//     keel::redis::client_options o;
//     o.server = keel::redis::parse_url("redis://127.0.0.1:6379/0");
//     o.server.password = std::getenv("KEEL_REDIS_PASSWORD") ? ... : "";
//     keel::redis::client redis(ex, o);
//     keel::redis::reply r = co_await redis.command({"INCR", "keel:calls"});
//     if (r.kind == keel::redis::reply_kind::integer) { ... r.integer ... }
//
// Thread safety: not thread-safe; use a client from coroutines on its executor (a strand for
// several threads). The client may be destroyed while commands are in flight: they complete
// with `operation_aborted`.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace keel::redis {

/// What a RESP2 reply is.
enum class reply_kind {
  /// A null bulk string or null array (e.g. GET of a missing key).
  nil,
  /// An integer (`:`).
  integer,
  /// A simple string (`+OK`, `+PONG`).
  status,
  /// A bulk string (`$`).
  string,
  /// An error reply (`-ERR ...`): a value, not an exception; the command ran and failed.
  error,
  /// An array (`*`), e.g. the result of a Lua script returning a table.
  array,
};

/// One reply from the server.
struct reply {
  /// Its kind.
  reply_kind kind = reply_kind::nil;
  /// The value of an integer reply.
  long long integer = 0;
  /// The text of a status, string or error reply.
  std::string text;
  /// The elements of an array reply.
  std::vector<reply> elements;

  /// True for an error reply.
  bool is_error() const noexcept { return kind == reply_kind::error; }
};

/// Where a Redis server is, and how to log in.
struct endpoint {
  /// Host name or address.
  std::string host = "127.0.0.1";
  /// TCP port.
  std::uint16_t port = 6379;
  /// Database number (`SELECT`; 0 sends none).
  int db = 0;
  /// ACL user name (empty: the default user).
  std::string username;
  /// Password for `AUTH` (empty: none). Never printed.
  std::string password;
  /// TLS (`rediss://`): the server's certificate is verified against `client_options::ca_file`
  /// (or the system's trust store) and must name `host`.
  bool tls = false;

  /// "host:port/db" ("rediss://host:port/db" with TLS), never the credentials.
  std::string to_string() const;
};

/// Parses `redis://[[user][:password]@]host[:port][/db]`, or `rediss://...` for TLS.
/// @throws std::invalid_argument naming the part that is wrong (never echoing a password).
endpoint parse_url(std::string_view url);

/// How a client connects and how long it waits.
struct client_options {
  /// The server.
  endpoint server;
  /// With `server.tls`: a PEM file of the CAs to trust (empty: the system's trust store).
  std::string ca_file;
  /// With `server.tls`: whether the server's certificate is verified (on by default; off only
  /// for tests against a server with a throwaway certificate).
  bool verify_peer = true;
  /// Limit on resolving, connecting and logging in.
  std::chrono::milliseconds connect_timeout{1000};
  /// Limit on each command, from the call until its reply.
  std::chrono::milliseconds command_timeout{500};
  /// After a failed connect, new commands fail at once for this long; doubled per consecutive
  /// failure.
  std::chrono::milliseconds reconnect_delay{100};
  /// The largest delay between connection attempts.
  std::chrono::milliseconds max_reconnect_delay{2000};
  /// Commands in flight at most; more fail at once with `keel::error::queue_full`.
  std::size_t max_pending = 65536;
  /// Unparsed reply bytes at most (one reply larger than this is a protocol error).
  std::size_t max_reply_bytes = 16 * 1024 * 1024;
};

/// An asynchronous, pipelined Redis client on one connection, reconnecting on demand.
class client {
 public:
  /// A client of `options.server`; it connects on the first command.
  client(boost::asio::any_io_executor ex, client_options options);
  /// Closes the connection; commands in flight complete with `operation_aborted`.
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// Sends `args` (the command and its arguments) and awaits its reply.
  /// @returns the reply; an error reply (`reply_kind::error`) is returned, not thrown.
  /// @throws keel::failure with `keel::error::deadline_exceeded` after `command_timeout` (the
  ///   connection is then closed); `keel::error::queue_full` past `max_pending`; an Asio or
  ///   system code (refused, reset, eof) when the connection fails, and `errc::connection_refused`
  ///   at once during the delay after a failed connect; `errc::protocol_error` for a reply
  ///   hiredis cannot parse or one over `max_reply_bytes`; `errc::permission_denied` when AUTH or
  ///   SELECT is refused. Messages name the server (`endpoint::to_string`), never a password.
  ///   std::invalid_argument for an empty `args`.
  /// Cancellation: terminal or partial cancellation completes the call at once with
  ///   `operation_aborted`; the command may still run; the connection stays open.
  boost::asio::awaitable<reply> command(std::vector<std::string> args);

  /// Closes the connection now: commands in flight complete with `operation_aborted`, and
  /// nothing of the client keeps its executor busy. A later command connects again.
  void close();

  /// True while a connection is open and logged in.
  bool connected() const noexcept;
  /// Socket writes made so far (each carries every command queued since the previous one).
  std::uint64_t writes() const noexcept;
  /// Connections opened so far (successful or not).
  std::uint64_t connects() const noexcept;
  /// Commands sent so far.
  std::uint64_t commands() const noexcept;

 private:
  struct impl;
  std::shared_ptr<impl> impl_;
};

}  // namespace keel::redis
