// The mock LLM server's request reading (provider, model, prompt) and the wire helpers its
// answers share.
#include "mock_detail.hpp"

#include <keel/http/message.hpp>
#include <keel/llm/json_depth.hpp>
#include <keel/testing/detail/json_schema_instance.hpp>

#include <cstdlib>

namespace keel::testing::detail {

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

namespace {

// `obj[key]` if `obj` is an object and that is a string, else "": a request with a number where a
// string belongs must be answered, not end the session on nlohmann's type_error.
std::string str_of(const json& obj, const char* key) {
  if (!obj.is_object()) {
    return {};
  }
  const auto it = obj.find(key);
  return it != obj.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::string text_of(const json& content) {
  if (content.is_string()) {
    return content.get<std::string>();
  }
  std::string out;
  if (content.is_array()) {
    for (const auto& part : content) {
      if (!part.is_object()) {
        continue;
      }
      if (part.contains("text") && part["text"].is_string()) {
        out += part["text"].get<std::string>();
      }
      // A tool result (Anthropic tool_result, Bedrock toolResult): its text.
      if (part.contains("content") && str_of(part, "type") == "tool_result") {
        out += text_of(part["content"]);
      }
      if (part.contains("toolResult") && part["toolResult"].is_object() &&
          part["toolResult"].contains("content")) {
        out += text_of(part["toolResult"]["content"]);
      }
    }
  }
  return out;
}

// True if a message is a tool result: OpenAI role "tool", or a user turn with an Anthropic
// tool_result or Bedrock toolResult block.
bool is_tool_result(const json& m) {
  if (str_of(m, "role") == "tool") {
    return true;
  }
  const json& content = m.contains("content") ? m["content"] : json();
  if (!content.is_array()) {
    return false;
  }
  for (const auto& part : content) {
    if (part.is_object() &&
        (str_of(part, "type") == "tool_result" || part.contains("toolResult"))) {
      return true;
    }
  }
  return false;
}

// The tools a request offers, as (name, schema) in order, and the one its tool choice names
// ("" if none; `forbidden` if it says no tool), in each provider's shape.
struct offered_tools {
  std::vector<std::pair<std::string, json>> tools;
  std::string named;
  bool forbidden = false;
};

offered_tools tools_of(wire format, const json& doc) {
  offered_tools out;
  auto add = [&](const json& name, const json* schema) {
    if (name.is_string()) {
      out.tools.emplace_back(name.get<std::string>(), schema ? *schema : json::object());
    }
  };
  const json none;
  if (format == wire::openai) {
    const json& tools = doc.contains("tools") ? doc["tools"] : none;
    for (const auto& t : tools.is_array() ? tools : json::array()) {
      if (t.is_object() && t.contains("function") && t["function"].is_object()) {
        const json& fn = t["function"];
        add(fn.value("name", json()), fn.contains("parameters") ? &fn["parameters"] : nullptr);
      }
    }
    const json& c = doc.contains("tool_choice") ? doc["tool_choice"] : none;
    out.forbidden = c == "none";
    if (c.is_object() && c.contains("function") && c["function"].is_object()) {
      out.named = str_of(c["function"], "name");
    }
  } else if (format == wire::anthropic) {
    const json& tools = doc.contains("tools") ? doc["tools"] : none;
    for (const auto& t : tools.is_array() ? tools : json::array()) {
      if (t.is_object()) {
        add(t.value("name", json()), t.contains("input_schema") ? &t["input_schema"] : nullptr);
      }
    }
    const json& c = doc.contains("tool_choice") ? doc["tool_choice"] : none;
    if (c.is_object()) {
      out.forbidden = str_of(c, "type") == "none";
      if (str_of(c, "type") == "tool") {
        out.named = str_of(c, "name");
      }
    }
  } else if (format == wire::bedrock) {
    const json& config = doc.contains("toolConfig") ? doc["toolConfig"] : none;
    const json& tools = config.is_object() && config.contains("tools") ? config["tools"] : none;
    for (const auto& t : tools.is_array() ? tools : json::array()) {
      if (t.is_object() && t.contains("toolSpec") && t["toolSpec"].is_object()) {
        const json& spec = t["toolSpec"];
        const json* schema = spec.contains("inputSchema") && spec["inputSchema"].is_object() &&
                                     spec["inputSchema"].contains("json")
                                 ? &spec["inputSchema"]["json"]
                                 : nullptr;
        add(spec.value("name", json()), schema);
      }
    }
    const json& c =
        config.is_object() && config.contains("toolChoice") ? config["toolChoice"] : none;
    if (c.is_object() && c.contains("tool") && c["tool"].is_object()) {
      out.named = str_of(c["tool"], "name");
    }
  }
  return out;
}

}  // namespace

parsed_request parse_request(std::string_view method, std::string_view target,
                             const std::string& body) {
  parsed_request r;
  const std::string_view path = target.substr(0, target.find('?'));
  if (method != "POST") {
    return r;
  }
  if (path == "/v1/chat/completions") {
    r.format = wire::openai;
  } else if (path == "/v1/messages") {
    r.format = wire::anthropic;
  } else if (path.starts_with("/model/") && path.ends_with("/converse") &&
             path.size() > std::string_view("/model//converse").size()) {
    r.format = wire::bedrock;
    r.model = keel::http::percent_decode(path.substr(7, path.size() - 7 - 9));
  } else if (path.starts_with("/model/") && path.ends_with("/converse-stream") &&
             path.size() > std::string_view("/model//converse-stream").size()) {
    r.format = wire::bedrock;
    r.stream = true;
    r.model = keel::http::percent_decode(path.substr(7, path.size() - 7 - 16));
  } else {
    return r;
  }
  json doc = keel::llm::json_too_deep_at(body) == std::string_view::npos
                 ? json::parse(body, nullptr, /*allow_exceptions=*/false)
                 : json(json::value_t::discarded);
  if (doc.is_discarded() || !doc.is_object()) {
    r.malformed = true;
    return r;
  }
  if (r.format != wire::bedrock) {
    if (doc.contains("model") && doc["model"].is_string()) {
      r.model = doc["model"].get<std::string>();
    }
  }
  if (!doc.contains("messages") || !doc["messages"].is_array() || r.model.empty()) {
    r.malformed = true;
    return r;
  }
  if (r.format != wire::bedrock) {
    // Only a JSON `true` streams, as the providers' parsers read the flag.
    r.stream = doc.contains("stream") && doc["stream"].is_boolean() && doc["stream"].get<bool>();
  }
  if (r.format == wire::openai && r.stream) {
    const json& so = doc.contains("stream_options") ? doc["stream_options"] : json();
    r.include_usage = so.is_object() && so.contains("include_usage") &&
                      so["include_usage"].is_boolean() && so["include_usage"].get<bool>();
  }
  if (r.format == wire::openai) {
    const json& rf = doc.contains("response_format") ? doc["response_format"] : json();
    const std::string rf_type = rf.is_object() ? str_of(rf, "type") : "";
    if (rf_type == "json_object") {
      r.json_content = "{}";
    } else if (rf_type == "json_schema" && rf.contains("json_schema") &&
               rf["json_schema"].is_object() && rf["json_schema"].contains("schema")) {
      r.json_content = detail::minimal_json_instance(dump(rf["json_schema"]["schema"]));
    }
  }
  if (doc.contains("system")) {
    r.prompt_chars += text_of(doc["system"]).size();
  }
  bool ends_with_result = false;
  for (const auto& m : doc["messages"]) {
    if (!m.is_object()) {
      continue;
    }
    const std::string t = m.contains("content") ? text_of(m["content"]) : std::string();
    r.prompt_chars += t.size();
    ends_with_result = is_tool_result(m);
    if (ends_with_result) {
      r.last_user = "tool result " + t;
    } else if (str_of(m, "role") == "user") {
      r.last_user = t;
    }
  }
  const offered_tools offered = tools_of(r.format, doc);
  if (!offered.tools.empty() && !offered.forbidden && !ends_with_result) {
    const auto* chosen = &offered.tools.front();
    for (const auto& t : offered.tools) {
      if (t.first == offered.named) {
        chosen = &t;
      }
    }
    std::string args = detail::minimal_json_instance(dump(chosen->second));
    if (args.empty() || args.front() != '{') {
      args = "{}";  // a schema with no object type: the arguments are still an object
    }
    r.tool_call = parsed_request::tool_answer{chosen->first, std::move(args)};
  }
  return r;
}

std::size_t tokens_for(std::size_t chars) {
  return std::max<std::size_t>(1, (chars + 3) / 4);
}

std::string completion_for(const std::string& prompt) {
  std::size_t n = std::min<std::size_t>(40, prompt.size());
  // Never cut a UTF-8 sequence in half.
  while (n > 0 && n < prompt.size() && (static_cast<unsigned char>(prompt[n]) & 0xC0) == 0x80) {
    --n;
  }
  return "mock answer to: " + prompt.substr(0, n);
}

std::vector<std::string> split_text(const std::string& text, std::size_t bytes) {
  bytes = std::max<std::size_t>(1, bytes);
  std::vector<std::string> out;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t n = std::min(bytes, text.size() - i);
    // Extend, rather than shorten, a piece that would end inside a UTF-8 sequence: a piece of
    // one byte must still make progress.
    while (i + n < text.size() && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) {
      ++n;
    }
    out.push_back(text.substr(i, n));
    i += n;
  }
  return out;
}

std::string sse_event(std::string_view event, std::string_view data) {
  std::string out;
  if (!event.empty()) {
    out.append("event: ").append(event).append("\n");
  }
  out.append("data: ").append(data).append("\n\n");
  return out;
}

std::string corrupt_sse(const std::string& event) {
  const std::size_t data = event.find("data: ");
  if (data == std::string::npos) {
    return event;
  }
  const std::size_t from = data + 6;
  const std::size_t end = event.find('\n', from);
  const std::size_t len = (end == std::string::npos ? event.size() : end) - from;
  return event.substr(0, from + len / 2) + "\n\n";
}

void place_fault(stream_reply& s, fault_kind fault, std::size_t at, std::string error_bytes,
                 std::string corrupted) {
  s.fault = fault;
  s.fault_at = at;
  switch (fault) {
    case fault_kind::stream_error:
    case fault_kind::stream_throttled:
      s.fault_bytes = std::move(error_bytes);
      break;
    case fault_kind::stream_truncated:
      s.fault_bytes = s.parts[at].bytes.substr(0, s.parts[at].bytes.size() / 2);
      break;
    case fault_kind::stream_corrupt:
      s.fault_bytes = std::move(corrupted);
      break;
    default:  // ok, stream_drop, stream_stall: nothing is written at the fault
      break;
  }
}

const char* reason_for(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 408:
      return "Request Timeout";
    case 429:
      return "Too Many Requests";
    case 500:
      return "Internal Server Error";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    case 529:
      return "Overloaded";
    default:
      return "Unknown";
  }
}

}  // namespace keel::testing::detail
