// Issue 15: keel's memory per open stream: N streamed chat completions open at once on one thread.
//
//   ulimit -n 20000   # N client sockets here, N more in the mock's process
//   build-bench/bench/bench_stream_memory --streams 1000
//   build-bench/bench/bench_stream_memory --streams 10000 --census
//   build-bench/bench/bench_stream_memory --streams 1000 --tls
//
// The mock LLM server (keel::testing::mock_llm_server) runs in a child process (fork), so that
// none of its allocations are counted here. It streams every reply with `--chunk-latency-ms`
// between text chunks (default 1 s), so once the N streams have opened they sit idle between
// chunks for most of the time. This process runs one io_context on one thread with one
// keel::http::client (max_connections_per_host = N); each of N coroutines opens the stream
// (`client::open`), makes a `keel::llm::make_stream_decoder` and feeds it every piece
// `response_reader::read_some` returns, until the body ends.
//
// Memory per stream, at steady state: when every stream has opened and had its first piece,
// the program samples `mallinfo2().uordblks` (bytes the heap has handed out) and the resident
// set (/proc/self/statm) `--samples` times, one every `--sample-every-ms`, and reports each
// minus its value just before the N coroutines were spawned, divided by N (median, min and max
// of the samples). That counts everything a stream holds in this process: keel's reader,
// connection, parser and read buffer, the coroutine frames of `read_some` and below, the
// decoder, and this program's own coroutine frame and event vector (the census shows their
// sizes). It does not count the kernel's socket buffers, nor the mock's memory.
//
// `--census` adds a table of the live heap blocks by size that the spawn window created, net of
// those it freed (blocks allocated through operator new or aligned_alloc, which is where Asio
// puts coroutine frames and operations, and freed through operator delete or free, by usable
// size), listing the sizes that occur at least N/2 times, apart for operator new (objects) and
// aligned_alloc (Asio's coroutine frames and operations); it is how the frame sizes were read. The
// counting is done by the linker's --wrap on this program's and keel's static objects, so it never
// changes what is allocated.
//
// `--tls`: the child process also runs a TLS terminating proxy (a self-signed P-256 certificate
// made at start, TLS 1.3) in front of the mock, and the client speaks https:// to it (peer
// verification off). The proxy's memory is the child's, not counted. Above about 6,000 streams
// several such children share the proxy's port (SO_REUSEPORT), each under the descriptor limit
// (`--mock-processes` sets how many). The client resumes TLS sessions (its default; the JSON line
// says how many connections did); `--no-tls-resume` makes every connection a full handshake.
//
// Prints one JSON line at the end.
#include <keel/http/client.hpp>
#include <keel/llm/client.hpp>
#include <keel/llm/stream.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <fmt/core.h>
#include <CLI/CLI.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>

#include <openssl/evp.h>
#include <openssl/x509.h>

#include <cxxabi.h>
#include <execinfo.h>
#include <malloc.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "bench_support.hpp"

namespace asio = boost::asio;
using namespace std::chrono_literals;

// ---- census: counts blocks by usable size while `census_on` (see the top comment) ----
namespace {
constexpr std::size_t census_sizes = 1 << 17;  // usable sizes below 128 KiB, one slot each
// [0]: operator new / delete (objects); [1]: aligned_alloc / free (Asio's coroutine frames and
// operations: its recycling allocator calls aligned_alloc). The last slot: 128 KiB and more.
std::array<std::array<std::int64_t, census_sizes + 1>, 2> census_live{};
bool census_on = false;
// --census-where: the call stack of the first block of each size (backtrace(3); the binary
// exports its symbols so that backtrace_symbols can name keel's coroutines).
bool census_where = false;
constexpr int where_depth = 10;
std::map<std::pair<int, std::size_t>, std::vector<void*>>* census_stacks = nullptr;
thread_local bool in_census = false;

void census_add(int kind, void* p, std::int64_t sign) {
  if (census_on && p != nullptr) {
    const std::size_t size = std::min(malloc_usable_size(p), census_sizes);
    census_live[kind][size] += sign;
    if (census_where && sign > 0 && !in_census && census_stacks) {
      in_census = true;
      auto [it, fresh] = census_stacks->try_emplace({kind, size});
      if (fresh) {
        it->second.resize(where_depth);
        it->second.resize(static_cast<std::size_t>(backtrace(it->second.data(), where_depth)));
      }
      in_census = false;
    }
  }
}
}  // namespace

