// The success path allocates nothing beyond coroutine frames: a warmed-up call through retry,
// breaker and an uncontended throttler makes no operator new call, and the only other heap
// allocations are the frames Asio's two-slot recycling cache cannot hold.
// (Allocation counts are deterministic, so this is a test, not a benchmark.)
#include <keel/circuit_breaker.hpp>
#include <keel/deadline.hpp>
#include <keel/gateway/openai_wire.hpp>
#include <keel/llm/openai.hpp>
#include <keel/retry.hpp>
#include <keel/throttler.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>

// Sanitizer builds disable frame recycling and bring their own allocator: count nothing there.
#if !defined(BOOST_ASIO_DISABLE_AWAITABLE_FRAME_RECYCLING)
namespace {
std::atomic<long> allocations{0};
std::atomic<long> frame_cache_misses{0};
std::atomic<int> failing_aligned_allocs{0};  // makes the next N aligned_alloc calls fail
}  // namespace

// Asio's recycling allocator (coroutine frames, handlers, cancellation slots) keeps two freed
// blocks per purpose and thread; on a miss it calls std::aligned_alloc, not operator new.
extern "C" void* aligned_alloc(std::size_t align, std::size_t n) noexcept {
  frame_cache_misses.fetch_add(1, std::memory_order_relaxed);
  if (failing_aligned_allocs.load(std::memory_order_relaxed) > 0 &&
      failing_aligned_allocs.fetch_sub(1) > 0) {
    return nullptr;
  }
  void* p = nullptr;
  return posix_memalign(&p, align < sizeof(void*) ? sizeof(void*) : align, n ? n : 1) == 0
             ? p
             : nullptr;
}

void* operator new(std::size_t n) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) {
    return p;
  }
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  return ::operator new(n);
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept {
  return ::operator new(n, t);
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  std::free(p);
}

using namespace keel_test;

