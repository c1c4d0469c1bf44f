// Tests for keel/llm/stream.hpp: the three providers' stream decoders, split anywhere and cut
// anywhere, and the classification of errors mid-stream.
#include <keel/error.hpp>
#include <keel/llm/stream.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

namespace {

using keel::llm::errc;
using keel::llm::event_stream_header;
using keel::llm::event_stream_header_type;
using keel::llm::provider_kind;
using keel::llm::stream_event;
using keel::llm::stream_event_kind;

// One line per event, e.g. "text Hello" or "error overloaded overloaded_error".
std::string show(const std::vector<stream_event>& events) {
  std::string s;
  for (const auto& e : events) {
    s += std::string(keel::llm::to_string(e.kind));
    switch (e.kind) {
      case stream_event_kind::start:
        s += " " + e.id + " " + e.model + " " + e.role;
        break;
      case stream_event_kind::text:
        s += " " + e.text;
        break;
      case stream_event_kind::tool_call:
        s += " " + std::to_string(e.tool_index) + " " + e.tool.id + " " + e.tool.name + " " +
             e.tool.arguments;
        break;
      case stream_event_kind::finish:
        s += " " + e.finish_reason;
        break;
      case stream_event_kind::usage:
        s += " " + std::to_string(e.usage.input) + "/" + std::to_string(e.usage.output);
        break;
      case stream_event_kind::error:
        s += " " + std::string(keel::llm::to_string(e.error->llm_code())) + " " +
             e.error->provider_code();
        break;
      case stream_event_kind::done:
        break;
    }
    s += "\n";
  }
  return s;
}

// Decodes `body` fed in pieces of `piece` bytes (0: at once), then finish().
std::vector<stream_event> decode(provider_kind kind, std::string_view body, std::size_t piece = 0,
                                 keel::llm::stream_options opts = {}) {
  auto d = keel::llm::make_stream_decoder(kind, opts);
  std::vector<stream_event> out;
  if (piece == 0) {
    d->feed(body, out);
  } else {
    for (std::size_t i = 0; i < body.size(); i += piece) {
      d->feed(body.substr(i, piece), out);
    }
  }
  d->finish(out);
  CHECK(d->ended());
  return out;
}

// Every split point and one byte at a time give the events of feeding the body at once.
void check_every_split(provider_kind kind, const std::string& body, const std::string& expected) {
  REQUIRE(show(decode(kind, body)) == expected);
  CHECK(show(decode(kind, body, 1)) == expected);
  CHECK(show(decode(kind, body, 7)) == expected);
  for (std::size_t cut = 0; cut <= body.size(); ++cut) {
    auto d = keel::llm::make_stream_decoder(kind);
    std::vector<stream_event> out;
    d->feed(std::string_view(body).substr(0, cut), out);
    d->feed(std::string_view(body).substr(cut), out);
    d->finish(out);
    INFO("split at " << cut);
    CHECK(show(out) == expected);
  }
}

// A body cut after any number of bytes ends with the complete body's events up to the cut and
// then a transport error, unless the cut falls after the protocol's end.
void check_every_cut(provider_kind kind, const std::string& body) {
  const std::vector<stream_event> full = decode(kind, body);
  REQUIRE(full.back().kind == stream_event_kind::done);
  const std::string full_text = show(full);
  int truncated = 0;
  for (std::size_t cut = 0; cut < body.size(); ++cut) {
    const auto got = decode(kind, std::string_view(body).substr(0, cut));
    INFO("cut at " << cut);
    REQUIRE_FALSE(got.empty());
    if (got.back().kind == stream_event_kind::done) {
      // Cut after the protocol's end: only what follows it (Bedrock's metadata) may be missing.
      const std::string got_text = show(got);
      const std::string body_text = got_text.substr(0, got_text.size() - 5);  // without "done\n"
      CHECK(full_text.compare(0, body_text.size(), body_text) == 0);
      CHECK(got_text.find("finish") != std::string::npos);
      continue;
    }
    ++truncated;
    REQUIRE(got.back().kind == stream_event_kind::error);
    CHECK(got.back().error->llm_code() == errc::transport);
    CHECK(got.back().error->code() == keel::condition::transient);
    std::vector<stream_event> before(got.begin(), got.end() - 1);
    CHECK(full_text.compare(0, show(before).size(), show(before)) == 0);
  }
  CHECK(truncated > static_cast<int>(body.size()) / 2);
}

std::string openai_chunk(const std::string& choices, const std::string& usage = "null") {
  return "data: {\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":"
         "1733000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\","
         "\"choices\":" +
         choices + ",\"usage\":" + usage + "}\n\n";
}

std::string openai_delta(const std::string& delta, const std::string& finish = "null") {
  return openai_chunk("[{\"index\":0,\"delta\":" + delta +
                      ",\"logprobs\":null,\"finish_reason\":" + finish + "}]");
}

// A chat completions stream with stream_options.include_usage, as api.openai.com sends it.
const std::string openai_body =
    openai_delta(R"({"role":"assistant","content":"","refusal":null})") +
    openai_delta(R"({"content":"Hello"})") + ": keep-alive\n\n" +
    openai_delta(R"({"content":" world"})") + openai_delta("{}", "\"stop\"") +
    openai_chunk("[]", R"({"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,)"
                       R"("prompt_tokens_details":{"cached_tokens":0}})") +
    "data: [DONE]\n\n";

