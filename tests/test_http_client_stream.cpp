// Tests for client::open and response_reader (keel/http/client.hpp): bodies read piece by piece
// from a scripted server on 127.0.0.1:0 that waits for the test before each further piece.
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
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <catch2/catch.hpp>

#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using namespace keel_test;
namespace bhttp = boost::beast::http;
namespace kh = keel::http;
using tcp = asio::ip::tcp;

namespace {

/// One step of the server's answer to a request.
struct server_step {
  enum kind_t { send, wait, close, await_close } kind;
  std::string bytes;  // send: written in one write
  int gate = 0;       // wait: the gate to wait for
};
using script = std::vector<server_step>;

/// Writes `bytes` in one write.
server_step emit(std::string bytes) {
  return {server_step::send, std::move(bytes)};
}
/// Waits until the test opens gate `g`.
server_step hold(int g) {
  return {server_step::wait, {}, g};
}
/// Closes the connection (FIN) and ends the session.
server_step hang_up() {
  return {server_step::close, {}};
}
/// Reads until the client closes the connection, counts that close, and ends the session.
server_step await_close() {
  return {server_step::await_close, {}};
}
/// One chunk of a chunked body.
std::string chunk(const std::string& data) {
  char size[32];
  std::snprintf(size, sizeof size, "%zx", data.size());
  return std::string(size) + "\r\n" + data + "\r\n";
}
const std::string chunked_head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
const std::string last_chunk = "0\r\n\r\n";

/// An event the test sets and a server session awaits (a timer that never expires and is
/// cancelled to wake its waiter).
struct gate {
  explicit gate(const asio::any_io_executor& ex)
      : timer(ex, asio::steady_timer::time_point::max()) {}
  asio::steady_timer timer;
  bool opened = false;
};

/// A scripted HTTP/1.1 server on 127.0.0.1:0, optionally over TLS. `plan(k)` gives the script of
/// the k-th request (0-based, over all connections); when a script ends without closing, the
/// session reads the next request on the same connection.
struct stream_server {
  explicit stream_server(asio::io_context& ctx, asio::ssl::context* tls = nullptr)
      : acceptor(ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)), tls_ctx(tls) {
    for (int i = 0; i < 4; ++i) {
      gates.push_back(std::make_unique<gate>(ctx.get_executor()));
    }
    asio::co_spawn(ctx, accept_loop(), asio::detached);
  }
  std::string url(const std::string& path = "/") const {
    return std::string(tls_ctx ? "https" : "http") +
           "://127.0.0.1:" + std::to_string(acceptor.local_endpoint().port()) + path;
  }
  /// Lets sessions waiting for gate `g` go on.
  void open_gate(int g) {
    gates[static_cast<std::size_t>(g)]->opened = true;
    gates[static_cast<std::size_t>(g)]->timer.cancel();
  }

  tcp::acceptor acceptor;
  asio::ssl::context* tls_ctx;
  std::vector<std::unique_ptr<gate>> gates;
  std::function<script(int)> plan = [](int) { return script{}; };
  int accepts = 0;
  int requests = 0;
  int sent = 0;         // send steps completed
  int peer_closes = 0;  // await_close steps that saw the client close
  int sessions_ended = 0;
  std::vector<int> fds;  // each accepted connection's descriptor, server side

  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, sock] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) {
        co_return;
      }
      ++accepts;
      fds.push_back(sock.native_handle());
      asio::co_spawn(acceptor.get_executor(), session(std::move(sock)), asio::detached);
    }
  }

  asio::awaitable<void> session(tcp::socket sock) {
    if (tls_ctx) {
      asio::ssl::stream<tcp::socket> s(std::move(sock), *tls_ctx);
      auto [ec] = co_await s.async_handshake(asio::ssl::stream_base::server,
                                             asio::as_tuple(asio::use_awaitable));
      if (!ec) {
        co_await serve(s);
      }
    } else {
      co_await serve(sock);
    }
    ++sessions_ended;
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
      for (const server_step& st : plan(requests++)) {
        switch (st.kind) {
          case server_step::send: {
            auto [wec, wn] = co_await asio::async_write(s, asio::buffer(st.bytes),
                                                        asio::as_tuple(asio::use_awaitable));
            if (wec) {
              co_return;
            }
            ++sent;
            break;
          }
          case server_step::wait: {
            gate& g = *gates[static_cast<std::size_t>(st.gate)];
            if (!g.opened) {
              co_await g.timer.async_wait(asio::as_tuple(asio::use_awaitable));
            }
            break;
          }
          case server_step::close:
            co_return;
          case server_step::await_close:
            for (;;) {
              char byte[512];
              auto [rec, rn] = co_await s.async_read_some(asio::buffer(byte),
                                                          asio::as_tuple(asio::use_awaitable));
              if (rec) {
                ++peer_closes;
                co_return;
              }
            }
        }
      }
    }
  }
};

