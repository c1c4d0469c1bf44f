// Tests for keel/llm/sigv4.hpp against AWS's published SigV4 test-suite values.
#include <keel/llm/sigv4.hpp>

#include <catch2/catch.hpp>

#include <cstdlib>
#include <stdexcept>
#include <string>

using namespace std::chrono_literals;
namespace sigv4 = keel::llm::sigv4;

namespace {
// 20150830T123600Z, the test suite's signing time.
const auto suite_time = std::chrono::system_clock::time_point(
    std::chrono::duration_cast<std::chrono::system_clock::duration>(1440938160s));
const keel::llm::aws_credentials suite_creds("AKIDEXAMPLE",
                                             "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
const std::string empty_hash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const std::string suite_prefix =
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=";

keel::http::request suite_request(const char* method, const char* url) {
  keel::http::request r(method, url);
  r.set("Host", "example.amazonaws.com");
  r.set("X-Amz-Date", "20150830T123600Z");
  return r;
}
}  // namespace

TEST_CASE("sigv4 derives AWS's documented signing keys", "[llm][sigv4]") {
  // "Deriving the signing key" example (20120215).
  CHECK(sigv4::hex(sigv4::signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215",
                                      "us-east-1", "iam")) ==
        "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d");
  // The IAM ListUsers worked example's kSigning (20150830).
  CHECK(sigv4::hex(sigv4::signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830",
                                      "us-east-1", "iam")) ==
        "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9");
  CHECK(sigv4::hex(sigv4::signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830",
                                      "us-east-1", "service")) ==
        "938127b5336810ddb6a5d6af445fcac9e371f9ed418ed386b022aed82901be75");
  CHECK(sigv4::sha256_hex("") == empty_hash);
  CHECK(sigv4::amz_date(suite_time) == "20150830T123600Z");
}

