// Tests for the streaming side of keel/testing/mock_llm_server.hpp: the three stream formats as
// keel's decoders read them, one HTTP chunk per event, pacing, and every mid-stream fault.
#include <keel/llm/event_stream.hpp>
#include <keel/llm/stream.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include "mock_support.hpp"

#include <chrono>
#include <functional>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using json = nlohmann::json;
using keel::llm::errc;
using keel::llm::provider_kind;
using keel::llm::stream_event;
using keel::llm::stream_event_kind;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel::testing::mock_llm_server;
using keel::testing::mock_options;
using keel::testing::stream_settings;
using namespace std::chrono_literals;
using ms = std::chrono::milliseconds;
using steady = std::chrono::steady_clock;

const std::string prompt = "Stream me something, please.";
// The mock's reply to `prompt` ("mock answer to: " + its first 40 bytes): 44 bytes, 11 chunks of 4.
const std::string reply_text = "mock answer to: " + prompt;
constexpr std::size_t reply_chunks = 11;

struct call {
  std::string target;
  std::string body;
};

// A streaming request in `kind`'s wire format.
call stream_call(provider_kind kind, const std::string& model, bool include_usage = true,
                 bool stream = true) {
  const json messages = json::array({{{"role", "user"}, {"content", prompt}}});
  switch (kind) {
    case provider_kind::openai: {
      json body{{"model", model}, {"messages", messages}, {"stream", stream}};
      if (include_usage) {
        body["stream_options"] = {{"include_usage", true}};
      }
      return {"/v1/chat/completions", body.dump()};
    }
    case provider_kind::anthropic:
      return {"/v1/messages",
              json{{"model", model}, {"max_tokens", 64}, {"messages", messages}, {"stream", stream}}
                  .dump()};
    case provider_kind::bedrock:
      break;
  }
  return {"/model/" + model + (stream ? "/converse-stream" : "/converse"),
          json{{"messages",
                json::array({{{"role", "user"}, {"content", json::array({{{"text", prompt}}})}}})}}
              .dump()};
}

// What the client saw of a (possibly streamed) response.
struct streamed {
  boost::system::error_code ec;
  int status = 0;
  std::string content_type;
  std::string body;                         // the whole body as received
  std::vector<std::string> chunks;          // HTTP chunks, in order (empty for a non-chunked body)
  std::vector<steady::time_point> arrived;  // when each chunk's header was parsed
};

// Sends `c` and reads the response, recording the HTTP chunks as they arrive.
asio::awaitable<streamed> post_stream(unsigned short port, call c, ms timeout = 2s) {
  beast::tcp_stream stream(co_await asio::this_coro::executor);
  co_await stream.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                                asio::use_awaitable);
  bhttp::request<bhttp::string_body> req{bhttp::verb::post, c.target, 11};
  req.set(bhttp::field::host, "127.0.0.1");
  req.set(bhttp::field::content_type, "application/json");
  req.body() = std::move(c.body);
  req.prepare_payload();
  stream.expires_after(timeout);
  streamed out;
  auto [wec, wn] = co_await bhttp::async_write(stream, req, asio::as_tuple(asio::use_awaitable));
  if (wec) {
    out.ec = wec;
    co_return out;
  }
  bhttp::response_parser<bhttp::string_body> parser;
  auto on_header = [&out](std::uint64_t size, beast::string_view, boost::system::error_code&) {
    if (size > 0) {
      out.chunks.emplace_back();
      out.arrived.push_back(steady::now());
    }
  };
  auto on_body = [&out](std::uint64_t, beast::string_view data, boost::system::error_code&) {
    out.chunks.back().append(data.data(), data.size());
    out.body.append(data.data(), data.size());
    return data.size();
  };
  parser.on_chunk_header(on_header);
  parser.on_chunk_body(on_body);
  beast::flat_buffer buffer;
  auto [rec, rn] =
      co_await bhttp::async_read(stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
  out.ec = rec;
  if (parser.is_header_done()) {
    out.status = static_cast<int>(parser.get().result_int());
    out.content_type = std::string(parser.get()[bhttp::field::content_type]);
    if (!parser.chunked()) {
      out.body = parser.get().body();
    }
  }
  co_return out;
}

// Runs the client coroutine `body` against a started server, then stops the server.
void run(asio::io_context& ctx, mock_llm_server& server,
         std::function<asio::awaitable<void>()> body) {
  keel_test::run_against(ctx, server, std::move(body), 10s);
}

