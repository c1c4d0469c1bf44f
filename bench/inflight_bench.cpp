// Issue 4, target 7: N concurrent in-flight calls through one throttler on one thread, in real
// time. Reports the resident memory per in-flight call and how close the granted rate comes to
// the configured rate.
//
//   build-bench/bench/bench_inflight --calls 100000 --rate 20000 --call acquire
//   build-bench/bench/bench_inflight --calls 100000 --rate 20000 --call full --latency-ms 50
//   build-bench/bench/bench_inflight --calls 100000 --rate 20000 --limit tokens --tokens 500
//
// A call is either `acquire` (just `co_await bucket.acquire(cost)`) or `full`: breaker → retry →
// deadline (60 s) → acquire → a simulated request that waits `--latency-ms` on its own timer.
// `breaker`, `retry` and `deadline` wrap acquire + simulated request in that one combinator, to
// show what each layer costs.
// Every call is spawned before the io_context runs, so all of them are in flight at once: queued
// in the throttler, or (for `full`) in the simulated request.
//
// Memory: resident set (/proc/self/statm) when every call has started and is suspended, minus
// the resident set just before spawning, divided by the number of calls. The grant timestamps
// are stored in a vector allocated and touched before the baseline, so they are not counted.
//
// Rate: the throttler's bucket starts full (capacity `--burst`), so the first `burst` calls go at
// once. The steady-state rate is measured from the first grant 100 ms after the last call has
// queued (so the up to `burst` tokens saved while the calls started are spent) to the last grant:
// (grants in that window - 1) / (its duration). The overall rate, from the start
// of `run()` to the last grant, is printed too; it includes the start-up work of N coroutines.
#include <keel/keel.hpp>

#include <fmt/core.h>
#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "bench_support.hpp"

namespace asio = boost::asio;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

namespace {

using keel_bench::resident_bytes;

struct run_options {
  int calls = 100'000;
  double rate = 20'000;  // requests (or calls, with --limit tokens) per second
  double burst = 0;      // 0: rate / 100, i.e. 10 ms of saving
  std::string call = "acquire";
  std::string limit = "requests";
  double tokens = 500;         // tokens per call with --limit tokens
  int latency_ms = 50;         // simulated request time for --call full
  bool shared_policy = false;  // with_retry shares one retry_policy instead of copying it
};

}  // namespace

