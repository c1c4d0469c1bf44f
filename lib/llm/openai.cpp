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

namespace {

// One message in OpenAI's shape: text or parts, an assistant's tool calls, a tool's result.
json message_json(const chat_message& m) {
  json out = {{"role", m.role}};
  if (m.role == "tool") {
    out["tool_call_id"] = m.tool_call_id;
    out["content"] = text_of(m);
    return out;
  }
  if (m.parts.empty()) {
    // An assistant turn that only calls tools has null content, as OpenAI writes it.
    out["content"] = m.content.empty() && !m.tool_calls.empty() ? json(nullptr) : json(m.content);
  } else {
    json parts = json::array();
    for (const content_part& p : m.parts) {
      if (p.kind == part_kind::text) {
        parts.push_back({{"type", "text"}, {"text", p.text}});
      } else {
        json image = {{"url", p.image_url}};
        if (!p.detail.empty()) {
          image["detail"] = p.detail;
        }
        parts.push_back({{"type", "image_url"}, {"image_url", std::move(image)}});
      }
    }
    out["content"] = std::move(parts);
  }
  if (!m.tool_calls.empty()) {
    json calls = json::array();
    for (const tool_call& c : m.tool_calls) {
      calls.push_back({{"id", c.id},
                       {"type", "function"},
                       {"function", {{"name", c.name}, {"arguments", c.arguments}}}});
    }
    out["tool_calls"] = std::move(calls);
  }
  return out;
}

void add_tools(const chat_request& req, json& body) {
  if (!req.tools.empty()) {
    json tools = json::array();
    for (const tool_definition& t : req.tools) {
      json fn = {{"name", t.name}};
      if (!t.description.empty()) {
        fn["description"] = t.description;
      }
      fn["parameters"] = parameters_of(t);
      if (t.strict) {
        fn["strict"] = *t.strict;
      }
      tools.push_back({{"type", "function"}, {"function", std::move(fn)}});
    }
    body["tools"] = std::move(tools);
  }
  // Without tools a tool choice says nothing (and some servers refuse one).
  if (req.tool_choice && !req.tools.empty()) {
    switch (req.tool_choice->mode) {
      case tool_choice_mode::automatic:
        body["tool_choice"] = "auto";
        break;
      case tool_choice_mode::none:
        body["tool_choice"] = "none";
        break;
      case tool_choice_mode::required:
        body["tool_choice"] = "required";
        break;
      case tool_choice_mode::named:
        body["tool_choice"] = {{"type", "function"},
                               {"function", {{"name", req.tool_choice->name}}}};
        break;
    }
  }
  if (req.parallel_tool_calls && !req.tools.empty()) {
    body["parallel_tool_calls"] = *req.parallel_tool_calls;
  }
}

}  // namespace

keel::http::request openai::build_request(const chat_request& req, const endpoint& ep) {
  json messages = json::array();
  if (!req.system.empty()) {
    messages.push_back({{"role", "system"}, {"content", req.system}});
  }
  for (const auto& m : req.messages) {
    messages.push_back(message_json(m));
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
  add_tools(req, body);
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
    // No text: a refusal, or only tool calls.
    if (!rd.optional_string(message, "refusal", "choices[0].message").empty()) {
      rd.filtered("the model refused");
    }
  } else {
    rd.fail("choices[0].message.content is not a string");
  }
  if (const auto calls = message.find("tool_calls"); calls != message.end() && !calls->is_null()) {
    if (!calls->is_array()) {
      rd.fail("choices[0].message.tool_calls is not an array");
    }
    for (std::size_t i = 0; i < calls->size(); ++i) {
      const std::string path = "choices[0].message.tool_calls[" + std::to_string(i) + "]";
      const json& call = (*calls)[i];
      if (!call.is_object()) {
        rd.fail(path + " is not an object");
      }
      const json& fn = rd.member(call, "function", path);
      tool_call tc(rd.optional_string(call, "id", path),
                   rd.optional_string(fn, "name", path + ".function"),
                   rd.optional_string(fn, "arguments", path + ".function"));
      if (tc.name.empty()) {
        rd.fail(path + ".function.name missing");
      }
      r.tool_calls.push_back(std::move(tc));
    }
  }
  r.model = rd.optional_string(body, "model", "");
  r.usage = rd.usage(body, "usage", "prompt_tokens", "completion_tokens");
  r.raw = std::move(body);
  return r;
}

}  // namespace keel::llm
