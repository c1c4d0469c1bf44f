// One provider call: build the wire request, sign it (Bedrock), send it, parse the reply.
#pragma once

// Overview
// --------
// `co_await keel::llm::complete(http, endpoint, request)` is one attempt against one provider:
// it builds the request in the endpoint's wire format, signs it with SigV4 when the endpoint is
// Bedrock, sends it through any *sender* (an object with `awaitable<keel::http::response>
// send(keel::http::request)`, normally `keel::http::client`), and parses the reply, throwing a
// classified `keel::llm::provider_error` for a non-2xx status. It never retries: compose it.
//
// For a Bedrock endpoint, give `sdk` (a `keel::aws::sdk_request_info`, e.g. from
// `keel::aws::sdk_invocation::next_attempt()` in the retry factory) to send the AWS SDKs'
// `amz-sdk-invocation-id` and `amz-sdk-request: attempt=N; max=M` headers; they are added
// before signing, so they are signed, as the SDKs do.
//
// Keeping the sender a template parameter keeps `keel::llm` free of any transport dependency
// (tests can pass a fake sender).
//
// Example:
//
//     keel::http::client http{ex, {}};
//     keel::llm::endpoint ep{keel::llm::provider_kind::anthropic, "", api_key};
//     auto reply = co_await keel::with_retry([&] {
//       return keel::with_deadline([&] { return keel::llm::complete(http, ep, req); }, 60s);
//     }, keel::retry_policy{});
//
// Cancellation: cancelling the caller cancels the send (the transport closes the connection).
// Thread safety: as the sender's.

#include <keel/aws/sdk_request.hpp>
#include <keel/http/message.hpp>
#include <keel/llm/bedrock.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/sigv4.hpp>

#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <optional>

namespace keel::llm {

/// Sends `req` to `ep` through `sender` once and returns the parsed reply.
///
/// @param sender an object with `awaitable<keel::http::response> send(keel::http::request)`;
///   must outlive the returned awaitable.
/// @param ep the endpoint (copied).
/// @param req the chat request (copied).
/// @param aws credentials for a Bedrock endpoint (required for Bedrock, ignored otherwise).
/// @param sdk the call's invocation id and this attempt's number and maximum, sent as
///   `amz-sdk-invocation-id` and `amz-sdk-request` on a Bedrock request (ignored otherwise).
/// @param keep_raw false: the reply's `raw` is left null (see `keel::llm::parse_response`).
/// @returns the reply.
/// @throws provider_error for a non-2xx status or a malformed reply, with the endpoint's API
///   key and the AWS credentials masked wherever the server echoed them; the sender's transport
///   errors; std::invalid_argument for a Bedrock endpoint without credentials, or with an
///   `sdk` whose invocation id is empty.
/// Cancellation: propagates to the send.
template <class Sender>
boost::asio::awaitable<chat_response> complete(
    Sender& sender, endpoint ep, chat_request req,
    std::optional<aws_credentials> aws = std::nullopt,
    std::optional<keel::aws::sdk_request_info> sdk = std::nullopt, bool keep_raw = true) {
  keel::http::request http_req = build_request(req, ep);
  if (ep.kind == provider_kind::bedrock) {
    if (!aws) {
      throw std::invalid_argument("keel::llm::complete: a Bedrock endpoint needs AWS credentials");
    }
    if (sdk) {
      bedrock::add_sdk_request_headers(http_req, *sdk);
    }
    sign_request(http_req, *aws, ep.region, "bedrock", std::chrono::system_clock::now());
  }
  keel::http::response res = co_await sender.send(std::move(http_req));
  try {
    co_return parse_response(res, ep.kind, std::chrono::system_clock::now(), keep_raw);
  } catch (const provider_error& e) {
    // A server may echo the credentials it was sent (e.g. "Incorrect API key provided: ..."),
    // in a shape `redact`'s patterns do not recognise: mask the exact values we sent.
    // So may it echo its URL, with a key in the query.
    provider_error out =
        aws ? without_secrets(e, {ep.api_key, aws->secret_key, aws->session_token, aws->access_key})
            : without_secrets(e, {ep.api_key});
    for (const std::string& q : url_credentials(ep.base_url)) {
      out = without_secrets(out, {q});
    }
    throw out;
  }
}

}  // namespace keel::llm
