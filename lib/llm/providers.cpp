// Wire formats of OpenAI chat completions, Anthropic messages and Bedrock Converse.
#include <keel/llm/anthropic.hpp>
#include <keel/llm/bedrock.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/hints.hpp>
#include <keel/llm/json_depth.hpp>
#include <keel/llm/openai.hpp>

#include <algorithm>
#include <cctype>
#include <stdexcept>
#include <string>

namespace keel::llm {
namespace {

using json = nlohmann::json;
using std::chrono::system_clock;

std::string base_of(const endpoint& ep, std::string_view fallback) {
  std::string b = ep.base_url.empty() ? std::string(fallback) : ep.base_url;
  while (!b.empty() && b.back() == '/') {
    b.pop_back();
  }
  return b;
}

// `base` + "/v1" + `path`, unless `base` already ends with the API version: the official
// OpenAI SDKs (and AG2 configs, vLLM and most OpenAI-compatible servers' docs) write base URLs
// as "http://host:8000/v1", which keel used to turn into ".../v1/v1/chat/completions".
std::string versioned(std::string base, std::string_view path) {
  constexpr std::string_view version = "/v1";
  if (base.size() < version.size() ||
      base.compare(base.size() - version.size(), version.size(), version) != 0) {
    base += version;
  }
  base += path;
  return base;
}

bool contains_ci(std::string_view hay, std::string_view needle) {
  auto it = std::search(hay.begin(), hay.end(), needle.begin(), needle.end(), [](char a, char b) {
    return std::tolower(static_cast<unsigned char>(a)) ==
           std::tolower(static_cast<unsigned char>(b));
  });
  return it != hay.end();
}

// Everything we know about a failed call before reading the provider-specific body.
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

// A 3xx names where it leads: usually the fix of a wrong base_url (http:// for https://, a
// missing path prefix). The query and any user:password@ are cut (they may hold a key).
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
  throw provider_error(errc::malformed_response, std::move(info));
}

json parse_json(std::string_view body) {
  if (json_too_deep_at(body) != std::string_view::npos) {
    return json(json::value_t::discarded);  // malformed: never copied or dumped recursively
  }
  return json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
}

// Reads a success body; every missing or mistyped field is reported by its JSON path.
class reader {
 public:
  reader(const keel::http::response& res, provider_kind kind, system_clock::time_point now)
      : res_(res), kind_(kind), now_(now) {}

  json body() const {
    json j = parse_json(res_.body);
    if (j.is_discarded()) {
      fail(json_too_deep_at(res_.body) != std::string_view::npos
               ? "body nests deeper than " + std::to_string(max_json_depth) + " levels"
               : std::string("body is not valid JSON"));
    }
    if (!j.is_object()) {
      fail("body is not a JSON object");
    }
    return j;
  }
  const json& member(const json& obj, const char* key, const std::string& path) const {
    if (!obj.is_object()) {
      fail(path + " is not an object");
    }
    auto it = obj.find(key);
    if (it == obj.end()) {
      fail(join(path, key) + " missing");
    }
    return *it;
  }
  const json& array(const json& obj, const char* key, const std::string& path) const {
    const json& a = member(obj, key, path);
    if (!a.is_array()) {
      fail(join(path, key) + " is not an array");
    }
    return a;
  }
  std::string optional_string(const json& obj, const char* key, const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      return {};
    }
    if (!it->is_string()) {
      fail(join(path, key) + " is not a string");
    }
    return it->get<std::string>();
  }
  long long optional_count(const json& obj, const char* key, const std::string& path) const {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      return 0;
    }
    if (!it->is_number_integer() || it->get<long long>() < 0) {
      fail(join(path, key) + " is not a non-negative integer");
    }
    return it->get<long long>();
  }
  token_usage usage(const json& obj, const char* key, const char* in, const char* out) const {
    token_usage u;
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) {
      return u;
    }
    if (!it->is_object()) {
      fail(std::string(key) + " is not an object");
    }
    u.input = optional_count(*it, in, key);
    u.output = optional_count(*it, out, key);
    return u;
  }
  [[noreturn]] void fail(const std::string& what) const { malformed(res_, kind_, now_, what); }
  [[noreturn]] void filtered(const std::string& what) const {
    provider_error_info info = info_from(res_, kind_, now_);
    info.message = what;
    throw provider_error(errc::content_filtered, std::move(info));
  }
  chat_response start(json raw) const {
    chat_response r;
    r.request_id = info_from(res_, kind_, now_).request_id;
    r.rate_limits = parse_rate_limits(res_.headers, now_);
    r.raw = std::move(raw);
    return r;
  }

 private:
  static std::string join(const std::string& path, const char* key) {
    return path.empty() ? std::string(key) : path + "." + key;
  }
  const keel::http::response& res_;
  provider_kind kind_;
  system_clock::time_point now_;
};

