// The mock LLM server's OpenAI Chat Completions bodies: answers, error bodies and the reset
// duration format.
#include "mock_detail.hpp"

#include <cstdio>
#include <ctime>

namespace keel::testing::detail {

// OpenAI's duration format for x-ratelimit-reset-*: "20ms", "1.5s", "6m0s".
std::string openai_duration(milliseconds d) {
  const auto ms = d.count();
  char buf[64];
  if (ms < 1000) {
    std::snprintf(buf, sizeof buf, "%lldms", static_cast<long long>(ms));
  } else if (ms < 60000) {
    if (ms % 1000 == 0) {
      std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(ms / 1000));
    } else {
      std::snprintf(buf, sizeof buf, "%.3gs", static_cast<double>(ms) / 1000.0);
    }
  } else {
    std::snprintf(buf, sizeof buf, "%lldm%llds", static_cast<long long>(ms / 60000),
                  static_cast<long long>((ms % 60000) / 1000));
  }
  return buf;
}

json openai_error(std::string_view message, std::string_view type, json param, json code) {
  return json{{"error", {{"message", message}, {"type", type}, {"param", param}, {"code", code}}}};
}

void openai_malformed(reply& r) {
  r.status = 400;
  r.body = dump(openai_error(
      "We could not parse the JSON body of your request. (HINT: This likely means you "
      "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
      "but what was sent was not valid JSON. If you have trouble figuring out how to fix "
      "this, please contact us through our help center at help.openai.com.)",
      "invalid_request_error", nullptr, nullptr));
}

void openai_answer(reply& r, fault_kind k, const body_input& in) {
  const std::string& id = in.id;
  const std::string& model = in.request.model;
  const fault_plan* plan = in.plan;
  const std::size_t prompt_tokens = in.prompt_tokens;
  const std::size_t completion_tokens = in.completion_tokens;
  const std::optional<milliseconds>& retry_after = in.retry_after;
  const bool tokens_limited = in.tokens_limited;
  switch (k) {
    case fault_kind::ok: {
      const auto& call = in.request.tool_call;
      json message = {
          {"role", "assistant"},
          {"content", call ? json(nullptr) : json(in.request.json_content.value_or(in.text))},
          {"refusal", nullptr}};
      if (call) {
        message["tool_calls"] =
            json::array({{{"id", "call_mock" + id},
                          {"type", "function"},
                          {"function", {{"name", call->name}, {"arguments", call->arguments}}}}});
      }
      r.body =
          dump(json{{"id", "chatcmpl-mock" + id},
                    {"object", "chat.completion"},
                    {"created", static_cast<std::int64_t>(std::time(nullptr))},
                    {"model", model},
                    {"choices", json::array({{{"index", 0},
                                              {"message", std::move(message)},
                                              {"logprobs", nullptr},
                                              {"finish_reason", call ? "tool_calls" : "stop"}}})},
                    {"usage",
                     {{"prompt_tokens", prompt_tokens},
                      {"completion_tokens", completion_tokens},
                      {"total_tokens", prompt_tokens + completion_tokens}}},
                    {"system_fingerprint", "fp_mock"}});
      break;
    }
    case fault_kind::rate_limit:
    case fault_kind::throttling: {
      r.status = 429;
      const char* what = tokens_limited ? "tokens per min (TPM)" : "requests per min (RPM)";
      // A server that states no delay does not state one in the body either.
      const std::string when = retry_after ? "Please try again in " + openai_duration(*retry_after)
                                           : std::string("Please try again later");
      r.body = dump(openai_error(
          "Rate limit reached for " + model + " in organization org-mock on " + what + ". " + when +
              ". Visit https://platform.openai.com/account/rate-limits to learn more.",
          tokens_limited ? "tokens" : "requests", nullptr, "rate_limit_exceeded"));
      break;
    }
    case fault_kind::quota_exhausted:
      r.status = 429;
      r.body = dump(openai_error(
          "You exceeded your current quota, please check your plan and billing details. "
          "For more information on this error, read the docs: "
          "https://platform.openai.com/docs/guides/error-codes/api-errors.",
          "insufficient_quota", nullptr, "insufficient_quota"));
      break;
    case fault_kind::context_length: {
      const std::size_t limit = plan && plan->context_window ? plan->context_window : 128000;
      r.status = 400;
      r.body = dump(openai_error("This model's maximum context length is " + std::to_string(limit) +
                                     " tokens. However, your messages resulted in " +
                                     std::to_string(std::max(prompt_tokens, limit + 1)) +
                                     " tokens. Please reduce the length of the messages.",
                                 "invalid_request_error", "messages", "context_length_exceeded"));
      break;
    }
    case fault_kind::server_error:
      r.status = 500;
      r.body = dump(
          openai_error("The server had an error while processing your request. Sorry about that!",
                       "server_error", nullptr, nullptr));
      break;
    case fault_kind::auth:
      r.status = 401;
      r.body =
          dump(openai_error("Incorrect API key provided: sk-****. You can find your API key at "
                            "https://platform.openai.com/account/api-keys.",
                            "invalid_request_error", nullptr, "invalid_api_key"));
      break;
    case fault_kind::bad_request:
      r.status = 400;
      r.body =
          dump(openai_error("Invalid value for 'temperature': expected a number between 0 and 2.",
                            "invalid_request_error", "temperature", "invalid_value"));
      break;
    case fault_kind::not_found:
      r.status = 404;
      r.body = dump(
          openai_error("The model `" + model + "` does not exist or you do not have access to it.",
                       "invalid_request_error", nullptr, "model_not_found"));
      break;
    case fault_kind::content_filter:
      if (!(plan && plan->quirks.azure_content_filter)) {
        // OpenAI itself answers 200 and says so in finish_reason; the 400 below is Azure's.
        r.body = dump(json{
            {"id", "chatcmpl-mock" + id},
            {"object", "chat.completion"},
            {"created", static_cast<std::int64_t>(std::time(nullptr))},
            {"model", model},
            {"choices",
             json::array(
                 {{{"index", 0},
                   {"message", {{"role", "assistant"}, {"content", nullptr}, {"refusal", nullptr}}},
                   {"logprobs", nullptr},
                   {"finish_reason", "content_filter"}}})},
            {"usage",
             {{"prompt_tokens", prompt_tokens},
              {"completion_tokens", 0},
              {"total_tokens", prompt_tokens}}},
            {"system_fingerprint", "fp_mock"}});
        break;
      }
      r.status = 400;
      r.body = dump(openai_error(
          "The response was filtered due to the prompt triggering the content management "
          "policy. Please modify your prompt and retry.",
          "invalid_request_error", "prompt", "content_filter"));
      break;
    case fault_kind::timeout:
      // OpenAI documents no timeout status; 408 is a client-side notion (the SDKs retry it),
      // while a server-side timeout reaches clients as a 504 from the front end.
      r.status = plan && plan->quirks.openai_timeout_408 ? 408 : 504;
      r.body = dump(openai_error("Request timed out.", "server_error", nullptr, "timeout"));
      break;
    default:  // unavailable, overloaded
      r.status = 503;
      r.body = dump(openai_error("The server is overloaded. Please try again later.",
                                 "service_unavailable_error", nullptr, "server_is_overloaded"));
      break;
  }
}