// The decoder's events for `chunks`, fed one HTTP chunk at a time; `finish` ends the body.
std::vector<stream_event> decode(provider_kind kind, const std::vector<std::string>& chunks,
                                 bool finish = true) {
  auto dec = keel::llm::make_stream_decoder(kind);
  std::vector<stream_event> events;
  for (const std::string& chunk : chunks) {
    dec->feed(chunk, events);
  }
  if (finish) {
    dec->finish(events);
  }
  return events;
}

std::size_t count(const std::vector<stream_event>& events, stream_event_kind k) {
  std::size_t n = 0;
  for (const auto& e : events) {
    n += e.kind == k ? 1 : 0;
  }
  return n;
}

std::string text_of(const std::vector<stream_event>& events) {
  std::string out;
  for (const auto& e : events) {
    if (e.kind == stream_event_kind::text) {
      out += e.text;
    }
  }
  return out;
}

// The JSON data of an SSE event (its single `data:` line).
json sse_data(const std::string& event) {
  const auto at = event.find("data: ");
  REQUIRE(at != std::string::npos);
  return json::parse(event.substr(at + 6, event.find('\n', at) - at - 6));
}

std::string sse_name(const std::string& event) {
  if (!event.starts_with("event: ")) {
    return "";
  }
  return event.substr(7, event.find('\n') - 7);
}

// The single event-stream message in `frame`.
keel::llm::event_stream_message frame_message(const std::string& frame) {
  keel::llm::event_stream_decoder dec;
  std::vector<keel::llm::event_stream_message> msgs;
  REQUIRE(dec.feed(frame, msgs));
  REQUIRE(msgs.size() == 1);
  REQUIRE_FALSE(dec.partial());
  return msgs.front();
}

const provider_kind all_providers[] = {provider_kind::openai, provider_kind::anthropic,
                                       provider_kind::bedrock};

}  // namespace

TEST_CASE("mock_llm_server streams each format so that keel's decoders rebuild the reply",
          "[mock_llm_server][stream]") {
  for (provider_kind kind : all_providers) {
    CAPTURE(keel::llm::to_string(kind));
    asio::io_context ctx;
    mock_llm_server server{ctx, mock_options{}};
    streamed got;
    run(ctx, server, [&]() -> asio::awaitable<void> {
      got = co_await post_stream(server.port(), stream_call(kind, "m"));
    });
    REQUIRE_FALSE(got.ec);
    CHECK(got.status == 200);
    CHECK(got.content_type == (kind == provider_kind::bedrock
                                   ? "application/vnd.amazon.eventstream"
                                   : "text/event-stream; charset=utf-8"));
    const std::vector<stream_event> events = decode(kind, got.chunks);
    CHECK(text_of(events) == reply_text);
    CHECK(count(events, stream_event_kind::text) == reply_chunks);
    CHECK(count(events, stream_event_kind::error) == 0);
    REQUIRE(count(events, stream_event_kind::finish) == 1);
    REQUIRE(count(events, stream_event_kind::usage) >= 1);
    REQUIRE_FALSE(events.empty());
    CHECK(events.front().kind == stream_event_kind::start);
    CHECK(events.back().kind == stream_event_kind::done);
    for (const auto& e : events) {
      if (e.kind == stream_event_kind::finish) {
        CHECK(e.finish_reason == (kind == provider_kind::openai ? "stop" : "end_turn"));
      }
    }
    // The last usage event carries the full counts (the mock's estimate: bytes / 4, rounded up).
    const stream_event* usage = nullptr;
    for (const auto& e : events) {
      if (e.kind == stream_event_kind::usage) {
        usage = &e;
      }
    }
    CHECK(usage->usage.input == static_cast<long long>((prompt.size() + 3) / 4));
    CHECK(usage->usage.output == static_cast<long long>(reply_chunks));
    const auto s = server.stats().model("m");
    CHECK(s.streams == 1);
    CHECK(s.status_count(200) == 1);
    CHECK(s.stream_faults == 0);
  }
}

