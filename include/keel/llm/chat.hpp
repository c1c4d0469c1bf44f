// The provider-neutral chat model (request, response, endpoint) and its dispatching entry points.
#pragma once

// Overview
// --------
// A `chat_request` says what to ask; an `endpoint` says where (provider, base URL, key, region).
// The wire formats are pure functions from these values to a plain `keel::http::request`, and from
// a `keel::http::response` back to a `chat_response` or a thrown `keel::llm::provider_error`:
//
//   - `keel::llm::openai::{build_request, parse_response}`     (<keel/llm/openai.hpp>)
//   - `keel::llm::anthropic::{build_request, parse_response}`  (<keel/llm/anthropic.hpp>)
//   - `keel::llm::bedrock::{build_request, parse_response}`    (<keel/llm/bedrock.hpp>)
//
// and `keel::llm::build_request` / `keel::llm::parse_response` here dispatch on
// `endpoint::kind`. Nothing is sent: a transport (keel::http) does that, which keeps these
// functions testable byte for byte. A Bedrock request must still be signed with
// `keel::llm::sign_request` (<keel/llm/sigv4.hpp>) before it is sent.
//
// Types have constructors (besides aggregate-style member assignment) because g++ 12 destroys a
// brace-initialised aggregate temporary twice when it shares a full-expression with `co_await`;
// build requests on their own line either way.
//
// Example:
//
//     auto req = keel::llm::chat_request::from_prompt("gpt-4o-mini", "Say hi", 64, "Be terse.");
//     keel::llm::endpoint ep(keel::llm::provider_kind::openai, "", api_key);
//     keel::http::request http_req = keel::llm::build_request(req, ep);
//     keel::http::response res = co_await client.send(http_req);   // keel::http
//     keel::llm::chat_response reply =
//         keel::llm::parse_response(res, ep.kind, std::chrono::system_clock::now());
//
// Tools and images (issue 18) are carried in OpenAI's shape, the one most callers already hold:
// a tool call's arguments are JSON text, an image is a URL (data: or http(s)). Each wire format
// translates: Anthropic and Bedrock get `input` objects, `tool_result` blocks in user turns
// (consecutive results merged) and base64 image sources. Bedrock has no `tool_choice` none: the
// tools are withheld; and since Converse refuses a conversation holding tool calls without a
// `toolConfig`, the tools such a conversation called are then declared by name with an open
// schema. What a provider cannot take (Bedrock: an image by http URL; any: arguments that are not
// a JSON object, an image type other than PNG, JPEG, GIF or WebP) throws `provider_error`
// `bad_request` (status 0) from `build_request`, naming the message and part, rather than being
// dropped: a dropped image or tool would answer a different question. A tool choice without
// tools is not sent.
//
// Which failures are worth retrying: see <keel/llm/error.hpp>; `parse_response` throws
// `provider_error` whose code's condition says so, with `retry_after()` from the server's hints.
//
// Thread safety: plain values and pure functions.

#include <keel/http/message.hpp>
#include <keel/llm/hints.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::llm {

/// What a `content_part` holds.
enum class part_kind {
  /// Text (`content_part::text`).
  text,
  /// An image (`content_part::image_url`).
  image,
};

/// One piece of a turn whose content is more than one string (text and images, in order).
struct content_part {
  /// Text or image.
  part_kind kind = part_kind::text;
  /// The text of a text part.
  std::string text;
  /// An image part's source: a `data:image/{png,jpeg,gif,webp};base64,...` URL, or an http(s)
  /// URL (OpenAI and Anthropic fetch it; Bedrock takes bytes only and is refused one).
  std::string image_url;
  /// An image part's OpenAI `detail` ("auto", "low", "high"; empty: not sent; other providers
  /// have none).
  std::string detail;

  /// An empty text part.
  content_part() = default;
  /// A text part.
  static content_part from_text(std::string t) {
    content_part p;
    p.text = std::move(t);
    return p;
  }
  /// An image part from a data: or http(s) URL.
  static content_part from_image(std::string url, std::string detail_level = {}) {
    content_part p;
    p.kind = part_kind::image;
    p.image_url = std::move(url);
    p.detail = std::move(detail_level);
    return p;
  }
};

/// A call of one of the request's tools, as the model asked for it.
struct tool_call {
  /// The provider's id for the call (OpenAI "call_...", Anthropic "toolu_...", Bedrock
  /// `toolUseId`); a `tool` turn answers it by this id.
  std::string id;
  /// The tool's name.
  std::string name;
  /// The arguments as JSON text (an object), as OpenAI sends them; Anthropic's and Bedrock's
  /// `input` objects are serialised to it, and parsed back from it when sent to them.
  std::string arguments;