const std::string openai_expected =
    "start chatcmpl-AbC123 gpt-4o-mini-2024-07-18 assistant\n"
    "text Hello\n"
    "text  world\n"
    "finish stop\n"
    "usage 9/2\n"
    "done\n";

std::string anthropic_event(const std::string& name, const std::string& data) {
  return "event: " + name + "\ndata: " + data + "\n\n";
}

// A messages stream as the Anthropic docs show it ("Streaming Messages", basic request).
const std::string anthropic_body =
    anthropic_event(
        "message_start",
        R"({"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",)"
        R"("type":"message","role":"assistant","content":[],"model":"claude-3-5-sonnet-20241022",)"
        R"("stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}})") +
    anthropic_event(
        "content_block_start",
        R"({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}})") +
    anthropic_event("ping", R"({"type": "ping"})") +
    anthropic_event(
        "content_block_delta",
        R"({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}})") +
    anthropic_event(
        "content_block_delta",
        R"({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"!"}})") +
    anthropic_event("content_block_stop", R"({"type":"content_block_stop","index":0})") +
    anthropic_event(
        "message_delta",
        R"({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},)"
        R"("usage":{"output_tokens":15}})") +
    anthropic_event("message_stop", R"({"type":"message_stop"})");

const std::string anthropic_expected =
    "start msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY claude-3-5-sonnet-20241022 assistant\n"
    "usage 25/1\n"
    "text Hello\n"
    "text !\n"
    "finish end_turn\n"
    "usage 25/15\n"
    "done\n";

std::string bedrock_event(const std::string& type, const std::string& payload) {
  return keel::llm::encode_event_stream_message(
      {event_stream_header(":event-type", event_stream_header_type::string, type),
       event_stream_header(":content-type", event_stream_header_type::string, "application/json"),
       event_stream_header(":message-type", event_stream_header_type::string, "event")},
      payload);
}

std::string bedrock_exception(const std::string& type, const std::string& message) {
  return keel::llm::encode_event_stream_message(
      {event_stream_header(":exception-type", event_stream_header_type::string, type),
       event_stream_header(":content-type", event_stream_header_type::string, "application/json"),
       event_stream_header(":message-type", event_stream_header_type::string, "exception")},
      "{\"message\":\"" + message + "\"}");
}

// A ConverseStream body (the "p" fields are Bedrock's padding against length side channels).
const std::string bedrock_body =
    bedrock_event("messageStart",
                  R"({"p":"abcdefghijklmnopqrstuvwxyzABCDEFGHIJ","role":"assistant"})") +
    bedrock_event("contentBlockDelta",
                  R"({"contentBlockIndex":0,"delta":{"text":"Hello"},"p":"abcd"})") +
    bedrock_event("contentBlockDelta",
                  R"({"contentBlockIndex":0,"delta":{"text":" there"},"p":"ab"})") +
    bedrock_event("contentBlockStop", R"({"contentBlockIndex":0,"p":"abcdefgh"})") +
    bedrock_event("messageStop", R"({"p":"abcdefghijklmn","stopReason":"end_turn"})") +
    bedrock_event(
        "metadata",
        R"({"metrics":{"latencyMs":420},"p":"abc","usage":{"inputTokens":12,"outputTokens":5,"totalTokens":17}})");

const std::string bedrock_expected =
    "start   assistant\n"
    "text Hello\n"
    "text  there\n"
    "finish end_turn\n"
    "usage 12/5\n"
    "done\n";

}  // namespace

