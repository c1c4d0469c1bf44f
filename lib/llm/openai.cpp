// The OpenAI chat completions wire format: request bodies and response classification.
#include <keel/llm/json_scan.hpp>
#include "wire_common.hpp"

#include <keel/llm/json_writer.hpp>
#include <keel/llm/openai.hpp>

#include <algorithm>
#include <iterator>
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

// The bodies below are written as text (keel/llm/json_writer.hpp), not built as a tree and
// dumped: for the gateway that was 8% of its instructions per request.

// One message in OpenAI's shape: text or parts, an assistant's tool calls, a tool's result.
void write_message(json_writer& w, const chat_message& m) {
  w.begin_object().key("role").value(m.role);
  if (m.role == "tool") {
    w.key("tool_call_id").value(m.tool_call_id).key("content").value(text_of(m)).end_object();
    return;
  }
  w.key("content");
  if (m.parts.empty()) {
    // An assistant turn that only calls tools has null content, as OpenAI writes it.
    if (m.content.empty() && !m.tool_calls.empty()) {
      w.null();
    } else {
      w.value(m.content);
    }
  } else {
    w.begin_array();
    for (const content_part& p : m.parts) {
      if (p.kind == part_kind::text) {
        w.begin_object().key("type").value("text").key("text").value(p.text).end_object();
      } else {
        w.begin_object()
            .key("type")
            .value("image_url")
            .key("image_url")
            .begin_object()
            .key("url")
            .value(p.image_url);
        if (!p.detail.empty()) {
          w.key("detail").value(p.detail);
        }
        w.end_object().end_object();
      }
    }
    w.end_array();
  }
  if (!m.tool_calls.empty()) {
    w.key("tool_calls");
    openai::write_tool_calls(w, m.tool_calls);
  }
  w.end_object();
}

void write_tools(const chat_request& req, json_writer& w) {
  if (req.tools.empty()) {
    return;  // without tools a tool choice says nothing (and some servers refuse one)
  }
  w.key("tools").begin_array();
  for (const tool_definition& t : req.tools) {
    w.begin_object()
        .key("type")
        .value("function")
        .key("function")
        .begin_object()
        .key("name")
        .value(t.name);
    if (!t.description.empty()) {
      w.key("description").value(t.description);
    }
    w.key("parameters").value(parameters_of(t));
    if (t.strict) {
      w.key("strict").value(*t.strict);
    }
    w.end_object().end_object();
  }
  w.end_array();
  if (req.tool_choice) {
    w.key("tool_choice");
    switch (req.tool_choice->mode) {
      case tool_choice_mode::automatic:
        w.value("auto");
        break;
      case tool_choice_mode::none:
        w.value("none");
        break;
      case tool_choice_mode::required:
        w.value("required");
        break;
      case tool_choice_mode::named:
        w.begin_object()
            .key("type")
            .value("function")
            .key("function")
            .begin_object()
            .key("name")
            .value(req.tool_choice->name)
            .end_object()
            .end_object();
        break;
    }
  }
  if (req.parallel_tool_calls) {
    w.key("parallel_tool_calls").value(*req.parallel_tool_calls);
  }
}

}  // namespace

void openai::write_tool_calls(json_writer& w, const std::vector<tool_call>& calls) {
  w.begin_array();
  for (const tool_call& c : calls) {
    w.begin_object().key("id").value(c.id).key("type").value("function").key("function");
    w.begin_object().key("name").value(c.name).key("arguments").value(c.arguments).end_object();
    w.end_object();
  }
  w.end_array();
}

namespace {

// Members of `chat_request::extra_fields` that keel writes itself (or appends, for a stream) and
// so never sends twice.
bool written_by_keel(std::string_view key) {
  static constexpr std::string_view own[] = {"model",
                                             "messages",
                                             "max_tokens",
                                             "max_completion_tokens",
                                             "temperature",
                                             "top_p",
                                             "stop",
                                             "seed",
                                             "response_format",
                                             "metadata",
                                             "tools",
                                             "tool_choice",
                                             "parallel_tool_calls",
                                             "stream",
                                             "stream_options"};
  return std::find(std::begin(own), std::end(own), key) != std::end(own);
}

void write_extra_fields(const chat_request& req, json_writer& w) {
  if (!req.extra_fields.is_object()) {
    return;
  }
  for (const auto& [key, value] : req.extra_fields.items()) {
    if (!written_by_keel(key)) {
      w.key(key).value(value);
    }
  }
}

}  // namespace

