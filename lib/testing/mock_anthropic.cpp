// The mock LLM server's Anthropic Messages bodies: answers and error bodies.
#include "mock_detail.hpp"

namespace keel::testing::detail {

// Anthropic's documented error body carries the request id at the top level too.
json anthropic_error(std::string_view type, std::string_view message, std::string_view request_id) {
  return json{{"type", "error"},
              {"error", {{"type", type}, {"message", message}}},
              {"request_id", request_id}};
}

void anthropic_malformed(reply& r, const std::string& rid) {
  r.status = 400;
  r.body = dump(anthropic_error("invalid_request_error",
                                "There was an issue with the format of your request body: "
                                "expected a JSON object with \"model\" and \"messages\"",
                                rid));
}

void anthropic_answer(reply& r, fault_kind k, const body_input& in) {
  const std::string& id = in.id;
  const std::string& rid = in.request_id;
  const std::string& model = in.request.model;
  const std::string& text = in.text;
  const fault_plan* plan = in.plan;
  const std::size_t prompt_tokens = in.prompt_tokens;
  const std::size_t completion_tokens = in.completion_tokens;
  const bool tokens_limited = in.tokens_limited;
  switch (k) {
    case fault_kind::ok:
    case fault_kind::content_filter: {
      // keel::llm reads stop_reason "refusal" as content_filtered; a refusal has no text.
      const bool refused = k == fault_kind::content_filter;
      const auto& call = in.request.tool_call;
      json content = refused ? json::array() : json::array({{{"type", "text"}, {"text", text}}});
      if (call && !refused) {
        content = json::array({{{"type", "tool_use"},
                                {"id", "toolu_mock" + id},
                                {"name", call->name},
                                {"input", json::parse(call->arguments)}}});
      }
      r.body = dump(json{{"id", "msg_mock" + id},
                         {"type", "message"},
                         {"role", "assistant"},
                         {"model", model},
                         {"content", std::move(content)},
                         {"stop_reason", refused ? "refusal"
                                         : call  ? "tool_use"
                                                 : "end_turn"},
                         {"stop_sequence", nullptr},
                         {"usage",
                          {{"input_tokens", prompt_tokens},
                           {"output_tokens", refused ? std::size_t{0} : completion_tokens}}}});
      break;
    }
    case fault_kind::rate_limit:
    case fault_kind::throttling:
      r.status = 429;
      r.body = dump(anthropic_error(
          "rate_limit_error",
          std::string("This request would exceed your organization's rate limit of ") +
              (tokens_limited ? "input tokens per minute" : "requests per minute") +
              ". For details, refer to: https://docs.anthropic.com/en/api/rate-limits.",
          rid));
      break;
    case fault_kind::quota_exhausted:
      r.status = 400;
      r.body = dump(anthropic_error(
          "invalid_request_error",
          "Your credit balance is too low to access the Anthropic API. Please go to Plans "
          "& Billing to upgrade or purchase credits.",
          rid));
      break;
    case fault_kind::context_length: {
      const std::size_t limit = plan && plan->context_window ? plan->context_window : 200000;
      r.status = 400;
      r.body = dump(anthropic_error(
          "invalid_request_error",
          "prompt is too long: " + std::to_string(std::max(prompt_tokens, limit + 1)) +
              " tokens > " + std::to_string(limit) + " maximum",
          rid));
      break;
    }
    case fault_kind::server_error:
      r.status = 500;
      r.body = dump(anthropic_error("api_error", "Internal server error", rid));
      break;
    case fault_kind::overloaded:
      r.status = 529;
      r.body = dump(anthropic_error("overloaded_error", "Overloaded", rid));
      break;
    case fault_kind::auth:
      r.status = 401;
      r.body = dump(anthropic_error("authentication_error", "invalid x-api-key", rid));
      break;
    case fault_kind::not_found:
      r.status = 404;
      r.body = dump(anthropic_error("not_found_error", "model: " + model, rid));
      break;
    case fault_kind::bad_request:
      r.status = 400;
      r.body = dump(anthropic_error("invalid_request_error",
                                    "temperature: Input should be less than or equal to 1", rid));
      break;
    case fault_kind::timeout:
      r.status = 504;
      r.body = dump(anthropic_error("timeout_error", "Request timed out", rid));
      break;
    default:  // unavailable
      r.status = 503;
      r.body = dump(anthropic_error("api_error", "Service Unavailable", rid));
      break;
  }
}

// The event flow of https://docs.anthropic.com/en/docs/build-with-claude/streaming: message_start,
// content_block_start, ping, content_block_delta (text_delta) pieces, content_block_stop,
// message_delta (stop_reason, cumulative usage.output_tokens), message_stop. A refusal has no
// content block.
stream_reply anthropic_stream(fault_kind k, fault_kind fault, const body_input& in) {
  const stream_settings settings = in.plan ? in.plan->stream : stream_settings();
  const bool refused = k == fault_kind::content_filter;
  auto event = [](std::string_view type, json data) { return sse_event(type, dump(data)); };
  stream_reply s;
  s.content_type = "text/event-stream; charset=utf-8";
  s.chunk_latency = settings.chunk_latency;
  s.parts.push_back(
      {event("message_start",
             {{"type", "message_start"},
              {"message",
               {{"id", "msg_mock" + in.id},
                {"type", "message"},
                {"role", "assistant"},
                {"content", json::array()},
                {"model", in.request.model},
                {"stop_reason", nullptr},
                {"stop_sequence", nullptr},
                {"usage", {{"input_tokens", in.prompt_tokens}, {"output_tokens", 1}}}}}}),
       false});
  const auto& call = refused ? std::nullopt : in.request.tool_call;
  if (call) {
    s.parts.push_back({event("content_block_start", {{"type", "content_block_start"},
                                                     {"index", 0},
                                                     {"content_block",
                                                      {{"type", "tool_use"},
                                                       {"id", "toolu_mock" + in.id},
                                                       {"name", call->name},
                                                       {"input", json::object()}}}}),
                       false});
  } else if (!refused) {
    s.parts.push_back(
        {event("content_block_start", {{"type", "content_block_start"},
                                       {"index", 0},
                                       {"content_block", {{"type", "text"}, {"text", ""}}}}),
         false});
  }
  s.parts.push_back({event("ping", {{"type", "ping"}}), false});
  const std::size_t head = s.parts.size();
  const std::vector<std::string> pieces =
      refused ? std::vector<std::string>()
              : split_text(call ? call->arguments : in.text, settings.chunk_bytes);
  for (const std::string& piece : pieces) {
    json delta = call ? json{{"type", "input_json_delta"}, {"partial_json", piece}}
                      : json{{"type", "text_delta"}, {"text", piece}};
    s.parts.push_back(
        {event("content_block_delta",
               {{"type", "content_block_delta"}, {"index", 0}, {"delta", std::move(delta)}}),
         true});
  }
  if (!refused) {
    s.parts.push_back(
        {event("content_block_stop", {{"type", "content_block_stop"}, {"index", 0}}), false});
  }
  s.parts.push_back(
      {event("message_delta",
             {{"type", "message_delta"},
              {"delta",
               {{"stop_reason", refused ? "refusal"
                                : call  ? "tool_use"
                                        : "end_turn"},
                {"stop_sequence", nullptr}}},
              {"usage", {{"output_tokens", refused ? std::size_t{0} : in.completion_tokens}}}}),
       false});
  s.parts.push_back({event("message_stop", {{"type", "message_stop"}}), false});

  const std::size_t at = head + std::min(settings.fault_after_chunks, pieces.size());
  std::string error;
  if (fault == fault_kind::stream_error) {
    // Anthropic's documented example of an error mid-stream.
    error = event("error", {{"type", "error"},
                            {"error", {{"type", "overloaded_error"}, {"message", "Overloaded"}}}});
  } else if (fault == fault_kind::stream_throttled) {
    error = event("error", {{"type", "error"},
                            {"error",
                             {{"type", "rate_limit_error"},
                              {"message",
                               "This request would exceed your organization's rate limit of "
                               "output tokens per minute. For details, refer to: "
                               "https://docs.anthropic.com/en/api/rate-limits."}}}});
  }
  place_fault(s, fault, at, std::move(error), corrupt_sse(s.parts[at].bytes));
  return s;
}

}  // namespace keel::testing::detail
