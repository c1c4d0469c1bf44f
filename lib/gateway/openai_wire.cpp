// keel::gateway OpenAI wire (keel/gateway/openai_wire.hpp).
#include <keel/gateway/openai_wire.hpp>
#include <keel/llm/json_scan.hpp>
#include <keel/llm/json_writer.hpp>
#include <keel/llm/openai.hpp>

#include <keel/classify.hpp>
#include <keel/error.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/json_depth.hpp>
#include <keel/rate_controller.hpp>

#include <boost/system/system_error.hpp>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <optional>

namespace keel::gateway {

namespace {

using nlohmann::json;

std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    case json::value_t::discarded:
      return "nothing";
    default:
      return "a number";
  }
}

[[noreturn]] void invalid(const std::string& param, const std::string& what) {
  throw bad_request("Invalid value for '" + param + "': " + what + ".", param, "invalid_value");
}

double number_in(const json& v, const std::string& param, double lo, double hi) {
  if (!v.is_number()) {
    invalid(param, "expected a number, got " + type_name(v));
  }
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) {
    invalid(param, "expected a number from " + json(lo).dump() + " to " + json(hi).dump() +
                       ", got " + v.dump());
  }
  return x;
}

// A string member `key` of `obj` at `param`, or "" when absent or null.
std::string string_member(const json& obj, const char* key, const std::string& param) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    return {};
  }
  if (!it->is_string()) {
    invalid(param + "." + key, "expected a string, got " + type_name(*it));
  }
  return it->get<std::string>();
}

// A message's content: a string, or text and (where `images`) image parts in order. A content of
// only text parts is joined into one string (the provider-neutral request's plain form).
void read_content(const json& content, const std::string& param, bool images,
                  keel::llm::chat_message& out) {
  if (content.is_string()) {
    out.content = content.get<std::string>();
    return;
  }
  if (content.is_null()) {
    return;
  }
  if (!content.is_array()) {
    invalid(param, "expected a string or an array of content parts, got " + type_name(content));
  }
  std::vector<keel::llm::content_part> parts;
  bool has_image = false;
  for (std::size_t i = 0; i < content.size(); ++i) {
    const json& part = content[i];
    const std::string p = param + "[" + std::to_string(i) + "]";
    if (!part.is_object()) {
      invalid(p, "expected a content part object, got " + type_name(part));
    }
    const auto type = part.find("type");
    if (type == part.end() || !type->is_string()) {
      invalid(p + ".type", "expected a string");
    }
    if (*type == "image_url" && images) {
      const auto image = part.find("image_url");
      if (image == part.end() || !image->is_object()) {
        invalid(p + ".image_url", "expected an object with a 'url'");
      }
      const std::string url = string_member(*image, "url", p + ".image_url");
      const bool data = url.size() > 5 && (url.compare(0, 5, "data:") == 0);
      const bool web = url.compare(0, 7, "http://") == 0 || url.compare(0, 8, "https://") == 0;
      if (!data && !web) {
        invalid(p + ".image_url.url", "expected a data: URL or an http(s) URL");
      }
      const std::string detail = string_member(*image, "detail", p + ".image_url");
      if (!detail.empty() && detail != "auto" && detail != "low" && detail != "high") {
        invalid(p + ".image_url.detail", "expected 'auto', 'low' or 'high', got '" + detail + "'");
      }
      parts.push_back(keel::llm::content_part::from_image(url, detail));
      has_image = true;
      continue;
    }
    if (*type != "text") {
      throw bad_request("keel serve passes text" + std::string(images ? " and image_url" : "") +
                            " content parts here; '" + type->get<std::string>() +
                            "' is not supported.",
                        p + ".type", "unsupported_content");
    }
    const auto t = part.find("text");
    if (t == part.end() || !t->is_string()) {
      invalid(p + ".text", "expected a string");
    }
    parts.push_back(keel::llm::content_part::from_text(t->get<std::string>()));
  }
  if (has_image) {
    out.parts = std::move(parts);
    return;
  }
  for (const auto& part : parts) {
    out.content += part.text;
  }
}

