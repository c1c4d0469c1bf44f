// Tests of keel::llm::client's traces against the mock server over loopback: the span tree of a
// call that retried twice and fell back once, the GenAI attributes, W3C propagation to the
// provider, a caller's unsampled trace, and a parent passed on when there is no tracer.
#include "llm_client_support.hpp"

#include <keel/llm/client.hpp>
#include <keel/otlp.hpp>
#include <keel/testing/mock_llm_server.hpp>
#include <keel/trace.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel::trace::span_data;
using keel_test::client::make_config;
using keel_test::client::request;

// Two entries; three attempts each with 1 ms constant backoff; no breaker.
constexpr const char* retry_then_fallback = R"({
  "config_list": [
    {"api_type": "openai", "model": "primary", "api_key": "k1"},
    {"api_type": "anthropic", "model": "secondary", "api_key": "k2"}
  ],
  "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.001}},
             "breaker": {"enabled": false}}
})";

template <class T>
T attr(const span_data& s, std::string_view key) {
  const keel::trace::value* v = s.find(key);
  INFO("attribute " << key << " of " << s.name);
  REQUIRE(v);
  REQUIRE(std::holds_alternative<T>(*v));
  return std::get<T>(*v);
}

std::string hex(const auto& id) {
  return keel::trace::to_hex(id.data(), id.size());
}

// Runs `f` (an awaitable factory) to its end on `ctx`, then flushes `tracer`.
template <class F>
auto run_one(asio::io_context& ctx, keel::trace::tracer* tracer, F f) {
  auto fut = asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<keel::llm::call_outcome> {
        keel::llm::call_outcome out = co_await f();
        if (tracer) {
          co_await tracer->flush();
        }
        ctx.stop();
        co_return out;
      },
      asio::use_future);
  ctx.run();
  return fut.get();
}

}  // namespace

TEST_CASE("a call that retried twice and fell back once is one span with an attempt span each",
          "[llm_client][trace]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("primary", fault_plan{}.with_probability(fault_kind::unavailable, 1.0));
  server.start();
  keel::otlp::memory_exporter out;
  keel::trace::tracer_options to;
  to.seed = 3;
  keel::trace::tracer tracer(ctx.get_executor(), out, to);
  keel::llm::client_options co;
  co.tracer = &tracer;
  co.seed = 5;
  keel::llm::client client(ctx.get_executor(), make_config(retry_then_fallback, server.base_url()),
                           {}, co);
  const auto parent = keel::trace::parse_traceparent(
      "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "vendor=x");
  REQUIRE(parent);
  const keel::llm::call_outcome o =
      run_one(ctx, &tracer, [&] { return client.call(request("hi"), nullptr, {}, &*parent); });
  REQUIRE(o.response);
  REQUIRE(o.attempts == 4);

  const std::vector<span_data>& spans = out.spans();
  REQUIRE(spans.size() == 5);  // four attempts, then the call
  const span_data& call = spans.back();
  CHECK(call.name == "chat primary");
  CHECK(call.kind == keel::trace::span_kind::internal);
  CHECK(call.context.trace == parent->trace);
  CHECK(call.parent == parent->span);
  CHECK(call.context.state == "vendor=x");
  CHECK(call.status == keel::trace::status_code::ok);
  CHECK(attr<std::string>(call, "gen_ai.operation.name") == "chat");
  CHECK(attr<std::string>(call, "gen_ai.request.model") == "primary");
  CHECK(attr<std::int64_t>(call, "gen_ai.request.max_tokens") == 64);
  CHECK(attr<std::string>(call, "gen_ai.provider.name") == "anthropic");  // who answered
  CHECK(attr<std::int64_t>(call, "keel.attempts") == 4);
  CHECK(attr<std::int64_t>(call, "keel.fallbacks") == 1);
  CHECK(attr<std::int64_t>(call, "keel.entry") == 1);
  CHECK(attr<std::int64_t>(call, "gen_ai.usage.output_tokens") > 0);
  CHECK(attr<std::vector<std::string>>(call, "gen_ai.response.finish_reasons").size() == 1);
  // The completion's own id (chat_response::id), not the HTTP request id.
  CHECK(attr<std::string>(call, "gen_ai.response.id").rfind("msg_mock", 0) == 0);

  // Events: two retries on the primary (from 503s), then the move to the fallback.
  std::vector<std::string> names;
  for (const auto& e : call.events) {
    names.push_back(e.name);
  }
  CHECK(names == std::vector<std::string>{"keel.retry", "keel.retry", "keel.fallback"});
  const auto& retry = call.events[0];
  REQUIRE(retry.attributes.size() == 5);
  CHECK(retry.attributes[2].key == "error.type");
  CHECK(std::get<std::string>(retry.attributes[2].value) == "overloaded");
  CHECK(std::get<std::int64_t>(call.events[2].attributes[1].value) == 1);  // keel.to

  // Attempts: children of the call, in order, three failed on the primary, one ok.
  for (std::size_t i = 0; i < 4; ++i) {
    const span_data& a = spans[i];
    INFO("attempt " << i + 1);
    CHECK(a.kind == keel::trace::span_kind::client);
    CHECK(a.context.trace == parent->trace);
    CHECK(a.parent == call.context.span);
    CHECK(attr<std::int64_t>(a, "keel.attempt") == static_cast<std::int64_t>(i + 1));
    CHECK(attr<std::string>(a, "server.address") == "127.0.0.1");
    CHECK(a.start_unix_nano >= call.start_unix_nano);
    CHECK(a.end_unix_nano <= call.end_unix_nano);
  }
  CHECK(spans[0].name == "chat primary");
  CHECK(attr<std::int64_t>(spans[0], "http.response.status_code") == 503);
  CHECK(attr<std::string>(spans[0], "error.type") == "overloaded");
  CHECK(spans[0].status == keel::trace::status_code::error);
  CHECK(spans[3].name == "chat secondary");
  CHECK(attr<std::string>(spans[3], "gen_ai.provider.name") == "anthropic");
  CHECK(attr<std::int64_t>(spans[3], "http.response.status_code") == 200);

  // Each request carried its own attempt span as the parent.
  const auto primary = server.stats().by_model["primary"].traceparents;
  const auto secondary = server.stats().by_model["secondary"].traceparents;
  REQUIRE(primary.size() == 3);
  REQUIRE(secondary.size() == 1);
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(primary[i] == "00-" + hex(parent->trace) + "-" + hex(spans[i].context.span) + "-01");
  }
  CHECK(secondary[0] == "00-" + hex(parent->trace) + "-" + hex(spans[3].context.span) + "-01");
}

