// keel::gateway::server (keel/gateway/server.hpp).
#include <keel/gateway/server.hpp>

#include <keel/gateway/openai_wire.hpp>

#include <keel/error.hpp>
#include <keel/llm/sigv4.hpp>
#include <keel/throttler.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>

#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <random>
#include <set>
#include <stdexcept>

namespace keel::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = beast::http;
using tcp = asio::ip::tcp;
using nlohmann::json;

namespace {

using response = bhttp::response<bhttp::string_body>;

// The head of a response as HTTP/1.x bytes: status line, header fields in order, blank line,
// what Beast's serializer sends before the body (the framing fields come from prepare_payload(),
// keep_alive() or chunked()). Every answer's head, streamed or not, is written from this.
std::string serialize_head(const bhttp::response_header<>& h) {
  const unsigned v = h.version();
  std::string wire;
  wire.reserve(256);
  wire += "HTTP/";
  wire += static_cast<char>('0' + v / 10 % 10);
  wire += '.';
  wire += static_cast<char>('0' + v % 10);
  wire += ' ';
  wire.append(std::to_string(h.result_int())).append(" ").append(h.reason()).append("\r\n");
  for (const auto& f : h) {
    wire.append(f.name_string()).append(": ").append(f.value()).append("\r\n");
  }
  wire += "\r\n";
  return wire;
}

// JSON text that never throws: a provider's message cut inside a UTF-8 sequence (messages are
// truncated) would make dump() throw type_error 316 and end the session without an answer.
std::string text_of(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

response json_response(int status, std::string body) {
  response res;
  res.result(static_cast<unsigned>(status));
  res.set(bhttp::field::content_type, "application/json");
  res.body() = std::move(body);
  return res;
}

response json_response(int status, const json& body) {
  return json_response(status, text_of(body));
}

response error_response(int status, std::string_view message, std::string_view type,
                        std::string_view param = {}, std::string_view code = {}) {
  return json_response(status, error_body(message, type, param, code));
}

// The most a chunk's size line (with extensions) or the trailer may take beyond `max_header`: the
// request buffer's bound (see session()).
constexpr std::size_t max_chunk_line = 64 * 1024;

// A 405 for a target that takes only `allow` (RFC 9110: the answer names the methods it takes).
response method_not_allowed(std::string_view allow, std::string_view target) {
  const std::string use = allow == "POST" ? "POST" : "GET";  // HEAD goes with GET
  response res =
      error_response(405, "Use " + use + " " + std::string(target) + ".", "invalid_request_error");
  res.set(bhttp::field::allow, allow);
  return res;
}

// A parse error of the caller's HTTP (not the connection ending, nor a limit, which are answered
// apart): answered with a 400 before the connection closes, as nginx does, so that the caller
// sees why and does not retry a request that will never parse.
bool malformed_http(const boost::system::error_code& ec) {
  if (ec.category() != bhttp::make_error_code(bhttp::error::bad_method).category()) {
    return false;
  }
  switch (static_cast<bhttp::error>(ec.value())) {
    case bhttp::error::end_of_stream:
    case bhttp::error::partial_message:
    case bhttp::error::need_more:
    case bhttp::error::need_buffer:
    case bhttp::error::end_of_chunk:
    case bhttp::error::stale_parser:
    case bhttp::error::short_read:
    case bhttp::error::body_limit:
    case bhttp::error::header_limit:
    case bhttp::error::buffer_overflow:
    case bhttp::error::bad_alloc:
      return false;
    default:
      return true;
  }
}

}  // namespace

struct server::impl : std::enable_shared_from_this<impl> {
  struct caller;
  struct connection : std::enable_shared_from_this<connection> {
    explicit connection(tcp::socket s) : stream(std::move(s)) {}
    beast::tcp_stream stream;
    asio::cancellation_signal cancel;
    bool busy = false;            // a request is being answered
    bool stream_ok = true;        // the last streamed answer ended cleanly (keep-alive possible)
    bool stream_started = false;  // the current answer's head went out as a stream
    bool hung_up = false;         // the caller closed while its stream ran (see watch_hangup)
    // The current request's key, checked from its head (read_request): `who` is its caller.
    bool authenticated = false;
    caller* who = nullptr;
    // The wait on the caller's socket while a stream runs (watch_hangup): `watching` until the
    // stream ends; `watch_stop` cancels the wait.
    bool watching = false;
    asio::cancellation_signal watch_stop;
  };