TEST_CASE("sigv4 get-vanilla matches the test suite step by step", "[llm][sigv4]") {
  auto req = suite_request("GET", "https://example.amazonaws.com/");
  const std::string creq = sigv4::canonical_request(req, empty_hash, "service");
  CHECK(creq ==
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n" +
            empty_hash);
  const std::string scope = sigv4::scope("20150830", "us-east-1", "service");
  CHECK(scope == "20150830/us-east-1/service/aws4_request");
  CHECK(sigv4::string_to_sign("20150830T123600Z", scope, creq) ==
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63");

  keel::http::request signed_req("GET", "https://example.amazonaws.com/");
  keel::llm::sign_request(signed_req, suite_creds, "us-east-1", "service", suite_time);
  CHECK(signed_req.headers.find("authorization") ==
        std::optional<std::string_view>(
            suite_prefix + "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"));
  CHECK(signed_req.headers.find("x-amz-date") ==
        std::optional<std::string_view>("20150830T123600Z"));
  CHECK(signed_req.headers.find("host") ==
        std::optional<std::string_view>("example.amazonaws.com"));
}

TEST_CASE("sigv4 post-vanilla and query ordering match the test suite", "[llm][sigv4]") {
  auto post = suite_request("POST", "https://example.amazonaws.com/");
  const std::string creq = sigv4::canonical_request(post, empty_hash, "service");
  CHECK(
      sigv4::string_to_sign("20150830T123600Z", "20150830/us-east-1/service/aws4_request", creq) ==
      "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
      "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87");
  keel::llm::sign_request(post, suite_creds, "us-east-1", "service", suite_time);
  CHECK(post.headers.find("authorization") ==
        std::optional<std::string_view>(
            suite_prefix + "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"));

  keel::http::request q("GET", "https://example.amazonaws.com/?Param2=value2&Param1=value1");
  CHECK(sigv4::canonical_request(q, empty_hash, "service")
            .starts_with("GET\n/\nParam1=value1&Param2=value2\n"));
  keel::llm::sign_request(q, suite_creds, "us-east-1", "service", suite_time);
  CHECK(q.headers.find("authorization") ==
        std::optional<std::string_view>(
            suite_prefix + "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"));
}

TEST_CASE("sigv4 matches AWS's IAM ListUsers worked example", "[llm][sigv4]") {
  keel::http::request r("GET", "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08");
  r.set("Content-Type", "application/x-www-form-urlencoded; charset=utf-8");
  keel::llm::sign_request(r, suite_creds, "us-east-1", "iam", suite_time);
  const std::string creq = sigv4::canonical_request(r, empty_hash, "iam");
  CHECK(sigv4::sha256_hex(creq) ==
        "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59");
  CHECK(r.headers.find("authorization") ==
        std::optional<std::string_view>(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-date, "
            "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"));
}

TEST_CASE("sigv4 canonicalises paths, queries and header values", "[llm][sigv4]") {
  keel::http::request r("POST",
                        "https://bedrock-runtime.us-east-1.amazonaws.com:443/model/"
                        "anthropic.claude-v2%3A1/converse?b=2&a=x%20y&a=1&flag");
  r.set("Content-Type", "application/json");
  r.headers.add("X-Multi", "  one   two ");
  r.headers.add("x-multi", "three");
  r.set("User-Agent", "keel");
  const std::string creq = sigv4::canonical_request(r, "HASH", "bedrock");
  CHECK(creq ==
        "POST\n/model/anthropic.claude-v2%253A1/converse\na=1&a=x%20y&b=2&flag=\n"
        "content-type:application/json\nhost:bedrock-runtime.us-east-1.amazonaws.com\n"
        "x-multi:one two,three\n\ncontent-type;host;x-multi\nHASH");
  CHECK(sigv4::canonical_request(r, "HASH", "s3").find("/model/anthropic.claude-v2%3A1/") !=
        std::string::npos);
  keel::http::request port("GET", "http://127.0.0.1:9000");
  CHECK(sigv4::canonical_request(port, "H", "bedrock") ==
        "GET\n/\n\nhost:127.0.0.1:9000\n\nhost\nH");
  keel::http::request bad("GET", "/relative");
  CHECK_THROWS_AS(sigv4::canonical_request(bad, "H", "bedrock"), std::invalid_argument);
}

TEST_CASE("sign_request adds the session token and content hash and can re-sign", "[llm][sigv4]") {
  keel::llm::aws_credentials temp("ASIAEXAMPLE", "secret/key+EXAMPLE", "TOKEN123");
  keel::http::request r("POST", "https://bedrock-runtime.us-east-1.amazonaws.com/model/m/converse");
  r.body = R"({"messages":[]})";
  keel::llm::sign_request(r, temp, "us-east-1", "bedrock", suite_time,
                          {.add_content_sha256 = true});
  CHECK(r.headers.find("x-amz-security-token") == std::optional<std::string_view>("TOKEN123"));
  CHECK(r.headers.find("x-amz-content-sha256") ==
        std::optional<std::string_view>(keel::llm::sigv4::sha256_hex(r.body)));
  const std::string auth1(*r.headers.find("authorization"));
  CHECK(auth1.find("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token") !=
        std::string::npos);
  CHECK(auth1.find("Credential=ASIAEXAMPLE/20150830/us-east-1/bedrock/aws4_request") !=
        std::string::npos);
  for (const auto& [name, value] : r.headers.fields()) {
    CHECK(value.find("secret/key") == std::string::npos);
  }
  // Re-signing (a retry) replaces the previous signature instead of adding a second one.
  keel::llm::sign_request(r, temp, "us-east-1", "bedrock", suite_time + 1s,
                          {.add_content_sha256 = true});
  int auth_fields = 0;
  for (const auto& [name, value] : r.headers.fields()) {
    auth_fields += keel::http::iequals(name, "authorization") ? 1 : 0;
  }
  CHECK(auth_fields == 1);
  CHECK(*r.headers.find("authorization") != auth1);
  CHECK(r.headers.find("x-amz-date") == std::optional<std::string_view>("20150830T123601Z"));

  keel::llm::aws_credentials none("", "secret-value");
  try {
    keel::llm::sign_request(r, none, "us-east-1", "bedrock", suite_time);
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    CHECK(std::string(e.what()).find("secret-value") == std::string::npos);
  }
}

TEST_CASE("AWS credentials come from the standard environment variables", "[llm][sigv4]") {
  ::setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE", 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env", 1);
  ::setenv("AWS_SESSION_TOKEN", "token-from-env", 1);
  auto c = keel::llm::aws_credentials_from_environment();
  REQUIRE(c);
  CHECK(c->access_key == "AKIDEXAMPLE");
  CHECK(c->secret_key == "secret-from-env");
  CHECK(c->session_token == "token-from-env");
  ::unsetenv("AWS_SECRET_ACCESS_KEY");
  CHECK_FALSE(keel::llm::aws_credentials_from_environment());
  ::unsetenv("AWS_ACCESS_KEY_ID");
  ::unsetenv("AWS_SESSION_TOKEN");
}
