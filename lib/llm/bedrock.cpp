// The Bedrock Converse wire format: request bodies, SDK headers and response classification.
#include "wire_common.hpp"

#include <keel/llm/bedrock.hpp>

#include <algorithm>
#include <cctype>
#include <stdexcept>
#include <string>

namespace keel::llm {

using namespace detail;  // the shared wire helpers (wire_common.hpp)

errc detail::bedrock_error_code(std::string_view type_in, std::string_view message, errc fallback) {
  // ConverseStream names its exception events in lowerCamelCase ("throttlingException").
  std::string type(type_in);
  if (!type.empty()) {
    type[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(type[0])));
  }
  if (type == "ThrottlingException") {
    return errc::rate_limited;
  }
  if (type == "ServiceUnavailableException" || type == "ModelNotReadyException") {
    return errc::overloaded;
  }
  if (type == "InternalServerException" || type == "ModelErrorException" ||
      type == "ModelStreamErrorException") {
    return errc::server_error;
  }
  if (type == "ModelTimeoutException") {
    return errc::timeout;
  }
  if (type == "ValidationException") {
    return contains_ci(message, "too long") || contains_ci(message, "too many tokens")
               ? errc::context_length_exceeded
               : errc::bad_request;
  }
  if (type == "AccessDeniedException" || type == "UnrecognizedClientException" ||
      type == "ExpiredTokenException") {
    return errc::auth;
  }
  if (type == "ResourceNotFoundException") {
    return errc::not_found;
  }
  if (type == "ServiceQuotaExceededException") {
    return errc::quota_exhausted;
  }
  return fallback;
}

std::string bedrock::uri_encode(std::string_view s) {
  static constexpr char hex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size() * 3);
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 0xF];
    }
  }
  return out;
}

