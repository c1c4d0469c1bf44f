// The mock LLM server: Beast HTTP/1.1 sessions, the accept loop and the public API. What a
// request gets is decided in mock_faults.cpp and shaped in mock_openai/anthropic/bedrock.cpp.
#include "mock_detail.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

namespace keel::testing {

using namespace detail;  // this file implements the mock's private declarations

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

// Reads and drops whatever the client sends until it closes (or `stop()` closes the socket).
asio::awaitable<void> wait_for_close(tcp::socket& socket) {
  char sink[512];
  for (;;) {
    auto [ec, n] =
        co_await socket.async_read_some(asio::buffer(sink), asio::as_tuple(asio::use_awaitable));
    if (ec) {
      co_return;
    }
  }
}

// Writes `bytes` as one HTTP chunk (`chunked`) or as they are (a close-delimited body); with
// TCP_NODELAY each goes out at once, so a client sees every event when it is written.
asio::awaitable<bool> write_piece(tcp::socket& socket, std::string_view bytes, bool chunked) {
  if (chunked) {
    auto [ec, n] = co_await asio::async_write(socket, bhttp::make_chunk(asio::buffer(bytes)),
                                              asio::as_tuple(asio::use_awaitable));
    co_return !ec;
  }
  auto [ec, n] =
      co_await asio::async_write(socket, asio::buffer(bytes), asio::as_tuple(asio::use_awaitable));
  co_return !ec;
}

}  // namespace

asio::awaitable<void> mock_llm_server::impl::session(std::shared_ptr<impl> self,
                                                     std::shared_ptr<connection> c) {
  self->live.insert(c.get());
  struct unregister {
    impl* s;
    connection* c;
    ~unregister() { s->live.erase(c); }
  } guard{self.get(), c.get()};

  beast::flat_buffer buffer;
  for (;;) {
    bhttp::request_parser<bhttp::string_body> parser;
    parser.body_limit(self->opts.max_request_body);
    auto [ec, n] =
        co_await bhttp::async_read(c->socket, buffer, parser, asio::as_tuple(asio::use_awaitable));
    if (ec == bhttp::error::body_limit) {
      co_await refuse_too_large(self, c, std::string(parser.get().target()));
      co_return;
    }
    if (ec) {
      break;
    }
    bhttp::request<bhttp::string_body> req = parser.release();
    const parsed_request pr = parse_request(req.method_string(), req.target(), req.body());
    self->count(pr.model, [&req](mock_model_stats& s) {
      ++s.requests;
      s.last_body = req.body();
    });
    const reply r = self->decide(pr);
    if (r.latency.count() > 0) {
      c->timer.expires_after(r.latency);
      auto [tec] = co_await c->timer.async_wait(asio::as_tuple(asio::use_awaitable));
      if (tec || !self->running) {
        break;
      }
    }
    if (r.action == fault_kind::reset) {
      self->count(pr.model, [](mock_model_stats& s) { ++s.resets; });
      boost::system::error_code ignored;
      // SO_LINGER 0 makes close() send RST: the client sees a reset, not a clean EOF.
      c->socket.set_option(asio::socket_base::linger(true, 0), ignored);
      c->socket.close(ignored);
      co_return;
    }
    if (r.action == fault_kind::stall) {
      self->count(pr.model, [](mock_model_stats& s) { ++s.stalls; });
      // Wait for the client to give up (EOF/reset) or for stop(); discard anything it sends.
      co_await wait_for_close(c->socket);
      boost::system::error_code ignored;
      c->socket.close(ignored);
      co_return;
    }
    if (r.action == fault_kind::truncated) {
      self->count(pr.model, [&](mock_model_stats& s) { ++s.truncations; });
      // Written by hand: Beast would refuse to send a body shorter than its Content-Length.
      std::string head = "HTTP/1.1 " + std::to_string(r.status) + " " + r.reason + "\r\n";
      for (const auto& [name, value] : r.headers) {
        head += name + ": " + value + "\r\n";
      }
      head += "Content-Type: application/json\r\nContent-Length: " +
              std::to_string(r.body.size() + 64) + "\r\n\r\n";
      head += r.body.substr(0, r.body.size() / 2);
      co_await asio::async_write(c->socket, asio::buffer(head),
                                 asio::as_tuple(asio::use_awaitable));
      boost::system::error_code ignored;
      c->socket.shutdown(tcp::socket::shutdown_both, ignored);
      c->socket.close(ignored);
      co_return;
    }
    if (r.stream) {
      if (co_await write_stream(self, c, r, pr.model, req.version(), req.keep_alive())) {
        continue;
      }
      break;
    }
    bhttp::response<bhttp::string_body> res;
    res.version(req.version());
    res.result(static_cast<unsigned>(r.status));
    res.reason(r.reason);
    for (const auto& [name, value] : r.headers) {
      res.insert(name, value);
    }
    res.set(bhttp::field::content_type, "application/json");
    res.keep_alive(req.keep_alive());
    res.body() = r.body;
    res.prepare_payload();
    const int status = r.status;
    self->count(pr.model, [status](mock_model_stats& s) { ++s.by_status[status]; });
    auto [wec, wn] =
        co_await bhttp::async_write(c->socket, res, asio::as_tuple(asio::use_awaitable));
    if (wec || !res.keep_alive()) {
      break;
    }
  }
  boost::system::error_code ignored;
  c->socket.shutdown(tcp::socket::shutdown_send, ignored);
  c->socket.close(ignored);
}

