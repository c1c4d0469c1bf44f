// Tests of keel::llm::client's rate limiting against the mock server over loopback: the 429
// pause (one 429 pauses nobody else, a block pauses everybody), token reservations and their
// settling, and limits learned from the server's headers or from its 429s.
#include "llm_client_support.hpp"

#include <keel/llm/client.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel_test::client::make_config;
using keel_test::client::request;
using keel_test::client::run;
using keel_test::client::two_entries;
using namespace std::chrono_literals;

}  // namespace

TEST_CASE("one 429 pauses nobody but the rejected call; a block pauses everybody", "[llm_client]") {
  SECTION("one 429") {
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    server.set_plan("primary",
                    fault_plan{}
                        .with_script({fault_kind::rate_limit})
                        .with_retry_after(300ms, keel::testing::retry_after_style::both));
    server.start();
    keel::http::client http(ctx.get_executor(), {});
    keel::llm::bucket_registry buckets(ctx.get_executor(), 1);
    keel::llm::client client(ctx.get_executor(), make_config(two_entries, server.base_url()), http,
                             buckets, {}, 1);
    const auto out = run(ctx, client, {request(), request(), request()}, 3);
    int waited = 0;
    for (const auto& o : out) {
      REQUIRE(o.response);
      CHECK(o.entry == 0);
      waited += o.seconds >= 0.29 ? 1 : 0;
    }
    // Only the rejected item waited out its Retry-After; the bucket was never paused.
    CHECK(waited == 1);
    keel::throttler* primary = nullptr;
    for (const auto& [name, b] : buckets.all()) {
      if (name == "openai/primary") {
        primary = b;
      }
    }
    REQUIRE(primary != nullptr);
    CHECK(primary->paused_until() == keel::throttler::time_point{});
    CHECK(server.stats().model("primary").requests == 4);
  }
  SECTION("a block") {
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    // Everything refused for two rounds (an exhausted quota window), each 429 saying 300 ms.
    server.set_plan("primary",
                    fault_plan{}
                        .with_script(std::vector<fault_kind>(6, fault_kind::rate_limit))
                        .with_retry_after(300ms, keel::testing::retry_after_style::both));
    server.start();
    keel::http::client http(ctx.get_executor(), {});
    keel::llm::bucket_registry buckets(ctx.get_executor(), 1);
    keel::llm::client client(
        ctx.get_executor(),
        make_config(R"({"config_list": [{"api_type": "openai", "model": "primary",
                                         "api_key": "k"}]})",
                    server.base_url()),
        http, buckets, {}, 1);
    const auto before = std::chrono::steady_clock::now();
    const auto out = run(ctx, client, {request(), request(), request()}, 3);
    for (const auto& o : out) {
      REQUIRE(o.response);
      CHECK(o.attempts == 3);
    }
    // The second round of 429s, 300 ms after the first with nothing accepted in between, is a
    // block: everybody paused for its Retry-After.
    keel::throttler& bucket = *buckets.all().at(0).second;
    CHECK(bucket.paused_until() >= before + 550ms);
    CHECK(server.stats().model("primary").requests == 9);
  }
}

TEST_CASE("the token bucket is settled with the real usage", "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client client(ctx.get_executor(),
                           make_config(R"([{"api_type": "openai", "model": "m", "api_key": "k",
                       "tokens_per_minute": 6000}])",
                                       server.base_url()),
                           http, buckets, {}, 1);
  const auto out = run(ctx, client, {request()});
  REQUIRE(out[0].response);
  const double used =
      static_cast<double>(out[0].response->usage.input + out[0].response->usage.output);
  CHECK(used > 0);
  // Reserved: the estimate (prompt + 64 max_tokens); settled back to the real usage.
  CHECK(buckets.all()[0].second->available_tokens() >= 6000 - used - 1);
  CHECK(buckets.all()[0].second->available_tokens() < 6000 - used + 50);
}

