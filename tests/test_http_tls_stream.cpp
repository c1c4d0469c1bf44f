// Tests for lib/http/tls_stream.hpp (keel's TLS client stream over the socket, private to
// keel::http) against an asio::ssl server on 127.0.0.1:0.
#include <keel/http/error.hpp>
#include "http/tls_stream.hpp"

#include "support.hpp"
#include "tls_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/write.hpp>
#include <catch2/catch.hpp>

#include <csignal>
#include <functional>
#include <optional>
#include <string>

namespace {

using namespace keel_test;
using boost::asio::ip::tcp;
using keel::http::detail::tls_stream;

/// One TLS client (keel's stream) connected to one asio::ssl server session, handshakes done.
struct tls_pair {
  test_pki pki;
  asio::io_context ctx;
  asio::ssl::context client_ctx{asio::ssl::context::tls_client};
  tcp::acceptor acceptor{ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)};
  std::optional<asio::ssl::stream<tcp::socket>> server;
  tls_stream client{ctx.get_executor(), client_ctx};

  tls_pair() {
    client_ctx.set_verify_mode(asio::ssl::verify_peer);
    client_ctx.load_verify_file(pki.ca_file);
    REQUIRE(SSL_set1_host(client.native_handle(), "localhost") == 1);
    bool accepted = false;
    bool server_done = false;
    bool client_done = false;
    boost::system::error_code server_ec, client_ec;
    acceptor.async_accept([&](boost::system::error_code ec, tcp::socket s) {
      REQUIRE_FALSE(ec);
      server.emplace(std::move(s), pki.server_ctx);
      accepted = true;
      server->async_handshake(asio::ssl::stream_base::server, [&](boost::system::error_code e) {
        server_ec = e;
        server_done = true;
      });
    });
    client.next_layer().socket().connect(acceptor.local_endpoint());
    client.async_handshake([&](boost::system::error_code e) {
      client_ec = e;
      client_done = true;
    });
    REQUIRE(run_real(ctx, [&] { return accepted && server_done && client_done; }));
    REQUIRE_FALSE(server_ec);
    REQUIRE_FALSE(client_ec);
  }

  /// Reads from the client until `n` bytes or an error.
  std::pair<boost::system::error_code, std::string> client_read(std::size_t n) {
    std::string got;
    boost::system::error_code ec;
    bool done = false;
    char buf[4096];
    std::function<void()> next = [&] {
      client.async_read_some(asio::buffer(buf), [&](boost::system::error_code e, std::size_t k) {
        got.append(buf, k);
        if (e || got.size() >= n) {
          ec = e;
          done = true;
          return;
        }
        next();
      });
    };
    next();
    REQUIRE(run_real(ctx, [&] { return done; }));
    return {ec, got};
  }
};

}  // namespace

TEST_CASE("tls_stream: bytes both ways, a record at a time or many, after the handshake",
          "[http][tls]") {
  tls_pair p;
  std::string big(300 * 1024, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) {
    big[i] = static_cast<char>('A' + (i * 13) % 26);
  }
  // Client to server: async_write over async_write_some (partial writes, one record each).
  bool wrote = false;
  asio::async_write(p.client, asio::buffer(big), [&](boost::system::error_code ec, std::size_t n) {
    CHECK_FALSE(ec);
    CHECK(n == big.size());
    wrote = true;
  });
  std::string at_server(big.size(), '\0');
  bool read = false;
  asio::async_read(*p.server, asio::buffer(at_server),
                   [&](boost::system::error_code ec, std::size_t) {
                     CHECK_FALSE(ec);
                     read = true;
                   });
  REQUIRE(run_real(p.ctx, [&] { return wrote && read; }));
  CHECK(at_server == big);
  // Server to client.
  asio::async_write(*p.server, asio::buffer(big), [](boost::system::error_code, std::size_t) {});
  auto [ec, got] = p.client_read(big.size());
  CHECK_FALSE(ec);
  CHECK(got == big);
}

