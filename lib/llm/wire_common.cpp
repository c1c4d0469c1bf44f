// The helpers shared by the provider wire formats (declared in wire_common.hpp).
#include "wire_common.hpp"

#include <algorithm>
#include <cctype>

namespace keel::llm::detail {

namespace {

// Where a URL's query starts ('?'), or its size: a path is joined before it (a base_url such as
// "https://host/openai?api-version=2024-06-01" keeps its query at the end).
std::size_t query_at(std::string_view url) {
  return std::min(url.find('?'), url.size());
}

}  // namespace

std::string base_of(const endpoint& ep, std::string_view fallback) {
  std::string b = ep.base_url.empty() ? std::string(fallback) : ep.base_url;
  std::size_t end = query_at(b);
  std::size_t path_end = end;
  while (path_end > 0 && b[path_end - 1] == '/') {
    --path_end;
  }
  b.erase(path_end, end - path_end);
  return b;
}

std::string with_path(std::string_view base, std::string_view path) {
  const std::size_t q = query_at(base);
  std::string url;
  url.reserve(base.size() + path.size());
  url.append(base.substr(0, q)).append(path).append(base.substr(q));
  return url;
}

std::string versioned(std::string_view base, std::string_view path) {
  constexpr std::string_view version = "/v1";
  if (base.substr(0, query_at(base)).ends_with(version)) {
    return with_path(base, path);
  }
  std::string p;
  p.reserve(version.size() + path.size());
  p.append(version).append(path);
  return with_path(base, p);
}

std::string_view trim_blanks(std::string_view s) {
  constexpr std::string_view blanks = " \t\r\f\v";
  const auto first = s.find_first_not_of(blanks);
  if (first == std::string_view::npos) {
    return {};
  }
  return s.substr(first, s.find_last_not_of(blanks) - first + 1);
}

bool contains_ci(std::string_view hay, std::string_view needle) {
  auto it = std::search(hay.begin(), hay.end(), needle.begin(), needle.end(), [](char a, char b) {
    return std::tolower(static_cast<unsigned char>(a)) ==
           std::tolower(static_cast<unsigned char>(b));
  });
  return it != hay.end();
}

provider_error_info info_from(const keel::http::response& res, provider_kind kind,
                              system_clock::time_point now) {
  provider_error_info info;
  info.status = res.status;
  info.provider = std::string(to_string(kind));
  for (std::string_view name : {"x-request-id", "request-id", "x-amzn-requestid"}) {
    if (auto v = res.headers.find(name)) {
      info.request_id = std::string(*v);
      break;
    }
  }
  info.retry_after = server_delay_hint(res.headers, now);
  if (auto v = res.headers.find("x-should-retry")) {
    info.should_retry = parse_should_retry(*v);
  }
  return info;
}

errc from_status(int status) {
  if (status == 0) {
    return errc::transport;
  }
  if (status == 429) {
    return errc::rate_limited;
  }
  if (status == 401 || status == 403) {
    return errc::auth;
  }
  if (status == 404) {
    return errc::not_found;
  }
  if (status == 413) {
    return errc::request_too_large;
  }
  if (status >= 300 && status <= 399) {
    return errc::redirect;
  }
  if (status == 408 || status == 504) {
    return errc::timeout;
  }
  if (status == 503 || status == 529) {
    return errc::overloaded;
  }
  if (status == 409 || (status >= 500 && status <= 599)) {
    return errc::server_error;
  }
  return errc::bad_request;
}

[[noreturn]] void fail(errc code, provider_error_info info) {
  // The official SDKs let x-should-retry override the status; we do so for "true" only, and never
  // for an exhausted quota, which no retry can fix. "false" stays visible in should_retry().
  if (info.should_retry == true && condition_of(code) == keel::condition::permanent &&
      code != errc::quota_exhausted) {
    code = errc::server_error;
  }
  throw provider_error(code, std::move(info));
}

provider_error_info with_redirect(const keel::http::response& res, provider_error_info info) {
  if (res.status < 300 || res.status > 399) {
    return info;
  }
  std::string to = "(no Location header)";
  if (auto v = res.headers.find("location")) {
    std::string_view loc = *v;
    loc = loc.substr(0, loc.find_first_of("?#"));
    if (const auto scheme = loc.find("://"); scheme != std::string_view::npos) {
      const auto at = loc.substr(0, loc.find('/', scheme + 3)).rfind('@');
      if (at != std::string_view::npos && at > scheme) {
        to = std::string(loc.substr(0, scheme + 3)) + std::string(loc.substr(at + 1));
      } else {
        to = std::string(loc);
      }
    } else {
      to = std::string(loc);
    }
  }
  info.message = "redirected to " + to +
                 "; keel does not follow redirects (they would resend the key): point base_url "
                 "at the final URL";
  return info;
}

[[noreturn]] void malformed(const keel::http::response& res, provider_kind kind,
                            system_clock::time_point now, const std::string& what) {
  provider_error_info info = info_from(res, kind, now);
  info.message = what;
  // Some proxies answer a failure with a 2xx and an error object: what it said is the news
  // (redacted by provider_error, as every provider message).
  const json body = parse_json(res.body);
  const json& err = error_object(body);
  if (std::string said = string_field(err, "message"); !said.empty()) {
    info.message += "; the body is an error: " + said;
    const std::string code = string_field(err, "code");
    info.provider_code = code.empty() ? string_field(err, "type") : code;
  }
  throw provider_error(errc::malformed_response, std::move(info));
}

json parse_json(std::string_view body) {
  if (json_too_deep_at(body) != std::string_view::npos) {
    return json(json::value_t::discarded);  // malformed: never copied or dumped recursively
  }
  return json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
}

bool is_2xx(int status) {
  return status >= 200 && status <= 299;
}

const json& error_object(const json& body) {
  static const json empty = json::object();
  if (body.is_object()) {
    auto it = body.find("error");
    if (it != body.end() && it->is_object()) {
      return *it;
    }
  }
  return empty;
}

std::string string_field(const json& obj, const char* key) {
  if (obj.is_object()) {
    auto it = obj.find(key);
    if (it != obj.end() && it->is_string()) {
      return it->get<std::string>();
    }
  }
  return {};
}

std::string body_excerpt(const std::string& body) {
  return redact(body, 200);
}

void set_json_body(keel::http::request& r, const json& body) {
  // Invalid UTF-8 in a caller's strings becomes U+FFFD, as json_writer writes it for OpenAI's
  // bodies, rather than a type_error thrown from deep inside a call.
  set_json_body(r, body.dump(-1, ' ', false, json::error_handler_t::replace));
}

void set_json_body(keel::http::request& r, std::string body) {
  r.set("content-type", "application/json");
  r.set("accept", "application/json");
  r.body = std::move(body);
}

bool has_metadata(const json& m) {
  return m.is_object() && !m.empty();
}

void check_stop_sequences(provider_kind kind, const std::vector<std::string>& stop) {
  for (std::size_t i = 0; i < stop.size(); ++i) {
    if (stop[i].find_first_not_of(" \t\r\n\f\v") == std::string::npos) {
      unsupported(kind, "stop[" + std::to_string(i) + "]: " + std::string(to_string(kind)) +
                            " takes no stop sequence that is empty or only whitespace, got " +
                            nlohmann::json(stop[i]).dump());
    }
  }
}

answer_tool_plan plan_answer_tool(const chat_request& req) {
  answer_tool_plan plan;
  if (!req.response_format || !req.response_format->is_object()) {
    return plan;
  }
  const json& rf = *req.response_format;
  // OpenAI's own shapes by their type; any other object is a schema itself (openai.cpp wraps it).
  const std::string type = string_field(rf, "type");
  if (type == "text") {
    return plan;
  }
  const tool_choice_mode mode =
      req.tool_choice ? req.tool_choice->mode : tool_choice_mode::automatic;
  if (!req.tools.empty() &&
      (mode == tool_choice_mode::required || mode == tool_choice_mode::named)) {
    return plan;  // the reply is a call of the request's own tool: the format does not apply
  }
  plan.with_own_tools = !req.tools.empty() && mode == tool_choice_mode::automatic;
  plan.schema = json{{"type", "object"}};
  if (type == "json_schema") {
    if (const auto js = rf.find("json_schema"); js != rf.end() && js->is_object()) {
      if (const auto schema = js->find("schema"); schema != js->end() && schema->is_object()) {
        plan.schema = *schema;
      }
    }
  } else if (type != "json_object") {
    plan.schema = rf;
  }
  return plan;
}

std::string answered_finish_reason(std::string reason, bool answered, bool other_calls) {
  if (answered && !other_calls && reason == "tool_use") {
    return "end_turn";
  }
  return reason;
}

void finish_answered(chat_response& r, std::optional<std::string> answer, std::string reason) {
  const bool answered = answer.has_value();
  if (answered) {
    r.text = std::move(*answer);
  }
  r.finish_reason = answered_finish_reason(std::move(reason), answered, !r.tool_calls.empty());
}

double provider_temperature(double openai_temperature) {
  return std::clamp(openai_temperature, 0.0, 1.0);
}

void unsupported(provider_kind kind, const std::string& message) {
  throw provider_error(errc::bad_request, provider_error_info(0, std::string(to_string(kind)),
                                                              "unsupported_content", message));
}

std::string message_path(std::size_t i) {
  return "messages[" + std::to_string(i) + "]";
}

json arguments_object(provider_kind kind, const tool_call& call, const std::string& path) {
  if (call.arguments.empty()) {
    return json::object();
  }
  json args = parse_json(call.arguments);
  if (!args.is_object()) {
    unsupported(kind, path + ".arguments is not a JSON object (" + std::string(to_string(kind)) +
                          " takes tool input as an object)");
  }
  return args;
}

std::optional<data_url> parse_data_url(std::string_view url) {
  constexpr std::string_view scheme = "data:";
  if (url.size() < scheme.size() || !contains_ci(url.substr(0, scheme.size()), scheme)) {
    return std::nullopt;
  }
  url.remove_prefix(scheme.size());
  const auto comma = url.find(',');
  if (comma == std::string_view::npos) {
    return std::nullopt;
  }
  std::string_view meta = url.substr(0, comma);
  constexpr std::string_view b64 = ";base64";
  if (meta.size() < b64.size() || !contains_ci(meta.substr(meta.size() - b64.size()), b64)) {
    return std::nullopt;
  }
  meta.remove_suffix(b64.size());
  data_url out;
  out.media_type.reserve(meta.size());
  for (char c : meta) {
    out.media_type += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  out.data = std::string(url.substr(comma + 1));
  return out;
}

bool is_http_url(std::string_view url) {
  for (std::string_view scheme : {"http://", "https://"}) {
    if (url.size() >= scheme.size() && contains_ci(url.substr(0, scheme.size()), scheme)) {
      return true;
    }
  }
  return false;
}

std::string text_of(const chat_message& m) {
  if (m.parts.empty()) {
    return m.content;
  }
  std::string out;
  for (const content_part& p : m.parts) {
    if (p.kind == part_kind::text) {
      out += p.text;
    }
  }
  return out;
}

json parameters_of(const tool_definition& t) {
  return t.parameters.is_null() ? json{{"type", "object"}} : t.parameters;
}

}  // namespace keel::llm::detail
