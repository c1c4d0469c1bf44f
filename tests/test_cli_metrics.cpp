// Tests for tools/keel/metrics.hpp: the registry's exposition text, name checks, and the server.
#include "metrics.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/system/system_error.hpp>

#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using keel::cli::metrics_registry;
using keel::cli::metrics_server;

constexpr double inf = std::numeric_limits<double>::infinity();
constexpr const char* exposition_type = "text/plain; version=0.0.4; charset=utf-8";

// True if `f` throws std::logic_error itself (a conflict), not its subclass std::invalid_argument
// (a bad name or value).
template <class F>
bool throws_conflict(F f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return false;
  } catch (const std::logic_error&) {
    return true;
  }
  return false;
}

// ---- an HTTP client for the server tests ------------------------------------------------------

struct answer {
  boost::system::error_code ec;
  bhttp::response<bhttp::string_body> res;
  int status() const { return static_cast<int>(res.result_int()); }
  std::string header(bhttp::field f) const { return std::string(res[f]); }
};

bhttp::request<bhttp::string_body> make_request(bhttp::verb method, std::string target) {
  bhttp::request<bhttp::string_body> req{method, target, 11};
  req.set(bhttp::field::host, "127.0.0.1");
  req.keep_alive(true);
  return req;
}

// Writes `req` on `stream` and reads one response.
asio::awaitable<answer> exchange(beast::tcp_stream& stream, bhttp::request<bhttp::string_body> req,
                                 bool head = false) {
  req.prepare_payload();
  answer a;
  auto [wec, wn] = co_await bhttp::async_write(stream, req, asio::as_tuple(asio::use_awaitable));
  if (wec) {
    a.ec = wec;
    co_return a;
  }
  beast::flat_buffer buffer;
  bhttp::response_parser<bhttp::string_body> parser;
  parser.skip(head);
  auto [rec, rn] =
      co_await bhttp::async_read(stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
  a.ec = rec;
  if (!rec) {
    a.res = parser.release();
  }
  co_return a;
}

asio::awaitable<void> connect(beast::tcp_stream& stream, unsigned short port) {
  co_await stream.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                                asio::use_awaitable);
}

// Connects, exchanges once, and closes.
asio::awaitable<answer> fetch(unsigned short port, bhttp::verb method, std::string target) {
  beast::tcp_stream stream(co_await asio::this_coro::executor);
  co_await connect(stream, port);
  co_return co_await exchange(stream, make_request(method, std::move(target)),
                              method == bhttp::verb::head);
}

// Starts `server`, runs the client coroutine `body` to completion on `ctx`, then stops the
// server; `ctx` runs until every session has ended. No sleeps: the io_context simply runs out
// of work (the time limit only turns a hang into a failure).
void run(asio::io_context& ctx, metrics_server& server,
         std::function<asio::awaitable<void>()> body) {
  server.start();
  REQUIRE(server.port() != 0);
  bool done = false;
  std::exception_ptr error;
  asio::co_spawn(ctx, body(), [&](std::exception_ptr e) {
    error = e;
    done = true;
    server.stop();
  });
  ctx.run_for(std::chrono::seconds(30));
  REQUIRE(done);
  CHECK(ctx.stopped());
  if (error) {
    std::rethrow_exception(error);
  }
}

// ---- promtool ---------------------------------------------------------------------------------

std::optional<std::filesystem::path> find_on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (!path) {
    return std::nullopt;
  }
  std::stringstream dirs(path);
  std::string dir;
  while (std::getline(dirs, dir, ':')) {
    const auto candidate = std::filesystem::path(dir.empty() ? "." : dir) / program;
    if (::access(candidate.c_str(), X_OK) == 0 && std::filesystem::is_regular_file(candidate)) {
      return candidate;
    }
  }
  return std::nullopt;
}

struct check_result {
  int exit_status = -1;
  std::string output;
};

