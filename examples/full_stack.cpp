// Demo: 1,000 prompts through the full stack (throttler, breaker, retry, deadline, fallback,
// fan_out) against two simulated models with rate limits, 503s and an outage of the primary.
//
// No network and no keys: the "providers" are in-process coroutines with server-side behaviour
// (a requests-per-second limit answered with throttled + Retry-After, random 503s, latency, and
// an outage window). Real time, a couple of seconds. The later `keel demo` command does the same
// over HTTP against the mock LLM server.
#include <keel/circuit_breaker.hpp>
#include <keel/deadline.hpp>
#include <keel/fallback.hpp>
#include <keel/fan_out.hpp>
#include <keel/retry.hpp>
#include <keel/throttler.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdio>
#include <map>
#include <numeric>
#include <string>
#include <vector>

namespace asio = boost::asio;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

// A simulated model endpoint with server-side limits and faults.
struct fake_model {
  std::string name;
  int requests_per_second;                      // server-side limit, fixed 100 ms windows
  double error_rate;                            // random 503s
  clock_type::duration outage_from, outage_to;  // all 503 in this window (from start)
  clock_type::time_point start;
  keel::random_source rng;
  // What the server saw.
  int received = 0, answered = 0, throttled = 0, errors = 0;
  long long window = -1;
  int in_window = 0;

  fake_model(std::string n, int rps, double err, clock_type::duration from, clock_type::duration to,
             std::uint64_t seed)
      : name(std::move(n)),
        requests_per_second(rps),
        error_rate(err),
        outage_from(from),
        outage_to(to),
        start(clock_type::now()),
        rng(seed) {}

  asio::awaitable<std::string> complete(std::string prompt) {
    ++received;
    asio::steady_timer latency(co_await asio::this_coro::executor,
                               std::chrono::microseconds(2000 + rng.next() % 4000));
    co_await latency.async_wait(asio::use_awaitable);
    const auto t = clock_type::now() - start;
    const long long w = std::chrono::duration_cast<std::chrono::milliseconds>(t).count() / 100;
    if (w != window) {
      window = w;
      in_window = 0;
    }
    if (++in_window > requests_per_second / 10) {
      ++throttled;
      const auto retry_after = std::chrono::milliseconds((w + 1) * 100) - t;
      throw keel::failure(keel::error::throttled, name + ": 429 rate limited", {},
                          std::chrono::duration_cast<std::chrono::nanoseconds>(retry_after));
    }
    if ((t >= outage_from && t < outage_to) || rng.uniform() < error_rate) {
      ++errors;
      throw boost::system::system_error(asio::error::connection_reset, name + ": 503");
    }
    ++answered;
    co_return name + " answers '" + prompt.substr(0, 12) + "'";
  }
};

// One model as the client sees it: its own throttler, breaker and retry policy.
struct model_client {
  fake_model& model;
  keel::throttler bucket;
  keel::circuit_breaker breaker;
  keel::retry_policy policy;
  std::map<std::string, int>& retries_by_cause;
  int attempts = 0;

  model_client(asio::any_io_executor ex, fake_model& m, double client_rps,
               keel::retry_budget& budget, keel::random_source& rng,
               std::map<std::string, int>& retries)
      : model(m),
        bucket(ex, {.requests_per_second = client_rps, .burst = 10}),
        breaker(ex, keel::breaker_policy::consecutive(5, 200ms)),
        retries_by_cause(retries) {
    auto expo = keel::backoff::exponential(20ms, 500ms, keel::jitter::full);
    policy = keel::retry_policy::with_backoff(4, expo);
    policy.budget = &budget;
    policy.random = &rng;
    // An open breaker is the signal to move on to the fallback model, not to wait it out.
    policy.retry_if = [](const std::exception_ptr&, const keel::classification& c) {
      return c.code != keel::error::circuit_open;
    };
    policy.on_retry = [this](const keel::retry_event& e) {
      ++retries_by_cause[model.name + " " + (e.from_server_hint ? "429+hint" : "failure")];
    };
  }