  // One configured caller: its limits and what it uses now.
  struct caller {
    const keel::llm::serve_client* cfg = nullptr;
    std::unique_ptr<keel::throttler> rate;  // null: no rate limit
    int in_flight = 0;
  };

  impl(asio::any_io_executor e, std::vector<route> r, keel::llm::client* any_model,
       server_options o)
      : ex(std::move(e)),
        routes(std::move(r)),
        any(any_model),
        opts(std::move(o)),
        acceptor(ex),
        drain_timer(ex),
        ids(std::random_device{}()) {
    for (const keel::llm::serve_client& sc : opts.clients) {
      caller& k = callers[sc.key_sha256];
      k.cfg = &sc;
      if (sc.requests_per_minute > 0) {
        keel::throttler_options to;
        to.requests_per_second = sc.requests_per_minute / 60;
        to.burst = std::max(1.0, to.requests_per_second);  // one second of burst
        k.rate = std::make_unique<keel::throttler>(ex, to);
      }
    }
  }

  std::map<std::string, caller> callers;  // by the SHA-256 of the key (hex)

  // The caller a request's key names; null (and `refusal` set) if it may not call.
  caller* authenticate(const bhttp::request<bhttp::string_body>& req,
                       std::optional<response>& refusal) {
    if (callers.empty()) {
      return nullptr;
    }
    const auto auth = req.find(bhttp::field::authorization);
    std::string_view v;
    if (auth != req.end()) {
      v = std::string_view(auth->value().data(), auth->value().size());
    }
    constexpr std::string_view bearer = "Bearer ";
    const bool has = v.size() > bearer.size() && beast::iequals(v.substr(0, bearer.size()), bearer);
    if (!has) {
      ++counters.unauthorized;
      refusal = error_response(
          401,
          "You didn't provide an API key. You need to provide your API key in an Authorization "
          "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
          "invalid_request_error", "", "missing_api_key");
      return nullptr;
    }
    const auto it = callers.find(keel::llm::sigv4::sha256_hex(v.substr(bearer.size())));
    if (it == callers.end()) {
      ++counters.unauthorized;
      refusal = error_response(401, "Incorrect API key provided (not shown) for this keel serve.",
                               "invalid_request_error", "", "invalid_api_key");
      return nullptr;
    }
    return &it->second;
  }

  // Checks `k`'s limits before a call; a refusal (429) if it is over one.
  std::optional<response> over_limit(caller& k) {
    if (k.cfg->concurrency > 0 && k.in_flight >= k.cfg->concurrency) {
      ++counters.limited;
      return error_response(429,
                            "Too many requests in flight for client '" + k.cfg->name + "' (" +
                                std::to_string(k.cfg->concurrency) + " allowed at once).",
                            "requests", "", "concurrency_limit_exceeded");
    }
    if (k.rate && !k.rate->try_acquire()) {
      ++counters.limited;
      const double rps = k.cfg->requests_per_minute / 60;
      const double wait = std::max(0.001, (1 - k.rate->available_requests()) / rps);
      response res = error_response(429,
                                    "Rate limit reached for client '" + k.cfg->name +
                                        "': " + json(k.cfg->requests_per_minute).dump() +
                                        " requests per minute.",
                                    "requests", "", "rate_limit_exceeded");
      res.set("retry-after", std::to_string(static_cast<long long>(std::ceil(wait))));
      res.set("retry-after-ms", std::to_string(static_cast<long long>(std::ceil(wait * 1000))));
      return res;
    }
    return std::nullopt;
  }

  asio::any_io_executor ex;
  std::vector<route> routes;
  keel::llm::client* any = nullptr;  // answers every model (one client, no `models`)
  server_options opts;

  // The client that answers `model`; null if none.
  keel::llm::client* client_for(const std::string& model) const {
    for (const route& r : routes) {
      if (r.model == model) {
        return r.client;
      }
    }
    return any;
  }
  tcp::acceptor acceptor;
  asio::steady_timer drain_timer;
  std::mt19937_64 ids;
  std::set<std::shared_ptr<connection>> live;
  unsigned short bound_port = 0;
  bool running = false;
  bool draining = false;
  bool cancelling = false;  // the drain's grace is over (or stop()): calls are cancelled
  server_stats counters;

