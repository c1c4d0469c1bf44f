// keel::http::client: Beast HTTP/1.1 over TCP or TLS with a per-host keep-alive pool.
#include "tls_stream.hpp"
#include "url.hpp"

#include <keel/clock.hpp>
#include <keel/detail/waiter_queue.hpp>
#include <keel/error.hpp>
#include <keel/http/client.hpp>
#include <keel/http/error.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>

#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <limits>
#include <map>
#include <optional>
#include <string_view>
#include <type_traits>

namespace keel::http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using detail::has_control;
using detail::parse_url;
using detail::url_parts;

namespace {

[[noreturn]] void fail(boost::system::error_code ec, std::string_view what,
                       std::string_view where) {
  ec = normalize_error(ec);
  std::string msg = "keel.http: ";
  msg += what;
  msg += ": ";
  msg += ec.message();
  msg += " (";
  msg += where;
  msg += ")";
  throw keel::failure(ec, msg);
}

// What failed in a TLS handshake: for a certificate that did not verify, whether the host name
// did not match or the chain did not verify (and OpenSSL's reason).
std::string tls_failure(const boost::system::error_code& ec, SSL* ssl, const std::string& host) {
  if (normalize_error(ec) != error::tls_verification_failed) {
    return "TLS handshake failed";
  }
  const long result = SSL_get_verify_result(ssl);
  if (result == X509_V_ERR_HOSTNAME_MISMATCH || result == X509_V_ERR_IP_ADDRESS_MISMATCH) {
    return "TLS handshake failed: the certificate is not valid for host name \"" + host +
           "\" (the chain is trusted)";
  }
  if (result == X509_V_OK) {
    return "TLS handshake failed: certificate verification failed";
  }
  return std::string("TLS handshake failed: the certificate chain did not verify (") +
         X509_verify_cert_error_string(result) + ")";
}

struct connection {
  explicit connection(const asio::any_io_executor& ex) : plain(ex), request_timer(ex) {}

  // `plain` is the TCP stream of an http:// connection; an https:// connection uses `tls` (whose
  // next layer is its own TCP stream) and leaves `plain` unused.
  beast::tcp_stream plain;
  std::optional<detail::tls_stream> tls;  // see tls_stream.hpp for why not asio::ssl::stream
  beast::flat_buffer buffer;
  std::size_t requests = 0;
  std::chrono::steady_clock::time_point idle_since;
  // request_timeout: one timer per request rather than `basic_stream`'s timer per read and
  // write (arming and cancelling those cost about 15% of the client's throughput, measured
  // with bench/http_bench.cpp). When it fires it cancels the socket's operations and sets
  // `timed_out`, so the exchange reports request_timeout. Its handler can run after the
  // request (or the connection) is gone: it checks `alive` and the request generation first.
  asio::steady_timer request_timer;
  std::uint64_t request_gen = 0;
  bool timed_out = false;
  std::shared_ptr<char> alive = std::make_shared<char>();

  void start_request_timer(std::chrono::steady_clock::duration timeout) {
    const std::uint64_t gen = ++request_gen;
    timed_out = false;
    request_timer.expires_after(timeout);
    request_timer.async_wait(
        [self = this, alive_while = std::weak_ptr<char>(alive), gen](boost::system::error_code ec) {
          const auto still = alive_while.lock();
          if (ec || !still || self->request_gen != gen) {
            return;  // cancelled, or the request or the connection is gone
          }
          self->timed_out = true;
          boost::system::error_code ignored;
          self->lowest().socket().cancel(ignored);
        });
  }
  void stop_request_timer() {
    ++request_gen;  // a handler already queued with success now does nothing
    request_timer.cancel();
  }