keel::http::request openai::build_request(const chat_request& req, const endpoint& ep) {
  const bool completion_field =
      req.token_field == max_tokens_field::max_completion_tokens ||
      (req.token_field == max_tokens_field::automatic && is_openai_reasoning_model(req.model));
  std::string body;
  body.reserve(
      256 + req.system.size() +
      (req.messages.empty() ? 0 : 64 * req.messages.size() + req.messages.back().content.size()));
  json_writer w(body);
  w.begin_object().key("model").value(req.model).key("messages").begin_array();
  if (!req.system.empty()) {
    w.begin_object().key("role").value("system").key("content").value(req.system).end_object();
  }
  for (const auto& m : req.messages) {
    write_message(w, m);
  }
  w.end_array();
  if (req.max_tokens > 0) {  // not given: the model's own limit, as the API's default
    w.key(completion_field ? "max_completion_tokens" : "max_tokens").value(req.max_tokens);
  }
  if (req.temperature) {
    w.key("temperature").value(*req.temperature);
  }
  if (req.top_p) {
    w.key("top_p").value(*req.top_p);
  }
  if (!req.stop.empty()) {
    w.key("stop").begin_array();
    for (const std::string& s : req.stop) {
      w.value(s);
    }
    w.end_array();
  }
  if (req.seed) {
    w.key("seed").value(*req.seed);
  }
  if (req.response_format) {
    const json& rf = *req.response_format;
    // A schema has a "type" too ("object"), so only OpenAI's own response_format types pass as is.
    const std::string type = rf.is_object() ? string_field(rf, "type") : std::string();
    w.key("response_format");
    if (type == "json_schema" || type == "json_object" || type == "text") {
      w.value(rf);
    } else {
      w.begin_object()
          .key("type")
          .value("json_schema")
          .key("json_schema")
          .begin_object()
          .key("name")
          .value("response")
          .key("schema")
          .value(rf)
          .key("strict")
          .value(true)
          .end_object()
          .end_object();
    }
  }
  if (has_metadata(req.metadata)) {
    w.key("metadata").value(req.metadata);
  }
  write_tools(req, w);
  write_extra_fields(req, w);
  w.end_object();
  keel::http::request r("POST",
                        versioned(base_of(ep, "https://api.openai.com"), "/chat/completions"));
  r.set("authorization", "Bearer " + ep.api_key);
  set_json_body(r, std::move(body));
  return r;
}