// An assistant turn's `tool_calls`.
void read_tool_calls(const json& calls, const std::string& param, keel::llm::chat_message& out) {
  if (calls.is_null()) {
    return;
  }
  if (!calls.is_array()) {
    invalid(param, "expected an array, got " + type_name(calls));
  }
  for (std::size_t i = 0; i < calls.size(); ++i) {
    const json& c = calls[i];
    const std::string p = param + "[" + std::to_string(i) + "]";
    if (!c.is_object()) {
      invalid(p, "expected a tool call object, got " + type_name(c));
    }
    const std::string type = string_member(c, "type", p);
    if (!type.empty() && type != "function") {
      throw bad_request(
          "keel serve passes function tool calls only; '" + type + "' is not supported.",
          p + ".type", "unsupported_parameter");
    }
    const auto fn = c.find("function");
    if (fn == c.end() || !fn->is_object()) {
      invalid(p + ".function", "expected an object with 'name' and 'arguments'");
    }
    keel::llm::tool_call call(string_member(c, "id", p),
                              string_member(*fn, "name", p + ".function"),
                              string_member(*fn, "arguments", p + ".function"));
    if (call.id.empty()) {
      invalid(p + ".id", "expected a non-empty string");
    }
    if (call.name.empty()) {
      invalid(p + ".function.name", "expected a non-empty string");
    }
    // A route may send the call to Anthropic or Bedrock, which take the arguments as an object.
    if (!call.arguments.empty()) {
      const json args = json::parse(call.arguments, nullptr, false);
      if (!args.is_object()) {
        invalid(p + ".function.arguments", "expected a JSON object as text");
      }
    }
    out.tool_calls.push_back(std::move(call));
  }
}

// `tools`: function tools only.
std::vector<keel::llm::tool_definition> read_tools(const json& tools) {
  if (!tools.is_array() || tools.empty()) {
    invalid("tools", "expected a non-empty array, got " + tools.dump().substr(0, 40));
  }
  std::vector<keel::llm::tool_definition> out;
  for (std::size_t i = 0; i < tools.size(); ++i) {
    const json& t = tools[i];
    const std::string p = "tools[" + std::to_string(i) + "]";
    if (!t.is_object()) {
      invalid(p, "expected a tool object, got " + type_name(t));
    }
    const std::string type = string_member(t, "type", p);
    if (type != "function") {
      throw bad_request("keel serve passes function tools only; '" + type + "' is not supported.",
                        p + ".type", "unsupported_parameter");
    }
    const auto fn = t.find("function");
    if (fn == t.end() || !fn->is_object()) {
      invalid(p + ".function", "expected an object with a 'name'");
    }
    keel::llm::tool_definition def;
    def.name = string_member(*fn, "name", p + ".function");
    if (def.name.empty()) {
      invalid(p + ".function.name", "expected a non-empty string");
    }
    def.description = string_member(*fn, "description", p + ".function");
    if (const auto params = fn->find("parameters"); params != fn->end() && !params->is_null()) {
      if (!params->is_object()) {
        invalid(p + ".function.parameters", "expected a JSON schema object");
      }
      def.parameters = *params;
    }
    if (const auto strict = fn->find("strict"); strict != fn->end() && !strict->is_null()) {
      if (!strict->is_boolean()) {
        invalid(p + ".function.strict", "expected a boolean");
      }
      def.strict = strict->get<bool>();
    }
    out.push_back(std::move(def));
  }
  return out;
}

// `tool_choice`: "none", "auto", "required" or a named function.
keel::llm::tool_choice_option read_tool_choice(const json& c) {
  keel::llm::tool_choice_option out;
  if (c.is_string()) {
    const std::string& s = c.get_ref<const std::string&>();
    if (s == "auto") {
      out.mode = keel::llm::tool_choice_mode::automatic;
    } else if (s == "none") {
      out.mode = keel::llm::tool_choice_mode::none;
    } else if (s == "required") {
      out.mode = keel::llm::tool_choice_mode::required;
    } else {
      invalid("tool_choice", "expected 'none', 'auto', 'required' or a function, got '" + s + "'");
    }
    return out;
  }
  if (!c.is_object() || string_member(c, "type", "tool_choice") != "function" ||
      !c.contains("function") || !c["function"].is_object()) {
    throw bad_request(
        "keel serve takes tool_choice 'none', 'auto', 'required' or {\"type\": \"function\", "
        "\"function\": {\"name\": ...}}.",
        "tool_choice", "unsupported_parameter");
  }
  out.mode = keel::llm::tool_choice_mode::named;
  out.name = string_member(c["function"], "name", "tool_choice.function");
  if (out.name.empty()) {
    invalid("tool_choice.function.name", "expected a non-empty string");
  }
  return out;
}

