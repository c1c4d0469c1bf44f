// Issue 15: hedging against a heavy tail. "Against a mock where 5% of calls take 10x the median,
// hedging at the p95 delay cuts p99 latency (or p99 TTFT for streams) by >= 3x with <= 6% extra
// attempts; losers are cancelled within 1 ms of the winner (measured on the mock's counters)."
//
//   build-rel/bench/bench_hedge                                # 2,000 calls, c = 64
//   build-rel/bench/bench_hedge --stream                       # p99 time to first token
//   build-rel/bench/bench_hedge --fixed-delay-ms 40 --variants off,p95,fixed
//   build-rel/bench/bench_hedge --pin                          # mock on CPU 0, client on CPU 1
//
// The mock LLM server (keel::testing::mock_llm_thread) runs in this process on its own thread
// and io_context, with a fixed latency (`--latency-ms`, 20) before every answer and a seeded
// `--tail-fraction` (0.05) of requests waiting `--tail-ms` (200) instead (`fault_plan::with_tail`;
// for a stream the latency comes before the head, so it delays the first token). The client runs
// one io_context on the main thread with one `keel::http::client` (pool: 2C + 8 connections, so
// that a hedge never queues for a connection) and C coroutines that take calls from a shared
// counter until N have been made. Each call is an OpenAI chat completion `send` (checked: status
// 200), or with `--stream` an `open` whose body goes through `keel::llm::make_stream_decoder`
// until the end; the first text delta is the attempt's commit point (`hedge_attempt::commit`).
//
// Variants, each against a fresh mock (same seed) and a fresh client, budget and window:
//   off    no hedging: the attempt is awaited as it is;
//   p95    `keel::with_hedge` with a shared `keel::latency_window` (the delay is its
//          `--percentile`th percentile, 95) and a shared `keel::hedge_budget` (library
//          defaults: 5% of calls, capacity 10), 2 attempts;
//   fixed  the same with a fixed delay, `--fixed-delay-ms`.
// Every call has a model name of its own ("c<i>"; the mock's plan "*" applies to all), so the
// mock's response log can be matched to the calls without any header; the mock draws its tail
// from a generator per model seeded from the server seed and the model, so with the same seed
// the same primaries are slow in every variant (a paired comparison) and a hedge's own draw is
// independent of its primary's. `--warmup` calls (models "w<i>", default 200) run first and are
// not counted; they fill the latency window and let the budget settle. The mock's statistics are
// reset after them.
//
// Printed per variant: latency p50/p95/p99/max (for `--stream`: time to first token, plus the
// whole call's p99), attempts per call, hedges started, budget refusals, the hedge delays used
// (the window's percentile at each call's start), and from the mock's response log, for every
// call with two attempts: whether the loser was abandoned (the mock saw its connection close
// before the last byte: the client closed it, it was not put back in the pool), and the time from
// the winner's completion (mock: `completed_at`, for a stream `first_byte_at`; client: the
// instant the winning attempt committed) to the loser's `closed_by_client_at`, p50/p99/max; and
// that client gap in two parts: from the winner's commit to the loser's failure reaching this
// program ("unwound": keel's with_hedge and HTTP client cancelling the loser, which closes its
// connection as it unwinds; JSON `loser_unwound_ms`), and from there to the mock seeing the close
// (the kernel and the mock's thread; JSON `close_seen_ms`). One JSON line per variant at the end.
#include <keel/hedge.hpp>
#include <keel/http/client.hpp>
#include <keel/llm/stream.hpp>
#include <keel/testing/mock_llm_thread.hpp>

#include <fmt/core.h>
#include <CLI/CLI.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <pthread.h>
#include <sched.h>
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace asio = boost::asio;
using steady = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

struct run_options {
  int calls = 2000;
  int concurrency = 64;
  int warmup = 200;
  int latency_ms = 20;
  double tail_fraction = 0.05;
  int tail_ms = 200;
  double percentile = 95;
  int fixed_delay_ms = 40;
  double budget_ratio = 0.05;
  double budget_capacity = 10;
  std::uint64_t seed = 1;
  bool stream = false;
  bool pin = false;
  std::vector<std::string> variants{"off", "p95"};
};

// What one call saw, client side. Attempts write into it; the call outlives them.
struct call_record {
  bool ok = false;
  int attempts = 0;
  std::size_t winner = 0;
  steady::time_point start{};
  steady::time_point committed_at{};  // the winning attempt's commit (first token or response)
  steady::time_point end{};           // the call returned
  std::chrono::nanoseconds delay{0};  // the hedge delay this call used
  // When each attempt's failure reached this program: for a cancelled loser, its connection
  // has been closed by then (the client closes it as the exception leaves its frames).
  std::array<steady::time_point, 2> failed_at{};
};

