// keel::redis::client (keel/redis/client.hpp): pipelined RESP over Asio, parsed by hiredis.
#include <keel/redis/client.hpp>

#include <keel/deadline.hpp>
#include <keel/error.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/system/errc.hpp>

#include <hiredis/hiredis.h>
#include <hiredis/read.h>

#include <algorithm>
#include <charconv>
#include <deque>
#include <optional>
#include <stdexcept>
#include <utility>

namespace keel::redis {
namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

// ---- endpoint ----------------------------------------------------------------------------------

std::string endpoint::to_string() const {
  const bool v6 = host.find(':') != std::string::npos;  // bracketed, as in a URL
  return (tls ? "rediss://" : "") + (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port) +
         "/" + std::to_string(db);
}

endpoint parse_url(std::string_view url) {
  constexpr std::string_view plain = "redis://";
  constexpr std::string_view secure = "rediss://";
  endpoint ep;
  std::string_view rest;
  if (url.substr(0, plain.size()) == plain) {
    rest = url.substr(plain.size());
  } else if (url.substr(0, secure.size()) == secure) {
    rest = url.substr(secure.size());
    ep.tls = true;
  } else {
    throw std::invalid_argument("redis URL: must start with redis:// or rediss:// (TLS)");
  }
  if (const auto at = rest.rfind('@'); at != std::string_view::npos) {
    const std::string_view cred = rest.substr(0, at);
    rest = rest.substr(at + 1);
    const auto colon = cred.find(':');
    if (colon == std::string_view::npos) {
      ep.username = std::string(cred);  // a user without a password is allowed by ACLs
    } else {
      ep.username = std::string(cred.substr(0, colon));
      ep.password = std::string(cred.substr(colon + 1));
    }
  }
  std::string_view hostport = rest;
  if (const auto slash = rest.find('/'); slash != std::string_view::npos) {
    hostport = rest.substr(0, slash);
    const std::string_view db = rest.substr(slash + 1);
    if (!db.empty()) {
      int n = -1;
      const auto [p, ec] = std::from_chars(db.data(), db.data() + db.size(), n);
      if (ec != std::errc() || p != db.data() + db.size() || n < 0) {
        // Not echoed: a password put in the path by mistake would be printed.
        throw std::invalid_argument(
            "redis URL: the database (after the '/') is not a "
            "non-negative integer");
      }
      ep.db = n;
    }
  }
  std::string_view host = hostport;
  // An IPv6 address is bracketed ([::1]:6379): the port's colon comes after the ']'.
  const auto bracket = hostport.rfind(']');
  if (const auto colon = hostport.rfind(':');
      colon != std::string_view::npos && (bracket == std::string_view::npos || colon > bracket)) {
    host = hostport.substr(0, colon);
    const std::string_view port = hostport.substr(colon + 1);
    unsigned n = 0;
    const auto [p, ec] = std::from_chars(port.data(), port.data() + port.size(), n);
    if (ec != std::errc() || p != port.data() + port.size() || n == 0 || n > 65535) {
      throw std::invalid_argument("redis URL: the port is not a number in 1-65535");
    }
    ep.port = static_cast<std::uint16_t>(n);
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  } else if (host.find_first_of(":[]") != std::string_view::npos) {
    // redis://::1/0 would be host "::" and port 1.
    throw std::invalid_argument("redis URL: an IPv6 address must be bracketed ([::1]:6379)");
  }
  if (host.empty()) {
    throw std::invalid_argument("redis URL: no host");
  }
  ep.host = std::string(host);
  return ep;
}

// ---- the client --------------------------------------------------------------------------------

namespace {

// A command waiting for its reply. Shared by the caller's frame and the connection's queue: a
// caller that times out or is cancelled leaves (`abandoned`), and its reply is dropped.
struct pending {
  explicit pending(const asio::any_io_executor& ex) : wake(ex) {}
  asio::steady_timer wake;  // the command's timeout; cancelled when it is answered
  std::optional<reply> result;
  std::exception_ptr error;
  bool done = false;
  bool abandoned = false;
  bool login = false;  // AUTH or SELECT sent by the client itself
  void finish() {
    done = true;
    wake.cancel();
  }
};

// One TCP connection and what was sent on it.
struct connection {
  explicit connection(const asio::any_io_executor& ex) : sock(ex), reader(redisReaderCreate()) {
    if (reader == nullptr) {
      throw std::bad_alloc();
    }
  }
  ~connection() { redisReaderFree(reader); }
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  tcp::socket sock;
  std::optional<asio::ssl::stream<tcp::socket&>> tls;  // over `sock`, with rediss://
  redisReader* reader;
  std::string out;                            // commands not yet written
  std::deque<std::shared_ptr<pending>> sent;  // in order, awaiting replies (queued or written)
  // A command (not the login) had a reply that is not an error: the connection works, and its
  // end is no reason to wait before the next one.
  bool answered = false;
  bool open = false;  // connected (commands may be written)
  bool writing = false;
  bool dead = false;
};

void append_command(std::string& out, const std::vector<std::string>& args) {
  // RESP: an array of bulk strings.
  out += '*';
  out += std::to_string(args.size());
  out += "\r\n";
  for (const std::string& a : args) {
    out += '$';
    out += std::to_string(a.size());
    out += "\r\n";
    out += a;
    out += "\r\n";
  }
}

reply convert(const redisReply& r) {
  reply out;
  switch (r.type) {
    case REDIS_REPLY_INTEGER:
      out.kind = reply_kind::integer;
      out.integer = r.integer;
      break;
    case REDIS_REPLY_STATUS:
      out.kind = reply_kind::status;
      out.text.assign(r.str, r.len);
      break;
    case REDIS_REPLY_STRING:
      out.kind = reply_kind::string;
      out.text.assign(r.str, r.len);
      break;
    case REDIS_REPLY_ERROR:
      out.kind = reply_kind::error;
      out.text.assign(r.str, r.len);
      break;
    case REDIS_REPLY_ARRAY:
      out.kind = reply_kind::array;
      out.elements.reserve(r.elements);
      for (std::size_t i = 0; i < r.elements; ++i) {
        out.elements.push_back(convert(*r.element[i]));
      }
      break;
    default:
      out.kind = reply_kind::nil;
      break;
  }
  return out;
}

// Why a TLS handshake failed: for a certificate that did not verify, whether the name did not
// match or the chain did not verify (OpenSSL's reason); else OpenSSL's error.
std::string tls_failure(const boost::system::error_code& ec, SSL* ssl, bool verified,
                        const std::string& host) {
  const long result = ssl && verified ? SSL_get_verify_result(ssl) : X509_V_OK;
  if (result == X509_V_ERR_HOSTNAME_MISMATCH || result == X509_V_ERR_IP_ADDRESS_MISMATCH) {
    return "TLS handshake failed: the certificate is not valid for \"" + host +
           "\" (the chain is trusted)";
  }
  if (result != X509_V_OK) {
    return std::string("TLS handshake failed: the certificate chain did not verify (") +
           X509_verify_cert_error_string(result) + ")";
  }
  return "TLS handshake failed: " + ec.message();
}

}  // namespace

struct client::impl : std::enable_shared_from_this<impl> {
  impl(asio::any_io_executor e, client_options o) : ex(std::move(e)), opts(std::move(o)) {
    if (opts.server.tls) {
      tls_ctx.emplace(asio::ssl::context::tls_client);
      tls_ctx->set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                           asio::ssl::context::no_sslv3 | asio::ssl::context::no_tlsv1 |
                           asio::ssl::context::no_tlsv1_1);
      if (opts.ca_file.empty()) {
        tls_ctx->set_default_verify_paths();
      } else {
        tls_ctx->load_verify_file(opts.ca_file);  // throws, naming the error, if unreadable
      }
      tls_ctx->set_verify_mode(opts.verify_peer ? asio::ssl::verify_peer : asio::ssl::verify_none);
    }
  }