  beast::tcp_stream& lowest() { return tls ? tls->next_layer() : plain; }
  void close() {
    boost::system::error_code ec;
    lowest().socket().shutdown(tcp::socket::shutdown_both, ec);
    lowest().socket().close(ec);
  }
  // An idle connection the server has closed (FIN or RST) or sent unsolicited bytes on (e.g. a
  // 408 or a TLS close_notify) must not carry the next request: it would fail after the request
  // was written. A non-blocking peek tells without a background read.
  bool usable() {
    if (!lowest().socket().is_open() || buffer.size() != 0) {
      return false;
    }
    // Over TLS, OpenSSL may already have read (ahead) what the server sent: a close_notify or
    // an unsolicited response.
    if (tls && !tls->drained()) {
      return false;
    }
    char byte = 0;
    const auto n = ::recv(lowest().socket().native_handle(), &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
  }
};

// A sender waiting for a connection; a node of its pool's intrusive FIFO (no allocation, O(1)
// removal: with 100,000 senders queued, removing a cancelled one by search was 27% of the CPU).
struct waiter : keel::detail::waiter {
  explicit waiter(const asio::any_io_executor& ex)
      : wake(ex, asio::steady_timer::time_point::max()) {}
  asio::steady_timer wake;
  std::unique_ptr<connection> conn;  // an idle connection handed over by release()
  bool may_open = false;             // a connection slot handed over by release()
};

struct ssl_session_free {
  void operator()(SSL_SESSION* s) const noexcept { SSL_SESSION_free(s); }
};

struct host_pool {
  std::size_t open = 0;  // busy + idle connections, plus slots granted for connecting
  std::deque<std::unique_ptr<connection>> idle;
  keel::detail::waiter_list waiters;
  // The latest TLS session this host gave (tls_options::resume_sessions), offered to its next
  // connection. Set by on_new_session, which finds the pool through the SSL object's ex data.
  std::unique_ptr<SSL_SESSION, ssl_session_free> tls_session;
};

// The SSL ex-data slot that points an SSL object at its host_pool (for on_new_session).
int pool_ex_index() {
  static const int index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}

// OpenSSL's new-session callback (a TLS 1.3 ticket, or a TLS 1.2 session once the handshake is
// done): the host's pool keeps the latest. Returns 1: the pool owns the reference now.
int on_new_session(SSL* ssl, SSL_SESSION* session) {
  auto* pool = static_cast<host_pool*>(SSL_get_ex_data(ssl, pool_ex_index()));
  if (pool == nullptr || SSL_SESSION_is_resumable(session) != 1) {
    return 0;
  }
  pool->tls_session.reset(session);
  return 1;
}

// The parser's body: it appends the body's bytes to whatever string the current read names, so a
// streamed body never accumulates in the parser and `send` still builds its body in place. (With
// Beast's buffer_body each read would need a buffer of a guessed size and a need_buffer dance.)
// The limit on a Content-Length is checked here, when the body starts, rather than by the parser
// at the end of the header: `open` must return the status of a response whose body is too large,
// and the first `read_some` refuse it. Chunked and close-delimited bodies are counted by the
// parser's own body_limit, set once the header is in.
struct sink_body {
  struct value_type {
    std::string* out = nullptr;  // null outside a read: body bytes then would be a bug
    std::uint64_t limit = 0;
    bool reserve = false;  // reading the whole body (send): reserve Content-Length, as string_body
  };
  class reader {
   public:
    template <bool IsRequest, class Fields>
    reader(bhttp::header<IsRequest, Fields>&, value_type& v) : v_(v) {}
    void init(const boost::optional<std::uint64_t>& length, boost::system::error_code& ec) {
      ec = {};
      if (length && *length > v_.limit) {
        ec = bhttp::error::body_limit;
        return;
      }
      if (length && v_.reserve && v_.out != nullptr) {
        v_.out->reserve(v_.out->size() + static_cast<std::size_t>(*length));
      }
    }
    std::size_t put(asio::const_buffer b, boost::system::error_code& ec) {
      if (v_.out == nullptr) {
        ec = bhttp::error::need_buffer;
        return 0;
      }
      ec = {};
      v_.out->append(static_cast<const char*>(b.data()), b.size());
      return b.size();
    }
    void finish(boost::system::error_code& ec) { ec = {}; }

   private:
    value_type& v_;
  };
};

using body_parser = bhttp::response_parser<sink_body>;

}  // namespace

// One request's hold on a pool slot and its connection, from `open` until the body has been read
// (or abandoned): anything but a clean, complete keep-alive exchange (an exception, a
// cancellation, a partial message, a reader closed or destroyed early) closes the connection.
// `send` uses it for the length of one call; a `response_reader` owns it.
struct response_reader::state {
  state(std::shared_ptr<client::impl> o, host_pool* p, std::string w)
      : owner(std::move(o)), pool(p), where(std::move(w)) {}
  state(const state&) = delete;
  state& operator=(const state&) = delete;
  ~state() { release(); }

  // Gives the slot back: the connection to the pool after a complete keep-alive message,
  // otherwise closed. Idempotent.
  void release() noexcept;
  // Closes the connection now. A read in progress still uses the connection object: it ends
  // with an error and releases the slot itself.
  void abandon() noexcept;
  // Reads body bytes onto `out`: all of them (`to_end`), or until at least one arrived.
  // Throws keel::failure; any failure closes the connection.
  asio::awaitable<void> read(std::string& out, bool to_end);
  static asio::awaitable<std::optional<std::string>> read_some(state* st);

  std::shared_ptr<client::impl> owner;
  host_pool* pool;  // null once the slot was given back
  std::unique_ptr<connection> conn;
  std::optional<body_parser> parser;  // in place: a Beast parser cannot move
  response head;
  std::string where;
  bool reusable = false;  // keep-alive allowed and requests left, once the message is complete
  bool finished = false;  // the body was read to its end
  bool reading = false;   // a read's frame refers to `conn`
  std::size_t delivered = 0;
};

struct client::impl {
  impl(asio::any_io_executor executor, client_options options)
      : ex(std::move(executor)), opts(std::move(options)) {
    if (opts.tls.insecure_skip_verify) {
      std::fprintf(stderr,
                   "keel.http: WARNING: insecure_skip_verify is set: TLS certificates and host "
                   "names are NOT verified; API keys can be stolen by anyone on the network path. "
                   "Use only with local test servers.\n");
    }
    if (opts.tls.ca_file) {
      (void)tls_context();  // a CA file that cannot be read fails here, not at the first call
    }
    opts.max_connections_per_host = std::max<std::size_t>(1, opts.max_connections_per_host);
    opts.max_requests_per_connection = std::max<std::size_t>(1, opts.max_requests_per_connection);
  }