// The shapes of https://platform.openai.com/docs/api-reference/chat-streaming: a first chunk with
// the role, content pieces, a chunk with the finish_reason and an empty delta, with
// `include_usage` a last chunk with empty `choices` and the usage (`usage: null` before), then
// `[DONE]`.
stream_reply openai_stream(fault_kind k, fault_kind fault, const body_input& in) {
  const stream_settings settings = in.plan ? in.plan->stream : stream_settings();
  const bool refused = k == fault_kind::content_filter;
  const auto created = static_cast<std::int64_t>(std::time(nullptr));
  auto chunk = [&](json choices, json usage) {
    json j{{"id", "chatcmpl-mock" + in.id},
           {"object", "chat.completion.chunk"},
           {"created", created},
           {"model", in.request.model},
           {"system_fingerprint", "fp_mock"},
           {"choices", std::move(choices)}};
    if (in.request.include_usage) {
      j["usage"] = std::move(usage);
    }
    return sse_event("", dump(j));
  };
  auto choice = [](json delta, json finish_reason) {
    return json::array({{{"index", 0},
                         {"delta", std::move(delta)},
                         {"logprobs", nullptr},
                         {"finish_reason", std::move(finish_reason)}}});
  };
  stream_reply s;
  s.content_type = "text/event-stream; charset=utf-8";
  s.chunk_latency = settings.chunk_latency;
  s.parts.push_back(
      {chunk(choice({{"role", "assistant"}, {"content", ""}, {"refusal", nullptr}}, nullptr),
             nullptr),
       false});
  const auto& call = refused ? std::nullopt : in.request.tool_call;
  const std::string content = refused ? std::string()
                              : call  ? call->arguments
                                      : in.request.json_content.value_or(in.text);
  const std::vector<std::string> pieces = split_text(content, settings.chunk_bytes);
  if (call) {
    // A tool call streams as OpenAI does: id, type and name first, then argument fragments.
    s.parts.push_back(
        {chunk(choice({{"tool_calls",
                        json::array({{{"index", 0},
                                      {"id", "call_mock" + in.id},
                                      {"type", "function"},
                                      {"function", {{"name", call->name}, {"arguments", ""}}}}})}},
                      nullptr),
               nullptr),
         false});
  }
  for (const std::string& piece : pieces) {
    json delta = call ? json{{"tool_calls",
                              json::array({{{"index", 0}, {"function", {{"arguments", piece}}}}})}}
                      : json{{"content", piece}};
    s.parts.push_back({chunk(choice(std::move(delta), nullptr), nullptr), true});
  }
  s.parts.push_back({chunk(choice(json::object(), refused ? "content_filter"
                                                  : call  ? "tool_calls"
                                                          : "stop"),
                           nullptr),
                     false});
  if (in.request.include_usage) {
    const std::size_t completion = refused ? 0 : in.completion_tokens;
    s.parts.push_back({chunk(json::array(), {{"prompt_tokens", in.prompt_tokens},
                                             {"completion_tokens", completion},
                                             {"total_tokens", in.prompt_tokens + completion}}),
                       false});
  }
  s.parts.push_back({sse_event("", "[DONE]"), false});

  const std::size_t at = (call ? 2 : 1) + std::min(settings.fault_after_chunks, pieces.size());
  std::string error;
  if (fault == fault_kind::stream_error) {
    error = sse_event(
        "", dump(openai_error("The server had an error while processing your request. Sorry "
                              "about that!",
                              "server_error", nullptr, nullptr)));
  } else if (fault == fault_kind::stream_throttled) {
    error = sse_event(
        "", dump(openai_error("Rate limit reached for " + in.request.model +
                                  " in organization org-mock on tokens per min (TPM). Please try "
                                  "again later. Visit https://platform.openai.com/account/"
                                  "rate-limits to learn more.",
                              "tokens", nullptr, "rate_limit_exceeded")));
  }
  place_fault(s, fault, at, std::move(error), corrupt_sse(s.parts[at].bytes));
  return s;
}

}  // namespace keel::testing::detail