TEST_CASE("tls_stream: an operation never completes inside its initiating call", "[http][tls]") {
  tls_pair p;
  // Zero-length operations complete at once, with 0 bytes, through a post.
  bool in_call = true;
  bool read_done = false;
  bool write_done = false;
  p.client.async_read_some(asio::mutable_buffer(),
                           [&](boost::system::error_code ec, std::size_t n) {
                             CHECK_FALSE(in_call);
                             CHECK_FALSE(ec);
                             CHECK(n == 0);
                             read_done = true;
                           });
  p.client.async_write_some(asio::const_buffer(), [&](boost::system::error_code ec, std::size_t n) {
    CHECK_FALSE(in_call);
    CHECK_FALSE(ec);
    CHECK(n == 0);
    write_done = true;
  });
  in_call = false;
  REQUIRE(run_real(p.ctx, [&] { return read_done && write_done; }));
  // A read whose bytes OpenSSL already holds completes without waiting, but still posted: a
  // one-byte read leaves the rest of the record's plaintext in OpenSSL.
  asio::async_write(*p.server, asio::buffer(std::string("hello world")),
                    [](boost::system::error_code, std::size_t) {});
  std::string got;
  bool first_done = false;
  char one = 0;
  p.client.async_read_some(asio::buffer(&one, 1), [&](boost::system::error_code e, std::size_t n) {
    CHECK_FALSE(e);
    REQUIRE(n == 1);
    got.push_back(one);
    first_done = true;
  });
  REQUIRE(run_real(p.ctx, [&] { return first_done; }));
  REQUIRE(SSL_pending(p.client.native_handle()) == 10);
  in_call = true;
  bool rest_done = false;
  char rest[64];
  p.client.async_read_some(asio::buffer(rest), [&](boost::system::error_code e, std::size_t n) {
    CHECK_FALSE(in_call);
    CHECK_FALSE(e);
    got.append(rest, n);
    rest_done = true;
  });
  in_call = false;
  CHECK_FALSE(rest_done);
  REQUIRE(run_real(p.ctx, [&] { return rest_done; }));
  CHECK(got == "hello world");
}

TEST_CASE("tls_stream: close_notify is eof; a TCP close without it is stream_truncated",
          "[http][tls]") {
  {
    tls_pair p;
    bool shut = false;
    p.server->async_shutdown([&](boost::system::error_code) { shut = true; });
    auto [ec, got] = p.client_read(1);
    CHECK(ec == asio::error::eof);
    CHECK(got.empty());
    p.client.next_layer().socket().close();
    REQUIRE(run_real(p.ctx, [&] { return shut; }));
  }
  {
    tls_pair p;
    asio::async_write(
        *p.server, asio::buffer(std::string("partial")),
        [&](boost::system::error_code, std::size_t) { p.server->next_layer().close(); });
    auto [ec, got] = p.client_read(1000);
    CHECK(got == "partial");
    CHECK(ec == asio::ssl::error::stream_truncated);
  }
}

