// keel::gateway OpenAI wire (keel/gateway/openai_wire.hpp).
#include <keel/gateway/openai_wire.hpp>

#include <keel/classify.hpp>
#include <keel/error.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/json_depth.hpp>
#include <keel/rate_controller.hpp>

#include <boost/system/system_error.hpp>

#include <cmath>
#include <limits>

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

// The text of a message's content: a string, or text parts joined.
std::string content_text(const json& content, const std::string& param) {
  if (content.is_string()) {
    return content.get<std::string>();
  }
  if (content.is_null()) {
    return {};
  }
  if (!content.is_array()) {
    invalid(param, "expected a string or an array of content parts, got " + type_name(content));
  }
  std::string text;
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
    if (*type != "text") {
      throw bad_request("keel serve passes text content parts only; '" + type->get<std::string>() +
                            "' is not supported.",
                        p + ".type", "unsupported_content");
    }
    const auto t = part.find("text");
    if (t == part.end() || !t->is_string()) {
      invalid(p + ".text", "expected a string");
    }
    text += t->get<std::string>();
  }
  return text;
}

std::string seconds_text(std::chrono::nanoseconds d) {
  const double s = std::chrono::duration<double>(d).count();
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", s);
  return buf;
}

}  // namespace

parsed_chat_request parse_chat_request(std::string_view body) {
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
    const std::string text =
        content == m.end() ? std::string() : content_text(*content, p + ".content");
    if (rl == "system" || rl == "developer") {
      if (!r.system.empty()) {
        r.system += "\n\n";
      }
      r.system += text;
    } else if (rl == "user" || rl == "assistant") {
      if (m.contains("tool_calls") || m.contains("function_call")) {
        throw bad_request("keel serve does not pass tool calls yet.", p + ".tool_calls",
                          "unsupported_parameter");
      }
      r.messages.emplace_back(rl, text);
    } else if (rl == "tool" || rl == "function") {
      throw bad_request("keel serve does not pass tool results yet.", p + ".role",
                        "unsupported_parameter");
    } else {
      invalid(p + ".role",
              "expected 'system', 'developer', 'user' or 'assistant', got '" + rl + "'");
    }
  }
  if (r.messages.empty()) {
    invalid("messages", "expected at least one user or assistant message");
  }

  for (const char* unsupported : {"tools", "functions", "tool_choice", "function_call", "audio"}) {
    const auto it = doc.find(unsupported);
    if (it != doc.end() && !it->is_null()) {
      throw bad_request(std::string("keel serve does not pass '") + unsupported + "' yet.",
                        unsupported, "unsupported_parameter");
    }
  }
  if (const auto n = doc.find("n"); n != doc.end() && !n->is_null() && *n != 1) {
    throw bad_request("keel serve answers one choice per request; 'n' must be 1.", "n",
                      "unsupported_parameter");
  }
  if (const auto lp = doc.find("logprobs"); lp != doc.end() && lp->is_boolean() && *lp) {
    throw bad_request("keel serve does not return logprobs.", "logprobs", "unsupported_parameter");
  }

  for (const char* field : {"max_tokens", "max_completion_tokens"}) {
    const auto it = doc.find(field);
    if (it == doc.end() || it->is_null()) {
      continue;
    }
    if (!it->is_number_integer() || it->get<long long>() < 1 ||
        it->get<long long>() > std::numeric_limits<int>::max()) {
      invalid(field, "expected an integer >= 1, got " + it->dump());
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
  return out;
}

std::string openai_finish_reason(std::string_view p) {
  if (p.empty() || p == "end_turn" || p == "stop_sequence" || p == "stop" || p == "complete") {
    return "stop";
  }
  if (p == "max_tokens" || p == "length") {
    return "length";
  }
  if (p == "tool_use" || p == "tool_calls") {
    return "tool_calls";
  }
  if (p == "content_filter" || p == "content_filtered" || p == "guardrail_intervened") {
    return "content_filter";
  }
  return std::string(p);
}

nlohmann::json completion_body(const keel::llm::chat_response& reply, const std::string& id,
                               long long created, const std::string& model) {
  return json{
      {"id", id},
      {"object", "chat.completion"},
      {"created", created},
      {"model", reply.model.empty() ? model : reply.model},
      {"choices",
       json::array({json{
           {"index", 0},
           {"message", {{"role", "assistant"}, {"content", reply.text}, {"refusal", nullptr}}},
           {"logprobs", nullptr},
           {"finish_reason", openai_finish_reason(reply.finish_reason)}}})},
      {"usage",
       {{"prompt_tokens", reply.usage.input},
        {"completion_tokens", reply.usage.output},
        {"total_tokens", reply.usage.input + reply.usage.output}}},
      {"system_fingerprint", nullptr},
  };
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
    const auto code = f.code().category() == keel::error_category()
                          ? static_cast<keel::error>(f.code().value())
                          : keel::error::all_fallbacks_failed;  // not keel's: the default below
    switch (code) {
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
    const keel::condition c = keel::classify(decided).condition;
    if (c == keel::condition::timeout) {
      set(504, "server_error", "upstream_timeout");
    } else if (c == keel::condition::cancelled) {
      set(499, "server_error", "cancelled");
    } else {
      set(502, "upstream_error", "upstream_unreachable");
    }
  }
  if (out.retry_after && out.retry_after->count() > 0) {
    out.body["error"]["message"] = out.body["error"]["message"].get<std::string>() +
                                   " (try again in " + seconds_text(*out.retry_after) + " s)";
  }
  return out;
}

}  // namespace keel::gateway
