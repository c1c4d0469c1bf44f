// The mock LLM server: Beast HTTP/1.1 sessions, the accept loop and the public API. What a
// request gets is decided in mock_faults.cpp and shaped in mock_openai/anthropic/bedrock.cpp.
#include "mock_detail.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/buffer.hpp>
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

// The close watcher. A client that gives up (a hedging loser, a timeout) closes the connection
// while the mock may be sleeping out latency; without a read outstanding the mock would only
// learn of it when a write failed, after the latency, if at all (a write after a FIN succeeds).
// So from the moment a request is read until its response is done one read stays outstanding:
// EOF or an error means the client is gone (nginx, too, takes EOF from a client waiting for its
// upstream as an abort, so a client that half-closes after its request is taken as gone). Bytes
// that arrive instead (a pipelined request) are kept for the parser and the read goes on while
// `early` has room.
void mock_llm_server::impl::watch_client(std::shared_ptr<connection> c) {
  connection* raw = c.get();
  raw->watching = true;
  raw->unwatch = false;
  raw->watch_done.expires_at(clock_type::time_point::max());
  raw->socket.async_read_some(
      asio::buffer(raw->early.data() + raw->early_size, raw->early.size() - raw->early_size),
      asio::bind_cancellation_slot(
          raw->watch_cancel.slot(),
          [c = std::move(c)](const boost::system::error_code& ec, std::size_t n) mutable {
            c->early_size += n;
            if (!ec) {
              if (!c->unwatch && c->early_size < c->early.size()) {
                watch_client(std::move(c));
                return;
              }
            } else if (ec != asio::error::operation_aborted && c->socket.is_open()) {
              c->client_closed = true;
              c->closed_at = clock_type::now();
              c->timer.cancel();  // wakes a latency or chunk wait at once
            }
            c->watching = false;
            c->watch_done.cancel();
          }));
}

void mock_llm_server::impl::abandon(const std::shared_ptr<impl>& self, const connection& c,
                                    const std::string& model, response_record& rec) {
  rec.closed_by_client_at = c.client_closed ? c.closed_at : clock_type::now();
  self->count(model, [](mock_model_stats& s) { ++s.abandoned; });
}

bool mock_llm_server::impl::finish(const std::shared_ptr<impl>& self, const connection& c,
                                   const std::string& model, response_record& rec,
                                   const boost::system::error_code& ec) {
  if (ec || c.client_closed) {
    if (self->running) {  // after stop() the failure is the mock's own doing
      abandon(self, c, model, rec);
    }
    return false;
  }
  rec.completed_at = clock_type::now();
  return true;
}

asio::awaitable<void> mock_llm_server::impl::stop_watch(std::shared_ptr<connection> c) {
  c->unwatch = true;
  if (c->watching) {
    // Per-operation cancellation: only the watcher's read is cancelled, never a write. If the
    // read has already completed, its handler is queued and `unwatch` keeps it from re-arming.
    c->watch_cancel.emit(asio::cancellation_type::terminal);
  }
  while (c->watching) {
    (void)co_await c->watch_done.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

asio::awaitable<bool> mock_llm_server::impl::await_close(std::shared_ptr<impl> self,
                                                         std::shared_ptr<connection> c) {
  for (;;) {
    if (c->client_closed) {
      co_return true;
    }
    if (!self->running || !c->socket.is_open()) {
      co_return false;
    }
    if (!c->watching) {
      c->early_size = 0;  // a stalled request's connection serves nothing more: drop it
      watch_client(c);
    }
    (void)co_await c->watch_done.async_wait(asio::as_tuple(asio::use_awaitable));
  }
}

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
    response_record rec;
    rec.received_at = clock_type::now();
    bhttp::request<bhttp::string_body> req = parser.release();
    const parsed_request pr = parse_request(req.method_string(), req.target(), req.body());
    self->count(pr.model, [&req](mock_model_stats& s) {
      ++s.requests;
      s.last_body = req.body();
      if (auto tp = req.find("traceparent"); tp != req.end() && s.traceparents.size() < 4096) {
        s.traceparents.emplace_back(tp->value());
      }
    });
    const reply r = self->decide(pr);
    rec.connection = c->serial;
    rec.peer_port = c->peer_port;
    rec.model = pr.model;
    rec.outcome = r.outcome;
    rec.status = r.status;
    rec.tail = r.tail;
    rec.latency = r.latency;
    rec.accepted_at = c->accepted_at;
    watch_client(c);
    const bool again = co_await respond(self, c, r, pr.model, req.version(), req.keep_alive(), rec);
    co_await stop_watch(c);
    self->log_response(std::move(rec));
    if (!again || c->client_closed) {
      break;
    }
    if (c->early_size > 0) {
      buffer.commit(asio::buffer_copy(buffer.prepare(c->early_size),
                                      asio::buffer(c->early.data(), c->early_size)));
      c->early_size = 0;
    }
  }
  boost::system::error_code ignored;
  c->socket.shutdown(tcp::socket::shutdown_send, ignored);
  c->socket.close(ignored);
}