// Runs `promtool check metrics < file` on `exposition`; returns its exit status and output.
check_result promtool_check(const std::filesystem::path& promtool, const std::string& exposition,
                            const std::string& tag) {
  const auto dir = std::filesystem::temp_directory_path();
  const std::string stem = "keel_cli_metrics_" + std::to_string(::getpid()) + "_" + tag;
  const auto input = dir / (stem + ".prom");
  const auto output = dir / (stem + ".out");
  {
    std::ofstream f(input, std::ios::binary);
    f << exposition;
    REQUIRE(f.good());
  }
  const std::string cmd = "'" + promtool.string() + "' check metrics < '" + input.string() +
                          "' > '" + output.string() + "' 2>&1";
  const int raw = std::system(cmd.c_str());
  check_result r;
  r.exit_status = (raw != -1 && WIFEXITED(raw)) ? WEXITSTATUS(raw) : -1;
  std::ifstream out(output);
  r.output.assign(std::istreambuf_iterator<char>(out), std::istreambuf_iterator<char>());
  std::error_code ignored;
  std::filesystem::remove(input, ignored);
  std::filesystem::remove(output, ignored);
  return r;
}

}  // namespace

// ---- exposition text --------------------------------------------------------------------------

TEST_CASE("an empty registry renders nothing", "[cli_metrics]") {
  metrics_registry registry;
  CHECK(registry.render().empty());
}

TEST_CASE("a counter with labels renders its series in insertion order", "[cli_metrics]") {
  metrics_registry registry;
  auto& ok = registry.counter("keel_requests_total", "Requests sent to a provider.",
                              {{"provider", "openai"}, {"status", "200"}});
  auto& limited = registry.counter("keel_requests_total", "Requests sent to a provider.",
                                   {{"provider", "anthropic"}, {"status", "429"}});
  ok.inc();
  ok.inc(2);
  limited.inc(0.5);
  CHECK(ok.value() == 3);
  CHECK(limited.value() == 0.5);
  CHECK(registry.render() ==
        "# HELP keel_requests_total Requests sent to a provider.\n"
        "# TYPE keel_requests_total counter\n"
        "keel_requests_total{provider=\"openai\",status=\"200\"} 3\n"
        "keel_requests_total{provider=\"anthropic\",status=\"429\"} 0.5\n");
}

TEST_CASE("a counter refuses to go down", "[cli_metrics]") {
  metrics_registry registry;
  auto& c = registry.counter("keel_retries_total", "Retries.");
  CHECK_THROWS_AS(c.inc(-1), std::invalid_argument);
  CHECK_THROWS_AS(c.inc(std::nan("")), std::invalid_argument);
  c.inc(0);
  CHECK(c.value() == 0);
}

TEST_CASE("a gauge without labels renders set and add results", "[cli_metrics]") {
  metrics_registry registry;
  auto& g = registry.gauge("keel_in_flight_requests", "Requests awaiting an answer.");
  g.set(-2.5);
  g.add(1);
  CHECK(g.value() == -1.5);
  CHECK(registry.render() ==
        "# HELP keel_in_flight_requests Requests awaiting an answer.\n"
        "# TYPE keel_in_flight_requests gauge\n"
        "keel_in_flight_requests -1.5\n");
}

TEST_CASE("numbers are written as Prometheus parses them", "[cli_metrics]") {
  struct sample {
    double v;
    const char* text;
  };
  const std::vector<sample> samples = {
      {0, "0"},
      {-0.0, "0"},
      {1e6, "1000000"},
      {-42, "-42"},
      {9007199254740992.0, "9007199254740992"},
      {1e20, "1e+20"},
      {0.1, "0.1"},
      {1e-7, "1e-07"},
      {2.5, "2.5"},
      {inf, "+Inf"},
      {-inf, "-Inf"},
      {std::numeric_limits<double>::quiet_NaN(), "NaN"},
  };
  for (const auto& s : samples) {
    metrics_registry registry;
    registry.gauge("g", "h").set(s.v);
    INFO("value " << s.text);
    CHECK(registry.render() == std::string("# HELP g h\n# TYPE g gauge\ng ") + s.text + "\n");
  }
}

