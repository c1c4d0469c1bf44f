// Tests for keel/http/client.hpp against an in-test Beast server on 127.0.0.1:0 (HTTP and TLS).
#include <keel/deadline.hpp>
#include <keel/http/client.hpp>
#include <keel/http/error.hpp>

#include "support.hpp"
#include "tls_support.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <catch2/catch.hpp>

#include <unistd.h>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

using namespace keel_test;
namespace bhttp = boost::beast::http;
namespace kh = keel::http;
using tcp = asio::ip::tcp;

namespace {

/// What the server does with one request.
enum class act {
  normal,              // 200 with an echo body, keep-alive
  chunked,             // 200, chunked encoding
  oversized,           // 200 with a 1 MiB Content-Length body
  oversized_chunked,   // an endless chunked body (up to 32 MiB)
  many_headers,        // 150 header fields
  huge_header,         // one 100 KiB header field
  close,               // close without answering
  eof_mid_body,        // Content-Length 100, send 10 bytes, close
  stall,               // never answer (keep reading until the client closes)
  interim_then_ok,     // 100 Continue and 103 Early Hints, then 200 "final", keep-alive
  status_000,          // "HTTP/1.1 000 Zero" with a body, then close
  switching,           // 101 Switching Protocols, then close
  huge_trailer,        // a chunked 200 whose one trailer field is 70,000 bytes
  endless_chunk_ext,   // a chunk-size line whose extension never ends (up to 32 MiB)
  endless_trailers,    // a chunked 200 whose trailer section never ends (up to 32 MiB)
  until_close,         // a 200 with no length (its body ends at the close): TLS sends close_notify
  until_close_abrupt,  // the same, but a TLS server closes TCP without a close_notify
};

/// A scripted HTTP/1.1 server on 127.0.0.1:0, optionally over TLS. `plan(k)` decides what to do
/// with the k-th request (0-based, counted over all connections).
struct test_server {
  explicit test_server(asio::io_context& ctx, asio::ssl::context* tls = nullptr)
      : acceptor(ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)), tls_ctx(tls) {
    asio::co_spawn(ctx, accept_loop(), asio::detached);
  }
  unsigned short port() const { return acceptor.local_endpoint().port(); }
  std::string url(const std::string& path = "/") const {
    return std::string(tls_ctx ? "https" : "http") + "://127.0.0.1:" + std::to_string(port()) +
           path;
  }