  // The call itself: wait for the shared bucket, then at most 250 ms for the model. A 429 with
  // a delay hint pauses the bucket for every caller of this model, so they do not retry in
  // lockstep.
  asio::awaitable<std::string> paced(std::string prompt) {
    co_await bucket.acquire();
    ++attempts;
    std::exception_ptr failed;
    try {
      co_return co_await keel::with_deadline([&] { return model.complete(prompt); }, 250ms);
    } catch (...) {
      failed = std::current_exception();
    }
    if (auto c = keel::classify(failed);
        c.condition == keel::condition::throttled && c.retry_after) {
      bucket.pause_for(std::chrono::duration_cast<clock_type::duration>(*c.retry_after));
    }
    std::rethrow_exception(failed);
  }

  // One attempt: the breaker first, so that a rejected call does not spend a rate token.
  asio::awaitable<std::string> attempt(std::string prompt) {
    co_return co_await keel::with_breaker(breaker, [this, prompt] { return paced(prompt); });
  }

  asio::awaitable<std::string> call(std::string prompt) {
    co_return co_await keel::with_retry([this, prompt] { return attempt(prompt); }, policy);
  }
};

}  // namespace

int main() {
  asio::io_context ctx;
  keel::random_source rng{2026};
  std::map<std::string, int> retries_by_cause;
  keel::retry_budget budget{200, 0.2};

  // The primary allows 400 r/s, fails 3% of calls, and is down from 0.6 s to 1.2 s.
  fake_model primary("primary", 400, 0.03, 600ms, 1200ms, 1);
  fake_model secondary("secondary", 300, 0.01, 0s, 0s, 2);
  model_client big(ctx.get_executor(), primary, 380, budget, rng, retries_by_cause);
  model_client small(ctx.get_executor(), secondary, 280, budget, rng, retries_by_cause);

  std::vector<std::string> prompts(1000);
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    prompts[i] = "prompt #" + std::to_string(i) + ": summarise the incident report";
  }
  int fallbacks = 0;
  keel::fallback_policy fallback;
  fallback.on_fallback = [&](const keel::fallback_event&) { ++fallbacks; };

  const auto t0 = clock_type::now();
  std::vector<keel::result<std::string, std::exception_ptr>> results;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        results = co_await keel::fan_out(prompts, 64, [&](const std::string& p) {
          return keel::with_fallback(keel::alternatives([&big, p] { return big.call(p); },
                                                        [&small, p] { return small.call(p); }),
                                     fallback);
        });
      },
      asio::detached);
  ctx.run();
  const double wall = std::chrono::duration<double>(clock_type::now() - t0).count();

  std::size_t ok = 0;
  std::map<std::string, int> failed_by_class;
  for (const auto& r : results) {
    if (r) {
      ++ok;
    } else {
      ++failed_by_class[keel::make_error_code(keel::error::all_fallbacks_failed) ==
                                keel::classify(r.error()).code
                            ? "all fallbacks failed"
                            : keel::describe(r.error())];
    }
  }
  std::printf("keel full-stack demo: %zu prompts, concurrency 64, two simulated models\n",
              prompts.size());
  std::printf("  results        %zu (ok %zu, failed %zu)\n", results.size(), ok,
              results.size() - ok);
  for (const auto& [what, n] : failed_by_class) {
    std::printf("  failed         %d x %s\n", n, what.c_str());
  }
  std::printf("  wall time      %.2f s, %.0f prompts/s\n", wall, static_cast<double>(ok) / wall);
  for (const model_client* m : {&big, &small}) {
    std::printf(
        "  %-10s     attempts %d, server saw %d (answered %d, 429 %d, 503 %d), "
        "breaker opened %llu time(s)\n",
        m->model.name.c_str(), m->attempts, m->model.received, m->model.answered,
        m->model.throttled, m->model.errors,
        static_cast<unsigned long long>(m->breaker.opened_count()));
  }
  for (const auto& [cause, n] : retries_by_cause) {
    std::printf("  retries        %d x %s\n", n, cause.c_str());
  }
  std::printf("  fallbacks      %d; retry budget left %.1f of %.0f (denied %llu)\n", fallbacks,
              budget.tokens(), budget.max_tokens(),
              static_cast<unsigned long long>(budget.denied()));
  // The one hard guarantee: every prompt has exactly one result.
  return results.size() == prompts.size() ? 0 : 1;
}
