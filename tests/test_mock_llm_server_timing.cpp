// Tests for the timing side of keel/testing/mock_llm_server.hpp: the heavy-tail latency, the
// response log, and responses the client abandons (mid-latency, stalled, mid-stream).
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <catch2/catch.hpp>

#include "mock_support.hpp"

#include <chrono>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using json = nlohmann::json;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel::testing::mock_llm_server;
using keel::testing::mock_options;
using keel::testing::response_record;
using keel::testing::stream_settings;
using namespace std::chrono_literals;
using ms = std::chrono::milliseconds;
using steady = std::chrono::steady_clock;

// An OpenAI chat request for `model`, streamed or not.
bhttp::request<bhttp::string_body> chat(const std::string& model, bool stream = false) {
  json body{{"model", model},
            {"messages", json::array({{{"role", "user"}, {"content", "Stream me something."}}})}};
  if (stream) {
    body["stream"] = true;
  }
  bhttp::request<bhttp::string_body> req{bhttp::verb::post, "/v1/chat/completions", 11};
  req.set(bhttp::field::host, "127.0.0.1");
  req.set(bhttp::field::content_type, "application/json");
  req.keep_alive(true);
  req.body() = body.dump();
  req.prepare_payload();
  return req;
}

asio::awaitable<void> connect(beast::tcp_stream& stream, unsigned short port) {
  co_await stream.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                                asio::use_awaitable);
}

void run(asio::io_context& ctx, mock_llm_server& server,
         std::function<asio::awaitable<void>()> body) {
  keel_test::run_against(ctx, server, std::move(body), 10s);
}

// Sends `n` requests for model "m" one after another on one keep-alive connection and returns,
// for each, whether the client waited at least `slow` for its answer.
std::vector<bool> slow_calls(std::uint64_t seed, fault_plan plan, int n, ms slow,
                             keel::testing::mock_stats& stats) {
  asio::io_context ctx;
  mock_options opts;
  opts.seed = seed;
  mock_llm_server server{ctx, opts};
  server.set_plan("m", std::move(plan));
  std::vector<bool> out;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    co_await connect(stream, server.port());
    beast::flat_buffer buffer;
    for (int i = 0; i < n; ++i) {
      const auto before = steady::now();
      auto req = chat("m");
      co_await bhttp::async_write(stream, req, asio::use_awaitable);
      bhttp::response<bhttp::string_body> res;
      co_await bhttp::async_read(stream, buffer, res, asio::use_awaitable);
      REQUIRE(res.result_int() == 200);
      out.push_back(steady::now() - before >= slow);
    }
  });
  stats = server.stats();
  return out;
}

}  // namespace

TEST_CASE("mock_llm_server makes a seeded fraction of calls wait the tail latency",
          "[mock_llm_server][tail]") {
  // "5% of calls take 10x the median", scaled down to keep the test short: 2 ms, tail 30 ms.
  constexpr int calls = 400;
  constexpr ms tail = 30ms;
  const fault_plan plan = fault_plan{}.with_latency(2ms).with_tail(0.05, tail);
  keel::testing::mock_stats s7;
  keel::testing::mock_stats again;
  keel::testing::mock_stats s8;
  const std::vector<bool> seed7 = slow_calls(7, plan, calls, tail, s7);
  const auto tails = s7.model("m").tail_delays;
  // Binomial(400, 0.05): mean 20, standard deviation 4.4; the seed fixes the draw, the range
  // says the fraction is the configured one (not 0, not every call).
  CHECK(tails >= 10);
  CHECK(tails <= 32);
  CHECK(s7.total.tail_delays == tails);
  // Every call the server made slow took at least the tail latency, at the server and at the
  // client; the response log says which calls they were.
  REQUIRE(s7.responses.size() == static_cast<std::size_t>(calls));
  std::uint64_t logged_tails = 0;
  for (std::size_t i = 0; i < s7.responses.size(); ++i) {
    const response_record& r = s7.responses[i];
    CAPTURE(i);
    REQUIRE(r.first_byte_at);
    if (r.tail) {
      ++logged_tails;
      CHECK(r.latency == tail);
      CHECK(*r.first_byte_at - r.received_at >= tail);
      CHECK(seed7[i]);
    } else {
      CHECK(r.latency == 2ms);
    }
  }
  CHECK(logged_tails == tails);
  // Deterministic for a seed, and another seed picks other calls. Compared on the server's log:
  // at the client a call that was not a tail can still take 30 ms on a loaded machine.
  (void)slow_calls(7, plan, calls, tail, again);
  CHECK(again.model("m").tail_delays == tails);
  REQUIRE(again.responses.size() == s7.responses.size());
  std::vector<bool> tail7;
  std::vector<bool> tail7_again;
  for (std::size_t i = 0; i < s7.responses.size(); ++i) {
    tail7.push_back(s7.responses[i].tail);
    tail7_again.push_back(again.responses[i].tail);
  }
  CHECK(tail7 == tail7_again);
  (void)slow_calls(8, plan, calls, tail, s8);
  std::vector<bool> tail8;
  for (const auto& r : s8.responses) {
    tail8.push_back(r.tail);
  }
  CHECK(tail8 != tail7);
}