double ms(steady::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

// Nearest-rank percentile of sorted values (0 for none).
double pct(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) {
    return 0;
  }
  auto rank = static_cast<std::size_t>(std::ceil(p / 100.0 * static_cast<double>(sorted.size())));
  rank = std::clamp<std::size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

keel::http::request make_request(const std::string& base, const std::string& model, bool stream) {
  keel::http::request req{"POST", base + "/v1/chat/completions"};
  req.set("content-type", "application/json");
  req.body = R"({"model":")" + model + R"(",)" + (stream ? R"("stream":true,)" : "") +
             R"("messages":[{"role":"user","content":"hedge me if I am slow"}]})";
  return req;
}

[[noreturn]] void aborted() {
  throw boost::system::system_error(asio::error::operation_aborted);
}

// One attempt: a whole response, committed (by with_hedge) when it returns.
asio::awaitable<std::size_t> unary_attempt(keel::http::client& client,
                                           const keel::http::request& req, keel::hedge_attempt& h,
                                           call_record& rec) {
  keel::http::response res = co_await client.send(req);
  if (res.status != 200) {
    throw std::runtime_error("status " + std::to_string(res.status));
  }
  // with_hedge commits this attempt when it returns, unless another one already won: then the
  // value is dropped, and so is this instant (the winner's is recorded by the call).
  if (rec.committed_at == steady::time_point{}) {
    rec.committed_at = steady::now();
  }
  co_return h.index();
}

// One streamed attempt: commits at its first text delta, then reads the stream to its end.
asio::awaitable<std::size_t> stream_attempt(keel::http::client& client,
                                            const keel::http::request& req, keel::hedge_attempt& h,
                                            call_record& rec) {
  keel::http::response_reader body = co_await client.open(req);
  if (body.head().status != 200) {
    throw std::runtime_error("status " + std::to_string(body.head().status));
  }
  auto decoder = keel::llm::make_stream_decoder(keel::llm::provider_kind::openai);
  std::vector<keel::llm::stream_event> events;
  bool committed = false;
  auto look = [&] {
    for (const auto& e : events) {
      if (e.kind == keel::llm::stream_event_kind::error) {
        throw std::runtime_error("stream error event");
      }
      if (!committed && e.kind == keel::llm::stream_event_kind::text) {
        if (!h.commit()) {
          aborted();  // another attempt won
        }
        committed = true;
        rec.committed_at = steady::now();
      }
    }
    events.clear();
  };
  while (auto piece = co_await body.read_some()) {
    decoder->feed(*piece, events);
    look();
  }
  decoder->finish(events);
  look();
  if (!committed) {
    throw std::runtime_error("stream without text");
  }
  co_return h.index();
}

// Binds the calling thread to one CPU (`--pin`).
void pin_to(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// Runs an attempt and notes when it failed (a loser: once its frames, and so its connection, are
// gone).
asio::awaitable<std::size_t> noting_failure(asio::awaitable<std::size_t> attempt,
                                            steady::time_point& failed_at) {
  try {
    co_return co_await std::move(attempt);
  } catch (...) {
    failed_at = steady::now();
    throw;
  }
}

struct variant_result {
  std::string name;
  std::vector<call_record> calls;
  std::uint64_t hedges = 0;
  std::uint64_t refusals = 0;
  int failed = 0;
  std::string first_error;
  double wall_s = 0;
  keel::testing::mock_stats stats;
};

variant_result run_variant(const run_options& o, const std::string& variant) {
  variant_result out;
  out.name = variant;
  keel::testing::mock_options mo;
  mo.seed = o.seed;
  mo.response_log = static_cast<std::size_t>(o.calls) * 3 + 64;
  if (o.pin) {
    pin_to(0);  // the mock's thread inherits this
  }
  keel::testing::mock_llm_thread mock{mo, [&](keel::testing::mock_llm_server& s) {
                                        keel::testing::fault_plan plan;
                                        plan.with_latency(std::chrono::milliseconds(o.latency_ms))
                                            .with_tail(o.tail_fraction,
                                                       std::chrono::milliseconds(o.tail_ms));
                                        s.set_plan("*", plan);
                                      }};
  const std::string base = mock.base_url();
  if (o.pin) {
    pin_to(1);
  }

  asio::io_context ctx{1};
  keel::http::client_options copts;
  copts.max_connections_per_host = static_cast<std::size_t>(o.concurrency) * 2 + 8;
  keel::http::client client{ctx.get_executor(), copts};

  keel::hedge_budget budget{o.budget_ratio, o.budget_capacity};
  keel::latency_window window;
  keel::hedge_policy policy;
  policy.max_attempts = variant == "off" ? 1 : 2;
  policy.budget = &budget;
  if (variant == "p95") {
    policy.latency = &window;
    policy.percentile = o.percentile;
  } else {
    policy.delay = std::chrono::milliseconds(o.fixed_delay_ms);
  }
  std::uint64_t hedges = 0;
  policy.on_hedge = [&hedges](const keel::hedge_event&) { ++hedges; };

  std::vector<call_record> warm(static_cast<std::size_t>(o.warmup));
  std::vector<call_record> calls(static_cast<std::size_t>(o.calls));
  int failed = 0;
  std::string first_error;

  auto one_call = [&](std::vector<call_record>& recs, int i,
                      const std::string& model) -> asio::awaitable<void> {
    call_record& rec = recs[static_cast<std::size_t>(i)];
    const keel::http::request req = make_request(base, model, o.stream);
    auto attempt = [&](keel::hedge_attempt& h) {
      ++rec.attempts;
      return noting_failure(
          o.stream ? stream_attempt(client, req, h, rec) : unary_attempt(client, req, h, rec),
          rec.failed_at[std::min<std::size_t>(h.index(), 1)]);
    };
    rec.start = steady::now();
    try {
      if (variant == "off") {
        keel::hedge_attempt alone;
        rec.winner = co_await attempt(alone);
      } else {
        // What with_hedge will choose (the same query: the window is not changed in between).
        rec.delay = policy.delay;
        if (policy.latency) {
          if (auto p = window.percentile(policy.percentile, policy.min_samples)) {
            rec.delay = *p;
          }
        }
        rec.winner = co_await keel::with_hedge(attempt, policy);
      }
      rec.ok = true;
    } catch (const std::exception& e) {
      if (failed++ == 0) {
        first_error = e.what();
      }
    }
    rec.end = steady::now();
  };

  auto phase = [&](std::vector<call_record>& recs, const char* prefix) {
    int next = 0;
    const int n = static_cast<int>(recs.size());
    for (int w = 0; w < o.concurrency; ++w) {
      asio::co_spawn(
          ctx,
          [&]() -> asio::awaitable<void> {
            for (int i = next++; i < n; i = next++) {
              co_await one_call(recs, i, prefix + std::to_string(i));
            }
          },
          asio::detached);
    }
    ctx.run();
    ctx.restart();
  };

  phase(warm, "w");
  std::this_thread::sleep_for(100ms);  // the mock logs the warm-up's last closes
  mock.server().reset_stats();
  failed = 0;
  const std::uint64_t refused_before = budget.denied();
  hedges = 0;
  const auto t0 = steady::now();
  phase(calls, "c");
  out.wall_s = std::chrono::duration<double>(steady::now() - t0).count();
  std::this_thread::sleep_for(100ms);
  out.stats = mock.stats();
  mock.stop();
  out.calls = std::move(calls);
  out.hedges = hedges;
  out.refusals = budget.denied() - refused_before;
  out.failed = failed;
  out.first_error = first_error;
  return out;
}

struct summary {
  std::vector<double> latency;  // unary: whole call; stream: time to first token
  std::vector<double> total;    // whole call
  std::uint64_t attempts = 0;
  std::vector<double> delays;
  std::vector<double> gap_mock;    // loser closed - winner completed (mock's instants)
  std::vector<double> gap_client;  // loser closed - winner committed (client's instant)
  std::vector<double> gap_keel;    // loser unwound, connection closed - winner committed (client)
  std::vector<double> gap_notice;  // mock saw the close - loser unwound
  int two_attempts = 0;
  int loser_abandoned = 0;
  int loser_completed = 0;  // the loser's response was finished before the close
  int unmatched = 0;
  int hedge_won = 0;
  int tail_primaries = 0;
  int tail_hedges = 0;
};

summary summarize(const run_options& o, const variant_result& v) {
  summary s;
  std::map<std::string, std::vector<const keel::testing::response_record*>> by_model;
  for (const auto& r : v.stats.responses) {
    by_model[r.model].push_back(&r);
  }
  for (std::size_t i = 0; i < v.calls.size(); ++i) {
    const call_record& c = v.calls[i];
    s.attempts += static_cast<std::uint64_t>(c.attempts);
    if (!c.ok) {
      continue;
    }
    s.latency.push_back(ms((o.stream ? c.committed_at : c.end) - c.start));
    s.total.push_back(ms(c.end - c.start));
    if (v.name != "off") {
      s.delays.push_back(std::chrono::duration<double, std::milli>(c.delay).count());
    }
    auto recs = by_model["c" + std::to_string(i)];
    std::sort(recs.begin(), recs.end(),
              [](auto* a, auto* b) { return a->received_at < b->received_at; });
    if (!recs.empty() && recs[0]->tail) {
      ++s.tail_primaries;
    }
    if (recs.size() > 1 && recs[1]->tail) {
      ++s.tail_hedges;
    }
    if (c.attempts < 2) {
      continue;
    }
    ++s.two_attempts;
    s.hedge_won += c.winner == 1 ? 1 : 0;
    if (recs.size() != 2) {
      ++s.unmatched;
      continue;
    }
    const auto* win = recs[c.winner];
    const auto* lose = recs[1 - c.winner];
    if (lose->closed_by_client_at) {
      ++s.loser_abandoned;
      const auto won_at = o.stream ? win->first_byte_at : win->completed_at;
      if (won_at) {
        s.gap_mock.push_back(ms(*lose->closed_by_client_at - *won_at));
      }
      s.gap_client.push_back(ms(*lose->closed_by_client_at - c.committed_at));
      const steady::time_point unwound = c.failed_at[1 - c.winner];
      if (unwound != steady::time_point{}) {
        s.gap_keel.push_back(ms(unwound - c.committed_at));
        s.gap_notice.push_back(ms(*lose->closed_by_client_at - unwound));
      }
    } else {
      ++s.loser_completed;
    }
  }
  for (auto* v2 :
       {&s.latency, &s.total, &s.delays, &s.gap_mock, &s.gap_client, &s.gap_keel, &s.gap_notice}) {
    std::sort(v2->begin(), v2->end());
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  run_options o;
  CLI::App app{"with_hedge against a heavy-tailed mock LLM server (issue 15)"};
  app.add_option("--calls", o.calls, "measured calls per variant")->check(CLI::Range(1, 1'000'000));
  app.add_option("--concurrency", o.concurrency, "calls in flight")->check(CLI::Range(1, 10'000));
  app.add_option("--warmup", o.warmup, "calls before the measured ones, not counted")
      ->check(CLI::Range(0, 1'000'000));
  app.add_option("--latency-ms", o.latency_ms, "the mock's latency before every answer")
      ->check(CLI::Range(0, 60'000));
  app.add_option("--tail-fraction", o.tail_fraction, "fraction of requests given the tail latency")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--tail-ms", o.tail_ms, "the tail latency")->check(CLI::Range(0, 600'000));
  app.add_option("--percentile", o.percentile, "the window's percentile used as the delay (p95)")
      ->check(CLI::Range(0.0, 100.0));
  app.add_option("--fixed-delay-ms", o.fixed_delay_ms, "the delay of the fixed variant")
      ->check(CLI::Range(0, 600'000));
  app.add_option("--budget-ratio", o.budget_ratio, "hedge_budget ratio")
      ->check(CLI::Range(0.0, 10.0));
  app.add_option("--budget-capacity", o.budget_capacity, "hedge_budget capacity")
      ->check(CLI::Range(0.0, 1e6));
  app.add_option("--seed", o.seed, "the mock's seed");
  app.add_flag("--stream", o.stream, "streamed calls: measure time to first token");
  app.add_flag("--pin", o.pin, "the mock's thread on CPU 0, the client's on CPU 1");
  app.add_option("--variants", o.variants, "off, p95, fixed")
      ->delimiter(',')
      ->check(CLI::IsMember({"off", "p95", "fixed"}));
  CLI11_PARSE(app, argc, argv);

  fmt::print(
      "mock: latency {} ms, {:.1f}% tail at {} ms; {} calls ({} warm-up), concurrency {}, {}; "
      "p95 variant: percentile {}, fixed: {} ms\n",
      o.latency_ms, o.tail_fraction * 100, o.tail_ms, o.calls, o.warmup, o.concurrency,
      o.stream ? "streamed (latency = time to first token)" : "unary (latency = whole call)",
      o.percentile, o.fixed_delay_ms);
  fmt::print("{:>6} {:>7} {:>7} {:>7} {:>7} {:>9} {:>7} {:>7} {:>7} {:>13} {:>22} {:>22} {:>22}\n",
             "", "p50 ms", "p95", "p99", "max", "att/call", "hedges", "refused", "failed",
             "delay p50/max", "loser gap mock p50/99/max", "client p50/99/max",
             "unwound p50/99/max");
  std::vector<std::string> json;
  int bad = 0;
  for (const auto& name : o.variants) {
    const variant_result v = run_variant(o, name);
    const summary s = summarize(o, v);
    const double n = static_cast<double>(v.calls.size());
    const double per_call = static_cast<double>(s.attempts) / n;
    fmt::print(
        "{:>6} {:>7.1f} {:>7.1f} {:>7.1f} {:>7.1f} {:>9.4f} {:>7} {:>7} {:>7} {:>6.1f}/{:>6.1f} "
        "{:>6.2f}/{:>6.2f}/{:>7.2f} {:>6.2f}/{:>6.2f}/{:>7.2f} {:>6.2f}/{:>6.2f}/{:>7.2f}\n",
        name, pct(s.latency, 50), pct(s.latency, 95), pct(s.latency, 99), pct(s.latency, 100),
        per_call, v.hedges, v.refusals, v.failed, pct(s.delays, 50), pct(s.delays, 100),
        pct(s.gap_mock, 50), pct(s.gap_mock, 99), pct(s.gap_mock, 100), pct(s.gap_client, 50),
        pct(s.gap_client, 99), pct(s.gap_client, 100), pct(s.gap_keel, 50), pct(s.gap_keel, 99),
        pct(s.gap_keel, 100));
    if (v.failed > 0) {
      fmt::print(stderr, "bench_hedge: {}: {} calls failed; first: {}\n", name, v.failed,
                 v.first_error);
      ++bad;
    }
    const auto& t = v.stats.total;
    std::ostringstream j;
    j << fmt::format(
        "{{\"variant\":\"{}\",\"stream\":{},\"calls\":{},\"concurrency\":{},\"latency_ms\":{},"
        "\"tail_fraction\":{},\"tail_ms\":{},\"percentile\":{},\"seed\":{},\"wall_s\":{:.3f},",
        name, o.stream, o.calls, o.concurrency, o.latency_ms, o.tail_fraction, o.tail_ms,
        o.percentile, o.seed, v.wall_s);
    j << fmt::format(
        "\"p50_ms\":{:.2f},\"p95_ms\":{:.2f},\"p99_ms\":{:.2f},\"max_ms\":{:.2f},"
        "\"call_p99_ms\":{:.2f},\"attempts_per_call\":{:.4f},\"hedges\":{},\"budget_refusals\":{},"
        "\"failed\":{},",
        pct(s.latency, 50), pct(s.latency, 95), pct(s.latency, 99), pct(s.latency, 100),
        pct(s.total, 99), per_call, v.hedges, v.refusals, v.failed);
    j << fmt::format(
        "\"delay_ms\":{{\"min\":{:.2f},\"p50\":{:.2f},\"max\":{:.2f}}},\"two_attempts\":{},"
        "\"hedge_won\":{},\"loser_abandoned\":{},\"loser_completed\":{},\"unmatched\":{},",
        pct(s.delays, 0), pct(s.delays, 50), pct(s.delays, 100), s.two_attempts, s.hedge_won,
        s.loser_abandoned, s.loser_completed, s.unmatched);
    j << fmt::format(
        "\"loser_gap_mock_ms\":{{\"p50\":{:.3f},\"p99\":{:.3f},\"max\":{:.3f}}},"
        "\"loser_gap_client_ms\":{{\"p50\":{:.3f},\"p99\":{:.3f},\"max\":{:.3f}}},",
        pct(s.gap_mock, 50), pct(s.gap_mock, 99), pct(s.gap_mock, 100), pct(s.gap_client, 50),
        pct(s.gap_client, 99), pct(s.gap_client, 100));
    j << fmt::format(
        "\"loser_unwound_ms\":{{\"p50\":{:.3f},\"p99\":{:.3f},\"max\":{:.3f}}},"
        "\"close_seen_ms\":{{\"p50\":{:.3f},\"p99\":{:.3f},\"max\":{:.3f}}},",
        pct(s.gap_keel, 50), pct(s.gap_keel, 99), pct(s.gap_keel, 100), pct(s.gap_notice, 50),
        pct(s.gap_notice, 99), pct(s.gap_notice, 100));
    j << fmt::format(
        "\"mock\":{{\"requests\":{},\"accepted_connections\":{},\"tail_delays\":{},"
        "\"tail_primaries\":{},\"tail_hedges\":{},\"abandoned\":{},\"responses_dropped\":{}}}}}",
        t.requests, v.stats.accepted_connections, t.tail_delays, s.tail_primaries, s.tail_hedges,
        t.abandoned, v.stats.responses_dropped);
    json.push_back(j.str());
  }
  for (const auto& line : json) {
    fmt::print("{}\n", line);
  }
  return bad == 0 ? 0 : 1;
}
