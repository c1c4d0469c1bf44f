// Tests for keel/llm.hpp: the umbrella alone is enough to build, send, parse and pace a call.
#include <keel/llm.hpp>

#include "support.hpp"

#include <boost/asio/io_context.hpp>
#include <catch2/catch.hpp>

#include <string>

namespace {

namespace asio = boost::asio;

// A sender that records what it was sent and answers with a canned OpenAI reply.
struct canned_openai_sender {
  asio::awaitable<keel::http::response> send(keel::http::request req) {
    sent_url = req.url;
    sent_body = req.body;
    keel::http::response res;
    res.status = 200;
    res.headers.set("content-type", "application/json");
    res.body = R"({"id":"chatcmpl-1","model":"gpt-4o-mini","choices":[{"index":0,
        "message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}})";
    co_return res;
  }
  std::string sent_url;
  std::string sent_body;
};

}  // namespace

TEST_CASE("keel/llm.hpp alone builds, sends and parses a provider call", "[llm]") {
  asio::io_context ctx;
  canned_openai_sender sender;
  const keel::llm::chat_request req("gpt-4o-mini", {keel::llm::chat_message("user", "Say hi")}, 64);
  const keel::llm::endpoint ep(keel::llm::provider_kind::openai, "http://127.0.0.1:1", "key");
  keel_test::outcome<keel::llm::chat_response> out;
  keel_test::spawn(ctx, keel::llm::complete(sender, ep, req), out);
  ctx.run();
  REQUIRE(out.done);
  REQUIRE_FALSE(out.error);
  CHECK(out.value->text == "Hi!");
  CHECK(out.value->usage.input == 9);
  CHECK(out.value->usage.output == 2);
  CHECK(sender.sent_url == "http://127.0.0.1:1/v1/chat/completions");
  CHECK(nlohmann::json::parse(sender.sent_body)["model"] == "gpt-4o-mini");
  // Names from the other headers the umbrella brings in.
  CHECK(keel::llm::estimate_tokens(req) > 64);
  CHECK(keel::llm::max_json_depth == 128);
  CHECK(keel::llm::to_string(keel::llm::provider_kind::bedrock) == "bedrock");
}