  tcp::acceptor acceptor;
  asio::ssl::context* tls_ctx;
  std::function<act(int)> plan = [](int) { return act::normal; };
  int accepts = 0;
  int requests = 0;
  int stalled = 0;
  int sessions_ended = 0;
  int handshake_failures = 0;
  int resumed_sessions = 0;  // TLS handshakes that resumed a session
  std::string last_user_agent;
  std::string last_host;

  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, sock] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) {
        co_return;
      }
      ++accepts;
      asio::co_spawn(acceptor.get_executor(), session(std::move(sock)), asio::detached);
    }
  }

  asio::awaitable<void> session(tcp::socket sock) {
    if (tls_ctx) {
      asio::ssl::stream<tcp::socket> s(std::move(sock), *tls_ctx);
      auto [ec] = co_await s.async_handshake(asio::ssl::stream_base::server,
                                             asio::as_tuple(asio::use_awaitable));
      if (ec) {
        ++handshake_failures;
      } else {
        resumed_sessions += SSL_session_reused(s.native_handle()) == 1 ? 1 : 0;
        co_await serve(s);
      }
    } else {
      co_await serve(sock);
    }
    ++sessions_ended;
  }

  template <class Stream>
  static asio::awaitable<void> raw(Stream& s, const std::string& bytes) {
    co_await asio::async_write(s, asio::buffer(bytes), asio::as_tuple(asio::use_awaitable));
  }

  template <class Stream>
  asio::awaitable<void> serve(Stream& s) {
    boost::beast::flat_buffer buf;
    for (;;) {
      bhttp::request<bhttp::string_body> req;
      auto [ec, n] = co_await bhttp::async_read(s, buf, req, asio::as_tuple(asio::use_awaitable));
      if (ec) {
        co_return;
      }
      last_user_agent = std::string(req[bhttp::field::user_agent]);
      last_host = std::string(req[bhttp::field::host]);
      const act a = plan(requests++);
      switch (a) {
        case act::normal:
        case act::chunked: {
          bhttp::response<bhttp::string_body> res{bhttp::status::ok, 11};
          res.set("x-test", "yes");
          res.body() = "echo " + std::string(req.method_string()) + " " +
                       std::string(req.target()) + " " + req.body();
          res.keep_alive(req.keep_alive());
          if (plan(requests - 1) == act::chunked) {
            res.chunked(true);
          } else {
            res.prepare_payload();
          }
          auto [wec, wn] = co_await bhttp::async_write(s, res, asio::as_tuple(asio::use_awaitable));
          if (wec) {
            co_return;
          }
          break;
        }
        case act::oversized:
          co_await raw(
              s, "HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + std::string(1048576, 'x'));
          co_return;
        case act::oversized_chunked: {
          co_await raw(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
          const std::string chunk = "10000\r\n" + std::string(0x10000, 'y') + "\r\n";
          for (int i = 0; i < 512; ++i) {
            auto [wec, wn] = co_await asio::async_write(s, asio::buffer(chunk),
                                                        asio::as_tuple(asio::use_awaitable));
            if (wec) {
              co_return;
            }
          }
          co_return;
        }
        case act::many_headers: {
          std::string head = "HTTP/1.1 200 OK\r\n";
          for (int i = 0; i < 150; ++i) {
            head += "x-h" + std::to_string(i) + ": v\r\n";
          }
          co_await raw(s, head + "Content-Length: 0\r\n\r\n");
          break;
        }
        case act::huge_header:
          co_await raw(s, "HTTP/1.1 200 OK\r\nx-big: " + std::string(100 * 1024, 'z') +
                              "\r\nContent-Length: 0\r\n\r\n");
          co_return;
        case act::huge_trailer:
          co_await raw(s,
                       "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                       "5\r\nhello\r\n0\r\nx-trailer: " +
                           std::string(70000, 't') + "\r\n\r\n");
          co_return;
        case act::endless_chunk_ext:
        case act::endless_trailers: {
          co_await raw(s, a == act::endless_chunk_ext
                              ? "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext="
                              : "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                "5\r\nhello\r\n0\r\n");
          const std::string more = a == act::endless_chunk_ext
                                       ? std::string(0x10000, 'e')
                                       : "x-t: " + std::string(0x10000 - 7, 't') + "\r\n";
          for (int i = 0; i < 512; ++i) {
            auto [wec, wn] = co_await asio::async_write(s, asio::buffer(more),
                                                        asio::as_tuple(asio::use_awaitable));
            if (wec) {
              co_return;
            }
          }
          co_return;
        }
        case act::close:
          co_return;
        case act::eof_mid_body:
          co_await raw(s, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
          co_return;
        case act::stall:
          ++stalled;
          break;  // read again: that read ends when the client closes the connection
        case act::interim_then_ok:
          co_await raw(s,
                       "HTTP/1.1 100 Continue\r\n\r\n"
                       "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                       "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal");
          break;
        case act::status_000:
          co_await raw(s, "HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\n{}");
          co_return;
        case act::switching:
          co_await raw(s, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n");
          co_return;
        case act::until_close:
        case act::until_close_abrupt:
          co_await raw(s, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close");
          if constexpr (!std::is_same_v<Stream, tcp::socket>) {
            if (a == act::until_close) {
              co_await s.async_shutdown(asio::as_tuple(asio::use_awaitable));
            }
          }
          co_return;
      }
    }
  }
};

/// A TLS test server and a client that trusts its CA, with default options otherwise.
struct trusted_tls {
  /// The client's options: the test CA trusted.
  static kh::client_options trusting(const test_pki& p) {
    kh::client_options o;
    o.tls.ca_file = p.ca_file;
    return o;
  }
  test_pki pki;
  asio::io_context ctx;
  test_server srv{ctx, &pki.server_ctx};
  kh::client cl{ctx.get_executor(), trusting(pki)};
};

/// Sends one request and runs until it ends.
outcome<kh::response> send_one(asio::io_context& ctx, kh::client& cl, kh::request req) {
  outcome<kh::response> out;
  spawn(ctx, cl.send(std::move(req)), out);
  REQUIRE(run_real(ctx, [&] { return out.done; }));
  return out;
}

std::string described(const std::exception_ptr& ep) {
  return keel::describe(ep);
}

}  // namespace

TEST_CASE("http client: GET and POST round trips with Host and User-Agent added", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  kh::client cl(ctx.get_executor(), kh::client_options{});

  auto get = send_one(ctx, cl, kh::request("GET", srv.url("/v1/models?x=1")));
  REQUIRE(get.value);
  CHECK(get.value->status == 200);
  CHECK(get.value->reason == "OK");
  CHECK(get.value->body == "echo GET /v1/models?x=1 ");
  CHECK(get.value->headers.find("X-Test") == "yes");
  CHECK(srv.last_user_agent == "keel/0.1");
  CHECK(srv.last_host == "127.0.0.1:" + std::to_string(srv.port()));

  kh::request post("POST", srv.url("/v1/chat"));
  post.set("content-type", "application/json");
  post.body = R"({"a":1})";
  auto res = send_one(ctx, cl, post);
  REQUIRE(res.value);
  CHECK(res.value->body == R"(echo POST /v1/chat {"a":1})");
  CHECK(cl.connections_opened() == 1);
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http client: a chunked response is de-chunked", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int) { return act::chunked; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto res = send_one(ctx, cl, kh::request("GET", srv.url("/c")));
  REQUIRE(res.value);
  CHECK(res.value->body == "echo GET /c ");
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http client: keep-alive reuses one connection for sequential requests", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  kh::client cl(ctx.get_executor(), kh::client_options{});
  int ok = 0;
  auto seq = [&]() -> asio::awaitable<int> {
    for (int i = 0; i < 10; ++i) {
      auto r = co_await cl.send(kh::request("GET", srv.url("/" + std::to_string(i))));
      ok += r.status == 200 ? 1 : 0;
    }
    co_return ok;
  };
  outcome<int> out;
  spawn(ctx, seq(), out);
  REQUIRE(run_real(ctx, [&] { return out.done; }));
  CHECK(out.value == 10);
  CHECK(srv.accepts == 1);
  CHECK(cl.connections_opened() == 1);
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http client: max_requests_per_connection closes a connection after N requests",
          "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  kh::client_options opts;
  opts.max_requests_per_connection = 3;
  kh::client cl(ctx.get_executor(), opts);
  auto seq = [&]() -> asio::awaitable<int> {
    int ok = 0;
    for (int i = 0; i < 10; ++i) {
      auto r = co_await cl.send(kh::request("GET", srv.url()));
      ok += r.status == 200 ? 1 : 0;
    }
    co_return ok;
  };
  outcome<int> out;
  spawn(ctx, seq(), out);
  REQUIRE(run_real(ctx, [&] { return out.done; }));
  CHECK(out.value == 10);
  CHECK(srv.accepts == 4);  // 3 + 3 + 3 + 1
  CHECK(cl.connections_opened() == 4);
}

TEST_CASE("http client: concurrent sends never exceed max_connections_per_host", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  kh::client_options opts;
  opts.max_connections_per_host = 2;
  kh::client cl(ctx.get_executor(), opts);
  std::vector<outcome<kh::response>> outs(6);
  for (auto& o : outs) {
    spawn(ctx, cl.send(kh::request("GET", srv.url())), o);
  }
  REQUIRE(run_real(ctx, [&] {
    return std::all_of(outs.begin(), outs.end(), [](const auto& o) { return o.done; });
  }));
  for (const auto& o : outs) {
    REQUIRE(o.value);
    CHECK(o.value->status == 200);
  }
  CHECK(cl.connections_opened() == 2);
  CHECK(srv.accepts == 2);
  CHECK(cl.pooled_idle() == 2);
}

TEST_CASE("http client: an oversized body fails with body_too_large (permanent)", "[http]") {
  for (act a : {act::oversized, act::oversized_chunked}) {
    asio::io_context ctx;
    test_server srv(ctx);
    srv.plan = [a](int) { return a; };
    kh::client_options opts;
    opts.max_response_body = 64 * 1024;
    kh::client cl(ctx.get_executor(), opts);
    auto out = send_one(ctx, cl, kh::request("GET", srv.url()));
    CHECK(out.code() == kh::error::body_too_large);
    CHECK(out.code() == keel::condition::permanent);
    CHECK(cl.pooled_idle() == 0);
    // The client stopped reading and closed; the server's endless writes failed.
    REQUIRE(run_real(ctx, [&] { return srv.sessions_ended == 1; }));
  }
}

TEST_CASE("http client: too many or too large response headers fail (permanent)", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int k) { return k == 0 ? act::many_headers : act::huge_header; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto many = send_one(ctx, cl, kh::request("GET", srv.url()));
  CHECK(many.code() == kh::error::too_many_headers);
  CHECK(many.code() == keel::condition::permanent);
  auto huge = send_one(ctx, cl, kh::request("GET", srv.url()));
  CHECK(huge.code() == kh::error::header_too_large);
  CHECK(cl.pooled_idle() == 0);
  CHECK(cl.connections_opened() == 2);  // the first connection was not reused after the error
}

TEST_CASE("http client: an oversized trailer or header field fails instead of crashing",
          "[http][review]") {
  // Beast 1.81's parser throws std::length_error for a field over 65,535 bytes; inside
  // http::async_read that escaped io_context::run(). A trailer counts toward no Beast limit.
  for (act a : {act::huge_trailer, act::huge_header}) {
    asio::io_context ctx;
    test_server srv(ctx);
    srv.plan = [a](int) { return a; };
    kh::client_options opts;
    opts.max_header_bytes = 1024 * 1024;  // so that the 100 KiB header field reaches Beast
    kh::client cl(ctx.get_executor(), opts);
    auto out = send_one(ctx, cl, kh::request("GET", srv.url()));
    CHECK(out.code() == kh::error::header_too_large);
    CHECK(out.code() == keel::condition::permanent);
    CHECK(cl.pooled_idle() == 0);
  }
}

TEST_CASE("http client: endless chunk extensions or trailers stop at the header limit",
          "[http][review]") {
  // Neither counts toward a Beast limit: the bytes waiting to be parsed are capped at
  // max_header_bytes plus one read, so the send fails long before the server's 32 MiB.
  for (act a : {act::endless_chunk_ext, act::endless_trailers}) {
    asio::io_context ctx;
    test_server srv(ctx);
    srv.plan = [a](int) { return a; };
    kh::client cl(ctx.get_executor(), kh::client_options{});
    auto out = send_one(ctx, cl, kh::request("GET", srv.url()));
    CHECK(out.code() == kh::error::header_too_large);
    REQUIRE(run_real(ctx, [&] { return srv.sessions_ended == 1; }));
  }
}

TEST_CASE("http client: EOF in the middle of a body is truncated_response (transient)", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int) { return act::eof_mid_body; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto out = send_one(ctx, cl, kh::request("GET", srv.url()));
  CHECK(out.code() == kh::error::truncated_response);
  CHECK(out.code() == keel::condition::transient);
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("http client: a close without an answer is connection_closed (transient)", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int) { return act::close; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto out = send_one(ctx, cl, kh::request("GET", srv.url()));
  CHECK(out.code() == keel::condition::transient);
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("http client: interim 1xx responses are skipped and the final one returned", "[http]") {
  // Regression (fuzz/fuzz_http_client): a 1xx was returned as the answer, leaving the real
  // response in the connection's buffer.
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int k) { return k == 0 ? act::interim_then_ok : act::normal; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto first = send_one(ctx, cl, kh::request("GET", srv.url("/a")));
  REQUIRE(first.value);
  CHECK(first.value->status == 200);
  CHECK(first.value->body == "final");
  CHECK(cl.pooled_idle() == 1);
  auto second = send_one(ctx, cl, kh::request("GET", srv.url("/b")));
  REQUIRE(second.value);
  CHECK(second.value->body == "echo GET /b ");
  CHECK(cl.connections_opened() == 1);
}

TEST_CASE("http client: a status below 100 or 101 is a protocol_error (transient)", "[http]") {
  // Regression (fuzz/fuzz_http_client): "000" came back as status 0, which the provider layers
  // read as "no HTTP response".
  for (act a : {act::status_000, act::switching}) {
    asio::io_context ctx;
    test_server srv(ctx);
    srv.plan = [a](int) { return a; };
    kh::client cl(ctx.get_executor(), kh::client_options{});
    auto out = send_one(ctx, cl, kh::request("GET", srv.url()));
    CHECK(out.code() == kh::error::protocol_error);
    CHECK(out.code() == keel::condition::transient);
    CHECK(cl.pooled_idle() == 0);
  }
}

TEST_CASE("http client: a deadline cancels a stalled request and its connection is not pooled",
          "[http]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int k) { return k == 0 ? act::stall : act::normal; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  const kh::request req("GET", srv.url("/slow"));
  outcome<kh::response> out;
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return cl.send(req); }, 5s), out);
  // Let the request reach the server in real time without moving the virtual clock.
  REQUIRE(run_real(ctx, [&] { return srv.stalled == 1; }));
  CHECK(now_ms() == 0);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 5000);
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(out.code() == keel::condition::timeout);
  CHECK(cl.pooled_idle() == 0);
  // The client closed the cancelled connection: the server's next read ended.
  REQUIRE(run_real(ctx, [&] { return srv.sessions_ended == 1; }));

  auto next = send_one(ctx, cl, req);
  REQUIRE(next.value);
  CHECK(next.value->status == 200);
  CHECK(cl.connections_opened() == 2);
  CHECK(srv.accepts == 2);
}

TEST_CASE("http client: request_timeout is armed again for each request on a reused connection",
          "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int k) { return k < 3 ? act::normal : act::stall; };
  kh::client_options opts;
  opts.request_timeout = std::chrono::milliseconds(200);
  kh::client cl(ctx.get_executor(), opts);
  for (int i = 0; i < 3; ++i) {
    auto ok = send_one(ctx, cl, kh::request("GET", srv.url("/ok")));
    REQUIRE(ok.value);
    CHECK(ok.value->status == 200);
  }
  CHECK(srv.accepts == 1);
  // The fourth request goes out on the same connection; its own timer ends it.
  auto out = send_one(ctx, cl, kh::request("GET", srv.url("/never")));
  REQUIRE(out.error);
  CHECK(out.code() == kh::error::request_timeout);
  CHECK(srv.accepts == 1);
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("http client: request_timeout ends a request the server never answers (timeout)",
          "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int k) { return k == 0 ? act::stall : act::normal; };
  kh::client_options opts;
  opts.request_timeout = std::chrono::milliseconds(20);
  kh::client cl(ctx.get_executor(), opts);
  auto out = send_one(ctx, cl, kh::request("GET", srv.url("/never")));
  REQUIRE(out.error);
  CHECK(out.code() == kh::error::request_timeout);
  CHECK(out.code() == keel::condition::timeout);
  CHECK(srv.stalled == 1);
  CHECK(cl.pooled_idle() == 0);  // a timed-out connection is never reused
  // The client closed the connection: the server's pending read ended.
  REQUIRE(run_real(ctx, [&] { return srv.sessions_ended == 1; }));
  // The next request gets a fresh connection and an answer.
  auto next = send_one(ctx, cl, kh::request("GET", srv.url("/again")));
  REQUIRE(next.value);
  CHECK(next.value->status == 200);
  CHECK(srv.accepts == 2);
}

TEST_CASE("http client: idle_timeout 0 never reuses a pooled connection", "[http]") {
  asio::io_context ctx;
  test_server srv(ctx);
  kh::client_options opts;
  opts.idle_timeout = std::chrono::steady_clock::duration::zero();
  kh::client cl(ctx.get_executor(), opts);
  for (int i = 0; i < 2; ++i) {
    auto res = send_one(ctx, cl, kh::request("GET", srv.url("/" + std::to_string(i))));
    REQUIRE(res.value);
    CHECK(res.value->status == 200);
  }
  // Each idle connection is older than 0 when the next request looks at it, so it is closed.
  CHECK(srv.accepts == 2);
  CHECK(cl.connections_opened() == 2);
  CHECK(cl.pooled_idle() == 1);  // the last one waits in the pool, to be closed on next use
}

TEST_CASE("http client: cancelling a request waiting for a pool slot leaves the queue intact",
          "[http]") {
  manual_clock::reset();
  asio::io_context ctx;
  test_server srv(ctx);
  srv.plan = [](int k) { return k == 0 ? act::stall : act::normal; };
  kh::client_options opts;
  opts.max_connections_per_host = 1;
  kh::client cl(ctx.get_executor(), opts);
  const kh::request req("GET", srv.url());
  outcome<kh::response> first, queued, third;
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return cl.send(req); }, 10s), first);
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return cl.send(req); }, 2s), queued);
  spawn(ctx, cl.send(req), third);
  REQUIRE(run_real(ctx, [&] { return srv.stalled == 1; }));
  REQUIRE(keel::testing::run_until(ctx, [&] { return queued.done && first.done; }));
  CHECK(queued.finished_at_ms == 2000);
  CHECK(queued.code() == keel::error::deadline_exceeded);
  CHECK(first.finished_at_ms == 10000);
  CHECK(first.code() == keel::error::deadline_exceeded);
  REQUIRE(run_real(ctx, [&] { return third.done; }));
  REQUIRE(third.value);
  CHECK(third.value->status == 200);
  // The cancelled waiter held no slot: the third request could only connect once the first
  // released the one connection allowed (at 10 s), never while it was still open.
  CHECK(third.finished_at_ms >= 10000);
  CHECK(cl.connections_opened() == 2);
}

