// Tests of what keel::llm::client puts on the wire and makes of odd answers, over loopback: AWS
// retry modes and Bedrock's invocation ids, generation parameters, redirects, 413s and oversized
// answers, credential redaction, and an entry's private CA.
#include "llm_client_support.hpp"
#include "tls_support.hpp"

#include <keel/llm/client.hpp>
#include <keel/llm/error.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/streambuf.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
using keel::testing::fault_kind;
using keel::testing::fault_plan;
using keel_test::client::make_config;
using keel_test::client::one_retrying_entry;
using keel_test::client::request;
using keel_test::client::run;
using keel_test::client::two_entries;

/// A server on 127.0.0.1:0 (optionally TLS) that answers every request with the same raw HTTP
/// response, keeping the connection open; it counts the requests it read.
class canned_server {
 public:
  canned_server(asio::io_context& ctx, std::string answer, asio::ssl::context* tls = nullptr)
      : acceptor_(ctx, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)),
        answer_(std::move(answer)),
        tls_(tls) {
    asio::co_spawn(ctx, accept_loop(), asio::detached);
  }
  std::string base_url() const {
    return std::string(tls_ ? "https" : "http") +
           "://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port());
  }
  int requests = 0;

 private:
  asio::awaitable<void> accept_loop() {
    for (;;) {
      auto [ec, sock] = co_await acceptor_.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) {
        co_return;
      }
      asio::co_spawn(acceptor_.get_executor(), session(std::move(sock)), asio::detached);
    }
  }
  template <class Stream>
  asio::awaitable<void> serve(Stream& s) {
    boost::beast::flat_buffer buf;
    for (;;) {
      boost::beast::http::request_parser<boost::beast::http::string_body> p;
      p.body_limit(64 * 1024 * 1024);
      auto [ec, n] =
          co_await boost::beast::http::async_read(s, buf, p, asio::as_tuple(asio::use_awaitable));
      if (ec) {
        co_return;
      }
      ++requests;
      auto [wec, wn] =
          co_await asio::async_write(s, asio::buffer(answer_), asio::as_tuple(asio::use_awaitable));
      if (wec) {
        co_return;
      }
    }
  }
  asio::awaitable<void> session(asio::ip::tcp::socket sock) {
    if (!tls_) {
      co_await serve(sock);
      co_return;
    }
    asio::ssl::stream<asio::ip::tcp::socket> s(std::move(sock), *tls_);
    auto [ec] = co_await s.async_handshake(asio::ssl::stream_base::server,
                                           asio::as_tuple(asio::use_awaitable));
    if (!ec) {
      co_await serve(s);
    }
  }

  asio::ip::tcp::acceptor acceptor_;
  std::string answer_;
  asio::ssl::context* tls_;
};

/// A raw HTTP/1.1 response.
std::string http_answer(int status, const std::string& reason, const std::string& body,
                        const std::string& headers = "") {
  return "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\n" + headers +
         "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\n\r\n" + body;
}

/// An OpenAI chat completion whose answer is `text` from `model`.
std::string openai_ok(const std::string& text, const std::string& model = "m") {
  return nlohmann::json{
      {"id", "chatcmpl-1"},
      {"object", "chat.completion"},
      {"model", model},
      {"choices", nlohmann::json::array({{{"index", 0},
                                          {"message", {{"role", "assistant"}, {"content", text}}},
                                          {"finish_reason", "stop"}}})},
      {"usage", {{"prompt_tokens", 1}, {"completion_tokens", 1}, {"total_tokens", 2}}}}
      .dump();
}