  // The prefix and 16 hex digits of the next id (by hand: snprintf was 1% of a request).
  std::string next_id(std::string_view prefix) {
    static constexpr char hex[] = "0123456789abcdef";
    std::string id(prefix);
    id.resize(prefix.size() + 16);
    std::uint64_t v = ids();
    for (std::size_t i = id.size(); i-- > prefix.size(); v >>= 4) {
      id[i] = hex[v & 0xf];
    }
    return id;
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
        // Out of file descriptors (or another failure that may last): not a busy loop.
        asio::steady_timer pause(self->ex, std::chrono::milliseconds(50));
        co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
        continue;
      }
      boost::system::error_code ignored;
      if (self->live.size() >= self->opts.max_connections) {
        ++self->counters.refused_connections;
        sock.close(ignored);
        continue;
      }
      sock.set_option(tcp::no_delay(true), ignored);
      auto c = std::make_shared<connection>(std::move(sock));
      ++self->counters.connections;
      self->live.insert(c);
      asio::co_spawn(self->ex, session(self, c),
                     asio::bind_cancellation_slot(c->cancel.slot(), asio::detached));
    }
  }

  // Reads one request: the head, then the body. Before the body, the head alone may decide the
  // answer (`early`): a caller whose key is refused, or a target whose answer
  // does not read a body; the body is then never read, so a caller without a key cannot make the
  // gateway hold `max_request_body` bytes per connection. A caller that sent `Expect:
  // 100-continue` (curl does for a body over 1 KiB) waits for a `100 Continue` before it sends the
  // body, or a second without one: it gets one once the head has passed the limits and those
  // checks (a body over `max_request_body` is refused by its Content-Length with the head, so it
  // is never sent). The body bytes that came with the head are parsed from the buffer without
  // another asynchronous operation, so the common request costs what one `async_read` did.
  static asio::awaitable<boost::system::error_code> read_request(
      impl& self, connection& c, beast::flat_buffer& buffer,
      bhttp::request_parser<bhttp::string_body>& parser, std::optional<response>& early) {
    auto [ec, n] = co_await bhttp::async_read_header(c.stream, buffer, parser,
                                                     asio::as_tuple(asio::use_awaitable));
    if (ec || parser.is_done()) {
      co_return ec;
    }
    if (self.completion_target(parser.get())) {
      // No coroutine frame on the common path; handle() then takes the caller found here.
      c.who = self.authenticate(parser.get(), early);
      c.authenticated = !early;
    } else {
      try {
        early = co_await self.handle(parser.get(), c);
      } catch (...) {
        // As the session's own catch: an answer, and the session's cleanup still runs.
        early = error_response(
            500, "keel serve could not answer: " + keel::describe(std::current_exception()),
            "server_error", "", "internal_error");
      }
    }
    if (early) {
      co_return ec;
    }
    if (parser.get().version() >= 11 &&
        beast::iequals(parser.get()[bhttp::field::expect], "100-continue")) {
      static constexpr std::string_view go_on = "HTTP/1.1 100 Continue\r\n\r\n";
      auto [wec, wn] = co_await asio::async_write(c.stream, asio::buffer(go_on),
                                                  asio::as_tuple(asio::use_awaitable));
      if (wec) {
        co_return wec;
      }
    }
    while (!parser.is_done() && buffer.size() > 0) {
      const std::size_t used = parser.put(buffer.data(), ec);
      buffer.consume(used);
      if (ec == bhttp::error::need_more) {
        ec = {};
        break;
      }
      if (ec) {
        co_return ec;
      }
      if (used == 0) {
        break;
      }
    }
    if (parser.is_done()) {
      co_return ec;
    }
    auto [bec, bn] =
        co_await bhttp::async_read(c.stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
    co_return bec;
  }

  // POST /v1/chat/completions, the one target whose answer reads the body: for any other, or a
  // refused key, the head decides the answer (see read_request).
  static bool completion_target(const bhttp::request<bhttp::string_body>& head) {
    std::string_view target = head.target();
    target = target.substr(0, target.find('?'));
    return target == "/v1/chat/completions" && head.method() == bhttp::verb::post;
  }

  static asio::awaitable<void> session(std::shared_ptr<impl> self, std::shared_ptr<connection> c) {
    // Bounded: Beast's parser keeps a chunk's size line (with its extensions) and the trailer in
    // the buffer until each is whole, and neither the header nor the body limit counts them; an
    // unbounded buffer let a caller without a key grow the gateway by hundreds of MB.
    beast::flat_buffer buffer(self->opts.max_header + max_chunk_line);
    for (;;) {
      c->busy = false;
      c->authenticated = false;
      bhttp::request_parser<bhttp::string_body> parser;
      parser.header_limit(self->opts.max_header);
      parser.body_limit(self->opts.max_request_body);
      c->stream.expires_after(self->opts.read_timeout);
      std::optional<response> early;
      boost::system::error_code ec = co_await read_request(*self, *c, buffer, parser, early);
      std::optional<response> res;
      bool keep = false;
      bool head_only = false;  // HEAD: the answer's head, no body
      // A request answered without its body read: see the lingering close below.
      const bool unread = early || ec == bhttp::error::body_limit ||
                          ec == bhttp::error::header_limit || ec == bhttp::error::buffer_overflow ||
                          malformed_http(ec);
      if (early) {
        ++self->counters.requests;
        res = std::move(early);
        res->version(parser.get().version());
        head_only = parser.get().method() == bhttp::verb::head;
      } else if (ec == bhttp::error::body_limit) {
        res = error_response(413,
                             "The request body is larger than this gateway accepts (" +
                                 std::to_string(self->opts.max_request_body) + " bytes).",
                             "invalid_request_error", "", "request_too_large");
      } else if (ec == bhttp::error::header_limit) {
        res = error_response(431, "The request's headers are too large.", "invalid_request_error",
                             "", "headers_too_large");
      } else if (ec == bhttp::error::buffer_overflow) {
        res = error_response(
            400,
            "A chunk header or the trailer of the request is larger than this gateway accepts.",
            "invalid_request_error", "", "invalid_http");
      } else if (malformed_http(ec)) {
        res = error_response(400,
                             "keel serve could not parse the HTTP request: " + ec.message() + ".",
                             "invalid_request_error", "", "invalid_http");
      } else if (ec) {
        break;
      } else {
        ++self->counters.requests;
        bhttp::request<bhttp::string_body> req = parser.release();
        head_only = req.method() == bhttp::verb::head;
        c->busy = true;  // until the answer is written: a drain does not cut it off
        c->stream_started = false;
        try {
          res = co_await self->handle(req, *c);
        } catch (...) {
          // A defect, or memory exhausted: answer 500 (or, mid-stream, close) rather than end
          // the session without a word.
          if (c->stream_started) {
            break;
          }
          res = error_response(
              500, "keel serve could not answer: " + keel::describe(std::current_exception()),
              "server_error", "", "internal_error");
          req.keep_alive(false);
        }
        keep = req.keep_alive() && self->running && !self->draining;
        if (!res) {
          // Streamed: written already.
          if (keep && c->stream_ok) {
            continue;
          }
          break;
        }
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
      c->busy = true;  // any answer being written, refusals too: a drain does not cut it off
      c->stream.expires_after(self->opts.write_timeout);
      // The head and the body in one gathering write: Beast's serializer walks a concatenated
      // buffer sequence whose iterators cost about 7% of the gateway's instructions per request
      // (callgrind), as they did the client's (lib/http/client.cpp writes its requests in one
      // buffer). The body is not copied. A HEAD gets the head only (its Content-Length says
      // what a GET would get).
      const std::string head = serialize_head(*res);
      const std::array<asio::const_buffer, 2> wire{
          asio::buffer(head), head_only ? asio::const_buffer() : asio::buffer(res->body())};
      auto [wec, wn] =
          co_await asio::async_write(c->stream, wire, asio::as_tuple(asio::use_awaitable));
      c->busy = false;
      if (!wec && unread) {
        co_await linger(self, *c);
      }
      if (wec || !keep || self->draining) {  // a drain that began during the write: close
        break;
      }
    }
    c->busy = false;
    boost::system::error_code ignored;
    c->stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
    c->stream.close();
    self->live.erase(c);
    if (self->draining && self->live.empty()) {
      self->drain_timer.cancel();
    }
  }

  // After a 413 or 431 the client may still be sending the request. Closing at once would
  // leave its bytes unread, and the kernel answers unread bytes with a reset that destroys the
  // answer before the client reads it: the SDKs then saw EPIPE or ECONNRESET, not the 413 (and
  // retried the upload). So the send side is shut and the rest is read and dropped until the
  // client closes (nginx's lingering close), bounded by the read timeout and 64 MiB.
  static asio::awaitable<void> linger(std::shared_ptr<impl> self, connection& c) {
    boost::system::error_code ignored;
    c.stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
    c.stream.expires_after(self->opts.read_timeout);
    std::vector<char> sink(16 * 1024);
    constexpr std::size_t max_drain = std::size_t{64} * 1024 * 1024;
    for (std::size_t drained = 0; drained < max_drain;) {
      auto [ec, n] = co_await c.stream.async_read_some(asio::buffer(sink),
                                                       asio::as_tuple(asio::use_awaitable));
      if (ec) {
        break;
      }
      drained += n;
    }
  }

  // The answer to `req`, or nothing when it was streamed to `c` (see stream()).
  asio::awaitable<std::optional<response>> handle(const bhttp::request<bhttp::string_body>& req,
                                                  connection& c) {
    std::string_view target = req.target();
    target = target.substr(0, target.find('?'));
    // HEAD is answered as GET (RFC 9110), without the body (see session()).
    const bool get = req.method() == bhttp::verb::get || req.method() == bhttp::verb::head;
    const bool post = req.method() == bhttp::verb::post;
    if (target == "/healthz") {
      if (!get) {
        co_return method_not_allowed("GET, HEAD", "/healthz");
      }
      co_return json_response(draining ? 503 : 200, json{{"status", draining ? "draining" : "ok"}});
    }
    if (target == "/metrics" && opts.metrics) {
      if (!get) {
        co_return method_not_allowed("GET, HEAD", "/metrics");
      }
      response res;
      res.result(bhttp::status::ok);
      res.set(bhttp::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
      res.body() = opts.metrics();
      co_return res;
    }
    std::optional<response> refusal;
    caller* who = c.authenticated ? c.who : authenticate(req, refusal);
    if (refusal) {
      co_return refusal;
    }
    if (target == "/v1/models") {
      if (!get) {
        co_return method_not_allowed("GET, HEAD", "/v1/models");
      }
      json data = json::array();
      for (const route& r : routes) {
        data.push_back(
            {{"id", r.model}, {"object", "model"}, {"created", 0}, {"owned_by", "keel"}});
      }
      co_return json_response(200, json{{"object", "list"}, {"data", std::move(data)}});
    }
    if (target == "/v1/chat/completions") {
      if (!post) {
        co_return method_not_allowed("POST", "/v1/chat/completions");
      }
      if (who != nullptr) {
        if (auto r = over_limit(*who)) {
          co_return r;
        }
        ++who->in_flight;
      }
      // Given back however the answer ends (a throw would otherwise hold the caller's slot for
      // good, and its every later call would be refused).
      struct slot_back {
        caller* k;
        ~slot_back() {
          if (k != nullptr) {
            --k->in_flight;
          }
        }
      } back{who};
      // The caller's trace context, and the request's span in it (when tracing).
      // W3C: two traceparent fields are no parent at all; several tracestate fields are one
      // list, joined with commas.
      std::optional<keel::trace::span_context> incoming;
      if (req.count("traceparent") == 1) {
        std::string state;
        for (auto [it, end] = req.equal_range("tracestate"); it != end; ++it) {
          state += (state.empty() ? "" : ",") + std::string(it->value());
        }
        incoming = keel::trace::parse_traceparent(req.find("traceparent")->value(), state);
      }
      keel::trace::span span;
      if (opts.tracer) {
        span = opts.tracer->start("POST /v1/chat/completions", keel::trace::span_kind::server,
                                  incoming ? &*incoming : nullptr);
        span.set("http.request.method", "POST");
        span.set("http.route", "/v1/chat/completions");
        span.set("url.path", "/v1/chat/completions");
        if (who != nullptr) {
          span.set("keel.caller", who->cfg->name);
        }
      }
      std::optional<response> res =
          co_await complete(req.body(), req.version(), c, span, incoming ? &*incoming : nullptr);
      if (span.recording()) {
        // Streamed answers (nothing returned) began with 200.
        const int status = res ? static_cast<int>(res->result_int()) : 200;
        span.set("http.response.status_code", status);
        if (status >= 500) {
          span.set_error(std::to_string(status), "HTTP " + std::to_string(status));
        }
      }
      co_return res;
    }
    co_return error_response(404,
                             "Unknown request URL: " + std::string(req.method_string()) + " " +
                                 std::string(target) + ".",
                             "invalid_request_error", "", "unknown_url");
  }

  // `span` is the request's (null when not traced); `incoming` the caller's context, passed on
  // when there is no span.
  asio::awaitable<std::optional<response>> complete(const std::string& body, unsigned version,
                                                    connection& c, keel::trace::span& span,
                                                    const keel::trace::span_context* incoming) {
    parsed_chat_request p;
    try {
      p = parse_chat_request(body);
    } catch (const bad_request& e) {
      co_return error_response(e.status(), e.what(), "invalid_request_error", e.param(), e.code());
    }
    const std::string model = p.request.model;
    if (span.recording()) {
      span.set("gen_ai.request.model", model);
    }
    const keel::trace::span_context* parent = span.context().valid() ? &span.context() : incoming;
    keel::llm::client* const client = client_for(model);
    if (client == nullptr) {
      co_return error_response(
          404, "The model `" + model + "` does not exist or you do not have access to it.",
          "invalid_request_error", "model", "model_not_found");
    }
    p.request.model.clear();  // every entry of the chain asks for its own model
    if (p.stream) {
      co_return co_await stream(*client, std::move(p), model, version, c, span, parent);
    }
    const auto started = std::chrono::steady_clock::now();
    ++counters.in_flight;
    keel::llm::call_outcome out =
        co_await client->call(std::move(p.request), nullptr, keel::bulkhead_permit{}, parent);
    --counters.in_flight;
    response res;
    if (const auto filtered = out.error ? filtered_reply(out.error) : nullptr) {
      // A content filter or refusal: OpenAI answers it as a completion, not an error.
      ++counters.completions;
      res =
          json_response(200, completion_body(*filtered, next_id("chatcmpl-keel-"), now_s(), model));
    } else if (out.error) {
      res = failed(out.error);
    } else {
      ++counters.completions;
      res = json_response(
          200, completion_body(*out.response, next_id("chatcmpl-keel-"), now_s(), model));
    }
    res.set("x-request-id", next_id("req_keel_"));
    res.set("openai-processing-ms", std::to_string(ms_since(started)));
    co_return res;
  }

  static long long now_s() {
    return std::chrono::duration_cast<std::chrono::seconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  static long long ms_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                 t)
        .count();
  }

  // The answer for a call that failed before anything was sent.
  response failed(const std::exception_ptr& error) {
    if (cancelling) {
      return error_response(503, "keel serve is shutting down; try again.", "server_error", "",
                            "shutting_down");
    }
    const error_reply e = error_answer(error);
    response res = json_response(e.status, e.body);
    if (e.retry_after && e.retry_after->count() > 0) {
      const double s = std::chrono::duration<double>(*e.retry_after).count();
      res.set("retry-after", std::to_string(static_cast<long long>(std::ceil(s))));
      res.set("retry-after-ms", std::to_string(static_cast<long long>(std::ceil(s * 1000))));
    }
    return res;
  }

  // A streamed answer. Nothing goes to the caller before the reply's first delta (keel's commit
  // point): a call that fails before it is answered like a non-streamed one (status, error body,
  // retry-after). From the first delta on, the answer is server-sent events in chunked encoding,
  // each delta written before the next is read from the provider (a slow caller slows the
  // provider's stream, keel buffers nothing more), ending with the finish reason, the usage
  // chunk if asked for, and `data: [DONE]`. A failure after the commit point is an error event
  // (`data: {"error": ...}`, which the OpenAI SDKs raise as an APIError) and the end of the body.
  // A caller that goes away mid-stream fails the next write: the call ends and keel closes the
  // provider's connection. An HTTP/1.0 caller, which cannot take chunked encoding (RFC 9112
  // §6.1), gets the events unframed and no keep-alive, and the close ends the body. Returns
  // nothing when it wrote an answer, else the answer to write.
  asio::awaitable<std::optional<response>> stream(keel::llm::client& client, parsed_chat_request p,
                                                  const std::string& model, unsigned version,
                                                  connection& c, keel::trace::span& span,
                                                  const keel::trace::span_context* parent) {
    const auto started = std::chrono::steady_clock::now();
    const std::string id = next_id("chatcmpl-keel-");
    const long long created = now_s();
    const bool usage = p.include_usage;
    bool committed = false;
    const bool chunked = version >= 11;
    c.stream_ok = true;
    auto write = [this, &c, chunked](std::string bytes) -> asio::awaitable<void> {
      c.stream.expires_after(opts.write_timeout);
      auto [ec, n] =
          chunked ? co_await asio::async_write(c.stream, bhttp::make_chunk(asio::buffer(bytes)),
                                               asio::as_tuple(asio::use_awaitable))
                  : co_await asio::async_write(c.stream, asio::buffer(bytes),
                                               asio::as_tuple(asio::use_awaitable));
      if (ec) {
        c.stream_ok = false;
        throw boost::system::system_error(ec);
      }
    };
    auto event = [](const json& j) { return "data: " + text_of(j) + "\n\n"; };
    auto commit = [&]() -> asio::awaitable<void> {
      committed = true;
      c.stream_started = true;
      bhttp::response<bhttp::empty_body> head{bhttp::status::ok, version};
      head.set(bhttp::field::server, "keel");
      head.set(bhttp::field::content_type, "text/event-stream; charset=utf-8");
      head.set(bhttp::field::cache_control, "no-cache");
      head.set("x-request-id", next_id("req_keel_"));
      head.set("openai-processing-ms", std::to_string(ms_since(started)));
      head.keep_alive(chunked);
      head.chunked(chunked);
      const std::string head_bytes = serialize_head(head);
      c.stream.expires_after(opts.write_timeout);
      auto [ec, n] = co_await asio::async_write(c.stream, asio::buffer(head_bytes),
                                                asio::as_tuple(asio::use_awaitable));
      if (ec) {
        c.stream_ok = false;
        throw boost::system::system_error(ec);
      }
      co_await write(event(stream_chunk(id, created, model,
                                        json{{"role", "assistant"}, {"content", ""}}, {}, usage)));
    };
    keel::llm::stream_call_options so;
    so.restartable = false;  // what was written cannot be taken back
    ++counters.in_flight;
    // Ended when the call ends, and however stream() ends (a throw must not leave the wait's
    // handler reading a connection the session has closed).
    struct watch_end {
      connection& c;
      void stop() {
        if (c.watching) {
          c.watching = false;
          c.watch_stop.emit(asio::cancellation_type::terminal);
        }
      }
      ~watch_end() { stop(); }
    } end_watch{c};
    watch_hangup(c);
    keel::llm::call_outcome out = co_await client.stream_call(
        std::move(p.request),
        [&](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
          if (!committed) {
            co_await commit();
          }
          co_await write(event(stream_chunk(id, created, model, delta_json(d), {}, usage)));
        },
        so, nullptr, keel::bulkhead_permit{}, parent);
    span.set("keel.stream", true);
    --counters.in_flight;
    end_watch.stop();
    if (cancelling || c.hung_up) {
      co_await asio::this_coro::reset_cancellation_state();
    }
    if (c.hung_up) {
      co_return std::nullopt;  // nobody to answer; the session closes (stream_ok is false)
    }
    // A content filter or refusal ends the stream as OpenAI ends it: finish reason
    // "content_filter", not an error.
    const bool filtered = out.error && !cancelling && is_content_filter(out.error);
    if (!committed && out.error && !filtered) {
      response res = failed(out.error);
      res.set("x-request-id", next_id("req_keel_"));
      co_return res;
    }
    if (!c.stream_ok) {
      co_return std::nullopt;  // the caller went away
    }
    try {
      if (!committed) {
        co_await commit();  // a reply with no text
      }
      if (out.error && !filtered) {
        span.set_error("stream_interrupted", "the stream failed after its first delta");
        json err = cancelling ? error_body("keel serve is shutting down; the stream was cut.",
                                           "server_error", "", "shutting_down")
                              : error_answer(out.error).body;
        // The body still ends properly (the last chunk below), so the connection stays
        // usable: closing it after a keep-alive head and a complete body made the caller's
        // next request on it fail with a reset.
        co_await write(event(err));
      } else {
        ++counters.completions;
        co_await write(event(stream_chunk(
            id, created, model, json::object(),
            filtered ? "content_filter" : openai_finish_reason(out.response->finish_reason),
            usage)));
        if (usage && out.response) {
          co_await write(event(usage_chunk(id, created, model, out.response->usage)));
        }
        co_await write("data: [DONE]\n\n");
      }
      if (chunked) {
        c.stream.expires_after(opts.write_timeout);
        auto [ec, n] = co_await asio::async_write(c.stream, bhttp::make_chunk_last(),
                                                  asio::as_tuple(asio::use_awaitable));
        if (ec) {
          c.stream_ok = false;
        }
      } else {
        c.stream_ok = false;  // the close ends an HTTP/1.0 answer
      }
    } catch (const boost::system::system_error&) {
      c.stream_ok = false;
    }
    co_return std::nullopt;
  }

  // While a stream runs, a caller that hangs up (end of stream or an error on its socket)
  // cancels the call, as the drain's grace does: before the first delta no write would fail, and
  // keel went on retrying for a caller that was gone (up to the deadline), and mid-stream a
  // stalled provider was read until its idle timeout. Bytes from the caller (a pipelined
  // request) end the watch without a cancel and stay for the session to read. One wait per
  // stream (no allocation: the handler holds the connection), cancelled when it ends.
  static void watch_hangup(connection& c) {
    c.hung_up = false;
    c.watching = true;
    c.stream.socket().async_wait(
        tcp::socket::wait_read,
        asio::bind_cancellation_slot(
            c.watch_stop.slot(), [cp = c.shared_from_this()](boost::system::error_code ec) {
              if (!cp->watching || ec == asio::error::operation_aborted) {
                return;
              }
              char b = 0;
              const ssize_t n =
                  ::recv(cp->stream.socket().native_handle(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
              if (ec || n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
                cp->hung_up = true;
                cp->stream_ok = false;
                cp->cancel.emit(asio::cancellation_type::terminal);
              }
            }));
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

namespace {

std::vector<route> routes_of(keel::llm::client& client, const server_options& o) {
  std::vector<route> r;
  for (const std::string& m : o.models) {
    r.push_back(route{m, &client});
  }
  return r;
}

std::vector<route> checked(std::vector<route> routes) {
  for (std::size_t i = 0; i < routes.size(); ++i) {
    if (routes[i].client == nullptr) {
      throw std::invalid_argument("keel::gateway::server: route '" + routes[i].model +
                                  "' has no client");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (routes[j].model == routes[i].model) {
        throw std::invalid_argument("keel::gateway::server: two routes serve the model '" +
                                    routes[i].model + "'");
      }
    }
  }
  return routes;
}

}  // namespace

server::server(asio::any_io_executor ex, keel::llm::client& client, server_options options)
    : impl_(std::make_shared<impl>(std::move(ex), routes_of(client, options),
                                   options.models.empty() ? &client : nullptr,
                                   std::move(options))) {}

server::server(asio::any_io_executor ex, std::vector<route> routes, server_options options)
    : impl_(std::make_shared<impl>(std::move(ex), checked(std::move(routes)), nullptr,
                                   std::move(options))) {}

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
  const std::string& a = impl_->opts.address;
  const bool v6 = a.find(':') != std::string::npos;  // a URL brackets an IPv6 address
  return "http://" + (v6 ? "[" + a + "]" : a) + ":" + std::to_string(impl_->bound_port);
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
  server_stats s = impl_->counters;
  s.open_connections = impl_->live.size();
  return s;
}

}  // namespace keel::gateway
