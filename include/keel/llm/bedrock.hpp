// The Amazon Bedrock Converse wire format: build a request, parse a response or an error.
#pragma once

// Overview
// --------
// `build_request` makes `POST https://bedrock-runtime.{region}.amazonaws.com/model/{modelId}/
// converse` (or `{base_url}/model/{modelId}/converse` when the endpoint has a base URL, e.g. a
// mock server) with the model id percent-encoded (":" and "/" in ids and ARNs become %3A and %2F)
// and a body `{messages:[{role, content:[{text}]}], system?:[{text}], inferenceConfig?:{maxTokens?,
// temperature?, topP?, stopSequences?}, requestMetadata?, toolConfig?}` (`seed` is not sent:
// Converse has none; `maxTokens` only when the request gives one). `response_format` becomes a
// tool the model must call (chat.hpp), whose call `parse_response` and the stream decoder give
// back as text. `extra_fields` (OpenAI's own fields) are not sent. The request is **not
// signed**: call `keel::llm::sign_request(req, credentials, region, "bedrock", now)`
// (<keel/llm/sigv4.hpp>) before sending it. `add_sdk_request_headers` adds the AWS SDKs'
// `amz-sdk-invocation-id` and `amz-sdk-request: attempt=N; max=M` (add them before signing: the
// SDKs sign them); `keel::llm::complete` does both when given a `keel::aws::sdk_request_info`.
//
// `parse_response` concatenates `output.message.content[].text` and reads `stopReason` and
// `usage.{inputTokens,outputTokens}` (usage is optional). A `stopReason` of "content_filtered"
// or "guardrail_intervened" throws `content_filtered`.
//
// Error classification: the error type is the `x-amzn-ErrorType` header up to its first ":",
// else the body's `__type` after its last "#"; the message is the body's `message` (or
// `Message`). ThrottlingException -> rate_limited; ServiceUnavailableException -> overloaded;
// ModelNotReadyException -> overloaded (retryable); InternalServerException and
// ModelErrorException -> server_error; ModelTimeoutException -> timeout; ValidationException ->
// context_length_exceeded when the message says "too long" or "too many tokens", else
// bad_request; AccessDeniedException, UnrecognizedClientException, ExpiredTokenException -> auth;
// ResourceNotFoundException -> not_found; ServiceQuotaExceededException -> quota_exhausted;
// unknown types fall back to the HTTP status as for OpenAI.
//
// Example:
//
//     keel::llm::endpoint ep(keel::llm::provider_kind::bedrock, "", "", "us-east-1");
//     auto http_req = keel::llm::bedrock::build_request(req, ep);
//     keel::llm::sign_request(http_req, creds, ep.region, "bedrock", now);
//     auto reply = keel::llm::bedrock::parse_response(res, std::chrono::system_clock::now());
//
// Thread safety: pure functions.

#include <keel/aws/sdk_request.hpp>
#include <keel/http/message.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>

#include <chrono>
#include <string>
#include <string_view>

namespace keel::llm::bedrock {

/// Builds the unsigned Converse request (`ep.kind` is ignored).
/// @throws std::invalid_argument if `ep` has neither a base URL nor a region.
keel::http::request build_request(const chat_request& req, const endpoint& ep);

/// Sets `amz-sdk-invocation-id` and `amz-sdk-request` on `req` (replacing earlier values, so a
/// request reused for a retry is safe). Call it before `sign_request`: the AWS SDKs (JS v3,
/// botocore) add both before signing, and SigV4 signs them like any other header.
/// @param req the request to send.
/// @param info the call's invocation id and this attempt's number and maximum.
/// @throws std::invalid_argument if `info.invocation_id` is empty.
void add_sdk_request_headers(keel::http::request& req, const keel::aws::sdk_request_info& info);

/// Parses a Converse response.
/// @throws provider_error on failure; see the classification above.
/// @param keep_raw false: leave `chat_response::raw` null (see `keel::llm::parse_response`).
chat_response parse_response(const keel::http::response& res,
                             std::chrono::system_clock::time_point now, bool keep_raw = true);

/// Percent-encodes everything except RFC 3986 unreserved characters (A-Z a-z 0-9 - _ . ~).
std::string uri_encode(std::string_view s);

}  // namespace keel::llm::bedrock