namespace {

using scan_kind = json_scan::kind;

// A count or null (null reads as 0), as `reader::optional_count` takes it.
bool read_optional_count(json_scan& s, long long& out) {
  if (s.peek() == scan_kind::null) {
    out = 0;
    return s.null();
  }
  return s.count(out);
}

constexpr auto first = json_scan::first_time;

bool read_tool_call(json_scan& s, std::vector<tool_call>& calls) {
  if (s.peek() != scan_kind::object) {
    return false;
  }
  std::string id;
  std::string name;
  std::string arguments;
  bool have_id = false;
  bool have_fn = false;
  bool have_name = false;
  bool have_args = false;
  const bool ok = s.object([&](std::string_view k) {
    if (k == "id") {
      return first(have_id) && s.optional_string(id);
    }
    if (k == "function") {
      if (!first(have_fn) || s.peek() != scan_kind::object) {
        return false;
      }
      return s.object([&](std::string_view fk) {
        if (fk == "name") {
          return first(have_name) && s.optional_string(name);
        }
        if (fk == "arguments") {
          return first(have_args) && s.optional_string(arguments);
        }
        return s.skip();
      });
    }
    return s.skip();
  });
  if (!ok || !have_fn || name.empty()) {
    return false;
  }
  calls.emplace_back(std::move(id), std::move(name), std::move(arguments));
  return true;
}

bool read_message(json_scan& s, chat_response& r) {
  if (s.peek() != scan_kind::object) {
    return false;
  }
  bool have_content = false;
  bool content_null = false;
  bool have_refusal = false;
  bool refusal_given = false;  // a non-empty string, or anything but a string or null
  bool have_calls = false;
  const bool ok = s.object([&](std::string_view k) {
    if (k == "content") {
      if (!first(have_content)) {
        return false;
      }
      content_null = s.peek() == scan_kind::null;
      return content_null ? s.null() : s.peek() == scan_kind::string && s.string(r.text);
    }
    if (k == "refusal") {
      if (!first(have_refusal)) {
        return false;
      }
      // Chosen by the first character, never by a failed read: a string read that fails may
      // stop inside the string, and skipping from there would take its text for structure.
      if (s.peek() != scan_kind::string && s.peek() != scan_kind::null) {
        refusal_given = true;  // read only when the content is null, and then malformed
        return s.skip();
      }
      std::string refusal;
      if (!s.optional_string(refusal)) {
        return false;
      }
      refusal_given = !refusal.empty();
      return true;
    }
    if (k == "tool_calls") {
      if (!first(have_calls)) {
        return false;
      }
      if (s.peek() == scan_kind::null) {
        return s.null();
      }
      if (s.peek() != scan_kind::array) {
        return false;
      }
      return s.array([&](std::size_t) { return read_tool_call(s, r.tool_calls); });
    }
    return s.skip();
  });
  return ok && have_content && !(content_null && refusal_given);
}

bool read_choice(json_scan& s, chat_response& r) {
  if (s.peek() != scan_kind::object) {
    return false;
  }
  bool have_finish = false;
  bool have_message = false;
  const bool ok = s.object([&](std::string_view k) {
    if (k == "finish_reason") {
      return first(have_finish) && s.optional_string(r.finish_reason);
    }
    if (k == "message") {
      return first(have_message) && read_message(s, r);
    }
    return s.skip();
  });
  return ok && have_message && r.finish_reason != "content_filter";
}

bool read_usage(json_scan& s, token_usage& u) {
  if (s.peek() == scan_kind::null) {
    return s.null();
  }
  if (s.peek() != scan_kind::object) {
    return false;
  }
  bool have_in = false;
  bool have_out = false;
  return s.object([&](std::string_view k) {
    if (k == "prompt_tokens") {
      return first(have_in) && read_optional_count(s, u.input);
    }
    if (k == "completion_tokens") {
      return first(have_out) && read_optional_count(s, u.output);
    }
    return s.skip();
  });
}

// Reads a completion's body into `r` without building a tree (json_scan.hpp), exactly as the
// tree-based reading in `parse_response` below would. False: not taken, because the body is
// malformed, refused or filtered, or has a shape this reader declines; the caller then reads it
// with nlohmann, which finds the same values or reports what is wrong. `r` is then garbage.
bool read_completion(std::string_view body, chat_response& r) {
  json_scan s(body);
  if (s.peek() != scan_kind::object) {
    return false;
  }
  bool have_choices = false;
  bool have_choice = false;
  bool have_model = false;
  bool have_usage = false;
  bool have_id = false;
  const bool ok = s.object([&](std::string_view k) {
    if (k == "choices") {
      if (!first(have_choices) || s.peek() != scan_kind::array) {
        return false;
      }
      return s.array([&](std::size_t i) {
        if (i > 0) {
          return s.skip();
        }
        have_choice = true;
        return read_choice(s, r);
      });
    }
    if (k == "model") {
      return first(have_model) && s.optional_string(r.model);
    }
    if (k == "usage") {
      return first(have_usage) && read_usage(s, r.usage);
    }
    if (k == "id") {
      if (!first(have_id)) {
        return false;
      }
      return s.peek() == scan_kind::string ? s.string(r.id) : s.skip();
    }
    return s.skip();
  });
  return ok && have_choice && s.at_end();
}

}  // namespace

chat_response openai::parse_response(const keel::http::response& res, system_clock::time_point now,
                                     bool keep_raw) {
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
  if (!keep_raw) {
    chat_response r = rd.start(json());
    if (read_completion(res.body, r)) {
      return r;
    }
  }
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
  if (content.is_string()) {
    r.text = content.get<std::string>();
  } else if (content.is_null()) {
    // No text: a refusal, or only tool calls.
    r.refusal = rd.optional_string(message, "refusal", "choices[0].message");
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
  if (r.finish_reason == "content_filter") {
    rd.filtered("finish_reason content_filter", std::move(r));
  }
  if (!r.refusal.empty()) {
    rd.filtered("the model refused", std::move(r));
  }
  rd.finish(r, std::move(body), keep_raw);
  return r;
}

}  // namespace keel::llm