  /// An empty call.
  tool_call() = default;
  /// A call of `n` with id `i` and JSON arguments `args`.
  tool_call(std::string i, std::string n, std::string args)
      : id(std::move(i)), name(std::move(n)), arguments(std::move(args)) {}
};

/// A tool (function) the model may call.
struct tool_definition {
  /// The name the model calls it by.
  std::string name;
  /// What it does (empty: not sent).
  std::string description;
  /// The JSON schema of its arguments (an object schema); null: `{"type": "object"}`.
  nlohmann::json parameters;
  /// OpenAI's `strict` (absent: not sent; other providers have none).
  std::optional<bool> strict;
};

/// How the model may use the request's tools.
enum class tool_choice_mode {
  /// The model decides (OpenAI "auto", Anthropic `auto`, Bedrock `auto`).
  automatic,
  /// No tool (OpenAI "none", Anthropic `none`; Bedrock has none: its tools are withheld).
  none,
  /// Some tool (OpenAI "required", Anthropic `any`, Bedrock `any`).
  required,
  /// The tool named `tool_choice_option::name` (OpenAI function, Anthropic/Bedrock `tool`).
  named,
};

/// A request's tool choice.
struct tool_choice_option {
  /// How tools may be used.
  tool_choice_mode mode = tool_choice_mode::automatic;
  /// The tool, for `named`.
  std::string name;
};

/// One turn of a conversation.
///
/// Roles: "user", "assistant" and "tool" (put the system prompt in `chat_request::system`). A
/// "tool" turn carries one tool's result (`content`) for the call `tool_call_id`; Anthropic and
/// Bedrock get it as a `tool_result` block of a user turn, consecutive results merged into one
/// turn as they require.
struct chat_message {
  /// "user", "assistant" or "tool".
  std::string role;
  /// The text of the turn (ignored when `parts` is not empty).
  std::string content;
  /// Text and image parts in order; empty: the turn is `content`.
  std::vector<content_part> parts;
  /// An assistant turn's tool calls (its `content` may then be empty).
  std::vector<tool_call> tool_calls;
  /// A "tool" turn: the id of the call it answers.
  std::string tool_call_id;

  /// An empty turn.
  chat_message() = default;
  /// A turn with a role and text.
  chat_message(std::string r, std::string c) : role(std::move(r)), content(std::move(c)) {}
};

/// Which field of an OpenAI chat completions body carries `chat_request::max_tokens`.
enum class max_tokens_field {
  /// `max_completion_tokens` for OpenAI's reasoning models (o1, o3, o4, gpt-5 families: they
  /// reject `max_tokens`), `max_tokens` for every other model (which OpenAI-compatible servers
  /// such as vLLM and older proxies understand).
  automatic,
  /// Always `max_tokens`.
  max_tokens,
  /// Always `max_completion_tokens` (OpenAI's current name; the SDK marks `max_tokens`
  /// deprecated).
  max_completion_tokens,
};

/// The `max_tokens` an Anthropic entry sends for a request that gives none
/// (`chat_request::max_tokens` <= 0): the messages API requires the field, and 4,096 is the
/// output limit of the oldest Claude 3 models (newer ones allow more), as LiteLLM's default.
inline constexpr int anthropic_default_max_tokens = 4096;

/// The name of the tool that carries `chat_request::response_format` to Anthropic and Bedrock
/// entries (see there). A request's own tool of this name is not told apart from it.
inline constexpr std::string_view answer_tool_name = "keel_response_format";

/// True for the model ids of OpenAI's reasoning families: the last path segment of `model`
/// starts with "o1", "o3", "o4" or "gpt-5" ("o3-mini", "openai/o4-mini", "gpt-5-nano").
bool is_openai_reasoning_model(std::string_view model) noexcept;