std::string seconds_text(std::chrono::nanoseconds d) {
  const double s = std::chrono::duration<double>(d).count();
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", s);
  return buf;
}

}  // namespace

namespace {

using scan_kind = keel::llm::json_scan::kind;

constexpr auto first = keel::llm::json_scan::first_time;

// One message of the common shape: a role and a string (or null) content. Other roles, content
// parts, tool calls and tool results decline.
bool read_message_fast(keel::llm::json_scan& s, keel::llm::chat_request& r) {
  if (s.peek() != scan_kind::object) {
    return false;
  }
  std::string role;
  std::string content;
  bool have_role = false;
  bool have_content = false;
  const bool ok = s.object([&](std::string_view k) {
    if (k == "role") {
      return first(have_role) && s.peek() == scan_kind::string && s.string(role);
    }
    if (k == "content") {
      return first(have_content) && s.optional_string(content);
    }
    if (k == "function_call" || k == "tool_calls" || k == "tool_call_id") {
      return false;
    }
    return s.skip();  // the tree's reading ignores other members ("name", ...)
  });
  if (!ok || !have_role) {
    return false;
  }
  if (role == "system" || role == "developer") {
    if (!r.system.empty()) {
      r.system += "\n\n";
    }
    r.system += content;
    return true;
  }
  if (role != "user" && role != "assistant") {
    return false;
  }
  keel::llm::chat_message turn;
  turn.role = std::move(role);
  turn.content = std::move(content);
  r.messages.push_back(std::move(turn));
  return true;
}

// Reads the common request — a model, plain-text messages, token limits, temperature, top_p,
// stream and stream_options — without building a tree (keel/llm/json_scan.hpp), as
// `parse_chat_request_tree` would. False: not taken (any other member, any other shape, or
// anything the tree's reading refuses); the caller then reads it with nlohmann.
bool read_request_fast(std::string_view body, parsed_chat_request& out) {
  keel::llm::json_scan s(body);
  if (s.peek() != scan_kind::object) {
    return false;
  }
  keel::llm::chat_request& r = out.request;
  r.max_tokens = 0;  // not given, unless the body gives it
  bool have_model = false;
  bool have_messages = false;
  bool have_max = false;
  bool have_max_completion = false;
  bool have_temperature = false;
  bool have_top_p = false;
  bool have_stream = false;
  bool have_options = false;
  long long max_tokens = 0;
  long long max_completion = 0;
  auto optional_limit = [&](bool& seen, long long& v) {
    if (!first(seen)) {
      return false;
    }
    if (s.peek() == scan_kind::null) {
      return s.null();
    }
    return s.count(v) && v >= 1 && v <= std::numeric_limits<int>::max();
  };
  auto optional_number = [&](bool& seen, std::optional<double>& v, double hi) {
    if (!first(seen)) {
      return false;
    }
    if (s.peek() == scan_kind::null) {
      return s.null();
    }
    double x = 0;
    if (s.peek() != scan_kind::number || !s.number(x) || !(x >= 0 && x <= hi)) {
      return false;
    }
    v = x;
    return true;
  };
  const bool ok = s.object([&](std::string_view k) {
    if (k == "model") {
      return first(have_model) && s.peek() == scan_kind::string && s.string(r.model) &&
             !r.model.empty();
    }
    if (k == "messages") {
      return first(have_messages) && s.peek() == scan_kind::array &&
             s.array([&](std::size_t) { return read_message_fast(s, r); });
    }
    if (k == "max_tokens") {
      return optional_limit(have_max, max_tokens);
    }
    if (k == "max_completion_tokens") {
      return optional_limit(have_max_completion, max_completion);
    }
    if (k == "temperature") {
      return optional_number(have_temperature, r.temperature, 2);
    }
    if (k == "top_p") {
      return optional_number(have_top_p, r.top_p, 1);
    }
    if (k == "stream") {
      if (!first(have_stream)) {
        return false;
      }
      return s.peek() == scan_kind::null ? s.null()
                                         : s.peek() == scan_kind::boolean && s.boolean(out.stream);
    }
    if (k == "stream_options") {
      if (!first(have_options)) {
        return false;
      }
      if (s.peek() != scan_kind::object) {
        return s.skip();  // the tree's reading ignores it
      }
      bool have_usage = false;
      return s.object([&](std::string_view ok_key) {
        if (ok_key != "include_usage") {
          return s.skip();
        }
        if (!first(have_usage)) {
          return false;
        }
        return s.peek() == scan_kind::boolean ? s.boolean(out.include_usage) : s.skip();
      });
    }
    return false;  // any other member: the tree's reading
  });
  if (!ok || !s.at_end() || !have_model || r.messages.empty()) {
    return false;
  }
  // As the tree's reading: max_completion_tokens is read last, so it wins.
  if (max_tokens > 0) {
    r.max_tokens = static_cast<int>(max_tokens);
  }
  if (max_completion > 0) {
    r.max_tokens = static_cast<int>(max_completion);
  }
  return true;
}

// The members parse_chat_request_tree reads (or refuses) itself; any other is an extra field.
bool read_above(std::string_view key) {
  static constexpr std::string_view read[] = {"model",
                                              "messages",
                                              "functions",
                                              "function_call",
                                              "audio",
                                              "tools",
                                              "tool_choice",
                                              "parallel_tool_calls",
                                              "n",
                                              "logprobs",
                                              "top_logprobs",
                                              "max_tokens",
                                              "max_completion_tokens",
                                              "temperature",
                                              "top_p",
                                              "stop",
                                              "seed",
                                              "response_format",
                                              "metadata",
                                              "stream",
                                              "stream_options"};
  return std::find(std::begin(read), std::end(read), key) != std::end(read);
}

}  // namespace