TEST_CASE("http client: connection refused is transient and the message names the URL only",
          "[http]") {
  asio::io_context ctx;
  tcp::acceptor probe(ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  const auto port = probe.local_endpoint().port();
  probe.close();
  kh::client cl(ctx.get_executor(), kh::client_options{});
  kh::request req("POST", "http://127.0.0.1:" + std::to_string(port) + "/v1/chat?key=sk-query");
  req.set("authorization", "Bearer sk-secret-header");
  auto out = send_one(ctx, cl, req);
  CHECK(out.code() == asio::error::connection_refused);
  CHECK(out.code() == keel::condition::transient);
  const std::string what = described(out.error);
  CHECK(what.find("POST http://127.0.0.1:" + std::to_string(port) + "/v1/chat") !=
        std::string::npos);
  CHECK(what.find("sk-secret-header") == std::string::npos);
  CHECK(what.find("sk-query") == std::string::npos);
  CHECK(cl.connections_opened() == 0);
}

TEST_CASE("http client: bad URLs and header injection are rejected before sending", "[http]") {
  asio::io_context ctx;
  kh::client cl(ctx.get_executor(), kh::client_options{});
  for (const char* url : {"ftp://example.com/", "http://", "http://host:99999/", "example.com",
                          "http://user:pw@example.com/"}) {
    auto out = send_one(ctx, cl, kh::request("GET", url));
    CHECK(out.code() == kh::error::bad_url);
    CHECK(out.code() == keel::condition::permanent);
    CHECK(described(out.error).find("pw@") == std::string::npos);
  }
  kh::request inj("GET", "http://127.0.0.1:9/");
  inj.set("x-a", "v\r\nx-injected: 1");
  auto out = send_one(ctx, cl, inj);
  CHECK(out.code() == kh::error::bad_header);
  // The header is named (a key with a trailing newline is otherwise a mystery); never its value.
  CHECK_THAT(described(out.error), Catch::Contains("bad request header \"x-a\""));
  CHECK_THAT(described(out.error), !Catch::Contains("injected"));
  CHECK(cl.connections_opened() == 0);
}

TEST_CASE("http client fail matrix: the server drops request k, every call ends exactly once",
          "[http]") {
  constexpr int n = 4;
  for (int k = 0; k <= n; ++k) {
    INFO("k = " << k);
    asio::io_context ctx;
    test_server srv(ctx);
    srv.plan = [k](int i) { return i == k ? act::close : act::normal; };
    kh::client cl(ctx.get_executor(), kh::client_options{});
    std::vector<int> outcomes;  // 0: response, 1: transient failure, 2: anything else
    auto seq = [&]() -> asio::awaitable<int> {
      for (int i = 0; i < n; ++i) {
        try {
          auto r = co_await cl.send(kh::request("GET", srv.url()));
          outcomes.push_back(r.status == 200 ? 0 : 2);
        } catch (const boost::system::system_error& e) {
          outcomes.push_back(e.code() == keel::condition::transient ? 1 : 2);
        }
      }
      co_return 0;
    };
    outcome<int> out;
    spawn(ctx, seq(), out);
    REQUIRE(run_real(ctx, [&] { return out.done; }));
    REQUIRE(outcomes.size() == static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      CHECK(outcomes[static_cast<std::size_t>(i)] == (i == k ? 1 : 0));
    }
    // A dropped connection is replaced only if a request follows it.
    CHECK(srv.accepts == (k < n - 1 ? 2 : 1));
    CHECK(cl.pooled_idle() == (k == n - 1 ? 0u : 1u));
  }
}

// ---- TLS -------------------------------------------------------------------------------------

TEST_CASE("https client: an untrusted certificate is refused by default (permanent)", "[http]") {
  test_pki pki;
  asio::io_context ctx;
  test_server srv(ctx, &pki.server_ctx);
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto out = send_one(ctx, cl, kh::request("GET", srv.url("/tls")));
  CHECK(out.code() == kh::error::tls_verification_failed);
  CHECK(out.code() == keel::condition::permanent);
  CHECK(srv.requests == 0);
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("https client: a TLS failure says whether the chain or the host name did not verify",
          "[http]") {
  {
    // Untrusted chain: the private CA is not in the store. One io_context per server: handlers
    // of a server left in a shared context would run after the server is gone (ASan found it).
    asio::io_context ctx;
    test_pki pki;
    test_server srv(ctx, &pki.server_ctx);
    kh::client cl(ctx.get_executor(), kh::client_options{});
    auto out = send_one(ctx, cl, kh::request("GET", srv.url("/tls")));
    CHECK(out.code() == kh::error::tls_verification_failed);
    const std::string what = described(out.error);
    CHECK_THAT(what, Catch::Contains("certificate chain did not verify"));
    CHECK_THAT(what, Catch::Contains("local issuer certificate"));
    CHECK_THAT(what, !Catch::Contains("host name"));
  }
  {
    // Trusted chain, but the certificate names another host: by IP and by DNS name.
    asio::io_context ctx;
    test_pki pki("DNS:other.example");
    test_server srv(ctx, &pki.server_ctx);
    kh::client_options opts;
    opts.tls.ca_file = pki.ca_file;
    kh::client cl(ctx.get_executor(), opts);
    auto by_ip = send_one(ctx, cl, kh::request("GET", srv.url("/tls")));
    CHECK(by_ip.code() == kh::error::tls_verification_failed);
    CHECK(by_ip.code() == keel::condition::permanent);
    CHECK_THAT(described(by_ip.error),
               Catch::Contains("not valid for host name \"127.0.0.1\" (the chain is trusted)"));
    auto by_name = send_one(
        ctx, cl, kh::request("GET", "https://localhost:" + std::to_string(srv.port()) + "/tls"));
    CHECK(by_name.code() == kh::error::tls_verification_failed);
    CHECK_THAT(described(by_name.error), Catch::Contains("not valid for host name \"localhost\""));
    CHECK(srv.requests == 0);
  }
}

TEST_CASE("redact_url keeps query names and hides their values, userinfo and fragment", "[http]") {
  CHECK(kh::redact_url("https://h.example/v1?key=AIzaSECRET&alt=json") ==
        "https://h.example/v1?key=<redacted>&alt=<redacted>");
  CHECK(kh::redact_url("https://h.example/v1?sk-SECRET") == "https://h.example/v1?<redacted>");
  CHECK(kh::redact_url("https://u:pw@h.example:8443/p?k=v#frag") ==
        "https://<redacted>@h.example:8443/p?k=<redacted>");
  CHECK(kh::redact_url("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1");
  CHECK(kh::redact_url("http://h/?a=1&&b") == "http://h/?a=<redacted>&&<redacted>");
}

TEST_CASE("https client: a self-signed server certificate is refused by default", "[http]") {
  // The leaf signs itself (no CA at all), as a quick `openssl req -x509` server would.
  pkey_ptr key(EVP_EC_gen("P-256"));
  REQUIRE(key);
  x509_ptr self = make_cert(key.get(), "localhost", nullptr, key.get(), false, 7);
  asio::ssl::context server_ctx{asio::ssl::context::tls_server};
  REQUIRE(SSL_CTX_use_certificate(server_ctx.native_handle(), self.get()) == 1);
  REQUIRE(SSL_CTX_use_PrivateKey(server_ctx.native_handle(), key.get()) == 1);
  asio::io_context ctx;
  test_server srv(ctx, &server_ctx);
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto out = send_one(ctx, cl, kh::request("GET", srv.url("/tls")));
  CHECK(out.code() == kh::error::tls_verification_failed);
  CHECK(srv.requests == 0);
  // Only an explicit opt-out accepts it.
  kh::client_options insecure;
  insecure.tls.insecure_skip_verify = true;
  kh::client cl2(ctx.get_executor(), insecure);
  auto ok = send_one(ctx, cl2, kh::request("GET", srv.url("/tls")));
  REQUIRE(ok.value);
  CHECK(ok.value->status == 200);
  CHECK(srv.requests == 1);
}

TEST_CASE_METHOD(trusted_tls,
                 "https client: a certificate signed by ca_file is accepted and reused", "[http]") {
  for (int i = 0; i < 3; ++i) {
    auto out = send_one(ctx, cl, kh::request("GET", srv.url("/tls")));
    REQUIRE(out.value);
    CHECK(out.value->body == "echo GET /tls ");
  }
  CHECK(srv.accepts == 1);
  CHECK(cl.connections_opened() == 1);
}

TEST_CASE("https client: a ca_file that cannot be read fails when the client is made", "[http]") {
  // The TLS context is made lazily (at the first TLS connection), except with a ca_file: a bad
  // one must still fail at once, not at the first call.
  asio::io_context ctx;
  kh::client_options opts;
  opts.tls.ca_file = "/nonexistent/keel-ca.pem";
  CHECK_THROWS(kh::client(ctx.get_executor(), opts));
  // Without one (the context then waits for the first TLS connection) a plain-HTTP client works.
  test_server srv(ctx);
  kh::client plain(ctx.get_executor(), kh::client_options{});
  auto out = send_one(ctx, plain, kh::request("GET", srv.url("/plain")));
  REQUIRE(out.value);
  CHECK(out.value->status == 200);
}

TEST_CASE("https client: insecure_skip_verify accepts an untrusted certificate", "[http]") {
  test_pki pki;
  asio::io_context ctx;
  test_server srv(ctx, &pki.server_ctx);
  kh::client_options opts;
  opts.tls.insecure_skip_verify = true;
  kh::client cl(ctx.get_executor(), opts);
  auto out = send_one(ctx, cl, kh::request("GET", srv.url("/tls")));
  REQUIRE(out.value);
  CHECK(out.value->status == 200);
}

TEST_CASE_METHOD(
    trusted_tls,
    "https client: a host name is resolved by DNS and verified against the certificate", "[http]") {
  // "localhost" goes through the resolver, SNI and host-name verification (DNS:localhost SAN).
  const std::string url = "https://localhost:" + std::to_string(srv.port()) + "/named";
  auto out = send_one(ctx, cl, kh::request("GET", url));
  REQUIRE(out.value);
  CHECK(out.value->status == 200);
  CHECK(out.value->body == "echo GET /named ");
}

TEST_CASE("http client: a connect that cannot complete ends with connect_timeout", "[http]") {
  asio::io_context ctx;
  // A listener that never accepts, its backlog filled by two raw connections: further SYNs are
  // dropped by the kernel, so a connect can only end by the client's timeout.
  tcp::acceptor full(ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0), false);
  full.listen(0);
  std::vector<std::unique_ptr<tcp::socket>> fillers;
  for (int i = 0; i < 2; ++i) {
    fillers.push_back(std::make_unique<tcp::socket>(ctx));
    // Asynchronous: the second filler's own SYN is dropped too, and must not block the test.
    fillers.back()->async_connect(full.local_endpoint(), [](boost::system::error_code) {});
  }
  kh::client_options opts;
  opts.connect_timeout = std::chrono::milliseconds(100);
  kh::client cl(ctx.get_executor(), opts);
  const std::string url = "http://127.0.0.1:" + std::to_string(full.local_endpoint().port()) + "/";
  auto out = send_one(ctx, cl, kh::request("GET", url));
  REQUIRE(out.error);
  CHECK(out.code() == kh::error::connect_timeout);
  CHECK(out.code() == keel::condition::timeout);
}

// ---- TLS stream (lib/http/tls_stream.hpp: keel drives OpenSSL over the socket) ----------------

TEST_CASE("https client: a server's faults end over TLS as they do over plain HTTP",
          "[http][tls]") {
  test_pki pki;
  kh::client_options opts;
  opts.tls.ca_file = pki.ca_file;
  opts.max_response_body = 64 * 1024;
  opts.request_timeout = std::chrono::milliseconds(200);
  struct expect {
    act a;
    kh::error code;
  };
  for (const expect e : {expect{act::eof_mid_body, kh::error::truncated_response},
                         expect{act::oversized, kh::error::body_too_large},
                         expect{act::oversized_chunked, kh::error::body_too_large},
                         expect{act::many_headers, kh::error::too_many_headers},
                         expect{act::huge_header, kh::error::header_too_large},
                         expect{act::endless_trailers, kh::error::header_too_large},
                         expect{act::stall, kh::error::request_timeout},
                         expect{act::status_000, kh::error::protocol_error}}) {
    INFO("act " << static_cast<int>(e.a));
    asio::io_context ctx;
    test_server srv(ctx, &pki.server_ctx);
    srv.plan = [&](int) { return e.a; };
    kh::client cl(ctx.get_executor(), opts);
    auto out = send_one(ctx, cl, kh::request("GET", srv.url("/fault")));
    CHECK(out.code() == e.code);
    CHECK(cl.pooled_idle() == 0);
    // The client closed the connection (for oversized bodies while the server was writing).
    REQUIRE(run_real(ctx, [&] { return srv.sessions_ended == 1; }));
  }
}

TEST_CASE("https client: a body that ends at the close needs the server's close_notify",
          "[http][tls]") {
  test_pki pki;
  kh::client_options opts;
  opts.tls.ca_file = pki.ca_file;
  {
    // close_notify, then the TCP close: the body is whole.
    asio::io_context ctx;
    test_server srv(ctx, &pki.server_ctx);
    srv.plan = [](int) { return act::until_close; };
    kh::client cl(ctx.get_executor(), opts);
    auto out = send_one(ctx, cl, kh::request("GET", srv.url("/close")));
    REQUIRE(out.value);
    CHECK(out.value->status == 200);
    CHECK(out.value->body == "until close");
    CHECK(cl.pooled_idle() == 0);
  }
  {
    // The TCP close alone could be an attacker cutting the body short: truncated_response.
    asio::io_context ctx;
    test_server srv(ctx, &pki.server_ctx);
    srv.plan = [](int) { return act::until_close_abrupt; };
    kh::client cl(ctx.get_executor(), opts);
    auto out = send_one(ctx, cl, kh::request("GET", srv.url("/abrupt")));
    CHECK(out.code() == kh::error::truncated_response);
    CHECK(out.code() == keel::condition::transient);
  }
  {
    // Over plain HTTP the close alone ends such a body.
    asio::io_context ctx;
    test_server srv(ctx);
    srv.plan = [](int) { return act::until_close_abrupt; };
    kh::client cl(ctx.get_executor(), kh::client_options{});
    auto out = send_one(ctx, cl, kh::request("GET", srv.url("/plain")));
    REQUIRE(out.value);
    CHECK(out.value->body == "until close");
  }
}

TEST_CASE_METHOD(trusted_tls,
                 "https client: large bodies both ways span many TLS records on one connection",
                 "[http][tls]") {
  for (int i = 0; i < 3; ++i) {
    kh::request post("POST", srv.url("/big"));
    // 600 KiB: about 38 records each way, in a pattern that shows a dropped or repeated record.
    post.body.resize(600 * 1024);
    for (std::size_t k = 0; k < post.body.size(); ++k) {
      post.body[k] = static_cast<char>('a' + (k * 7 + static_cast<std::size_t>(i)) % 26);
    }
    auto out = send_one(ctx, cl, post);
    REQUIRE(out.value);
    CHECK(out.value->status == 200);
    CHECK(out.value->body == "echo POST /big " + post.body);
  }
  CHECK(srv.accepts == 1);
  CHECK(cl.connections_opened() == 1);
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("https client: a server that resets the connection mid-write fails the request only",
          "[http][tls]") {
  // (That such a write raises no SIGPIPE is tls_stream's own test.)
  test_pki pki;
  asio::io_context ctx;
  test_server srv(ctx, &pki.server_ctx);
  kh::client_options opts;
  opts.tls.ca_file = pki.ca_file;
  kh::client cl(ctx.get_executor(), opts);
  // The server reads at most 1 MiB of a request body (Beast's default limit), then closes
  // with the rest unread, which resets the connection while the client is still writing.
  kh::request post("POST", srv.url("/huge"));
  post.body.assign(16 * 1024 * 1024, 'x');
  auto out = send_one(ctx, cl, post);
  REQUIRE(out.error);
  CHECK(out.code() == keel::condition::transient);
  CHECK(cl.pooled_idle() == 0);
  // The client still works.
  auto next = send_one(ctx, cl, kh::request("GET", srv.url("/after")));
  REQUIRE(next.value);
  CHECK(next.value->body == "echo GET /after ");
}

TEST_CASE("https client: a TLS handshake the server never answers ends with connect_timeout",
          "[http][tls]") {
  asio::io_context ctx;
  // Accepts TCP connections and says nothing: the ClientHello is never answered.
  tcp::acceptor silent(ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  std::vector<tcp::socket> held;
  std::function<void()> accept_next = [&] {
    silent.async_accept([&](boost::system::error_code ec, tcp::socket s) {
      if (!ec) {
        held.push_back(std::move(s));
        accept_next();
      }
    });
  };
  accept_next();
  kh::client_options opts;
  opts.tls.insecure_skip_verify = true;
  opts.connect_timeout = std::chrono::milliseconds(100);
  opts.request_timeout = std::chrono::seconds(30);  // the handshake is the connect's to time
  kh::client cl(ctx.get_executor(), opts);
  const std::string url =
      "https://127.0.0.1:" + std::to_string(silent.local_endpoint().port()) + "/";
  auto out = send_one(ctx, cl, kh::request("GET", url));
  REQUIRE(out.error);
  CHECK(out.code() == kh::error::connect_timeout);
  CHECK(out.code() == keel::condition::timeout);
  CHECK(held.size() == 1);
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE_METHOD(
    trusted_tls,
    "https client: a deadline cancels a stalled TLS read through its cancellation slot",
    "[http][tls]") {
  manual_clock::reset();
  srv.plan = [](int k) { return k == 0 ? act::stall : act::normal; };
  const kh::request req("GET", srv.url("/slow"));
  outcome<kh::response> out;
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return cl.send(req); }, 5s), out);
  REQUIRE(run_real(ctx, [&] { return srv.stalled == 1; }));
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 5000);
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(cl.pooled_idle() == 0);
  REQUIRE(run_real(ctx, [&] { return srv.sessions_ended == 1; }));
  auto next = send_one(ctx, cl, req);
  REQUIRE(next.value);
  CHECK(next.value->status == 200);
  CHECK(srv.accepts == 2);
}

TEST_CASE("https client: later connections to a host resume its TLS session, other hosts do not",
          "[http][tls]") {
  test_pki pki;
  for (const bool resume : {true, false}) {
    INFO("resume_sessions " << resume);
    asio::io_context ctx;
    test_server one(ctx, &pki.server_ctx);
    test_server two(ctx, &pki.server_ctx);
    kh::client_options opts;
    opts.tls.ca_file = pki.ca_file;
    opts.tls.resume_sessions = resume;
    opts.max_requests_per_connection = 1;  // a new connection (and handshake) per request
    kh::client cl(ctx.get_executor(), opts);
    for (int i = 0; i < 3; ++i) {
      auto out = send_one(ctx, cl, kh::request("GET", one.url("/r")));
      REQUIRE(out.value);
      CHECK(out.value->body == "echo GET /r ");
    }
    // Another host (another port of the same address) gets no session of the first.
    auto other = send_one(ctx, cl, kh::request("GET", two.url("/o")));
    REQUIRE(other.value);
    CHECK(one.accepts == 3);
    CHECK(two.accepts == 1);
    CHECK(two.resumed_sessions == 0);
    CHECK(one.resumed_sessions == (resume ? 2 : 0));
    CHECK(cl.tls_sessions_resumed() == (resume ? 2U : 0U));
  }
}