  // The TLS context, made for the first TLS connection. Loading the system's CA store is most
  // of the cost of making a client (255M instructions, tens of milliseconds), which a client of
  // plain-HTTP servers (a local model server, the mock, a gateway's tests) never needs; Go's
  // net/http loads its roots lazily too.
  asio::ssl::context& tls_context() {
    if (ssl_ctx) {
      return *ssl_ctx;
    }
    // Configured in full before it is kept: a context left half set up by an exception would
    // not verify peers (a new OpenSSL context verifies nothing).
    asio::ssl::context ctx(asio::ssl::context::tls_client);
    SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_2_VERSION);
    if (opts.tls.resume_sessions) {
      // Sessions are kept by keel's host pools (on_new_session), not OpenSSL's internal cache.
      SSL_CTX_set_session_cache_mode(ctx.native_handle(),
                                     SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
      SSL_CTX_sess_set_new_cb(ctx.native_handle(), &on_new_session);
    }
    if (opts.tls.insecure_skip_verify) {
      ctx.set_verify_mode(asio::ssl::verify_none);
    } else {
      if (opts.tls.verify_peer) {
        ctx.set_default_verify_paths();
        ctx.set_verify_mode(asio::ssl::verify_peer);
      } else {
        ctx.set_verify_mode(asio::ssl::verify_none);
      }
      if (opts.tls.ca_file) {
        ctx.load_verify_file(*opts.tls.ca_file);
      }
    }
    return ssl_ctx.emplace(std::move(ctx));
  }

  bool verifies() const { return opts.tls.verify_peer && !opts.tls.insecure_skip_verify; }

  // Returns an idle connection, or nullptr with a slot reserved (pool.open counts it) for the
  // caller to connect. Waits FIFO when the host is at its limit.
  asio::awaitable<std::unique_ptr<connection>> acquire(host_pool& pool) {
    const auto now = std::chrono::steady_clock::now();
    while (!pool.idle.empty()) {
      // Most recently used first: the likeliest to be alive and warm.
      auto c = std::move(pool.idle.back());
      pool.idle.pop_back();
      if (now - c->idle_since < opts.idle_timeout && c->usable()) {
        co_return c;
      }
      c->close();
      --pool.open;
    }
    if (pool.open < opts.max_connections_per_host) {
      ++pool.open;
      co_return nullptr;
    }
    waiter w(ex);
    pool.waiters.push_back(w);
    // However this frame ends (even destroyed at io_context shutdown), the queue must not keep
    // a pointer into it.
    struct unqueue {
      host_pool& p;
      waiter* w;
      ~unqueue() {
        if (p.waiters.contains(*w)) {
          p.waiters.erase(*w);
        }
      }
    } guard{pool, &w};
    // release() cancels the timer after handing over a connection or a slot; a cancellation of
    // the caller completes the wait with neither.
    co_await w.wake.async_wait(asio::as_tuple(asio::use_awaitable));
    if (w.conn || w.may_open) {
      co_return std::move(w.conn);
    }
    throw boost::system::system_error(asio::error::operation_aborted);
  }

  void release(host_pool& pool, std::unique_ptr<connection> c, bool reusable) {
    if (c && reusable) {
      c->idle_since = std::chrono::steady_clock::now();
      if (!pool.waiters.empty()) {
        auto* w = static_cast<waiter*>(&pool.waiters.pop_front());
        w->conn = std::move(c);
        w->wake.cancel();
        return;
      }
      if (!client_destroyed) {
        pool.idle.push_back(std::move(c));
        return;
      }
      // A reader or send that outlived its client: nobody would close an idle connection now.
    }
    if (c) {
      c->close();
    }
    if (!pool.waiters.empty()) {
      // The slot passes to the first waiter; pool.open stays the same.
      auto* w = static_cast<waiter*>(&pool.waiters.pop_front());
      w->may_open = true;
      w->wake.cancel();
      return;
    }
    --pool.open;
  }

