// Private helpers shared by the provider wire formats (lib/llm/openai.cpp, anthropic.cpp,
// bedrock.cpp): base URLs, JSON bodies, the first steps of error classification and the reader
// of success bodies.
#pragma once

#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/hints.hpp>
#include <keel/llm/json_depth.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace keel::llm::detail {

using json = nlohmann::json;
using std::chrono::system_clock;

// `ep.base_url` (else `fallback`) without trailing slashes on its path (its query, if any,
// kept).
std::string base_of(const endpoint& ep, std::string_view fallback);

// `base` with `path` appended to its path, before its query if it has one
// ("https://h/x?k=v" + "/y" = "https://h/x/y?k=v").
std::string with_path(std::string_view base, std::string_view path);

// `base` + "/v1" + `path` (by `with_path`), unless `base`'s path already ends with the API
// version: the official OpenAI SDKs (and AG2 configs, vLLM and most OpenAI-compatible servers'
// docs) write base URLs as "http://host:8000/v1", which keel used to turn into
// ".../v1/v1/chat/completions".
std::string versioned(std::string_view base, std::string_view path);

// `s` without leading and trailing blanks (space, tab, CR, FF, VT).
std::string_view trim_blanks(std::string_view s);

// True if `hay` contains `needle`, ignoring ASCII case.
bool contains_ci(std::string_view hay, std::string_view needle);

// Everything we know about a failed call before reading the provider-specific body.
provider_error_info info_from(const keel::http::response& res, provider_kind kind,
                              system_clock::time_point now);

// The error code a status means before the provider's body is read.
errc from_status(int status);

// The provider-specific classification of an error body, shared by parse_response and the stream
// decoders (stream.cpp) so that a failure is named the same whether it came as an HTTP error or
// mid-stream. Each returns `fallback` when the provider's code says nothing more specific.
// OpenAI: the error object's `code`, `type` and `message`; `status` is the HTTP status (0 for an
// error event in a stream).
errc openai_error_code(std::string_view code, std::string_view type, std::string_view message,
                       int status, errc fallback);
// Anthropic: the error object's `type` and `message`.
errc anthropic_error_code(std::string_view type, std::string_view message, errc fallback);
// Bedrock: the exception's name without namespace ("ThrottlingException"; the streaming spelling
// "throttlingException" is accepted too) and its message.
errc bedrock_error_code(std::string_view type, std::string_view message, errc fallback);

// Throws the provider_error for `code`, after applying x-should-retry.
[[noreturn]] void fail(errc code, provider_error_info info);

// A 3xx names where it leads: usually the fix of a wrong base_url (http:// for https://, a
// missing path prefix). The query and any user:password@ are cut (they may hold a key).
provider_error_info with_redirect(const keel::http::response& res, provider_error_info info);

// Throws errc::malformed_response with message `what`.
[[noreturn]] void malformed(const keel::http::response& res, provider_kind kind,
                            system_clock::time_point now, const std::string& what);

// The body as JSON, or a discarded value if it is not JSON or nests too deep.
json parse_json(std::string_view body);

bool is_2xx(int status);

// The error object of a non-2xx body, if it has the shape `{error: {...}}`, else an empty object.
// A reference, never a copy: nlohmann copies recursively, so copying a deeply nested error object
// from a broken or hostile server (a few hundred KB of "[[[[...") overflowed the stack.
const json& error_object(const json& body);

// `obj[key]` if it is a string, else "".
std::string string_field(const json& obj, const char* key);

// The start of a body for an error message, with secrets redacted.
std::string body_excerpt(const std::string& body);

// Sets the JSON content headers and `body` as the request body.
void set_json_body(keel::http::request& r, const json& body);
// The same for a body already written as JSON text.
void set_json_body(keel::http::request& r, std::string body);

bool has_metadata(const json& m);

// ---- tools and images (chat.hpp's overview) ----

// Throws provider_error bad_request (status 0) for what `kind` cannot be sent: `message` names the
// message and part.
[[noreturn]] void unsupported(provider_kind kind, const std::string& message);

// Anthropic and Bedrock refuse a stop sequence that is empty or only whitespace (OpenAI's
// common `"stop": ["\n"]`): such a request fails the entry here, naming it, before anything is
// sent (dropping it would answer past the caller's stop).
void check_stop_sequences(provider_kind kind, const std::vector<std::string>& stop);

// ---- response_format on Anthropic and Bedrock (chat.hpp's `response_format`) ----

