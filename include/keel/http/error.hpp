// keel::http's transport errors and how Asio, Beast and TLS failures map to keel conditions.
#pragma once

// Overview
// --------
// `keel::http::error` names what went wrong while sending a request (a limit was hit, the URL was
// malformed, the peer closed mid-message, the certificate did not verify). Its category maps each
// code to a coarse `keel::condition` through `default_error_condition`, so `keel::classify`,
// `with_retry` and breakers treat HTTP failures correctly without knowing about HTTP:
//
// | error                                                      | condition   | retry? |
// | ---------------------------------------------------------- | ----------- | ------ |
// | `body_too_large`, `too_many_headers`, `header_too_large`   | `permanent` | no     |
// | `bad_url`, `bad_header`, `tls_verification_failed`, `tls_error` | `permanent` | no |
// | `protocol_error`, `connection_closed`, `truncated_response`| `transient` | yes    |
// | `connect_timeout`, `request_timeout`                       | `timeout`   | yes    |
//
// Beast and OpenSSL error codes never leave `keel::http`: `normalize_error` translates them into
// these codes (Asio and system codes, such as `connection_refused`, are kept as they are because
// `keel::condition_of` already classifies them). `transport_condition` classifies any code the
// transport may produce.
//
// Example:
//
//     try {
//       auto res = co_await client.send(req);
//     } catch (const boost::system::system_error& e) {
//       if (e.code() == keel::http::error::body_too_large) { ... }
//       if (e.code() == keel::condition::transient) { ... worth retrying ... }
//     }
//
// Thread safety: immutable categories and pure functions.

#include <keel/error.hpp>

#include <boost/system/error_code.hpp>

#include <type_traits>

namespace keel::http {

/// Specific failures of the HTTP transport.
enum class error {
  /// The response body is larger than `client_options::max_response_body` (permanent).
  body_too_large = 1,
  /// The response has more header fields than `client_options::max_header_count` (permanent).
  too_many_headers,
  /// The response header is larger than `client_options::max_header_bytes` (permanent).
  header_too_large,
  /// The request URL is not an absolute `http://` or `https://` URL (permanent).
  bad_url,
  /// Connecting (TCP and TLS handshake) took longer than `client_options::connect_timeout`
  /// (timeout).
  connect_timeout,
  /// The whole exchange took longer than `client_options::request_timeout` (timeout).
  request_timeout,
  /// The peer sent something that is not valid HTTP/1.1 (transient).
  protocol_error,
  /// The peer closed the connection before it started a response (transient).
  connection_closed,
  /// The peer closed the connection in the middle of a response (transient).
  truncated_response,
  /// The server's certificate did not verify (untrusted, expired, wrong host name) (permanent).
  tls_verification_failed,
  /// Another TLS failure, such as no common protocol version or cipher (permanent).
  tls_error,
  /// A request header name or value contains a control character (CR, LF, NUL), which would
  /// allow header injection; nothing was sent (permanent).
  bad_header,
};

/// The category of `keel::http::error` codes; `default_error_condition` gives the
/// `keel::condition` in the table above.
const boost::system::error_category& error_category() noexcept;

/// Makes an `error_code` from a `keel::http::error`.
inline boost::system::error_code make_error_code(error e) noexcept {
  return {static_cast<int>(e), error_category()};
}

/// Translates a Beast or OpenSSL/Asio-SSL error code into the `keel::http::error` that describes
/// it; any other code (Asio, system, keel) is returned unchanged.
///
/// Beast `end_of_stream` is `connection_closed`; `partial_message` and SSL `stream_truncated` are
/// `truncated_response`; `body_limit` and `header_limit` are `body_too_large` and
/// `header_too_large`; a parse error is `protocol_error`; Beast `timeout` is `request_timeout`;
/// an SSL "certificate verify failed" is `tls_verification_failed`; other SSL errors are
/// `tls_error`.
boost::system::error_code normalize_error(const boost::system::error_code& ec) noexcept;

/// The keel condition of any error code the transport may produce: `keel::condition_of` applied
/// to `normalize_error(ec)`.
keel::condition transport_condition(const boost::system::error_code& ec) noexcept;

}  // namespace keel::http

namespace boost::system {
template <>
struct is_error_code_enum<keel::http::error> : std::true_type {};
}  // namespace boost::system