/// Reads pieces until at least `want` bytes have arrived or the body ended (one piece of the
/// server's may arrive in several reads).
asio::awaitable<std::string> read_at_least(kh::response_reader& r, std::size_t want) {
  std::string got;
  while (got.size() < want) {
    auto piece = co_await r.read_some();
    if (!piece) {
      break;
    }
    if (piece->empty()) {
      throw std::logic_error("read_some returned an empty piece");
    }
    got += *piece;
  }
  co_return got;
}

/// Reads the body to its end.
asio::awaitable<std::string> read_all(kh::response_reader& r) {
  return read_at_least(r, std::string::npos);
}

}  // namespace

TEST_CASE("http open: read_some returns each chunk before the server sent the next",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) {
    return script{emit(chunked_head + chunk("hello")), hold(0), emit(chunk(" world")), hold(1),
                  emit(last_chunk)};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  std::vector<std::string> pieces;
  std::vector<int> sent_when_read;
  bool done_early = true;
  std::optional<std::string> after_end = "not read";
  auto body = [&]() -> asio::awaitable<int> {
    auto r = co_await cl.open(kh::request("GET", srv.url("/stream")));
    const int status = r.head().status;
    pieces.push_back(co_await read_at_least(r, 5));
    sent_when_read.push_back(srv.sent);
    done_early = r.done();
    srv.open_gate(0);
    pieces.push_back(co_await read_at_least(r, 6));
    sent_when_read.push_back(srv.sent);
    srv.open_gate(1);
    after_end = co_await r.read_some();
    CHECK(r.done());
    CHECK(r.bytes_read() == 11);
    co_return status;
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(*out.value == 200);
  CHECK(pieces == std::vector<std::string>{"hello", " world"});
  // The first piece was in the client's hands while the server still held the second back.
  CHECK(sent_when_read == std::vector<int>{1, 2});
  CHECK_FALSE(done_early);
  CHECK_FALSE(after_end.has_value());
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http open: a Content-Length body arrives in pieces and the connection is reused",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int k) {
    if (k == 0) {
      return script{emit("HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: b\r\n\r\n01234"), hold(0),
                    emit("56789")};
    }
    return script{emit("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  std::string first, second;
  int sent_at_first = -1;
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    CHECK(r.head().headers.find("x-a") == "b");
    CHECK(r.head().body.empty());
    first = co_await read_at_least(r, 5);
    sent_at_first = srv.sent;
    srv.open_gate(0);
    second = co_await read_all(r);
    CHECK(r.done());
    // The connection went back to the pool as soon as the body ended: a send reuses it.
    auto res = co_await cl.send(kh::request("GET", srv.url("/next")));
    co_return res.body;
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(first == "01234");
  CHECK(sent_at_first == 1);
  CHECK(second == "56789");
  CHECK(*out.value == "ok");
  CHECK(cl.connections_opened() == 1);
  CHECK(srv.accepts == 1);
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http open: a body delimited by the close ends at EOF and is not pooled",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) {
    return script{emit("HTTP/1.1 200 OK\r\n\r\npart1"), hold(0), emit("part2"), hang_up()};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  int sent_at_first = -1;
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    std::string got = co_await read_at_least(r, 5);
    sent_at_first = srv.sent;
    srv.open_gate(0);
    got += "|" + co_await read_all(r);
    CHECK(r.done());
    co_return got;
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(*out.value == "part1|part2");
  CHECK(sent_at_first == 1);
  // The server closed: the connection cannot carry another request (it used to be pooled, to be
  // dropped at the next use by the liveness peek).
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("http open: an empty body is done at once and frees the connection", "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int k) {
    return k == 0   ? script{emit("HTTP/1.1 204 No Content\r\n\r\n")}
           : k == 1 ? script{emit("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")}
                    : script{emit(chunked_head + last_chunk)};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  for (int k = 0; k < 3; ++k) {
    INFO("k = " << k);
    std::size_t idle_after_open = 99;
    bool done_at_open = false;
    auto body = [&]() -> asio::awaitable<bool> {
      auto r = co_await cl.open(kh::request("GET", srv.url()));
      done_at_open = r.done();
      idle_after_open = cl.pooled_idle();
      auto piece = co_await r.read_some();
      auto again = co_await r.read_some();
      co_return !piece && !again && r.done();
    };
    auto out = run_one(ctx, body());
    REQUIRE(out.value);
    CHECK(*out.value);
    // Without a body to wait for (204, Content-Length 0) the connection is back before
    // read_some; an empty chunked body needs one read to see its last chunk.
    CHECK(done_at_open == (k < 2));
    CHECK(idle_after_open == (k < 2 ? 1u : 0u));
  }
  CHECK(cl.connections_opened() == 1);
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http open: max_response_body bounds the total over several reads", "[http][stream]") {
  // Chunked: the second chunk takes the total past the limit; Content-Length: refused at the
  // first read, though open returns the status; close-delimited: counted as it arrives.
  for (int variant = 0; variant < 3; ++variant) {
    INFO("variant = " << variant);
    asio::io_context ctx;
    stream_server srv(ctx);
    srv.plan = [variant](int) {
      if (variant == 0) {
        return script{emit(chunked_head + chunk("abcdef")), hold(0), emit(chunk("ghijkl")),
                      await_close()};
      }
      if (variant == 1) {
        return script{emit("HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nabcdef"), await_close()};
      }
      return script{emit("HTTP/1.1 200 OK\r\n\r\nabcdef"), hold(0), emit("ghijkl"), await_close()};
    };
    kh::client_options opts;
    opts.max_response_body = 10;
    kh::client cl(ctx.get_executor(), opts);
    std::string first;
    auto body = [&]() -> asio::awaitable<int> {
      auto r = co_await cl.open(kh::request("GET", srv.url()));
      if (variant != 1) {
        first = co_await read_at_least(r, 6);
        srv.open_gate(0);
      }
      co_await read_all(r);
      co_return r.head().status;
    };
    auto out = run_one(ctx, body());
    CHECK(out.code() == kh::error::body_too_large);
    CHECK(out.code() == keel::condition::permanent);
    CHECK(first == (variant == 1 ? "" : "abcdef"));
    // The client closed the connection at once: the server saw it.
    REQUIRE(run_real(ctx, [&] { return srv.peer_closes == 1; }));
    CHECK(cl.pooled_idle() == 0);
  }
}

TEST_CASE("http open: a read never holds more than one 64 KiB read beyond what it returns",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  const std::string big(1024 * 1024, 'x');
  srv.plan = [&big](int) {
    return script{emit("HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n" + big)};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  std::size_t largest = 0;
  std::size_t total = 0;
  int pieces = 0;
  auto body = [&]() -> asio::awaitable<bool> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    while (auto piece = co_await r.read_some()) {
      largest = std::max(largest, piece->size());
      total += piece->size();
      ++pieces;
    }
    co_return r.done();
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(*out.value);
  CHECK(total == big.size());
  CHECK(largest <= 64 * 1024);
  CHECK(pieces >= 16);
}

TEST_CASE("http open: a body far larger than one read arrives whole and in order across idle gaps",
          "[http][stream]") {
  // A stream frees its read buffer while it waits (issue 15) and allocates one again per read;
  // bytes left unparsed in it (part of a chunk-size line) must survive that, over TCP and TLS.
  std::string big(700 * 1024 + 13, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) {
    big[i] = static_cast<char>('a' + (i * 7 + i / 251) % 26);
  }
  const std::string part1 = big.substr(0, 300 * 1024 + 5);
  const std::string part2 = big.substr(part1.size(), 250 * 1024);
  const std::string part3 = big.substr(part1.size() + part2.size());
  for (const bool tls : {false, true}) {
    INFO("tls = " << tls);
    test_pki pki;
    asio::io_context ctx;
    stream_server srv(ctx, tls ? &pki.server_ctx : nullptr);
    const std::string c2 = chunk(part2);
    srv.plan = [&](int) {
      // The second chunk's size line is split across an idle gap.
      return script{emit(chunked_head + chunk(part1) + c2.substr(0, 3)), hold(0),
                    emit(c2.substr(3)), hold(1), emit(chunk(part3) + last_chunk)};
    };
    kh::client_options opts;
    opts.tls.ca_file = pki.ca_file;
    kh::client cl(ctx.get_executor(), opts);
    std::size_t largest = 0;
    auto body = [&]() -> asio::awaitable<std::string> {
      auto r = co_await cl.open(kh::request("GET", srv.url()));
      std::string got;
      for (int gate_no = 0;;) {
        auto piece = co_await r.read_some();
        if (!piece) {
          break;
        }
        largest = std::max(largest, piece->size());
        got += *piece;
        if ((gate_no == 0 && got.size() == part1.size()) ||
            (gate_no == 1 && got.size() == part1.size() + part2.size())) {
          srv.open_gate(gate_no++);
        }
      }
      co_return got;
    };
    auto out = run_one(ctx, body());
    REQUIRE(out.value);
    CHECK(out.value->size() == big.size());
    CHECK(*out.value == big);
    // Over TLS a stream reads one record's plaintext at a time.
    CHECK(largest <= (tls ? 16 * 1024 : 64 * 1024));
    CHECK(cl.pooled_idle() == 1);
  }
}

TEST_CASE("http open: max_response_body still bounds a body that takes many reads",
          "[http][stream]") {
  const std::string part(100 * 1024, 'z');
  for (const bool tls : {false, true}) {
    INFO("tls = " << tls);
    test_pki pki;
    asio::io_context ctx;
    stream_server srv(ctx, tls ? &pki.server_ctx : nullptr);
    srv.plan = [&](int) {
      return script{emit(chunked_head + chunk(part)), hold(0), emit(chunk(part) + chunk(part)),
                    await_close()};
    };
    kh::client_options opts;
    opts.tls.ca_file = pki.ca_file;
    opts.max_response_body = 250 * 1024;
    kh::client cl(ctx.get_executor(), opts);
    std::size_t got = 0;
    auto body = [&]() -> asio::awaitable<int> {
      auto r = co_await cl.open(kh::request("GET", srv.url()));
      for (bool opened = false;;) {
        auto piece = co_await r.read_some();
        if (!piece) {
          break;
        }
        got += piece->size();
        if (!opened && got == part.size()) {
          srv.open_gate(0);
          opened = true;
        }
      }
      co_return r.head().status;
    };
    auto out = run_one(ctx, body());
    CHECK(out.code() == kh::error::body_too_large);
    CHECK(got >= part.size());
    CHECK(got <= opts.max_response_body);
    // The client closed the connection: the server's session ends, in its write of the last
    // 200 KiB (reset) or in await_close.
    REQUIRE(run_real(ctx, [&] { return srv.sessions_ended == 1; }));
    CHECK(cl.pooled_idle() == 0);
  }
}

TEST_CASE("http open: a deadline on read_some closes the connection and the server sees it",
          "[http][stream]") {
  manual_clock::reset();
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) { return script{emit(chunked_head + chunk("first")), await_close()}; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  std::string first;
  auto body = [&]() -> asio::awaitable<int> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    first = co_await read_at_least(r, 5);
    co_await keel::with_deadline<manual_clock>([&] { return r.read_some(); }, 5s);
    co_return 0;
  };
  outcome<int> out;
  spawn(ctx, body(), out);
  // The first piece arrives in real time, without moving the virtual clock.
  REQUIRE(run_real(ctx, [&] { return !first.empty(); }));
  CHECK(now_ms() == 0);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(first == "first");
  CHECK(out.finished_at_ms == 5000);
  CHECK(out.code() == keel::error::deadline_exceeded);
  REQUIRE(run_real(ctx, [&] { return srv.peer_closes == 1; }));
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("http open: a deadline on open before the head closes the connection", "[http][stream]") {
  manual_clock::reset();
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) { return script{await_close()}; };  // never answers
  kh::client cl(ctx.get_executor(), kh::client_options{});
  const kh::request req("GET", srv.url());
  outcome<kh::response_reader> out;
  spawn(ctx, keel::with_deadline<manual_clock>([&] { return cl.open(req); }, 2s), out);
  REQUIRE(run_real(ctx, [&] { return srv.requests == 1; }));
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 2000);
  CHECK(out.code() == keel::error::deadline_exceeded);
  REQUIRE(run_real(ctx, [&] { return srv.peer_closes == 1; }));
  CHECK(cl.pooled_idle() == 0);
}

namespace {

/// True once the peer of server-side descriptor `fd` has closed its end (a FIN has arrived),
/// waiting at most `limit` for it in the kernel, without running any io_context.
bool peer_closed_within(int fd, int limit_ms) {
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, limit_ms) <= 0) {
    return false;
  }
  char byte = 0;
  return (p.revents & POLLRDHUP) != 0 || ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

}  // namespace

TEST_CASE("http open: terminal cancellation of read_some closes within the emit and throws",
          "[http][stream]") {
  test_pki pki;
  for (bool tls : {false, true}) {
    INFO("tls = " << tls);
    asio::io_context ctx;
    stream_server srv(ctx, tls ? &pki.server_ctx : nullptr);
    srv.plan = [](int) { return script{emit(chunked_head + chunk("first")), await_close()}; };
    kh::client_options opts;
    if (tls) {
      opts.tls.ca_file = pki.ca_file;
    }
    kh::client cl(ctx.get_executor(), opts);
    auto opened = run_one(ctx, cl.open(kh::request("GET", srv.url())));
    REQUIRE(opened.value);
    kh::response_reader r = std::move(*opened.value);
    auto first = run_one(ctx, read_at_least(r, 5));
    REQUIRE(first.value);
    CHECK(*first.value == "first");
    REQUIRE(srv.fds.size() == 1);
    asio::cancellation_signal sig;
    outcome<std::optional<std::string>> second;
    spawn(ctx, r.read_some(), second, sig.slot());
    ctx.poll();  // the read is now waiting on the socket: the server holds the rest back
    CHECK_FALSE(second.done);
    // A hedge's loser or a caller gone: the server must see the close when the cancellation is
    // emitted, not when the client's thread next gets to the cancelled coroutine (on a busy
    // thread, milliseconds later). The emit runs in a handler on the client's io_context, as
    // with_hedge's and with_deadline's do (emitted from outside the context, the cancellation
    // reached the wait only when the context ran), and the server's view is taken in that same
    // handler, before anything else runs. Before the close moved into the cancellation handler,
    // the FIN did not come (the poll ran out).
    bool closed_before = true;
    bool closed_in_emit = false;
    bool done_in_emit = true;
    asio::post(ctx, [&] {
      closed_before = peer_closed_within(srv.fds[0], 0);
      sig.emit(asio::cancellation_type::terminal);
      closed_in_emit = peer_closed_within(srv.fds[0], 1000);
      done_in_emit = second.done;  // the cancelled coroutine itself has not run yet
    });
    ctx.restart();
    ctx.run_one();
    CHECK_FALSE(closed_before);
    CHECK(closed_in_emit);
    CHECK_FALSE(done_in_emit);
    REQUIRE(run_real(ctx, [&] { return second.done; }));
    CHECK(second.code() == asio::error::operation_aborted);
    CHECK(second.code() == keel::condition::cancelled);
    REQUIRE(run_real(ctx, [&] { return srv.peer_closes == 1; }));
    // The reader cannot go on: the bytes of the cancelled read are lost.
    auto third = run_one(ctx, r.read_some());
    CHECK(third.code() == asio::error::operation_aborted);
    CHECK_FALSE(r.done());
    CHECK(cl.pooled_idle() == 0);
  }
}

TEST_CASE("http open: hang_up() or destruction mid-body closes the connection, never pools it",
          "[http][stream]") {
  for (bool destroy : {false, true}) {
    INFO("destroy = " << destroy);
    asio::io_context ctx;
    stream_server srv(ctx);
    srv.plan = [](int k) {
      return k == 0 ? script{emit(chunked_head + chunk("first")), await_close()}
                    : script{emit("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")};
    };
    kh::client cl(ctx.get_executor(), kh::client_options{});
    {
      auto opened = run_one(ctx, cl.open(kh::request("GET", srv.url())));
      REQUIRE(opened.value);
      kh::response_reader r = std::move(*opened.value);
      auto first = run_one(ctx, r.read_some());
      REQUIRE(first.value);
      CHECK(*first.value == std::optional<std::string>("first"));
      if (!destroy) {
        r.close();
        auto after = run_one(ctx, r.read_some());
        CHECK(after.code() == asio::error::operation_aborted);
        CHECK(r.head().status == 200);  // the head outlives the connection
      }
    }
    REQUIRE(run_real(ctx, [&] { return srv.peer_closes == 1; }));
    CHECK(cl.pooled_idle() == 0);
    auto next = run_one(ctx, cl.send(kh::request("GET", srv.url())));
    REQUIRE(next.value);
    CHECK(next.value->body == "ok");
    CHECK(cl.connections_opened() == 2);
    CHECK(srv.accepts == 2);
  }
}

TEST_CASE("http open: hang_up() during a read_some ends that read with operation_aborted",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) { return script{emit(chunked_head), await_close()}; };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto opened = run_one(ctx, cl.open(kh::request("GET", srv.url())));
  REQUIRE(opened.value);
  kh::response_reader r = std::move(*opened.value);
  outcome<std::optional<std::string>> read;
  spawn(ctx, r.read_some(), read);
  ctx.poll();
  CHECK_FALSE(read.done);
  r.close();
  REQUIRE(run_real(ctx, [&] { return read.done; }));
  CHECK(read.code() == asio::error::operation_aborted);
  REQUIRE(run_real(ctx, [&] { return srv.peer_closes == 1; }));
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("http open: interim 1xx responses come before the head and are skipped",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) {
    return script{
        emit("HTTP/1.1 100 Continue\r\n\r\n"), hold(0),
        emit("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + chunked_head + chunk("data")),
        emit(last_chunk)};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  bool opened = false;
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    opened = true;
    CHECK(r.head().status == 200);
    CHECK_FALSE(r.head().headers.find("link"));
    co_return co_await read_all(r);
  };
  outcome<std::string> out;
  spawn(ctx, body(), out);
  // The 100 Continue alone does not complete open.
  REQUIRE(run_real(ctx, [&] { return srv.sent == 1; }));
  ctx.poll();
  CHECK_FALSE(opened);
  srv.open_gate(0);
  REQUIRE(run_real(ctx, [&] { return out.done; }));
  REQUIRE(out.value);
  CHECK(*out.value == "data");
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http open: a 5xx head is a response with a readable body, not an exception",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) {
    return script{
        emit("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n"
             "Content-Length: 17\r\n\r\n{\"error\":\"busy\"}\n")};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("POST", srv.url("/v1/chat")));
    CHECK(r.head().status == 503);
    CHECK(r.head().reason == "Service Unavailable");
    CHECK(r.head().headers.find("retry-after") == "2");
    co_return co_await read_all(r);
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(*out.value == "{\"error\":\"busy\"}\n");
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("http open: failures before the head are thrown by open as by send", "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int k) {
    return k == 0 ? script{hang_up()}
                  : script{emit("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"), hang_up()};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto bad = run_one(ctx, cl.open(kh::request("GET", "ftp://example.com/")));
  CHECK(bad.code() == kh::error::bad_url);
  auto closed = run_one(ctx, cl.open(kh::request("GET", srv.url())));
  CHECK(closed.code() == kh::error::connection_closed);
  // A body cut short: open succeeds, the read fails with truncated_response.
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    co_return co_await read_all(r);
  };
  auto cut = run_one(ctx, body());
  CHECK(cut.code() == kh::error::truncated_response);
  CHECK(cut.code() == keel::condition::transient);
  CHECK(cl.pooled_idle() == 0);
}

TEST_CASE("http open: request_timeout covers the head only, not a slow body", "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int k) {
    if (k == 0) {
      return script{emit(chunked_head + chunk("a")), hold(0), emit(chunk("b") + last_chunk)};
    }
    return script{await_close()};  // never answers
  };
  kh::client_options opts;
  // The first head must beat it, even under ASan on a loaded machine.
  opts.request_timeout = std::chrono::milliseconds(200);
  kh::client cl(ctx.get_executor(), opts);
  boost::system::error_code other;
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    std::string got = co_await read_at_least(r, 1);
    // A whole request_timeout passes while the reader waits between two pieces: another open,
    // started after this head arrived, times out first (no sleep: that timeout is the event).
    try {
      co_await cl.open(kh::request("GET", srv.url("/never")));
    } catch (const boost::system::system_error& e) {
      other = e.code();
    }
    srv.open_gate(0);
    got += co_await read_all(r);
    co_return got;
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(other == kh::error::request_timeout);
  CHECK(*out.value == "ab");
  CHECK(srv.accepts == 2);
}

