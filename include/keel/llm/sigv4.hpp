// AWS Signature Version 4 request signing (for Amazon Bedrock), with its steps exposed for tests.
#pragma once

// Overview
// --------
// `sign_request` signs a plain `keel::http::request` in place, the way AWS SDKs do for a JSON
// service such as `bedrock`:
//   1. it sets `host` (from the URL, default port omitted) if absent, `x-amz-date` (from `now`),
//      `x-amz-security-token` when the credentials carry a session token, and, only when
//      `sigv4_options::add_content_sha256` is set, `x-amz-content-sha256` (S3 needs it; Bedrock
//      does not); earlier `authorization`, `x-amz-date`, `x-amz-security-token` and
//      `x-amz-content-sha256` fields are replaced, so re-signing a retried request is safe;
//   2. the canonical request is method, canonical URI (each path byte outside RFC 3986's
//      unreserved set and "/" percent-encoded again, as AWS requires for every service but S3,
//      whose path is used as given), canonical query (decoded, re-encoded, sorted by name then
//      value), canonical headers (lower-case names, sorted, values trimmed with inner runs of
//      spaces collapsed, repeated fields joined by ","), signed header names and the hex SHA-256
//      of the body. Every header present is signed except `authorization`, `user-agent`,
//      `expect`, `connection` and `x-amzn-trace-id`; add headers the transport would add
//      (e.g. `content-length`) before signing or not at all. Dot segments are not normalised.
//   3. string to sign = "AWS4-HMAC-SHA256\n" date "\n" scope "\n" hex(SHA-256(canonical request));
//   4. signing key = HMAC chain "AWS4"+secret → date → region → service → "aws4_request";
//   5. `Authorization: AWS4-HMAC-SHA256 Credential=AKID/scope, SignedHeaders=..., Signature=...`.
// The secret key never appears in a header, an exception or a log line.
//
// Example:
//
//     keel::http::request req = keel::llm::bedrock::build_request(chat, ep);
//     keel::llm::aws_credentials creds(access_key, secret_key, session_token);
//     keel::llm::sign_request(req, creds, "us-east-1", "bedrock",
//     std::chrono::system_clock::now());
//
// Thread safety: pure functions (OpenSSL's one-shot digests are thread-safe).

#include <keel/http/message.hpp>

#include <chrono>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace keel::llm {

/// AWS credentials. Never logged; the secret never leaves the signer.
struct aws_credentials {
  /// Access key id (AKIA... or ASIA...).
  std::string access_key;
  /// Secret access key.
  std::string secret_key;
  /// Session token for temporary credentials (empty: none).
  std::string session_token;

  /// Empty credentials (signing with them throws).
  aws_credentials() = default;
  /// Credentials from their parts.
  aws_credentials(std::string access, std::string secret, std::string token = {})
      : access_key(std::move(access)),
        secret_key(std::move(secret)),
        session_token(std::move(token)) {}
};

/// Credentials from the standard environment variables `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY` and (optional) `AWS_SESSION_TOKEN`.
/// @returns `std::nullopt` unless both the key id and the secret are set and non-empty.
std::optional<aws_credentials> aws_credentials_from_environment();

/// Options of `sign_request`.
struct sigv4_options {
  /// Also send the payload hash as `x-amz-content-sha256` (and sign it). Off by default: only S3
  /// requires it, and AWS's test suite vectors do not include it.
  bool add_content_sha256 = false;
};

/// Signs `req` in place with SigV4; see the steps in this header.
/// @param region the AWS region, e.g. "us-east-1".
/// @param service the signing name, e.g. "bedrock".
/// @param now the signing time (becomes `x-amz-date`).
/// @throws std::invalid_argument if the access key or secret is empty or the URL is not absolute
///   (the message never contains the secret).
void sign_request(keel::http::request& req, const aws_credentials& creds, std::string_view region,
                  std::string_view service, std::chrono::system_clock::time_point now,
                  sigv4_options opts = {});

/// The intermediate steps of SigV4, exposed so that they can be tested against AWS's vectors.
namespace sigv4 {

/// Lower-case hex of `bytes`.
std::string hex(std::string_view bytes);

/// Lower-case hex SHA-256 of `data`.
std::string sha256_hex(std::string_view data);

/// Raw (32-byte) HMAC-SHA256 of `data` under `key`.
std::string hmac_sha256(std::string_view key, std::string_view data);

/// `x-amz-date` format of `t`: "YYYYMMDDTHHMMSSZ" (UTC, whole seconds).
std::string amz_date(std::chrono::system_clock::time_point t);

/// The canonical request of `req` (which must already carry every header to sign).
/// @param payload_hash hex SHA-256 of the body (or "UNSIGNED-PAYLOAD").
/// @param service "s3" keeps the path as given; any other service re-encodes it.
/// @throws std::invalid_argument if the URL is not absolute.
std::string canonical_request(const keel::http::request& req, std::string_view payload_hash,
                              std::string_view service);

/// The signed-headers list of `req`: lower-case names, sorted, ";"-separated.
std::string signed_headers(const keel::http::request& req);

/// The credential scope: "YYYYMMDD/region/service/aws4_request".
std::string scope(std::string_view date, std::string_view region, std::string_view service);

/// The string to sign for a canonical request.
std::string string_to_sign(std::string_view amz_date, std::string_view scope,
                           std::string_view canonical_request);

/// The raw (32-byte) signing key for a date ("YYYYMMDD"), region and service.
std::string signing_key(std::string_view secret_key, std::string_view date, std::string_view region,
                        std::string_view service);

}  // namespace sigv4
}  // namespace keel::llm