TEST_CASE("a histogram renders cumulative buckets, +Inf, sum and count", "[cli_metrics]") {
  metrics_registry registry;
  auto& h = registry.histogram("keel_request_duration_seconds", "Request latency.",
                               {0.25, 1, 2.5, 10}, {{"provider", "openai"}});
  for (const double v : {0.125, 0.25, 0.75, 3.0, 100.0}) {
    h.observe(v);
  }
  CHECK(h.count() == 5);
  CHECK(h.sum() == 104.125);
  CHECK(registry.render() ==
        "# HELP keel_request_duration_seconds Request latency.\n"
        "# TYPE keel_request_duration_seconds histogram\n"
        "keel_request_duration_seconds_bucket{provider=\"openai\",le=\"0.25\"} 2\n"
        "keel_request_duration_seconds_bucket{provider=\"openai\",le=\"1\"} 3\n"
        "keel_request_duration_seconds_bucket{provider=\"openai\",le=\"2.5\"} 3\n"
        "keel_request_duration_seconds_bucket{provider=\"openai\",le=\"10\"} 4\n"
        "keel_request_duration_seconds_bucket{provider=\"openai\",le=\"+Inf\"} 5\n"
        "keel_request_duration_seconds_sum{provider=\"openai\"} 104.125\n"
        "keel_request_duration_seconds_count{provider=\"openai\"} 5\n");
}

TEST_CASE("a histogram without bounds or labels has only the +Inf bucket", "[cli_metrics]") {
  metrics_registry registry;
  auto& h = registry.histogram("keel_batch_items", "Items per batch.", {});
  h.observe(7);
  h.observe(std::nan(""));  // counts in +Inf only and makes the sum NaN
  CHECK(registry.render() ==
        "# HELP keel_batch_items Items per batch.\n"
        "# TYPE keel_batch_items histogram\n"
        "keel_batch_items_bucket{le=\"+Inf\"} 2\n"
        "keel_batch_items_sum NaN\n"
        "keel_batch_items_count 2\n");
}

TEST_CASE("families are sorted by name whatever the registration order", "[cli_metrics]") {
  metrics_registry registry;
  registry.gauge("keel_zeta", "Z.").set(1);
  registry.counter("keel_alpha_total", "A.").inc();
  registry.histogram("keel_mid_seconds", "M.", {1}).observe(2);
  CHECK(registry.render() ==
        "# HELP keel_alpha_total A.\n"
        "# TYPE keel_alpha_total counter\n"
        "keel_alpha_total 1\n"
        "# HELP keel_mid_seconds M.\n"
        "# TYPE keel_mid_seconds histogram\n"
        "keel_mid_seconds_bucket{le=\"1\"} 0\n"
        "keel_mid_seconds_bucket{le=\"+Inf\"} 1\n"
        "keel_mid_seconds_sum 2\n"
        "keel_mid_seconds_count 1\n"
        "# HELP keel_zeta Z.\n"
        "# TYPE keel_zeta gauge\n"
        "keel_zeta 1\n");
}

TEST_CASE("label values and help text are escaped", "[cli_metrics]") {
  metrics_registry registry;
  registry
      .counter("keel_errors_total", "Errors by \"message\", with a \\ and a\nnewline.",
               {{"message", "say \"hi\"\\now\nthen"}})
      .inc();
  CHECK(registry.render() ==
        "# HELP keel_errors_total Errors by \"message\", with a \\\\ and a\\nnewline.\n"
        "# TYPE keel_errors_total counter\n"
        "keel_errors_total{message=\"say \\\"hi\\\"\\\\now\\nthen\"} 1\n");
}

TEST_CASE("invalid metric names, label names and label values are rejected", "[cli_metrics]") {
  metrics_registry registry;
  for (const char* bad : {"", "1abc", "a-b", "a b", "caf\xc3\xa9", "a.b"}) {
    INFO("metric name '" << bad << "'");
    CHECK_THROWS_AS(registry.counter(bad, "h"), std::invalid_argument);
    CHECK_THROWS_AS(registry.gauge(bad, "h"), std::invalid_argument);
    CHECK_THROWS_AS(registry.histogram(bad, "h", {1}), std::invalid_argument);
  }
  for (const char* bad : {"", "1a", "a:b", "a-b", "__reserved", "caf\xc3\xa9"}) {
    INFO("label name '" << bad << "'");
    CHECK_THROWS_AS(registry.counter("ok_total", "h", {{bad, "v"}}), std::invalid_argument);
  }
  CHECK_THROWS_AS(registry.counter("ok_total", "h", {{"a", "1"}, {"a", "2"}}),
                  std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("ok_total", "h", {{"a", "\xff"}}), std::invalid_argument);
  CHECK_THROWS_AS(registry.counter("ok_total", "\xc0\xaf"), std::invalid_argument);
  CHECK_THROWS_AS(registry.histogram("ok_seconds", "h", {1}, {{"le", "1"}}), std::invalid_argument);
  // Bucket bounds: strictly increasing and finite.
  CHECK_THROWS_AS(registry.histogram("ok_seconds", "h", {1, 1}), std::invalid_argument);
  CHECK_THROWS_AS(registry.histogram("ok_seconds", "h", {2, 1}), std::invalid_argument);
  CHECK_THROWS_AS(registry.histogram("ok_seconds", "h", {std::nan("")}), std::invalid_argument);
  CHECK_THROWS_AS(registry.histogram("ok_seconds", "h", {-inf, 1}), std::invalid_argument);
  // Nothing was registered by the failed calls.
  CHECK(registry.render().empty());

  // The edges of the grammar are accepted.
  registry.counter("_a:b_total", "h", {{"_x1", ""}, {"Y", "caf\xc3\xa9 \xf0\x9f\x90\x9f"}}).inc();
  CHECK(registry.render() ==
        "# HELP _a:b_total h\n# TYPE _a:b_total counter\n"
        "_a:b_total{_x1=\"\",Y=\"caf\xc3\xa9 \xf0\x9f\x90\x9f\"} 1\n");
}

