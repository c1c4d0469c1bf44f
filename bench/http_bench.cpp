// Issue 4, target 8: keel::http::client's requests per second against a plain local HTTP server,
// to compare with `wrk` on the same server and the same number of connections.
//
//   build-bench/bench/bench_http --serve 8090                 # the plain server (one thread)
//   wrk -t1 -c64 -d10s http://127.0.0.1:8090/                 # wrk's number
//   build-bench/bench/bench_http --url http://127.0.0.1:8090/ --connections 64 --seconds 10
//
// scripts/bench-http.sh runs all three, pinned to separate cores, and prints the ratio.
//
// The server is a minimal Boost.Beast HTTP/1.1 keep-alive server on one thread that answers
// every request with the same 200 and a small JSON body: plain enough that the client (or wrk)
// is what is measured. The client runs `--connections` coroutines on one thread, each sending
// GET requests back to back through one `keel::http::client` whose pool allows that many
// connections, for `--seconds` after a one-second warm-up; it prints requests per second.
#include <keel/http/client.hpp>

#include <fmt/core.h>
#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>

#include <chrono>
#include <cstdint>
#include <exception>
#include <string>

namespace asio = boost::asio;
namespace http = boost::beast::http;
using tcp = asio::ip::tcp;
using steady = std::chrono::steady_clock;

namespace {

const std::string k_body =
    R"({"id":"bench","object":"chat.completion","choices":[{"index":0,"message":)"
    R"({"role":"assistant","content":"ok"},"finish_reason":"stop"}],)"
    R"("usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}})";

asio::awaitable<void> serve_connection(tcp::socket socket) {
  boost::beast::flat_buffer buffer;
  try {
    for (;;) {
      http::request<http::string_body> req;
      co_await http::async_read(socket, buffer, req, asio::use_awaitable);
      http::response<http::string_body> res{http::status::ok, req.version()};
      res.set(http::field::content_type, "application/json");
      res.keep_alive(req.keep_alive());
      res.body() = k_body;
      res.prepare_payload();
      co_await http::async_write(socket, res, asio::use_awaitable);
      if (!res.keep_alive()) {
        break;
      }
    }
  } catch (const std::exception&) {
    // The peer closed or reset the connection: normal at the end of a run.
  }
}

asio::awaitable<void> accept_loop(tcp::acceptor acceptor) {
  for (;;) {
    tcp::socket socket = co_await acceptor.async_accept(asio::use_awaitable);
    socket.set_option(tcp::no_delay(true));
    asio::co_spawn(acceptor.get_executor(), serve_connection(std::move(socket)), asio::detached);
  }
}

int serve(unsigned short port) {
  asio::io_context ctx{1};
  tcp::acceptor acceptor{ctx, {asio::ip::make_address("127.0.0.1"), port}};
  fmt::print("serving on http://127.0.0.1:{}/\n", acceptor.local_endpoint().port());
  std::fflush(stdout);
  asio::co_spawn(ctx, accept_loop(std::move(acceptor)), asio::detached);
  ctx.run();
  return 0;
}

int run_client(const std::string& url, int connections, double seconds) {
  asio::io_context ctx{1};
  keel::http::client_options options;
  options.max_connections_per_host = static_cast<std::size_t>(connections);
  options.max_requests_per_connection = 1'000'000'000;  // wrk never reconnects either
  keel::http::client client{ctx.get_executor(), options};
  std::int64_t measured = 0;
  std::int64_t errors = 0;
  const auto warm_until = steady::now() + std::chrono::seconds(1);
  const auto end = warm_until + std::chrono::duration_cast<steady::duration>(
                                    std::chrono::duration<double>(seconds));
  for (int i = 0; i < connections; ++i) {
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          const keel::http::request req{"GET", url};
          for (;;) {
            try {
              const keel::http::response res = co_await client.send(req);
              const auto now = steady::now();
              if (now >= end) {
                break;
              }
              if (now >= warm_until) {
                res.status == 200 ? ++measured : ++errors;
              }
            } catch (const std::exception& e) {
              ++errors;
              if (errors == 1) {
                fmt::print(stderr, "bench_http: {}\n", e.what());
              }
              if (steady::now() >= end) {
                break;
              }
            }
          }
        },
        asio::detached);
  }
  ctx.run();
  const double rps = static_cast<double>(measured) / seconds;
  fmt::print(
      "keel::http::client: {} connections, {:.0f} s: {} responses, {} errors, "
      "{:.0f} requests/s, {} connections opened\n",
      connections, seconds, measured, errors, rps, client.connections_opened());
  fmt::print(
      "json {{\"connections\":{},\"seconds\":{},\"responses\":{},\"errors\":{},"
      "\"requests_per_second\":{:.1f}}}\n",
      connections, seconds, measured, errors, rps);
  return errors == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"keel::http::client throughput against a plain local server (issue 4, target 8)"};
  int port = -1;
  std::string url;
  int connections = 64;
  double seconds = 10;
  app.add_option("--serve", port, "run the plain server on this port (0: any)")
      ->check(CLI::Range(0, 65535));
  app.add_option("--url", url, "measure the client against this URL");
  app.add_option("--connections", connections, "connections (and concurrent requests)")
      ->check(CLI::Range(1, 100'000));
  app.add_option("--seconds", seconds, "measured time, after a one-second warm-up")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    if (port >= 0) {
      return serve(static_cast<unsigned short>(port));
    }
    if (url.empty()) {
      fmt::print(stderr, "bench_http: give --serve PORT or --url URL\n");
      return 2;
    }
    return run_client(url, connections, seconds);
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_http: {}\n", e.what());
    return 2;
  }
}