TEST_CASE("a 429 keeps its token reservation; another failure gives it back", "[llm_client]") {
  // Giving a 429's tokens back let the next caller go at once into the same refusal: against a
  // token limit every probe of the newcomer's config ended with all 64 callers drawing a 429
  // within 100 ms (keel bench token_limited c=64: 1.66x ideal, ~480 429s; kept: 1.05x, 24).
  const auto remaining_after = [](fault_kind fault) {
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    server.set_plan("m", fault_plan{}.with_script({fault}));
    server.start();
    keel::http::client http(ctx.get_executor(), {});
    keel::llm::bucket_registry buckets(ctx.get_executor());
    keel::llm::client client(
        ctx.get_executor(),
        make_config(R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "k",
                                         "tokens_per_minute": 6000}],
                        "policy": {"retry": {"max_attempts": 1}}})",
                    server.base_url()),
        http, buckets, {}, 1);
    const auto out = run(ctx, client, {keel::llm::chat_request::from_prompt("", "hello", 2000)});
    CHECK_FALSE(out[0].response);
    CHECK(server.stats().model("m").requests == 1);
    return buckets.all().at(0).second->available_tokens();
  };
  // The estimate is at least the 2,000 max_tokens; the bucket refills 100 tokens/s.
  CHECK(remaining_after(fault_kind::rate_limit) < 6000 - 1500);
  CHECK(remaining_after(fault_kind::unavailable) > 6000 - 100);
}

TEST_CASE("token reservations settle with the real usage unless a learned limit paces them",
          "[llm_client]") {
  using keel::pacing_phase;
  // Nothing learned: settle (a configured or stated limit is in real tokens).
  for (const auto phase : {pacing_phase::unlimited, pacing_phase::startup, pacing_phase::fixed}) {
    CHECK(keel::llm::settles_token_usage(phase, 0));
    CHECK(keel::llm::settles_token_usage(phase, 6000));
  }
  for (const auto phase : {pacing_phase::search, pacing_phase::cruise, pacing_phase::probe}) {
    // Learned from 429s in this client's estimates: settling would give the over-estimate back.
    CHECK_FALSE(keel::llm::settles_token_usage(phase, 0));
    // A configured ceiling stays in real tokens after 429s (without settling, 102,800 tokens/s
    // paced 635-token estimates at 162 calls/s against a limit of 200).
    CHECK(keel::llm::settles_token_usage(phase, 6000));
  }
}

TEST_CASE("a bucket with no configured limit adopts the limit the server's headers state",
          "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  // 50 r/s with a burst of 50, reported in the replies' rate-limit headers (per minute).
  server.set_plan("primary", fault_plan{}.with_rate_limit(50).with_latency(20ms));
  server.set_plan("open", fault_plan{}.with_latency(20ms));  // no limit, no headers
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor(), 1);
  const char* const one_try = R"({
    "config_list": [{"api_type": "openai", "model": "primary", "api_key": "k1"}],
    "policy": {"retry": {"max_attempts": 1}}
  })";
  keel::llm::client client(ctx.get_executor(), make_config(one_try, server.base_url()), http,
                           buckets, {}, 1);
  keel::throttler& bucket = *buckets.all().at(0).second;
  keel::rate_controller* pacing = buckets.pacing(bucket);
  REQUIRE(pacing != nullptr);
  CHECK(pacing->requests().phase == keel::pacing_phase::startup);

  // 64 at once against a burst of 50 would draw 14 429s (and fail them: one attempt each).
  // The startup window sends 16, the first reply states 50 r/s, and the rest are paced.
  std::vector<keel::llm::chat_request> items(64, request());
  const auto out = run(ctx, client, items, 64);
  for (const auto& o : out) {
    CHECK(o.response);
  }
  CHECK(server.stats().model("primary").status_count(429) == 0);
  CHECK(server.stats().model("primary").status_count(200) == 64);
  CHECK(pacing->requests().phase == keel::pacing_phase::fixed);
  CHECK(pacing->requests().estimate == Approx(50.0));
  CHECK(bucket.options().requests_per_second == Approx(50.0));

  // A server that states no limit and never throttles: the bucket stays a startup window that
  // widens with every answer, and nobody waits on pacing.
  const char* const open_entry = R"({
    "config_list": [{"api_type": "openai", "model": "open", "api_key": "k1"}],
    "policy": {"retry": {"max_attempts": 1}}
  })";
  keel::llm::client open_client(ctx.get_executor(), make_config(open_entry, server.base_url()),
                                http, buckets, {}, 1);
  keel::throttler* open_bucket = nullptr;
  for (const auto& [name, b] : buckets.all()) {
    if (name == "openai/open") {
      open_bucket = b;
    }
  }
  REQUIRE(open_bucket != nullptr);
  items.resize(16);
  const auto open_out = run(ctx, open_client, items, 16);
  for (const auto& o : open_out) {
    CHECK(o.response);
  }
  const auto st = buckets.pacing(*open_bucket)->requests();
  CHECK(st.phase == keel::pacing_phase::startup);
  // The window widened (how far depends on how long the calls took: it doubles once per round
  // trip), and it never held a call back.
  CHECK(st.window > 16);
  CHECK(open_bucket->total_waits() == 0);
  CHECK(server.stats().model("open").status_count(200) == 16);
}