TEST_CASE("mock_llm_server tail delays a stream's first token, not each chunk",
          "[mock_llm_server][tail]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  stream_settings settings;
  settings.chunk_latency = 10ms;  // 36 bytes of reply: 9 text chunks, 90 ms of stream
  server.set_plan("m", fault_plan{}.with_tail(1.0, 300ms).with_stream(settings));
  run(ctx, server, [&]() -> asio::awaitable<void> {
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    co_await connect(stream, server.port());
    auto req = chat("m", /*stream=*/true);
    co_await bhttp::async_write(stream, req, asio::use_awaitable);
    bhttp::response<bhttp::string_body> res;
    beast::flat_buffer buffer;
    co_await bhttp::async_read(stream, buffer, res, asio::use_awaitable);
    CHECK(res.result_int() == 200);
  });
  const auto s = server.stats();
  CHECK(s.model("m").tail_delays == 1);
  REQUIRE(s.responses.size() == 1);
  const response_record& r = s.responses.front();
  CHECK(r.tail);
  REQUIRE(r.first_byte_at);
  REQUIRE(r.completed_at);
  CHECK(*r.first_byte_at - r.received_at >= 300ms);
  // Had every chunk waited the tail, the stream would last 9 x 300 ms.
  CHECK(*r.completed_at - *r.first_byte_at >= 90ms);
  CHECK(*r.completed_at - *r.first_byte_at < 300ms);
}

TEST_CASE("mock_llm_server counts a client that closes mid-latency or mid-stall as abandoned",
          "[mock_llm_server][abandon]") {
  struct row {
    const char* name;
    fault_plan plan;
  };
  // The latency is long: the mock must notice the close while sleeping, or the test times out.
  for (const row& c : {row{"latency", fault_plan{}.with_latency(8s)},
                       row{"stall", fault_plan{}.with_script({fault_kind::stall})}}) {
    CAPTURE(c.name);
    asio::io_context ctx;
    mock_llm_server server{ctx, mock_options{}};
    server.set_plan("m", c.plan);
    steady::time_point closed{};
    unsigned short client_port = 0;
    const auto started = steady::now();
    run(ctx, server, [&]() -> asio::awaitable<void> {
      beast::tcp_stream stream(co_await asio::this_coro::executor);
      co_await connect(stream, server.port());
      client_port = stream.socket().local_endpoint().port();
      auto req = chat("m");
      co_await bhttp::async_write(stream, req, asio::use_awaitable);
      co_await keel_test::until([&] { return server.stats().total.requests == 1; });
      closed = steady::now();
      stream.close();
      co_await keel_test::until([&] { return server.stats().total.abandoned == 1; });
      // The mock gave up its wait when it saw the close, not when the latency ran out.
      CHECK(steady::now() - closed < 2s);
    });
    CHECK(steady::now() - started < 5s);
    const auto s = server.stats();
    CHECK(s.model("m").abandoned == 1);
    CHECK(s.total.abandoned == 1);
    CHECK(s.status_count(200) == 0);  // nothing was written
    REQUIRE(s.responses.size() == 1);
    const response_record& r = s.responses.front();
    CHECK(r.connection == 1);
    CHECK(r.peer_port == client_port);
    CHECK(r.model == "m");
    CHECK(r.accepted_at <= r.received_at);
    CHECK_FALSE(r.first_byte_at);
    CHECK_FALSE(r.completed_at);
    REQUIRE(r.closed_by_client_at);
    CHECK(*r.closed_by_client_at >= closed);
    CHECK(*r.closed_by_client_at >= r.received_at);
  }
}

TEST_CASE("mock_llm_server counts a client that closes mid-stream as abandoned",
          "[mock_llm_server][abandon]") {
  asio::io_context ctx;
  mock_llm_server server{ctx, mock_options{}};
  stream_settings settings;
  settings.chunk_latency = 1s;  // the second text chunk would come a second after the first
  server.set_plan("m", fault_plan{}.with_stream(settings));
  steady::time_point closed{};
  std::size_t chunks = 0;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    co_await connect(stream, server.port());
    auto req = chat("m", /*stream=*/true);
    co_await bhttp::async_write(stream, req, asio::use_awaitable);
    bhttp::response_parser<bhttp::string_body> parser;
    auto on_header = [&chunks](std::uint64_t size, beast::string_view, boost::system::error_code&) {
      chunks += size > 0 ? 1 : 0;
    };
    parser.on_chunk_header(on_header);
    beast::flat_buffer buffer;
    // The head, then the first text chunk (after one chunk_latency).
    while (chunks < 2) {
      co_await bhttp::async_read_some(stream, buffer, parser, asio::use_awaitable);
    }
    closed = steady::now();
    stream.close();
    co_await keel_test::until([&] { return server.stats().total.abandoned == 1; });
    // Counted when the mock saw the close, not when the next chunk's wait (1 s) ran out.
    CHECK(steady::now() - closed < 500ms);
  });
  const auto s = server.stats();
  CHECK(chunks >= 2);
  CHECK(s.model("m").streams == 1);
  CHECK(s.model("m").abandoned == 1);
  REQUIRE(s.responses.size() == 1);
  const response_record& r = s.responses.front();
  REQUIRE(r.first_byte_at);
  CHECK_FALSE(r.completed_at);
  REQUIRE(r.closed_by_client_at);
  CHECK(*r.closed_by_client_at >= closed);
  // Noticed during the wait for the second text chunk, not when it would have been written.
  CHECK(*r.closed_by_client_at < *r.first_byte_at + 2s);
}

