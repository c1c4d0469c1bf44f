// keel::http::detail::tls_stream: a TLS client stream that drives OpenSSL over the socket itself.
//
// Decision: the client's TLS connections use this instead of `asio::ssl::stream`.
//
// Why: memory per connection (issue 15: 10,000 open streams). `asio::ssl::stream` keeps, for the
// stream's whole life, two 17 KiB vectors (`stream_core`'s input and output buffers) and an
// OpenSSL BIO pair whose two 17 KiB buffers are allocated when the pair is made: 68.5 KiB of an
// idle TLS stream's 108.7 KiB (measured, docs/BENCHMARKS.md "TLS per stream"), and none of it can
// be sized or released through its interface. Here the SSL object's BIO is the socket itself, and
// with `SSL_MODE_RELEASE_BUFFERS` OpenSSL holds its record buffers only while a record is in
// flight, so an idle connection costs OpenSSL's connection state and no buffer (the stream frees
// the read buffer itself before it waits, on OpenSSL versions where that is safe: see
// release_buffers). It also saves the two copies of every record through the BIO pair.
//
// How: each operation calls `SSL_read_ex` / `SSL_write_ex` / `SSL_do_handshake` first and, when
// OpenSSL wants the socket readable or writable, waits for that with `socket.async_wait` (the
// reactor's wait, no buffer) and calls again. Reads use OpenSSL's read-ahead (one `recv` takes
// what is there, not a 5-byte header and then the body). The BIO is keel's own (`recv` and
// `send(MSG_NOSIGNAL)`: OpenSSL's socket BIO uses `write(2)`, which raises SIGPIPE on a closed
// connection). A read that starts right after a write, with nothing buffered in OpenSSL, waits
// for readability before its first `recv` (the answer is rarely there yet; the wait re-arms the
// descriptor, so bytes already there are reported at once).
//
// Same results as `asio::ssl::stream`, so keel::http::normalize_error classifies them unchanged:
// a close_notify from the peer is `asio::error::eof`; the connection ending without one is
// `asio::ssl::error::stream_truncated`; a TLS failure is OpenSSL's first queued error in
// `asio::error::get_ssl_category()` (so a certificate that does not verify is
// SSL_R_CERTIFICATE_VERIFY_FAILED); a socket error is its errno in the system category (the
// same codes Asio's socket operations give, e.g. `connection_reset`).
//
// An operation that finishes without waiting completes through a post, never inside its
// initiating function (as Asio's own operations).
//
// Cancellation: per operation, through the waits it makes (terminal, partial and total, as
// `basic_socket::async_wait`): a cancelled operation completes with `operation_aborted` and
// whatever it did before the wait stands (for a write, OpenSSL may have taken part of a record;
// the connection should then be closed, as after any cancelled TLS write). `cancel()` on the
// socket aborts the waits the same way. At most one read and one write may be pending at once,
// and the stream must outlive its operations (as `asio::ssl::stream`).
//
// Destruction closes nothing by TLS (no close_notify is sent); a connection that did not fail is
// marked as ended properly (SSL_SENT_SHUTDOWN), so that OpenSSL keeps its session resumable.
//
// Not supported (the client does not use them): the server side, renegotiation started by keel,
// and a TLS shutdown (the client closes the socket; keel never reuses a connection after a
// cancelled or failed operation).
#pragma once

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/beast/core/tcp_stream.hpp>

#include <openssl/ssl.h>

#include <cstddef>
#include <utility>

namespace keel::http::detail {

class tls_stream {
 public:
  using executor_type = boost::beast::tcp_stream::executor_type;
  using next_layer_type = boost::beast::tcp_stream;

  /// A stream with its own TCP stream (not yet connected) and an SSL object from `ctx`. Throws
  /// `boost::system::system_error` if OpenSSL cannot make the SSL object. `ctx` must outlive
  /// the handshake.
  tls_stream(const executor_type& ex, boost::asio::ssl::context& ctx);
  ~tls_stream();
  tls_stream(const tls_stream&) = delete;
  tls_stream& operator=(const tls_stream&) = delete;

