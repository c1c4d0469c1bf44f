// keel::http::detail::tls_stream: the BIO over the socket and the calls into OpenSSL (the design
// is in tls_stream.hpp).
#include "tls_stream.hpp"

#include <boost/asio/ssl/error.hpp>
#include <boost/system/system_error.hpp>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <sys/socket.h>

#include <cerrno>
#include <climits>

namespace keel::http::detail {

namespace asio = boost::asio;

// The SSL object's BIO: the stream's socket, read with recv(2) and written with
// send(2, MSG_NOSIGNAL), both non-blocking whatever the descriptor's mode.
struct tls_bio {
  static tls_stream& stream(BIO* b) { return *static_cast<tls_stream*>(BIO_get_data(b)); }

  static bool retryable(int e) { return e == EAGAIN || e == EWOULDBLOCK || e == EINTR; }

  static int write(BIO* b, const char* data, int len) {
    tls_stream& s = stream(b);
    BIO_clear_retry_flags(b);
    const ssize_t n = ::send(s.next_.socket().native_handle(), data, static_cast<std::size_t>(len),
                             MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) {
      return static_cast<int>(n);
    }
    s.last_errno_ = errno;
    if (retryable(s.last_errno_)) {
      s.last_errno_ = 0;
      BIO_set_retry_write(b);
    }
    return -1;
  }

  static int read(BIO* b, char* data, int len) {
    tls_stream& s = stream(b);
    BIO_clear_retry_flags(b);
    const ssize_t n =
        ::recv(s.next_.socket().native_handle(), data, static_cast<std::size_t>(len), MSG_DONTWAIT);
    if (n > 0) {
      return static_cast<int>(n);
    }
    if (n == 0) {
      s.eof_ = true;
      return 0;
    }
    s.last_errno_ = errno;
    if (retryable(s.last_errno_)) {
      s.last_errno_ = 0;
      BIO_set_retry_read(b);
    }
    return -1;
  }

  static long ctrl(BIO* b, int cmd, long /*num*/, void* /*ptr*/) {
    switch (cmd) {
      case BIO_CTRL_FLUSH:
        return 1;  // nothing is buffered here
      case BIO_CTRL_EOF:
        return stream(b).eof_ ? 1 : 0;  // lets OpenSSL report an unexpected EOF as such
      default:
        return 0;
    }
  }

  static BIO_METHOD* make() {
    const int index = BIO_get_new_index();
    BIO_METHOD* m =
        index == -1 ? nullptr : BIO_meth_new(index | BIO_TYPE_SOURCE_SINK, "keel socket");
    if (m == nullptr) {
      return nullptr;
    }
    if (BIO_meth_set_write(m, &write) != 1 || BIO_meth_set_read(m, &read) != 1 ||
        BIO_meth_set_ctrl(m, &ctrl) != 1) {
      BIO_meth_free(m);
      return nullptr;
    }
    return m;
  }

