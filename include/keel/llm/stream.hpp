// Incremental decoders of the three providers' streaming replies into provider-neutral events.
#pragma once

// Overview
// --------
// A streamed chat completion arrives as a body the transport reads chunk by chunk:
//
//   - OpenAI chat completions with `stream: true`: server-sent events whose data are
//     `chat.completion.chunk` objects (`choices[0].delta.content`, `finish_reason`, and with
//     `stream_options.include_usage` a last chunk with empty `choices` and the `usage`), ended by
//     `data: [DONE]`; an `{"error": {...}}` payload reports a failure mid-stream.
//   - Anthropic messages: server-sent events `message_start` (id, model, input tokens),
//     `content_block_start`/`_delta` (`text_delta`)/`_stop`, `message_delta` (stop reason, output
//     tokens), `message_stop`, `ping`, and `error` (`{"type":"error","error":{"type":
//     "overloaded_error",...}}`).
//   - Amazon Bedrock ConverseStream: AWS event-stream binary messages (<keel/llm/event_stream.hpp>)
//     whose `:event-type` is messageStart, contentBlockDelta (`delta.text`), contentBlockStop,
//     messageStop (`stopReason`) or metadata (`usage`), or whose `:message-type` is `exception`
//     (`:exception-type` throttlingException, modelStreamErrorException, ...).
//
// A `stream_decoder` turns any of them into the same `stream_event`s: start, text, finish,
// usage, done and error.
//
// Design
// ------
// - Push parsers, no I/O: `feed(bytes, out)` takes whatever the transport read (split anywhere,
//   down to one byte) and appends the events those bytes complete; `finish(out)` says the body
//   ended. A decoder never reads, waits or owns a socket, so one decoder serves any transport
//   (Beast, a test's string, a fuzzer) and its output depends only on the bytes, never on how
//   they were split. The tests feed every split point and compare.
// - Bounded: a decoder holds at most one partial line and one event (SSE, default 1 MiB each) or
//   one partial message (event-stream, default 16 MiB, AWS's limit). Anything larger is an error,
//   so a broken or hostile server cannot make keel buffer without bound. JSON payloads are also
//   refused past `max_json_depth` levels (<keel/llm/json_depth.hpp>).
// - Errors are events, not exceptions: a decoder reports a failure as an `error` event carrying a
//   `provider_error` classified exactly as the non-streaming `parse_response` classifies the same
//   provider error (e.g. Anthropic `overloaded_error` -> overloaded, `rate_limit_error` ->
//   rate_limited, `api_error` -> server_error; Bedrock `throttlingException` -> rate_limited,
//   `modelStreamErrorException` and `internalServerException` -> server_error,
//   `serviceUnavailableException` -> overloaded, `validationException` -> bad_request). The
//   stream layer above decides what a failure after the first delta means (issue 15's commit
//   point); the decoder only names it. Bytes that do not parse (bad JSON, a bad CRC, an unknown
//   header type, a bound exceeded) are `malformed_response`. A body that ends before the
//   protocol's end (OpenAI without `data: [DONE]`, Anthropic without `message_stop`, Bedrock
//   without `messageStop` or inside a message) is `transport`, like an EOF mid-body in the
//   non-streaming path: the connection was cut, which is worth retrying.
// - The first error is final: after it, `feed` and `finish` append nothing. So is `done`: bytes
//   after the protocol's end are ignored (still bounded).
// - A refusal mirrors `parse_response`: OpenAI `finish_reason` "content_filter" or a `refusal`
//   delta, Anthropic `stop_reason` "refusal", Bedrock `stopReason` "content_filtered" or
//   "guardrail_intervened" give the `finish` event (when there is one) and then a
//   `content_filtered` error.
// - Tool calls (issue 18) become `tool_call` events in OpenAI's streaming shape, whatever the
//   provider: OpenAI `delta.tool_calls[]`, Anthropic `content_block_start` of a `tool_use` block
//   then `input_json_delta` fragments, Bedrock `contentBlockStart.start.toolUse` then
//   `contentBlockDelta.delta.toolUse.input` fragments. Calls are numbered 0, 1, ... in the order
//   they start (whatever indices the provider used). A call whose block ends with no arguments
//   gets a `{}` fragment, as the non-streamed answer would have.
// - Only the first choice (OpenAI `index` 0) is decoded; other content (thinking, other choices)
//   is skipped. Unknown event types are ignored, as the providers' versioning policies ask.
//
// Example:
//
//     auto dec = keel::llm::make_stream_decoder(keel::llm::provider_kind::anthropic);
//     std::vector<keel::llm::stream_event> events;
//     for (std::string_view chunk : body_chunks) {
//       dec->feed(chunk, events);
//     }
//     dec->finish(events);
//     for (const auto& e : events) {
//       if (e.kind == keel::llm::stream_event_kind::text) { std::cout << e.text; }
//       if (e.error) { /* e.error->llm_code(), keel::classify(...) */ }
//     }
//
// Which failures are worth retrying: see <keel/llm/error.hpp> (the error's condition).
//
// Cancellation: these are synchronous pure functions (no I/O, no awaiting); there is nothing to
// cancel. Dropping a decoder mid-stream is always safe.
//
// Thread safety: a decoder is a plain object; use one per stream, from one thread at a time.