TEST_CASE("the same name and labels return the same series", "[cli_metrics]") {
  metrics_registry registry;
  auto& a = registry.counter("keel_calls_total", "h", {{"x", "1"}, {"y", "2"}});
  auto& b = registry.counter("keel_calls_total", "other help", {{"y", "2"}, {"x", "1"}});
  auto& c = registry.counter("keel_calls_total", "h", {{"x", "1"}, {"y", "3"}});
  CHECK(&a == &b);
  CHECK(&a != &c);
  auto& g = registry.gauge("keel_level", "h");
  CHECK(&g == &registry.gauge("keel_level", "h"));
  auto& h = registry.histogram("keel_size_bytes", "h", {1, 2});
  CHECK(&h == &registry.histogram("keel_size_bytes", "h", {1, 2, inf}));  // +Inf is implicit
  a.inc();
  b.inc();
  c.inc(5);
  // Two series, labels in the order first given, help from the first registration.
  CHECK(
      registry.render().starts_with("# HELP keel_calls_total h\n"
                                    "# TYPE keel_calls_total counter\n"
                                    "keel_calls_total{x=\"1\",y=\"2\"} 2\n"
                                    "keel_calls_total{x=\"1\",y=\"3\"} 5\n"
                                    "# HELP keel_level h\n"));
}

TEST_CASE("registering a name with another type or other buckets throws", "[cli_metrics]") {
  metrics_registry registry;
  registry.counter("keel_x", "h").inc();
  registry.histogram("keel_latency_seconds", "h", {1, 2}).observe(1);

  CHECK(throws_conflict([&] { registry.gauge("keel_x", "h"); }));
  CHECK(throws_conflict([&] { registry.histogram("keel_x", "h", {1}); }));
  CHECK(throws_conflict([&] { registry.counter("keel_latency_seconds", "h"); }));
  CHECK(throws_conflict([&] { registry.histogram("keel_latency_seconds", "h", {1, 3}); }));
  CHECK(throws_conflict([&] { registry.histogram("keel_latency_seconds", "h", {1}); }));
  // A histogram's sample names are taken too, in both registration orders.
  CHECK(throws_conflict([&] { registry.counter("keel_latency_seconds_count", "h"); }));
  CHECK(throws_conflict([&] { registry.gauge("keel_latency_seconds_bucket", "h"); }));
  registry.gauge("keel_queue_sum", "h");
  CHECK(throws_conflict([&] { registry.histogram("keel_queue", "h", {1}); }));
  CHECK_THROWS_WITH(registry.gauge("keel_x", "h"), Catch::Contains("keel_x") &&
                                                       Catch::Contains("counter") &&
                                                       Catch::Contains("gauge"));

  // Nothing but the one valid registration changed the registry (families sort by name).
  CHECK(registry.render() ==
        "# HELP keel_latency_seconds h\n"
        "# TYPE keel_latency_seconds histogram\n"
        "keel_latency_seconds_bucket{le=\"1\"} 1\n"
        "keel_latency_seconds_bucket{le=\"2\"} 1\n"
        "keel_latency_seconds_bucket{le=\"+Inf\"} 1\n"
        "keel_latency_seconds_sum 1\n"
        "keel_latency_seconds_count 1\n"
        "# HELP keel_queue_sum h\n"
        "# TYPE keel_queue_sum gauge\n"
        "keel_queue_sum 0\n"
        "# HELP keel_x h\n"
        "# TYPE keel_x counter\n"
        "keel_x 1\n");
}