  /// The executor of the TCP stream.
  executor_type get_executor() noexcept { return next_.get_executor(); }
  /// The TCP stream: connect it before the handshake; closing its socket ends the connection.
  next_layer_type& next_layer() noexcept { return next_; }
  /// The SSL object (for SNI, the host name to verify, the verify result).
  SSL* native_handle() noexcept { return ssl_; }

  /// Performs the client handshake on the connected socket. Completion: `void(error_code)`.
  /// Cancellation: per operation (terminal, partial, total), through the socket wait; the
  /// connection is then unusable.
  template <class Token>
  auto async_handshake(Token&& token) {
    return boost::asio::async_compose<Token, void(boost::system::error_code)>(
        io_op<op_kind::handshake>{this, nullptr, 0}, token, next_.socket());
  }

  /// Reads some decrypted bytes into the first non-empty buffer of `buffers` (at most one TLS
  /// record's plaintext per call). Completion: `void(error_code, std::size_t)`; an empty buffer
  /// completes at once with 0. Cancellation: per operation, as `async_handshake`.
  template <class MutableBufferSequence, class Token>
  auto async_read_some(const MutableBufferSequence& buffers, Token&& token) {
    const boost::asio::mutable_buffer b = first_buffer<boost::asio::mutable_buffer>(buffers);
    return boost::asio::async_compose<Token, void(boost::system::error_code, std::size_t)>(
        io_op<op_kind::read>{this, b.data(), b.size()}, token, next_.socket());
  }

  /// True if nothing is buffered in OpenSSL (no plaintext, no unprocessed record bytes): the
  /// next bytes can only come from the socket, so a caller may wait for its readability
  /// (`next_layer().socket().async_wait`) holding no buffer.
  bool drained() const noexcept;
  /// Frees OpenSSL's record buffers if they hold nothing; call before a long wait. (The stream's
  /// own operations do before each wait for readability: SSL_MODE_RELEASE_BUFFERS alone does
  /// not, as OpenSSL 3.0 keeps the read buffer after a record it has consumed, 16.2 KiB per idle
  /// connection, measured.)
  void release_buffers() noexcept;

  /// Waits until the socket is readable, holding no buffer (OpenSSL's are freed first): for a
  /// caller that waits long between reads, when `drained()`. Completion: `void(error_code)`.
  /// Cancellation: as `basic_socket::async_wait` (terminal, partial, total).
  template <class Token>
  auto async_wait_readable(Token&& token) {
    wrote_ = false;  // the next read follows this wait, not the last write
    release_buffers();
    return next_.socket().async_wait(boost::asio::ip::tcp::socket::wait_read,
                                     std::forward<Token>(token));
  }

  /// Encrypts and sends some bytes of the first non-empty buffer of `buffers`. Completion:
  /// `void(error_code, std::size_t)` with how many plaintext bytes were taken. Cancellation:
  /// per operation, as `async_handshake` (after a cancelled write the connection must be
  /// closed: a record may be half sent).
  template <class ConstBufferSequence, class Token>
  auto async_write_some(const ConstBufferSequence& buffers, Token&& token) {
    const boost::asio::const_buffer b = first_buffer<boost::asio::const_buffer>(buffers);
    return boost::asio::async_compose<Token, void(boost::system::error_code, std::size_t)>(
        io_op<op_kind::write>{this, const_cast<void*>(b.data()), b.size()}, token, next_.socket());
  }

 private:
  enum class op_kind { handshake, read, write };
  enum class want { nothing, read, write };

  // Binds the SSL object to the socket at the first operation (the socket is opened by the
  // connect, which may try several endpoints). False if OpenSSL could not make the BIO.
  bool bind();
  // One call into OpenSSL: SSL_do_handshake, SSL_read_ex or SSL_write_ex. Returns what to wait
  // for before calling again, or want::nothing with `ec` and `n` set.
  want perform(op_kind kind, void* data, std::size_t size, boost::system::error_code& ec,
               std::size_t& n);

