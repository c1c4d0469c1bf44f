// Tests for keel/aws/sdk_request.hpp: amz-sdk-invocation-id and amz-sdk-request on Bedrock calls.
#include <keel/aws/retry.hpp>
#include <keel/aws/sdk_request.hpp>
#include <keel/llm/aws_facts.hpp>
#include <keel/llm/complete.hpp>

#include "support.hpp"

#include <catch2/catch.hpp>

#include <set>
#include <string>
#include <vector>

using namespace keel_test;

namespace {

// Answers with its script's statuses in turn (a Bedrock 503, then 200s), recording every request
// as it was sent (headers already signed).
struct recording_sender {
  std::vector<int> statuses;
  std::vector<keel::http::request> sent;

  asio::awaitable<keel::http::response> send(keel::http::request req) {
    const std::size_t i = sent.size();
    sent.push_back(std::move(req));
    keel::http::response res;
    res.status = i < statuses.size() ? statuses[i] : 200;
    res.headers.set("content-type", "application/json");
    if (res.status == 503) {
      res.headers.set("x-amzn-errortype", "ServiceUnavailableException");
      res.body = R"({"message":"busy"})";
    } else {
      res.body = R"({"output":{"message":{"role":"assistant","content":[{"text":"hi"}]}},)"
                 R"("stopReason":"end_turn","usage":{"inputTokens":3,"outputTokens":1}})";
    }
    co_return res;
  }
};

keel::llm::chat_request hello() {
  return keel::llm::chat_request("m", {keel::llm::chat_message("user", "hello")}, 16);
}

const keel::llm::aws_credentials creds{"AKIDEXAMPLE", "secret-example", ""};

std::string header(const keel::http::request& r, std::string_view name) {
  const auto v = r.headers.find(name);
  return v ? std::string(*v) : std::string("<absent>");
}

}  // namespace

TEST_CASE("invocation ids are UUID v4 strings drawn from the seeded source", "[aws]") {
  keel::random_source a{7};
  keel::random_source b{7};
  const std::string id = keel::aws::make_invocation_id(a);
  CHECK(id == keel::aws::make_invocation_id(b));  // seeded: reproducible
  REQUIRE(id.size() == 36);
  for (std::size_t i : {8u, 13u, 18u, 23u}) {
    CHECK(id[i] == '-');
  }
  CHECK(id[14] == '4');                                          // version 4
  CHECK(std::string("89ab").find(id[19]) != std::string::npos);  // RFC 9562 variant
  CHECK(id.find_first_not_of("0123456789abcdef-") == std::string::npos);
  std::set<std::string> ids{id};
  for (int i = 0; i < 100; ++i) {
    ids.insert(keel::aws::make_invocation_id(a));
  }
  CHECK(ids.size() == 101);
}

TEST_CASE("an invocation numbers its attempts from 1 and keeps its id and maximum", "[aws]") {
  keel::aws::sdk_invocation call{"id-1", 3};
  CHECK(call.attempts() == 0);
  const auto first = call.next_attempt();
  const auto second = call.next_attempt();
  CHECK(first.invocation_id == "id-1");
  CHECK(second.invocation_id == "id-1");
  CHECK(first.header_value() == "attempt=1; max=3");
  CHECK(second.header_value() == "attempt=2; max=3");
  CHECK(keel::aws::sdk_invocation("x", 0).next_attempt().header_value() == "attempt=1; max=1");
}

TEST_CASE("complete sends the SDK headers on a Bedrock request and signs them", "[aws][llm]") {
  asio::io_context ctx;
  recording_sender sender;
  const keel::llm::endpoint ep(keel::llm::provider_kind::bedrock, "http://127.0.0.1:1", "",
                               "us-east-1");
  outcome<keel::llm::chat_response> out;
  spawn(ctx,
        keel::llm::complete(
            sender, ep, hello(), creds,
            keel::aws::sdk_request_info("0f8fad5b-d9cb-469f-a165-70867728950e", 2, 4)),
        out);
  ctx.run();
  REQUIRE(out.done);
  REQUIRE_FALSE(out.error);
  REQUIRE(sender.sent.size() == 1);
  const auto& r = sender.sent[0];
  CHECK(header(r, "amz-sdk-invocation-id") == "0f8fad5b-d9cb-469f-a165-70867728950e");
  CHECK(header(r, "amz-sdk-request") == "attempt=2; max=4");
  // As the AWS SDK for JavaScript v3 and botocore: added before signing, not excluded.
  const std::string auth = header(r, "authorization");
  INFO(auth);
  CHECK(auth.find("SignedHeaders=accept;amz-sdk-invocation-id;amz-sdk-request;content-type;") !=
        std::string::npos);

  SECTION("without SDK info, or for another provider, nothing is added") {
    recording_sender plain;
    outcome<keel::llm::chat_response> o1;
    spawn(ctx, keel::llm::complete(plain, ep, hello(), creds), o1);
    ctx.restart();
    ctx.run();
    REQUIRE(plain.sent.size() == 1);
    CHECK(header(plain.sent[0], "amz-sdk-request") == "<absent>");
    CHECK(header(plain.sent[0], "amz-sdk-invocation-id") == "<absent>");
  }
}

TEST_CASE("every attempt of a retried Bedrock call carries one invocation id and its number",
          "[aws][llm]") {
  manual_clock::reset();
  asio::io_context ctx;
  recording_sender sender{{503, 503}, {}};
  const keel::llm::endpoint ep(keel::llm::provider_kind::bedrock, "http://127.0.0.1:1", "",
                               "us-east-1");
  keel::aws::retry_strategy strategy{
      keel::aws::resolved_retry_config{keel::aws::retry_mode::standard, 3},
      keel::aws::now_seconds<manual_clock>()};
  keel::random_source rng{42};
  keel::aws::sdk_invocation call{keel::aws::make_invocation_id(rng), strategy.total_max_attempts()};
  keel::aws::aws_retry_options opts;
  opts.facts = keel::llm::aws_attempt_facts;
  opts.rand = [] { return 0.0; };
  outcome<keel::llm::chat_response> out;
  spawn(ctx,
        keel::aws::with_retry<manual_clock>(
            [&] { return keel::llm::complete(sender, ep, hello(), creds, call.next_attempt()); },
            strategy, opts),
        out);
  REQUIRE(keel::testing::run_until(ctx, [&] { return out.done; }));
  REQUIRE_FALSE(out.error);
  REQUIRE(sender.sent.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) {
    INFO("attempt " << i + 1);
    CHECK(header(sender.sent[i], "amz-sdk-invocation-id") == call.id());
    CHECK(header(sender.sent[i], "amz-sdk-request") ==
          "attempt=" + std::to_string(i + 1) + "; max=3");
  }
  CHECK(call.id().size() == 36);
}