// How a request's response_format goes to a provider that has none.
struct answer_tool_plan {
  // The answer tool's input schema; null: no answer tool (no response_format, type "text", or
  // the request's own tool choice is "required" or a named tool).
  nlohmann::json schema;
  // The request's own tools go too (tool choice automatic or none given), and the model must
  // call one of them or the answer tool; false: the answer tool alone, forced.
  bool with_own_tools = false;
};
answer_tool_plan plan_answer_tool(const chat_request& req);

// What the answer tool tells the model.
inline constexpr const char* answer_tool_description =
    "Give your answer by calling this tool: its input is the answer, in the format asked for.";

// A reply's finish reason once the answer tool's call became its text: "tool_use" (the call)
// becomes "end_turn" when no other tool was called.
std::string answered_finish_reason(std::string reason, bool answered, bool other_calls);

// A whole reply's end, for Anthropic and Bedrock: the answer tool's input, if it was called,
// becomes the reply's text, alone (prose beside it would not parse), and the finish reason is
// `reason` as answered_finish_reason gives it.
void finish_answered(chat_response& r, std::optional<std::string> answer, std::string reason);

// OpenAI's temperature runs 0-2, Anthropic's and Bedrock's 0-1: above 1 is sent as 1, their
// most random (refusing it would fail every fallback from an OpenAI entry).
double provider_temperature(double openai_temperature);

// "messages[i]" for the message at `i` of the request.
std::string message_path(std::size_t i);

// A tool call's arguments as the JSON object Anthropic and Bedrock take as `input` (empty text:
// `{}`), or `unsupported` naming `path` if they are not one.
json arguments_object(provider_kind kind, const tool_call& call, const std::string& path);

// A `data:` URL's media type and base64 payload.
struct data_url {
  std::string media_type;  // "image/png"
  std::string data;        // base64, as in the URL
};
// `url` as a base64 data URL, if it is one.
std::optional<data_url> parse_data_url(std::string_view url);

// True if `url` starts with http:// or https:// (any case).
bool is_http_url(std::string_view url);

// The text a "tool" turn or a text-only turn carries: `content`, or its text parts joined.
std::string text_of(const chat_message& m);

// A tool's parameters schema, `{"type": "object"}` when none was given.
json parameters_of(const tool_definition& t);

// The messages of `req` for a provider whose tool results are blocks of a user turn (Anthropic,
// Bedrock): `result(m)` is a tool turn's block, `blocks(m, i)` a turn's content blocks and
// `content(m, i)` a turn's `content` value. Every result of one turn, and the user turn right
// after them, go in one user message, results first (both providers want a turn's results
// together, before any text); a blank text block is left out of it (both refuse one).
template <class Result, class Blocks, class Content>
json user_turn_results(const chat_request& req, Result result, Blocks blocks, Content content) {
  json messages = json::array();
  bool open_results = false;  // the last message holds tool results
  for (std::size_t i = 0; i < req.messages.size(); ++i) {
    const chat_message& m = req.messages[i];
    if (m.role == "tool") {
      json r = result(m);
      if (open_results) {
        messages.back()["content"].push_back(std::move(r));
      } else {
        messages.push_back({{"role", "user"}, {"content", json::array({std::move(r)})}});
        open_results = true;
      }
      continue;
    }
    if (open_results && m.role == "user") {
      for (json& b : blocks(m, i)) {
        const auto text = b.find("text");
        if (text == b.end() || *text != "") {
          messages.back()["content"].push_back(std::move(b));
        }
      }
    } else {
      messages.push_back({{"role", m.role}, {"content", content(m, i)}});
    }
    open_results = false;
  }
  return messages;
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
  // A content filter or refusal: `partial` is what the answer held with it (the error's
  // `filtered_reply`).
  [[noreturn]] void filtered(const std::string& what, chat_response partial) const {
    provider_error_info info = info_from(res_, kind_, now_);
    info.message = what;
    info.filtered_reply = std::make_shared<const chat_response>(std::move(partial));
    throw provider_error(errc::content_filtered, std::move(info));
  }
  chat_response start(json raw) const {
    chat_response r;
    r.request_id = info_from(res_, kind_, now_).request_id;
    r.rate_limits = parse_rate_limits(res_.headers, now_);
    r.raw = std::move(raw);
    return r;
  }
  // The last step of a parse: the completion's `id` (when a string) and, if kept, the tree.
  static void finish(chat_response& r, json body, bool keep_raw) {
    if (const auto id = body.find("id"); id != body.end() && id->is_string()) {
      r.id = id->get<std::string>();
    }
    if (keep_raw) {
      r.raw = std::move(body);
    }
  }

 private:
  static std::string join(const std::string& path, const char* key) {
    return path.empty() ? std::string(key) : path + "." + key;
  }
  const keel::http::response& res_;
  provider_kind kind_;
  system_clock::time_point now_;
};

}  // namespace keel::llm::detail