// A Bedrock stand-in on 127.0.0.1:0 that records each request's headers (lower-case names) and
// answers the first `failures` with 503 ServiceUnavailableException, then 200.
struct recording_bedrock {
  explicit recording_bedrock(asio::io_context& ctx, int fail_first)
      : acceptor(ctx, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)),
        failures(fail_first) {
    asio::co_spawn(ctx, accept(), asio::detached);
  }
  std::string base_url() const {
    return "http://127.0.0.1:" + std::to_string(acceptor.local_endpoint().port());
  }

  asio::ip::tcp::acceptor acceptor;
  int failures;
  std::vector<std::map<std::string, std::string>> requests;

  asio::awaitable<void> accept() {
    for (;;) {
      auto sock = co_await acceptor.async_accept(asio::use_awaitable);
      asio::co_spawn(acceptor.get_executor(), serve(std::move(sock)), asio::detached);
    }
  }

  asio::awaitable<void> serve(asio::ip::tcp::socket sock) {
    asio::streambuf buf;
    boost::system::error_code ec;
    for (;;) {
      const std::size_t head = co_await asio::async_read_until(
          sock, buf, "\r\n\r\n", asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        co_return;
      }
      std::string text(asio::buffers_begin(buf.data()), asio::buffers_begin(buf.data()) + head);
      buf.consume(head);
      std::map<std::string, std::string> fields;
      std::istringstream lines(text);
      std::string line;
      std::getline(lines, line);  // request line
      while (std::getline(lines, line) && line != "\r") {
        const auto colon = line.find(':');
        std::string name = line.substr(0, colon);
        std::transform(name.begin(), name.end(), name.begin(),
                       [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
        std::string value = line.substr(colon + 1);
        value.erase(0, value.find_first_not_of(' '));
        value.erase(value.find_last_not_of("\r") + 1);
        fields[name] = value;
      }
      const std::size_t length = std::stoul(fields["content-length"]);
      if (buf.size() < length) {
        co_await asio::async_read(sock, buf, asio::transfer_exactly(length - buf.size()),
                                  asio::redirect_error(asio::use_awaitable, ec));
        if (ec) {
          co_return;
        }
      }
      buf.consume(length);
      requests.push_back(std::move(fields));
      const bool fail = static_cast<int>(requests.size()) <= failures;
      const std::string body =
          fail ? R"({"message":"busy"})"
               : R"({"output":{"message":{"role":"assistant","content":[{"text":"hi"}]}},)"
                 R"("stopReason":"end_turn","usage":{"inputTokens":3,"outputTokens":1}})";
      std::string res = fail ? "HTTP/1.1 503 Service Unavailable\r\n"
                               "x-amzn-ErrorType: ServiceUnavailableException\r\n"
                             : "HTTP/1.1 200 OK\r\n";
      res += "content-type: application/json\r\ncontent-length: " + std::to_string(body.size()) +
             "\r\n\r\n" + body;
      co_await asio::async_write(sock, asio::buffer(res),
                                 asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        co_return;
      }
    }
  }
};

}  // namespace

TEST_CASE("an entry in an AWS retry mode uses its total attempts", "[llm_client]") {
  asio::io_context ctx;
  keel::testing::mock_llm_server server(ctx);
  server.set_plan("m", fault_plan{}.with_probability(fault_kind::unavailable, 1.0));
  server.start();
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  std::vector<int> retried_attempts;
  keel::llm::client_hooks hooks;
  hooks.on_retry = [&](const keel::llm::retry_report& r) {
    retried_attempts.push_back(r.attempt);
    CHECK(r.delay <= std::chrono::seconds(1) * (1 << (r.attempt - 1)));
  };
  keel::llm::client client(
      ctx.get_executor(),
      make_config(R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "k",
                                        "mode": "legacy", "total_max_attempts": 3}],
                      "policy": {"breaker": {"enabled": false}}})",
                  server.base_url()),
      http, buckets, hooks, 3);
  const auto out = run(ctx, client, {request()});
  REQUIRE(out[0].error);
  CHECK(out[0].attempts == 3);
  CHECK(keel::llm::error_class(out[0].error) == "overloaded");
  CHECK(keel::llm::error_status(out[0].error) == 503);
  CHECK(retried_attempts == std::vector<int>{1, 2});
  CHECK(server.stats().model("m").requests == 3);
}