bool is_2xx(int status) {
  return status >= 200 && status <= 299;
}

// The error object of a non-2xx body, if it has the shape `{error: {...}}`, else an empty object.
// A reference, never a copy: nlohmann copies recursively, so copying a deeply nested error object
// from a broken or hostile server (a few hundred KB of "[[[[...") overflowed the stack.
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
  r.set("content-type", "application/json");
  r.set("accept", "application/json");
  r.body = body.dump();
}

bool has_metadata(const json& m) {
  return m.is_object() && !m.empty();
}

}  // namespace

std::string_view to_string(provider_kind k) noexcept {
  switch (k) {
    case provider_kind::openai:
      return "openai";
    case provider_kind::anthropic:
      return "anthropic";
    case provider_kind::bedrock:
      return "bedrock";
  }
  return "unknown";
}

// ---- OpenAI ------------------------------------------------------------------------------------

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
    auto is = [&](std::string_view s) { return code == s || type == s; };
    errc e = from_status(res.status);
    if (is("insufficient_quota") || is("billing_hard_limit_reached") || is("billing_not_active") ||
        is("quota_exceeded")) {
      e = errc::quota_exhausted;
    } else if (is("context_length_exceeded") ||
               (res.status == 400 && contains_ci(info.message, "maximum context length"))) {
      e = errc::context_length_exceeded;
    } else if (is("content_filter") || is("content_policy_violation")) {
      e = errc::content_filtered;
    }
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

// ---- Anthropic ---------------------------------------------------------------------------------

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
    errc e = from_status(res.status);
    if (type == "rate_limit_error") {
      e = errc::rate_limited;
    } else if (type == "overloaded_error") {
      e = errc::overloaded;
    } else if (type == "api_error") {
      e = errc::server_error;
    } else if (type == "timeout_error") {
      e = errc::timeout;
    } else if (type == "invalid_request_error") {
      e = contains_ci(info.message, "prompt is too long") ? errc::context_length_exceeded
          : contains_ci(info.message, "credit balance")   ? errc::quota_exhausted
                                                          : errc::bad_request;
    } else if (type == "billing_error") {
      e = errc::quota_exhausted;
    } else if (type == "authentication_error" || type == "permission_error") {
      e = errc::auth;
    } else if (type == "not_found_error") {
      e = errc::not_found;
    } else if (type == "request_too_large") {
      e = errc::request_too_large;
    }
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

// ---- Bedrock -----------------------------------------------------------------------------------

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

