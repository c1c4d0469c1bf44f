// A redis-server of the test's own on 127.0.0.1 and a free port (Debian's redis-server package).
#pragma once

#include <keel/redis/client.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace keel_test {

/// A port on 127.0.0.1 that nothing listens on (bound to port 0, then closed).
inline std::uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    throw std::runtime_error("free_port: cannot bind 127.0.0.1:0");
  }
  ::close(fd);
  return ntohs(a.sin_port);
}

/// Options for a keel::redis::client of the server on 127.0.0.1:`port`, trying again
/// `reconnect_delay` after a failed connect.
inline keel::redis::client_options redis_options(
    std::uint16_t port,
    std::chrono::milliseconds reconnect_delay = keel::redis::client_options{}.reconnect_delay) {
  keel::redis::client_options o;
  o.server.port = port;
  o.reconnect_delay = reconnect_delay;
  return o;
}

/// redis-server arguments for TLS with `pki`'s server certificate and key (a keel_test::test_pki);
/// clients need no certificate of their own.
template <class Pki>
std::vector<std::string> tls_args(const Pki& pki) {
  return {"--tls-cert-file",    pki.server_cert_file, "--tls-key-file",     pki.server_key_file,
          "--tls-ca-cert-file", pki.ca_file,          "--tls-auth-clients", "no"};
}

/// redis-server on 127.0.0.1:`port()` with no persistence, killed when this is destroyed.
class redis_process {
 public:
  /// Starts it (extra arguments, e.g. {"--requirepass", "pw"}); waits until it accepts. With
  /// `tls`, `port()` is its TLS port (and it has no plain one): give the certificate files in
  /// `extra`.
  explicit redis_process(std::vector<std::string> extra = {}, bool tls = false)
      : port_(free_port()), extra_(std::move(extra)), tls_(tls) {
    // Another test may take the free port before redis-server binds it: try a few.
    for (int tries = 1;; ++tries) {
      try {
        start();
        return;
      } catch (const std::runtime_error&) {
        if (tries == 5) {
          throw;
        }
        port_ = free_port();
      }
    }
  }
  ~redis_process() { stop(); }
  redis_process(const redis_process&) = delete;
  redis_process& operator=(const redis_process&) = delete;

  std::uint16_t port() const { return port_; }

  /// Kills the server at once (SIGKILL: no goodbye to its clients).
  void stop() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

  /// Starts the server (again) on the same port, empty, and waits until it accepts.
  void start() {
    std::vector<std::string> args = {
        "redis-server", "--port", std::to_string(port_), "--bind", "127.0.0.1",  "--save", "",
        "--appendonly", "no",     "--protected-mode",    "no",     "--loglevel", "warning"};
    if (tls_) {
      args[2] = "0";  // no plain port
      args.insert(args.end(), {"--tls-port", std::to_string(port_)});
    }
    args.insert(args.end(), extra_.begin(), extra_.end());
    std::fflush(nullptr);  // or the child's copy of unflushed output is written twice
    pid_ = ::fork();
    if (pid_ < 0) {
      throw std::runtime_error("redis_process: fork failed");
    }
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) {
        argv.push_back(a.data());
      }
      argv.push_back(nullptr);
      const int null = ::open("/dev/null", O_WRONLY);
      ::dup2(null, 1);
      ::execvp("redis-server", argv.data());
      ::_exit(127);
    }
    // Waiting for another process to listen: the only wait of these tests that is not on the
    // io_context. At most 10 s.
    for (int i = 0; i < 1000; ++i) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error(
            "redis_process: redis-server exited at start (is it installed? Debian: redis-server)");
      }
      if (accepts()) {
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    throw std::runtime_error("redis_process: redis-server did not listen within 10 s");
  }

 private:
  bool accepts() const {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port_);
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    return ok;
  }

  std::uint16_t port_;
  std::vector<std::string> extra_;
  bool tls_ = false;
  pid_t pid_ = -1;
};

}  // namespace keel_test