// Not registered in sanitizer builds: there every frame is a fresh allocation by design, so the
// test could only be skipped, and a test that cannot fail is worse than none.
TEST_CASE("a warm successful call through throttler, breaker and retry allocates only frames",
          "[allocation]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::basic_throttler<manual_clock> bucket{ctx.get_executor(), {}};
  keel::basic_circuit_breaker<manual_clock> breaker{ctx.get_executor(), keel::breaker_policy{}};
  const auto policy = keel::retry_policy::exponential_full_jitter(5, 1s, 60s);
  long before = 0, after = 0, misses_before = 0, misses_after = 0;
  int sum = 0;
  auto leaf = [&]() -> asio::awaitable<int> {
    co_await bucket.acquire();
    co_return 1;
  };
  auto body = [&]() -> asio::awaitable<void> {
    auto one_call = [&]() -> asio::awaitable<int> {
      co_return co_await keel::with_breaker(
          breaker, [&] { return keel::with_retry<manual_clock>(leaf, policy); });
    };
    for (int i = 0; i < 100; ++i) {  // warm the frame caches
      sum += co_await one_call();
    }
    before = allocations.load();
    misses_before = frame_cache_misses.load();
    for (int i = 0; i < 1000; ++i) {
      sum += co_await one_call();
    }
    after = allocations.load();
    misses_after = frame_cache_misses.load();
  };
  outcome<void> out;
  spawn(ctx, body(), out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  CHECK_FALSE(out.error);
  CHECK(sum == 1100);
  CHECK(after - before == 0);
  // The call is six nested coroutine frames (this loop's call, breaker, retry, the leaf, acquire
  // and its body) and Asio caches only two freed blocks per purpose and thread, so four frames
  // per call come from the heap: measured, and guarded here so that nothing else joins them.
  // (Defining BOOST_ASIO_RECYCLING_ALLOCATOR_CACHE_SIZE=16 for the whole program makes it zero;
  // see docs/BENCHMARKS.md.)
  CHECK(misses_after - misses_before <= 4 * 1000);
}

TEST_CASE("a deadline whose timer cannot be re-armed leaves the queue consistent",
          "[allocation][deadline][review]") {
  // Re-arming cancels the pending wait before starting the new one. If the new wait cannot be
  // allocated, the queue re-arms for the entries left; if that fails too, the timer must not
  // still count as armed: taking the last entry off would then give back work nobody took, and
  // run() would return with handlers still queued. Outside run() every Asio handler allocation
  // goes to aligned_alloc, so the failures land on the waits.
  using queue = keel::detail::deadline_queue<manual_clock>;
  using entry = keel::detail::deadline_entry<manual_clock>;
  static int fired = 0;
  for (const int failures : {1, 2}) {
    CAPTURE(failures);
    manual_clock::reset();
    fired = 0;
    entry late, early;
    late.fire = early.fire = [](entry*) noexcept { ++fired; };
    late.at = manual_clock::time_point{10s};
    early.at = manual_clock::time_point{1s};
    asio::io_context ctx;
    auto& q = queue::of(ctx.get_executor());
    REQUIRE(q.add(late, ctx.get_executor()));  // arms the timer for 10 s
    failing_aligned_allocs = failures;
    CHECK_THROWS_AS(q.add(early, ctx.get_executor()), std::bad_alloc);  // earlier: re-arm
    failing_aligned_allocs = 0;
    CHECK(q.size() == 1);  // `early` left nothing behind
    keel::testing::run_for(ctx, 20s, 100ms);
    if (failures == 1) {
      CHECK(fired == 1);            // the queue re-armed for `late`, which fired at its time
      CHECK_FALSE(q.remove(late));  // taken by the timer
    } else {
      CHECK(fired == 0);      // out of memory twice: nothing armed until a later add
      CHECK(q.remove(late));  // still queued; the owner takes it off
    }
    // The work count is intact: a posted handler runs before run() returns.
    ctx.restart();
    bool ran = false;
    asio::post(ctx, [&] { ran = true; });
    ctx.run();
    CHECK(ran);
  }
}
TEST_CASE("an OpenAI completion read without raw allocates only the strings it returns",
          "[llm][openai][allocation]") {
  // The mock's answer: the fast reader (lib/llm/json_scan.hpp) must take it, so only the
  // returned strings longer than the small-string buffer and the reply's own members allocate;
  // the tree takes dozens of blocks. A reader that declined would count as the tree does.
  keel::http::response res;
  res.status = 200;
  res.body =
      R"({"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":)"
      R"("mock answer to: Summarise the incident report in one lin","refusal":null,"role":)"
      R"("assistant"}}],"created":1796564567,"id":"chatcmpl-mock000000000001","model":)"
      R"("gpt-4o-mini","object":"chat.completion","system_fingerprint":"fp_mock","usage":)"
      R"({"completion_tokens":14,"prompt_tokens":11,"total_tokens":25}})";
  const auto now = std::chrono::system_clock::time_point{};
  auto count = [&](bool keep_raw) {
    const long before = allocations.load();
    const auto r = keel::llm::openai::parse_response(res, now, keep_raw);
    const long n = allocations.load() - before;
    CHECK(r.text == "mock answer to: Summarise the incident report in one lin");
    CHECK(r.id == "chatcmpl-mock000000000001");
    CHECK(r.usage.output == 14);
    return n;
  };
  const long tree = count(true);
  const long fast = count(false);
  CHECK(fast <= 2);  // text and id; model and finish_reason fit in the small-string buffer
  CHECK(tree >= 20);
}
TEST_CASE("the gateway reads the common request without a tree", "[gateway][allocation]") {
  // wrk's body in scripts/bench-serve.sh: read by the scanner, it allocates the message vector
  // and the prompt (longer than the small-string buffer); the tree takes dozens of blocks.
  const std::string body =
      R"({"model": "gpt-4o-mini", "max_tokens": 32, "messages": [{"role": "user", "content": )"
      R"("Summarise the incident report in one line."}]})";
  long before = allocations.load();
  const auto fast = keel::gateway::parse_chat_request(body);
  const long fast_n = allocations.load() - before;
  before = allocations.load();
  const auto tree = keel::gateway::detail::parse_chat_request_tree(body);
  const long tree_n = allocations.load() - before;
  REQUIRE(fast.request.messages.size() == 1);
  CHECK(fast.request.messages[0].content == tree.request.messages[0].content);
  CHECK(fast.request.max_tokens == 32);
  CHECK(fast_n <= 3);
  CHECK(tree_n >= 15);
}
#endif  // !BOOST_ASIO_DISABLE_AWAITABLE_FRAME_RECYCLING