TEST_CASE("a server that states no limit is paced at the limit its 429s reveal", "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  // nginx limit_req semantics: 100 r/s, 21 at once, 429 with a constant "Retry-After: 1" and no
  // rate-limit headers.
  server.set_plan("m",
                  fault_plan{}
                      .with_rate_limit(100, 0, 21)
                      .with_rate_limit_headers(false)
                      .with_limiter_retry_after(keel::testing::limiter_retry_after_mode::constant)
                      .with_retry_after(1000ms, keel::testing::retry_after_style::seconds));
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor(), 1);
  std::vector<keel::pacing_phase> phases;
  buckets.on_pacing = [&](const std::string& name, const keel::pacing_state& r,
                          const keel::pacing_state&) {
    CHECK(name == "openai/m");
    phases.push_back(r.phase);
  };
  keel::llm::client client(ctx.get_executor(),
                           make_config(R"({"config_list": [{"api_type": "openai",
                                                "model": "m", "api_key": "k"}]})",
                                       server.base_url()),
                           http, buckets, {}, 1);
  const auto out = run(ctx, client, std::vector<keel::llm::chat_request>(300, request()), 64);
  int ok = 0;
  int attempts = 0;
  double wall = 0;
  std::map<std::string, int> errors;  // what the failed items ended with, for the report
  for (const auto& o : out) {
    ok += o.response ? 1 : 0;
    attempts += o.attempts;
    wall = std::max(wall, o.seconds);
    if (o.error) {
      try {
        std::rethrow_exception(o.error);
      } catch (const std::exception& e) {
        ++errors[e.what()];
      }
    }
  }
  const auto st = buckets.pacing(*buckets.all().at(0).second)->requests();
  std::string seen;
  for (const auto p : phases) {
    seen += std::string(keel::to_string(p)) + " ";
  }
  // This runs on real time: on a loaded machine the process stalls now and then, and what
  // the client sees depends on it. Say what happened if a check fails.
  CAPTURE(wall, attempts, st.estimate, st.rate, st.samples, st.rejections, st.noise,
          keel::to_string(st.phase), seen);
  for (const auto& [what, n] : errors) {
    UNSCOPED_INFO(n << " failed: " << what);
  }
  // Every item answered; the old shared pause made all 64 callers resume together each second
  // and collapsed to about 21 per second, failing most items.
  CHECK(ok == 300);
  CHECK(st.samples >= 1);
  CHECK(st.estimate > 80);
  CHECK(st.estimate < 125);
  // At most one 429 per worker from the first wave (on a slow machine all 64 calls go out
  // before the first answer comes back), and few while learning: a common client sends 3-4
  // attempts per prompt here (900-1200). An optimised build takes 308-309. The server runs on
  // real time, so a sanitizer's slowdown changes what the client sees: under ASan the whole
  // first window goes out before the first 429 comes back, and every caller sleeps out the
  // same Retry-After. Search then credited that idle second as growth, and the callers herded
  // every second: 474-620 attempts (CI, 2026-12-05: 620), or items failed. Growth now counts
  // only time in which the rate held calls back: 352-380 under ASan, idle or with three busy
  // loops beside it. The optimised bound allows two waves; under a sanitizer, four.
#if defined(__SANITIZE_ADDRESS__)
  constexpr int waves = 4;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
  constexpr int waves = 4;
#else
  constexpr int waves = 2;
#endif
#else
  constexpr int waves = 2;
#endif
  CHECK(attempts <= 300 + waves * 64 + 20);
  CHECK(server.stats().model("m").status_count(429) == static_cast<std::uint64_t>(attempts - 300));
  // The hook saw the way there: startup, then search, then an estimate.
  REQUIRE(phases.size() >= 3);
  CHECK(phases[0] == keel::pacing_phase::startup);
  CHECK(phases[1] == keel::pacing_phase::search);
  CHECK(std::find(phases.begin(), phases.end(), keel::pacing_phase::cruise) != phases.end());
}