TEST_CASE("a caller's unsampled trace records nothing and still propagates",
          "[llm_client][trace]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.start();
  keel::otlp::memory_exporter out;
  keel::trace::tracer tracer(ctx.get_executor(), out, {});
  keel::llm::client_options co;
  co.tracer = &tracer;
  keel::llm::client client(ctx.get_executor(), make_config(retry_then_fallback, server.base_url()),
                           {}, co);
  const auto parent =
      keel::trace::parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
  const keel::llm::call_outcome o =
      run_one(ctx, &tracer, [&] { return client.call(request(), nullptr, {}, &*parent); });
  REQUIRE(o.response);
  CHECK(out.spans().empty());
  const auto sent = server.stats().by_model["primary"].traceparents;
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
  CHECK(sent[0].ends_with("-00"));
  CHECK(sent[0].find("b7ad6b7169203331") == std::string::npos);  // not the caller's span id
}

TEST_CASE("without a tracer a caller's trace context is passed on unchanged",
          "[llm_client][trace]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.start();
  keel::llm::client client(ctx.get_executor(), make_config(retry_then_fallback, server.base_url()));
  const std::string tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
  const auto parent = keel::trace::parse_traceparent(tp);
  keel::llm::call_outcome o =
      run_one(ctx, nullptr, [&] { return client.call(request(), nullptr, {}, &*parent); });
  REQUIRE(o.response);
  // And no header at all for a call without one.
  ctx.restart();
  o = run_one(ctx, nullptr, [&] { return client.call(request()); });
  REQUIRE(o.response);
  CHECK(server.stats().by_model["primary"].traceparents == std::vector<std::string>{tp});
}

TEST_CASE("a streamed call's span records the stream and its attempt carries traceparent",
          "[llm_client][trace]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.start();
  keel::otlp::memory_exporter out;
  keel::trace::tracer tracer(ctx.get_executor(), out, {});
  keel::llm::client_options co;
  co.tracer = &tracer;
  keel::llm::client client(ctx.get_executor(), make_config(retry_then_fallback, server.base_url()),
                           {}, co);
  std::size_t deltas = 0;
  const keel::llm::call_outcome o = run_one(ctx, &tracer, [&] {
    return client.stream_call(request(),
                              [&](const keel::llm::stream_delta&) -> asio::awaitable<void> {
                                ++deltas;
                                co_return;
                              });
  });
  REQUIRE(o.response);
  REQUIRE(out.spans().size() == 2);
  const span_data& call = out.spans()[1];
  CHECK(call.parent == keel::trace::span_id{});  // a root
  CHECK(attr<bool>(call, "keel.stream"));
  CHECK(attr<std::int64_t>(call, "keel.stream.delivered_deltas") ==
        static_cast<std::int64_t>(deltas));
  const double first_ms = attr<double>(call, "keel.stream.first_token_ms");
  CHECK(first_ms >= 0);
  CHECK(first_ms * 1e6 <= static_cast<double>(call.end_unix_nano - call.start_unix_nano));
  const auto sent = server.stats().by_model["primary"].traceparents;
  REQUIRE(sent.size() == 1);
  CHECK(sent[0] == keel::trace::to_traceparent(out.spans()[0].context));
}