#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/event_stream.hpp>
#include <keel/llm/sse.hpp>

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::llm {

/// What a `stream_event` reports.
enum class stream_event_kind {
  /// The reply started: `id`, `model` and `role` as far as the provider sends them.
  start,
  /// A piece of the reply's text: `text` (never empty).
  text,
  /// A piece of a tool call: `tool_index` says which call of the reply (0, 1, ... in order); the
  /// first piece of a call carries `tool.id` and `tool.name`, and every piece may carry a
  /// fragment of `tool.arguments` (JSON text; the fragments joined are the arguments), as OpenAI
  /// streams them.
  tool_call,
  /// The model stopped: `finish_reason` as the provider spells it ("stop", "end_turn", ...).
  finish,
  /// Token counts so far: `usage` (cumulative; a later usage event replaces an earlier one).
  usage,
  /// The stream reached its protocol's end ([DONE], message_stop, Bedrock messageStop + end of
  /// body); nothing follows.
  done,
  /// A failure: `error` (classified); nothing follows.
  error,
};

/// The name of a `stream_event_kind`, e.g. "text".
std::string_view to_string(stream_event_kind k) noexcept;

/// One provider-neutral event of a streamed reply.
struct stream_event {
  /// What this event reports; says which fields below are set.
  stream_event_kind kind = stream_event_kind::text;
  /// `text`: the delta.
  std::string text;
  /// `start`: the response id (OpenAI `id`, Anthropic `message.id`; Bedrock sends none).
  std::string id;
  /// `start`: the model that answers (OpenAI, Anthropic; Bedrock sends none).
  std::string model;
  /// `start`: the role, normally "assistant".
  std::string role;
  /// `finish`: why the model stopped.
  std::string finish_reason;
  /// `tool_call`: the call's id and name (first piece) and an arguments fragment.
  keel::llm::tool_call tool;
  /// `tool_call`: which call of the reply, from 0.
  std::size_t tool_index = 0;
  /// `usage`: input and output tokens reported so far.
  token_usage usage;
  /// `error`: the classified failure.
  std::optional<provider_error> error;

  /// A text event.
  stream_event() = default;
  /// An event of `k` with no fields set.
  explicit stream_event(stream_event_kind k) : kind(k) {}
};

/// Options common to every stream decoder.
struct stream_options {
  /// The bound on one SSE line and one SSE event's data (OpenAI, Anthropic).
  std::size_t max_event_bytes = default_sse_max_bytes;
  /// The bound on one event-stream message (Bedrock).
  std::size_t max_message_bytes = default_event_stream_max_bytes;
  /// The HTTP status of the response whose body is decoded, put in errors' `status()`.
  int http_status = 200;
  /// The response's request id (x-request-id, request-id, x-amzn-requestid), put in errors.
  std::string request_id;

  /// The defaults.
  stream_options() = default;
};

/// Decodes one provider's streamed reply body into `stream_event`s.
class stream_decoder {
 public:
  virtual ~stream_decoder() = default;

  /// Decodes `bytes` (any split of the body) and appends the events they complete to `out`.
  /// Never throws except `std::bad_alloc`; a failure is appended as an `error` event, after which
  /// this does nothing.
  virtual void feed(std::string_view bytes, std::vector<stream_event>& out) = 0;

  /// Ends the body: appends `done` if the stream ended properly and has not said so yet, or an
  /// `error` (`transport`) if it was cut short; nothing if the stream already ended or failed.
  virtual void finish(std::vector<stream_event>& out) = 0;

  /// True once a `done` or `error` event has been appended.
  bool ended() const noexcept { return ended_; }

 protected:
  /// A decoder for `provider` with `opts`.
  stream_decoder(provider_kind provider, stream_options opts)
      : provider_(provider), opts_(std::move(opts)) {}

  /// Appends an error event (and ends the stream).
  void emit_error(std::vector<stream_event>& out, errc code, std::string provider_code,
                  std::string message);
  /// Appends a done event (and ends the stream).
  void emit_done(std::vector<stream_event>& out);

  /// The provider whose format this decodes.
  provider_kind provider_;
  /// The options given at construction.
  stream_options opts_;
  /// Set by `emit_error` and `emit_done`.
  bool ended_ = false;
  /// The most tool calls one reply may start (a bound against a hostile stream).
  static constexpr std::size_t max_tool_calls = 1024;
  /// The provider's index of each tool call started so far (Anthropic and Bedrock: the content
  /// block; OpenAI: `tool_calls[].index`), in order: a call's position is its `tool_index`.
  std::vector<long long> tool_blocks_;
  /// Whether each tool call has had a non-empty arguments fragment.
  std::vector<bool> tool_has_args_;
  /// The `tool_index` of the tool call at provider index `block`, or -1 if none started there.
  long long tool_of_block(long long block) const noexcept;
  /// Appends a `tool_call` event for the call at provider index `block`: its start if no call
  /// is there yet and `starts` (at most `max_tool_calls` per reply), else a piece of it (a piece
  /// with nothing in it is dropped). The first call of `answer_tool_name` (Anthropic and
  /// Bedrock) is the reply's text instead: its pieces' arguments are `text` events. Returns what
  /// was wrong, "" if nothing: no call there, or too many calls; the caller reports it as
  /// malformed.
  std::string tool_piece(long long block, tool_call piece, bool starts,
                         std::vector<stream_event>& out);
  /// The provider index of the block that calls `answer_tool_name` (chat.hpp's
  /// `response_format` on Anthropic and Bedrock), -1 if none: its pieces are text events.
  long long answer_block_ = -1;
  /// Whether the answer block has had a non-empty piece.
  bool answer_has_text_ = false;
  /// A content block ended: a tool call in it that had no arguments gets `{}` (Anthropic and
  /// Bedrock stream an empty `partial_json`/no `input` for a tool without input, which their
  /// non-streamed answers give as `{}`; OpenAI SDKs parse the arguments as JSON).
  void end_block(long long block, std::vector<stream_event>& out);
};

namespace detail {

/// The part of the SSE-based decoders (OpenAI, Anthropic) that feeds the SSE decoder and hands
/// each complete event to `on_event`.
class sse_stream_decoder : public stream_decoder {
 public:
  /// See `stream_decoder::feed`.
  void feed(std::string_view bytes, std::vector<stream_event>& out) final;
  /// See `stream_decoder::finish`; a stream that did not reach `end_name` is truncated.
  void finish(std::vector<stream_event>& out) final;

 protected:
  /// A decoder for `provider` whose protocol ends with `end_name` (for the truncation error).
  sse_stream_decoder(provider_kind provider, stream_options opts, const char* end_name);
  /// Decodes one SSE event into `out`.
  virtual void on_event(const sse_event& e, std::vector<stream_event>& out) = 0;

 private:
  void dispatch(std::vector<stream_event>& out);
  sse_decoder sse_;
  std::vector<sse_event> events_;
  const char* end_name_;
};

}  // namespace detail

/// Decodes OpenAI chat completions streams (`stream: true`); without `data: [DONE]` the stream
/// is truncated.
class openai_stream_decoder final : public detail::sse_stream_decoder {
 public:
  /// A decoder with `opts`.
  explicit openai_stream_decoder(stream_options opts = stream_options());

 private:
  void on_event(const sse_event& e, std::vector<stream_event>& out) override;
  bool started_ = false;
};

/// Decodes Anthropic messages streams; without `message_stop` the stream is truncated.
class anthropic_stream_decoder final : public detail::sse_stream_decoder {
 public:
  /// A decoder with `opts`.
  explicit anthropic_stream_decoder(stream_options opts = stream_options());

 private:
  void on_event(const sse_event& e, std::vector<stream_event>& out) override;
  token_usage usage_;
};

/// Decodes Amazon Bedrock ConverseStream bodies (AWS event-stream).
class bedrock_stream_decoder final : public stream_decoder {
 public:
  /// A decoder with `opts`.
  explicit bedrock_stream_decoder(stream_options opts = stream_options());
  /// See `stream_decoder::feed`.
  void feed(std::string_view bytes, std::vector<stream_event>& out) override;
  /// See `stream_decoder::finish`; without `messageStop`, or inside a message, the stream is
  /// truncated; otherwise appends `done`.
  void finish(std::vector<stream_event>& out) override;

 private:
  void on_message(const event_stream_message& m, std::vector<stream_event>& out);
  event_stream_decoder frames_;
  std::vector<event_stream_message> messages_;
  bool stopped_ = false;  // messageStop seen
};

/// A decoder for `kind`'s streaming format.
std::unique_ptr<stream_decoder> make_stream_decoder(provider_kind kind,
                                                    stream_options opts = stream_options());

/// A whole reply as the events a stream of it would give: start (id, model), the text as one
/// event, each tool call as one event, finish, usage, done. For a server that ignores
/// `"stream": true` and answers one JSON body (parse it with `parse_response`, then feed these
/// to what consumes a stream). No I/O.
std::vector<stream_event> events_of(const chat_response& reply);

/// Replaces every whole occurrence of a secret in text that arrives in pieces (a stream's
/// deltas), so that a key a server echoes is caught even when it straddles two pieces.
///
/// It holds back only a tail that could be the start of a secret (usually nothing; a key's
/// first bytes, such as `sk-`, at most one byte short of the longest secret), and hands it out
/// with the next piece or at `finish`. No I/O; one scrubber per stream.
class stream_scrubber {
 public:
  /// A scrubber of `secrets` (empty strings are ignored), replacing each by `marker`. Both must
  /// outlive the scrubber.
  stream_scrubber(const std::vector<std::string>& secrets, std::string_view marker) noexcept
      : secrets_(secrets), marker_(marker) {}
  /// Takes the next piece and appends to `out` the text that is safe to hand out now (possibly
  /// nothing).
  void feed(std::string_view piece, std::string& out);
  /// The stream ended: appends the held-back tail (it was not a secret) to `out`.
  void finish(std::string& out);

 private:
  const std::vector<std::string>& secrets_;
  std::string_view marker_;
  std::string held_;
};

}  // namespace keel::llm
