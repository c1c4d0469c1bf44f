// keel::gateway::server (keel/gateway/server.hpp).
#include <keel/gateway/server.hpp>

#include <keel/gateway/openai_wire.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>

namespace keel::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = beast::http;
using tcp = asio::ip::tcp;
using nlohmann::json;

namespace {

using response = bhttp::response<bhttp::string_body>;

response json_response(int status, const json& body) {
  response res;
  res.result(static_cast<unsigned>(status));
  res.set(bhttp::field::content_type, "application/json");
  res.body() = body.dump();
  return res;
}

response error_response(int status, std::string_view message, std::string_view type,
                        std::string_view param = {}, std::string_view code = {}) {
  return json_response(status, error_body(message, type, param, code));
}

}  // namespace

struct server::impl : std::enable_shared_from_this<impl> {
  struct connection {
    explicit connection(tcp::socket s) : stream(std::move(s)) {}
    beast::tcp_stream stream;
    asio::cancellation_signal cancel;
    bool busy = false;  // a request is being answered
  };

  impl(asio::any_io_executor e, keel::llm::client& c, server_options o)
      : ex(std::move(e)),
        client(c),
        opts(std::move(o)),
        acceptor(ex),
        drain_timer(ex),
        ids(std::random_device{}()) {}

  asio::any_io_executor ex;
  keel::llm::client& client;
  server_options opts;
  tcp::acceptor acceptor;
  asio::steady_timer drain_timer;
  std::mt19937_64 ids;
  std::set<std::shared_ptr<connection>> live;
  unsigned short bound_port = 0;
  bool running = false;
  bool draining = false;
  bool cancelling = false;  // the drain's grace is over (or stop()): calls are cancelled
  server_stats counters;