TEST_CASE("openai stream decodes deltas, finish reason and the usage chunk, split anywhere",
          "[llm][stream]") {
  check_every_split(provider_kind::openai, openai_body, openai_expected);
  std::string crlf;
  for (char c : openai_body) {
    crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
  }
  check_every_split(provider_kind::openai, crlf, openai_expected);
}

TEST_CASE("anthropic stream decodes message_start to message_stop, split anywhere",
          "[llm][stream]") {
  check_every_split(provider_kind::anthropic, anthropic_body, anthropic_expected);
}

TEST_CASE("bedrock stream decodes ConverseStream events, split anywhere", "[llm][stream]") {
  check_every_split(provider_kind::bedrock, bedrock_body, bedrock_expected);
}

TEST_CASE("a stream cut at any byte is a transport error after the events before the cut",
          "[llm][stream]") {
  check_every_cut(provider_kind::openai, openai_body);
  check_every_cut(provider_kind::anthropic, anthropic_body);
  check_every_cut(provider_kind::bedrock, bedrock_body);
}

TEST_CASE("finish names how a stream was cut short", "[llm][stream]") {
  auto last_message = [](provider_kind k, std::string_view body) {
    return decode(k, body).back().error->message();
  };
  CHECK(last_message(provider_kind::openai, openai_body.substr(0, openai_body.size() - 16)) ==
        "the stream ended before data: [DONE]");
  CHECK(last_message(provider_kind::anthropic, anthropic_body.substr(0, 100)) ==
        "the stream ended before message_stop");
  CHECK(last_message(provider_kind::bedrock, bedrock_body.substr(0, bedrock_body.size() - 1)) ==
        "the stream ended inside an event-stream message");
  CHECK(last_message(provider_kind::bedrock, bedrock_body.substr(0, 100)) ==
        "the stream ended inside an event-stream message");
  const std::string no_stop = bedrock_event("messageStart", R"({"role":"assistant"})");
  CHECK(last_message(provider_kind::bedrock, no_stop) == "the stream ended before messageStop");
  // An empty body is cut short too.
  CHECK(decode(provider_kind::openai, "").back().error->llm_code() == errc::transport);
}

TEST_CASE("a server that omits the blank line after data: [DONE] is not truncated",
          "[llm][stream]") {
  const std::string body = openai_body.substr(0, openai_body.size() - 1);
  CHECK(show(decode(provider_kind::openai, body)) == openai_expected);
}

TEST_CASE("an Azure content-filter chunk first does not hide the model that answers",
          "[llm][stream][review]") {
  const std::string body =
      R"(data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0}]})"
      "\n\n"
      R"(data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"}}],"id":"c1","model":"gpt-4o-2024-08-06"})"
      "\n\ndata: [DONE]\n\n";
  const auto events = decode(provider_kind::openai, body);
  REQUIRE(events.size() >= 2);
  CHECK(events[0].kind == keel::llm::stream_event_kind::start);
  CHECK(events[0].model == "gpt-4o-2024-08-06");
  CHECK(events[0].id == "c1");
  CHECK(events[1].text == "hi");
  CHECK(std::count_if(events.begin(), events.end(), [](const stream_event& e) {
          return e.kind == keel::llm::stream_event_kind::start;
        }) == 1);
}

TEST_CASE("openai error payload mid-stream is classified", "[llm][stream]") {
  const std::string prefix = openai_delta(R"({"role":"assistant","content":"Hi"})");
  auto error_after = [&](const std::string& err) {
    const auto events = decode(provider_kind::openai, prefix + "data: " + err + "\n\n" +
                                                          openai_delta(R"({"content":"ignored"})"));
    REQUIRE(events.size() == 3);  // start, text, error; nothing after the error
    CHECK(events[1].text == "Hi");
    REQUIRE(events[2].kind == stream_event_kind::error);
    return *events[2].error;
  };
  const auto server = error_after(
      R"({"error":{"message":"The server had an error while processing your request. Sorry about that!",)"
      R"("type":"server_error","param":null,"code":null}})");
  CHECK(server.llm_code() == errc::server_error);
  CHECK(server.code() == keel::condition::transient);
  CHECK(server.provider() == "openai");
  CHECK(server.provider_code() == "server_error");
  CHECK(server.status() == 200);
  CHECK(server.message().find("Sorry about that") != std::string::npos);

  CHECK(error_after(
            R"j({"error":{"message":"Rate limit reached for gpt-4o-mini on tokens per min (TPM)",)j"
            R"("type":"tokens","code":"rate_limit_exceeded"}})")
            .llm_code() == errc::rate_limited);
  CHECK(error_after(R"({"error":{"message":"You exceeded your current quota",)"
                    R"("type":"insufficient_quota","code":"insufficient_quota"}})")
            .llm_code() == errc::quota_exhausted);
  CHECK(error_after(R"({"error":{"message":"bad","type":"invalid_request_error","code":null}})")
            .llm_code() == errc::bad_request);
}

