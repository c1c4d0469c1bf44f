// keel::gateway OpenAI wire: what `keel serve` reads from and writes to the services that call it
// (the OpenAI chat completions API, as the official SDKs speak it), as pure functions.
#pragma once

// Overview
// --------
// `keel serve` (issue 18) lets a service in any language point its OpenAI SDK's `base_url` at keel
// and get keel's pacing, retries, fallbacks and breakers. These functions translate at its edge:
//
//   - `parse_chat_request`: an OpenAI `POST /v1/chat/completions` body to a provider-neutral
//     `keel::llm::chat_request` (which the configured client sends in whatever wire format each
//     entry speaks: OpenAI, Anthropic or Bedrock), or a `bad_request` naming the JSON path;
//   - `completion_body`: a `keel::llm::chat_response` back to an OpenAI `chat.completion`;
//   - `error_answer`: a failed call (keel's final error) to the status, `retry-after` and
//     `{"error": {message, type, param, code}}` body the OpenAI SDKs map to their exception
//     classes.
//
// Decisions:
// - Messages: `system` and `developer` turns become the system prompt (joined by blank lines);
//   `user`, `assistant` and `tool` turns keep their order. `content` may be a string or an array
//   of `{"type": "text", "text": ...}` parts (joined); a user turn may also have
//   `{"type": "image_url", "image_url": {"url", "detail"}}` parts (a data: or http(s) URL), kept
//   in order with its text. Other part types (audio, files) are refused with a 400 naming the part.
// - Tools: `tools` (function tools), `tool_choice` ("none", "auto", "required" or a named
//   function), `parallel_tool_calls`, an assistant turn's `tool_calls` and `tool` turns
//   (`tool_call_id`, text content) pass through to whichever provider the route's entry speaks
//   (keel::llm translates: Anthropic `tool_use`/`tool_result`, Bedrock `toolUse`/`toolResult`);
//   the answer's tool calls come back as OpenAI `tool_calls` with finish reason "tool_calls", in
//   a completion or as stream deltas. A call's `arguments` must be a JSON object as text (a route
//   may send it to Anthropic or Bedrock, which take objects). What an entry's provider cannot take
//   (Bedrock: an image by URL, `tool_choice` "none") fails that entry with a 400 naming the part,
//   and the route falls back like any other failure. The deprecated `functions`/`function_call`,
//   `n` other than 1, `logprobs` and `top_logprobs` are refused with a 400 that names the field.
// - `max_completion_tokens` wins over `max_tokens`; neither: not given (`chat_request::max_tokens`
//   0): OpenAI-format and Bedrock entries send no limit, as the API has none by default, and
//   Anthropic entries send 4,096 (their API requires one).
//   `temperature`, `top_p`, `stop` (a string or up to 4 strings), `seed`, `response_format` and
//   `metadata` pass through. Every other field goes into `chat_request::extra_fields`, which
//   OpenAI-format entries send as is (the OpenAI API grows faster than any gateway, and
//   OpenAI-compatible servers take their own extensions) and Anthropic and Bedrock entries do not
//   (a sampling hint such as `frequency_penalty` should not fail a fallback to them).
// - Errors the caller can fix (a 400/404/413/422 from the provider: context too long, content
//   filtered, a bad parameter) keep their status. A rate limit or exhausted quota is a 429; an
//   upstream overload, 5xx, open breaker, exhausted budget or unreachable server is a 502 or
//   503; a deadline is a 504. An upstream 401/403 means keel's *provider* key was refused, not the
//   caller's: it is a 502 (`upstream_auth`), so the caller's SDK does not report its own key as
//   bad. `retry-after` (seconds, rounded up) and `retry-after-ms` go with every answer for which
//   keel knows when capacity returns (a provider's delay hint, an open breaker's remaining
//   break), so that the callers' own retries do not herd.
// - A content filter or refusal is an answer, as OpenAI gives it: a 200 completion whose finish
//   reason is "content_filter" (with the text before the filter), or whose message has
//   `content: null` and the `refusal`; a stream ends with finish reason "content_filter".
//   (keel::llm reports them as `content_filtered` errors, so a route can fall back.)
// - Messages never carry a key: provider messages are redacted by keel::llm (and the client masks
//   its entries' keys); keel's own messages name no secret.
//
// Thread safety: pure functions.

#include <keel/llm/chat.hpp>
#include <keel/llm/client.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace keel::gateway {

/// A request body keel cannot serve: `status` (400, or 404 for an unknown model), OpenAI's
/// `param` (the JSON path, e.g. "messages[2].content") and `code`.
class bad_request : public std::runtime_error {
 public:
  /// A 400 (or `status`) naming `param`.
  bad_request(std::string message, std::string param, std::string code = {}, int status = 400)
      : std::runtime_error(std::move(message)),
        param_(std::move(param)),
        code_(std::move(code)),
        status_(status) {}
  /// The field at fault ("" if none).
  const std::string& param() const noexcept { return param_; }
  /// OpenAI's error code ("" if none).
  const std::string& code() const noexcept { return code_; }
  /// The HTTP status to answer with.
  int status() const noexcept { return status_; }

