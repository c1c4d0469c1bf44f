// The mock LLM server's Bedrock Converse bodies (answers and error bodies) and ConverseStream
// event streams.
#include "mock_detail.hpp"

#include <keel/llm/event_stream.hpp>

namespace keel::testing::detail {

void bedrock_error(reply& r, int status, std::string_view type, std::string_view message) {
  r.status = status;
  r.headers.emplace_back(
      "x-amzn-ErrorType",
      std::string(type) + ":http://internal.amazon.com/coral/com.amazon.bedrock/");
  r.body = dump(json{{"message", message}});
}

void bedrock_malformed(reply& r) {
  bedrock_error(r, 400, "ValidationException",
                "Malformed input request, please reformat your input and try again.");
}

void bedrock_answer(reply& r, fault_kind k, const body_input& in) {
  const std::string& text = in.text;
  const std::size_t prompt_tokens = in.prompt_tokens;
  const std::size_t completion_tokens = in.completion_tokens;
  switch (k) {
    case fault_kind::ok:
    case fault_kind::content_filter: {
      // A guardrail answers 200 with its canned message and stopReason
      // "guardrail_intervened", which keel::llm reads as content_filtered.
      const bool blocked = k == fault_kind::content_filter;
      const auto& call = blocked ? std::nullopt : in.request.tool_call;
      json content = json::array(
          {{{"text",
             blocked ? std::string("Sorry, the model cannot answer this question.") : text}}});
      if (call) {
        content = json::array({{{"toolUse",
                                 {{"toolUseId", "tooluse_mock" + in.id},
                                  {"name", call->name},
                                  {"input", json::parse(call->arguments)}}}}});
      }
      r.body = dump(
          json{{"output", {{"message", {{"role", "assistant"}, {"content", std::move(content)}}}}},
               {"stopReason", blocked ? "guardrail_intervened"
                              : call  ? "tool_use"
                                      : "end_turn"},
               {"usage",
                {{"inputTokens", prompt_tokens},
                 {"outputTokens", completion_tokens},
                 {"totalTokens", prompt_tokens + completion_tokens}}},
               {"metrics", {{"latencyMs", r.latency.count()}}}});
      break;
    }
    case fault_kind::rate_limit:
    case fault_kind::throttling:
      bedrock_error(r, 429, "ThrottlingException",
                    "Too many requests, please wait before trying again.");
      break;
    case fault_kind::quota_exhausted:
      bedrock_error(r, 400, "ServiceQuotaExceededException",
                    "Your request exceeds the service quota for your account. You can view "
                    "your quotas at https://console.aws.amazon.com/servicequotas.");
      break;
    case fault_kind::context_length:
      bedrock_error(r, 400, "ValidationException", "Input is too long for requested model.");
      break;
    case fault_kind::server_error:
      bedrock_error(r, 500, "InternalServerException",
                    "The system encountered an unexpected error during processing. Try "
                    "your request again.");
      break;
    case fault_kind::auth:
      bedrock_error(r, 403, "AccessDeniedException",
                    "You don't have access to the model with the specified model ID.");
      break;
    case fault_kind::not_found:
      bedrock_error(r, 404, "ResourceNotFoundException",
                    "Could not resolve the foundation model from the provided model "
                    "identifier.");
      break;
    case fault_kind::bad_request:
      bedrock_error(r, 400, "ValidationException",
                    "1 validation error detected: Value at 'inferenceConfig.temperature' "
                    "failed to satisfy constraint: Member must have value less than or "
                    "equal to 1");
      break;
    case fault_kind::timeout:
      bedrock_error(r, 408, "ModelTimeoutException",
                    "Model has timed out in processing the request. Try your request "
                    "again.");
      break;
    default:  // unavailable, overloaded
      bedrock_error(r, 503, "ServiceUnavailableException",
                    "Bedrock is unable to process your request.");
      break;
  }
}

namespace {

using keel::llm::event_stream_header;
using keel::llm::event_stream_header_type;

// One event-stream frame with the headers AWS sends on ConverseStream events.
std::string bedrock_event(std::string_view type, const json& payload) {
  return keel::llm::encode_event_stream_message(
      {event_stream_header(":event-type", event_stream_header_type::string, std::string(type)),
       event_stream_header(":content-type", event_stream_header_type::string, "application/json"),
       event_stream_header(":message-type", event_stream_header_type::string, "event")},
      dump(payload));
}

// A modelled exception inside the stream (`:message-type` exception).
std::string bedrock_exception(std::string_view type, std::string_view message) {
  return keel::llm::encode_event_stream_message(
      {event_stream_header(":exception-type", event_stream_header_type::string, std::string(type)),
       event_stream_header(":content-type", event_stream_header_type::string, "application/json"),
       event_stream_header(":message-type", event_stream_header_type::string, "exception")},
      dump(json{{"message", message}}));
}

}  // namespace

// ConverseStream's event order: messageStart, contentBlockDelta pieces, contentBlockStop,
// messageStop, metadata (usage, metrics).
stream_reply bedrock_stream(fault_kind k, fault_kind fault, const body_input& in) {
  const stream_settings settings = in.plan ? in.plan->stream : stream_settings();
  const bool blocked = k == fault_kind::content_filter;
  const std::string text =
      blocked ? std::string("Sorry, the model cannot answer this question.") : in.text;
  stream_reply s;
  s.content_type = "application/vnd.amazon.eventstream";
  s.chunk_latency = settings.chunk_latency;
  s.parts.push_back({bedrock_event("messageStart", {{"role", "assistant"}}), false});
  const auto& call = blocked ? std::nullopt : in.request.tool_call;
  if (call) {
    s.parts.push_back(
        {bedrock_event(
             "contentBlockStart",
             {{"contentBlockIndex", 0},
              {"start",
               {{"toolUse", {{"toolUseId", "tooluse_mock" + in.id}, {"name", call->name}}}}}}),
         false});
  }
  const std::vector<std::string> pieces =
      split_text(call ? call->arguments : text, settings.chunk_bytes);
  for (const std::string& piece : pieces) {
    json delta = call ? json{{"toolUse", {{"input", piece}}}} : json{{"text", piece}};
    s.parts.push_back({bedrock_event("contentBlockDelta",
                                     {{"contentBlockIndex", 0}, {"delta", std::move(delta)}}),
                       true});
  }
  s.parts.push_back({bedrock_event("contentBlockStop", {{"contentBlockIndex", 0}}), false});
  s.parts.push_back({bedrock_event("messageStop", {{"stopReason", blocked ? "guardrail_intervened"
                                                                  : call  ? "tool_use"
                                                                          : "end_turn"}}),
                     false});
  s.parts.push_back(
      {bedrock_event("metadata", {{"usage",
                                   {{"inputTokens", in.prompt_tokens},
                                    {"outputTokens", in.completion_tokens},
                                    {"totalTokens", in.prompt_tokens + in.completion_tokens}}},
                                  {"metrics", {{"latencyMs", 0}}}}),
       false});

  const std::size_t at = (call ? 2 : 1) + std::min(settings.fault_after_chunks, pieces.size());
  std::string error;
  if (fault == fault_kind::stream_error) {
    error = bedrock_exception("modelStreamErrorException",
                              "The model stream encountered an error. Try your request again.");
  } else if (fault == fault_kind::stream_throttled) {
    error = bedrock_exception("throttlingException",
                              "Too many requests, please wait before trying again.");
  }
  // A bad CRC: the frame's last byte is its message CRC32.
  std::string corrupted = s.parts[at].bytes;
  corrupted.back() = static_cast<char>(corrupted.back() ^ 0x5a);
  place_fault(s, fault, at, std::move(error), std::move(corrupted));
  return s;
}

}  // namespace keel::testing::detail
