// Tests that what a JSONL item of the keel command carries reaches the wire through
// keel::llm::client (the client itself is tested in test_llm_client*.cpp).
#include "jsonl.hpp"
#include "llm_client_support.hpp"

#include <keel/llm/client.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <variant>

namespace {

namespace asio = boost::asio;
using keel_test::client::make_config;
using keel_test::client::run;

}  // namespace

TEST_CASE("generation parameters reach the wire: the item's over the entry's", "[cli_client]") {
  // AG2 config lists carry temperature, top_p, stop, seed and price; keel refused them (issue 13).
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client client(
      ctx.get_executor(),
      make_config(R"([{"model": "o3-mini", "api_key": "k", "temperature": 0.2, "top_p": 0.9,
                       "stop": "END", "seed": 7, "price": [1.0, 2.0]}])",
                  server.base_url()),
      http, buckets, {}, 1);
  auto r = keel::cli::parse_input_line(
      R"({"id": 1, "prompt": "hi", "max_tokens": 32, "temperature": 1.5, "stop": ["A", "B"]})", 1,
      1024);
  REQUIRE(std::holds_alternative<keel::cli::batch_item>(r));
  const auto out = run(ctx, client, {std::get<keel::cli::batch_item>(r).request});
  REQUIRE(out[0].response);
  const auto sent = nlohmann::json::parse(server.stats().model("o3-mini").last_body);
  CHECK(sent.at("temperature") == 1.5);                // the item's
  CHECK(sent.at("stop") == nlohmann::json{"A", "B"});  // the item's
  CHECK(sent.at("top_p") == 0.9);                      // the entry's
  CHECK(sent.at("seed") == 7);                         // the entry's
  CHECK(sent.at("max_completion_tokens") == 32);       // a reasoning model
  CHECK_FALSE(sent.contains("max_tokens"));
}