TEST_CASE("http open: a reader outlives its client and closes its connection at the end",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) {
    return script{emit(chunked_head + chunk("one")), hold(0), emit(chunk("two") + last_chunk),
                  await_close()};
  };
  auto cl = std::make_unique<kh::client>(ctx.get_executor(), kh::client_options{});
  auto opened = run_one(ctx, cl->open(kh::request("GET", srv.url())));
  REQUIRE(opened.value);
  kh::response_reader r = std::move(*opened.value);
  cl.reset();
  srv.open_gate(0);
  auto rest = run_one(ctx, read_all(r));
  REQUIRE(rest.value);
  CHECK(*rest.value == "onetwo");
  CHECK(r.done());
  // Nobody could close an idle connection of a destroyed client: it is closed, not pooled.
  REQUIRE(run_real(ctx, [&] { return srv.peer_closes == 1; }));
}

TEST_CASE("http open: a moved reader keeps reading; the moved-from one is empty",
          "[http][stream]") {
  asio::io_context ctx;
  stream_server srv(ctx);
  srv.plan = [](int) {
    return script{emit(chunked_head + chunk("one")), hold(0), emit(chunk("two") + last_chunk)};
  };
  kh::client cl(ctx.get_executor(), kh::client_options{});
  auto opened = run_one(ctx, cl.open(kh::request("GET", srv.url())));
  REQUIRE(opened.value);
  kh::response_reader a = std::move(*opened.value);
  auto one = run_one(ctx, read_at_least(a, 3));
  REQUIRE(one.value);
  kh::response_reader b = std::move(a);
  srv.open_gate(0);
  auto moved_from = run_one(ctx, a.read_some());  // NOLINT(bugprone-use-after-move): on purpose
  CHECK(moved_from.code() == asio::error::operation_aborted);
  auto two = run_one(ctx, read_all(b));
  REQUIRE(two.value);
  CHECK(*one.value + *two.value == "onetwo");
  CHECK(b.done());
  CHECK(cl.pooled_idle() == 1);
}

