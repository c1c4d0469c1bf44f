// The Anthropic messages wire format: request bodies and response classification.
#include "wire_common.hpp"

#include <keel/llm/anthropic.hpp>

#include <string>

namespace keel::llm {

using namespace detail;  // the shared wire helpers (wire_common.hpp)

errc detail::anthropic_error_code(std::string_view type, std::string_view message, errc fallback) {
  if (type == "rate_limit_error") {
    return errc::rate_limited;
  }
  if (type == "overloaded_error") {
    return errc::overloaded;
  }
  if (type == "api_error") {
    return errc::server_error;
  }
  if (type == "timeout_error") {
    return errc::timeout;
  }
  if (type == "invalid_request_error") {
    return contains_ci(message, "prompt is too long") ? errc::context_length_exceeded
           : contains_ci(message, "credit balance")   ? errc::quota_exhausted
                                                      : errc::bad_request;
  }
  if (type == "billing_error") {
    return errc::quota_exhausted;
  }
  if (type == "authentication_error" || type == "permission_error") {
    return errc::auth;
  }
  if (type == "not_found_error") {
    return errc::not_found;
  }
  if (type == "request_too_large") {
    return errc::request_too_large;
  }
  return fallback;
}

keel::http::request anthropic::build_request(const chat_request& req, const endpoint& ep) {
  json messages = json::array();
  for (const auto& m : req.messages) {
    messages.push_back({{"role", m.role}, {"content", m.content}});
  }
  json body = {
      {"model", req.model}, {"max_tokens", req.max_tokens}, {"messages", std::move(messages)}};
  if (!req.system.empty()) {
    body["system"] = req.system;
  }
  const bool current = anthropic_bearer_version(ep.anthropic_version);
  // 2026-10-21 removed the sampling parameters: a request with them would be refused.
  if (req.temperature && !current) {
    body["temperature"] = *req.temperature;
  }
  if (req.top_p && !current) {
    body["top_p"] = *req.top_p;
  }
  if (!req.stop.empty()) {
    body["stop_sequences"] = req.stop;
  }
  if (has_metadata(req.metadata)) {
    body["metadata"] = req.metadata;
  }
  keel::http::request r("POST", versioned(base_of(ep, "https://api.anthropic.com"), "/messages"));
  if (current) {
    r.set("authorization", "Bearer " + ep.api_key);
  } else {
    r.set("x-api-key", ep.api_key);
  }
  r.set("anthropic-version", ep.anthropic_version);
  set_json_body(r, body);
  return r;
}

chat_response anthropic::parse_response(const keel::http::response& res,
                                        system_clock::time_point now) {
  constexpr auto kind = provider_kind::anthropic;
  if (!is_2xx(res.status)) {
    provider_error_info info = info_from(res, kind, now);
    const json body = parse_json(res.body);
    const json& err = error_object(body);
    const std::string type = string_field(err, "type");
    info.provider_code = type;
    info.message = err.empty() ? body_excerpt(res.body) : string_field(err, "message");
    const errc e = anthropic_error_code(type, info.message, from_status(res.status));
    fail(e, with_redirect(res, std::move(info)));
  }
  reader rd(res, kind, now);
  json body = rd.body();
  const json& content = rd.array(body, "content", "");
  chat_response r = rd.start(json());
  for (std::size_t i = 0; i < content.size(); ++i) {
    const std::string path = "content[" + std::to_string(i) + "]";
    const json& block = content[i];
    if (!block.is_object()) {
      rd.fail(path + " is not an object");
    }
    if (rd.optional_string(block, "type", path) != "text") {
      continue;
    }
    const json& text = rd.member(block, "text", path);
    if (!text.is_string()) {
      rd.fail(path + ".text is not a string");
    }
    r.text += text.get<std::string>();
  }
  r.finish_reason = rd.optional_string(body, "stop_reason", "");
  if (r.finish_reason == "refusal") {
    rd.filtered("stop_reason refusal");
  }
  r.model = rd.optional_string(body, "model", "");
  r.usage = rd.usage(body, "usage", "input_tokens", "output_tokens");
  r.raw = std::move(body);
  return r;
}

}  // namespace keel::llm