asio::awaitable<bool> mock_llm_server::impl::respond(std::shared_ptr<impl> self,
                                                     std::shared_ptr<connection> c, const reply& r,
                                                     const std::string& model, unsigned version,
                                                     bool keep_alive, response_record& rec) {
  if (r.latency.count() > 0) {
    c->timer.expires_after(r.latency);
    auto [tec] = co_await c->timer.async_wait(asio::as_tuple(asio::use_awaitable));
    if (tec && !c->client_closed) {
      co_return false;  // stop()
    }
  }
  if (!self->running) {
    co_return false;
  }
  if (c->client_closed) {
    abandon(self, *c, model, rec);
    co_return false;
  }
  if (r.action == fault_kind::reset) {
    self->count(model, [](mock_model_stats& s) { ++s.resets; });
    boost::system::error_code ignored;
    // SO_LINGER 0 makes close() send RST: the client sees a reset, not a clean EOF.
    c->socket.set_option(asio::socket_base::linger(true, 0), ignored);
    c->socket.close(ignored);
    rec.completed_at = clock_type::now();
    co_return false;
  }
  if (r.action == fault_kind::stall) {
    self->count(model, [](mock_model_stats& s) { ++s.stalls; });
    // Wait for the client to give up (EOF/reset) or for stop(); discard anything it sends.
    if (co_await await_close(self, c)) {
      abandon(self, *c, model, rec);
    }
    boost::system::error_code ignored;
    c->socket.close(ignored);
    co_return false;
  }
  if (r.action == fault_kind::truncated) {
    self->count(model, [&](mock_model_stats& s) { ++s.truncations; });
    // Written by hand: Beast would refuse to send a body shorter than its Content-Length.
    std::string head = "HTTP/1.1 " + std::to_string(r.status) + " " + r.reason + "\r\n";
    for (const auto& [name, value] : r.headers) {
      head += name + ": " + value + "\r\n";
    }
    head +=
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(r.body.size() + 64) +
        "\r\n\r\n";
    head += r.body.substr(0, r.body.size() / 2);
    rec.first_byte_at = clock_type::now();
    auto [wec, wn] = co_await asio::async_write(c->socket, asio::buffer(head),
                                                asio::as_tuple(asio::use_awaitable));
    finish(self, *c, model, rec, wec);
    boost::system::error_code ignored;
    c->socket.shutdown(tcp::socket::shutdown_both, ignored);
    c->socket.close(ignored);
    co_return false;
  }
  if (r.stream) {
    co_return co_await write_stream(self, c, r, model, version, keep_alive, rec);
  }
  bhttp::response<bhttp::string_body> res;
  res.version(version);
  res.result(static_cast<unsigned>(r.status));
  res.reason(r.reason);
  for (const auto& [name, value] : r.headers) {
    res.insert(name, value);
  }
  res.set(bhttp::field::content_type, "application/json");
  res.keep_alive(keep_alive);
  res.body() = r.body;
  res.prepare_payload();
  const int status = r.status;
  self->count(model, [status](mock_model_stats& s) { ++s.by_status[status]; });
  rec.first_byte_at = clock_type::now();
  auto [wec, wn] = co_await bhttp::async_write(c->socket, res, asio::as_tuple(asio::use_awaitable));
  co_return finish(self, *c, model, rec, wec) && res.keep_alive();
}