parsed_chat_request parse_chat_request(std::string_view body) {
  if (parsed_chat_request fast; read_request_fast(body, fast)) {
    return fast;
  }
  return detail::parse_chat_request_tree(body);
}

parsed_chat_request detail::parse_chat_request_tree(std::string_view body) {
  // Bounded before parsing: nlohmann copies and dumps recursively, and a body nested a million
  // levels deep would overflow the stack when `response_format` or `metadata` is copied.
  if (const std::size_t at = keel::llm::json_too_deep_at(body); at != std::string_view::npos) {
    throw bad_request("The request body nests arrays and objects deeper than " +
                          std::to_string(keel::llm::max_json_depth) + " levels (at byte " +
                          std::to_string(at) + ").",
                      "", "invalid_json");
  }
  json doc = json::parse(body, nullptr, false);
  if (doc.is_discarded()) {
    throw bad_request(
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
        "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        "", "invalid_json");
  }
  if (!doc.is_object()) {
    throw bad_request("The request body must be a JSON object, got " + type_name(doc) + ".", "",
                      "invalid_json");
  }
  parsed_chat_request out;
  keel::llm::chat_request& r = out.request;
  r.max_tokens = 0;  // not given, unless the body gives it
  const auto model = doc.find("model");
  if (model == doc.end()) {
    throw bad_request("you must provide a model parameter", "model", "missing_required_parameter");
  }
  if (!model->is_string() || model->get_ref<const std::string&>().empty()) {
    invalid("model", "expected a non-empty string, got " + model->dump());
  }
  r.model = model->get<std::string>();

  const auto messages = doc.find("messages");
  if (messages == doc.end()) {
    throw bad_request("Missing required parameter: 'messages'.", "messages",
                      "missing_required_parameter");
  }
  if (!messages->is_array() || messages->empty()) {
    invalid("messages", "expected a non-empty array, got " + messages->dump().substr(0, 40));
  }
  for (std::size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string p = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) {
      invalid(p, "expected a message object, got " + type_name(m));
    }
    const auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      invalid(p + ".role", "expected a string");
    }
    const std::string& rl = role->get_ref<const std::string&>();
    const auto content = m.find("content");
    keel::llm::chat_message turn;
    turn.role = rl;
    if (content != m.end()) {
      read_content(*content, p + ".content", rl == "user", turn);
    }
    if (rl == "system" || rl == "developer") {
      if (!r.system.empty()) {
        r.system += "\n\n";
      }
      r.system += turn.content;
    } else if (rl == "user" || rl == "assistant") {
      if (m.contains("function_call") && !m["function_call"].is_null()) {
        throw bad_request("keel serve passes 'tool_calls', not the deprecated 'function_call'.",
                          p + ".function_call", "unsupported_parameter");
      }
      if (const auto calls = m.find("tool_calls"); calls != m.end()) {
        if (rl != "assistant") {
          invalid(p + ".tool_calls", "only an assistant message has tool calls");
        }
        read_tool_calls(*calls, p + ".tool_calls", turn);
      }
      r.messages.push_back(std::move(turn));
    } else if (rl == "tool") {
      turn.tool_call_id = string_member(m, "tool_call_id", p);
      if (turn.tool_call_id.empty()) {
        throw bad_request("Missing required parameter: '" + p + ".tool_call_id'.",
                          p + ".tool_call_id", "missing_required_parameter");
      }
      r.messages.push_back(std::move(turn));
    } else if (rl == "function") {
      throw bad_request("keel serve passes 'tool' messages, not the deprecated 'function' role.",
                        p + ".role", "unsupported_parameter");
    } else {
      invalid(p + ".role",
              "expected 'system', 'developer', 'user', 'assistant' or 'tool', got '" + rl + "'");
    }
  }
  if (r.messages.empty()) {
    invalid("messages", "expected at least one user or assistant message");
  }

  for (const char* unsupported : {"functions", "function_call"}) {
    const auto it = doc.find(unsupported);
    if (it != doc.end() && !it->is_null()) {
      throw bad_request(std::string("keel serve passes 'tools' and 'tool_choice', not the "
                                    "deprecated '") +
                            unsupported + "'.",
                        unsupported, "unsupported_parameter");
    }
  }
  if (const auto it = doc.find("audio"); it != doc.end() && !it->is_null()) {
    throw bad_request("keel serve does not pass 'audio'.", "audio", "unsupported_parameter");
  }
  if (const auto t = doc.find("tools"); t != doc.end() && !t->is_null()) {
    r.tools = read_tools(*t);
  }
  if (const auto c = doc.find("tool_choice"); c != doc.end() && !c->is_null()) {
    r.tool_choice = read_tool_choice(*c);
    if (r.tool_choice->mode != keel::llm::tool_choice_mode::none && r.tools.empty()) {
      invalid("tool_choice", "tool_choice is only allowed when 'tools' are given");
    }
  }
  if (const auto pt = doc.find("parallel_tool_calls"); pt != doc.end() && !pt->is_null()) {
    if (!pt->is_boolean()) {
      invalid("parallel_tool_calls", "expected a boolean, got " + type_name(*pt));
    }
    r.parallel_tool_calls = pt->get<bool>();
  }
  if (const auto n = doc.find("n"); n != doc.end() && !n->is_null() && *n != 1) {
    throw bad_request("keel serve answers one choice per request; 'n' must be 1.", "n",
                      "unsupported_parameter");
  }
  if (const auto lp = doc.find("logprobs"); lp != doc.end() && lp->is_boolean() && *lp) {
    throw bad_request("keel serve does not return logprobs.", "logprobs", "unsupported_parameter");
  }
  if (const auto tl = doc.find("top_logprobs"); tl != doc.end() && !tl->is_null()) {
    throw bad_request("keel serve does not return logprobs.", "top_logprobs",
                      "unsupported_parameter");
  }

  for (const char* field : {"max_tokens", "max_completion_tokens"}) {
    const auto it = doc.find(field);
    if (it == doc.end() || it->is_null()) {
      continue;
    }
    if (!it->is_number_integer() || it->get<long long>() < 1 ||
        it->get<long long>() > std::numeric_limits<int>::max()) {
      invalid(field, "expected an integer from 1 to " +
                         std::to_string(std::numeric_limits<int>::max()) + ", got " + it->dump());
    }
    r.max_tokens = static_cast<int>(it->get<long long>());  // max_completion_tokens last: wins
  }
  if (const auto t = doc.find("temperature"); t != doc.end() && !t->is_null()) {
    r.temperature = number_in(*t, "temperature", 0, 2);
  }
  if (const auto t = doc.find("top_p"); t != doc.end() && !t->is_null()) {
    r.top_p = number_in(*t, "top_p", 0, 1);
  }
  if (const auto s = doc.find("stop"); s != doc.end() && !s->is_null()) {
    if (s->is_string()) {
      r.stop.push_back(s->get<std::string>());
    } else if (s->is_array() && s->size() <= 4) {
      for (std::size_t i = 0; i < s->size(); ++i) {
        if (!(*s)[i].is_string()) {
          invalid("stop[" + std::to_string(i) + "]", "expected a string");
        }
        r.stop.push_back((*s)[i].get<std::string>());
      }
    } else {
      invalid("stop", "expected a string or an array of up to 4 strings");
    }
  }
  if (const auto s = doc.find("seed"); s != doc.end() && !s->is_null()) {
    if (!s->is_number_integer()) {
      invalid("seed", "expected an integer, got " + s->dump());
    }
    r.seed = s->get<std::int64_t>();
  }
  if (const auto f = doc.find("response_format"); f != doc.end() && !f->is_null()) {
    if (!f->is_object() || !f->contains("type") || !(*f)["type"].is_string()) {
      invalid("response_format", "expected an object with a 'type'");
    }
    const std::string& type = (*f)["type"].get_ref<const std::string&>();
    if (type != "text" && type != "json_object" && type != "json_schema") {
      invalid("response_format.type",
              "expected 'text', 'json_object' or 'json_schema', got '" + type + "'");
    }
    if (type != "text") {
      r.response_format = *f;
    }
  }
  if (const auto m = doc.find("metadata"); m != doc.end() && m->is_object()) {
    r.metadata = *m;
  }
  if (const auto s = doc.find("stream"); s != doc.end() && !s->is_null()) {
    if (!s->is_boolean()) {
      invalid("stream", "expected a boolean, got " + s->dump());
    }
    out.stream = s->get<bool>();
  }
  if (const auto so = doc.find("stream_options"); so != doc.end() && so->is_object()) {
    if (const auto u = so->find("include_usage"); u != so->end() && u->is_boolean()) {
      out.include_usage = u->get<bool>();
    }
  }
  // Everything else goes to OpenAI-format entries as sent (`frequency_penalty`, `user`, a
  // server's own extensions): the caller's own API would take or refuse it the same way.
  for (auto& [key, value] : doc.items()) {
    if (!read_above(key)) {
      r.extra_fields[key] = std::move(value);
    }
  }
  return out;
}