  template <class Buffer, class Sequence>
  static Buffer first_buffer(const Sequence& buffers) {
    for (auto it = boost::asio::buffer_sequence_begin(buffers);
         it != boost::asio::buffer_sequence_end(buffers); ++it) {
      Buffer b(*it);
      if (b.size() != 0) {
        return b;
      }
    }
    return Buffer();
  }

  template <op_kind Kind>
  struct io_op {
    tls_stream* s;
    void* data;
    std::size_t size;
    enum class stage { start, waiting, posted } at = stage::start;
    boost::system::error_code result_ec{};
    std::size_t result_n = 0;

    template <class Self>
    void operator()(Self& self, boost::system::error_code wait_ec = {}) {
      using boost::asio::ip::tcp;
      switch (at) {
        case stage::posted:
          finish(self);
          return;
        case stage::start:
          // Partial and total cancellation too, not only terminal (async_compose's default):
          // everything the operation has done before a wait stands, as with a socket's read.
          self.reset_cancellation_state(boost::asio::enable_total_cancellation());
          break;
        case stage::waiting:
          if (wait_ec) {
            done(self, wait_ec, 0);
            return;
          }
          // A cancellation emitted after the wait completed, before this resumed, found no
          // wait to cancel: honour it here rather than start another wait.
          if (self.cancelled() != boost::asio::cancellation_type::none) {
            done(self, boost::asio::error::operation_aborted, 0);
            return;
          }
          break;
      }
      const bool first = at == stage::start;
      if (size == 0 && Kind != op_kind::handshake) {
        post_result(self, {}, 0);  // as Asio: an empty buffer completes at once with 0
        return;
      }
      if constexpr (Kind == op_kind::read) {
        // Right after a write the answer is rarely there yet: wait before the first recv.
        const bool after_write = s->wrote_;
        s->wrote_ = false;
        if (first && after_write && s->drained()) {
          s->release_buffers();
          at = stage::waiting;
          s->next_.socket().async_wait(tcp::socket::wait_read, std::move(self));
          return;
        }
      }
      const want w = s->perform(Kind, data, size, result_ec, result_n);
      if (w != want::nothing) {
        if (w == want::read) {
          s->release_buffers();
        }
        at = stage::waiting;
        s->next_.socket().async_wait(
            w == want::read ? tcp::socket::wait_read : tcp::socket::wait_write, std::move(self));
        return;
      }
      if constexpr (Kind == op_kind::write) {
        s->wrote_ = !result_ec;
      }
      if (first) {
        post_result(self, result_ec, result_n);
        return;
      }
      done(self, result_ec, result_n);
    }

    // Completes from a later turn: never inside the initiating call.
    template <class Self>
    void post_result(Self& self, boost::system::error_code ec, std::size_t n) {
      result_ec = ec;
      result_n = n;
      at = stage::posted;
      boost::asio::post(std::move(self));
    }

    template <class Self>
    void done(Self& self, boost::system::error_code ec, std::size_t n) {
      result_ec = ec;
      result_n = n;
      finish(self);
    }

    // The handshake completes with the error only.
    template <class Self>
    void finish(Self& self) {
      if constexpr (Kind == op_kind::handshake) {
        self.complete(result_ec);
      } else {
        self.complete(result_ec, result_n);
      }
    }
  };

  boost::beast::tcp_stream next_;
  SSL* ssl_ = nullptr;
  bool bound_ = false;
  bool wrote_ = false;   // the last completed operation was a write
  bool eof_ = false;     // the socket returned end of file
  bool failed_ = false;  // OpenSSL reported a fatal error (SSL_ERROR_SSL or SSL_ERROR_SYSCALL)
  int last_errno_ = 0;   // the BIO's last recv/send error other than "would block"
  friend struct tls_bio;
};

}  // namespace keel::http::detail