TEST_CASE("every Bedrock attempt carries the call's invocation id and attempt=N; max=M",
          "[llm_client][aws]") {
  for (const char* mode : {R"("mode": "standard", )", ""}) {
    INFO((*mode ? "AWS standard" : "AWS legacy (bedrock default)"));
    asio::io_context ctx;
    recording_bedrock server(ctx, 1);
    keel::http::client http(ctx.get_executor(), {});
    keel::llm::bucket_registry buckets(ctx.get_executor());
    keel::llm::client client(
        ctx.get_executor(),
        make_config(std::string(R"({"config_list": [{"api_type": "bedrock", "model": "m",
                                        "aws_region": "us-east-1", )") +
                        mode + R"("total_max_attempts": 4}],
                      "policy": {"breaker": {"enabled": false},
                                 "retry": {"backoff": {"kind": "constant", "base": 0.001}}}})",
                    server.base_url()),
        http, buckets, {}, 3);
    const auto out = run(ctx, client, {request(), request()});
    REQUIRE_FALSE(out[0].error);
    REQUIRE_FALSE(out[1].error);
    // Item 1: a 503 then 200 (one real backoff of at most 1 s: AWS modes use the client's seeded
    // jitter on the steady clock); item 2: 200.
    REQUIRE(server.requests.size() == 3);
    const std::string id = server.requests[0]["amz-sdk-invocation-id"];
    CHECK(id.size() == 36);
    for (int i = 0; i < 2; ++i) {
      CHECK(server.requests[i]["amz-sdk-invocation-id"] == id);
      CHECK(server.requests[i]["amz-sdk-request"] ==
            "attempt=" + std::to_string(i + 1) + "; max=4");
      CHECK(server.requests[i]["authorization"].find("amz-sdk-invocation-id;amz-sdk-request") !=
            std::string::npos);
    }
    CHECK(server.requests[2]["amz-sdk-invocation-id"].size() == 36);
    CHECK(server.requests[2]["amz-sdk-invocation-id"] != id);  // a new call, a new id
    CHECK(server.requests[2]["amz-sdk-request"] == "attempt=1; max=4");
  }
}

TEST_CASE("generation parameters reach the wire: the request's over the entry's", "[llm_client]") {
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
  auto req = keel::llm::chat_request::from_prompt("", "hi", 32);
  req.temperature = 1.5;
  req.stop = {"A", "B"};
  const auto out = run(ctx, client, {req});
  REQUIRE(out[0].response);
  const auto sent = nlohmann::json::parse(server.stats().model("o3-mini").last_body);
  CHECK(sent.at("temperature") == 1.5);                // the request's
  CHECK(sent.at("stop") == nlohmann::json{"A", "B"});  // the request's
  CHECK(sent.at("top_p") == 0.9);                      // the entry's
  CHECK(sent.at("seed") == 7);                         // the entry's
  CHECK(sent.at("max_completion_tokens") == 32);       // a reasoning model
  CHECK_FALSE(sent.contains("max_tokens"));
}

TEST_CASE("redirects, 413s and oversized answers get their own class and are not retried",
          "[llm_client]") {
  struct row {
    std::string answer;
    std::string cls;
  };
  const std::string too_large_body = nlohmann::json{
      {"error",
       {{"message", "Request too large"},
        {"type", "invalid_request_error"},
        {"code", nullptr}}}}.dump();
  const std::vector<row> rows{
      {http_answer(301, "Moved Permanently", "",
                   "Location: https://api.example/v1/chat/completions?key=SECRETQUERY\r\n"),
       "redirect"},
      {http_answer(307, "Temporary Redirect", "", "Location: /elsewhere\r\n"), "redirect"},
      {http_answer(413, "Payload Too Large", too_large_body), "request_too_large"},
      {http_answer(200, "OK", std::string(4096, ' ') + openai_ok("x")), "response_too_large"},
  };
  for (const auto& r : rows) {
    INFO(r.answer.substr(0, 40));
    asio::io_context ctx;
    canned_server srv(ctx, r.answer);
    keel::http::client_options ho;
    ho.max_response_body = 1024;
    keel::http::client http(ctx.get_executor(), ho);
    keel::llm::bucket_registry buckets(ctx.get_executor());
    keel::llm::client client(ctx.get_executor(), make_config(one_retrying_entry, srv.base_url()),
                             http, buckets, {}, 1);
    const auto out = run(ctx, client, {request()});
    REQUIRE(out[0].error);
    CHECK(keel::llm::error_class(out[0].error) == r.cls);
    const auto j = keel::llm::error_json(out[0].error);
    CHECK(j["class"] == r.cls);
    CHECK(j["condition"] == "permanent");
    CHECK(out[0].attempts == 1);
    CHECK(srv.requests == 1);
    if (r.cls == "redirect") {
      CHECK_THAT(j["message"].get<std::string>(), Catch::Contains("redirected to "));
      CHECK_THAT(j.dump(), !Catch::Contains("SECRETQUERY"));
    }
  }
}