  asio::any_io_executor ex;
  client_options opts;
  std::optional<asio::ssl::context> tls_ctx;  // with rediss://
  std::shared_ptr<connection> current;        // null when there is none
  steady_clock::time_point retry_at{};        // no connect before this (after a failure)
  milliseconds delay{0};                      // the next failure's wait
  std::string last_failure;                   // why the last connect failed
  std::uint64_t writes = 0;
  std::uint64_t connects = 0;
  std::uint64_t commands = 0;
  std::size_t waiting = 0;

  std::string where() const { return "redis " + opts.server.to_string(); }

  std::exception_ptr make_failure(boost::system::error_code ec, const std::string& what) const {
    return std::make_exception_ptr(keel::failure(ec, where() + ": " + what));
  }

  // Ends `c`: every command on it that still has a caller fails with `e`.
  void fail(const std::shared_ptr<connection>& c, const std::exception_ptr& e) {
    if (c->dead) {
      return;
    }
    c->dead = true;
    c->open = false;
    boost::system::error_code ignored;
    c->sock.shutdown(tcp::socket::shutdown_both, ignored);
    c->sock.close(ignored);
    auto sent = std::move(c->sent);
    c->sent.clear();
    c->out.clear();
    for (auto& p : sent) {
      if (!p->abandoned) {
        p->error = e;
        p->finish();
      }
    }
    if (current == c) {
      current.reset();
    }
  }

