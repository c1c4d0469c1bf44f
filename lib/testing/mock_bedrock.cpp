// The mock LLM server's Bedrock Converse bodies: answers and error bodies.
#include "mock_detail.hpp"

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
      r.body = dump(json{
          {"output",
           {{"message",
             {{"role", "assistant"},
              {"content", json::array({{{"text", blocked ? std::string("Sorry, the model cannot "
                                                                       "answer this question.")
                                                         : text}}})}}}}},
          {"stopReason", blocked ? "guardrail_intervened" : "end_turn"},
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

}  // namespace keel::testing::detail
