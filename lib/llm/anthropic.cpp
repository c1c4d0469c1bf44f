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

namespace {

constexpr auto kind = provider_kind::anthropic;

// A turn's content blocks: text and image parts, then an assistant's tool_use blocks.
json content_blocks(const chat_message& m, std::size_t index) {
  const std::string path = message_path(index);
  json blocks = json::array();
  if (m.parts.empty()) {
    if (!m.content.empty()) {
      blocks.push_back({{"type", "text"}, {"text", m.content}});
    }
  }
  for (std::size_t j = 0; j < m.parts.size(); ++j) {
    const content_part& p = m.parts[j];
    if (p.kind == part_kind::text) {
      blocks.push_back({{"type", "text"}, {"text", p.text}});
      continue;
    }
    const std::string part = path + ".content[" + std::to_string(j) + "]";
    if (auto d = parse_data_url(p.image_url)) {
      if (d->media_type != "image/png" && d->media_type != "image/jpeg" &&
          d->media_type != "image/gif" && d->media_type != "image/webp") {
        unsupported(kind,
                    part + ": anthropic takes PNG, JPEG, GIF or WebP images, not " + d->media_type);
      }
      blocks.push_back(
          {{"type", "image"},
           {"source", {{"type", "base64"}, {"media_type", d->media_type}, {"data", d->data}}}});
    } else if (is_http_url(p.image_url)) {
      blocks.push_back({{"type", "image"}, {"source", {{"type", "url"}, {"url", p.image_url}}}});
    } else {
      unsupported(kind, part + ": an image must be a base64 data: URL or an http(s) URL");
    }
  }
  for (std::size_t j = 0; j < m.tool_calls.size(); ++j) {
    const tool_call& c = m.tool_calls[j];
    blocks.push_back(
        {{"type", "tool_use"},
         {"id", c.id},
         {"name", c.name},
         {"input", arguments_object(kind, c, path + ".tool_calls[" + std::to_string(j) + "]")}});
  }
  return blocks;
}

json messages_json(const chat_request& req) {
  return user_turn_results(
      req,
      [](const chat_message& m) {
        return json{
            {"type", "tool_result"}, {"tool_use_id", m.tool_call_id}, {"content", text_of(m)}};
      },
      content_blocks,
      [](const chat_message& m, std::size_t i) {
        // A plain turn keeps its string content (the shape keel has always sent).
        return m.parts.empty() && m.tool_calls.empty() ? json(m.content) : content_blocks(m, i);
      });
}

void add_tools(const chat_request& req, json& body) {
  if (!req.tools.empty()) {
    json tools = json::array();
    for (const tool_definition& t : req.tools) {
      json tool = {{"name", t.name}};
      if (!t.description.empty()) {
        tool["description"] = t.description;
      }
      tool["input_schema"] = parameters_of(t);
      tools.push_back(std::move(tool));
    }
    body["tools"] = std::move(tools);
  }
  json choice;
  // Without tools a tool choice says nothing (and some servers refuse one).
  if (req.tool_choice && !req.tools.empty()) {
    switch (req.tool_choice->mode) {
      case tool_choice_mode::automatic:
        choice = {{"type", "auto"}};
        break;
      case tool_choice_mode::none:
        choice = {{"type", "none"}};
        break;
      case tool_choice_mode::required:
        choice = {{"type", "any"}};
        break;
      case tool_choice_mode::named:
        choice = {{"type", "tool"}, {"name", req.tool_choice->name}};
        break;
    }
  }
  if (req.parallel_tool_calls && !*req.parallel_tool_calls && !req.tools.empty()) {
    if (choice.is_null()) {
      choice = {{"type", "auto"}};
    }
    if (choice["type"] != "none") {
      choice["disable_parallel_tool_use"] = true;
    }
  }
  if (!choice.is_null()) {
    body["tool_choice"] = std::move(choice);
  }
}

// response_format as a tool the model must call (chat.hpp's `response_format`).
void add_answer_tool(const chat_request& req, json& body) {
  answer_tool_plan plan = plan_answer_tool(req);
  // The request's own tools go even when the answer is forced (tool choice "none"): the
  // conversation may hold calls of them.
  add_tools(req, body);
  if (plan.schema.is_null()) {
    return;
  }
  json tools = body.contains("tools") ? std::move(body["tools"]) : json::array();
  json choice = {{"type", "tool"}, {"name", answer_tool_name}};
  if (plan.with_own_tools) {
    choice = {{"type", "any"}};
    if (req.parallel_tool_calls && !*req.parallel_tool_calls) {
      choice["disable_parallel_tool_use"] = true;
    }
  }
  tools.push_back({{"name", answer_tool_name},
                   {"description", answer_tool_description},
                   {"input_schema", std::move(plan.schema)}});
  body["tools"] = std::move(tools);
  body["tool_choice"] = std::move(choice);
}

}  // namespace

