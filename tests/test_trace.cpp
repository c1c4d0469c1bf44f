// Tests for keel/trace.hpp: W3C trace context, sampling, spans and the bounded export queue.
#include <keel/otlp.hpp>
#include <keel/trace.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include <boost/asio/detached.hpp>

#include <memory>
#include <optional>

namespace asio = boost::asio;
using keel::trace::span_kind;

namespace {

// A clock that moves 1 ms per reading, from a fixed instant.
struct stepping_clock {
  std::uint64_t t = 1'700'000'000'000'000'000ULL;
  std::uint64_t operator()() { return t += 1'000'000; }
};

keel::trace::tracer_options options(std::uint64_t seed = 7) {
  keel::trace::tracer_options o;
  o.seed = seed;
  o.now = [c = std::make_shared<stepping_clock>()] { return (*c)(); };
  return o;
}

void flush(asio::io_context& io, keel::trace::tracer& t) {
  auto f = asio::co_spawn(io, t.flush(), asio::use_future);
  io.run();
  io.restart();
  f.get();
}

// An exporter that fails its first `fail` batches.
struct flaky_exporter : keel::trace::exporter {
  int fail = 0;
  std::size_t delivered = 0;
  asio::awaitable<void> export_spans(const keel::trace::resource&,
                                     std::vector<keel::trace::span_data> spans) override {
    if (fail > 0) {
      --fail;
      throw std::runtime_error("collector down");
    }
    delivered += spans.size();
    co_return;
  }
};

}  // namespace