TEST_CASE("mock_llm_server logs completed responses, keeps pipelined requests and bounds the log",
          "[mock_llm_server][abandon]") {
  asio::io_context ctx;
  mock_options opts;
  opts.response_log = 3;
  mock_llm_server server{ctx, opts};
  server.set_plan("m", fault_plan{}.with_latency(20ms));
  std::vector<unsigned> statuses;
  run(ctx, server, [&]() -> asio::awaitable<void> {
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    co_await connect(stream, server.port());
    // A pipelined request sent while the first is waiting out its latency: the close watcher
    // reads it, and must hand it to the parser rather than lose it or take it for a close.
    for (int i = 0; i < 2; ++i) {
      auto req = chat("m");
      std::ostringstream os;
      os << req;
      const std::string bytes = os.str();
      co_await asio::async_write(stream.socket(), asio::buffer(bytes), asio::use_awaitable);
      co_await keel_test::until([&] { return server.stats().total.requests == 1; });
    }
    beast::flat_buffer buffer;
    for (int i = 0; i < 5; ++i) {
      if (i >= 2) {
        auto req = chat("m");
        co_await bhttp::async_write(stream, req, asio::use_awaitable);
      }
      bhttp::response<bhttp::string_body> res;
      co_await bhttp::async_read(stream, buffer, res, asio::use_awaitable);
      statuses.push_back(res.result_int());
    }
  });
  CHECK(statuses == std::vector<unsigned>{200, 200, 200, 200, 200});
  const auto s = server.stats();
  CHECK(s.total.abandoned == 0);
  CHECK(s.responses_dropped == 2);
  REQUIRE(s.responses.size() == 3);
  for (const response_record& r : s.responses) {
    CHECK(r.connection == 1);
    CHECK(r.status == 200);
    CHECK(r.outcome == fault_kind::ok);
    CHECK_FALSE(r.tail);
    REQUIRE(r.first_byte_at);
    REQUIRE(r.completed_at);
    CHECK_FALSE(r.closed_by_client_at);
    CHECK(*r.first_byte_at - r.received_at >= 20ms);
    CHECK(*r.completed_at >= *r.first_byte_at);
  }
  CHECK(s.responses[0].received_at <= s.responses[1].received_at);
  server.reset_stats();
  CHECK(server.stats().responses.empty());
}

TEST_CASE("scenario JSON loads the tail latency and names bad tail keys",
          "[mock_llm_server][tail]") {
  using keel::testing::scenario;
  using keel::testing::scenario_error;
  const auto s = scenario::from_json(
      R"({"models": {"m": {"latency_ms": 20, "tail": {"fraction": 0.05, "latency_ms": 200}}}})");
  const fault_plan& p = s.plans.at("m");
  CHECK(p.latency_min == 20ms);
  CHECK(p.tail_fraction == Approx(0.05));
  CHECK(p.tail_latency == 200ms);
  CHECK(fault_plan{}.tail_fraction == 0);
  struct bad {
    const char* text;
    const char* path;
  };
  for (const bad& b : std::vector<bad>{
           {R"({"models": {"m": {"tail": 0.05}}})", "/models/m/tail"},
           {R"({"models": {"m": {"tail": {"fraction": 1.5, "latency_ms": 200}}}})",
            "/models/m/tail/fraction"},
           {R"({"models": {"m": {"tail": {"fraction": 0.1, "latency_ms": -1}}}})",
            "/models/m/tail/latency_ms"},
           {R"({"models": {"m": {"tail": {"fraction": 0.1}}}})", "/models/m/tail"},
           {R"({"models": {"m": {"tail": {"latency_ms": 200}}}})", "/models/m/tail"},
           {R"({"models": {"m": {"tail": {"fraction": 0.1, "latency_ms": 5, "p": 1}}}})",
            "/models/m/tail/p"},
       }) {
    INFO(b.text);
    try {
      (void)scenario::from_json(b.text);
      FAIL("no error");
    } catch (const scenario_error& e) {
      CHECK(e.path() == b.path);
      CHECK(std::string(e.what()).starts_with(b.path));
    }
  }
}