  std::string next_id(const char* prefix) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%s%016llx", prefix, static_cast<unsigned long long>(ids()));
    return buf;
  }

  void start() {
    if (running) {
      return;
    }
    const tcp::endpoint ep(asio::ip::make_address(opts.address), opts.port);
    acceptor.open(ep.protocol());
    acceptor.set_option(tcp::acceptor::reuse_address(true));
    acceptor.bind(ep);
    acceptor.listen();
    bound_port = acceptor.local_endpoint().port();
    running = true;
    asio::co_spawn(ex, accept_loop(shared_from_this()), asio::detached);
  }

  static asio::awaitable<void> accept_loop(std::shared_ptr<impl> self) {
    while (self->running) {
      auto [ec, sock] = co_await self->acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) {
        if (!self->running || !self->acceptor.is_open()) {
          co_return;
        }
        continue;
      }
      boost::system::error_code ignored;
      sock.set_option(tcp::no_delay(true), ignored);
      auto c = std::make_shared<connection>(std::move(sock));
      ++self->counters.connections;
      self->live.insert(c);
      asio::co_spawn(self->ex, session(self, c),
                     asio::bind_cancellation_slot(c->cancel.slot(), asio::detached));
    }
  }

  static asio::awaitable<void> session(std::shared_ptr<impl> self, std::shared_ptr<connection> c) {
    beast::flat_buffer buffer;
    for (;;) {
      bhttp::request_parser<bhttp::string_body> parser;
      parser.header_limit(self->opts.max_header);
      parser.body_limit(self->opts.max_request_body);
      c->stream.expires_after(self->opts.read_timeout);
      auto [ec, n] = co_await bhttp::async_read(c->stream, buffer, parser,
                                                asio::as_tuple(asio::use_awaitable));
      std::optional<response> res;
      bool keep = false;
      if (ec == bhttp::error::body_limit) {
        res = error_response(413,
                             "The request body is larger than this gateway accepts (" +
                                 std::to_string(self->opts.max_request_body) + " bytes).",
                             "invalid_request_error", "", "request_too_large");
      } else if (ec == bhttp::error::header_limit) {
        res = error_response(431, "The request's headers are too large.", "invalid_request_error",
                             "", "headers_too_large");
      } else if (ec) {
        break;
      } else {
        ++self->counters.requests;
        bhttp::request<bhttp::string_body> req = parser.release();
        c->busy = true;
        res = co_await self->handle(req);
        c->busy = false;
        keep = req.keep_alive() && self->running && !self->draining;
        res->version(req.version());
      }
      if (res->result_int() >= 400) {
        ++self->counters.errors;
      }
      if (self->cancelling) {
        // The call was cancelled: the answer goes out (the 503) under a fresh state.
        co_await asio::this_coro::reset_cancellation_state();
      }
      res->set(bhttp::field::server, "keel");
      res->keep_alive(keep);
      res->prepare_payload();
      c->stream.expires_after(self->opts.write_timeout);
      auto [wec, wn] =
          co_await bhttp::async_write(c->stream, *res, asio::as_tuple(asio::use_awaitable));
      if (wec || !keep) {
        break;
      }
    }
    boost::system::error_code ignored;
    c->stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
    c->stream.close();
    self->live.erase(c);
    if (self->draining && self->live.empty()) {
      self->drain_timer.cancel();
    }
  }

  asio::awaitable<response> handle(const bhttp::request<bhttp::string_body>& req) {
    std::string_view target = req.target();
    target = target.substr(0, target.find('?'));
    const bool get = req.method() == bhttp::verb::get;
    const bool post = req.method() == bhttp::verb::post;
    if (target == "/healthz") {
      if (!get) {
        co_return error_response(405, "Use GET /healthz.", "invalid_request_error");
      }
      co_return json_response(draining ? 503 : 200, json{{"status", draining ? "draining" : "ok"}});
    }
    if (target == "/v1/models") {
      if (!get) {
        co_return error_response(405, "Use GET /v1/models.", "invalid_request_error");
      }
      json data = json::array();
      for (const auto& m : opts.models) {
        data.push_back({{"id", m}, {"object", "model"}, {"created", 0}, {"owned_by", "keel"}});
      }
      co_return json_response(200, json{{"object", "list"}, {"data", std::move(data)}});
    }
    if (target == "/v1/chat/completions") {
      if (!post) {
        co_return error_response(405, "Use POST /v1/chat/completions.", "invalid_request_error");
      }
      co_return co_await complete(req.body());
    }
    co_return error_response(404,
                             "Unknown request URL: " + std::string(req.method_string()) + " " +
                                 std::string(target) + ".",
                             "invalid_request_error", "", "unknown_url");
  }

  asio::awaitable<response> complete(const std::string& body) {
    parsed_chat_request p;
    try {
      p = parse_chat_request(body);
    } catch (const bad_request& e) {
      co_return error_response(e.status(), e.what(), "invalid_request_error", e.param(), e.code());
    }
    const std::string model = p.request.model;
    if (!opts.models.empty() &&
        std::find(opts.models.begin(), opts.models.end(), model) == opts.models.end()) {
      co_return error_response(
          404, "The model `" + model + "` does not exist or you do not have access to it.",
          "invalid_request_error", "model", "model_not_found");
    }
    if (p.stream) {
      co_return error_response(400, "keel serve does not stream yet; send stream: false.",
                               "invalid_request_error", "stream", "unsupported_parameter");
    }
    p.request.model.clear();  // every entry of the chain asks for its own model
    const auto started = std::chrono::steady_clock::now();
    ++counters.in_flight;
    keel::llm::call_outcome out =
        co_await client.call(std::move(p.request), nullptr, keel::bulkhead_permit{});
    --counters.in_flight;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                        std::chrono::steady_clock::now() - started)
                        .count();
    response res;
    if (out.error) {
      if (cancelling) {
        res = error_response(503, "keel serve is shutting down; try again.", "server_error", "",
                             "shutting_down");
      } else {
        const error_reply e = error_answer(out.error);
        res = json_response(e.status, e.body);
        if (e.retry_after && e.retry_after->count() > 0) {
          const double s = std::chrono::duration<double>(*e.retry_after).count();
          res.set("retry-after", std::to_string(static_cast<long long>(std::ceil(s))));
          res.set("retry-after-ms", std::to_string(static_cast<long long>(std::ceil(s * 1000))));
        }
      }
    } else {
      ++counters.completions;
      const long long created = std::chrono::duration_cast<std::chrono::seconds>(
                                    std::chrono::system_clock::now().time_since_epoch())
                                    .count();
      res = json_response(
          200, completion_body(*out.response, next_id("chatcmpl-keel-"), created, model));
    }
    res.set("x-request-id", next_id("req_keel_"));
    res.set("openai-processing-ms", std::to_string(ms));
    co_return res;
  }

  void close_idle() {
    for (const auto& c : live) {
      if (!c->busy) {
        boost::system::error_code ignored;
        c->stream.socket().shutdown(tcp::socket::shutdown_both, ignored);
        c->stream.socket().close(ignored);
      }
    }
  }

  void cancel_busy() {
    cancelling = true;
    // Copies: a session may end (and leave `live`) inside emit.
    std::vector<std::shared_ptr<connection>> busy;
    for (const auto& c : live) {
      if (c->busy) {
        busy.push_back(c);
      }
    }
    for (const auto& c : busy) {
      c->cancel.emit(asio::cancellation_type::terminal);
    }
  }

  void stop_accepting() {
    running = false;
    boost::system::error_code ignored;
    acceptor.close(ignored);
  }

  void stop() {
    stop_accepting();
    draining = true;
    cancel_busy();
    for (const auto& c : live) {
      boost::system::error_code ignored;
      c->stream.socket().close(ignored);
    }
  }
};

server::server(asio::any_io_executor ex, keel::llm::client& client, server_options options)
    : impl_(std::make_shared<impl>(std::move(ex), client, std::move(options))) {}

server::~server() {
  impl_->stop();
}

void server::start() {
  impl_->start();
}

unsigned short server::port() const noexcept {
  return impl_->bound_port;
}

std::string server::base_url() const {
  return "http://" + impl_->opts.address + ":" + std::to_string(impl_->bound_port);
}

asio::awaitable<void> server::drain(std::chrono::nanoseconds grace) {
  std::shared_ptr<impl> self = impl_;
  self->stop_accepting();
  self->draining = true;
  self->close_idle();
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(grace);
  while (!self->live.empty()) {
    if (!self->cancelling) {
      self->drain_timer.expires_at(deadline);
    } else {
      self->drain_timer.expires_at(asio::steady_timer::time_point::max());
    }
    auto [ec] = co_await self->drain_timer.async_wait(asio::as_tuple(asio::use_awaitable));
    if ((co_await asio::this_coro::cancellation_state).cancelled() !=
        asio::cancellation_type::none) {
      co_await asio::this_coro::reset_cancellation_state();
      self->cancel_busy();
      continue;
    }
    if (!ec && !self->cancelling) {
      self->cancel_busy();  // the grace is over
    }
  }
}

void server::stop() {
  impl_->stop();
}

server_stats server::stats() const {
  return impl_->counters;
}

}  // namespace keel::gateway