TEST_CASE("anthropic error events are classified like the HTTP errors", "[llm][stream]") {
  const std::string start = anthropic_body.substr(0, anthropic_body.find("event: ping"));
  auto error_of = [&](const std::string& type) {
    const auto events =
        decode(provider_kind::anthropic,
               start + anthropic_event("error", R"({"type": "error", "error": {"type": ")" + type +
                                                    R"(", "message": "Overloaded"}})"));
    REQUIRE(events.back().kind == stream_event_kind::error);
    CHECK(events.back().error->provider() == "anthropic");
    CHECK(events.back().error->provider_code() == type);
    CHECK(events.back().error->message() == "Overloaded");
    return events.back().error->llm_code();
  };
  CHECK(error_of("overloaded_error") == errc::overloaded);
  CHECK(error_of("rate_limit_error") == errc::rate_limited);
  CHECK(error_of("api_error") == errc::server_error);
  CHECK(error_of("timeout_error") == errc::timeout);
  CHECK(error_of("invalid_request_error") == errc::bad_request);
  CHECK(error_of("something_new") == errc::server_error);

  const auto events = decode(
      provider_kind::anthropic,
      start +
          anthropic_event(
              "error",
              R"({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})"));
  CHECK(show(events) ==
        "start msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY claude-3-5-sonnet-20241022 assistant\n"
        "usage 25/1\n"
        "error overloaded overloaded_error\n");
  CHECK(events.back().error->code() == keel::condition::transient);
}

TEST_CASE("bedrock exception events are classified like the HTTP errors", "[llm][stream]") {
  const std::string start = bedrock_event("messageStart", R"({"role":"assistant"})") +
                            bedrock_event("contentBlockDelta", R"({"delta":{"text":"Hi"}})");
  auto error_of = [&](const std::string& type) {
    keel::llm::stream_options opts;
    opts.request_id = "req-123";
    const auto events = decode(provider_kind::bedrock,
                               start + bedrock_exception(type, "Too many requests"), 0, opts);
    REQUIRE(events.size() == 3);
    REQUIRE(events.back().kind == stream_event_kind::error);
    CHECK(events.back().error->provider() == "bedrock");
    CHECK(events.back().error->provider_code() == type);
    CHECK(events.back().error->message() == "Too many requests");
    CHECK(events.back().error->request_id() == "req-123");
    return events.back().error->llm_code();
  };
  CHECK(error_of("throttlingException") == errc::rate_limited);
  CHECK(error_of("modelStreamErrorException") == errc::server_error);
  CHECK(error_of("internalServerException") == errc::server_error);
  CHECK(error_of("serviceUnavailableException") == errc::overloaded);
  CHECK(error_of("validationException") == errc::bad_request);
  CHECK(error_of("somethingNewException") == errc::server_error);

  // The event-stream "error" message type carries its code in headers.
  const std::string err = keel::llm::encode_event_stream_message(
      {event_stream_header(":message-type", event_stream_header_type::string, "error"),
       event_stream_header(":error-code", event_stream_header_type::string, "ThrottlingException"),
       event_stream_header(":error-message", event_stream_header_type::string, "slow down")},
      "");
  const auto events = decode(provider_kind::bedrock, start + err);
  REQUIRE(events.back().kind == stream_event_kind::error);
  CHECK(events.back().error->llm_code() == errc::rate_limited);
  CHECK(events.back().error->message() == "slow down");
}