  asio::awaitable<void> connect(connection& c, host_pool& pool, const url_parts& u,
                                std::string_view where) {
    boost::system::error_code ec;
    if (u.tls) {
      asio::ssl::context* tls_ctx = nullptr;
      try {
        tls_ctx = &tls_context();
      } catch (const boost::system::system_error& e) {
        fail(e.code(), "cannot set up TLS", where);
      }
      try {
        c.tls.emplace(ex, *tls_ctx);
      } catch (const boost::system::system_error& e) {
        fail(e.code(), "cannot set up TLS", where);
      }
    }
    const auto connect_deadline =
        keel::saturating_add(std::chrono::steady_clock::now(), opts.connect_timeout);
    beast::tcp_stream& stream = c.lowest();
    stream.expires_after(opts.connect_timeout);
    if (u.host_is_ip) {
      const tcp::endpoint ep(asio::ip::make_address(u.host), u.port);
      co_await stream.async_connect(ep, asio::redirect_error(asio::use_awaitable, ec));
    } else {
      tcp::resolver resolver(ex);
      auto results = co_await resolver.async_resolve(u.host, std::to_string(u.port),
                                                     asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        fail(ec, "resolve failed", where);
      }
      co_await stream.async_connect(results, asio::redirect_error(asio::use_awaitable, ec));
    }
    if (ec == beast::error::timeout) {
      fail(error::connect_timeout, "connect failed", where);
    }
    if (ec) {
      fail(ec, "connect failed", where);
    }
    ++opened;
    if (u.tls) {
      if (!u.host_is_ip && !SSL_set_tlsext_host_name(c.tls->native_handle(), u.host.c_str())) {
        fail(error::tls_error, "cannot set SNI", where);
      }
      if (verifies()) {
        // OpenSSL's own host check rather than a verify callback: a mismatch then leaves
        // X509_V_ERR_HOSTNAME_MISMATCH as the verify result, so the error can tell a wrong host
        // name from an untrusted chain (the fixes differ: base_url versus ca_file).
        SSL* ssl = c.tls->native_handle();
        const int set = u.host_is_ip
                            ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), u.host.c_str())
                            : SSL_set1_host(ssl, u.host.c_str());
        if (set != 1) {
          fail(error::tls_error, "cannot set the host name to verify", where);
        }
      }
      // The session offered, held (up-ref'd) so that a failure can tell whether the pool still
      // holds that same session.
      std::unique_ptr<SSL_SESSION, ssl_session_free> offered;
      if (opts.tls.resume_sessions) {
        SSL* ssl = c.tls->native_handle();
        SSL_set_ex_data(ssl, pool_ex_index(), &pool);
        if (pool.tls_session) {
          if (SSL_set_session(ssl, pool.tls_session.get()) == 1) {
            SSL_SESSION_up_ref(pool.tls_session.get());
            offered.reset(pool.tls_session.get());
          } else {
            pool.tls_session.reset();  // not usable with this context: forget it
          }
        }
      }
      // The connect timeout covers the handshake too: what is left of it, on the request timer
      // (the TLS stream waits on the socket itself, not through the TCP stream's timer).
      c.start_request_timer(connect_deadline - std::chrono::steady_clock::now());
      co_await c.tls->async_handshake(asio::redirect_error(asio::use_awaitable, ec));
      const bool handshake_timed_out = c.timed_out;
      c.stop_request_timer();
      c.timed_out = false;
      if (handshake_timed_out) {
        fail(error::connect_timeout, "TLS handshake failed", where);
      }
      if (ec) {
        // A TLS failure (not a reset or a cancellation) with the session offered: the next
        // connection starts afresh, unless another connection has stored a newer session since.
        if (offered && pool.tls_session.get() == offered.get() &&
            ec.category() == asio::error::get_ssl_category()) {
          pool.tls_session.reset();
        }
        fail(ec, tls_failure(ec, c.tls->native_handle(), u.host), where);
      }
      SSL* ssl = c.tls->native_handle();
      if (SSL_session_reused(ssl) == 1) {
        ++resumed;
      }
      // TLS 1.2 reports no new session through the callback when a resumed handshake renewed
      // the ticket (OpenSSL then also marks the old one not resumable): keep the renewed one.
      if (opts.tls.resume_sessions && SSL_version(ssl) < TLS1_3_VERSION) {
        SSL_SESSION* now = SSL_get0_session(ssl);
        if (now != nullptr && now != pool.tls_session.get() && SSL_SESSION_is_resumable(now) == 1) {
          pool.tls_session.reset(SSL_get1_session(ssl));
        }
      }
    }
  }

  // A stream's idle wait (see read_until) is where a cancelled stream usually is: its caller
  // gone, its deadline past, or a hedge that lost. The caller's cancellation closes the socket
  // there and then, in the handler that emits it, rather than when this coroutine next runs: on
  // a thread busy with other streams that can be milliseconds later, and the server keeps
  // generating (and billing) until it sees the close. The wait is started with no slot of its
  // own (`idle_wait_token`), so that the socket's cancellation handler does not replace this
  // one; the close ends it with `operation_aborted`, as a cancellation would, and a close that
  // lands after the wait completed but before this coroutine resumed is reported the same way
  // (`closed_while_idle`). Any cancellation type: the reader closes a connection whose read was
  // cancelled anyway. The handler refers to the socket: the awaitable machinery removes it when
  // the wait completes, and read_until when the wait does not start (an exception from the
  // co_await: a cancellation already requested, or no memory). Like any Asio cancellation, it
  // must be emitted on the client's executor.
  static void close_on_cancel(asio::cancellation_slot slot, tcp::socket& socket) {
    if (slot.is_connected()) {
      slot.assign([&socket](asio::cancellation_type) {
        boost::system::error_code ignored;
        socket.shutdown(tcp::socket::shutdown_both, ignored);
        socket.close(ignored);
      });
    }
  }
  static auto idle_wait_token(boost::system::error_code& ec) {
    return asio::bind_cancellation_slot(asio::cancellation_slot(),
                                        asio::redirect_error(asio::use_awaitable, ec));
  }
  static void closed_while_idle(const tcp::socket& socket, boost::system::error_code& ec) {
    if (!ec && !socket.is_open()) {
      ec = asio::error::operation_aborted;
    }
  }

  // Feeds `buf` to `p`, reading from `s` when it runs dry, until `enough()`: as Beast's
  // http::async_read does, but calling the parser itself, for two holes in Beast 1.81's parser
  // (found by probing with hostile servers):
  // - a header or trailer field longer than 65,535 bytes makes it throw std::length_error, which
  //   inside async_read escapes io_context::run() and ends the program;
  // - chunk-size lines (with extensions) and trailers count toward no limit, so a server could
  //   make the buffer grow without bound until the request timeout.
  // Both become `header_too_large`: the bytes waiting to be parsed are capped at the header limit
  // plus one read. The body is parsed as it arrives (eager), so only unparsed metadata waits in
  // `buf`, and one call never holds more than one read beyond what it hands on.
  //
  // `Streaming` (a `read_some`, or `open`'s head): hold no read buffer while the body is idle. An
  // open stream spends nearly all its life waiting for the next event, and a 64 KiB buffer held
  // through that wait was most of an idle stream's cost (issue 15: 10,000 streams at <= 16 KiB
  // each). So when the parser needs more bytes, the buffer shrinks to the few bytes it could not
  // parse yet (none, or part of a chunk's framing) and a plain TCP stream waits for readability
  // (`wait_read`, which needs no buffer) before it reads; the 64 KiB read is allocated only once
  // bytes are there, and `response_reader::state::read` shrinks it again after the read. A TLS
  // stream waits on the socket too when OpenSSL holds nothing (OpenSSL, reading ahead, may hold
  // bytes already read from it), with OpenSSL's buffers freed; then a one-byte read takes the
  // first byte of the record and a second read the rest of that record's plaintext, into a
  // buffer of its size (at most 16 KiB: an SSL_read never returns more than a record). `send`
  // (not streaming) reads as before: 64 KiB, kept by the connection.
  //
  // `Streaming` is a template parameter so that `send`'s instantiation is the loop as it was,
  // with no wait in its frame: with a runtime flag, `send` measured about 5% slower at 16
  // connections (bench_http, alternated pairs).
  template <bool Streaming, class Stream, class Parser, class Enough>
  asio::awaitable<boost::system::error_code> read_until(Stream& s, beast::flat_buffer& buf,
                                                        Parser& p, Enough enough) {
    constexpr bool is_tls = !std::is_same_v<Stream, beast::tcp_stream>;
    constexpr std::size_t read_size = Streaming && is_tls ? 16 * 1024 : 64 * 1024;
    const std::size_t backlog_cap = opts.max_header_bytes + read_size;
    constexpr std::size_t small_backlog = 1024;
    boost::system::error_code ec;
    for (;;) {
      while (buf.size() > 0 && !enough()) {
        std::size_t used = 0;
        try {
          used = p.put(buf.data(), ec);
        } catch (const std::length_error&) {
          co_return make_error_code(error::header_too_large);
        }
        buf.consume(used);
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
      if (enough()) {
        co_return ec;
      }
      if (buf.size() >= backlog_cap) {
        co_return make_error_code(error::header_too_large);
      }
      if constexpr (Streaming) {
        // What is left in `buf` is an incomplete piece of framing the parser needs more bytes
        // for (often a chunk's closing CRLF): keep just those bytes while waiting. Not when
        // they are many (a header or a chunk-size line arriving in pieces): shrinking and
        // growing again on every read would copy them each time, quadratic in a trickle.
        if (buf.size() <= small_backlog) {
          buf.shrink_to_fit();
        }
        if constexpr (!is_tls) {
          // Bytes already waiting (a stream that is flowing) need no trip through the reactor.
          boost::system::error_code ignored;
          if (s.socket().available(ignored) == 0) {
            const asio::cancellation_slot slot =
                (co_await asio::this_coro::cancellation_state).slot();
            close_on_cancel(slot, s.socket());
            try {
              co_await s.socket().async_wait(tcp::socket::wait_read, idle_wait_token(ec));
            } catch (...) {
              asio::cancellation_slot(slot).clear();  // the wait did not start
              throw;
            }
            closed_while_idle(s.socket(), ec);
            if (ec) {
              co_return ec;
            }
          }
        }
      }
      std::size_t want = std::min(read_size, backlog_cap - buf.size());
      std::size_t got = 0;
      bool read_done = false;
      if constexpr (Streaming && is_tls) {
        // When OpenSSL holds nothing, the stream waits on the socket as a plain one does (no
        // buffer, and the smallest pending operation). Then a one-byte SSL_read returns once a
        // record has arrived and been decrypted, and leaves the rest of its plaintext pending in
        // OpenSSL, which the read below takes into a buffer of just that size (no read touches
        // the socket while plaintext is pending). Not when OpenSSL already holds unprocessed
        // bytes: those are read at once.
        SSL* ssl = s.native_handle();
        if (s.drained()) {
          const asio::cancellation_slot slot =
              (co_await asio::this_coro::cancellation_state).slot();
          close_on_cancel(slot, s.next_layer().socket());
          try {
            co_await s.async_wait_readable(idle_wait_token(ec));
          } catch (...) {
            asio::cancellation_slot(slot).clear();  // the wait did not start
            throw;
          }
          closed_while_idle(s.next_layer().socket(), ec);
          if (ec) {
            co_return ec;
          }
          unsigned char first = 0;
          got = co_await s.async_read_some(asio::buffer(&first, 1),
                                           asio::redirect_error(asio::use_awaitable, ec));
          if (got == 1) {
            *static_cast<unsigned char*>(buf.prepare(1).data()) = first;
            buf.commit(1);
          }
          const auto pending = static_cast<std::size_t>(std::max(SSL_pending(ssl), 0));
          read_done = ec || pending == 0 || buf.size() >= backlog_cap;
          want = std::min(pending, backlog_cap - buf.size());
        }
      }
      if (!read_done) {
        got = co_await s.async_read_some(buf.prepare(want),
                                         asio::redirect_error(asio::use_awaitable, ec));
        buf.commit(got);
      }
      if (ec == asio::error::eof) {
        // As Beast: nothing at all is "closed before a response"; otherwise the message may
        // end at the close (no length given), or it is cut short.
        if (!p.got_some()) {
          co_return make_error_code(bhttp::error::end_of_stream);
        }
        ec = {};
        p.put_eof(ec);
        co_return ec;
      }
      if (ec) {
        co_return ec;
      }
    }
  }

  // Writes the request and reads the final response's status line and header fields into `st`
  // (its parser, head and reusability), reading past interim responses.
  // `streaming` (`open`): the head is read as a stream's body is (see read_until), so that N
  // streams opening at once do not each hold a 64 KiB buffer while they wait for their heads.
  template <class Stream>
  asio::awaitable<void> write_and_read_head(Stream& s, response_reader::state& st,
                                            const std::string& wire, bool head, bool streaming) {
    connection& c = *st.conn;
    const std::string& where = st.where;
    boost::system::error_code ec;
    co_await asio::async_write(s, asio::buffer(wire),
                               asio::redirect_error(asio::use_awaitable, ec));
    if (ec) {
      fail(c.timed_out ? make_error_code(error::request_timeout) : ec, "writing the request failed",
           where);
    }
    // Interim 1xx responses (100 Continue, 103 Early Hints) may precede the final one and a
    // client must read past them (RFC 9110 §15.2); returning one as the answer would leave the
    // real response in the buffer. A status below 100 is invalid and 101 (switching protocols)
    // was never asked for: both are protocol errors, so status 0 keeps meaning "no response"
    // to the provider layers. (Found by fuzz/fuzz_http_client.)
    constexpr int max_interim = 8;
    for (int interim = 0;; ++interim) {
      auto& p = st.parser.emplace();
      p.header_limit(static_cast<std::uint32_t>(
          std::min<std::size_t>(opts.max_header_bytes, std::numeric_limits<std::uint32_t>::max())));
      // No body limit yet: Beast would apply it to a Content-Length at the end of the header,
      // and `open` must still return such a response's status (see sink_body).
      p.body_limit(boost::none);
      p.skip(head);
      p.eager(false);  // stop at the end of the header
      auto header_done = [&p] { return p.is_header_done(); };
      ec = streaming ? co_await read_until<true>(s, c.buffer, p, header_done)
                     : co_await read_until<false>(s, c.buffer, p, header_done);
      if (ec) {
        fail(c.timed_out ? make_error_code(error::request_timeout) : ec,
             "reading the response failed", where);
      }
      const unsigned status = p.get().result_int();
      if (status < 100 || status == 101 || (status < 200 && interim == max_interim)) {
        fail(error::protocol_error, "reading the response failed", where);
      }
      if (status >= 200) {
        break;
      }
    }
    auto& p = *st.parser;
    const auto& msg = p.get();
    if (static_cast<std::size_t>(std::distance(msg.begin(), msg.end())) > opts.max_header_count) {
      fail(error::too_many_headers, "reading the response failed", where);
    }
    p.body_limit(static_cast<std::uint64_t>(opts.max_response_body));
    p.get().body().limit = static_cast<std::uint64_t>(opts.max_response_body);
    p.eager(true);
    // The parser's keep_alive, not the message's: a body delimited by the close is not
    // keep-alive whatever the Connection field says.
    st.reusable = p.keep_alive() && c.requests < opts.max_requests_per_connection;
    st.head.status = static_cast<int>(msg.result_int());
    st.head.reason = std::string(msg.reason());
    for (const auto& f : msg) {
      st.head.headers.add(std::string(f.name_string()), std::string(f.value()));
    }
    st.finished = p.is_done();  // no body: HEAD, 204, 304, Content-Length 0
  }

  // Everything up to the final response's header. `whole`: the caller reads the body to its end
  // at once (send), so request_timeout keeps running over it; otherwise it stops here.
  static asio::awaitable<std::unique_ptr<response_reader::state>> open(std::shared_ptr<impl> self,
                                                                       request req, bool whole) {
    std::string where = req.method + " " + redact_url(req.url);
    const auto u = parse_url(req.url);
    if (!u) {
      fail(error::bad_url, "cannot send", where);
    }
    if (req.method.empty() || has_control(req.method) ||
        req.method.find(' ') != std::string::npos) {
      fail(error::bad_header, "bad method", where);
    }

    // The request is serialized here into one buffer and written with one async_write: Beast's
    // serializer walks a concatenated buffer sequence whose iterators cost about a fifth of the
    // client's CPU time per request (bench/http_bench.cpp). The URL, the method and every
    // header are checked for control characters first, so they cannot break the framing.
    std::string wire;
    wire.reserve(128 + req.url.size() + req.body.size());
    wire.append(req.method).append(" ").append(u->target).append(" HTTP/1.1\r\n");
    bool has_host = false;
    bool has_agent = false;
    for (const auto& [name, value] : req.headers.fields()) {
      if (name.empty() || has_control(name) || has_control(value) ||
          name.find_first_of(" :") != std::string::npos) {
        // The name is safe to report only if it has no control characters (and is short);
        // values never are: an API key with a trailing newline must not reach a log.
        const bool name_shown = !name.empty() && !has_control(name) && name.size() <= 64;
        fail(error::bad_header,
             name_shown ? "bad request header \"" + name + "\"" : std::string("bad request header"),
             where);
      }
      if (iequals(name, "content-length") || iequals(name, "transfer-encoding")) {
        continue;  // framing is computed from the body
      }
      has_host = has_host || iequals(name, "host");
      has_agent = has_agent || iequals(name, "user-agent");
      wire.append(name).append(": ").append(value).append("\r\n");
    }
    if (!has_host) {
      wire.append("Host: ");
      if (u->host.find(':') != std::string::npos) {
        wire.append("[").append(u->host).append("]");
      } else {
        wire.append(u->host);
      }
      if (u->port != (u->tls ? 443 : 80)) {
        wire.append(":").append(std::to_string(u->port));
      }
      wire.append("\r\n");
    }
    if (!has_agent && !self->opts.user_agent.empty()) {
      if (has_control(self->opts.user_agent)) {
        fail(error::bad_header, "bad user agent", where);
      }
      wire.append("User-Agent: ").append(self->opts.user_agent).append("\r\n");
    }
    // As Beast's prepare_payload: a length for any body, and for the methods that expect one.
    if (!req.body.empty() || req.method == "POST" || req.method == "PUT" ||
        req.method == "OPTIONS") {
      wire.append("Content-Length: ").append(std::to_string(req.body.size())).append("\r\n");
    }
    wire.append("\r\n").append(req.body);
    const bool head = iequals(req.method, "HEAD");

    std::string key = (u->tls ? "https://" : "http://") + u->host + ":" + std::to_string(u->port);
    host_pool& pool = self->pools[key];
    // Acquire first: a caller cancelled while queued holds no slot, so it must not create the
    // state whose destructor gives a slot back.
    std::unique_ptr<connection> acquired = co_await self->acquire(pool);
    auto st = std::make_unique<response_reader::state>(self, &pool, std::move(where));
    st->conn = std::move(acquired);
    if (!st->conn) {
      st->conn = std::make_unique<connection>(self->ex);
      co_await self->connect(*st->conn, pool, *u, st->where);
    }
    connection& c = *st->conn;
    ++c.requests;
    c.lowest().expires_never();  // the connect timeout is over; no per-operation timers
    if (self->opts.request_timeout) {
      c.start_request_timer(*self->opts.request_timeout);
    }
    if (c.tls) {
      co_await self->write_and_read_head(*c.tls, *st, wire, head, !whole);
    } else {
      co_await self->write_and_read_head(c.plain, *st, wire, head, !whole);
    }
    if (!whole) {
      c.stop_request_timer();
      c.timed_out = false;       // had it fired just after the header, it cancelled nothing
      c.buffer.shrink_to_fit();  // a stream holds no read buffer while idle (see read_until)
    }
    if (st->finished) {
      st->release();  // no body to wait for: the connection is free now
    }
    co_return st;
  }

  static asio::awaitable<response> send(std::shared_ptr<impl> self, request req) {
    auto st = co_await open(std::move(self), std::move(req), true);
    response res = std::move(st->head);
    if (!st->finished) {
      co_await st->read(res.body, true);
    }
    co_return res;
  }

  static asio::awaitable<response_reader> open_reader(std::shared_ptr<impl> self, request req) {
    co_return response_reader(co_await open(std::move(self), std::move(req), false));
  }

  void close_idle() {
    for (auto& [key, pool] : pools) {
      for (auto& c : pool.idle) {
        c->close();
      }
      pool.open -= pool.idle.size();
      pool.idle.clear();
    }
  }

  asio::any_io_executor ex;
  client_options opts;
  std::optional<asio::ssl::context> ssl_ctx;  // see tls_context()
  std::map<std::string, host_pool> pools;
  std::size_t opened = 0;
  std::size_t resumed = 0;        // TLS handshakes that resumed a session
  bool client_destroyed = false;  // see release()
};

