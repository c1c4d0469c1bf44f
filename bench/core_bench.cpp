// Per-call cost of the core combinators on the success path, the throttler's queue, allocations
// per call and memory per suspended call. Run: build-bench/bench/bench_core
#include <keel/keel.hpp>
#include <keel/testing/manual_clock.hpp>

#include <benchmark/benchmark.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <malloc.h>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <new>

namespace asio = boost::asio;
using namespace std::chrono_literals;

// ---- allocation counting ----------------------------------------------------------------------
namespace {
std::atomic<long> g_allocs{0};
}  // namespace
void* operator new(std::size_t n) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) {
    return p;
  }
  throw std::bad_alloc();
}
// Asio's recycling allocator (coroutine frames, handlers, cancellation slots) falls back to
// std::aligned_alloc, not operator new, when its per-thread cache misses: count those too.
extern "C" void* aligned_alloc(std::size_t align, std::size_t n) noexcept {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  void* p = nullptr;
  return posix_memalign(&p, align < sizeof(void*) ? sizeof(void*) : align, n ? n : 1) == 0
             ? p
             : nullptr;
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

namespace {

asio::awaitable<int> leaf() {
  co_return 1;
}

// Runs `make_call()` once per benchmark iteration inside one coroutine; reports allocations per
// call (after the first 1,000 calls, so frame caches are warm).
template <class MakeCall>
void run_calls(benchmark::State& state, MakeCall make_call) {
  asio::io_context ctx;
  long allocs_before = 0;
  std::int64_t calls = 0;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 1000; ++i) {
          benchmark::DoNotOptimize(co_await make_call());
        }
        allocs_before = g_allocs.load();
        for (auto _ : state) {
          benchmark::DoNotOptimize(co_await make_call());
          ++calls;
        }
      },
      asio::detached);
  ctx.run();
  state.counters["allocs/call"] =
      calls ? static_cast<double>(g_allocs.load() - allocs_before) / static_cast<double>(calls) : 0;
}

void bm_bare_co_await(benchmark::State& state) {
  run_calls(state, [] { return leaf(); });
}
BENCHMARK(bm_bare_co_await);

void bm_with_retry(benchmark::State& state) {
  const auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
  run_calls(state, [&] { return keel::with_retry(leaf, policy); });
}
BENCHMARK(bm_with_retry);

void bm_with_breaker(benchmark::State& state) {
  asio::io_context ctx;
  keel::circuit_breaker breaker{ctx.get_executor(), keel::breaker_policy::consecutive(5, 60s)};
  run_calls(state, [&] { return keel::with_breaker(breaker, leaf); });
}
BENCHMARK(bm_with_breaker);

void bm_throttler_acquire_no_wait(benchmark::State& state) {
  asio::io_context ctx;
  keel::throttler bucket{ctx.get_executor(), {}};  // unlimited: never waits
  run_calls(state, [&]() -> asio::awaitable<int> {
    co_await bucket.acquire();
    co_return 1;
  });
}
BENCHMARK(bm_throttler_acquire_no_wait);

// The same acquire with a rate controller told of the send and of its answer (what every
// `keel batch` attempt does); a ceiling far above the call rate keeps the bucket from waiting.
void bm_paced_acquire_no_wait(benchmark::State& state) {
  asio::io_context ctx;
  keel::throttler bucket{ctx.get_executor(), {.requests_per_second = 1e9, .burst = 1e9}};
  keel::rate_controller_options o;
  o.max_requests_per_second = 1e9;
  keel::rate_controller pacing{bucket, o};
  run_calls(state, [&]() -> asio::awaitable<int> {
    co_await bucket.acquire();
    pacing.on_accepted(pacing.on_send());
    co_return 1;
  });
}
BENCHMARK(bm_paced_acquire_no_wait);

void bm_with_deadline(benchmark::State& state) {
  run_calls(state, [] { return keel::with_deadline(leaf, 10s); });
}
BENCHMARK(bm_with_deadline);