std::string openai_finish_reason(std::string_view p) {
  if (p.empty() || p == "end_turn" || p == "stop_sequence" || p == "stop" || p == "complete") {
    return "stop";
  }
  if (p == "max_tokens" || p == "length" || p == "model_context_window_exceeded") {
    return "length";
  }
  if (p == "tool_use" || p == "tool_calls") {
    return "tool_calls";
  }
  if (p == "content_filter" || p == "content_filtered" || p == "guardrail_intervened" ||
      p == "refusal") {
    return "content_filter";
  }
  // Anthropic's pause_turn (a server tool's long turn, paused) and whatever a provider adds next:
  // the SDKs' types know only OpenAI's four, and the answer did end.
  return "stop";
}

namespace {

// The error that decided `e`: through all_fallbacks_failed and retries_exhausted to the last
// entry's, and through stream_interrupted (a stream cut after its first delta) to its cause.
std::exception_ptr deciding_error(const std::exception_ptr& e) {
  std::exception_ptr d = keel::deciding_cause(e).error;
  try {
    std::rethrow_exception(d);
  } catch (const keel::failure& f) {
    if (f.code() == keel::make_error_code(keel::error::stream_interrupted) && !f.causes().empty()) {
      return keel::deciding_cause(f.causes().back()).error;
    }
  } catch (...) {
  }
  return d;
}

}  // namespace