TEST_CASE("a server that ignores stream: true and answers one JSON body still streams",
          "[llm_client][stream][review]") {
  // vLLM-style servers and proxies that drop "stream": it was read as a stream that ended
  // before [DONE], a transient failure retried to the attempt cap (and charged to the breaker).
  asio::io_context ctx;
  canned_server srv(ctx, http_answer(200, "OK", openai_ok("whole body", "served-model")));
  keel::http::client http(ctx.get_executor(), keel::http::client_options{});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client client(ctx.get_executor(), make_config(one_retrying_entry, srv.base_url()),
                           http, buckets, {}, 1);
  std::string text;
  int deltas = 0;
  keel::llm::call_outcome out;
  asio::co_spawn(
      ctx,
      [&]() -> asio::awaitable<void> {
        out = co_await client.stream_call(
            request(), [&](const keel::llm::stream_delta& d) -> asio::awaitable<void> {
              text += d.text;
              ++deltas;
              co_return;
            });
        ctx.stop();
      },
      asio::detached);
  ctx.run();
  INFO((out.error ? keel::llm::error_class(out.error) : "ok"));
  REQUIRE_FALSE(out.error);
  CHECK(text == "whole body");
  CHECK(deltas == 1);
  REQUIRE(out.response);
  CHECK(out.response->text == "whole body");
  CHECK(out.response->model == "served-model");
  CHECK(out.response->finish_reason == "stop");
  CHECK(out.response->usage.output == 1);
  CHECK(out.attempts == 1);
  CHECK(srv.requests == 1);
}

TEST_CASE("the mock answers an oversized request 413 and keel does not retry it", "[llm_client]") {
  // Beast's default 1 MiB request limit used to make the mock drop the connection: keel saw a
  // reset and retried a request that can never succeed, as `connection`.
  for (const std::size_t limit : {std::size_t{1024 * 1024}, std::size_t{4096}}) {
    INFO(limit);
    asio::io_context ctx;
    keel::testing::mock_options mo;
    mo.max_request_body = limit;
    keel::testing::mock_llm_server server(ctx, mo);
    server.start();
    keel::http::client http(ctx.get_executor(), {});
    keel::llm::bucket_registry buckets(ctx.get_executor());
    keel::llm::client client(ctx.get_executor(), make_config(two_entries, server.base_url()), http,
                             buckets, {}, 1);
    const auto out = run(ctx, client, {request(std::string(limit * 2, 'x')), request()});
    REQUIRE(out[0].error);
    CHECK(keel::llm::error_class(out[0].error) == "request_too_large");
    CHECK(keel::llm::error_json(out[0].error)["status"] == 413);
    // One attempt per entry (the fallback is refused the same way), no retry.
    CHECK(out[0].attempts == 2);
    CHECK(server.stats().status_count(413) == 2);
    // A normal request afterwards is answered.
    CHECK_FALSE(out[1].error);
  }
}