extern "C" {
void* __real__Znwm(std::size_t n);
void __real__ZdlPv(void* p) noexcept;
void __real__ZdlPvm(void* p, std::size_t n) noexcept;
void* __real_aligned_alloc(std::size_t a, std::size_t n) noexcept;
void __real_free(void* p) noexcept;

void* __wrap__Znwm(std::size_t n) {
  void* p = __real__Znwm(n);
  census_add(0, p, +1);
  return p;
}
void __wrap__ZdlPv(void* p) noexcept {
  census_add(0, p, -1);
  __real__ZdlPv(p);
}
void __wrap__ZdlPvm(void* p, std::size_t n) noexcept {
  census_add(0, p, -1);
  __real__ZdlPvm(p, n);
}
void* __wrap_aligned_alloc(std::size_t a, std::size_t n) noexcept {
  void* p = __real_aligned_alloc(a, n);
  census_add(1, p, +1);
  return p;
}
void __wrap_free(void* p) noexcept {
  census_add(1, p, -1);
  __real_free(p);
}
}

namespace {

using keel_bench::resident_bytes;

long heap_bytes() {
  return static_cast<long>(mallinfo2().uordblks);
}

struct run_options {
  int streams = 1000;
  int chunk_latency_ms = 1000;
  int chunk_bytes = 4;
  std::string format = "openai";
  int samples = 10;
  int sample_every_ms = 100;
  bool census = false;
  bool tls = false;
  bool no_tls_resume = false;
  bool client = false;
  int mock_processes = 0;  // 0: as many as the descriptor limit needs
};

// 40 bytes of prompt: the mock answers "mock answer to: " + them, 56 bytes of text.
const std::string prompt = "tell me about memory per stream, briefly";

using tcp = asio::ip::tcp;

// Copies bytes from `from` to `to` until either fails, then closes both.
template <class From, class To>
asio::awaitable<void> splice(From& from, To& to) {
  std::array<char, 16 * 1024> buf;
  for (;;) {
    auto [ec, n] =
        co_await from.async_read_some(asio::buffer(buf), asio::as_tuple(asio::use_awaitable));
    if (ec) {
      break;
    }
    auto [wec, wn] = co_await asio::async_write(to, asio::buffer(buf.data(), n),
                                                asio::as_tuple(asio::use_awaitable));
    if (wec) {
      break;
    }
  }
  boost::system::error_code ignored;
  from.lowest_layer().close(ignored);
  to.lowest_layer().close(ignored);
}

asio::awaitable<void> tls_session(tcp::socket s, asio::ssl::context& ctx, tcp::endpoint mock) {
  auto down = std::make_shared<asio::ssl::stream<tcp::socket>>(std::move(s), ctx);
  auto up = std::make_shared<tcp::socket>(down->get_executor());
  auto [hec] = co_await down->async_handshake(asio::ssl::stream_base::server,
                                              asio::as_tuple(asio::use_awaitable));
  auto [cec] = co_await up->async_connect(mock, asio::as_tuple(asio::use_awaitable));
  if (hec || cec) {
    co_return;
  }
  asio::co_spawn(
      down->get_executor(), [down, up]() -> asio::awaitable<void> { co_await splice(*up, *down); },
      asio::detached);
  co_await splice(*down, *up);
}

asio::awaitable<void> tls_accept(tcp::acceptor& acceptor, asio::ssl::context& ctx,
                                 tcp::endpoint mock) {
  for (;;) {
    auto [ec, s] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
    if (ec) {
      co_return;
    }
    asio::co_spawn(acceptor.get_executor(), tls_session(std::move(s), ctx, mock), asio::detached);
  }
}

// A self-signed P-256 certificate for 127.0.0.1 in `ctx`.
void self_signed(asio::ssl::context& ctx) {
  EVP_PKEY* key = EVP_EC_gen("P-256");
  X509* cert = X509_new();
  X509_set_version(cert, 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
  X509_gmtime_adj(X509_getm_notBefore(cert), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert), 24 * 3600);
  X509_set_pubkey(cert, key);
  X509_NAME_add_entry_by_txt(X509_get_subject_name(cert), "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("127.0.0.1"), -1, -1, 0);
  X509_set_issuer_name(cert, X509_get_subject_name(cert));
  X509_sign(cert, key, EVP_sha256());
  SSL_CTX_use_certificate(ctx.native_handle(), cert);
  SSL_CTX_use_PrivateKey(ctx.native_handle(), key);
  X509_free(cert);
  EVP_PKEY_free(key);
}

// Runs the mock in a child process; returns its port (0 on failure) and sets `child`. With TLS
// the proxy listens with SO_REUSEPORT, on `port_wanted` when it is not 0: several children then
// share one listening port and the kernel spreads the connections over them (a proxy holds 2
// descriptors per stream and the mock one more, so 10,000 streams need more than one process
// under this VM's hard limit of 20,000 descriptors per process).
unsigned short start_mock(const run_options& o, asio::ssl::context& tls_ctx,
                          unsigned short port_wanted, pid_t& child) {
  int fds[2];
  if (pipe(fds) != 0) {
    return 0;
  }
  child = fork();
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the benchmark
    close(fds[0]);
    asio::io_context ctx{1};
    keel::testing::mock_llm_server server{ctx};
    keel::testing::stream_settings s;
    s.chunk_latency = std::chrono::milliseconds(o.chunk_latency_ms);
    s.chunk_bytes = static_cast<std::size_t>(o.chunk_bytes);
    server.set_plan("*", keel::testing::fault_plan{}.with_stream(s));
    server.start();
    unsigned short port = server.port();
    tcp::acceptor acceptor{ctx};
    if (o.tls) {
      const tcp::endpoint at{asio::ip::make_address("127.0.0.1"), port_wanted};
      acceptor.open(at.protocol());
      acceptor.set_option(asio::detail::socket_option::boolean<SOL_SOCKET, SO_REUSEPORT>(true));
      acceptor.bind(at);
      acceptor.listen();
      asio::co_spawn(ctx,
                     tls_accept(acceptor, tls_ctx, {asio::ip::make_address("127.0.0.1"), port}),
                     asio::detached);
      port = acceptor.local_endpoint().port();
    }
    if (write(fds[1], &port, sizeof port) != sizeof port) {
      _exit(1);
    }
    close(fds[1]);
    ctx.run();
    _exit(0);
  }
  close(fds[1]);
  unsigned short port = 0;
  if (child < 0 || read(fds[0], &port, sizeof port) != sizeof port) {
    port = 0;
  }
  close(fds[0]);
  return port;
}

keel::http::request make_request(const run_options& o, const std::string& base) {
  keel::http::request req{"POST", base};
  req.set("content-type", "application/json");
  if (o.format == "openai") {
    req.url += "/v1/chat/completions";
    req.body =
        R"({"model":"m","stream":true,"messages":[{"role":"user","content":")" + prompt + R"("}]})";
  } else if (o.format == "anthropic") {
    req.url += "/v1/messages";
    req.body =
        R"({"model":"m","max_tokens":64,"stream":true,"messages":[{"role":"user","content":")" +
        prompt + R"("}]})";
  } else {
    req.url += "/model/m/converse-stream";
    req.body = R"({"messages":[{"role":"user","content":[{"text":")" + prompt + R"("}]}]})";
  }
  return req;
}