  static asio::awaitable<void> connect(std::shared_ptr<impl> self, std::shared_ptr<connection> c) {
    ++self->connects;
    const endpoint& ep = self->opts.server;
    try {
      co_await keel::with_deadline(
          [&]() -> asio::awaitable<void> {
            tcp::resolver resolver(self->ex);
            auto results = co_await resolver.async_resolve(ep.host, std::to_string(ep.port),
                                                           asio::use_awaitable);
            co_await asio::async_connect(c->sock, results, asio::use_awaitable);
            if (self->tls_ctx) {
              c->tls.emplace(c->sock, *self->tls_ctx);
              SSL* ssl = c->tls->native_handle();
              boost::system::error_code ec;
              (void)asio::ip::make_address(ep.host, ec);
              const bool is_ip = !ec;
              if (!is_ip) {  // a name: say it (SNI)
                SSL_set_tlsext_host_name(ssl, ep.host.c_str());
              }
              // The certificate must name the host (RFC 6125), checked by OpenSSL itself.
              if (self->opts.verify_peer &&
                  (is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), ep.host.c_str())
                         : SSL_set1_host(ssl, ep.host.c_str())) != 1) {
                throw boost::system::system_error(
                    make_error_code(boost::system::errc::invalid_argument),
                    "cannot verify host name \"" + ep.host + "\"");
              }
              co_await c->tls->async_handshake(asio::ssl::stream_base::client, asio::use_awaitable);
            }
          },
          self->opts.connect_timeout);
    } catch (const boost::system::system_error& e) {
      if (c->dead) {
        co_return;  // failed already (a command's timeout closed it): backed off once, there
      }
      self->on_connect_failed(
          c, e.code(),
          e.code() == keel::make_error_code(keel::error::deadline_exceeded)
              ? "no connection within " + std::to_string(self->opts.connect_timeout.count()) + " ms"
          : e.code().category() == asio::error::get_ssl_category() ||
                  e.code() == asio::ssl::error::stream_truncated
              ? tls_failure(e.code(), c->tls ? c->tls->native_handle() : nullptr,
                            self->opts.verify_peer, ep.host)
              : "cannot connect: " + e.code().message());
      co_return;
    }
    if (c->dead) {
      co_return;  // the client was destroyed meanwhile
    }
    boost::system::error_code ignored;
    c->sock.set_option(tcp::no_delay(true), ignored);
    // Log in first: AUTH and SELECT go ahead of every queued command.
    std::string login;
    std::vector<std::shared_ptr<pending>> login_waits;
    auto add_login = [&](std::vector<std::string> args) {
      append_command(login, args);
      auto p = std::make_shared<pending>(self->ex);
      p->login = true;
      p->abandoned = true;  // nobody awaits it; the reader checks it
      login_waits.push_back(std::move(p));
    };
    if (!ep.password.empty()) {
      if (ep.username.empty()) {
        add_login({"AUTH", ep.password});
      } else {
        add_login({"AUTH", ep.username, ep.password});
      }
    }
    if (ep.db != 0) {
      add_login({"SELECT", std::to_string(ep.db)});
    }
    c->out.insert(0, login);
    c->sent.insert(c->sent.begin(), login_waits.begin(), login_waits.end());
    c->open = true;
    // The reconnect delay is not reset here but at the first good reply: a server that accepts
    // and then refuses the login (a wrong password, a database out of range) was reconnected
    // to by every command, 430 connections a second.
    asio::co_spawn(self->ex, read_loop(self, c), asio::detached);
    flush(self, c);
  }

  void on_connect_failed(const std::shared_ptr<connection>& c, boost::system::error_code ec,
                         const std::string& what) {
    fail(c, back_off(ec, what));
  }

  // A connection that failed to work (no connection, a refused login, no reply in time): the
  // next one waits the reconnect delay, which doubles up to its maximum until a reply comes.
  std::exception_ptr back_off(boost::system::error_code ec, const std::string& what) {
    delay = std::min(std::max(delay * 2, opts.reconnect_delay), opts.max_reconnect_delay);
    retry_at = steady_clock::now() + delay;
    last_failure = what;
    return make_failure(ec, what);
  }

  // Starts writing `c`'s queued commands unless a write is in progress.
  static void flush(const std::shared_ptr<impl>& self, const std::shared_ptr<connection>& c) {
    if (c->open && !c->writing && !c->out.empty()) {
      c->writing = true;
      asio::co_spawn(self->ex, write_loop(self, c), asio::detached);
    }
  }

  static asio::awaitable<void> write_loop(std::shared_ptr<impl> self,
                                          std::shared_ptr<connection> c) {
    std::string buf;
    while (!c->dead && !c->out.empty()) {
      buf.clear();
      buf.swap(c->out);  // everything queued until now goes out in one write
      ++self->writes;
      auto [ec, n] = c->tls ? co_await asio::async_write(*c->tls, asio::buffer(buf),
                                                         asio::as_tuple(asio::use_awaitable))
                            : co_await asio::async_write(c->sock, asio::buffer(buf),
                                                         asio::as_tuple(asio::use_awaitable));
      if (ec) {
        const std::string what = "write failed: " + ec.message();
        self->fail(c, c->answered ? self->make_failure(ec, what) : self->back_off(ec, what));
        break;
      }
    }
    c->writing = false;
  }

  static asio::awaitable<void> read_loop(std::shared_ptr<impl> self,
                                         std::shared_ptr<connection> c) {
    std::vector<char> buf(16 * 1024);
    while (!c->dead) {
      auto [ec, n] = c->tls ? co_await c->tls->async_read_some(asio::buffer(buf),
                                                               asio::as_tuple(asio::use_awaitable))
                            : co_await c->sock.async_read_some(asio::buffer(buf),
                                                               asio::as_tuple(asio::use_awaitable));
      if (c->dead) {
        break;
      }
      if (ec) {
        // A server that closes before it ever answered (at maxclients, or a proxy with no
        // backend) is backed off from, as a refused connect is.
        const std::string what = ec == asio::error::eof ? "connection closed by the server"
                                                        : "read failed: " + ec.message();
        self->fail(c, c->answered ? self->make_failure(ec, what) : self->back_off(ec, what));
        break;
      }
      const auto protocol_error = [&](const std::string& what) {
        self->fail(c,
                   self->make_failure(make_error_code(boost::system::errc::protocol_error), what));
      };
      if (redisReaderFeed(c->reader, buf.data(), n) != REDIS_OK) {
        protocol_error("bad reply: " + std::string(c->reader->errstr));
        break;
      }
      for (;;) {
        void* raw = nullptr;
        if (redisReaderGetReply(c->reader, &raw) != REDIS_OK) {
          protocol_error("bad reply: " + std::string(c->reader->errstr));
          break;
        }
        if (raw == nullptr) {
          break;
        }
        reply r = convert(*static_cast<redisReply*>(raw));
        freeReplyObject(raw);
        if (c->sent.empty()) {
          protocol_error("a reply to no command");
          break;
        }
        std::shared_ptr<pending> p = std::move(c->sent.front());
        c->sent.pop_front();
        if (p->login && r.is_error()) {
          // The server's words (e.g. WRONGPASS) name no password.
          self->fail(c, self->back_off(make_error_code(boost::system::errc::permission_denied),
                                       "login refused: " + r.text));
          break;
        }
        if (!p->login && !r.is_error()) {
          // The connection works (AUTH's +OK alone says not, nor an error such as maxclients').
          c->answered = true;
          self->delay = milliseconds{0};
        }
        if (!p->abandoned) {
          p->result = std::move(r);
          p->finish();
        }
      }
      if (!c->dead && c->reader->len - c->reader->pos > self->opts.max_reply_bytes) {
        protocol_error("a reply over " + std::to_string(self->opts.max_reply_bytes) + " bytes");
      }
    }
  }

  static asio::awaitable<reply> run(std::shared_ptr<impl> self, std::vector<std::string> args) {
    if (args.empty()) {
      throw std::invalid_argument("keel::redis::client::command: no command");
    }
    if (self->waiting >= self->opts.max_pending) {
      std::rethrow_exception(
          self->make_failure(keel::make_error_code(keel::error::queue_full),
                             std::to_string(self->waiting) + " commands already waiting"));
    }
    std::shared_ptr<connection> c = self->current;
    if (!c) {
      const auto now = steady_clock::now();
      if (now < self->retry_at) {
        const auto left = std::chrono::duration_cast<milliseconds>(self->retry_at - now);
        std::rethrow_exception(self->make_failure(
            make_error_code(boost::system::errc::connection_refused),
            "unavailable (" + self->last_failure + "); next connection attempt in " +
                std::to_string(left.count()) + " ms"));
      }
      c = std::make_shared<connection>(self->ex);
      self->current = c;
      asio::co_spawn(self->ex, connect(self, c), asio::detached);
    }
    auto p = std::make_shared<pending>(self->ex);
    append_command(c->out, args);
    c->sent.push_back(p);
    ++self->commands;
    flush(self, c);
    ++self->waiting;
    struct leave {
      impl& i;
      ~leave() { --i.waiting; }
    } guard{*self};
    p->wake.expires_after(self->opts.command_timeout);
    boost::system::error_code ec;
    co_await p->wake.async_wait(asio::redirect_error(asio::use_awaitable, ec));
    if (p->done) {
      if (p->error) {
        std::rethrow_exception(p->error);
      }
      co_return std::move(*p->result);
    }
    p->abandoned = true;
    if (!ec) {
      // No reply in time: the connection is taken for gone (its reply may still come, and
      // the commands behind it would wait too); the next command reconnects.
      const auto code = keel::make_error_code(keel::error::deadline_exceeded);
      const std::string what =
          "no reply within " + std::to_string(self->opts.command_timeout.count()) + " ms";
      // Once per connection: the commands queued behind the first one time out together.
      auto e = c->dead ? self->make_failure(code, what) : self->back_off(code, what);
      self->fail(c, e);
      std::rethrow_exception(e);
    }
    throw boost::system::system_error(asio::error::operation_aborted);  // cancelled
  }
};

client::client(asio::any_io_executor ex, client_options options)
    : impl_(std::make_shared<impl>(std::move(ex), std::move(options))) {}

client::~client() {
  close();
}

void client::close() {
  if (impl_->current) {
    impl_->fail(impl_->current, std::make_exception_ptr(
                                    boost::system::system_error(asio::error::operation_aborted)));
  }
}

asio::awaitable<reply> client::command(std::vector<std::string> args) {
  return impl::run(impl_, std::move(args));
}

bool client::connected() const noexcept {
  return impl_->current && impl_->current->open && !impl_->current->dead;
}
std::uint64_t client::writes() const noexcept {
  return impl_->writes;
}
std::uint64_t client::connects() const noexcept {
  return impl_->connects;
}
std::uint64_t client::commands() const noexcept {
  return impl_->commands;
}

}  // namespace keel::redis