namespace {

constexpr auto kind = provider_kind::bedrock;

bool blank(std::string_view text) {
  return text.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos;
}

// A turn's content blocks: text and image parts, then an assistant's toolUse blocks. Converse
// refuses a blank text block ("The text field in the ContentBlock object ... is blank"): one is
// kept only as a user turn's whole content (dropped again if merging gives that turn other
// blocks; else the provider refuses it, as it should); an assistant turn with nothing else has
// no blocks, and messages_json leaves it out.
json content_blocks(const chat_message& m, std::size_t index) {
  const std::string path = message_path(index);
  json blocks = json::array();
  if (m.parts.empty() && (!blank(m.content) || (m.tool_calls.empty() && m.role != "assistant"))) {
    blocks.push_back({{"text", m.content}});
  }
  for (std::size_t j = 0; j < m.parts.size(); ++j) {
    const content_part& p = m.parts[j];
    if (p.kind == part_kind::text) {
      if (!blank(p.text)) {
        blocks.push_back({{"text", p.text}});
      }
      continue;
    }
    const std::string part = path + ".content[" + std::to_string(j) + "]";
    const auto d = parse_data_url(p.image_url);
    if (!d) {
      unsupported(kind, part + ": bedrock takes images as base64 data: URLs only" +
                            std::string(is_http_url(p.image_url) ? ", not by http(s) URL" : ""));
    }
    const std::string_view mt = d->media_type;
    if (mt != "image/png" && mt != "image/jpeg" && mt != "image/gif" && mt != "image/webp") {
      unsupported(kind,
                  part + ": bedrock takes PNG, JPEG, GIF or WebP images, not " + d->media_type);
    }
    blocks.push_back({{"image", {{"format", mt.substr(6)}, {"source", {{"bytes", d->data}}}}}});
  }
  for (std::size_t j = 0; j < m.tool_calls.size(); ++j) {
    const tool_call& c = m.tool_calls[j];
    blocks.push_back(
        {{"toolUse",
          {{"toolUseId", c.id},
           {"name", c.name},
           {"input",
            arguments_object(kind, c, path + ".tool_calls[" + std::to_string(j) + "]")}}}});
  }
  return blocks;
}

json messages_json(const chat_request& req) {
  json built = user_turn_results(
      req,
      [](const chat_message& m) {
        return json{
            {"toolResult",
             {{"toolUseId", m.tool_call_id}, {"content", json::array({{{"text", text_of(m)}}})}}}};
      },
      content_blocks, content_blocks);
  // Converse refuses two turns of one role in a row ("A conversation must alternate between
  // user and assistant roles"), which OpenAI takes and Anthropic merges itself: they are merged
  // here, and a turn left with no blocks is dropped.
  json messages = json::array();
  for (json& m : built) {
    if (m["content"].empty()) {
      continue;
    }
    if (!messages.empty() && messages.back()["role"] == m["role"]) {
      for (json& b : m["content"]) {
        messages.back()["content"].push_back(std::move(b));
      }
      continue;
    }
    messages.push_back(std::move(m));
  }
  if (messages.empty() && !built.empty()) {
    return built;  // nothing but blank turns: sent as they are, for the provider to refuse
  }
  // A blank user turn kept whole may have been merged into a turn with other blocks: dropped.
  for (json& m : messages) {
    json& blocks = m["content"];
    if (blocks.size() < 2) {
      continue;
    }
    json kept = json::array();
    for (json& b : blocks) {
      const auto text = b.find("text");
      if (text == b.end() || !text->is_string() || !blank(text->get_ref<const std::string&>())) {
        kept.push_back(std::move(b));
      }
    }
    if (!kept.empty()) {
      blocks = std::move(kept);
    }
  }
  return messages;
}

json tool_spec(const std::string& name, const std::string& description, json schema) {
  json spec = {{"name", name}};
  if (!description.empty()) {
    spec["description"] = description;
  }
  spec["inputSchema"] = {{"json", std::move(schema)}};
  return {{"toolSpec", std::move(spec)}};
}

// Converse has no tool_choice "none": the tools are withheld. But it refuses a conversation
// that holds toolUse or toolResult blocks without a toolConfig, so then the tools the
// conversation called are declared by name, with an open schema.
json history_tools(const chat_request& req) {
  json tools = json::array();
  std::vector<std::string> seen;
  for (const chat_message& m : req.messages) {
    for (const tool_call& c : m.tool_calls) {
      if (std::find(seen.begin(), seen.end(), c.name) == seen.end()) {
        seen.push_back(c.name);
        tools.push_back(tool_spec(c.name, "", json{{"type", "object"}}));
      }
    }
  }
  return tools;
}

void add_tools(const chat_request& req, json& body) {
  const bool withheld =
      req.tools.empty() || (req.tool_choice && req.tool_choice->mode == tool_choice_mode::none);
  if (withheld) {
    if (json tools = history_tools(req); !tools.empty()) {
      body["toolConfig"] = {{"tools", std::move(tools)}};
    }
    return;
  }
  json tools = json::array();
  for (const tool_definition& t : req.tools) {
    tools.push_back(tool_spec(t.name, t.description, parameters_of(t)));
  }
  json config = {{"tools", std::move(tools)}};
  if (req.tool_choice) {
    switch (req.tool_choice->mode) {
      case tool_choice_mode::automatic:
        config["toolChoice"] = {{"auto", json::object()}};
        break;
      case tool_choice_mode::required:
        config["toolChoice"] = {{"any", json::object()}};
        break;
      case tool_choice_mode::named:
        config["toolChoice"] = {{"tool", {{"name", req.tool_choice->name}}}};
        break;
      case tool_choice_mode::none:
        break;  // withheld above
    }
  }
  body["toolConfig"] = std::move(config);
}

// Converse takes a forced tool choice (`any`, `tool`) only for some model families: Anthropic's
// Claude, Mistral Large and Amazon Nova. Model ids may carry a region prefix (us.anthropic...)
// or be ARNs, so the family is looked for anywhere in the id.
bool forces_tool_choice(std::string_view model) {
  for (std::string_view old : {"anthropic.claude-v2", "anthropic.claude-instant"}) {
    if (model.find(old) != std::string_view::npos) {
      return false;  // Claude 2 and Instant take no tools on Converse
    }
  }
  for (std::string_view family : {"anthropic.", "mistral.mistral-large", "amazon.nova"}) {
    if (model.find(family) != std::string_view::npos) {
      return true;
    }
  }
  return false;
}

// response_format as a tool the model must call (chat.hpp's `response_format`); for a model that
// cannot be made to call a tool, nothing (as before the answer tool: Converse would refuse the
// request, and some of those models take no tools at all).
void add_answer_tool(const chat_request& req, json& body) {
  answer_tool_plan plan = plan_answer_tool(req);
  add_tools(req, body);
  if (plan.schema.is_null() || !forces_tool_choice(req.model)) {
    return;
  }
  // Own tools withheld (none, or tool choice "none"): any tools declared are the history's.
  json& config = body["toolConfig"];
  if (!config.contains("tools")) {
    config["tools"] = json::array();
  }
  config["tools"].push_back(
      tool_spec(std::string(answer_tool_name), answer_tool_description, std::move(plan.schema)));
  config["toolChoice"] = plan.with_own_tools ? json{{"any", json::object()}}
                                             : json{{"tool", {{"name", answer_tool_name}}}};
}

}  // namespace