TEST_CASE("bad frames are malformed_response errors", "[llm][stream]") {
  auto only_error = [](provider_kind k, const std::string& body, keel::llm::stream_options o = {}) {
    const auto events = decode(k, body, 0, o);
    REQUIRE_FALSE(events.empty());
    REQUIRE(events.back().kind == stream_event_kind::error);
    CHECK(events.back().error->llm_code() == errc::malformed_response);
    CHECK(events.back().error->code() == keel::condition::permanent);
    return events.back().error->message();
  };
  std::string bad_crc = bedrock_body;
  bad_crc[bad_crc.size() - 1] = static_cast<char>(bad_crc.back() ^ 0x01);
  CHECK(only_error(provider_kind::bedrock, bad_crc).find("message CRC mismatch") !=
        std::string::npos);
  std::string bad_prelude = bedrock_body;
  bad_prelude[10] = static_cast<char>(bad_prelude[10] ^ 0x01);
  CHECK(only_error(provider_kind::bedrock, bad_prelude).find("prelude CRC mismatch") !=
        std::string::npos);
  CHECK(only_error(provider_kind::bedrock, bedrock_event("contentBlockDelta", "{not json"))
            .find("payload is not valid JSON") != std::string::npos);
  CHECK(only_error(provider_kind::bedrock,
                   bedrock_event("contentBlockDelta", R"({"delta":{"text":42}})")) ==
        "contentBlockDelta: delta.text is not a string");
  CHECK(only_error(provider_kind::bedrock, keel::llm::encode_event_stream_message({}, "{}")) ==
        "event-stream message without a known :message-type");

  keel::llm::stream_options small;
  small.max_message_bytes = 64;
  CHECK(only_error(provider_kind::bedrock, bedrock_body, small).find("exceeds the limit of 64") !=
        std::string::npos);
  small.max_event_bytes = 64;
  CHECK(only_error(provider_kind::openai, openai_body, small).find("longer than 64") !=
        std::string::npos);
  CHECK(only_error(provider_kind::anthropic, anthropic_body, small).find("longer than 64") !=
        std::string::npos);

  CHECK(only_error(provider_kind::openai, "data: {\"choices\":\n\n") ==
        "stream data is not valid JSON");
  CHECK(only_error(provider_kind::openai, "data: [1,2]\n\n") == "stream data is not a JSON object");
  CHECK(only_error(provider_kind::openai, "data: " + std::string(200, '[') + "\n\n") ==
        "stream data nests deeper than 128 levels");
  CHECK(only_error(provider_kind::openai, openai_delta(R"({"content":7})")) ==
        "stream chunk: choices[0].delta.content is not a string");
  CHECK(only_error(provider_kind::openai, openai_chunk("[]", R"({"prompt_tokens":-1})")) ==
        "stream chunk: usage counts are not non-negative integers");
  CHECK(only_error(
            provider_kind::anthropic,
            anthropic_event("content_block_delta",
                            R"({"type":"content_block_delta","delta":{"type":"text_delta"}})")) ==
        "content_block_delta: delta.text is not a string");
  CHECK(only_error(provider_kind::anthropic, "event: message_start\ndata: oops\n\n") ==
        "event message_start data is not valid JSON");
}

TEST_CASE("refusals end the stream with content_filtered, as parse_response does",
          "[llm][stream]") {
  auto last_two = [](provider_kind k, const std::string& body) {
    const auto events = decode(k, body);
    REQUIRE(events.size() >= 2);
    CHECK(events.back().error->code() == keel::condition::permanent);
    return show({events.end() - 2, events.end()});
  };
  CHECK(last_two(provider_kind::openai, openai_delta(R"({"content":"I"})", "\"content_filter\"")) ==
        "finish content_filter\nerror content_filtered content_filter\n");
  CHECK(last_two(provider_kind::openai, openai_delta(R"({"refusal":"I can't help with that."})")) ==
        "start chatcmpl-AbC123 gpt-4o-mini-2024-07-18 assistant\n"
        "error content_filtered refusal\n");
  CHECK(
      last_two(
          provider_kind::anthropic,
          anthropic_event(
              "message_delta",
              R"({"type":"message_delta","delta":{"stop_reason":"refusal"},"usage":{"output_tokens":3}})")) ==
      "usage 0/3\nerror content_filtered refusal\n");
  CHECK(last_two(provider_kind::bedrock,
                 bedrock_event("messageStop", R"({"stopReason":"guardrail_intervened"})")) ==
        "finish guardrail_intervened\nerror content_filtered guardrail_intervened\n");
}

TEST_CASE("bytes after the end or after an error are ignored", "[llm][stream]") {
  auto d = keel::llm::make_stream_decoder(provider_kind::openai);
  std::vector<stream_event> out;
  d->feed(openai_body, out);
  REQUIRE(out.back().kind == stream_event_kind::done);
  CHECK(d->ended());
  const std::size_t n = out.size();
  d->feed(openai_delta(R"({"content":"late"})") + std::string(10 << 20, 'x'), out);
  d->finish(out);
  CHECK(out.size() == n);

  auto b = keel::llm::make_stream_decoder(provider_kind::bedrock);
  std::vector<stream_event> bout;
  b->feed(bedrock_exception("throttlingException", "x") + bedrock_body, bout);
  b->finish(bout);
  REQUIRE(bout.size() == 1);
  CHECK(bout[0].error->llm_code() == errc::rate_limited);
}

TEST_CASE("only the first choice is decoded; tool calls become tool_call events", "[llm][stream]") {
  const std::string body =
      openai_chunk(R"([{"index":1,"delta":{"content":"other"},"finish_reason":null},)"
                   R"({"index":0,"delta":{"content":"mine"},"finish_reason":null}])") +
      "data: [DONE]\n\n";
  CHECK(show(decode(provider_kind::openai, body)) ==
        "start chatcmpl-AbC123 gpt-4o-mini-2024-07-18 assistant\ntext mine\ndone\n");
  const std::string tools =
      anthropic_event(
          "content_block_start",
          R"({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}})") +
      anthropic_event(
          "content_block_delta",
          R"({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\""}})") +
      anthropic_event("some_future_event", R"({"type":"some_future_event"})") +
      anthropic_event("message_stop", R"({"type":"message_stop"})");
  CHECK(show(decode(provider_kind::anthropic, tools)) ==
        "tool_call 0 t f \ntool_call 0   {\"a\"\ndone\n");
}

