// Fuzz target: keel serve's reading of a caller's chat completions body
// (keel::gateway::parse_chat_request, keel/gateway/openai_wire.hpp), the one parser of the
// gateway that sees every byte a caller sends.
//
// The parser promises to throw only `bad_request` (with a 400 or 404 status and a message) and,
// on success, to give a request keel can send: at least one user, assistant or tool turn, only
// those roles (a tool turn with the id of its call, tool calls only on assistant turns), a reply
// budget of at least one token. Each provider's wire format then builds it or refuses it with a
// `provider_error` bad_request naming the part (nothing else). The answer built around it (a
// completion, a chunk, an error body) must serialise.
#include "fuzz_support.hpp"

#include <keel/gateway/openai_wire.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // The body is depth-checked before it is parsed: recursion on nesting would show here.
  keel::fuzz::limit_stack(512 * 1024);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body = keel::fuzz::as_text(data, size);
  // The common request is read without a tree (keel/llm/json_scan.hpp): it must read exactly
  // what the tree reads, and refuse (decline to the tree) whatever the tree refuses.
  std::optional<keel::gateway::parsed_chat_request> tree;
  std::string tree_error;
  try {
    tree = keel::gateway::detail::parse_chat_request_tree(body);
  } catch (const keel::gateway::bad_request& e) {
    tree_error = e.what();
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::gateway::detail::parse_chat_request_tree");
  }
  keel::gateway::parsed_chat_request p;
  try {
    p = keel::gateway::parse_chat_request(body);
  } catch (const keel::gateway::bad_request& e) {
    KEEL_FUZZ_CHECK(!tree && tree_error == e.what());
    KEEL_FUZZ_CHECK(e.status() == 400 || e.status() == 404);
    KEEL_FUZZ_CHECK(*e.what() != '\0');
    (void)keel::gateway::error_body(e.what(), "invalid_request_error", e.param(), e.code())
        .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    return 0;
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::gateway::parse_chat_request");
  }
  const keel::llm::chat_request& r = p.request;
  KEEL_FUZZ_CHECK(tree.has_value());
  KEEL_FUZZ_CHECK(p.stream == tree->stream && p.include_usage == tree->include_usage &&
                  r.system == tree->request.system);
  {
    // Every field of the request, as the OpenAI body writes it.
    const keel::llm::endpoint ep(keel::llm::provider_kind::openai, "http://127.0.0.1:1", "k");
    std::string a;
    std::string b;
    try {
      a = keel::llm::build_request(r, ep).body;
    } catch (const keel::llm::provider_error& e) {
      a = e.what();
    }
    try {
      b = keel::llm::build_request(tree->request, ep).body;
    } catch (const keel::llm::provider_error& e) {
      b = e.what();
    }
    KEEL_FUZZ_CHECK(a == b);
  }
  KEEL_FUZZ_CHECK(!r.model.empty());
  KEEL_FUZZ_CHECK(!r.messages.empty());
  for (const auto& m : r.messages) {
    KEEL_FUZZ_CHECK(m.role == "user" || m.role == "assistant" || m.role == "tool");
    KEEL_FUZZ_CHECK((m.role == "tool") == !m.tool_call_id.empty());
    KEEL_FUZZ_CHECK(m.tool_calls.empty() || m.role == "assistant");
    KEEL_FUZZ_CHECK(m.parts.empty() || m.role == "user");
  }
  for (const auto kind : {keel::llm::provider_kind::openai, keel::llm::provider_kind::anthropic,
                          keel::llm::provider_kind::bedrock}) {
    try {
      const keel::llm::endpoint ep(kind, "http://127.0.0.1:1", "k", "us-east-1");
      (void)keel::llm::build_request(r, ep);
      (void)keel::llm::build_stream_request(r, ep);
    } catch (const keel::llm::provider_error& e) {
      KEEL_FUZZ_CHECK(e.llm_code() == keel::llm::errc::bad_request);
      KEEL_FUZZ_CHECK(!e.message().empty());
    } catch (...) {
      keel::fuzz::unexpected_exception("keel::llm::build_request");
    }
  }
  KEEL_FUZZ_CHECK(r.max_tokens >= 0);  // 0: not given (no limit sent; Anthropic its default)
  KEEL_FUZZ_CHECK(!r.temperature || (*r.temperature >= 0 && *r.temperature <= 2));
  KEEL_FUZZ_CHECK(!r.top_p || (*r.top_p >= 0 && *r.top_p <= 1));
  KEEL_FUZZ_CHECK(r.stop.size() <= 4);
  KEEL_FUZZ_CHECK(!r.response_format || r.response_format->is_object());
  // What the gateway would answer around it serialises (the text as if echoed back).
  keel::llm::chat_response reply;
  reply.text = r.messages.back().content;
  reply.finish_reason = r.system;
  reply.tool_calls = r.messages.back().tool_calls;
  // Written as text by hand (keel/llm/json_writer.hpp): it must always be valid JSON.
  KEEL_FUZZ_CHECK(
      nlohmann::json::accept(keel::gateway::completion_body(reply, "chatcmpl-fuzz", 0, r.model)));
  (void)keel::gateway::stream_chunk("chatcmpl-fuzz", 0, r.model,
                                    nlohmann::json{{"content", reply.text}}, {}, p.include_usage)
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  return 0;
}