bool is_content_filter(const std::exception_ptr& e) {
  // Only a filter in a 2xx answer (a finish reason, a stream's event) is an answer: a 4xx one
  // (Azure's prompt filter) is OpenAI's error too.
  try {
    std::rethrow_exception(deciding_error(e));
  } catch (const keel::llm::provider_error& pe) {
    return pe.llm_code() == keel::llm::errc::content_filtered && pe.status() >= 200 &&
           pe.status() < 300;
  } catch (...) {
    return false;
  }
}

std::shared_ptr<const keel::llm::chat_response> filtered_reply(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(deciding_error(e));
  } catch (const keel::llm::provider_error& pe) {
    return pe.llm_code() == keel::llm::errc::content_filtered ? pe.info().filtered_reply : nullptr;
  } catch (...) {
    return nullptr;
  }
}

std::string completion_body(const keel::llm::chat_response& reply, const std::string& id,
                            long long created, const std::string& model) {
  // Written straight to text (keel/llm/json_writer.hpp): building this as a tree and dumping it
  // was 19% of keel serve's instructions per request.
  std::string out;
  out.reserve(256 + reply.text.size());
  keel::llm::json_writer w(out);
  w.begin_object()
      .key("id")
      .value(id)
      .key("object")
      .value("chat.completion")
      .key("created")
      .value(created)
      .key("model")
      .value(reply.model.empty() ? model : reply.model)
      .key("choices")
      .begin_array()
      .begin_object()
      .key("index")
      .value(0)
      .key("message")
      .begin_object()
      .key("role")
      .value("assistant")
      .key("content");
  // OpenAI answers a turn of only tool calls, or a refusal, with null content.
  if (reply.text.empty() && (!reply.tool_calls.empty() || !reply.refusal.empty())) {
    w.null();
  } else {
    w.value(reply.text);
  }
  w.key("refusal");
  if (reply.refusal.empty()) {
    w.null();
  } else {
    w.value(reply.refusal);
  }
  if (!reply.tool_calls.empty()) {
    w.key("tool_calls");
    keel::llm::openai::write_tool_calls(w, reply.tool_calls);
  }
  w.end_object()
      .key("logprobs")
      .null()
      .key("finish_reason")
      .value(openai_finish_reason(reply.finish_reason))
      .end_object()
      .end_array()
      .key("usage")
      .begin_object()
      .key("prompt_tokens")
      .value(reply.usage.input)
      .key("completion_tokens")
      .value(reply.usage.output)
      .key("total_tokens")
      .value(reply.usage.input + reply.usage.output)
      .end_object()
      .key("system_fingerprint")
      .null()
      .end_object();
  return out;
}