 private:
  std::string param_;
  std::string code_;
  int status_;
};

/// What a chat completions body asks for.
struct parsed_chat_request {
  /// The provider-neutral request (its `model` is the route's name as the caller wrote it).
  keel::llm::chat_request request;
  /// `"stream": true`.
  bool stream = false;
  /// `stream_options.include_usage`.
  bool include_usage = false;
};

/// Parses an OpenAI chat completions request body. The common request (model, plain-text
/// messages, token limits, temperature, top_p, stream, stream_options and nothing else) is read
/// without building a JSON tree (<keel/llm/json_scan.hpp>); any other body as
/// `detail::parse_chat_request_tree` reads it, with the same result either way.
/// @throws bad_request naming the field at fault (invalid JSON: param "").
parsed_chat_request parse_chat_request(std::string_view body);

namespace detail {
/// `parse_chat_request` through an nlohmann tree only, every body; for tests and fuzzing, which
/// check that both readings agree.
/// @throws bad_request as `parse_chat_request`.
parsed_chat_request parse_chat_request_tree(std::string_view body);
}  // namespace detail

/// OpenAI's `finish_reason` (always one of OpenAI's four) for a provider's: "max_tokens" and
/// "model_context_window_exceeded" -> "length", "tool_use" -> "tool_calls",
/// "content_filter"/"content_filtered"/"guardrail_intervened"/"refusal" -> "content_filter";
/// anything else ("end_turn", "stop_sequence", "pause_turn", empty, unknown) -> "stop".
std::string openai_finish_reason(std::string_view provider_reason);

/// The `chat.completion` object for `reply` as JSON text, members in OpenAI's order (content null
/// and `tool_calls` when the model only called tools).
/// @param id the completion's id ("chatcmpl-...").
/// @param created seconds since the epoch.
/// @param model the model to report (the route's name if the provider did not say).
std::string completion_body(const keel::llm::chat_response& reply, const std::string& id,
                            long long created, const std::string& model);

/// One `chat.completion.chunk` of a streamed answer (`data: ...` of its server-sent events).
/// @param delta the choice's `delta` (`{"role": "assistant", "content": ""}` first, then
///   `{"content": text}`, and `{}` with the finish reason at the end).
/// @param finish_reason OpenAI's finish reason on the last choice chunk; empty: `null`.
/// @param include_usage adds `"usage": null`, as OpenAI does on every chunk of a stream that
///   asked for usage.
nlohmann::json stream_chunk(const std::string& id, long long created, const std::string& model,
                            nlohmann::json delta, std::string_view finish_reason = {},
                            bool include_usage = false);

/// A stream chunk's `delta` for one delta of keel's stream: `{"content": text}`, or for a
/// tool-call piece `{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
/// "arguments"}}]}` (id, type and name on a call's first piece only, as OpenAI streams them).
nlohmann::json delta_json(const keel::llm::stream_delta& d);

/// The usage chunk that ends a stream which asked for it (`stream_options.include_usage`): no
/// choices, the reply's usage.
nlohmann::json usage_chunk(const std::string& id, long long created, const std::string& model,
                           const keel::llm::token_usage& usage);

/// An answer for a failed call.
struct error_reply {
  /// HTTP status.
  int status = 500;
  /// When the caller may try again, if keel knows.
  std::optional<std::chrono::nanoseconds> retry_after;
  /// `{"error": {"message", "type", "param", "code"}}`.
  nlohmann::json body;
};

/// `{"error": {"message": message, "type": type, "param": param or null, "code": code or
/// null}}`.
nlohmann::json error_body(std::string_view message, std::string_view type,
                          std::string_view param = {}, std::string_view code = {});

/// The answer for a call that failed with `e` (keel's final error: a provider error, a keel
/// failure such as retries_exhausted or circuit_open, or a transport error). See the overview.
error_reply error_answer(const std::exception_ptr& e);

/// True if the error that decided `e` (through all_fallbacks_failed, retries_exhausted and a
/// stream's stream_interrupted) is a provider's content filter or refusal
/// (`keel::llm::errc::content_filtered`) that came in a 2xx answer, which OpenAI answers as a
/// completion, not an error: `keel serve` then ends a stream with finish reason
/// "content_filter". (A filter answered with a 4xx, Azure's, stays an error.)
bool is_content_filter(const std::exception_ptr& e);

/// The answer a content filter or refusal came with (`provider_error_info::filtered_reply`, set
/// only from a 2xx answer; found as `is_content_filter` finds the error), or null if `e` has
/// none. `completion_body` writes it as OpenAI would: the text before the filter
/// with finish reason "content_filter", or `content: null` and the `refusal`.
std::shared_ptr<const keel::llm::chat_response> filtered_reply(const std::exception_ptr& e);

}  // namespace keel::gateway