TEST_CASE(
    "mock_llm_server writes each stream event as its own HTTP chunk, in the documented shapes",
    "[mock_llm_server][stream]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  streamed openai;
  streamed openai_no_usage;
  streamed anthropic;
  streamed bedrock;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    openai = co_await post_stream(server.port(), stream_call(provider_kind::openai, "m"));
    openai_no_usage =
        co_await post_stream(server.port(), stream_call(provider_kind::openai, "m", false));
    anthropic = co_await post_stream(server.port(), stream_call(provider_kind::anthropic, "m"));
    bedrock = co_await post_stream(server.port(), stream_call(provider_kind::bedrock, "m"));
  });

  SECTION("openai: role chunk, content chunks, finish_reason chunk, usage chunk, [DONE]") {
    REQUIRE(openai.chunks.size() == 1 + reply_chunks + 3);
    const json first = sse_data(openai.chunks.front());
    CHECK(first["object"] == "chat.completion.chunk");
    CHECK(first["choices"][0]["delta"]["role"] == "assistant");
    CHECK(first["usage"].is_null());
    for (std::size_t i = 1; i <= reply_chunks; ++i) {
      const json c = sse_data(openai.chunks[i]);
      CHECK(c["choices"][0]["delta"]["content"].is_string());
      CHECK(c["choices"][0]["finish_reason"].is_null());
    }
    const json fin = sse_data(openai.chunks[reply_chunks + 1]);
    CHECK(fin["choices"][0]["finish_reason"] == "stop");
    CHECK(fin["choices"][0]["delta"] == json::object());
    const json usage = sse_data(openai.chunks[reply_chunks + 2]);
    CHECK(usage["choices"] == json::array());
    CHECK(usage["usage"]["completion_tokens"] == reply_chunks);
    CHECK(usage["usage"]["total_tokens"] ==
          usage["usage"]["prompt_tokens"].get<int>() + static_cast<int>(reply_chunks));
    CHECK(openai.chunks.back() == "data: [DONE]\n\n");
  }
  SECTION("openai without include_usage: no usage chunk and no usage field") {
    REQUIRE(openai_no_usage.chunks.size() == 1 + reply_chunks + 2);
    CHECK_FALSE(sse_data(openai_no_usage.chunks.front()).contains("usage"));
    const auto events = decode(provider_kind::openai, openai_no_usage.chunks);
    CHECK(count(events, stream_event_kind::usage) == 0);
    CHECK(events.back().kind == stream_event_kind::done);
  }
  SECTION("anthropic: the documented event sequence") {
    std::vector<std::string> names;
    for (const auto& c : anthropic.chunks) {
      names.push_back(sse_name(c));
      CHECK(sse_data(c)["type"] == names.back());
    }
    std::vector<std::string> want{"message_start", "content_block_start", "ping"};
    want.insert(want.end(), reply_chunks, "content_block_delta");
    want.insert(want.end(), {"content_block_stop", "message_delta", "message_stop"});
    CHECK(names == want);
    const json start = sse_data(anthropic.chunks[0]);
    CHECK(start["message"]["role"] == "assistant");
    CHECK(start["message"]["content"] == json::array());
    CHECK(sse_data(anthropic.chunks[3])["delta"]["type"] == "text_delta");
    const json delta = sse_data(anthropic.chunks[anthropic.chunks.size() - 2]);
    CHECK(delta["delta"]["stop_reason"] == "end_turn");
    CHECK(delta["usage"]["output_tokens"] == reply_chunks);
  }
  SECTION("bedrock: one event-stream frame per chunk with the ConverseStream headers") {
    std::vector<std::string> types;
    for (const auto& c : bedrock.chunks) {
      const auto m = frame_message(c);
      CHECK(m.header(":message-type") == "event");
      CHECK(m.header(":content-type") == "application/json");
      types.emplace_back(m.header(":event-type").value_or(""));
    }
    std::vector<std::string> want{"messageStart"};
    want.insert(want.end(), reply_chunks, "contentBlockDelta");
    want.insert(want.end(), {"contentBlockStop", "messageStop", "metadata"});
    CHECK(types == want);
    const json meta = json::parse(frame_message(bedrock.chunks.back()).payload);
    CHECK(meta["usage"]["outputTokens"] == reply_chunks);
    CHECK(meta["metrics"].contains("latencyMs"));
  }
}

TEST_CASE("mock_llm_server paces stream chunks: each text chunk arrives chunk_latency later",
          "[mock_llm_server][stream]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  stream_settings settings;
  settings.chunk_latency = 30ms;
  settings.chunk_bytes = 11;  // 44 bytes: 4 chunks
  server.set_plan("m", fault_plan{}.with_stream(settings));
  streamed got;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    got = co_await post_stream(server.port(), stream_call(provider_kind::bedrock, "m"));
  });
  REQUIRE_FALSE(got.ec);
  REQUIRE(got.chunks.size() == 1 + 4 + 3);
  // Chunk i+1 (the i-th text chunk) is written chunk_latency after chunk i: had the mock
  // buffered the body, the chunks would arrive together.
  for (std::size_t i = 1; i <= 4; ++i) {
    CAPTURE(i);
    CHECK(got.arrived[i] - got.arrived[i - 1] >= 25ms);
  }
  CHECK(text_of(decode(provider_kind::bedrock, got.chunks)) == reply_text);
}