TEST_CASE("counters, gauges and histograms can be updated from several threads",
          "[cli_metrics][threads]") {
  metrics_registry registry;
  auto& c = registry.counter("keel_threads_total", "h");
  auto& g = registry.gauge("keel_threads_level", "h");
  auto& h = registry.histogram("keel_threads_seconds", "h", {0.5});
  constexpr int threads = 4;
  constexpr int per_thread = 20000;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int i = 0; i < per_thread; ++i) {
        c.inc();
        g.add(2);
        h.observe(i % 2 == 0 ? 0.25 : 1.0);
        // Registration and rendering run concurrently with the updates.
        if (i % 5000 == 0) {
          (void)registry.counter("keel_threads_total", "h");
          (void)registry.render();
        }
      }
    });
  }
  for (auto& t : pool) {
    t.join();
  }
  CHECK(c.value() == threads * per_thread);
  CHECK(g.value() == 2.0 * threads * per_thread);
  CHECK(h.count() == static_cast<std::uint64_t>(threads * per_thread));
  CHECK(h.sum() == 0.625 * threads * per_thread);
  CHECK(registry.render().find("keel_threads_seconds_bucket{le=\"0.5\"} 40000\n") !=
        std::string::npos);
}

// ---- promtool ---------------------------------------------------------------------------------

TEST_CASE("promtool accepts the rendering of every metric type", "[cli_metrics]") {
  const auto promtool = find_on_path("promtool");
  if (!promtool) {
    WARN("promtool is not on PATH (Debian package prometheus); skipping the promtool check");
    return;
  }
  metrics_registry registry;
  registry
      .counter("keel_requests_total", "Requests sent to a provider.",
               {{"provider", "openai"}, {"status", "200"}})
      .inc(41);
  registry
      .counter("keel_requests_total", "Requests sent to a provider.",
               {{"provider", "anthropic"}, {"status", "429"}})
      .inc(0.5);
  registry
      .counter("keel_errors_total", "Errors by message: a \\ backslash and a\nnewline.",
               {{"message", "say \"hi\"\\now\nthen caf\xc3\xa9"}})
      .inc();
  registry.counter("keel_huge_total", "A very large count.").inc(1e20);
  registry.gauge("keel_in_flight_requests", "Requests awaiting an answer.").set(-3.25);
  registry.gauge("keel_breaker_open_ratio", "Share of open breakers.", {{"pool", "a"}}).set(inf);
  registry.gauge("keel_breaker_open_ratio", "Share of open breakers.", {{"pool", "b"}}).set(-inf);
  registry.gauge("keel_breaker_open_ratio", "Share of open breakers.", {{"pool", "c"}})
      .set(std::nan(""));
  auto& latency = registry.histogram("keel_request_duration_seconds", "Request latency.",
                                     {0.005, 0.1, 1, 2.5, 1e6}, {{"provider", "openai"}});
  latency.observe(0.05);
  latency.observe(3);
  registry
      .histogram("keel_request_duration_seconds", "Request latency.", {0.005, 0.1, 1, 2.5, 1e6},
                 {{"provider", "bedrock"}})
      .observe(2e6);
  registry.histogram("keel_batch_size_bytes", "Batch sizes.", {}).observe(10);
  const std::string text = registry.render();
  INFO(text);

  const check_result good = promtool_check(*promtool, text, "good");
  INFO("promtool said: " << good.output);
  CHECK(good.exit_status == 0);

  // The check can fail: a sample that is not a number, and a family declared twice.
  const check_result bad_value =
      promtool_check(*promtool,
                     text +
                         "# HELP keel_broken_total B.\n# TYPE keel_broken_total counter\n"
                         "keel_broken_total{a=\"1\"} one\n",
                     "bad_value");
  INFO("promtool said: " << bad_value.output);
  CHECK(bad_value.exit_status != 0);
  const check_result twice = promtool_check(
      *promtool, text + "# TYPE keel_requests_total gauge\nkeel_requests_total 1\n", "twice");
  INFO("promtool said: " << twice.output);
  CHECK(twice.exit_status != 0);
}