asio::awaitable<bool> mock_llm_server::impl::write_stream(std::shared_ptr<impl> self,
                                                          std::shared_ptr<connection> c,
                                                          const reply& r, const std::string& model,
                                                          unsigned version, bool keep_alive) {
  const stream_reply& s = *r.stream;
  // HTTP/1.0 has no chunked encoding: its body ends when the connection closes.
  const bool chunked = version >= 11;
  keep_alive = keep_alive && chunked;
  bhttp::response<bhttp::empty_body> res;
  res.version(version);
  res.result(static_cast<unsigned>(r.status));
  res.reason(r.reason);
  for (const auto& [name, value] : r.headers) {
    res.insert(name, value);
  }
  res.set(bhttp::field::content_type, s.content_type);
  res.set(bhttp::field::cache_control, "no-cache");
  res.keep_alive(keep_alive);
  res.chunked(chunked);
  const int status = r.status;
  self->count(model, [status](mock_model_stats& st) {
    ++st.by_status[status];
    ++st.streams;
  });
  bhttp::response_serializer<bhttp::empty_body> sr{res};
  auto [hec, hn] =
      co_await bhttp::async_write_header(c->socket, sr, asio::as_tuple(asio::use_awaitable));
  if (hec) {
    co_return false;
  }
  const bool faulty = s.fault != fault_kind::ok;
  const std::size_t clean = faulty ? s.fault_at : s.parts.size();
  for (std::size_t i = 0; i <= clean && i < s.parts.size(); ++i) {
    if (s.parts[i].text && s.chunk_latency.count() > 0) {
      // The fault takes the place of part `i`, so it keeps its pacing too.
      c->timer.expires_after(s.chunk_latency);
      auto [tec] = co_await c->timer.async_wait(asio::as_tuple(asio::use_awaitable));
      if (tec || !self->running) {
        co_return false;
      }
    }
    if (i == clean) {
      break;
    }
    if (!co_await write_piece(c->socket, s.parts[i].bytes, chunked)) {
      co_return false;
    }
  }
  if (faulty) {
    self->count(model, [](mock_model_stats& st) { ++st.stream_faults; });
    boost::system::error_code ignored;
    if (s.fault == fault_kind::stream_drop) {
      // FIN, not RST: the client reads every chunk sent so far, then EOF inside the body.
      c->socket.shutdown(tcp::socket::shutdown_both, ignored);
      c->socket.close(ignored);
      co_return false;
    }
    if (s.fault == fault_kind::stream_stall) {
      co_await wait_for_close(c->socket);
      c->socket.close(ignored);
      co_return false;
    }
    if (!s.fault_bytes.empty() && !co_await write_piece(c->socket, s.fault_bytes, chunked)) {
      co_return false;
    }
  }
  if (!chunked) {
    co_return false;  // the close ends the body
  }
  auto [wec, wn] = co_await asio::async_write(c->socket, bhttp::make_chunk_last(),
                                              asio::as_tuple(asio::use_awaitable));
  co_return !wec && keep_alive;
}