keel::llm::provider_kind kind_of(const std::string& format) {
  if (format == "openai") {
    return keel::llm::provider_kind::openai;
  }
  return format == "anthropic" ? keel::llm::provider_kind::anthropic
                               : keel::llm::provider_kind::bedrock;
}

template <class T>
T median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  run_options o;
  CLI::App app{"keel's memory per open stream: N streamed completions on one thread (issue 15)"};
  app.add_option("--streams", o.streams, "streams open at once")->check(CLI::Range(1, 100'000));
  app.add_option("--chunk-latency-ms", o.chunk_latency_ms, "the mock's delay between text chunks")
      ->check(CLI::Range(1, 60'000));
  app.add_option("--chunk-bytes", o.chunk_bytes, "reply text bytes per chunk")
      ->check(CLI::Range(1, 1'000'000));
  app.add_option("--format", o.format, "wire format")
      ->check(CLI::IsMember({"openai", "anthropic", "bedrock"}));
  app.add_option("--samples", o.samples, "memory samples at steady state")
      ->check(CLI::Range(1, 1000));
  app.add_option("--sample-every-ms", o.sample_every_ms, "time between samples")
      ->check(CLI::Range(1, 60'000));
  app.add_flag("--census", o.census, "print live heap blocks by size (see the source)");
  app.add_flag("--census-where", census_where,
               "with --census: the call stack of each size's first block");
  app.add_flag("--tls", o.tls, "https:// through a TLS proxy in the mock's process");
  app.add_flag("--no-tls-resume", o.no_tls_resume,
               "with --tls: every connection makes a full handshake (tls.resume_sessions off)");
  app.add_flag("--client", o.client,
               "each stream is a keel::llm::client::stream_call (the whole policy stack)");
  app.add_option("--mock-processes", o.mock_processes,
                 "with --tls: proxy processes sharing the port (default: as the fd limit needs)")
      ->check(CLI::Range(0, 64));
  CLI11_PARSE(app, argc, argv);

  // N sockets here (and N, or 3N with TLS, over the mock processes, which inherit this limit).
  rlimit nofile{};
  getrlimit(RLIMIT_NOFILE, &nofile);
  nofile.rlim_cur = nofile.rlim_max;
  setrlimit(RLIMIT_NOFILE, &nofile);
  if (nofile.rlim_cur < static_cast<rlim_t>(o.streams) + 64) {
    fmt::print(stderr, "bench_stream_memory: open-file limit {} is too low for {} streams\n",
               nofile.rlim_cur, o.streams);
    return 2;
  }

  // Mock processes: one, or with TLS as many as keep each under the limit with 10% to spare
  // for the kernel's uneven spreading (3 descriptors per stream: the proxy's two, the mock's).
  const auto limit = static_cast<long>(nofile.rlim_cur) - 64;
  const int processes = o.mock_processes > 0 ? o.mock_processes
                        : o.tls ? static_cast<int>((3L * o.streams * 11 / 10 + limit - 1) / limit)
                                : 1;
  std::vector<pid_t> mocks(static_cast<std::size_t>(processes), -1);
  // One certificate and one session-ticket key for all of them (made before the forks), so a
  // session one process issued resumes in another, as behind one load-balanced endpoint.
  asio::ssl::context tls_ctx{asio::ssl::context::tls_server};
  if (o.tls) {
    self_signed(tls_ctx);
  }
  unsigned short port = 0;
  for (pid_t& m : mocks) {
    const unsigned short p = start_mock(o, tls_ctx, port, m);
    if (p == 0 || (port != 0 && p != port)) {
      fmt::print(stderr, "bench_stream_memory: the mock did not start\n");
      return 1;
    }
    port = p;
  }
  const std::string base =
      (o.tls ? "https://127.0.0.1:" : "http://127.0.0.1:") + std::to_string(port);

  asio::io_context ctx{1};
  keel::http::client_options copts;
  copts.max_connections_per_host = static_cast<std::size_t>(o.streams);
  copts.tls.verify_peer = false;  // the proxy's certificate is self-signed
  copts.tls.resume_sessions = !o.no_tls_resume;
  keel::http::client client{ctx.get_executor(), copts};
  const keel::http::request req = make_request(o, base);
  const auto kind = kind_of(o.format);
  // --client: the configured client a newcomer writes (one entry, every policy default), with
  // shared pacing off so that N streams open at once (the pacing state is per bucket, not per
  // call, so it changes no memory per stream).
  // The configured client sends through `client` (the same options), so that the TLS sessions
  // it resumes are counted in `tls_sessions_resumed`.
  keel::llm::bucket_registry buckets(ctx.get_executor(), 1);
  std::unique_ptr<keel::llm::client> llm;
  if (o.client) {
    const std::string entry =
        o.format == "bedrock"
            ? R"({"api_type": "bedrock", "model": "m", "aws_region": "us-east-1", "base_url": ")" +
                  base + R"("})"
            : R"({"api_type": ")" + o.format + R"(", "model": "m", "api_key": "k", "base_url": ")" +
                  base + R"("})";
    keel::llm::client_options lo;
    lo.shared_pacing = false;
    lo.seed = 1;
    llm = std::make_unique<keel::llm::client>(
        ctx.get_executor(),
        keel::llm::parse_config("[" + entry + "]", "<bench>",
                                [](std::string_view) { return std::optional<std::string>{}; }),
        client, buckets, keel::llm::client_hooks{}, 1, lo);
  }

  int opened = 0;
  int first_piece = 0;
  int finished = 0;
  int failed = 0;
  int stream_errors = 0;
  std::string first_error;
  std::vector<long> heap_samples;
  std::vector<long> rss_samples;
  int open_at_sample_min = o.streams;

  auto stream = [&]() -> asio::awaitable<void> {
    if (llm) {
      ++opened;
      bool first = true;
      const keel::llm::call_outcome out =
          co_await llm->stream_call(keel::llm::chat_request::from_prompt("", prompt, 64),
                                    [&](const keel::llm::stream_delta&) -> asio::awaitable<void> {
                                      if (first) {
                                        ++first_piece;
                                        first = false;
                                      }
                                      co_return;
                                    });
      if (!out.error) {
        ++finished;
      } else if (failed++ == 0) {
        first_error = keel::llm::error_class(out.error);
      }
      co_return;
    }
    try {
      keel::http::response_reader body = co_await client.open(req);
      ++opened;
      auto decoder = keel::llm::make_stream_decoder(kind);
      std::vector<keel::llm::stream_event> events;
      bool first = true;
      while (auto piece = co_await body.read_some()) {
        if (first) {
          ++first_piece;
          first = false;
        }
        decoder->feed(*piece, events);
        for (const auto& e : events) {
          stream_errors += e.kind == keel::llm::stream_event_kind::error ? 1 : 0;
        }
        events.clear();
      }
      decoder->finish(events);
      for (const auto& e : events) {
        stream_errors += e.kind == keel::llm::stream_event_kind::error ? 1 : 0;
      }
      ++finished;
    } catch (const std::exception& e) {
      if (failed++ == 0) {
        first_error = e.what();
      }
    }
  };

  // One warm-up stream first, so that one-time allocations (the pool's map entry, the
  // reactor's first descriptor block, the decoder's statics) fall before the baseline.
  asio::co_spawn(ctx, stream(), asio::detached);
  ctx.run();
  ctx.restart();
  opened = first_piece = finished = failed = stream_errors = 0;

  for (auto& h : census_live) {
    std::fill(h.begin(), h.end(), 0);  // resident before the baseline
  }
  heap_samples.reserve(static_cast<std::size_t>(o.samples));
  rss_samples.reserve(static_cast<std::size_t>(o.samples));
  const long heap_before = heap_bytes();
  const long rss_before = resident_bytes();
  std::map<std::pair<int, std::size_t>, std::vector<void*>> stacks;
  census_stacks = &stacks;
  census_on = o.census;
  const auto start = std::chrono::steady_clock::now();
  double all_open_s = 0;
  for (int i = 0; i < o.streams; ++i) {
    asio::co_spawn(ctx, stream(), asio::detached);
  }
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        asio::steady_timer t{ctx};
        while (first_piece + failed < o.streams) {
          t.expires_after(10ms);
          co_await t.async_wait(asio::use_awaitable);
        }
        all_open_s =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        for (int i = 0; i < o.samples; ++i) {
          t.expires_after(std::chrono::milliseconds(o.sample_every_ms));
          co_await t.async_wait(asio::use_awaitable);
          heap_samples.push_back(heap_bytes() - heap_before);
          rss_samples.push_back(resident_bytes() - rss_before);
          open_at_sample_min = std::min(open_at_sample_min, opened - finished - failed);
        }
        census_on = false;
      },
      asio::detached);
  ctx.run();
  for (const pid_t m : mocks) {
    kill(m, SIGKILL);
    waitpid(m, nullptr, 0);
  }

  const double n = o.streams;
  if (o.census) {
    fmt::print("live heap blocks made in the window, by usable size, occurring >= N/2 times:\n");
    fmt::print("{:>14} {:>10} {:>10} {:>12}\n", "via", "usable", "per stream", "bytes/stream");
    for (int via = 0; via < 2; ++via) {
      for (std::size_t s = 0; s <= census_sizes; ++s) {
        const auto live = static_cast<double>(census_live[via][s]);
        if (live >= n / 2) {
          fmt::print("{:>14} {:>10}{} {:>10.2f} {:>12.0f}\n",
                     via == 0 ? "operator new" : "aligned_alloc", s, s == census_sizes ? "+" : " ",
                     live / n, live * static_cast<double>(s) / n);
          if (census_where && census_stacks) {
            if (auto it = census_stacks->find({via, s}); it != census_stacks->end()) {
              char** names =
                  backtrace_symbols(it->second.data(), static_cast<int>(it->second.size()));
              for (std::size_t f = 2; names && f < it->second.size(); ++f) {
                std::string name = names[f];
                const auto open = name.find('(');
                const auto plus = name.find('+', open);
                if (open != std::string::npos && plus != std::string::npos && plus > open + 1) {
                  int status = 0;
                  const std::string mangled = name.substr(open + 1, plus - open - 1);
                  if (char* d = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status)) {
                    name = d;
                    std::free(d);
                  }
                }
                fmt::print("{:>50}{}\n", "", name.substr(0, 160));
              }
              std::free(names);
            }
          }
        }
      }
    }
  }
  if (failed > 0) {
    fmt::print(stderr, "bench_stream_memory: {} streams failed; first: {}\n", failed, first_error);
  }
  const bool all_open = open_at_sample_min == o.streams;
  fmt::print(
      "{{\"streams\":{},\"client\":{},\"tls\":{},\"format\":\"{}\",\"chunk_latency_ms\":{},\"all_"
      "open_at_"
      "samples\":{},"
      "\"seconds_to_first_pieces\":{:.2f},\"heap_bytes_per_stream\":{{\"median\":{:.0f},\"min\":{:."
      "0f},\"max\":{:.0f}}},\"rss_bytes_per_stream\":{{\"median\":{:.0f},\"min\":{:.0f},\"max\":{:."
      "0f}}},\"finished\":{},\"failed\":{},\"stream_errors\":{},\"tls_sessions_resumed\":{},"
      "\"mock_processes\":{}}}\n",
      o.streams, o.client, o.tls, o.format, o.chunk_latency_ms, all_open, all_open_s,
      static_cast<double>(median(heap_samples)) / n,
      static_cast<double>(*std::min_element(heap_samples.begin(), heap_samples.end())) / n,
      static_cast<double>(*std::max_element(heap_samples.begin(), heap_samples.end())) / n,
      static_cast<double>(median(rss_samples)) / n,
      static_cast<double>(*std::min_element(rss_samples.begin(), rss_samples.end())) / n,
      static_cast<double>(*std::max_element(rss_samples.begin(), rss_samples.end())) / n, finished,
      failed, stream_errors, client.tls_sessions_resumed(), processes);
  return failed == 0 && stream_errors == 0 && all_open ? 0 : 1;
}
