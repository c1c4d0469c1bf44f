// bench_shared_pacer: what sharing one rate limit through Redis costs (issue 16's targets: at
// most 0.1 Redis round trips per request at 1,000 requests/s; added latency p99 <= 1 ms per
// acquire on loopback).
//
// Usage: bench_shared_pacer [--processes P] [--rate R] [--limit L] [--seconds S] [--window-ms W]
//
// Starts its own redis-server (Debian's) on 127.0.0.1 and a free port. P "processes" (threads,
// each with its own io_context, Redis connection, shared_quota and shared_pacer, as separate
// processes would have) share one bucket of L tokens/s (burst L / 10). Each issues R / P
// acquires per second open-loop (one every P / R s, whether or not the last has finished) for S
// seconds. With R below L no acquire should wait for the rate, so an acquire's time is what the
// sharing adds: the local pool when it holds a token, a lease round trip when it does not.
// Reports requests, leases per request, acquire latency p50/p99/max, and the requests the
// bucket let through per second (which must stay within the limit).
#include <keel/redis/shared_quota.hpp>

#include "redis_support.hpp"

#include <fmt/core.h>
#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;

namespace {

struct process_result {
  std::vector<double> latency_ms;
  std::uint64_t leases = 0;
  std::uint64_t failed = 0;
};

void run_process(std::uint16_t port, double limit, double rate, double seconds,
                 std::chrono::milliseconds window, process_result& out) {
  asio::io_context ctx;
  keel::redis::client redis(ctx.get_executor(), keel_test::redis_options(port));
  keel::redis::shared_quota quota(
      redis, {.key = "keel:bench:fleet", .rate = limit, .burst = std::max(1.0, limit / 10)});
  keel::redis::shared_pacer pacer(quota, window);
  const auto every =
      std::chrono::duration_cast<clock_type::duration>(std::chrono::duration<double>(1.0 / rate));
  const auto end = clock_type::now() + std::chrono::duration_cast<clock_type::duration>(
                                           std::chrono::duration<double>(seconds));
  int running = 0;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        asio::steady_timer t(ctx);
        auto next = clock_type::now();
        while (next < end) {
          ++running;
          asio::co_spawn(
              ctx,
              [&]() -> asio::awaitable<void> {
                const auto t0 = clock_type::now();
                co_await pacer.acquire(1);
                out.latency_ms.push_back(
                    std::chrono::duration<double, std::milli>(clock_type::now() - t0).count());
              },
              [&](std::exception_ptr e) {
                out.failed += e ? 1 : 0;
                if (--running == 0 && clock_type::now() >= end) {
                  redis.close();
                }
              });
          next += every;
          t.expires_at(next);
          co_await t.async_wait(asio::use_awaitable);
        }
        if (running == 0) {
          redis.close();
        }
      },
      asio::detached);
  ctx.run();
  out.leases = pacer.leases();
}

double percentile(std::vector<double>& v, double p) {
  if (v.empty()) {
    return 0;
  }
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1,
                    static_cast<std::size_t>(p / 100 * static_cast<double>(v.size())))];
}

}  // namespace

int main(int argc, char** argv) {
  int processes = 4;
  double rate = 1000;
  double limit = 2000;
  double seconds = 5;
  int window_ms = 50;
  CLI::App app{"bench_shared_pacer: the cost of one rate limit shared through Redis"};
  app.add_option("--processes", processes)->check(CLI::Range(1, 64));
  app.add_option("--rate", rate, "requests per second, all processes together");
  app.add_option("--limit", limit, "the shared bucket's tokens per second");
  app.add_option("--seconds", seconds);
  app.add_option("--window-ms", window_ms, "lease window");
  CLI11_PARSE(app, argc, argv);

  keel_test::redis_process server;
  std::vector<process_result> results(static_cast<std::size_t>(processes));
  std::vector<std::thread> threads;
  const auto t0 = clock_type::now();
  for (int i = 0; i < processes; ++i) {
    threads.emplace_back([&, i] {
      run_process(server.port(), limit, rate / processes, seconds,
                  std::chrono::milliseconds(window_ms), results[static_cast<std::size_t>(i)]);
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  const double wall = std::chrono::duration<double>(clock_type::now() - t0).count();
  std::vector<double> all;
  std::uint64_t leases = 0, failed = 0;
  for (auto& r : results) {
    all.insert(all.end(), r.latency_ms.begin(), r.latency_ms.end());
    leases += r.leases;
    failed += r.failed;
  }
  const double n = static_cast<double>(all.size());
  fmt::print(
      "{{\"processes\":{},\"rate\":{},\"limit\":{},\"window_ms\":{},\"seconds\":{:.2f},"
      "\"requests\":{},\"failed\":{},\"leases\":{},\"leases_per_request\":{:.4f},"
      "\"requests_per_second\":{:.1f},\"acquire_ms\":{{\"p50\":{:.3f},\"p99\":{:.3f},\"max\":{:.3f}"
      "}}}}\n",
      processes, rate, limit, window_ms, wall, all.size(), failed, leases,
      n > 0 ? static_cast<double>(leases) / n : 0, n / wall, percentile(all, 50),
      percentile(all, 99), all.empty() ? 0 : *std::max_element(all.begin(), all.end()));
  return failed == 0 ? 0 : 1;
}
