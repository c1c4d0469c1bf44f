// Tests of keel::llm::client's fallback, breakers and attempt slots against the mock server over
// loopback: an open breaker moves on to the next entry, two clients keep their own breakers but
// share a key's bucket, the deciding error of a failed call, holding at an open breaker, and a
// retry's sleep giving its attempt slot away.
#include "llm_client_support.hpp"
#include "redis_support.hpp"  // free_port

#include <keel/llm/client.hpp>
#include <keel/llm/error.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <chrono>
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

TEST_CASE("an open breaker sends later items straight to the fallback", "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("primary", fault_plan{}.with_probability(fault_kind::unavailable, 1.0));
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  int fallbacks = 0;
  std::vector<keel::breaker_state> transitions;
  keel::llm::client_hooks hooks;
  hooks.on_fallback = [&](const void*, std::size_t from, std::size_t to, std::exception_ptr) {
    CHECK(from == 0);
    CHECK(to == 1);
    ++fallbacks;
  };
  hooks.on_breaker = [&](std::size_t entry, keel::breaker_state, keel::breaker_state to) {
    CHECK(entry == 0);
    transitions.push_back(to);
  };
  keel::llm::client client(ctx.get_executor(), make_config(two_entries, server.base_url()), http,
                           buckets, hooks, 1);
  const auto out = run(ctx, client, std::vector<keel::llm::chat_request>(6, request()));
  for (const auto& o : out) {
    REQUIRE(o.response);
    CHECK(o.entry == 1);
  }
  // Items 1 and 2 spend 2 attempts each on the primary; the third failure opens the breaker.
  CHECK(server.stats().model("primary").requests == 3);
  CHECK(server.stats().model("secondary").status_count(200) == 6);
  CHECK(fallbacks == 6);
  CHECK(client.breaker(0)->opened_count() == 1);
  REQUIRE_FALSE(transitions.empty());
  CHECK(transitions.front() == keel::breaker_state::open);
  CHECK(out[0].attempts == 3);  // 2 on the primary, 1 on the fallback
  CHECK(out[5].attempts == 1);  // the breaker rejected the primary without an HTTP attempt
}

TEST_CASE("two clients with different policies coexist and share a key's bucket", "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_script(
                           {fault_kind::unavailable, fault_kind::unavailable, fault_kind::ok}));
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client impatient(
      ctx.get_executor(),
      make_config(R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "k",
                                        "requests_per_minute": 6000}],
                      "policy": {"retry": {"max_attempts": 1},
                                 "breaker": {"failure_threshold": 1, "break": 60}}})",
                  server.base_url()),
      http, buckets, {}, 1);
  keel::llm::client patient(
      ctx.get_executor(),
      make_config(R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "k",
                                        "requests_per_minute": 6000}],
                      "policy": {"retry": {"max_attempts": 5,
                                           "backoff": {"kind": "constant", "base": 0.001}}}})",
                  server.base_url()),
      http, buckets, {}, 2);
  const auto a = run(ctx, impatient, {request()});
  REQUIRE(a[0].error);
  CHECK(a[0].attempts == 1);
  CHECK(impatient.breaker(0)->state() == keel::breaker_state::open);
  // The other client's breaker is its own: still closed, it retries through the failure.
  const auto b = run(ctx, patient, {request()});
  REQUIRE(b[0].response);
  CHECK(b[0].attempts == 2);
  CHECK(patient.breaker(0)->state() == keel::breaker_state::closed);
  // Same (provider, model, key): one bucket, which granted all three attempts.
  REQUIRE(buckets.all().size() == 1);
  CHECK(buckets.all()[0].second->total_granted() == 3);
}

TEST_CASE("error classes see through retries and fallbacks to the deciding error", "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("primary", fault_plan{}.with_probability(fault_kind::auth, 1.0));
  server.set_plan("secondary", fault_plan{}.with_probability(fault_kind::context_length, 1.0));
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client client(ctx.get_executor(), make_config(two_entries, server.base_url()), http,
                           buckets, {}, 1);
  const auto out = run(ctx, client, {request()});
  REQUIRE(out[0].error);
  CHECK(keel::llm::error_class(out[0].error) == "context_length_exceeded");
  const auto j = keel::llm::error_json(out[0].error);
  CHECK(j["class"] == "context_length_exceeded");
  CHECK(j["condition"] == "permanent");
  CHECK(j["status"] == 400);
  CHECK(j["provider"] == "anthropic");
  CHECK(j["gave_up"] == "all_fallbacks_failed");
  // Permanent errors are not retried: one attempt per entry.
  CHECK(out[0].attempts == 2);
}