/// A provider-neutral chat completion request.
struct chat_request {
  /// The provider's model id ("gpt-4o-mini", "claude-3-5-haiku-latest",
  /// "anthropic.claude-3-haiku-20240307-v1:0").
  std::string model;
  /// The system prompt (empty: none).
  std::string system;
  /// The conversation, oldest first.
  std::vector<chat_message> messages;
  /// The most tokens the reply may use; 0 or less: not given. Not given, OpenAI-format and
  /// Bedrock entries send no limit (the model's own maximum applies, as when an SDK caller sets
  /// none) and Anthropic entries, whose API requires one, send `anthropic_default_max_tokens`.
  /// The token estimate (<keel/llm/tokens.hpp>) then counts the prompt only.
  int max_tokens = 1024;
  /// Sampling temperature (absent: the provider's default).
  std::optional<double> temperature;
  /// Nucleus sampling (absent: the provider's default): OpenAI `top_p`, Anthropic `top_p`,
  /// Bedrock `inferenceConfig.topP`.
  std::optional<double> top_p;
  /// Stop sequences (empty: none): OpenAI `stop`, Anthropic `stop_sequences`, Bedrock
  /// `inferenceConfig.stopSequences`.
  std::vector<std::string> stop;
  /// Sampling seed (absent: none): OpenAI `seed`; Anthropic and Bedrock have none and do not
  /// get it.
  std::optional<std::int64_t> seed;
  /// OpenAI only: the field `max_tokens` goes in.
  max_tokens_field token_field = max_tokens_field::automatic;
  /// The format the reply must take: a JSON schema, or OpenAI's own `{"type": "json_schema",
  /// "json_schema": {"name", "schema", ...}}`, `{"type": "json_object"}` or `{"type": "text"}`.
  /// OpenAI-format entries send OpenAI's shapes verbatim as `response_format` and a schema
  /// wrapped in one (see <keel/llm/openai.hpp>). Anthropic and Bedrock have no such field, so
  /// it is asked for with a tool, as LiteLLM does: a tool named `answer_tool_name` whose input
  /// schema is the format's schema (`json_object`: any object; `text`: no tool), which the model
  /// must call, and whose call comes back as the reply's text (JSON) with finish reason "end_turn",
  /// in a whole reply or as a stream's text deltas. With tools of the request's own and a tool
  /// choice of automatic (or none given), the model must call one of them or the answer tool
  /// (Anthropic `any`, Bedrock `any`); with "required" or a named tool, no answer tool is added
  /// (the reply is a tool call); with "none", only the answer tool. Bedrock forces a tool only for
  /// the families that support it (Anthropic's, Mistral Large, Amazon Nova); other Bedrock
  /// models get neither the tool nor the format.
  std::optional<nlohmann::json> response_format;
  /// Free-form metadata: sent as OpenAI `metadata` and Bedrock `requestMetadata` when it is a
  /// non-empty object (otherwise not sent); Anthropic gets only its `user_id` (Anthropic's
  /// `metadata` refuses other keys).
  nlohmann::json metadata;
  /// Tools the model may call (empty: none): OpenAI `tools` (function), Anthropic `tools`,
  /// Bedrock `toolConfig.tools`.
  std::vector<tool_definition> tools;
  /// How the tools may be used (absent: the provider's default, automatic).
  std::optional<tool_choice_option> tool_choice;
  /// May the model call several tools in one turn (absent: the provider's default, yes)?
  /// OpenAI `parallel_tool_calls`, Anthropic `tool_choice.disable_parallel_tool_use`; Bedrock
  /// has no such switch and ignores it.
  std::optional<bool> parallel_tool_calls;
  /// OpenAI-format fields keel does not model (`frequency_penalty`, `presence_penalty`,
  /// `logit_bias`, `reasoning_effort`, `user`, a server's own extensions such as vLLM's `top_k`):
  /// an object whose members an OpenAI-format entry sends verbatim at the top level of its body,
  /// after keel's own. Anthropic and Bedrock entries do not send them (they have no such fields;
  /// a field they would refuse is better dropped than failing every call of a mixed route). A
  /// member keel writes itself (`model`, `messages`, `stream`, `stream_options`, `max_tokens`,
  /// `max_completion_tokens` and every field above) is not sent from here. Null or not an
  /// object: nothing.
  nlohmann::json extra_fields;

  /// An empty request (set `model` and `messages`).
  chat_request() = default;
  /// A request for `model` with a conversation and a reply budget.
  chat_request(std::string m, std::vector<chat_message> msgs, int max_tok = 1024)
      : model(std::move(m)), messages(std::move(msgs)), max_tokens(max_tok) {}

  /// A request for `model` with one user turn: the common one-prompt case.
  ///
  /// A named function rather than a `(string, string)` constructor, so that the call says which
  /// string is the prompt.
  /// @param m the provider's model id.
  /// @param prompt the text of the single user turn.
  /// @param max_tok the most tokens the reply may use.
  /// @param system_prompt the system prompt (empty: none).
  /// @returns the request; every other field has its default.
  static chat_request from_prompt(std::string m, std::string prompt, int max_tok = 1024,
                                  std::string system_prompt = {}) {
    chat_request r(std::move(m), {chat_message("user", std::move(prompt))}, max_tok);
    r.system = std::move(system_prompt);
    return r;
  }
};

/// Tokens billed for one call.
struct token_usage {
  /// Prompt tokens.
  long long input = 0;
  /// Completion tokens.
  long long output = 0;
  /// Input plus output, in the throttler's unit (`keel::throttler::settle`).
  double total() const noexcept { return static_cast<double>(input + output); }
};