// The streams of a reply that calls a tool, in each provider's documented shape (OpenAI's
// "function calling" streaming example, Anthropic's "streaming with tool use", Bedrock's
// ConverseStream toolUse blocks): the same tool_call events, split anywhere.
TEST_CASE("tool calls stream as tool_call events from all three providers, split anywhere",
          "[llm][stream][tools]") {
  const std::string openai =
      openai_delta(R"({"role":"assistant","content":null})") +
      openai_delta(
          R"({"tool_calls":[{"index":0,"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":""}}]})") +
      openai_delta(R"({"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]})") +
      openai_delta(R"({"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]})") +
      openai_delta(
          R"({"tool_calls":[{"index":1,"id":"call_def","type":"function","function":{"name":"get_time","arguments":"{}"}}]})") +
      openai_delta("{}", "\"tool_calls\"") + "data: [DONE]\n\n";
  check_every_split(provider_kind::openai, openai,
                    "start chatcmpl-AbC123 gpt-4o-mini-2024-07-18 assistant\n"
                    "tool_call 0 call_abc get_weather \n"
                    "tool_call 0   {\"ci\n"
                    "tool_call 0   ty\":\"Paris\"}\n"
                    "tool_call 1 call_def get_time {}\n"
                    "finish tool_calls\n"
                    "done\n");

  const std::string anthropic =
      anthropic_event(
          "message_start",
          R"({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"usage":{"input_tokens":472,"output_tokens":2}}})") +
      anthropic_event(
          "content_block_start",
          R"({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}})") +
      anthropic_event(
          "content_block_delta",
          R"({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me check."}})") +
      anthropic_event("content_block_stop", R"({"type":"content_block_stop","index":0})") +
      anthropic_event(
          "content_block_start",
          R"({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01","name":"get_weather","input":{}}})") +
      anthropic_event(
          "content_block_delta",
          R"({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}})") +
      anthropic_event(
          "content_block_delta",
          R"({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Paris\"}"}})") +
      anthropic_event("content_block_stop", R"({"type":"content_block_stop","index":1})") +
      anthropic_event(
          "message_delta",
          R"({"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}})") +
      anthropic_event("message_stop", R"({"type":"message_stop"})");
  check_every_split(provider_kind::anthropic, anthropic,
                    "start msg_1 claude-x assistant\n"
                    "usage 472/2\n"
                    "text Let me check.\n"
                    "tool_call 0 toolu_01 get_weather \n"
                    "tool_call 0   {\"city\": \"Paris\"}\n"
                    "finish tool_use\n"
                    "usage 472/89\n"
                    "done\n");

  const std::string bedrock =
      bedrock_event("messageStart", R"({"role":"assistant"})") +
      bedrock_event(
          "contentBlockStart",
          R"({"contentBlockIndex":0,"start":{"toolUse":{"toolUseId":"tooluse_1","name":"get_weather"}}})") +
      bedrock_event("contentBlockDelta",
                    R"({"contentBlockIndex":0,"delta":{"toolUse":{"input":"{\"city\""}}})") +
      bedrock_event("contentBlockDelta",
                    R"({"contentBlockIndex":0,"delta":{"toolUse":{"input":":\"Paris\"}"}}})") +
      bedrock_event("contentBlockStop", R"({"contentBlockIndex":0})") +
      bedrock_event("messageStop", R"({"stopReason":"tool_use"})") +
      bedrock_event("metadata", R"({"usage":{"inputTokens":10,"outputTokens":5}})");
  check_every_split(provider_kind::bedrock, bedrock,
                    "start   assistant\n"
                    "tool_call 0 tooluse_1 get_weather \n"
                    "tool_call 0   {\"city\"\n"
                    "tool_call 0   :\"Paris\"}\n"
                    "finish tool_use\n"
                    "usage 10/5\n"
                    "done\n");
}

