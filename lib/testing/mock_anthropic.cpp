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
      r.body = dump(json{
          {"id", "msg_mock" + id},
          {"type", "message"},
          {"role", "assistant"},
          {"model", model},
          {"content", refused ? json::array() : json::array({{{"type", "text"}, {"text", text}}})},
          {"stop_reason", refused ? "refusal" : "end_turn"},
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

}  // namespace keel::testing::detail
