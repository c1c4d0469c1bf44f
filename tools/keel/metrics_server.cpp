// The keel command's /metrics HTTP server: serves a metrics_registry's text exposition over
// HTTP/1.1 on an Asio executor (the registry itself is in metrics.cpp).
#include "metrics.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/system/system_error.hpp>

#include <array>
#include <chrono>
#include <exception>
#include <stdexcept>
#include <unordered_set>

namespace keel::cli {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

// Limits on what a client may send: a scrape is a tiny GET.
constexpr std::size_t max_request_bytes = 64 * 1024;
// How long a connection may take to send a request (idle keep-alive time included) or to take a
// response. Longer than Prometheus' default scrape interval (1 min), so that a scraper's
// keep-alive connection normally survives from one scrape to the next.
constexpr std::chrono::seconds session_timeout{120};
// After an error response, how long and how much of the rest of the request we read and discard
// before closing, so that the client sees the response instead of a reset.
constexpr std::chrono::seconds linger_timeout{5};
constexpr std::size_t linger_bytes = 1024 * 1024;
// Pause after a failed accept (e.g. EMFILE) so that the loop does not spin.
constexpr std::chrono::milliseconds accept_backoff{100};

constexpr const char* exposition_content_type = "text/plain; version=0.0.4; charset=utf-8";

bool is_http_error(const boost::system::error_code& ec) {
  return ec.category() == bhttp::make_error_code(bhttp::error::end_of_stream).category();
}

std::string endpoint_text(const std::string& address, unsigned short port) {
  const bool v6 = address.find(':') != std::string::npos;
  return (v6 ? "[" + address + "]" : address) + ":" + std::to_string(port);
}

}  // namespace

struct metrics_server::impl : std::enable_shared_from_this<impl> {
  enum class state { idle, running, stopped };

  asio::any_io_executor ex;
  const metrics_registry& registry;
  std::string address;
  unsigned short requested_port;
  tcp::acceptor acceptor;
  asio::steady_timer backoff;
  unsigned short bound_port = 0;
  state st = state::idle;
  std::unordered_set<beast::tcp_stream*> live;  // open sessions; touched on the executor only

  impl(asio::any_io_executor e, const metrics_registry& r, std::string a, unsigned short p)
      : ex(std::move(e)),
        registry(r),
        address(std::move(a)),
        requested_port(p),
        acceptor(ex),
        backoff(ex) {}

  bool running() const { return st == state::running; }

  static bhttp::response<bhttp::string_body> text_response(bhttp::status status, unsigned version,
                                                           std::string body) {
    bhttp::response<bhttp::string_body> res{status, version};
    res.set(bhttp::field::content_type, "text/plain; charset=utf-8");
    res.body() = std::move(body);
    return res;
  }

  bhttp::response<bhttp::string_body> answer(const bhttp::request<bhttp::string_body>& req) const {
    const std::string_view target = req.target();
    const std::string_view path = target.substr(0, target.find('?'));
    if (path != "/metrics") {
      auto res = text_response(bhttp::status::not_found, req.version(), "not found\n");
      res.prepare_payload();
      return res;
    }
    const bool head = req.method() == bhttp::verb::head;
    if (req.method() != bhttp::verb::get && !head) {
      auto res =
          text_response(bhttp::status::method_not_allowed, req.version(), "method not allowed\n");
      res.set(bhttp::field::allow, "GET, HEAD");
      res.prepare_payload();
      return res;
    }
    bhttp::response<bhttp::string_body> res{bhttp::status::ok, req.version()};
    res.set(bhttp::field::content_type, exposition_content_type);
    res.body() = registry.render();
    res.prepare_payload();
    if (head) {
      res.body().clear();  // Content-Length still states the GET body's size
    }
    return res;
  }

  // Answers a request that could not be read with `status`, then closes gracefully: shut down
  // our side, and read and drop what the client is still sending (bounded in time and size).
  // Closing with unread data would send a reset, and the client could lose the answer.
  static asio::awaitable<void> reject(beast::tcp_stream& stream, bhttp::status status) {
    auto res = text_response(status, 11, std::string(bhttp::obsolete_reason(status)) + "\n");
    res.keep_alive(false);
    res.prepare_payload();
    stream.expires_after(linger_timeout);
    auto [wec, wn] = co_await bhttp::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
    if (wec) {
      co_return;
    }
    boost::system::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
    std::array<char, 4096> sink{};
    std::size_t drained = 0;
    while (drained < linger_bytes) {
      auto [rec, rn] =
          co_await stream.async_read_some(asio::buffer(sink), asio::as_tuple(asio::use_awaitable));
      if (rec) {
        break;
      }
      drained += rn;
    }
  }