TEST_CASE("https open: a TLS body arrives in pieces and the connection is reused",
          "[http][stream]") {
  test_pki pki;
  asio::io_context ctx;
  stream_server srv(ctx, &pki.server_ctx);
  srv.plan = [](int k) {
    if (k == 0) {
      return script{emit(chunked_head + chunk("secure")), hold(0), emit(chunk(" stream")),
                    emit(last_chunk)};
    }
    return script{emit("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")};
  };
  kh::client_options opts;
  opts.tls.ca_file = pki.ca_file;
  kh::client cl(ctx.get_executor(), opts);
  int sent_at_first = -1;
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    std::string got = co_await read_at_least(r, 6);
    sent_at_first = srv.sent;
    srv.open_gate(0);
    got += "|" + co_await read_all(r);
    auto res = co_await cl.send(kh::request("GET", srv.url()));
    co_return got + "|" + res.body;
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(*out.value == "secure| stream|ok");
  CHECK(sent_at_first == 1);
  CHECK(cl.connections_opened() == 1);
  CHECK(srv.accepts == 1);
}

TEST_CASE("https open: a large TLS body read in pieces arrives whole (records span reads)",
          "[http][stream]") {
  // A streamed TLS read waits in a one-byte read and then takes the record's pending plaintext:
  // a body of many full 16 KiB records, some written at once, must arrive byte for byte.
  test_pki pki;
  asio::io_context ctx;
  stream_server srv(ctx, &pki.server_ctx);
  std::string big;
  for (int i = 0; i < 100000; ++i) {
    big += static_cast<char>('a' + i % 26);
  }
  srv.plan = [&big](int) {
    return script{emit(chunked_head + chunk(big.substr(0, 70000))), emit(chunk(big.substr(70000))),
                  emit(last_chunk)};
  };
  kh::client_options opts;
  opts.tls.ca_file = pki.ca_file;
  kh::client cl(ctx.get_executor(), opts);
  auto body = [&]() -> asio::awaitable<std::string> {
    auto r = co_await cl.open(kh::request("GET", srv.url()));
    co_return co_await read_all(r);
  };
  auto out = run_one(ctx, body());
  REQUIRE(out.value);
  CHECK(*out.value == big);
}