TEST_CASE("tool calls are numbered densely, and one with no arguments gets {}",
          "[llm][stream][tools]") {
  // OpenAI-compatible servers may number calls sparsely: keel numbers them in order.
  const std::string openai =
      openai_delta(
          R"({"tool_calls":[{"index":5,"id":"a","type":"function","function":{"name":"f","arguments":"{}"}}]})") +
      openai_delta(
          R"({"tool_calls":[{"index":9,"id":"b","type":"function","function":{"name":"g","arguments":""}}]})") +
      openai_delta(R"({"tool_calls":[{"index":5,"function":{"arguments":" "}}]})") +
      "data: [DONE]\n\n";
  CHECK(show(decode(provider_kind::openai, openai)) ==
        "start chatcmpl-AbC123 gpt-4o-mini-2024-07-18 assistant\n"
        "tool_call 0 a f {}\ntool_call 1 b g \ntool_call 0    \ndone\n");
  // Anthropic streams an empty partial_json for a tool without input; Bedrock no input at all.
  const std::string anthropic =
      anthropic_event(
          "content_block_start",
          R"({"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"now","input":{}}})") +
      anthropic_event(
          "content_block_delta",
          R"({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":""}})") +
      anthropic_event("content_block_stop", R"({"type":"content_block_stop","index":0})") +
      anthropic_event("message_stop", R"({"type":"message_stop"})");
  check_every_split(provider_kind::anthropic, anthropic,
                    "tool_call 0 t now \ntool_call 0   {}\ndone\n");
  const std::string bedrock =
      bedrock_event("messageStart", R"({"role":"assistant"})") +
      bedrock_event(
          "contentBlockStart",
          R"({"contentBlockIndex":0,"start":{"toolUse":{"toolUseId":"u","name":"now"}}})") +
      bedrock_event("contentBlockStop", R"({"contentBlockIndex":0})") +
      bedrock_event("messageStop", R"({"stopReason":"tool_use"})");
  check_every_split(provider_kind::bedrock, bedrock,
                    "start   assistant\ntool_call 0 u now \ntool_call 0   {}\n"
                    "finish tool_use\ndone\n");
}

TEST_CASE("malformed tool-call pieces are malformed_response errors", "[llm][stream][tools]") {
  // An OpenAI piece without an index, an argument delta for a block that is no tool use, a
  // Bedrock toolUse delta before its block started.
  const auto last = [](provider_kind kind, const std::string& body) {
    const auto events = decode(kind, body);
    REQUIRE_FALSE(events.empty());
    REQUIRE(events.back().kind == stream_event_kind::error);
    return events.back().error->llm_code();
  };
  CHECK(last(provider_kind::openai,
             openai_delta(R"({"tool_calls":[{"id":"c","function":{"name":"f"}}]})")) ==
        errc::malformed_response);

  CHECK(
      last(
          provider_kind::anthropic,
          anthropic_event(
              "content_block_delta",
              R"({"type":"content_block_delta","index":3,"delta":{"type":"input_json_delta","partial_json":"{}"}})")) ==
      errc::malformed_response);
  CHECK(last(provider_kind::bedrock,
             bedrock_event("messageStart", R"({"role":"assistant"})") +
                 bedrock_event("contentBlockDelta",
                               R"({"contentBlockIndex":0,"delta":{"toolUse":{"input":"{}"}}})")) ==
        errc::malformed_response);
}

TEST_CASE("bedrock detects a corrupted byte anywhere in the body", "[llm][stream]") {
  // CRC32 catches every burst of up to 32 bits, so no single changed byte may go unnoticed:
  // each one ends the stream with malformed_response (a CRC mismatch) instead of done.
  for (std::size_t at = 0; at < bedrock_body.size(); ++at) {
    std::string body = bedrock_body;
    body[at] = static_cast<char>(body[at] ^ 0x5A);
    const auto events = decode(provider_kind::bedrock, body);
    INFO("byte " << at);
    REQUIRE(events.back().kind == stream_event_kind::error);
    CHECK(events.back().error->llm_code() == errc::malformed_response);
    CHECK(events.back().error->message().find("CRC mismatch") != std::string::npos);
  }
}

