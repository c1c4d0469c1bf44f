// The OpenAI chat completions wire format: build a request, parse a response or an error.
#pragma once

// Overview
// --------
// `build_request` makes `POST {base}/v1/chat/completions` (`{base}/chat/completions` when the base
// already ends in "/v1", as the OpenAI SDKs write it) with `Authorization: Bearer KEY` and a
// body `{model, messages:[{role:"system"...}, ...], max_tokens (or max_completion_tokens: see
// `max_tokens_field`), temperature?, top_p?, stop?, seed?, response_format?, metadata?, tools?,
// ...}` followed by the members of `chat_request::extra_fields` keel does not write itself. A
// `chat_request::response_format` whose "type" is "json_schema", "json_object" or "text" is sent as
// is; any other JSON value is taken as a schema and wrapped as
// `{type:"json_schema", json_schema:{name:"response", schema, strict:true}}`.
//
// `parse_response` reads `choices[0].message.content`, `choices[0].finish_reason`, `model` and
// `usage.{prompt_tokens,completion_tokens}` (usage is optional). A `finish_reason` of
// "content_filter", or a null content with a `refusal`, throws `content_filtered`.
//
// Error classification (body `{error:{type, code, message}}`; `provider_code` is `code`, else
// `type`):
//   429 `insufficient_quota` / `billing_hard_limit_reached` / `billing_not_active` /
//   `quota_exceeded` -> quota_exhausted (never retried); other 429 -> rate_limited;
//   400 `context_length_exceeded` (or "maximum context length" in the message) ->
//   context_length_exceeded; 400 `content_filter` / `content_policy_violation` ->
//   content_filtered; 401/403 -> auth; 404 -> not_found; 408 and 504 -> timeout;
//   409 and other 5xx -> server_error; 503 -> overloaded; other statuses -> bad_request.
//   `x-should-retry: true` turns a permanent code (except quota_exhausted) into server_error;
//   `x-should-retry: false` is recorded in `should_retry()` but does not change the code.
//
// Example:
//
//     auto http_req = keel::llm::openai::build_request(req, {keel::llm::provider_kind::openai,
//                                                            "", key});
//     auto reply = keel::llm::openai::parse_response(res, std::chrono::system_clock::now());
//
// Thread safety: pure functions.

#include <keel/http/message.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/json_writer.hpp>

#include <chrono>
#include <vector>

namespace keel::llm::openai {

/// Builds the chat completions request (`ep.kind` is ignored).
keel::http::request build_request(const chat_request& req, const endpoint& ep);

/// Writes `calls` as OpenAI's `tool_calls` array (`[{"id", "type": "function", "function":
/// {"name", "arguments"}}]`), as a request's assistant turn and a completion both carry it.
void write_tool_calls(json_writer& w, const std::vector<tool_call>& calls);

/// Parses a chat completions response.
/// @throws provider_error on failure; see the classification above.
/// @param keep_raw false: leave `chat_response::raw` null (see `keel::llm::parse_response`).
chat_response parse_response(const keel::http::response& res,
                             std::chrono::system_clock::time_point now, bool keep_raw = true);

}  // namespace keel::llm::openai