TEST_CASE("with hold_open_breaker an item with no fallback left waits for the probe",
          "[llm_client]") {
  // One entry; its server answers 503 for the first 600 ms. The breaker opens after 2 failures
  // for 200 ms; three attempts with 20 ms backoff are used up long before the outage ends.
  const char* const policy = R"({
    "config_list": [{"api_type": "openai", "model": "m", "api_key": "k"}],
    "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.02}},
               "breaker": {"failure_threshold": 2, "break": 0.2, "break_growth": 1},
               "retry_budget": {"enabled": false}}
  })";
  for (const bool hold : {false, true}) {
    DYNAMIC_SECTION("hold_open_breaker " << hold) {
      asio::io_context ctx;
      keel::testing::mock_llm_server server(ctx);
      server.set_plan("m", fault_plan{}.with_outage(0ms, 600ms));
      server.start();
      keel::http::client http(ctx.get_executor(), {});
      keel::llm::bucket_registry buckets(ctx.get_executor(), 1);
      keel::llm::client_hooks hooks;
      int holds = 0;
      hooks.on_hold = [&](std::size_t entry, const void*, std::chrono::nanoseconds left) {
        CHECK(entry == 0);
        CHECK(left <= 200ms);
        ++holds;
      };
      keel::llm::client_options co;
      co.hold_open_breaker = hold;
      keel::llm::client client(ctx.get_executor(), make_config(policy, server.base_url()), http,
                               buckets, hooks, 1, co);
      const auto out = run(ctx, client, {request(), request(), request(), request()}, 4);
      int ok = 0;
      for (const auto& o : out) {
        if (o.response) {
          ++ok;
          CHECK(o.seconds >= 0.5);  // answered after the outage
        } else {
          const std::string cls = keel::llm::error_class(o.error);
          CHECK((cls == "circuit_open" || cls == "unavailable" || cls == "overloaded"));
        }
        CHECK(o.attempts <= 3);  // waiting for the probe costs no attempt
      }
      if (hold) {
        CHECK(ok == 4);
        CHECK(holds > 0);
      } else {
        CHECK(ok < 4);
        CHECK(holds == 0);
      }
    }
  }
}

namespace {

// One entry "m" of `policy` on a mock whose first `outage` answers 503, through a client that
// holds items at an open breaker (keel batch's setting).
struct holding_rig {
  holding_rig(const char* policy, std::chrono::milliseconds outage)
      : server(ctx),
        http(ctx.get_executor(), {}),
        buckets(ctx.get_executor(), 1),
        client(ctx.get_executor(), make_config(policy, started(server, outage)), http, buckets, {},
               1, keel::llm::client_options{.hold_open_breaker = true}) {}
  static std::string started(keel::testing::mock_llm_server& s, std::chrono::milliseconds outage) {
    s.set_plan("m", fault_plan{}.with_outage(0ms, outage));
    s.start();
    return s.base_url();
  }
  asio::io_context ctx;
  keel::testing::mock_llm_server server;
  keel::http::client http;
  keel::llm::bucket_registry buckets;
  keel::llm::client client;
};

}  // namespace

TEST_CASE("a deadline that ends a hold at an open breaker names the failure that opened it",
          "[llm_client][review]") {
  // The server answers 503 for 2 s; the breaker opens after 2 failures for 10 s; the call's
  // deadline is 0.4 s: it is held, and the deadline ends the hold.
  const char* const policy = R"({
    "config_list": [{"api_type": "openai", "model": "m", "api_key": "k"}],
    "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.01}},
               "breaker": {"failure_threshold": 2, "break": 10, "break_growth": 1},
               "retry_budget": {"enabled": false}, "deadline": 0.4}
  })";
  holding_rig rig(policy, 2000ms);
  const auto out = run(rig.ctx, rig.client, {request(), request()}, 1);
  // The first call's two 503s opened the breaker; the second was held from the start.
  REQUIRE(out[1].error);
  CHECK(keel::llm::error_class(out[1].error) == "deadline_exceeded");
  const std::string message = keel::llm::error_json(out[1].error)["message"].get<std::string>();
  CHECK_THAT(message, Catch::Contains("deadline exceeded while held at m's open breaker"));
  CHECK_THAT(message, Catch::Contains("503"));
  CHECK(out[1].attempts == 0);
}

