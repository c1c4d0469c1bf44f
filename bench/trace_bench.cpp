// Issue 17: what tracing costs. The span operations of one call site with tracing off (a null
// span), with the trace not sampled, and recorded; and one keel::llm::client call against the
// in-process mock over loopback with no tracer, a tracer sampling nothing, and one sampling
// everything. Built without <keel/trace.hpp> (an older tree) only the "no tracer" call runs, for
// the before/after comparison in docs/BENCHMARKS.md. Run: build-rel/bench/bench_trace
#include <keel/llm/client.hpp>
#include <keel/testing/mock_llm_server.hpp>

#if __has_include(<keel/trace.hpp>)
#include <keel/trace.hpp>
#define KEEL_BENCH_TRACE 1
#else
#define KEEL_BENCH_TRACE 0
#endif

#include <benchmark/benchmark.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>

#include <optional>
#include <string>

namespace asio = boost::asio;

namespace {

#if KEEL_BENCH_TRACE
// Drops every batch (the cost measured is keel's, not an exporter's).
struct discard : keel::trace::exporter {
  asio::awaitable<void> export_spans(const keel::trace::resource&,
                                     std::vector<keel::trace::span_data>) override {
    co_return;
  }
};

// What a call site does to its span: a dozen attributes and two events.
void annotate(keel::trace::span& s) {
  s.set("gen_ai.operation.name", "chat");
  s.set("gen_ai.provider.name", "openai");
  s.set("gen_ai.request.model", "gpt-4o-mini");
  s.set("gen_ai.request.max_tokens", 64);
  s.set("server.port", std::int64_t{443});
  s.set("keel.entry", 0);
  s.set("keel.attempt", 1);
  s.set("keel.throttle_wait_ms", 0.5);
  s.set("http.response.status_code", 200);
  s.set("gen_ai.usage.input_tokens", std::int64_t{12});
  s.set("gen_ai.usage.output_tokens", std::int64_t{34});
  // Events under `recording()`, as keel's call sites build them (their attribute lists
  // allocate).
  if (s.recording()) {
    s.add_event("keel.retry", {{"keel.attempt", 1}, {"keel.delay_ms", 12.5}});
    s.add_event("keel.fallback", {{"keel.from", 0}, {"keel.to", 1}});
  }
}

void BM_span_null(benchmark::State& state) {
  for (auto _ : state) {
    keel::trace::span s;  // no tracer: what every call site does with tracing off
    annotate(s);
    s.end();
    benchmark::DoNotOptimize(s);
  }
}
BENCHMARK(BM_span_null);

void BM_span_not_sampled(benchmark::State& state) {
  asio::io_context ctx;
  discard out;
  keel::trace::tracer tracer(ctx.get_executor(), out, {.sample_ratio = 0, .seed = 1});
  for (auto _ : state) {
    keel::trace::span s = tracer.start("chat gpt-4o-mini", keel::trace::span_kind::client);
    annotate(s);
    s.end();
    benchmark::DoNotOptimize(s);
  }
}
BENCHMARK(BM_span_not_sampled);

void BM_span_recorded(benchmark::State& state) {
  asio::io_context ctx;
  discard out;
  keel::trace::tracer tracer(ctx.get_executor(), out, {.max_queue = 1 << 20, .seed = 1});
  std::size_t n = 0;
  for (auto _ : state) {
    keel::trace::span s = tracer.start("chat gpt-4o-mini", keel::trace::span_kind::client);
    annotate(s);
    s.end();
    if (++n % 4096 == 0) {
      state.PauseTiming();
      ctx.poll();  // the export loop drains the queue
      state.ResumeTiming();
    }
  }
}
BENCHMARK(BM_span_recorded);
#endif

// One client call at a time against the mock (no latency, no faults) on one thread.
// mode 0: no tracer; 1: a tracer sampling nothing; 2: a tracer sampling every call.
void BM_client_call(benchmark::State& state) {
  const int mode = static_cast<int>(state.range(0));
  asio::io_context ctx;
  keel::testing::mock_llm_server mock(ctx, {.seed = 1});
  mock.start();
  auto cfg = keel::llm::parse_config(
      R"([{"model": "m", "api_key": "sk-bench", "base_url": ")" + mock.base_url() + R"("}])",
      "<bench>", [](std::string_view) { return std::optional<std::string>{}; });
  keel::llm::client_options co;
  co.seed = 1;
#if KEEL_BENCH_TRACE
  discard out;
  keel::trace::tracer tracer(ctx.get_executor(), out,
                             {.sample_ratio = mode == 2 ? 1.0 : 0.0, .max_queue = 1 << 20});
  if (mode > 0) {
    co.tracer = &tracer;
  }
#else
  if (mode > 0) {
    state.SkipWithError("built without keel/trace.hpp");
    return;
  }
#endif
  keel::llm::client client(ctx.get_executor(), cfg, {}, co);
  const auto req = keel::llm::chat_request::from_prompt("", "hello", 16);
  bool failed = false;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        for (auto _ : state) {
          keel::llm::call_outcome o = co_await client.call(req);
          failed = failed || !o.response;
        }
        mock.stop();
        ctx.stop();
      },
      asio::detached);
  ctx.run();
  if (failed) {
    state.SkipWithError("a call failed");
  }
}
BENCHMARK(BM_client_call)->Arg(0)->Arg(1)->Arg(2)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