keel::http::request bedrock::build_request(const chat_request& req, const endpoint& ep) {
  if (ep.base_url.empty() && ep.region.empty()) {
    throw std::invalid_argument("bedrock endpoint needs a region or a base URL");
  }
  json messages = json::array();
  for (const auto& m : req.messages) {
    messages.push_back({{"role", m.role}, {"content", json::array({{{"text", m.content}}})}});
  }
  json config = {{"maxTokens", req.max_tokens}};
  if (req.temperature) {
    config["temperature"] = *req.temperature;
  }
  if (req.top_p) {
    config["topP"] = *req.top_p;
  }
  if (!req.stop.empty()) {
    config["stopSequences"] = req.stop;
  }
  json body = {{"messages", std::move(messages)}, {"inferenceConfig", std::move(config)}};
  if (!req.system.empty()) {
    body["system"] = json::array({{{"text", req.system}}});
  }
  if (has_metadata(req.metadata)) {
    body["requestMetadata"] = req.metadata;
  }
  const std::string base = base_of(ep, "https://bedrock-runtime." + ep.region + ".amazonaws.com");
  keel::http::request r("POST", base + "/model/" + uri_encode(req.model) + "/converse");
  set_json_body(r, body);
  return r;
}

chat_response bedrock::parse_response(const keel::http::response& res,
                                      system_clock::time_point now) {
  constexpr auto kind = provider_kind::bedrock;
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
    errc e = from_status(res.status);
    if (type == "ThrottlingException") {
      e = errc::rate_limited;
    } else if (type == "ServiceUnavailableException" || type == "ModelNotReadyException") {
      e = errc::overloaded;
    } else if (type == "InternalServerException" || type == "ModelErrorException" ||
               type == "ModelStreamErrorException") {
      e = errc::server_error;
    } else if (type == "ModelTimeoutException") {
      e = errc::timeout;
    } else if (type == "ValidationException") {
      e = contains_ci(info.message, "too long") || contains_ci(info.message, "too many tokens")
              ? errc::context_length_exceeded
              : errc::bad_request;
    } else if (type == "AccessDeniedException" || type == "UnrecognizedClientException" ||
               type == "ExpiredTokenException") {
      e = errc::auth;
    } else if (type == "ResourceNotFoundException") {
      e = errc::not_found;
    } else if (type == "ServiceQuotaExceededException") {
      e = errc::quota_exhausted;
    }
    fail(e, with_redirect(res, std::move(info)));
  }
  reader rd(res, kind, now);
  json body = rd.body();
  const json& output = rd.member(body, "output", "");
  const json& message = rd.member(output, "message", "output");
  const json& content = rd.array(message, "content", "output.message");
  chat_response r = rd.start(json());
  for (std::size_t i = 0; i < content.size(); ++i) {
    const std::string path = "output.message.content[" + std::to_string(i) + "]";
    const json& block = content[i];
    if (!block.is_object()) {
      rd.fail(path + " is not an object");
    }
    auto it = block.find("text");
    if (it == block.end()) {
      continue;  // a non-text block (tool use, reasoning) keel does not request
    }
    if (!it->is_string()) {
      rd.fail(path + ".text is not a string");
    }
    r.text += it->get<std::string>();
  }
  r.finish_reason = rd.optional_string(body, "stopReason", "");
  if (r.finish_reason == "content_filtered" || r.finish_reason == "guardrail_intervened") {
    rd.filtered("stopReason " + r.finish_reason);
  }
  r.usage = rd.usage(body, "usage", "inputTokens", "outputTokens");
  r.raw = std::move(body);
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

// ---- Dispatch ----------------------------------------------------------------------------------

keel::http::request build_request(const chat_request& req, const endpoint& ep) {
  switch (ep.kind) {
    case provider_kind::openai:
      return openai::build_request(req, ep);
    case provider_kind::anthropic:
      return anthropic::build_request(req, ep);
    case provider_kind::bedrock:
      return bedrock::build_request(req, ep);
  }
  throw std::invalid_argument("unknown provider kind");
}

chat_response parse_response(const keel::http::response& res, provider_kind kind,
                             system_clock::time_point now) {
  switch (kind) {
    case provider_kind::openai:
      return openai::parse_response(res, now);
    case provider_kind::anthropic:
      return anthropic::parse_response(res, now);
    case provider_kind::bedrock:
      return bedrock::parse_response(res, now);
  }
  throw std::invalid_argument("unknown provider kind");
}

}  // namespace keel::llm
