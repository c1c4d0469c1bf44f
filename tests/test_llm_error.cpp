// Tests for keel/llm/error.hpp: the keel.llm category, provider_error and redaction.
#include <keel/classify.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>
#include <keel/rate_controller.hpp>

#include <catch2/catch.hpp>

#include <string>

using namespace std::chrono_literals;
using keel::llm::errc;

TEST_CASE("every keel.llm code maps to the condition a caller should act on", "[llm][error]") {
  struct row {
    errc code;
    keel::condition cond;
  };
  const row table[] = {
      {errc::rate_limited, keel::condition::throttled},
      {errc::quota_exhausted, keel::condition::permanent},
      {errc::overloaded, keel::condition::transient},
      {errc::server_error, keel::condition::transient},
      {errc::timeout, keel::condition::timeout},
      {errc::transport, keel::condition::transient},
      {errc::context_length_exceeded, keel::condition::permanent},
      {errc::content_filtered, keel::condition::permanent},
      {errc::auth, keel::condition::permanent},
      {errc::bad_request, keel::condition::permanent},
      {errc::not_found, keel::condition::permanent},
      {errc::malformed_response, keel::condition::permanent},
      {errc::request_too_large, keel::condition::permanent},
      {errc::redirect, keel::condition::permanent},
  };
  for (const auto& r : table) {
    INFO(keel::llm::to_string(r.code));
    const boost::system::error_code ec = make_error_code(r.code);
    CHECK(ec == r.cond);
    CHECK(keel::condition_of(ec) == r.cond);
    CHECK(keel::llm::condition_of(r.code) == r.cond);
    CHECK(std::string(ec.category().name()) == "keel.llm");
    CHECK_FALSE(ec.message().empty());
  }
  CHECK_FALSE(keel::is_retryable(keel::condition_of(make_error_code(errc::quota_exhausted))));
}

TEST_CASE("classify reads condition and retry_after from a provider_error", "[llm][error]") {
  keel::llm::provider_error_info info(429, "openai", "rate_limit_exceeded", "Rate limit reached");
  info.request_id = "req_123";
  info.retry_after = std::chrono::nanoseconds(1500ms);
  auto ep = std::make_exception_ptr(keel::llm::provider_error(errc::rate_limited, info));
  auto c = keel::classify(ep);
  CHECK(c.condition == keel::condition::throttled);
  REQUIRE(c.retry_after.has_value());
  CHECK(*c.retry_after == 1500ms);
  CHECK(c.code == errc::rate_limited);

  auto quota = std::make_exception_ptr(keel::llm::provider_error(
      errc::quota_exhausted, {429, "openai", "insufficient_quota", "You exceeded your quota"}));
  CHECK(keel::classify(quota).condition == keel::condition::permanent);
  CHECK_FALSE(keel::classify(quota).retry_after.has_value());
}

TEST_CASE("provider_error keeps the provider's fields and says them in one line", "[llm][error]") {
  keel::llm::provider_error_info info(529, "anthropic", "overloaded_error", "Overloaded\nnow");
  info.request_id = "req_abc";
  info.should_retry = true;
  keel::llm::provider_error e(errc::overloaded, info);
  CHECK(e.llm_code() == errc::overloaded);
  CHECK(e.status() == 529);
  CHECK(e.provider() == "anthropic");
  CHECK(e.provider_code() == "overloaded_error");
  CHECK(e.request_id() == "req_abc");
  CHECK(e.should_retry() == std::optional<bool>(true));
  CHECK(std::string(e.what()) ==
        "anthropic: overloaded (HTTP 529 overloaded_error): Overloaded now [request req_abc]");
}

TEST_CASE("provider_error never puts a secret in what()", "[llm][error]") {
  keel::llm::provider_error e(
      errc::auth, {401, "openai", "invalid_api_key",
                   "Incorrect API key provided: sk-proj-abcdEFGH1234. Header Bearer tok_secret "
                   "key AKIAIOSFODNN7EXAMPLE"});
  const std::string w = e.what();
  CHECK(w.find("sk-proj") == std::string::npos);
  CHECK(w.find("tok_secret") == std::string::npos);
  CHECK(w.find("AKIAIOSFODNN7EXAMPLE") == std::string::npos);
  CHECK(w.find("[redacted]") != std::string::npos);
  CHECK(w.find("Incorrect API key provided") != std::string::npos);
  CHECK(keel::llm::redact(std::string(1000, 'x')).size() == 303);
  // Redacting twice changes nothing (before: "Bearer [[redacted]]" in keel serve's answers).
  const std::string once = keel::llm::redact("Header Bearer tok_secret and sk-proj-abcdEFGH1234");
  CHECK(once == "Header Bearer [redacted] and [redacted]");
  CHECK(keel::llm::redact(once) == once);
  CHECK(keel::llm::redact("Bearer <redacted>") == "Bearer <redacted>");
}