  // Made once per process and never freed (as OpenSSL's own methods). If OpenSSL cannot make
  // it (out of memory at the first TLS connection), every TLS connection fails to set up.
  static BIO_METHOD* method() {
    static BIO_METHOD* const m = make();
    return m;
  }
};

namespace {

boost::system::error_code ssl_error(unsigned long queued) {
  if (queued == 0) {
    return asio::ssl::error::unexpected_result;
  }
  return {static_cast<int>(queued), asio::error::get_ssl_category()};
}

}  // namespace

tls_stream::tls_stream(const executor_type& ex, asio::ssl::context& ctx)
    : next_(ex), ssl_(SSL_new(ctx.native_handle())) {
  if (ssl_ == nullptr) {
    throw boost::system::system_error(ssl_error(ERR_get_error()), "SSL_new");
  }
  SSL_set_mode(ssl_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                         SSL_MODE_RELEASE_BUFFERS);
  SSL_set_read_ahead(ssl_, 1);
  SSL_set_connect_state(ssl_);
}

tls_stream::~tls_stream() {
  // keel closes connections without a close_notify. Unless the connection failed, tell OpenSSL
  // it ended properly: otherwise SSL_free marks its session not resumable, and that session
  // (shared with the client's cache of sessions to resume) could never be offered again.
  if (!failed_ && SSL_is_init_finished(ssl_) == 1) {
    SSL_set_shutdown(ssl_, SSL_SENT_SHUTDOWN);
  }
  SSL_free(ssl_);
}

bool tls_stream::bind() {
  if (bound_) {
    return true;
  }
  BIO_METHOD* m = tls_bio::method();
  BIO* b = m != nullptr ? BIO_new(m) : nullptr;
  if (b == nullptr) {
    return false;
  }
  BIO_set_data(b, this);
  BIO_set_init(b, 1);
  SSL_set_bio(ssl_, b, b);  // one reference, owned by the SSL object
  bound_ = true;
  return true;
}

bool tls_stream::drained() const noexcept {
  return SSL_has_pending(ssl_) == 0;  // covers decrypted plaintext and raw record bytes
}

namespace {

// SSL_free_buffers freed a buffer still in use when only a record's header had arrived before
// OpenSSL 3.0.14, 3.1.6, 3.2.2 and 3.3.1 (CVE-2024-4741); with read-ahead a read can stop there.
// On those versions (and on any before 3.0) the buffers are left to SSL_MODE_RELEASE_BUFFERS.
bool free_buffers_safe() {
  const unsigned long v = OpenSSL_version_num();  // 0xMNN00PP0 from 3.0 on
  const unsigned long major = v >> 28;
  const unsigned long minor = (v >> 20) & 0xff;
  const unsigned long patch = (v >> 4) & 0xff;
  if (major != 3) {
    return major > 3;
  }
  switch (minor) {
    case 0:
      return patch >= 14;
    case 1:
      return patch >= 6;
    case 2:
      return patch >= 2;
    case 3:
      return patch >= 1;
    default:
      return true;
  }
}

}  // namespace

void tls_stream::release_buffers() noexcept {
  static const bool safe = free_buffers_safe();
  if (safe) {
    (void)SSL_free_buffers(ssl_);  // refuses (0) while a record is partly read or written
  }
}

tls_stream::want tls_stream::perform(op_kind kind, void* data, std::size_t size,
                                     boost::system::error_code& ec, std::size_t& n) {
  n = 0;
  ERR_clear_error();
  if (!bind()) {
    ec = ssl_error(ERR_get_error());
    ERR_clear_error();
    return want::nothing;
  }
  last_errno_ = 0;
  int r = 0;
  switch (kind) {
    case op_kind::handshake:
      r = SSL_do_handshake(ssl_);
      break;
    case op_kind::read:
      r = SSL_read_ex(ssl_, data, size, &n);
      break;
    case op_kind::write:
      r = SSL_write_ex(ssl_, data, size, &n);
      break;
  }
  if (r == 1) {
    ec = {};
    return want::nothing;
  }
  n = 0;
  const int err = SSL_get_error(ssl_, r);
  if (err == SSL_ERROR_WANT_READ) {
    return want::read;
  }
  if (err == SSL_ERROR_WANT_WRITE) {
    return want::write;
  }
  const unsigned long queued = ERR_get_error();
  ERR_clear_error();
  if (err == SSL_ERROR_SSL || err == SSL_ERROR_SYSCALL) {
    failed_ = true;
  }
  switch (err) {
    case SSL_ERROR_ZERO_RETURN:  // the peer's close_notify
      ec = asio::error::eof;
      break;
    case SSL_ERROR_SYSCALL:
      if (last_errno_ != 0) {
        ec = {last_errno_, boost::system::system_category()};
      } else if (queued != 0) {
        ec = ssl_error(queued);
      } else {
        ec = asio::ssl::error::stream_truncated;  // EOF, as OpenSSL 1.1 reported it
      }
      break;
    case SSL_ERROR_SSL:
      if (ERR_GET_LIB(queued) == ERR_LIB_SSL &&
          ERR_GET_REASON(queued) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ec = asio::ssl::error::stream_truncated;
      } else {
        ec = ssl_error(queued);
      }
      break;
    default:
      ec = asio::ssl::error::unexpected_result;
      break;
  }
  return want::nothing;
}

}  // namespace keel::http::detail
