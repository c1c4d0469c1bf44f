// Tests for keel/http/error.hpp: the category's conditions and the translation of Beast/SSL codes.
#include <keel/classify.hpp>
#include <keel/http/error.hpp>

#include <boost/asio/error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/http/error.hpp>
#include <catch2/catch.hpp>

#include <openssl/err.h>
#include <openssl/ssl.h>

namespace kh = keel::http;
namespace bh = boost::beast::http;

TEST_CASE("keel.http errors map to the keel condition that says whether to retry", "[http]") {
  using keel::condition;
  CHECK(kh::make_error_code(kh::error::body_too_large) == condition::permanent);
  CHECK(kh::make_error_code(kh::error::too_many_headers) == condition::permanent);
  CHECK(kh::make_error_code(kh::error::header_too_large) == condition::permanent);
  CHECK(kh::make_error_code(kh::error::bad_url) == condition::permanent);
  CHECK(kh::make_error_code(kh::error::bad_header) == condition::permanent);
  CHECK(kh::make_error_code(kh::error::tls_verification_failed) == condition::permanent);
  CHECK(kh::make_error_code(kh::error::tls_error) == condition::permanent);
  CHECK(kh::make_error_code(kh::error::protocol_error) == condition::transient);
  CHECK(kh::make_error_code(kh::error::connection_closed) == condition::transient);
  CHECK(kh::make_error_code(kh::error::truncated_response) == condition::transient);
  CHECK(kh::make_error_code(kh::error::connect_timeout) == condition::timeout);
  CHECK(kh::make_error_code(kh::error::request_timeout) == condition::timeout);
  CHECK(keel::classify(kh::make_error_code(kh::error::truncated_response)).condition ==
        condition::transient);
  CHECK(kh::make_error_code(kh::error::body_too_large).message() == "response body too large");
}

TEST_CASE("Beast and SSL codes are translated into keel.http codes", "[http]") {
  using keel::condition;
  CHECK(kh::normalize_error(bh::error::end_of_stream) == kh::error::connection_closed);
  CHECK(kh::normalize_error(bh::error::partial_message) == kh::error::truncated_response);
  CHECK(kh::normalize_error(bh::error::body_limit) == kh::error::body_too_large);
  CHECK(kh::normalize_error(bh::error::header_limit) == kh::error::header_too_large);
  CHECK(kh::normalize_error(bh::error::bad_chunk) == kh::error::protocol_error);
  CHECK(kh::normalize_error(boost::beast::error::timeout) == kh::error::request_timeout);
  CHECK(kh::normalize_error(boost::asio::ssl::error::stream_truncated) ==
        kh::error::truncated_response);
  const boost::system::error_code verify(
      static_cast<int>(ERR_PACK(ERR_LIB_SSL, 0, SSL_R_CERTIFICATE_VERIFY_FAILED)),
      boost::asio::error::get_ssl_category());
  CHECK(kh::normalize_error(verify) == kh::error::tls_verification_failed);
  const boost::system::error_code other_ssl(
      static_cast<int>(ERR_PACK(ERR_LIB_SSL, 0, SSL_R_NO_SHARED_CIPHER)),
      boost::asio::error::get_ssl_category());
  CHECK(kh::normalize_error(other_ssl) == kh::error::tls_error);

  // Codes keel already classifies pass through unchanged.
  const boost::system::error_code refused = boost::asio::error::connection_refused;
  CHECK(kh::normalize_error(refused) == refused);
  CHECK(kh::normalize_error({}) == boost::system::error_code{});

  CHECK(kh::transport_condition(bh::error::end_of_stream) == condition::transient);
  CHECK(kh::transport_condition(bh::error::partial_message) == condition::transient);
  CHECK(kh::transport_condition(verify) == condition::permanent);
  CHECK(kh::transport_condition(refused) == condition::transient);
  CHECK(kh::transport_condition(boost::asio::error::operation_aborted) == condition::cancelled);
  CHECK(kh::transport_condition(boost::beast::error::timeout) == condition::timeout);
}
