// The Anthropic messages wire format: build a request, parse a response or an error.
#pragma once

// Overview
// --------
// `build_request` makes `POST {base}/v1/messages` (`{base}/messages` when the base already ends
// in "/v1") with `anthropic-version` (2026-10-21, the current version the official SDKs send,
// unless the endpoint says otherwise) and a body `{model, max_tokens, system?, messages:[{role,
// content}], stop_sequences?, metadata?}`. The version shapes the rest, as the SDKs do: from
// 2026-10-21 the key goes in `Authorization: Bearer` and `temperature`/`top_p` are not sent (that
// version removed them); before it, the key goes in `x-api-key` and both are sent. `seed` is
// never sent (the messages API has none). `response_format` becomes a tool the model must call
// (chat.hpp), whose call `parse_response` and the stream decoder give back as text. `max_tokens`
// not given is sent as `anthropic_default_max_tokens`. `extra_fields` (OpenAI's own fields) are
// not sent, but for OpenAI's `user`, which becomes `metadata.user_id` when the request's metadata
// has none (Anthropic's metadata takes only `user_id`).
//
// `parse_response` concatenates the `text` of every `content` block of type "text" and reads
// `stop_reason`, `model` and `usage.{input_tokens,output_tokens}` (usage is optional). A
// `stop_reason` of "refusal" throws `content_filtered`.
//
// Error classification (body `{type:"error", error:{type, message}}`; `provider_code` is
// `error.type`): `rate_limit_error` -> rate_limited; `overloaded_error` (529) -> overloaded;
// `api_error` -> server_error; `timeout_error` -> timeout; `invalid_request_error` ->
// context_length_exceeded when the message says "prompt is too long", quota_exhausted when it
// says "credit balance", else bad_request; `billing_error` -> quota_exhausted;
// `authentication_error`, `permission_error` -> auth; `not_found_error` -> not_found;
// `request_too_large` (413) -> bad_request; unknown types fall back to the HTTP status as for
// OpenAI. `x-should-retry` is handled as for OpenAI.
//
// Example:
//
//     keel::llm::endpoint ep(keel::llm::provider_kind::anthropic, "", key);
//     auto http_req = keel::llm::anthropic::build_request(req, ep);
//     auto reply = keel::llm::anthropic::parse_response(res, std::chrono::system_clock::now());
//
// Thread safety: pure functions.

#include <keel/http/message.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>

#include <chrono>

namespace keel::llm::anthropic {

/// Builds the messages request (`ep.kind` is ignored).
keel::http::request build_request(const chat_request& req, const endpoint& ep);

/// Parses a messages response.
/// @throws provider_error on failure; see the classification above.
/// @param keep_raw false: leave `chat_response::raw` null (see `keel::llm::parse_response`).
chat_response parse_response(const keel::http::response& res,
                             std::chrono::system_clock::time_point now, bool keep_raw = true);

}  // namespace keel::llm::anthropic