int main(int argc, char** argv) {
  run_options o;
  CLI::App app{"N in-flight calls through one keel::throttler on one thread (issue 4, target 7)"};
  app.add_option("--calls", o.calls, "calls in flight at once")->check(CLI::Range(1, 10'000'000));
  app.add_option("--rate", o.rate, "configured calls per second")->check(CLI::PositiveNumber);
  app.add_option("--burst", o.burst, "bucket capacity in calls (0: rate/100)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--call", o.call, "what a call is")
      ->check(CLI::IsMember({"acquire", "breaker", "retry", "deadline", "full"}));
  app.add_option("--limit", o.limit, "which bucket limits")
      ->check(CLI::IsMember({"requests", "tokens"}));
  app.add_option("--tokens", o.tokens, "tokens per call with --limit tokens")
      ->check(CLI::PositiveNumber);
  app.add_flag("--shared-policy", o.shared_policy,
               "retry and full: pass the retry policy as shared_ptr<const retry_policy>");
  app.add_option("--latency-ms", o.latency_ms, "simulated request time of --call full")
      ->check(CLI::Range(0, 60'000));
  CLI11_PARSE(app, argc, argv);
  if (o.burst == 0) {
    o.burst = std::max(1.0, o.rate / 100);
  }

  asio::io_context ctx{1};
  keel::throttler_options topts;
  keel::throttle_cost cost;
  if (o.limit == "requests") {
    topts = {.requests_per_second = o.rate, .burst = o.burst};
  } else {
    topts = {.tokens_per_minute = o.rate * o.tokens * 60, .token_burst = o.burst * o.tokens};
    cost = {.requests = 1, .tokens = o.tokens};
  }
  keel::circuit_breaker breaker{ctx.get_executor(), keel::breaker_policy::consecutive(5, 60s)};
  const auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
  const auto shared_policy = std::make_shared<const keel::retry_policy>(policy);
  std::vector<steady::time_point> granted_at(static_cast<std::size_t>(o.calls));
  std::fill(granted_at.begin(), granted_at.end(), steady::time_point{});  // make it resident
  std::size_t granted = 0;
  int started = 0;
  int finished = 0;
  int failed = 0;
  steady::time_point all_queued{};
  long rss_in_flight = 0;

  // Constructed here (not before the vector) so that its bucket starts full when run() begins
  // rather than when the program started; the start-up of N coroutines still eats into it.
  std::optional<keel::throttler> bucket;
  bucket.emplace(ctx.get_executor(), topts);

  auto note_started = [&] {
    if (++started == o.calls) {
      all_queued = steady::now();
      rss_in_flight = resident_bytes();
    }
  };
  // Each variant is its own coroutine type, so that a frame holds only what that variant uses.
  auto paced = [&]() -> asio::awaitable<int> {
    note_started();
    co_await bucket->acquire(cost);
    granted_at[granted++] = steady::now();
    co_return 1;
  };
  auto paced_request = [&]() -> asio::awaitable<int> {
    note_started();
    co_await bucket->acquire(cost);
    granted_at[granted++] = steady::now();
    if (o.latency_ms > 0) {
      asio::steady_timer request{co_await asio::this_coro::executor,
                                 std::chrono::milliseconds(o.latency_ms)};
      co_await request.async_wait(asio::use_awaitable);
    }
    co_return 1;
  };
  auto spawn_all = [&](auto make_call) {
    for (int i = 0; i < o.calls; ++i) {
      asio::co_spawn(
          ctx,
          [&]() -> asio::awaitable<void> {
            try {
              co_await make_call();
            } catch (...) {
              ++failed;
            }
            ++finished;
          },
          asio::detached);
    }
  };

  const long rss_before = resident_bytes();
  const auto spawn_start = steady::now();
  if (o.call == "acquire") {
    spawn_all(paced);
  } else if (o.call == "breaker") {
    spawn_all([&] { return keel::with_breaker(breaker, paced_request); });
  } else if (o.call == "retry" && o.shared_policy) {
    spawn_all([&] { return keel::with_retry(paced_request, shared_policy); });
  } else if (o.call == "retry") {
    spawn_all([&] { return keel::with_retry(paced_request, policy); });
  } else if (o.call == "deadline") {
    spawn_all([&] { return keel::with_deadline(paced_request, 60s); });
  } else if (o.shared_policy) {
    spawn_all([&] {
      return keel::with_breaker(breaker, [&] {
        return keel::with_retry([&] { return keel::with_deadline(paced_request, 60s); },
                                shared_policy);
      });
    });
  } else {
    spawn_all([&] {
      return keel::with_breaker(breaker, [&] {
        return keel::with_retry([&] { return keel::with_deadline(paced_request, 60s); }, policy);
      });
    });
  }
  const auto run_start = steady::now();
  ctx.run();
  const auto run_end = steady::now();

  // The steady-state window starts at the first grant after the last call queued.
  // By then the tokens saved while the coroutines started (at most `burst`) are spent.
  const auto first = std::lower_bound(
      granted_at.begin(), granted_at.begin() + static_cast<long>(granted), all_queued + 100ms);
  const auto in_window =
      static_cast<double>(granted_at.begin() + static_cast<long>(granted) - first);
  const double window_s =
      in_window > 1 ? std::chrono::duration<double>(granted_at[granted - 1] - *first).count() : 0;
  const double steady_rate = window_s > 0 ? (in_window - 1) / window_s : 0;
  const double overall_s =
      std::chrono::duration<double>(granted_at[granted - 1] - run_start).count();
  const double overall_rate =
      overall_s > 0 ? (static_cast<double>(granted) - o.burst) / overall_s : 0;
  const double per_call = static_cast<double>(rss_in_flight - rss_before) / o.calls;

  fmt::print("calls {} ({}), limit {} at {:.0f}/s, burst {:.0f}\n", o.calls, o.call, o.limit,
             o.rate, o.burst);
  fmt::print("finished {} failed {} granted {}\n", finished, failed, granted);
  fmt::print("spawn {:.1f} ms, run {:.3f} s\n",
             std::chrono::duration<double, std::milli>(run_start - spawn_start).count(),
             std::chrono::duration<double>(run_end - run_start).count());
  fmt::print("RSS before {:.1f} MiB, all in flight {:.1f} MiB: {:.0f} bytes per in-flight call\n",
             rss_before / 1048576.0, rss_in_flight / 1048576.0, per_call);
  fmt::print(
      "steady-state granted rate {:.1f}/s over {:.3f} s ({:.0f} grants): {:+.3f}% of "
      "configured\n",
      steady_rate, window_s, in_window, 100 * (steady_rate - o.rate) / o.rate);
  fmt::print("overall granted rate {:.1f}/s (after the initial burst): {:+.3f}% of configured\n",
             overall_rate, 100 * (overall_rate - o.rate) / o.rate);
  fmt::print(
      "json {{\"calls\":{},\"call\":\"{}\",\"shared_policy\":{},\"limit\":\"{}\",\"rate\":{},"
      "\"burst\":{},\"failed\":{},\"bytes_per_call\":{:.0f},\"steady_rate\":{:.2f},"
      "\"overall_rate\":{:.2f}}}\n",
      o.calls, o.call, o.shared_policy, o.limit, o.rate, o.burst, failed, per_call, steady_rate,
      overall_rate);
  return finished == o.calls && failed == 0 ? 0 : 1;
}