asio::awaitable<bool> mock_llm_server::impl::write_stream(std::shared_ptr<impl> self,
                                                          std::shared_ptr<connection> c,
                                                          const reply& r, const std::string& model,
                                                          unsigned version, bool keep_alive,
                                                          response_record& rec) {
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
  // A write error or a close the watcher saw: the client went away mid-stream.
  const auto gone = [&](bool write_failed) {
    if (write_failed || c->client_closed) {
      if (self->running) {
        abandon(self, *c, model, rec);
      }
      return true;
    }
    return false;
  };
  bhttp::response_serializer<bhttp::empty_body> sr{res};
  rec.first_byte_at = clock_type::now();
  auto [hec, hn] =
      co_await bhttp::async_write_header(c->socket, sr, asio::as_tuple(asio::use_awaitable));
  if (gone(!!hec)) {
    co_return false;
  }
  const bool faulty = s.fault != fault_kind::ok;
  const std::size_t clean = faulty ? s.fault_at : s.parts.size();
  for (std::size_t i = 0; i <= clean && i < s.parts.size(); ++i) {
    if (s.parts[i].text && s.chunk_latency.count() > 0) {
      // The fault takes the place of part `i`, so it keeps its pacing too.
      c->timer.expires_after(s.chunk_latency);
      auto [tec] = co_await c->timer.async_wait(asio::as_tuple(asio::use_awaitable));
      if (!self->running || gone(false) || tec) {
        co_return false;
      }
    }
    if (i == clean) {
      break;
    }
    if (gone(!co_await write_piece(c->socket, s.parts[i].bytes, chunked))) {
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
      rec.completed_at = clock_type::now();
      co_return false;
    }
    if (s.fault == fault_kind::stream_stall) {
      if (co_await await_close(self, c)) {
        abandon(self, *c, model, rec);
      }
      c->socket.close(ignored);
      co_return false;
    }
    if (!s.fault_bytes.empty() && gone(!co_await write_piece(c->socket, s.fault_bytes, chunked))) {
      co_return false;
    }
  }
  if (!chunked) {
    finish(self, *c, model, rec, {});
    co_return false;  // the close ends the body
  }
  auto [wec, wn] = co_await asio::async_write(c->socket, bhttp::make_chunk_last(),
                                              asio::as_tuple(asio::use_awaitable));
  co_return finish(self, *c, model, rec, wec) && keep_alive;
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
    auto c = std::make_shared<connection>(std::move(sock));
    c->accepted_at = clock_type::now();
    {
      std::lock_guard lock(self->mu);
      c->serial = ++self->counters.accepted_connections;
    }
    c->socket.set_option(tcp::no_delay(true), ec);
    c->peer_port = c->socket.remote_endpoint(ec).port();
    asio::co_spawn(self->ex, session(self, std::move(c)), asio::detached);
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

void mock_llm_server::impl::log_response(response_record rec) {
  std::lock_guard lock(mu);
  log.push_back(std::move(rec));
  while (log.size() > opts.response_log) {
    log.pop_front();
    ++counters.responses_dropped;
  }
}

mock_stats mock_llm_server::stats() const {
  std::lock_guard lock(impl_->mu);
  mock_stats out = impl_->counters;
  out.responses.assign(impl_->log.begin(), impl_->log.end());
  return out;
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
  impl_->log.clear();
}

}  // namespace keel::testing