TEST_CASE("stream_scrubber replaces a secret split across pieces and holds back only a prefix",
          "[llm][stream][scrub]") {
  const std::vector<std::string> secrets{"sk-SECRET1234", "AKIAEXAMPLEKEY"};
  const std::string text = "a sk-SECRET1234 b sk-SEC c AKIAEXAMPLEKEY d s";
  const std::string want = "a <x> b sk-SEC c <x> d s";
  // Every split of the text into pieces of size n gives the same output.
  for (std::size_t n = 1; n <= text.size(); ++n) {
    INFO("pieces of " << n);
    keel::llm::stream_scrubber s(secrets, "<x>");
    std::string out;
    for (std::size_t at = 0; at < text.size(); at += n) {
      s.feed(std::string_view(text).substr(at, n), out);
      CHECK(out.find("sk-SECRET1234") == std::string::npos);
      CHECK(out.find("AKIAEXAMPLEKEY") == std::string::npos);
    }
    s.finish(out);
    CHECK(out == want);
  }
  // Text that cannot begin a secret is handed out at once.
  keel::llm::stream_scrubber s(secrets, "<x>");
  std::string out;
  s.feed("hello world", out);
  CHECK(out == "hello world");
  s.feed(" ask", out);  // "sk" might begin a secret
  CHECK(out == "hello world a");
  s.feed("ed", out);
  CHECK(out == "hello world asked");
}

TEST_CASE("a streamed call of the answer tool is the reply's text",
          "[llm][stream][response_format]") {
  const std::string anthropic =
      anthropic_event(
          "message_start",
          R"({"type":"message_start","message":{"id":"msg_1","role":"assistant","model":"claude-x","content":[],"usage":{"input_tokens":4,"output_tokens":1}}})") +
      anthropic_event(
          "content_block_start",
          R"({"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_01","name":"keel_response_format","input":{}}})") +
      anthropic_event(
          "content_block_delta",
          R"({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"city\": "}})") +
      anthropic_event(
          "content_block_delta",
          R"({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"\"Paris\"}"}})") +
      anthropic_event("content_block_stop", R"({"type":"content_block_stop","index":0})") +
      anthropic_event(
          "message_delta",
          R"({"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}})") +
      anthropic_event("message_stop", R"({"type":"message_stop"})");
  check_every_split(provider_kind::anthropic, anthropic,
                    "start msg_1 claude-x assistant\n"
                    "usage 4/1\n"
                    "text {\"city\": \n"
                    "text \"Paris\"}\n"
                    "finish end_turn\n"
                    "usage 4/9\n"
                    "done\n");

  // Bedrock: an answer with no input is "{}"; a real call beside it keeps finish tool_use.
  const std::string bedrock =
      bedrock_event("messageStart", R"({"role":"assistant"})") +
      bedrock_event(
          "contentBlockStart",
          R"({"contentBlockIndex":0,"start":{"toolUse":{"toolUseId":"t0","name":"get_time"}}})") +
      bedrock_event("contentBlockStop", R"({"contentBlockIndex":0})") +
      bedrock_event(
          "contentBlockStart",
          R"({"contentBlockIndex":1,"start":{"toolUse":{"toolUseId":"t1","name":"keel_response_format"}}})") +
      bedrock_event("contentBlockStop", R"({"contentBlockIndex":1})") +
      bedrock_event("messageStop", R"({"stopReason":"tool_use"})") +
      bedrock_event("metadata", R"({"usage":{"inputTokens":10,"outputTokens":5}})");
  check_every_split(provider_kind::bedrock, bedrock,
                    "start   assistant\n"
                    "tool_call 0 t0 get_time \n"
                    "tool_call 0   {}\n"
                    "text {}\n"
                    "finish tool_use\n"
                    "usage 10/5\n"
                    "done\n");
  // OpenAI's stream is never unwrapped: a tool of that name there is the caller's.
  const std::string openai =
      openai_delta(
          R"({"tool_calls":[{"index":0,"id":"a","type":"function","function":{"name":"keel_response_format","arguments":"{}"}}]})") +
      "data: [DONE]\n\n";
  CHECK(show(decode(provider_kind::openai, openai)).find("tool_call 0 a keel_response_format") !=
        std::string::npos);
}