nlohmann::json stream_chunk(const std::string& id, long long created, const std::string& model,
                            nlohmann::json delta, std::string_view finish_reason,
                            bool include_usage) {
  json j{{"id", id},
         {"object", "chat.completion.chunk"},
         {"created", created},
         {"model", model},
         {"system_fingerprint", nullptr},
         {"choices",
          json::array(
              {json{{"index", 0},
                    {"delta", std::move(delta)},
                    {"logprobs", nullptr},
                    {"finish_reason",
                     finish_reason.empty() ? json(nullptr) : json(std::string(finish_reason))}}})}};
  if (include_usage) {
    j["usage"] = nullptr;
  }
  return j;
}

nlohmann::json delta_json(const keel::llm::stream_delta& d) {
  if (d.tool == nullptr) {
    return json{{"content", std::string(d.text)}};
  }
  json call = {{"index", d.tool_index}};
  json fn = {{"arguments", std::string(d.text)}};
  if (!d.tool->id.empty()) {
    call["id"] = d.tool->id;
    call["type"] = "function";
  }
  if (!d.tool->name.empty()) {
    fn["name"] = d.tool->name;
  }
  call["function"] = std::move(fn);
  return json{{"tool_calls", json::array({std::move(call)})}};
}

nlohmann::json usage_chunk(const std::string& id, long long created, const std::string& model,
                           const keel::llm::token_usage& usage) {
  return json{{"id", id},
              {"object", "chat.completion.chunk"},
              {"created", created},
              {"model", model},
              {"system_fingerprint", nullptr},
              {"choices", json::array()},
              {"usage",
               {{"prompt_tokens", usage.input},
                {"completion_tokens", usage.output},
                {"total_tokens", usage.input + usage.output}}}};
}

nlohmann::json error_body(std::string_view message, std::string_view type, std::string_view param,
                          std::string_view code) {
  return json{{"error",
               {{"message", std::string(message)},
                {"type", std::string(type)},
                {"param", param.empty() ? json(nullptr) : json(std::string(param))},
                {"code", code.empty() ? json(nullptr) : json(std::string(code))}}}};
}

namespace {

// `out` with "(try again in N s)" added to its message when it has a delay.
error_reply with_retry_after_note(error_reply out) {
  if (out.retry_after && out.retry_after->count() > 0) {
    out.body["error"]["message"] = out.body["error"]["message"].get<std::string>() +
                                   " (try again in " + seconds_text(*out.retry_after) + " s)";
  }
  return out;
}

}  // namespace