// ---- the server -------------------------------------------------------------------------------

TEST_CASE("the server answers GET /metrics with the rendering and its content type",
          "[cli_metrics]") {
  asio::io_context ctx;
  metrics_registry registry;
  auto& requests = registry.counter("keel_requests_total", "Requests.", {{"provider", "openai"}});
  requests.inc(3);
  registry.histogram("keel_request_duration_seconds", "Latency.", {1}).observe(0.5);
  metrics_server server{ctx.get_executor(), registry};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    beast::tcp_stream stream(co_await asio::this_coro::executor);
    co_await connect(stream, server.port());

    const answer first = co_await exchange(stream, make_request(bhttp::verb::get, "/metrics"));
    REQUIRE_FALSE(first.ec);
    CHECK(first.status() == 200);
    CHECK(first.header(bhttp::field::content_type) == exposition_type);
    CHECK(first.res.body() == registry.render());
    CHECK(first.res.body().find("keel_requests_total{provider=\"openai\"} 3\n") !=
          std::string::npos);
    CHECK(first.res.keep_alive());

    // The same connection serves the next scrape, rendered afresh (and a query string is fine).
    requests.inc();
    const answer second =
        co_await exchange(stream, make_request(bhttp::verb::get, "/metrics?name[]=x"));
    REQUIRE_FALSE(second.ec);
    CHECK(second.status() == 200);
    CHECK(second.res.body().find("keel_requests_total{provider=\"openai\"} 4\n") !=
          std::string::npos);
    CHECK(second.res.body() == registry.render());
  });
}

TEST_CASE("the server answers 404 for other paths and 405 for other methods", "[cli_metrics]") {
  asio::io_context ctx;
  metrics_registry registry;
  registry.gauge("keel_level", "Level.").set(1);
  metrics_server server{ctx.get_executor(), registry};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const unsigned short port = server.port();
    for (const char* path : {"/", "/metric", "/metrics/", "/other?x=/metrics"}) {
      INFO("path " << path);
      const answer a = co_await fetch(port, bhttp::verb::get, path);
      REQUIRE_FALSE(a.ec);
      CHECK(a.status() == 404);
    }
    for (const bhttp::verb method : {bhttp::verb::post, bhttp::verb::put, bhttp::verb::delete_}) {
      INFO("method " << bhttp::to_string(method));
      const answer a = co_await fetch(port, method, "/metrics");
      REQUIRE_FALSE(a.ec);
      CHECK(a.status() == 405);
      CHECK(a.header(bhttp::field::allow) == "GET, HEAD");
    }
    // HEAD: the GET headers without a body.
    const answer head = co_await fetch(port, bhttp::verb::head, "/metrics");
    REQUIRE_FALSE(head.ec);
    CHECK(head.status() == 200);
    CHECK(head.header(bhttp::field::content_type) == exposition_type);
    CHECK(head.header(bhttp::field::content_length) == std::to_string(registry.render().size()));
    CHECK(head.res.body().empty());
  });
}

TEST_CASE("the server rejects a request header or body over 64 KiB", "[cli_metrics]") {
  asio::io_context ctx;
  metrics_registry registry;
  metrics_server server{ctx.get_executor(), registry};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const unsigned short port = server.port();
    {
      beast::tcp_stream stream(co_await asio::this_coro::executor);
      co_await connect(stream, port);
      auto req = make_request(bhttp::verb::get, "/metrics");
      for (const char* name : {"x-filler-1", "x-filler-2", "x-filler-3"}) {
        req.set(name, std::string(25 * 1024, 'a'));  // Beast caps one field value at 64 KiB
      }
      const answer a = co_await exchange(stream, std::move(req));
      REQUIRE_FALSE(a.ec);
      CHECK(a.status() == 431);
      CHECK_FALSE(a.res.keep_alive());
    }
    {
      beast::tcp_stream stream(co_await asio::this_coro::executor);
      co_await connect(stream, port);
      auto req = make_request(bhttp::verb::get, "/metrics");
      req.body() = std::string(64 * 1024 + 1, 'b');
      const answer a = co_await exchange(stream, std::move(req));
      REQUIRE_FALSE(a.ec);
      CHECK(a.status() == 413);
      CHECK_FALSE(a.res.keep_alive());
    }
    {
      // A body of exactly 64 KiB is accepted (and ignored).
      beast::tcp_stream stream(co_await asio::this_coro::executor);
      co_await connect(stream, port);
      auto req = make_request(bhttp::verb::get, "/metrics");
      req.body() = std::string(64 * 1024, 'c');
      const answer a = co_await exchange(stream, std::move(req));
      REQUIRE_FALSE(a.ec);
      CHECK(a.status() == 200);
    }
    {
      // Garbage is a 400.
      beast::tcp_stream stream(co_await asio::this_coro::executor);
      co_await connect(stream, port);
      co_await asio::async_write(stream, asio::buffer(std::string("NOT HTTP AT ALL\r\n\r\n")),
                                 asio::use_awaitable);
      beast::flat_buffer buffer;
      bhttp::response<bhttp::string_body> res;
      co_await bhttp::async_read(stream, buffer, res, asio::use_awaitable);
      CHECK(res.result_int() == 400);
    }
  });
}

