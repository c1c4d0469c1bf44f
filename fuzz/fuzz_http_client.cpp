// Fuzz target: keel::http::client reading whatever bytes a server sends back (the input, verbatim).
//
// A tiny loopback server (plain Asio, 127.0.0.1 port 0, bound once per process) accepts two
// connections per input; on each it reads the request head, writes the input bytes as the
// "response" and closes. On the first, the client sends one GET with small limits and must end
// with a response that respects those limits or a keel::failure with a transport code; a timeout
// means it waited for bytes that could never come (the server has closed), so it counts as a
// hang. On the second, a fresh client `open`s the same GET and reads the body with `read_some`
// until its end: it must end exactly as `send` did (same status, fields and body, or the same
// error code), every piece must be non-empty and the reader's counters must agree with what it
// returned. Everything runs in one io_context run per input, with no sleeps.
#include "fuzz_support.hpp"

#include <keel/error.hpp>
#include <keel/http/client.hpp>
#include <keel/http/error.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

constexpr std::size_t max_body = 64 * 1024;
constexpr std::size_t max_headers = 32;
constexpr std::size_t max_header_bytes = 16 * 1024;

// Process-wide: binding a listener per input would cost a socket and a port each time.
struct loopback {
  asio::io_context ctx;
  tcp::acceptor acceptor{ctx, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)};
  std::string url = "http://127.0.0.1:" + std::to_string(acceptor.local_endpoint().port()) +
                    "/v1/chat/completions?key=secret";
};

loopback& instance() {
  static loopback lb;
  return lb;
}

asio::awaitable<void> serve_once(tcp::acceptor& acceptor, std::string_view bytes) {
  auto [ec, sock] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
  if (ec) {
    co_return;
  }
  // Read the whole request head (a GET has no body) so that closing sends FIN, not RST.
  std::string head;
  auto [rec, n] = co_await asio::async_read_until(sock, asio::dynamic_buffer(head), "\r\n\r\n",
                                                  asio::as_tuple(asio::use_awaitable));
  if (rec) {
    co_return;
  }
  (void)n;
  co_await asio::async_write(sock, asio::buffer(bytes.data(), bytes.size()),
                             asio::as_tuple(asio::use_awaitable));
  boost::system::error_code ignored;
  sock.shutdown(tcp::socket::shutdown_both, ignored);
  sock.close(ignored);
}

// The limits every input is read under (both paths).
keel::http::client_options client_options() {
  keel::http::client_options opts;
  opts.max_response_body = max_body;
  opts.max_header_count = max_headers;
  opts.max_header_bytes = max_header_bytes;
  opts.connect_timeout = 2s;
  opts.request_timeout = 2s;
  opts.tls.verify_peer = false;  // plain http; skips loading the system trust store per input
  return opts;
}

struct outcome {
  std::optional<keel::http::response> response;
  std::optional<boost::system::error_code> error;
  std::string what;
};

asio::awaitable<void> fetch(const std::string& url, outcome& out) {
  const keel::http::client_options opts = client_options();
  // The client lives in this frame: destroying it closes a pooled keep-alive connection, so the
  // server's write always completes even if the client left bytes unread.
  auto client = std::make_unique<keel::http::client>(co_await asio::this_coro::executor, opts);
  keel::http::request req("GET", url);
  req.set("accept", "application/json");
  try {
    out.response = co_await client->send(std::move(req));
  } catch (const keel::failure& e) {
    out.error = e.code();
    out.what = e.what();
  }
}

// What the streaming path saw: the head, the pieces, and the reader's own account.
struct stream_outcome {
  std::optional<keel::http::response> head;  // with the pieces joined into its body
  std::optional<boost::system::error_code> error;
  std::string what;
  bool empty_piece = false;
  bool counters_agree = true;  // bytes_read() and done() matched what read_some returned
};

asio::awaitable<void> stream(const std::string& url, stream_outcome& out) {
  const keel::http::client_options opts = client_options();
  auto client = std::make_unique<keel::http::client>(co_await asio::this_coro::executor, opts);
  keel::http::request req("GET", url);
  req.set("accept", "application/json");
  try {
    keel::http::response_reader reader = co_await client->open(std::move(req));
    out.head = reader.head();
    out.counters_agree = reader.bytes_read() == 0 && out.head->body.empty();
    // A bound on the reads, should read_some ever stop making progress (a piece is never
    // empty, so the body's size bounds it).
    for (std::size_t reads = 0; reads <= max_body + 1; ++reads) {
      auto piece = co_await reader.read_some();
      if (!piece) {
        break;
      }
      out.empty_piece = out.empty_piece || piece->empty();
      out.head->body += *piece;
      out.counters_agree = out.counters_agree && reader.bytes_read() == out.head->body.size();
    }
    out.counters_agree = out.counters_agree && reader.done();
  } catch (const keel::failure& e) {
    out.error = e.code();
    out.what = e.what();
  }
}