void response_reader::state::release() noexcept {
  if (pool == nullptr) {
    return;
  }
  if (conn) {
    conn->stop_request_timer();
  }
  host_pool& p = *pool;
  pool = nullptr;
  owner->release(p, std::move(conn), finished && reusable);
}

void response_reader::state::abandon() noexcept {
  if (pool == nullptr) {
    return;
  }
  if (reading) {
    // The read's frame still refers to the connection: closing the socket ends it with an
    // error, and the read gives the slot back as it unwinds.
    conn->close();
    return;
  }
  release();
}

asio::awaitable<void> response_reader::state::read(std::string& out, bool to_end) {
  connection& c = *conn;
  body_parser& p = *parser;
  p.get().body().out = &out;
  p.get().body().reserve = to_end;
  reading = true;
  // However the read ends (an error, a cancellation, the frame destroyed at shutdown), the
  // parser must not keep a pointer to `out`, and a failure closes the connection at once.
  struct guard {
    state& st;
    bool ok = false;
    ~guard() {
      st.reading = false;
      st.parser->get().body().out = nullptr;
      if (!ok) {
        st.abandon();
      }
    }
  } g{*this};
  const std::size_t before = out.size();
  auto enough = [&] { return p.is_done() || (!to_end && out.size() > before); };
  boost::system::error_code ec;
  if (c.tls) {
    ec = to_end ? co_await owner->read_until<false>(*c.tls, c.buffer, p, enough)
                : co_await owner->read_until<true>(*c.tls, c.buffer, p, enough);
  } else {
    ec = to_end ? co_await owner->read_until<false>(c.plain, c.buffer, p, enough)
                : co_await owner->read_until<true>(c.plain, c.buffer, p, enough);
  }
  if (ec) {
    fail(c.timed_out ? make_error_code(error::request_timeout) : ec, "reading the response failed",
         where);
  }
  g.ok = true;
  if (!to_end) {
    // Between two read_some calls the stream holds no read buffer (see read_until), only the
    // bytes, if any, that wait to be parsed.
    c.buffer.shrink_to_fit();
  }
  if (p.is_done()) {
    finished = true;
    release();
  }
}