TEST_CASE("without_secrets masks what a content filter's answer held", "[llm][review]") {
  keel::llm::chat_response partial;
  partial.text = "your key is sk-ECHOED-0001";
  partial.refusal = "not with sk-ECHOED-0001";
  keel::llm::provider_error_info info(200, "openai", "", "finish_reason content_filter");
  info.filtered_reply = std::make_shared<const keel::llm::chat_response>(partial);
  const keel::llm::provider_error e(errc::content_filtered, std::move(info));
  const auto masked = keel::llm::without_secrets(e, {"sk-ECHOED-0001"});
  REQUIRE(masked.info().filtered_reply != nullptr);
  CHECK(masked.info().filtered_reply->text == "your key is [redacted]");
  CHECK(masked.info().filtered_reply->refusal == "not with [redacted]");
  CHECK(e.info().filtered_reply->text == partial.text);  // a copy was masked
  // Whole occurrences only: a reply ending in "..." is not cut as a truncated message is.
  partial.text = std::string(400, 'a') + " keys look like sk-ECHO...";
  keel::llm::provider_error_info long_info(200, "openai", "", "filtered");
  long_info.filtered_reply = std::make_shared<const keel::llm::chat_response>(partial);
  const auto kept = keel::llm::without_secrets(
      keel::llm::provider_error(errc::content_filtered, std::move(long_info)), {"sk-ECHOED-0001"});
  CHECK(kept.info().filtered_reply->text == partial.text);
}

TEST_CASE("url_credentials finds the query values that name a credential", "[llm][review]") {
  CHECK(keel::llm::url_credentials("http://h/v1?api-version=2024-06-01&key=abc%2Bdef%2B&x=y&"
                                   "X-Amz-Signature=s1gnature&auth=true&token") ==
        std::vector<std::string>{"abc%2Bdef%2B", "abc+def+", "s1gnature"});  // "true": too short
  // A decoded form under 8 bytes is not kept either.
  CHECK(keel::llm::url_credentials("http://h/?key=abc%2Bd1") ==
        std::vector<std::string>{"abc%2Bd1"});
  CHECK(keel::llm::url_credentials("http://h/v1").empty());
}

TEST_CASE("redact keeps a URL's port and path, and still masks a key in a path", "[llm][review]") {
  CHECK(
      keel::llm::redact("connect failed (POST http://127.0.0.1:20999/openai/deployments/gpt4o)") ==
      "connect failed (POST http://127.0.0.1:20999/openai/deployments/gpt4o)");
  // A key-like path segment run after the port is still masked.
  CHECK(keel::llm::redact("GET http://h:8080/k/abcdefghijklmnopqrstuvwxyz0123456789AB") ==
        "GET http://h:8080[redacted]");
  // Not a port: a long token after a colon is judged whole.
  CHECK(keel::llm::redact("key:1234567/abcdefghijklmnopqrstuvwxyz0123456789") == "key:[redacted]");
}

TEST_CASE("redact turns control characters into '?' so what() is never cut short",
          "[llm][review]") {
  const std::string text = std::string("line1") + '\0' +
                           "line2\x1b[31m\x07"
                           "end\nnext";
  const std::string out = keel::llm::redact(text);
  CHECK(out == "line1?line2?[31m?end next");
}

TEST_CASE("limit_of reads which limit a rate-limited answer names", "[llm][error]") {
  using keel::limit_kind;
  auto err = [](keel::llm::errc code, std::string provider_code, std::string message) {
    keel::llm::provider_error_info info;
    info.status = 429;
    info.provider = "openai";
    info.provider_code = std::move(provider_code);
    info.message = std::move(message);
    return keel::llm::provider_error(code, info);
  };
  using keel::llm::errc;
  CHECK(keel::llm::limit_of(err(errc::rate_limited, "rate_limit_exceeded",
                                "Rate limit reached for gpt-4o in organization org-x on tokens "
                                "per min (TPM): Limit 30000, Used 29800, Requested 400.")) ==
        limit_kind::tokens);
  CHECK(keel::llm::limit_of(err(errc::rate_limited, "rate_limit_exceeded",
                                "Rate limit reached for gpt-4o in organization org-x on requests "
                                "per min (RPM): Limit 500, Used 500, Requested 1.")) ==
        limit_kind::requests);
  CHECK(keel::llm::limit_of(err(errc::rate_limited, "rate_limit_error",
                                "This request would exceed your organization's rate limit of "
                                "50,000 input tokens per minute.")) == limit_kind::tokens);
  CHECK(keel::llm::limit_of(err(errc::rate_limited, "ThrottlingException",
                                "Too many tokens, please wait before trying again.")) ==
        limit_kind::tokens);
  CHECK(keel::llm::limit_of(err(errc::rate_limited, "ThrottlingException",
                                "Too many requests, please wait before trying again.")) ==
        limit_kind::requests);
  // A proxy that says nothing useful.
  CHECK(keel::llm::limit_of(err(errc::rate_limited, "", "Slow down")) == limit_kind::unknown);
  // Not a rate limit at all: an exhausted quota says "tokens" too, but is permanent.
  CHECK(keel::llm::limit_of(err(errc::quota_exhausted, "insufficient_quota",
                                "You exceeded your current quota of tokens.")) ==
        limit_kind::unknown);
}