TEST_CASE("mock_llm_server mid-stream faults strike after fault_after_chunks text chunks",
          "[mock_llm_server][stream]") {
  struct expectation {
    fault_kind fault;
    errc code[3];  // openai, anthropic, bedrock
    bool http_complete;
  };
  const expectation cases[] = {
      {fault_kind::stream_drop, {errc::transport, errc::transport, errc::transport}, false},
      {fault_kind::stream_error, {errc::server_error, errc::overloaded, errc::server_error}, true},
      {fault_kind::stream_throttled,
       {errc::rate_limited, errc::rate_limited, errc::rate_limited},
       true},
      {fault_kind::stream_truncated, {errc::transport, errc::transport, errc::transport}, true},
      {fault_kind::stream_corrupt,
       {errc::malformed_response, errc::malformed_response, errc::malformed_response},
       true},
  };
  // k = 0: before any text; 3: mid-reply; 50: past the last text chunk, before the end.
  for (std::size_t k : {std::size_t{0}, std::size_t{3}, std::size_t{50}}) {
    for (const auto& want : cases) {
      for (provider_kind kind : all_providers) {
        CAPTURE(k, keel::testing::to_string(want.fault), keel::llm::to_string(kind));
        asio::io_context ctx;
        mock_llm_server server{ctx, mock_options{}};
        stream_settings settings;
        settings.fault_after_chunks = k;
        server.set_plan("m", fault_plan{}.with_stream(settings).with_script({want.fault}));
        streamed got;
        run(ctx, server, [&]() -> asio::awaitable<void> {
          got = co_await post_stream(server.port(), stream_call(kind, "m"));
        });
        CHECK(got.status == 200);
        if (want.http_complete) {
          CHECK_FALSE(got.ec);
        } else {
          CHECK(got.ec == bhttp::error::partial_message);
        }
        const auto events = decode(kind, got.chunks);
        CHECK(count(events, stream_event_kind::text) == std::min(k, reply_chunks));
        CHECK(count(events, stream_event_kind::done) == 0);
        REQUIRE(count(events, stream_event_kind::error) == 1);
        REQUIRE(events.back().kind == stream_event_kind::error);
        CHECK(events.back().error->llm_code() == want.code[static_cast<std::size_t>(kind)]);
        const auto s = server.stats().model("m");
        CHECK(s.streams == 1);
        CHECK(s.stream_faults == 1);
      }
    }
  }
}

TEST_CASE("mock_llm_server stream_stall sends k chunks then nothing until the client gives up",
          "[mock_llm_server][stream]") {
  for (provider_kind kind : all_providers) {
    CAPTURE(keel::llm::to_string(kind));
    asio::io_context ctx;
    mock_llm_server server{ctx, mock_options{}};
    stream_settings settings;
    settings.fault_after_chunks = 2;
    server.set_plan("m",
                    fault_plan{}.with_stream(settings).with_script({fault_kind::stream_stall}));
    streamed got;
    streamed next;
    run(ctx, server, [&]() -> asio::awaitable<void> {
      got = co_await post_stream(server.port(), stream_call(kind, "m"), 150ms);
      next = co_await post_stream(server.port(), stream_call(kind, "m"));
    });
    CHECK(got.ec == beast::error::timeout);
    const auto events = decode(kind, got.chunks, /*finish=*/false);
    CHECK(count(events, stream_event_kind::text) == 2);
    CHECK(count(events, stream_event_kind::error) == 0);
    CHECK(count(events, stream_event_kind::done) == 0);
    // The script is consumed: the next stream is whole.
    CHECK(text_of(decode(kind, next.chunks)) == reply_text);
    CHECK(server.stats().model("m").stream_faults == 1);
  }
}

TEST_CASE("mock_llm_server answers pre-stream faults of a streaming request as plain JSON errors",
          "[mock_llm_server][stream]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  server.set_plan("m", fault_plan{}.with_script(
                           {fault_kind::overloaded, fault_kind::rate_limit, fault_kind::ok}));
  server.set_plan("b", fault_plan{}.with_script({fault_kind::throttling}));
  streamed overloaded;
  streamed limited;
  streamed ok;
  streamed throttled;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    overloaded = co_await post_stream(server.port(), stream_call(provider_kind::anthropic, "m"));
    limited = co_await post_stream(server.port(), stream_call(provider_kind::anthropic, "m"));
    ok = co_await post_stream(server.port(), stream_call(provider_kind::anthropic, "m"));
    throttled = co_await post_stream(server.port(), stream_call(provider_kind::bedrock, "b"));
  });
  CHECK(overloaded.status == 529);
  CHECK(overloaded.content_type == "application/json");
  CHECK(overloaded.chunks.empty());
  CHECK(json::parse(overloaded.body)["error"]["type"] == "overloaded_error");
  CHECK(limited.status == 429);
  CHECK(json::parse(limited.body)["error"]["type"] == "rate_limit_error");
  CHECK(ok.status == 200);
  CHECK(text_of(decode(provider_kind::anthropic, ok.chunks)) == reply_text);
  CHECK(throttled.status == 429);
  CHECK(throttled.content_type == "application/json");
  CHECK(server.stats().total.streams == 1);
}

