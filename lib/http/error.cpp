// keel::http's error category and the translation of Beast and SSL codes into it.
#include <keel/http/error.hpp>

#include <boost/asio/ssl/error.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/http/error.hpp>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <string>

namespace keel::http {
namespace {

class error_category_impl final : public boost::system::error_category {
 public:
  // A fixed id makes codes from different shared objects compare equal.
  constexpr error_category_impl() noexcept : error_category(0x6b65656c5f687470ULL) {}
  const char* name() const noexcept override { return "keel.http"; }
  std::string message(int ev) const override {
    switch (static_cast<error>(ev)) {
      case error::body_too_large:
        return "response body too large";
      case error::too_many_headers:
        return "too many response header fields";
      case error::header_too_large:
        return "response header too large";
      case error::bad_url:
        return "bad URL";
      case error::connect_timeout:
        return "connect timed out";
      case error::request_timeout:
        return "request timed out";
      case error::protocol_error:
        return "HTTP protocol error";
      case error::connection_closed:
        return "connection closed before the response";
      case error::truncated_response:
        return "connection closed in the middle of the response";
      case error::tls_verification_failed:
        return "TLS certificate verification failed";
      case error::tls_error:
        return "TLS error";
      case error::bad_header:
        return "invalid character in a request header";
    }
    return "unknown keel.http error";
  }
  boost::system::error_condition default_error_condition(int ev) const noexcept override {
    switch (static_cast<error>(ev)) {
      case error::protocol_error:
      case error::connection_closed:
      case error::truncated_response:
        return keel::condition::transient;
      case error::connect_timeout:
      case error::request_timeout:
        return keel::condition::timeout;
      case error::body_too_large:
      case error::too_many_headers:
      case error::header_too_large:
      case error::bad_url:
      case error::tls_verification_failed:
      case error::tls_error:
      case error::bad_header:
        return keel::condition::permanent;
    }
    return keel::condition::permanent;
  }
};

const error_category_impl category_instance;

}  // namespace

const boost::system::error_category& error_category() noexcept {
  return category_instance;
}

boost::system::error_code normalize_error(const boost::system::error_code& ec) noexcept {
  namespace bh = boost::beast::http;
  namespace ssl = boost::asio::ssl;
  if (!ec) {
    return ec;
  }
  if (ec.category() == bh::make_error_code(bh::error::end_of_stream).category()) {
    switch (static_cast<bh::error>(ec.value())) {
      case bh::error::end_of_stream:
        return error::connection_closed;
      case bh::error::partial_message:
        return error::truncated_response;
      case bh::error::body_limit:
        return error::body_too_large;
      case bh::error::header_limit:
        return error::header_too_large;
      default:
        return error::protocol_error;
    }
  }
  if (ec == boost::beast::error::timeout) {
    return error::request_timeout;
  }
  if (ec == ssl::error::stream_truncated) {
    return error::truncated_response;
  }
  if (ec.category() == boost::asio::error::get_ssl_category()) {
    const auto packed = static_cast<unsigned long>(static_cast<unsigned int>(ec.value()));
    if (ERR_GET_LIB(packed) == ERR_LIB_SSL &&
        ERR_GET_REASON(packed) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
      return error::tls_verification_failed;
    }
    return error::tls_error;
  }
  if (ec.category() == ssl::error::get_stream_category()) {
    return error::tls_error;
  }
  return ec;
}

keel::condition transport_condition(const boost::system::error_code& ec) noexcept {
  return keel::condition_of(normalize_error(ec));
}

}  // namespace keel::http