TEST_CASE(
    "a call asleep before a retry gives its attempt slot to the next item; an immediate "
    "retry keeps it",
    "[llm_client]") {
  // One attempt slot, two workers. The first request answers 503, every later one 200.
  struct variant {
    const char* backoff;                // the transient curve
    std::vector<std::size_t> finished;  // item order of the ends
  };
  const variant variants[] = {
      // Asleep 50 ms: the spare worker's item 1 takes the slot and ends first.
      {R"({"kind": "constant", "base": 0.05})", {1, 0}},
      // Retried at once: item 0 keeps the slot and ends first; item 1 waited for it.
      {R"({"kind": "immediate"})", {0, 1}},
  };
  for (const auto& v : variants) {
    INFO(v.backoff);
    asio::io_context ctx;
    keel::testing::mock_llm_server server(ctx);
    server.set_plan("m", fault_plan().with_script({fault_kind::unavailable}));
    server.start();
    keel::http::client http(ctx.get_executor(), {});
    keel::llm::bucket_registry buckets(ctx.get_executor());
    keel::llm::client_options co;
    co.attempt_slots = 1;
    std::vector<std::size_t> finished;  // request indexes in the order they succeeded
    keel::llm::client_hooks hooks;
    hooks.on_attempt = [&](const keel::llm::attempt_report& r) {
      if (r.status == 200) {
        finished.push_back(*static_cast<const std::size_t*>(r.context));
      }
    };
    keel::llm::client client(
        ctx.get_executor(),
        make_config(std::string(R"({"config_list": [{"api_type": "openai", "model": "m",
                                    "api_key": "sk-test-KEY000001"}],
                                    "policy": {"retry": {"max_attempts": 3, "backoff": )") +
                        v.backoff + "}}}",
                    server.base_url()),
        http, buckets, hooks, 1, co);
    const auto out = run(ctx, client, {request(), request()}, 2);
    CHECK(out[0].response);
    CHECK(out[1].response);
    CHECK(finished == v.finished);
    CHECK(server.stats().model("m").requests == 3);
  }
}

TEST_CASE("spare workers are a quarter of the attempt slots", "[llm_client]") {
  CHECK(keel::llm::spare_workers(1) == 0);
  CHECK(keel::llm::spare_workers(16) == 4);
  CHECK(keel::llm::spare_workers(64) == 16);
}

TEST_CASE("calls queued at the bucket when the breaker opens do not go out into the outage",
          "[llm_client]") {
  // The primary is paced at 20 requests/s with a burst of 1 and answers 503 to everything; its
  // breaker opens after 2 failures. Eight items start at once: the breaker admits all eight,
  // then they queue at the bucket, 50 ms apart. Once two have failed, the six still queued (and
  // the first item's retry) must not be sent: they move to the fallback without a request.
  const char* const policy = R"({
    "config_list": [
      {"api_type": "openai", "model": "primary", "api_key": "k1", "requests_per_minute": 1200},
      {"api_type": "anthropic", "model": "secondary", "api_key": "k2"}
    ],
    "policy": {"retry": {"max_attempts": 2, "backoff": {"kind": "constant", "base": 0.001}},
               "rate_limits": {"burst": 1},
               "breaker": {"failure_threshold": 2, "break": 30}}
  })";
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("primary", fault_plan{}.with_probability(fault_kind::unavailable, 1.0));
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client client(ctx.get_executor(), make_config(policy, server.base_url()), http,
                           buckets, {}, 1);
  const auto out = run(ctx, client, std::vector<keel::llm::chat_request>(8, request()), 8);
  for (const auto& o : out) {
    REQUIRE(o.response);
    CHECK(o.entry == 1);
  }
  CHECK(server.stats().model("primary").requests == 2);
  CHECK(server.stats().model("secondary").status_count(200) == 8);
  const auto c = client.breaker(0)->counters();
  CHECK(c.opened == 1);
  CHECK(c.failed == 2);
  CHECK(c.cancelled >= 6);  // admitted, then held back and never sent
}