  static asio::awaitable<void> session(std::shared_ptr<impl> self,
                                       std::shared_ptr<beast::tcp_stream> stream) {
    self->live.insert(stream.get());
    struct unregister {
      impl* s;
      beast::tcp_stream* c;
      ~unregister() { s->live.erase(c); }
    } guard{self.get(), stream.get()};

    beast::flat_buffer buffer;
    for (;;) {
      bhttp::request_parser<bhttp::string_body> parser;
      parser.header_limit(static_cast<std::uint32_t>(max_request_bytes));
      parser.body_limit(max_request_bytes);
      stream->expires_after(session_timeout);
      auto [ec, n] =
          co_await bhttp::async_read(*stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
      if (!self->running()) {
        // stop() was called, perhaps after this read had completed: never touch the registry
        // again, it may be gone.
        co_return;
      }
      if (ec) {
        if (ec == bhttp::error::header_limit) {
          co_await reject(*stream, bhttp::status::request_header_fields_too_large);
        } else if (ec == bhttp::error::body_limit) {
          co_await reject(*stream, bhttp::status::payload_too_large);
        } else if (is_http_error(ec) && ec != bhttp::error::end_of_stream &&
                   ec != bhttp::error::partial_message) {
          co_await reject(*stream, bhttp::status::bad_request);
        }
        break;  // EOF, reset, timeout or a rejected request
      }
      const auto& req = parser.get();
      auto res = self->answer(req);
      res.keep_alive(req.keep_alive());
      stream->expires_after(session_timeout);
      auto [wec, wn] =
          co_await bhttp::async_write(*stream, res, asio::as_tuple(asio::use_awaitable));
      if (wec || !res.keep_alive() || !self->running()) {
        break;
      }
    }
    boost::system::error_code ignored;
    stream->socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream->close();
  }

  static asio::awaitable<void> accept_loop(std::shared_ptr<impl> self) {
    for (;;) {
      auto [ec, sock] = co_await self->acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
      if (!self->running()) {
        co_return;  // `sock`, if any, closes here
      }
      if (ec) {
        self->backoff.expires_after(accept_backoff);
        co_await self->backoff.async_wait(asio::as_tuple(asio::use_awaitable));
        if (!self->running()) {
          co_return;
        }
        continue;
      }
      boost::system::error_code ignored;
      sock.set_option(tcp::no_delay(true), ignored);
      // A failed session (only bad_alloc can escape it) must not take the program down.
      asio::co_spawn(self->ex, session(self, std::make_shared<beast::tcp_stream>(std::move(sock))),
                     [](const std::exception_ptr&) {});
    }
  }

  void start() {
    if (st == state::running) {
      return;
    }
    if (st == state::stopped) {
      throw std::logic_error("metrics_server: a stopped server cannot be started again");
    }
    const std::string where = endpoint_text(address, requested_port);
    boost::system::error_code ec;
    const auto addr = asio::ip::make_address(address, ec);
    if (ec) {
      throw boost::system::system_error(ec, "metrics_server: invalid listen address " + where);
    }
    const tcp::endpoint ep(addr, requested_port);
    acceptor.open(ep.protocol(), ec);
    if (!ec) {
      acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
    }
    if (!ec) {
      acceptor.bind(ep, ec);
    }
    if (!ec) {
      acceptor.listen(asio::socket_base::max_listen_connections, ec);
    }
    tcp::endpoint local;
    if (!ec) {
      local = acceptor.local_endpoint(ec);
    }
    if (ec) {
      boost::system::error_code ignored;
      acceptor.close(ignored);
      // A copy of the code without Asio's source location, which what() would otherwise show.
      throw boost::system::system_error(boost::system::error_code(ec.value(), ec.category()),
                                        "metrics_server: cannot listen on " + where);
    }
    bound_port = local.port();
    st = state::running;
    asio::co_spawn(ex, accept_loop(shared_from_this()), asio::detached);
  }

  void stop() {
    st = state::stopped;
    boost::system::error_code ignored;
    acceptor.close(ignored);
    backoff.cancel();
    for (beast::tcp_stream* s : live) {
      s->close();
    }
  }
};

metrics_server::metrics_server(boost::asio::any_io_executor ex, const metrics_registry& registry,
                               std::string address, unsigned short port)
    : impl_(std::make_shared<impl>(std::move(ex), registry, std::move(address), port)) {}

metrics_server::~metrics_server() {
  impl_->stop();
}

void metrics_server::start() {
  impl_->start();
}

unsigned short metrics_server::port() const noexcept {
  return impl_->bound_port;
}

void metrics_server::stop() {
  impl_->stop();
}

}  // namespace keel::cli