keel::http::request bedrock::build_request(const chat_request& req, const endpoint& ep) {
  if (ep.base_url.empty() && ep.region.empty()) {
    throw std::invalid_argument("bedrock endpoint needs a region or a base URL");
  }
  json messages = messages_json(req);
  json config = json::object();
  if (req.max_tokens > 0) {  // not given: the model's own limit (Converse's maxTokens is optional)
    config["maxTokens"] = req.max_tokens;
  }
  if (req.temperature) {
    config["temperature"] = provider_temperature(*req.temperature);
  }
  if (req.top_p) {
    config["topP"] = *req.top_p;
  }
  if (!req.stop.empty()) {
    check_stop_sequences(kind, req.stop);
    config["stopSequences"] = req.stop;
  }
  json body = {{"messages", std::move(messages)}};
  if (!config.empty()) {
    body["inferenceConfig"] = std::move(config);
  }
  if (!req.system.empty()) {
    body["system"] = json::array({{{"text", req.system}}});
  }
  if (has_metadata(req.metadata)) {
    body["requestMetadata"] = req.metadata;
  }
  add_answer_tool(req, body);
  const std::string base = base_of(ep, "https://bedrock-runtime." + ep.region + ".amazonaws.com");
  keel::http::request r("POST", with_path(base, "/model/" + uri_encode(req.model) + "/converse"));
  set_json_body(r, body);
  return r;
}

chat_response bedrock::parse_response(const keel::http::response& res, system_clock::time_point now,
                                      bool keep_raw) {
  if (!is_2xx(res.status)) {
    provider_error_info info = info_from(res, kind, now);
    const json body = parse_json(res.body);
    std::string type;
    if (auto h = res.headers.find("x-amzn-errortype")) {
      type = std::string(h->substr(0, h->find(':')));
    } else {
      type = string_field(body, "__type");
      if (auto hash = type.rfind('#'); hash != std::string::npos) {
        type.erase(0, hash + 1);
      }
      type = type.substr(0, type.find(':'));
    }
    info.provider_code = type;
    info.message = string_field(body, "message");
    if (info.message.empty()) {
      info.message = string_field(body, "Message");
    }
    if (info.message.empty() && !body.is_object()) {
      info.message = body_excerpt(res.body);
    }
    const errc e = bedrock_error_code(type, info.message, from_status(res.status));
    fail(e, with_redirect(res, std::move(info)));
  }
  reader rd(res, kind, now);
  json body = rd.body();
  const json& output = rd.member(body, "output", "");
  const json& message = rd.member(output, "message", "output");
  const json& content = rd.array(message, "content", "output.message");
  chat_response r = rd.start(json());
  std::optional<std::string> answer;  // the answer tool's input (chat.hpp's `response_format`)
  for (std::size_t i = 0; i < content.size(); ++i) {
    const std::string path = "output.message.content[" + std::to_string(i) + "]";
    const json& block = content[i];
    if (!block.is_object()) {
      rd.fail(path + " is not an object");
    }
    if (const auto use = block.find("toolUse"); use != block.end()) {
      const std::string use_path = path + ".toolUse";
      const json& input = rd.member(*use, "input", use_path);
      std::string name = rd.optional_string(*use, "name", use_path);
      if (name.empty()) {
        rd.fail(use_path + ".name missing");
      }
      if (name == answer_tool_name && !answer) {
        answer = input.dump();
        continue;
      }
      r.tool_calls.emplace_back(rd.optional_string(*use, "toolUseId", use_path), std::move(name),
                                input.dump());
      continue;
    }
    auto it = block.find("text");
    if (it == block.end()) {
      continue;  // a non-text block (reasoning, ...) keel does not request
    }
    if (!it->is_string()) {
      rd.fail(path + ".text is not a string");
    }
    r.text += it->get<std::string>();
  }
  finish_answered(r, std::move(answer), rd.optional_string(body, "stopReason", ""));
  r.usage = rd.usage(body, "usage", "inputTokens", "outputTokens");
  if (r.finish_reason == "content_filtered" || r.finish_reason == "guardrail_intervened") {
    rd.filtered("stopReason " + r.finish_reason, std::move(r));
  }
  rd.finish(r, std::move(body), keep_raw);
  return r;
}

void bedrock::add_sdk_request_headers(keel::http::request& req,
                                      const keel::aws::sdk_request_info& info) {
  if (info.invocation_id.empty()) {
    throw std::invalid_argument("amz-sdk-invocation-id needs an invocation id");
  }
  req.set(keel::aws::invocation_id_header, info.invocation_id);
  req.set(keel::aws::sdk_request_header, info.header_value());
}

}  // namespace keel::llm
