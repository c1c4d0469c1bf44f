// The OpenAI chat completions wire format: request bodies and response classification.
#include "wire_common.hpp"

#include <keel/llm/openai.hpp>

#include <string>

namespace keel::llm {

using namespace detail;  // the shared wire helpers (wire_common.hpp)

errc detail::openai_error_code(std::string_view code, std::string_view type,
                               std::string_view message, int status, errc fallback) {
  auto is = [&](std::string_view s) { return code == s || type == s; };
  if (is("insufficient_quota") || is("billing_hard_limit_reached") || is("billing_not_active") ||
      is("quota_exceeded")) {
    return errc::quota_exhausted;
  }
  if (is("context_length_exceeded") ||
      (status == 400 && contains_ci(message, "maximum context length"))) {
    return errc::context_length_exceeded;
  }
  if (is("content_filter") || is("content_policy_violation")) {
    return errc::content_filtered;
  }
  return fallback;
}

bool is_openai_reasoning_model(std::string_view model) noexcept {
  if (const auto slash = model.rfind('/'); slash != std::string_view::npos) {
    model.remove_prefix(slash + 1);
  }
  for (const std::string_view family : {"o1", "o3", "o4", "gpt-5"}) {
    if (model.substr(0, family.size()) == family) {
      return true;
    }
  }
  return false;
}

keel::http::request openai::build_request(const chat_request& req, const endpoint& ep) {
  json messages = json::array();
  if (!req.system.empty()) {
    messages.push_back({{"role", "system"}, {"content", req.system}});
  }
  for (const auto& m : req.messages) {
    messages.push_back({{"role", m.role}, {"content", m.content}});
  }
  const bool completion_field =
      req.token_field == max_tokens_field::max_completion_tokens ||
      (req.token_field == max_tokens_field::automatic && is_openai_reasoning_model(req.model));
  json body = {{"model", req.model},
               {"messages", std::move(messages)},
               {completion_field ? "max_completion_tokens" : "max_tokens", req.max_tokens}};
  if (req.temperature) {
    body["temperature"] = *req.temperature;
  }
  if (req.top_p) {
    body["top_p"] = *req.top_p;
  }
  if (!req.stop.empty()) {
    body["stop"] = req.stop;
  }
  if (req.seed) {
    body["seed"] = *req.seed;
  }
  if (req.response_format) {
    const json& rf = *req.response_format;
    // A schema has a "type" too ("object"), so only OpenAI's own response_format types pass as is.
    const std::string type = rf.is_object() ? string_field(rf, "type") : std::string();
    if (type == "json_schema" || type == "json_object" || type == "text") {
      body["response_format"] = rf;
    } else {
      body["response_format"] = {
          {"type", "json_schema"},
          {"json_schema", {{"name", "response"}, {"schema", rf}, {"strict", true}}}};
    }
  }
  if (has_metadata(req.metadata)) {
    body["metadata"] = req.metadata;
  }
  keel::http::request r("POST",
                        versioned(base_of(ep, "https://api.openai.com"), "/chat/completions"));
  r.set("authorization", "Bearer " + ep.api_key);
  set_json_body(r, body);
  return r;
}

chat_response openai::parse_response(const keel::http::response& res,
                                     system_clock::time_point now) {
  constexpr auto kind = provider_kind::openai;
  if (!is_2xx(res.status)) {
    provider_error_info info = info_from(res, kind, now);
    const json body = parse_json(res.body);
    const json& err = error_object(body);
    const std::string type = string_field(err, "type");
    const std::string code = string_field(err, "code");
    info.provider_code = code.empty() ? type : code;
    info.message = err.empty() ? body_excerpt(res.body) : string_field(err, "message");
    const errc e = openai_error_code(code, type, info.message, res.status, from_status(res.status));
    fail(e, with_redirect(res, std::move(info)));
  }
  reader rd(res, kind, now);
  json body = rd.body();
  const json& choices = rd.array(body, "choices", "");
  if (choices.empty()) {
    rd.fail("choices is empty");
  }
  const json& choice = choices[0];
  const json& message = rd.member(choice, "message", "choices[0]");
  const json& content = rd.member(message, "content", "choices[0].message");
  chat_response r = rd.start(json());
  r.finish_reason = rd.optional_string(choice, "finish_reason", "choices[0]");
  if (r.finish_reason == "content_filter") {
    rd.filtered("finish_reason content_filter");
  }
  if (content.is_string()) {
    r.text = content.get<std::string>();
  } else if (content.is_null()) {
    // No text (a refusal, or tool calls keel does not request).
    if (!rd.optional_string(message, "refusal", "choices[0].message").empty()) {
      rd.filtered("the model refused");
    }
  } else {
    rd.fail("choices[0].message.content is not a string");
  }
  r.model = rd.optional_string(body, "model", "");
  r.usage = rd.usage(body, "usage", "prompt_tokens", "completion_tokens");
  r.raw = std::move(body);
  return r;
}

}  // namespace keel::llm