TEST_CASE("traceparent is read and written as W3C trace context says", "[trace]") {
  const std::string tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
  auto c = keel::trace::parse_traceparent(tp, "congo=t61rcWkgMzE");
  REQUIRE(c);
  CHECK(c->sampled());
  CHECK(c->state == "congo=t61rcWkgMzE");
  CHECK(keel::trace::to_traceparent(*c) == tp);
  CHECK(keel::trace::to_hex(c->span.data(), c->span.size()) == "00f067aa0ba902b7");

  // Malformed values and zero ids start a new trace.
  CHECK_FALSE(
      keel::trace::parse_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
  CHECK_FALSE(
      keel::trace::parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
  CHECK_FALSE(
      keel::trace::parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"));
  CHECK_FALSE(
      keel::trace::parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
  CHECK_FALSE(keel::trace::parse_traceparent(tp + "-extra"));  // version 00 has no more fields
  CHECK_FALSE(keel::trace::parse_traceparent(tp.substr(0, 54)));
  // A later version may append fields.
  auto v1 = keel::trace::parse_traceparent("01" + tp.substr(2) + "-what-comes");
  REQUIRE(v1);
  CHECK(v1->flags == 1);
}

TEST_CASE("a child span joins its parent's trace and follows its sampled flag", "[trace]") {
  asio::io_context io;
  keel::otlp::memory_exporter out;
  keel::trace::tracer t(io.get_executor(), out, options());
  auto parent = keel::trace::parse_traceparent(
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "k=v");
  REQUIRE(parent);
  {
    keel::trace::span s = t.start("chat m", span_kind::client, &*parent);
    REQUIRE(s.recording());
    CHECK(s.context().trace == parent->trace);
    CHECK(s.context().span != parent->span);
    s.set("gen_ai.request.model", "m");
    s.set("keel.attempts", 3);
    s.set("keel.throttle_wait_ms", 1.5);
    s.set("keel.stream", false);
    s.set("keel.attempts", 4);  // replaces
    s.add_event("keel.retry", {{"keel.delay_ms", 120.0}, {"keel.delay_from_server", true}});
    s.set_error("rate_limited", "HTTP 429");
  }
  parent->flags = 0x03;  // an unknown flag bit is not passed on (version 00 defines bit 0 only)
  CHECK(t.start("x", span_kind::client, &*parent).context().flags == 0x01);
  parent->flags = 0;  // the caller did not sample: neither does keel
  keel::trace::span unsampled = t.start("chat m", span_kind::client, &*parent);
  CHECK_FALSE(unsampled.recording());
  CHECK(unsampled.context().valid());  // still propagated
  CHECK_FALSE(unsampled.context().sampled());
  unsampled.set("ignored", 1);
  unsampled.end();
  flush(io, t);

  REQUIRE(out.spans().size() == 2);
  const keel::trace::span_data& d = out.spans()[0];
  CHECK(d.parent == parent->span);
  CHECK(d.context.state == "k=v");
  CHECK(d.name == "chat m");
  CHECK(d.kind == span_kind::client);
  CHECK(d.end_unix_nano > d.start_unix_nano);
  CHECK(std::get<std::int64_t>(*d.find("keel.attempts")) == 4);
  CHECK(std::get<double>(*d.find("keel.throttle_wait_ms")) == 1.5);
  CHECK(std::get<bool>(*d.find("keel.stream")) == false);
  CHECK(std::get<std::string>(*d.find("error.type")) == "rate_limited");
  CHECK(d.status == keel::trace::status_code::error);
  CHECK(d.status_message == "HTTP 429");
  REQUIRE(d.events.size() == 1);
  CHECK(d.events[0].name == "keel.retry");
  CHECK(t.stats().sampled == 2);  // and the flags check's span
  CHECK(t.stats().exported == 2);
}

TEST_CASE("root spans are sampled by their trace id at the configured ratio", "[trace]") {
  asio::io_context io;
  keel::otlp::memory_exporter out;
  auto o = options(11);
  o.sample_ratio = 0.25;
  o.max_queue = 100000;
  keel::trace::tracer t(io.get_executor(), out, o);
  int sampled = 0;
  for (int i = 0; i < 4000; ++i) {
    keel::trace::span s = t.start("x", span_kind::internal);
    CHECK(s.context().valid());
    sampled += s.recording() ? 1 : 0;
  }
  CHECK(sampled > 850);
  CHECK(sampled < 1150);
  // Ratio 0 samples nothing, 1 everything.
  o.sample_ratio = 0;
  keel::trace::tracer none(io.get_executor(), out, o);
  keel::otlp::memory_exporter all_out;
  o.sample_ratio = 1;
  keel::trace::tracer all(io.get_executor(), all_out, o);
  for (int i = 0; i < 100; ++i) {
    CHECK_FALSE(none.start("x", span_kind::internal).recording());
    CHECK(all.start("x", span_kind::internal).recording());
  }
  flush(io, t);
  CHECK(out.spans().size() == static_cast<std::size_t>(sampled));
}

TEST_CASE("a full queue drops spans and counts them; a failed export is counted", "[trace]") {
  asio::io_context io;
  flaky_exporter out;
  out.fail = 1;
  auto o = options();
  o.max_queue = 3;
  o.max_batch = 2;
  o.failure_pause = std::chrono::milliseconds(0);  // the next batch goes to the exporter again
  keel::trace::tracer t(io.get_executor(), out, o);
  for (int i = 0; i < 5; ++i) {
    t.start("s", span_kind::internal).end();  // nothing runs until the io_context does
  }
  CHECK(t.stats().dropped == 2);
  flush(io, t);
  // Batches of 2 then 1: the first failed.
  CHECK(t.stats().failed_exports == 1);
  CHECK(t.stats().failed == 2);
  CHECK(t.stats().exported == 1);
  CHECK(out.delivered == 1);
  // The queue took spans again once drained.
  t.start("s", span_kind::internal).end();
  flush(io, t);
  CHECK(out.delivered == 2);
  CHECK(t.stats().dropped == 2);
}

TEST_CASE("OTLP/JSON has the collector's field names and encodings", "[trace][otlp]") {
  asio::io_context io;
  keel::otlp::memory_exporter out;
  keel::trace::tracer t(io.get_executor(), out, options());
  auto parent = keel::trace::parse_traceparent(
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "k=v");
  {
    keel::trace::span s = t.start("chat m", span_kind::client, &*parent);
    s.set("n", 42);
    s.set("d", 0.5);
    s.set("b", true);
    s.set("reasons", std::vector<std::string>{"stop"});
    s.set("bad", std::string("\xff\xfe"));
    s.add_event("keel.retry", {{"keel.attempt", 1}});
    s.set_error("server_error", "HTTP 503");
  }
  flush(io, t);
  const auto j = nlohmann::json::parse(keel::otlp::to_json(t.resource(), out.spans()));
  const auto& rs = j.at("resourceSpans").at(0);
  CHECK(rs.at("resource").at("attributes").at(0) ==
        nlohmann::json::parse(R"({"key":"service.name","value":{"stringValue":"keel"}})"));
  const auto& ss = rs.at("scopeSpans").at(0);
  CHECK(ss.at("scope").at("name") == "keel");
  const auto& s = ss.at("spans").at(0);
  CHECK(s.at("traceId") == "4bf92f3577b34da6a3ce929d0e0e4736");
  CHECK(s.at("parentSpanId") == "00f067aa0ba902b7");
  CHECK(s.at("spanId").get<std::string>().size() == 16);
  CHECK(s.at("traceState") == "k=v");
  CHECK(s.at("kind") == 3);
  CHECK(s.at("flags") == 1);
  CHECK(s.at("startTimeUnixNano").is_string());
  CHECK(std::stoull(s.at("endTimeUnixNano").get<std::string>()) >
        std::stoull(s.at("startTimeUnixNano").get<std::string>()));
  const auto& a = s.at("attributes");
  CHECK(a.at(0).at("value") == nlohmann::json::parse(R"({"intValue":"42"})"));
  CHECK(a.at(1).at("value") == nlohmann::json::parse(R"({"doubleValue":0.5})"));
  CHECK(a.at(2).at("value") == nlohmann::json::parse(R"({"boolValue":true})"));
  CHECK(a.at(3).at("value") ==
        nlohmann::json::parse(R"({"arrayValue":{"values":[{"stringValue":"stop"}]}})"));
  CHECK(a.at(4).at("value").at("stringValue") == "\xEF\xBF\xBD\xEF\xBF\xBD");
  CHECK(s.at("events").at(0).at("name") == "keel.retry");
  CHECK(s.at("status") == nlohmann::json::parse(R"({"code":2,"message":"HTTP 503"})"));
}

TEST_CASE("X-Ray trace ids start with the Unix time in seconds", "[trace]") {
  asio::io_context io;
  keel::otlp::memory_exporter out;
  auto o = options();
  o.xray_ids = true;
  o.now = [] { return std::uint64_t{0x58406520} * 1'000'000'000ULL + 5; };
  keel::trace::tracer t(io.get_executor(), out, o);
  const keel::trace::span s = t.start("x", span_kind::internal);
  CHECK(keel::trace::to_hex(s.context().trace.data(), 16).substr(0, 8) == "58406520");
  // A child keeps its parent's trace id.
  const keel::trace::span c = t.start("y", span_kind::internal, &s.context());
  CHECK(c.context().trace == s.context().trace);
}

TEST_CASE("after a failed export, batches are dropped for the failure pause", "[trace]") {
  asio::io_context io;
  flaky_exporter out;
  out.fail = 1;
  auto o = options();
  o.max_batch = 1;
  o.failure_pause = std::chrono::hours(1);
  keel::trace::tracer t(io.get_executor(), out, o);
  for (int i = 0; i < 4; ++i) {
    t.start("s", span_kind::internal).end();
  }
  flush(io, t);
  // The first batch failed; the other three were dropped without asking the collector again.
  CHECK(out.fail == 0);
  CHECK(out.delivered == 0);
  CHECK(t.stats().failed_exports == 1);
  CHECK(t.stats().failed == 4);
  CHECK(t.stats().exported == 0);
}

TEST_CASE("a full batch is exported without waiting for the interval or a flush", "[trace]") {
  asio::io_context io;
  keel::otlp::memory_exporter out;
  auto o = options();
  o.max_batch = 2;
  o.interval = std::chrono::hours(1);
  keel::trace::tracer t(io.get_executor(), out, o);
  for (int i = 0; i < 3; ++i) {
    t.start("s", span_kind::internal).end();
  }
  io.poll();  // runs what is ready; the loop then waits (an hour) for the third span's batch
  CHECK(out.batches() == 1);
  CHECK(out.spans().size() == 2);
  flush(io, t);
  CHECK(out.spans().size() == 3);
}

TEST_CASE("a tracer destroyed with open spans and a waiting export loop exports nothing more",
          "[trace]") {
  asio::io_context io;
  auto out = std::make_unique<keel::otlp::memory_exporter>();
  std::optional<keel::trace::span> open;
  {
    keel::trace::tracer t(io.get_executor(), *out, options());
    t.start("queued", span_kind::internal).end();
    open.emplace(t.start("open", span_kind::internal));
    io.poll();  // the export loop starts and waits for its interval
    // A flush begun before the tracer goes holds the tracer's state.
    asio::co_spawn(io, t.flush(), asio::detached);
  }
  out.reset();  // the exporter goes with the tracer, as in a program's shutdown
  open->set("late", 1);
  open->end();  // after its tracer: dropped, not queued
  io.run();     // the loop and the flush wake and end without touching the exporter
  SUCCEED("no use of the destroyed exporter (ASan would report one)");
}

TEST_CASE("a span keeps at most 128 events and 128 attributes and counts the rest", "[trace]") {
  asio::io_context io;
  keel::otlp::memory_exporter out;
  keel::trace::tracer t(io.get_executor(), out, options());
  {
    keel::trace::span s = t.start("held", span_kind::internal);
    for (int i = 0; i < 200; ++i) {
      s.add_event("keel.breaker_hold");
      s.set("k" + std::to_string(i), i);
    }
    s.set("k0", 7);  // an existing key is still replaced
  }
  flush(io, t);
  REQUIRE(out.spans().size() == 1);
  const auto& d = out.spans()[0];
  CHECK(d.events.size() == keel::trace::max_span_events);
  CHECK(d.dropped_events == 72);
  CHECK(d.attributes.size() == keel::trace::max_span_attributes);
  CHECK(d.dropped_attributes == 72);
  CHECK(std::get<std::int64_t>(*d.find("k0")) == 7);
  const auto j = nlohmann::json::parse(keel::otlp::to_json(t.resource(), out.spans()));
  const auto& js = j["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
  CHECK(js["droppedEventsCount"] == 72);
  CHECK(js["droppedAttributesCount"] == 72);
}