void check_error(const boost::system::error_code& ec, const std::string& what) {
  using keel::http::error;
  // Beast and OpenSSL codes must have been translated by normalize_error.
  const bool http = ec.category() == keel::http::error_category();
  const bool system = ec.category() == boost::system::system_category();
  KEEL_FUZZ_CHECK(http || system);
  // The server always closes: waiting out a timer means the client missed the end of input.
  KEEL_FUZZ_CHECK(ec != error::request_timeout);
  KEEL_FUZZ_CHECK(ec != error::connect_timeout);
  if (http) {
    KEEL_FUZZ_CHECK(ec == error::body_too_large || ec == error::too_many_headers ||
                    ec == error::header_too_large || ec == error::protocol_error ||
                    ec == error::connection_closed || ec == error::truncated_response);
  }
  // Messages name the method and the redacted URL, never the query string.
  KEEL_FUZZ_CHECK(what.find("GET http://127.0.0.1:") != std::string::npos);
  KEEL_FUZZ_CHECK(what.find("secret") == std::string::npos);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  loopback& lb = instance();
  const std::string_view bytes = keel::fuzz::as_text(data, size);
  outcome out;
  stream_outcome streamed;
  // The two exchanges run one after the other, each with its own client and connection.
  auto both = [&]() -> asio::awaitable<void> {
    co_await fetch(lb.url, out);
    co_await stream(lb.url, streamed);
  };
  auto serve_twice = [&]() -> asio::awaitable<void> {
    co_await serve_once(lb.acceptor, bytes);
    co_await serve_once(lb.acceptor, bytes);
  };
  bool server_done = false;
  bool client_done = false;
  std::exception_ptr client_failure;
  asio::co_spawn(lb.ctx, serve_twice(), [&](std::exception_ptr e) {
    server_done = true;
    if (e) {
      std::rethrow_exception(e);
    }
  });
  asio::co_spawn(lb.ctx, both(), [&](std::exception_ptr e) {
    client_done = true;
    client_failure = e;
    // If a client never connected, nothing else will complete the accept.
    boost::system::error_code ignored;
    lb.acceptor.cancel(ignored);
  });
  lb.ctx.run();
  lb.ctx.restart();
  KEEL_FUZZ_CHECK(server_done && client_done);
  if (client_failure) {
    try {
      std::rethrow_exception(client_failure);
    } catch (...) {
      keel::fuzz::unexpected_exception("keel::http::client::send or open/read_some");
    }
  }
  KEEL_FUZZ_CHECK(out.response.has_value() != out.error.has_value());
  // Reading piece by piece ends exactly as reading the whole response: send is open plus
  // reads, and the bytes are the same whatever the segmentation.
  KEEL_FUZZ_CHECK(out.error.has_value() == streamed.error.has_value());
  if (out.error) {
    check_error(*out.error, out.what);
    check_error(*streamed.error, streamed.what);
    KEEL_FUZZ_CHECK(*out.error == *streamed.error);
    return 0;
  }
  const keel::http::response& res = *out.response;
  KEEL_FUZZ_CHECK(res.status >= 200 && res.status <= 999);  // a final response
  KEEL_FUZZ_CHECK(res.body.size() <= max_body);
  // De-chunking only removes bytes: the body cannot be larger than what the server sent.
  KEEL_FUZZ_CHECK(res.body.size() <= size);
  KEEL_FUZZ_CHECK(res.headers.size() <= max_headers);
  const keel::http::response& sres = *streamed.head;
  KEEL_FUZZ_CHECK(sres.status == res.status);
  KEEL_FUZZ_CHECK(sres.reason == res.reason);
  KEEL_FUZZ_CHECK(sres.headers.fields() == res.headers.fields());
  KEEL_FUZZ_CHECK(sres.body == res.body);
  KEEL_FUZZ_CHECK(!streamed.empty_piece);
  KEEL_FUZZ_CHECK(streamed.counters_agree);
  return 0;
}