keel::http::request anthropic::build_request(const chat_request& req, const endpoint& ep) {
  json messages = messages_json(req);
  json body = {{"model", req.model},
               {"max_tokens", req.max_tokens > 0 ? req.max_tokens : anthropic_default_max_tokens},
               {"messages", std::move(messages)}};
  if (!req.system.empty()) {
    body["system"] = req.system;
  }
  const bool current = anthropic_bearer_version(ep.anthropic_version);
  // 2026-10-21 removed the sampling parameters: a request with them would be refused.
  if (req.temperature && !current) {
    body["temperature"] = provider_temperature(*req.temperature);
  }
  if (req.top_p && !current) {
    body["top_p"] = *req.top_p;
  }
  if (!req.stop.empty()) {
    check_stop_sequences(kind, req.stop);
    body["stop_sequences"] = req.stop;
  }
  // Anthropic's metadata takes `user_id` only (another key is refused): the request's
  // metadata.user_id, else OpenAI's `user` (an extra field).
  std::string user_id;
  for (const auto& [from, key] :
       {std::pair{&req.metadata, "user_id"}, std::pair{&req.extra_fields, "user"}}) {
    if (user_id.empty() && from->is_object()) {
      if (const auto it = from->find(key); it != from->end() && it->is_string()) {
        user_id = it->get<std::string>();
      }
    }
  }
  if (!user_id.empty()) {
    body["metadata"] = {{"user_id", user_id}};
  }
  add_answer_tool(req, body);
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
                                        system_clock::time_point now, bool keep_raw) {
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
  std::optional<std::string> answer;  // the answer tool's input (chat.hpp's `response_format`)
  for (std::size_t i = 0; i < content.size(); ++i) {
    const std::string path = "content[" + std::to_string(i) + "]";
    const json& block = content[i];
    if (!block.is_object()) {
      rd.fail(path + " is not an object");
    }
    const std::string type = rd.optional_string(block, "type", path);
    if (type == "tool_use") {
      const json& input = rd.member(block, "input", path);
      std::string name = rd.optional_string(block, "name", path);
      if (name.empty()) {
        rd.fail(path + ".name missing");
      }
      if (name == answer_tool_name && !answer) {
        answer = input.dump();
        continue;
      }
      r.tool_calls.emplace_back(rd.optional_string(block, "id", path), std::move(name),
                                input.dump());
      continue;
    }
    if (type != "text") {
      continue;
    }
    const json& text = rd.member(block, "text", path);
    if (!text.is_string()) {
      rd.fail(path + ".text is not a string");
    }
    r.text += text.get<std::string>();
  }
  finish_answered(r, std::move(answer), rd.optional_string(body, "stop_reason", ""));
  r.model = rd.optional_string(body, "model", "");
  r.usage = rd.usage(body, "usage", "input_tokens", "output_tokens");
  if (r.finish_reason == "refusal") {
    rd.filtered("stop_reason refusal", std::move(r));
  }
  rd.finish(r, std::move(body), keep_raw);
  return r;
}

}  // namespace keel::llm