// A request body over max_request_body: 413 in the provider's shape, as a real front end
// (nginx: "413 Request Entity Too Large") answers. Closing at once would leave the client's
// unsent bytes in flight, and the kernel would answer them with a reset that hides the 413;
// so the send side is shut after the answer and the rest of the request is read and dropped
// until the client closes (nginx's lingering close), bounded in bytes.
asio::awaitable<void> mock_llm_server::impl::refuse_too_large(std::shared_ptr<impl> self,
                                                              std::shared_ptr<connection> c,
                                                              const std::string& target) {
  const std::string_view path = std::string_view(target).substr(0, target.find('?'));
  const std::string limit = std::to_string(self->opts.max_request_body);
  bhttp::response<bhttp::string_body> res;
  res.version(11);
  res.result(bhttp::status::payload_too_large);
  res.set(bhttp::field::content_type, "application/json");
  res.set(bhttp::field::connection, "close");
  if (path == "/v1/messages") {
    std::string rid;
    {
      std::lock_guard lock(self->mu);
      rid = "req_" + self->request_id();
    }
    res.set("request-id", rid);
    res.body() = anthropic_error("request_too_large",
                                 "Request exceeds the maximum allowed number of bytes.", rid)
                     .dump();
  } else if (path == "/v1/chat/completions") {
    res.body() = openai_error("Request too large: the body exceeds " + limit + " bytes.",
                              "invalid_request_error", nullptr, "request_too_large")
                     .dump();
  } else {
    res.body() = json{{"message", "Request Entity Too Large"}}.dump();
  }
  res.prepare_payload();
  self->count("", [](mock_model_stats& st) { ++st.by_status[413]; });
  auto [wec, wn] = co_await bhttp::async_write(c->socket, res, asio::as_tuple(asio::use_awaitable));
  boost::system::error_code ignored;
  if (!wec) {
    c->socket.shutdown(tcp::socket::shutdown_send, ignored);
    std::vector<char> sink(64 * 1024);
    constexpr std::size_t max_drain = std::size_t{256} * 1024 * 1024;
    for (std::size_t drained = 0; drained < max_drain;) {
      auto [rec, rn] = co_await c->socket.async_read_some(asio::buffer(sink),
                                                          asio::as_tuple(asio::use_awaitable));
      if (rec) {
        break;
      }
      drained += rn;
    }
  }
  c->socket.close(ignored);
}

asio::awaitable<void> mock_llm_server::impl::accept_loop(std::shared_ptr<impl> self) {
  while (self->running) {
    auto [ec, sock] = co_await self->acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec) {
      if (!self->running || !self->acceptor.is_open()) {
        co_return;
      }
      continue;
    }
    {
      std::lock_guard lock(self->mu);
      ++self->counters.accepted_connections;
    }
    sock.set_option(tcp::no_delay(true), ec);
    asio::co_spawn(self->ex, session(self, std::make_shared<connection>(std::move(sock))),
                   asio::detached);
  }
}

void mock_llm_server::impl::start() {
  if (running) {
    return;
  }
  const tcp::endpoint ep(asio::ip::make_address(opts.address), opts.port);
  acceptor.open(ep.protocol());
  acceptor.set_option(tcp::acceptor::reuse_address(true));
  acceptor.bind(ep);
  acceptor.listen();
  bound_port = acceptor.local_endpoint().port();
  {
    std::lock_guard lock(mu);
    started = now();
  }
  running = true;
  asio::co_spawn(ex, accept_loop(shared_from_this()), asio::detached);
}

void mock_llm_server::impl::stop() {
  running = false;
  boost::system::error_code ignored;
  acceptor.close(ignored);
  for (connection* c : live) {
    c->timer.cancel();
    c->socket.close(ignored);
  }
}

mock_llm_server::mock_llm_server(boost::asio::any_io_executor ex, mock_options opts)
    : impl_(std::make_shared<impl>(std::move(ex), std::move(opts))) {}

mock_llm_server::mock_llm_server(boost::asio::io_context& ctx, mock_options opts)
    : mock_llm_server(ctx.get_executor(), std::move(opts)) {}

mock_llm_server::~mock_llm_server() {
  impl_->stop();
}

void mock_llm_server::start() {
  impl_->start();
}

void mock_llm_server::stop() {
  impl_->stop();
}

unsigned short mock_llm_server::port() const noexcept {
  return impl_->bound_port;
}

std::string mock_llm_server::base_url() const {
  return "http://" + impl_->opts.address + ":" + std::to_string(impl_->bound_port);
}

void mock_llm_server::set_plan(const std::string& model, fault_plan plan) {
  std::lock_guard lock(impl_->mu);
  impl_->plans[model] = std::move(plan);
  // The model's state (or, for "*", every state derived from "*") restarts from the new plan.
  if (model == "*") {
    std::erase_if(impl_->states, [&](const auto& kv) { return !impl_->plans.contains(kv.first); });
  } else {
    impl_->states.erase(model);
  }
}

void mock_llm_server::set_scenario(const scenario& s) {
  std::lock_guard lock(impl_->mu);
  impl_->plans = s.plans;
  impl_->states.clear();
  if (s.seed) {
    impl_->seed = *s.seed;
  }
}

void mock_llm_server::clear_plans() {
  std::lock_guard lock(impl_->mu);
  impl_->plans.clear();
  impl_->states.clear();
}

mock_stats mock_llm_server::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->counters;
}

rate_limits mock_llm_server::current_limit(const std::string& model) const {
  std::lock_guard lock(impl_->mu);
  auto p = impl_->plans.find(model);
  if (p == impl_->plans.end()) {
    p = impl_->plans.find("*");
  }
  if (p == impl_->plans.end()) {
    return {};
  }
  return p->second.limits_at(
      std::chrono::duration_cast<milliseconds>(impl_->now() - impl_->started));
}

void mock_llm_server::reset_stats() {
  std::lock_guard lock(impl_->mu);
  impl_->counters = mock_stats{};
}

}  // namespace keel::testing