TEST_CASE("tls_stream: a write after the socket is shut down fails with EPIPE, no SIGPIPE",
          "[http][tls]") {
  // SIGPIPE at its default action (terminate) for this test: a BIO that wrote with write(2) or
  // send(2) without MSG_NOSIGNAL would end the process here.
  struct sigaction dfl {};
  struct sigaction saved {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  REQUIRE(::sigaction(SIGPIPE, &dfl, &saved) == 0);
  struct restore {
    struct sigaction& s;
    ~restore() { ::sigaction(SIGPIPE, &s, nullptr); }
  } restore_at_end{saved};
  tls_pair p;
  p.client.next_layer().socket().shutdown(tcp::socket::shutdown_send);
  bool done = false;
  boost::system::error_code ec;
  const std::string bytes(1000, 'x');
  p.client.async_write_some(asio::buffer(bytes), [&](boost::system::error_code e, std::size_t n) {
    ec = e;
    CHECK(n == 0);
    done = true;
  });
  REQUIRE(run_real(p.ctx, [&] { return done; }));
  CHECK(ec == asio::error::broken_pipe);
}

TEST_CASE("tls_stream: a pending read is cancelled through its cancellation slot", "[http][tls]") {
  tls_pair p;
  asio::cancellation_signal cancel;
  bool done = false;
  boost::system::error_code ec;
  char buf[16];
  p.client.async_read_some(
      asio::buffer(buf),
      asio::bind_cancellation_slot(cancel.slot(), [&](boost::system::error_code e, std::size_t n) {
        ec = e;
        CHECK(n == 0);
        done = true;
      }));
  // Nothing to read: the read waits on the socket until the signal. (The context stopped when
  // the set-up ran out of work: restart it, or poll() would run nothing.)
  p.ctx.restart();
  for (int i = 0; i < 10; ++i) {
    p.ctx.poll();
  }
  CHECK_FALSE(done);
  cancel.emit(asio::cancellation_type::terminal);
  REQUIRE(run_real(p.ctx, [&] { return done; }));
  CHECK(ec == asio::error::operation_aborted);
}

TEST_CASE("tls_stream: a certificate that does not verify fails the handshake in the ssl category",
          "[http][tls]") {
  test_pki pki;
  asio::io_context ctx;
  asio::ssl::context client_ctx{asio::ssl::context::tls_client};
  client_ctx.set_verify_mode(asio::ssl::verify_peer);  // and no CA: nothing is trusted
  tcp::acceptor acceptor{ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)};
  std::optional<asio::ssl::stream<tcp::socket>> server;
  acceptor.async_accept([&](boost::system::error_code ec, tcp::socket s) {
    REQUIRE_FALSE(ec);
    server.emplace(std::move(s), pki.server_ctx);
    server->async_handshake(asio::ssl::stream_base::server, [](boost::system::error_code) {});
  });
  tls_stream client{ctx.get_executor(), client_ctx};
  client.next_layer().socket().connect(acceptor.local_endpoint());
  bool done = false;
  boost::system::error_code ec;
  client.async_handshake([&](boost::system::error_code e) {
    ec = e;
    done = true;
  });
  REQUIRE(run_real(ctx, [&] { return done; }));
  CHECK(ec.category() == asio::error::get_ssl_category());
  CHECK(keel::http::normalize_error(ec) == keel::http::error::tls_verification_failed);
  CHECK(SSL_get_verify_result(client.native_handle()) != X509_V_OK);
}

TEST_CASE("tls_stream: async_wait_readable waits on the socket until a record arrives",
          "[http][tls]") {
  tls_pair p;
  // First take what the server sent after its handshake (TLS 1.3 session tickets), with a record.
  asio::async_write(*p.server, asio::buffer(std::string("x")),
                    [](boost::system::error_code, std::size_t) {});
  auto first = p.client_read(1);
  REQUIRE_FALSE(first.first);
  REQUIRE(first.second == "x");
  bool woke = false;
  REQUIRE(p.client.drained());
  p.client.async_wait_readable([&](boost::system::error_code ec) {
    CHECK_FALSE(ec);
    woke = true;
  });
  p.ctx.restart();  // stopped when the read above ran out of work
  for (int i = 0; i < 10; ++i) {
    p.ctx.poll();
  }
  CHECK_FALSE(woke);
  asio::async_write(*p.server, asio::buffer(std::string("ping")),
                    [](boost::system::error_code, std::size_t) {});
  REQUIRE(run_real(p.ctx, [&] { return woke; }));
  CHECK(p.client.drained());  // the record waits in the socket, not in OpenSSL
  auto [ec, got] = p.client_read(4);
  CHECK_FALSE(ec);
  CHECK(got == "ping");
}