TEST_CASE("a retry the budget refuses while the breaker is open waits for the probe",
          "[llm_client]") {
  // One entry; its server answers 503 for the first 300 ms. Eight items start at once, more
  // failures than the budget's half (4 tokens: 2 failures spend it); the second failure also
  // opens the breaker. The refused retries are held by the breaker instead of failing the items
  // with budget_exhausted, and succeed once its probe does.
  const char* const policy = R"({
    "config_list": [{"api_type": "openai", "model": "m", "api_key": "k"}],
    "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.02}},
               "breaker": {"failure_threshold": 2, "break": 0.1, "break_growth": 1},
               "retry_budget": {"max_tokens": 4, "token_ratio": 0.5}}
  })";
  holding_rig rig(policy, 300ms);
  const auto out = run(rig.ctx, rig.client, std::vector<keel::llm::chat_request>(8, request()), 8);
  for (const auto& o : out) {
    INFO((o.error ? keel::llm::error_class(o.error) : std::string("ok")));
    REQUIRE(o.response);
    CHECK(o.attempts <= 3);
  }
  CHECK(rig.server.stats().model("m").status_count(200) == 8);
  CHECK(rig.client.breaker(0)->opened_count() >= 1);
}

TEST_CASE("a server that has never answered is not waited for once unanswered_grace is over",
          "[llm_client]") {
  // Nothing listens on the entry's port: every attempt is a refused connection, never an HTTP
  // answer. The breaker opens after 2 failures for 100 ms at a time. Items held at it fail with
  // circuit_open once the grace since the first failure is over, saying why and carrying the
  // refused connection as a cause (a wrong base_url must not hold a batch for the items'
  // deadlines). An outage of a server that answers (a 503) is held instead: see "with
  // hold_open_breaker an item with no fallback left waits for the probe".
  const std::string base_url = "http://127.0.0.1:" + std::to_string(keel_test::free_port());
  for (const auto grace : {0ms, 300ms}) {
    const std::string policy =
        R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "k"}],
            "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.001}},
                       "breaker": {"failure_threshold": 2, "break": 0.1, "break_growth": 1,
                                   "unanswered_grace": )" +
        std::to_string(static_cast<double>(grace.count()) / 1000.0) + "}}}";
    DYNAMIC_SECTION("grace " << grace.count() << " ms") {
      asio::io_context ctx;
      keel::http::client http(ctx.get_executor(), {});
      keel::llm::bucket_registry buckets(ctx.get_executor(), 1);
      keel::llm::client_hooks hooks;
      int holds = 0;
      hooks.on_hold = [&](std::size_t, const void*, std::chrono::nanoseconds) { ++holds; };
      int reported = 0;
      hooks.on_unanswered = [&](std::size_t entry, const std::exception_ptr& last) {
        CHECK(entry == 0);
        CHECK(keel::classify(last).condition == keel::condition::transient);
        ++reported;
      };
      keel::llm::client_options co;
      co.hold_open_breaker = true;
      keel::llm::client client(ctx.get_executor(), make_config(policy, base_url), http, buckets,
                               hooks, 1, co);
      const auto out = run(ctx, client, std::vector<keel::llm::chat_request>(6, request()), 2);
      int explained = 0;
      int held_through_grace = 0;  // items that failed only once the grace was over
      for (const auto& o : out) {
        REQUIRE_FALSE(o.response);
        try {
          std::rethrow_exception(o.error);
        } catch (const keel::failure& f) {
          if (f.code() == keel::error::circuit_open) {
            CHECK(std::string(f.what()).find("has not answered one request") != std::string::npos);
            REQUIRE(f.causes().size() == 2);
            CHECK(keel::classify(f.causes().front()).condition == keel::condition::transient);
            ++explained;
          }
        } catch (...) {
        }
        if (o.seconds >= 0.29) {
          ++held_through_grace;
        }
      }
      CHECK(explained >= 4);  // every item after the breaker opened
      CHECK(reported == 1);   // once per entry
      if (grace == 0ms) {
        CHECK(holds == 0);
        CHECK(held_through_grace == 0);
      } else {
        // The two first items were held until the grace was over; later ones failed at once.
        CHECK(holds > 0);
        CHECK(held_through_grace >= 2);
      }
    }
  }
}
