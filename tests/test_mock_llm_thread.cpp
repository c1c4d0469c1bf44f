// Tests of keel::testing::mock_llm_thread: the mock on its own thread answers a client on
// another io_context, with the plans set before it started, and stops cleanly.
#include <keel/testing/mock_llm_thread.hpp>

#include <keel/http/client.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>

#include <catch2/catch.hpp>

#include <string>

namespace {
namespace asio = boost::asio;
using keel::testing::fault_kind;

// One OpenAI request to `base_url`, on a context of its own; returns the status.
int send_one(const std::string& base_url) {
  asio::io_context ctx;
  keel::http::client http{ctx.get_executor(), {}};
  keel::http::request req("POST", base_url + "/v1/chat/completions");
  req.set("content-type", "application/json");
  req.body = R"({"model": "m", "messages": [{"role": "user", "content": "hi"}]})";
  auto f = asio::co_spawn(ctx, http.send(req), asio::use_future);
  ctx.run();
  return f.get().status;
}
}  // namespace

TEST_CASE("mock_llm_thread serves its plans from its own thread and stops once") {
  keel::testing::mock_llm_thread mock{
      {.seed = 1}, [](keel::testing::mock_llm_server& s) {
        s.set_plan("m", keel::testing::fault_plan{}.with_script({fault_kind::unavailable}));
      }};
  REQUIRE(mock.base_url().rfind("http://127.0.0.1:", 0) == 0);
  CHECK(send_one(mock.base_url()) == 503);  // the scripted outcome, set before start
  CHECK(send_one(mock.base_url()) == 200);
  CHECK(mock.stats().total.requests == 2);
  CHECK(mock.stats().status_count(503) == 1);
  const double cpu = mock.stop();
  CHECK(cpu >= 0);
  CHECK(mock.stop() == cpu);  // idempotent
}