TEST_CASE("mock_llm_server answers a non-streaming request whole even under a stream fault",
          "[mock_llm_server][stream]") {
  for (provider_kind kind : all_providers) {
    CAPTURE(keel::llm::to_string(kind));
    asio::io_context ctx;
    mock_llm_server server{ctx, mock_options{}};
    server.set_plan("m", fault_plan{}.with_script({fault_kind::stream_drop}));
    streamed got;
    run(ctx, server, [&]() -> asio::awaitable<void> {
      got = co_await post_stream(server.port(),
                                 stream_call(kind, "m", /*include_usage=*/false, /*stream=*/false));
    });
    REQUIRE_FALSE(got.ec);
    CHECK(got.status == 200);
    CHECK(got.content_type == "application/json");
    CHECK(got.chunks.empty());
    CHECK(json::parse(got.body).dump().find(reply_text) != std::string::npos);
    const auto s = server.stats().model("m");
    CHECK(s.streams == 0);
    CHECK(s.stream_faults == 0);
  }
}

TEST_CASE("mock_llm_server streams refusals as each provider ends a refused stream",
          "[mock_llm_server][stream]") {
  for (provider_kind kind : all_providers) {
    CAPTURE(keel::llm::to_string(kind));
    asio::io_context ctx;
    mock_llm_server server{ctx, mock_options{}};
    server.set_plan("m", fault_plan{}.with_script({fault_kind::content_filter}));
    streamed got;
    run(ctx, server, [&]() -> asio::awaitable<void> {
      got = co_await post_stream(server.port(), stream_call(kind, "m"));
    });
    REQUIRE_FALSE(got.ec);
    const auto events = decode(kind, got.chunks);
    REQUIRE(events.back().kind == stream_event_kind::error);
    CHECK(events.back().error->llm_code() == errc::content_filtered);
  }
}

TEST_CASE("scenario JSON loads stream settings and the stream fault names",
          "[mock_llm_server][stream]") {
  const auto s = keel::testing::scenario::from_json(R"({"models": {"m": {
      "stream": {"chunk_latency_ms": 15, "chunk_bytes": 8, "fault_after_chunks": 2},
      "errors": {"stream_drop": 0.25, "stream_corrupt": 0.25},
      "script": ["stream_stall", "stream_error", "stream_throttled", "stream_truncated"]}}})");
  const fault_plan& p = s.plans.at("m");
  CHECK(p.stream.chunk_latency == 15ms);
  CHECK(p.stream.chunk_bytes == 8);
  CHECK(p.stream.fault_after_chunks == 2);
  CHECK(p.probability.at(fault_kind::stream_drop) == 0.25);
  CHECK(p.probability.at(fault_kind::stream_corrupt) == 0.25);
  CHECK(p.script == std::vector<fault_kind>{fault_kind::stream_stall, fault_kind::stream_error,
                                            fault_kind::stream_throttled,
                                            fault_kind::stream_truncated});
  for (auto k :
       {fault_kind::stream_drop, fault_kind::stream_stall, fault_kind::stream_error,
        fault_kind::stream_throttled, fault_kind::stream_truncated, fault_kind::stream_corrupt}) {
    CHECK(keel::testing::is_stream_fault(k));
    CHECK(keel::testing::parse_fault_kind(keel::testing::to_string(k)) == k);
  }
  CHECK_FALSE(keel::testing::is_stream_fault(fault_kind::bad_request));
  CHECK_FALSE(keel::testing::is_stream_fault(fault_kind::stall));

  auto path_of = [](const char* text) {
    try {
      keel::testing::scenario::from_json(text);
    } catch (const keel::testing::scenario_error& e) {
      return e.path();
    }
    return std::string("(no error)");
  };
  CHECK(path_of(R"({"models": {"m": {"stream": {"chunk_bytes": 0}}}})") ==
        "/models/m/stream/chunk_bytes");
  CHECK(path_of(R"({"models": {"m": {"stream": {"chunk_latency": 5}}}})") ==
        "/models/m/stream/chunk_latency");
  CHECK(path_of(R"({"models": {"m": {"stream": 5}}})") == "/models/m/stream");
}