asio::awaitable<std::optional<std::string>> response_reader::state::read_some(state* st) {
  if (st != nullptr && st->finished) {
    co_return std::nullopt;
  }
  if (st == nullptr || st->pool == nullptr) {
    throw keel::failure(asio::error::operation_aborted,
                        "keel.http: the response body was abandoned (the reader was closed, "
                        "failed or moved from)" +
                            (st != nullptr ? " (" + st->where + ")" : std::string()));
  }
  std::string piece;
  co_await st->read(piece, false);
  if (piece.empty()) {
    co_return std::nullopt;  // the body ended with no further bytes
  }
  st->delivered += piece.size();
  co_return std::optional<std::string>(std::move(piece));
}

response_reader::response_reader(std::unique_ptr<state> s) noexcept : state_(std::move(s)) {}
response_reader::response_reader(response_reader&& other) noexcept = default;
response_reader& response_reader::operator=(response_reader&& other) noexcept = default;
response_reader::~response_reader() = default;

const response& response_reader::head() const noexcept {
  return state_->head;
}

bool response_reader::done() const noexcept {
  return state_ && state_->finished;
}

std::size_t response_reader::bytes_read() const noexcept {
  return state_ ? state_->delivered : 0;
}

void response_reader::close() noexcept {
  if (state_) {
    state_->abandon();
  }
}

asio::awaitable<std::optional<std::string>> response_reader::read_some() {
  return state::read_some(state_.get());
}

client::client(asio::any_io_executor ex, client_options options)
    : impl_(std::make_shared<impl>(std::move(ex), std::move(options))) {}

client::~client() {
  impl_->client_destroyed = true;
  impl_->close_idle();
}

asio::awaitable<response> client::send(request req) {
  // A free-standing coroutine holding the impl: the frame does not depend on `this`.
  return impl::send(impl_, std::move(req));
}

asio::awaitable<response_reader> client::open(request req) {
  return impl::open_reader(impl_, std::move(req));
}

asio::any_io_executor client::get_executor() const noexcept {
  return impl_->ex;
}

std::size_t client::tls_sessions_resumed() const noexcept {
  return impl_->resumed;
}

std::size_t client::connections_opened() const noexcept {
  return impl_->opened;
}

std::size_t client::pooled_idle() const noexcept {
  std::size_t n = 0;
  for (const auto& [key, pool] : impl_->pools) {
    n += pool.idle.size();
  }
  return n;
}

}  // namespace keel::http