void bm_full_stack_without_deadline(benchmark::State& state) {
  asio::io_context ctx;
  keel::throttler bucket{ctx.get_executor(), {}};
  keel::circuit_breaker breaker{ctx.get_executor(), keel::breaker_policy::consecutive(5, 60s)};
  const auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
  auto paced = [&]() -> asio::awaitable<int> {
    co_await bucket.acquire();
    co_return 1;
  };
  run_calls(state, [&] {
    return keel::with_breaker(breaker, [&] { return keel::with_retry(paced, policy); });
  });
}
BENCHMARK(bm_full_stack_without_deadline);

asio::awaitable<int> suspending_leaf();

// breaker → retry (with `policy`, copied or shared) → deadline → throttler acquire → op, where
// the op returns at once or (Suspend) awaits `suspending_leaf()`.
template <bool Suspend, class Policy>
void run_full_stack(benchmark::State& state, const Policy& policy) {
  asio::io_context ctx;
  keel::throttler bucket{ctx.get_executor(), {}};
  keel::circuit_breaker breaker{ctx.get_executor(), keel::breaker_policy::consecutive(5, 60s)};
  auto paced = [&]() -> asio::awaitable<int> {
    co_await bucket.acquire();
    if constexpr (Suspend) {
      co_return co_await suspending_leaf();
    } else {
      co_return 1;
    }
  };
  run_calls(state, [&] {
    return keel::with_breaker(breaker, [&] {
      return keel::with_retry([&] { return keel::with_deadline(paced, 10s); }, policy);
    });
  });
}

void bm_full_stack(benchmark::State& state) {
  run_full_stack<false>(state, keel::retry_policy::exponential_full_jitter(5, 1s, 60s));
}
BENCHMARK(bm_full_stack);

// The same with the retry policy shared (shared_ptr<const retry_policy>) instead of copied.
std::shared_ptr<const keel::retry_policy> shared_policy() {
  return std::make_shared<const keel::retry_policy>(
      keel::retry_policy::exponential_full_jitter(5, 1s, 60s));
}

void bm_full_stack_shared_policy(benchmark::State& state) {
  run_full_stack<false>(state, shared_policy());
}
BENCHMARK(bm_full_stack_shared_policy);

// The success path's cost with an operation that suspends once (as every real request does):
// co_spawn, which with_deadline needs, then skips the extra post it makes for an operation that
// completes without suspending.
asio::awaitable<int> suspending_leaf() {
  co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
  co_return 1;
}

void bm_bare_suspending(benchmark::State& state) {
  run_calls(state, [] { return suspending_leaf(); });
}
BENCHMARK(bm_bare_suspending);

void bm_full_stack_suspending(benchmark::State& state) {
  run_full_stack<true>(state, shared_policy());
}
BENCHMARK(bm_full_stack_suspending);

// Heap bytes in use (every operator new here goes through malloc).
long heap_bytes() {
  return static_cast<long>(mallinfo2().uordblks);
}

// N coroutines queue on one throttler (virtual time); the clock then jumps so that every waiter
// can be granted: measures the queue's cost per grant and the memory per suspended call.
void bm_throttler_queue(benchmark::State& state) {
  using keel::testing::manual_clock;
  const auto n = static_cast<int>(state.range(0));
  double heap_per_waiter = 0;
  for (auto _ : state) {
    state.PauseTiming();
    manual_clock::reset();
    asio::io_context ctx;
    keel::basic_throttler<manual_clock> bucket{ctx.get_executor(),
                                               {.requests_per_second = 1e6, .burst = 1000}};
    int granted = 0;
    const long heap0 = heap_bytes();
    for (int i = 0; i < n; ++i) {
      asio::co_spawn(
          ctx,
          [&]() -> asio::awaitable<void> {
            co_await bucket.acquire();
            ++granted;
          },
          asio::detached);
    }
    keel::testing::poll_all(ctx);  // every coroutine is now suspended in the queue
    heap_per_waiter = static_cast<double>(heap_bytes() - heap0) / n;
    state.ResumeTiming();
    while (granted < n) {
      manual_clock::advance(1ms);  // 1,000 grants per virtual millisecond (rate 1e6/s, burst 1,000)
      keel::testing::poll_all(ctx);
    }
  }
  state.SetItemsProcessed(state.iterations() * n);
  state.counters["heap_bytes/waiter"] = heap_per_waiter;
}
BENCHMARK(bm_throttler_queue)->Arg(10000)->Arg(100000)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