TEST_CASE("a reply that echoes a credential is redacted before it leaves the client",
          "[llm_client]") {
  asio::io_context ctx;
  const std::string key = "sk-test-ECHO12345678";
  canned_server srv(
      ctx, http_answer(200, "OK",
                       openai_ok("your key is " + key + ", twice: " + key + "; k2", "gpt-" + key)));
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  const std::string cfg = R"({"config_list": [
      {"api_type": "openai", "model": "m", "api_key": ")" +
                          key + R"("},
      {"api_type": "openai", "model": "n", "api_key": "k2"}]})";
  keel::llm::client client(ctx.get_executor(), make_config(cfg, srv.base_url()), http, buckets, {},
                           1);
  const auto out = run(ctx, client, {request()});
  REQUIRE(out[0].response);
  CHECK(out[0].response->text == "your key is <redacted>, twice: <redacted>; k2");
  CHECK(out[0].response->model == "gpt-<redacted>");
}

TEST_CASE("a key in base_url's query that the server echoes is redacted from the error",
          "[llm_client][review]") {
  // Before: "... path /v1/chat/completions?key=LEAKQUERYKEY1 ..." reached records and callers.
  asio::io_context ctx;
  canned_server srv(
      ctx,
      http_answer(404, "Not Found",
                  R"X({"error":{"message":"Invalid URL (POST /v1/chat/completions?key=)X"
                  R"X(LEAKQUERYKEY1&api-version=2024-06-01)","type":"invalid_request_error"}})X"));
  keel::http::client http(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  keel::llm::client client(
      ctx.get_executor(),
      make_config(one_retrying_entry,
                  srv.base_url() + "/v1?key=LEAKQUERYKEY1&api-version=2024-06-01"),
      http, buckets, {}, 1);
  const auto out = run(ctx, client, {request()});
  REQUIRE(out[0].error);
  const std::string message = keel::llm::error_json(out[0].error)["message"].get<std::string>();
  CHECK(message.find("LEAKQUERYKEY1") == std::string::npos);
  CHECK(message.find("[redacted]") != std::string::npos);
  CHECK(message.find("2024-06-01") != std::string::npos);  // not a credential: kept
}

TEST_CASE("an entry's ca_file trusts a private CA; without it the server is refused as tls",
          "[llm_client]") {
  keel_test::test_pki pki;
  asio::io_context ctx;
  canned_server srv(ctx, http_answer(200, "OK", openai_ok("hello over TLS")), &pki.server_ctx);
  keel::llm::http_clients clients(ctx.get_executor(), {});
  keel::llm::bucket_registry buckets(ctx.get_executor());
  auto trusted = make_config(one_retrying_entry, srv.base_url());
  trusted.entries[0].ca_file = pki.ca_file;
  keel::llm::client with_ca(ctx.get_executor(), trusted, clients, buckets, {}, 1);
  const auto ok = run(ctx, with_ca, {request()});
  REQUIRE(ok[0].response);
  CHECK(ok[0].response->text == "hello over TLS");

  keel::llm::client without(ctx.get_executor(), make_config(one_retrying_entry, srv.base_url()),
                            clients, buckets, {}, 1);
  const auto refused = run(ctx, without, {request()});
  REQUIRE(refused[0].error);
  CHECK(keel::llm::error_class(refused[0].error) == "tls");
  const auto j = keel::llm::error_json(refused[0].error);
  CHECK(j["condition"] == "permanent");
  CHECK_THAT(j["message"].get<std::string>(), Catch::Contains("certificate chain did not verify"));
  CHECK(refused[0].attempts == 1);
  CHECK(srv.requests == 1);

  // One client per distinct CA file; a file that is not PEM fails naming it.
  CHECK(&clients.get(pki.ca_file) == &clients.get(pki.ca_file));
  CHECK(&clients.get(pki.ca_file) != &clients.get(""));
  const std::string not_pem = pki.ca_file + ".txt";
  { std::ofstream(not_pem) << "not a certificate\n"; }
  CHECK_THROWS_WITH(clients.get(not_pem), Catch::Contains(not_pem));
  std::filesystem::remove(not_pem);
}