/// A successful chat completion.
struct chat_response {
  /// The reply text (text blocks concatenated).
  std::string text;
  /// The tools the model asked to call, in order (finish reason "tool_calls" / "tool_use").
  std::vector<tool_call> tool_calls;
  /// Why generation stopped, as the provider said it ("stop", "end_turn", "max_tokens", ...).
  std::string finish_reason;
  /// The model's refusal (OpenAI `message.refusal`, e.g. to a strict JSON schema), when it
  /// declined instead of answering; empty otherwise. A reply with one is a `content_filtered`
  /// error: it reaches a caller only as the error's `filtered_reply` (<keel/llm/error.hpp>).
  std::string refusal;
  /// The model that answered, when the provider says (Bedrock does not).
  std::string model;
  /// Tokens billed (zero when the provider did not report usage).
  token_usage usage;
  /// x-request-id / request-id / x-amzn-requestid.
  std::string request_id;
  /// The completion's own id when the body has one (OpenAI `id`, Anthropic `id`; Bedrock none).
  std::string id;
  /// Live quota from the response headers.
  rate_limit_info rate_limits;
  /// The parsed body, for anything not mapped above; null when it was parsed with `keep_raw`
  /// false (`parse_response`, `client_options::keep_raw`).
  nlohmann::json raw;
};

/// Which wire format an endpoint speaks.
enum class provider_kind { openai, anthropic, bedrock };

/// The provider's name as used in `provider_error::provider()`: "openai", "anthropic", "bedrock".
std::string_view to_string(provider_kind k) noexcept;

/// The `anthropic-version` keel sends unless an endpoint says otherwise: the current API
/// version, the one the official SDKs send (@anthropic-ai/sdk 1.x).
inline constexpr std::string_view anthropic_current_version = "2026-10-21";

/// True if Anthropic API version `version` (an ISO date) is 2026-10-21 or later: the key goes in
/// `Authorization: Bearer` (not `x-api-key`) and the request has no `temperature`, `top_p` or
/// `top_k` (the API removed them).
inline bool anthropic_bearer_version(std::string_view version) noexcept {
  return version >= anthropic_current_version;
}

/// Where and how to reach a provider. Never logged; `api_key` never appears in errors.
struct endpoint {
  /// The wire format.
  provider_kind kind = provider_kind::openai;
  /// Scheme and authority (and an optional path prefix, and a query that ends every request's
  /// URL, e.g. `?api-version=...`), no trailing slash needed; empty means the
  /// provider's public URL (https://api.openai.com, https://api.anthropic.com,
  /// https://bedrock-runtime.{region}.amazonaws.com). Point it at a mock server in tests.
  std::string base_url;
  /// OpenAI / Anthropic API key (Bedrock uses SigV4 credentials instead).
  std::string api_key;
  /// AWS region (Bedrock).
  std::string region;
  /// The `anthropic-version` header value; it also shapes the request (see
  /// `anthropic_bearer_version`).
  std::string anthropic_version = std::string(anthropic_current_version);

  /// An OpenAI endpoint at the public URL with no key.
  endpoint() = default;
  /// An endpoint of `k` at `base` (empty: public URL) with an API key and an AWS region.
  endpoint(provider_kind k, std::string base, std::string key = {}, std::string aws_region = {})
      : kind(k),
        base_url(std::move(base)),
        api_key(std::move(key)),
        region(std::move(aws_region)) {}
};

/// Builds the HTTP request for `req` in `ep.kind`'s wire format (Bedrock: unsigned).
/// @throws std::invalid_argument if a Bedrock endpoint has neither a base URL nor a region.
keel::http::request build_request(const chat_request& req, const endpoint& ep);

/// Builds the HTTP request for a streamed reply to `req` (Bedrock: unsigned): OpenAI and
/// Anthropic bodies get `"stream": true` (OpenAI also `stream_options.include_usage`, so the last
/// chunk carries the usage), Bedrock goes to `ConverseStream` (`/converse-stream`). Decode the
/// reply with `make_stream_decoder` (<keel/llm/stream.hpp>).
/// @throws std::invalid_argument as `build_request`.
keel::http::request build_stream_request(const chat_request& req, const endpoint& ep);

/// Parses a response in `kind`'s wire format.
/// @param now the wall-clock time the response arrived, for HTTP-date and RFC 3339 hints.
/// @param keep_raw false: leave `chat_response::raw` null. An OpenAI body is then read without
///   building a tree (the same fields, values and errors; about 5 times fewer instructions);
///   the other formats build their tree as before and drop it.
/// @return the reply on 2xx.
/// @throws provider_error on a non-2xx status (classified per provider), on a refusal or content
///   filter (`content_filtered`), or on a malformed 2xx body (`malformed_response`, naming the
///   JSON path).
chat_response parse_response(const keel::http::response& res, provider_kind kind,
                             std::chrono::system_clock::time_point now, bool keep_raw = true);

}  // namespace keel::llm
