// The provider-neutral entry points of chat.hpp: provider names and dispatch by provider kind.
#include <keel/llm/anthropic.hpp>
#include <keel/llm/bedrock.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/openai.hpp>

#include <algorithm>
#include <stdexcept>

namespace keel::llm {

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

keel::http::request build_stream_request(const chat_request& req, const endpoint& ep) {
  keel::http::request r = build_request(req, ep);
  if (ep.kind == provider_kind::bedrock) {
    // Same body; ConverseStream is the same resource with "-stream" (the SDK's path).
    r.url.insert(std::min(r.url.find('?'), r.url.size()), "-stream");  // before a query
    r.headers.erase("accept");  // the AWS SDKs send none for ConverseStream
    return r;
  }
  // The body is a JSON object the builder just dumped (compact, ending in '}', never empty: it
  // has a model or messages): the members go in before its last byte, without parsing and
  // dumping it again (with base64 images it can be megabytes).
  if (r.body.size() < 2 || r.body.back() != '}') {
    throw std::logic_error("keel: a request body that is not a JSON object");
  }
  r.body.pop_back();
  r.body += ep.kind == provider_kind::openai
                ? R"(,"stream":true,"stream_options":{"include_usage":true}})"
                : R"(,"stream":true})";
  r.set("accept", "text/event-stream");
  return r;
}

chat_response parse_response(const keel::http::response& res, provider_kind kind,
                             std::chrono::system_clock::time_point now, bool keep_raw) {
  switch (kind) {
    case provider_kind::openai:
      return openai::parse_response(res, now, keep_raw);
    case provider_kind::anthropic:
      return anthropic::parse_response(res, now, keep_raw);
    case provider_kind::bedrock:
      return bedrock::parse_response(res, now, keep_raw);
  }
  throw std::invalid_argument("unknown provider kind");
}

}  // namespace keel::llm