TEST_CASE("stop closes the acceptor and open keep-alive connections", "[cli_metrics]") {
  asio::io_context ctx;
  metrics_registry registry;
  registry.gauge("keel_level", "Level.").set(1);
  metrics_server server{ctx.get_executor(), registry};
  run(ctx, server, [&]() -> asio::awaitable<void> {
    const unsigned short port = server.port();
    beast::tcp_stream idle(co_await asio::this_coro::executor);
    co_await connect(idle, port);
    const answer a = co_await exchange(idle, make_request(bhttp::verb::get, "/metrics"));
    REQUIRE_FALSE(a.ec);
    REQUIRE(a.res.keep_alive());

    // A second connection with half a request in flight (after a whole one, so that the server
    // has certainly accepted it and is reading).
    beast::tcp_stream partial(co_await asio::this_coro::executor);
    co_await connect(partial, port);
    const answer b = co_await exchange(partial, make_request(bhttp::verb::get, "/metrics"));
    REQUIRE_FALSE(b.ec);
    co_await asio::async_write(partial, asio::buffer(std::string("GET /metrics HTTP/1.1\r\n")),
                               asio::use_awaitable);

    server.stop();
    server.stop();  // idempotent

    char byte = 0;
    auto [idle_ec, idle_n] =
        co_await idle.async_read_some(asio::buffer(&byte, 1), asio::as_tuple(asio::use_awaitable));
    CHECK(idle_ec);  // eof or reset: the server closed the connection
    CHECK(idle_n == 0);
    auto [partial_ec, partial_n] = co_await partial.async_read_some(
        asio::buffer(&byte, 1), asio::as_tuple(asio::use_awaitable));
    CHECK(partial_ec);  // the half-read request is abandoned, not answered
    CHECK(partial_n == 0);

    beast::tcp_stream late(co_await asio::this_coro::executor);
    auto [cec] =
        co_await late.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                                    asio::as_tuple(asio::use_awaitable));
    CHECK(cec == asio::error::connection_refused);
  });
  CHECK_THROWS_AS(server.start(), std::logic_error);  // a stopped server stays stopped
}

TEST_CASE("start names the address and port it cannot listen on", "[cli_metrics]") {
  asio::io_context ctx;
  metrics_registry registry;
  metrics_server first{ctx.get_executor(), registry};
  first.start();
  first.start();  // already running: nothing happens
  const unsigned short port = first.port();
  REQUIRE(port != 0);

  metrics_server taken{ctx.get_executor(), registry, "127.0.0.1", port};
  CHECK_THROWS_AS(taken.start(), boost::system::system_error);
  CHECK_THROWS_WITH(taken.start(), Catch::Contains("127.0.0.1:" + std::to_string(port)));
  CHECK(taken.port() == 0);

  metrics_server invalid{ctx.get_executor(), registry, "not-an-address", 9464};
  CHECK_THROWS_AS(invalid.start(), boost::system::system_error);
  CHECK_THROWS_WITH(invalid.start(), Catch::Contains("not-an-address:9464"));

  metrics_server v6{ctx.get_executor(), registry, "::ffff:999.0.0.1", 1};
  CHECK_THROWS_WITH(v6.start(), Catch::Contains("[::ffff:999.0.0.1]:1"));

  first.stop();
  ctx.run_for(std::chrono::seconds(10));
  CHECK(ctx.stopped());
}