error_reply error_answer(const std::exception_ptr& e) {
  error_reply out;
  const keel::decided_by d = keel::deciding_cause(e);
  const std::exception_ptr decided = d.error ? d.error : e;
  // The delay hint: the deciding error's (a provider's Retry-After), else the outer failure's
  // (an open breaker's remaining break).
  out.retry_after = keel::classify(decided).retry_after;
  if (!out.retry_after) {
    out.retry_after = keel::classify(e).retry_after;
  }
  std::string message = keel::llm::redact(keel::describe(e), 2000);
  if (d.gave_up == keel::error::budget_exhausted) {
    message += " (keel's retry budget refused further retries)";
  }
  auto set = [&](int status, const char* type, std::string code) {
    out.status = status;
    out.body = error_body(message, type, {}, code);
  };
  // An error that is neither the provider's answer nor keel's own (a refused or reset
  // connection, a timeout): by its condition.
  auto by_condition = [&] {
    const keel::condition c = keel::classify(decided).condition;
    if (c == keel::condition::timeout) {
      set(504, "server_error", "upstream_timeout");
    } else if (c == keel::condition::cancelled) {
      set(499, "server_error", "cancelled");
    } else {
      set(502, "upstream_error", "upstream_unreachable");
    }
  };
  try {
    std::rethrow_exception(decided);
  } catch (const keel::llm::provider_error& pe) {
    using keel::llm::errc;
    switch (pe.llm_code()) {
      case errc::rate_limited:
        set(429, keel::llm::limit_of(pe) == keel::limit_kind::tokens ? "tokens" : "requests",
            "rate_limit_exceeded");
        break;
      case errc::quota_exhausted:
        set(429, "insufficient_quota", "insufficient_quota");
        break;
      case errc::overloaded:
        set(503, "server_error", "upstream_overloaded");
        break;
      case errc::timeout:
        set(504, "server_error", "upstream_timeout");
        break;
      case errc::context_length_exceeded:
        set(400, "invalid_request_error", "context_length_exceeded");
        out.body["error"]["param"] = "messages";
        break;
      case errc::content_filtered:
        set(400, "invalid_request_error", "content_filter");
        break;
      case errc::bad_request:
        set(pe.status() >= 400 && pe.status() < 500 ? pe.status() : 400, "invalid_request_error",
            pe.provider_code().empty() ? "upstream_bad_request" : pe.provider_code());
        break;
      case errc::request_too_large:
        set(413, "invalid_request_error", "request_too_large");
        break;
      case errc::auth:
        // keel's provider key was refused: not the caller's key.
        set(502, "upstream_error", "upstream_auth");
        break;
      case errc::not_found:
        set(502, "upstream_error", "upstream_not_found");
        break;
      case errc::transport:
        set(502, "upstream_error", "upstream_unreachable");
        break;
      default:  // server_error, malformed_response, ...
        set(502, "upstream_error", "upstream_error");
        break;
    }
  } catch (const keel::failure& f) {
    if (f.code().category() != keel::error_category()) {
      // Not keel's own code: the transport's error, thrown as a failure. A refused or reset
      // connection, a timeout: by its condition; a permanent one (TLS verification, an answer
      // too large) keeps its class as the code.
      if (keel::classify(decided).condition == keel::condition::permanent) {
        set(502, "upstream_error", keel::llm::error_class(e));
      } else {
        by_condition();
      }
      return with_retry_after_note(std::move(out));
    }
    switch (static_cast<keel::error>(f.code().value())) {
      case keel::error::circuit_open:
        set(503, "server_error", "circuit_open");
        break;
      case keel::error::deadline_exceeded:
        set(504, "server_error", "deadline_exceeded");
        break;
      case keel::error::queue_full:
      case keel::error::queue_timeout:
        set(503, "server_error", "queue_full");
        break;
      case keel::error::throttled:
        set(429, "requests", "rate_limit_exceeded");
        break;
      default:
        set(502, "upstream_error", keel::llm::error_class(e));
        break;
    }
  } catch (...) {
    by_condition();
  }
  return with_retry_after_note(std::move(out));
}

}  // namespace keel::gateway
