// Tests for keel/aws/classification.hpp: standard transient/throttling rules and legacy policies.
#include <keel/aws/classification.hpp>

#include <catch2/catch.hpp>

TEST_CASE("every listed throttling code is throttling and lookalikes are not", "[aws]") {
  for (auto code : keel::aws::throttling_codes) {
    CHECK(keel::aws::is_throttling_code(code));
    CHECK(keel::aws::standard_retryable(400, code, false, false));
  }
  CHECK(keel::aws::is_throttling_code("PriorRequestNotComplete"));
  CHECK(keel::aws::is_transient_code("PriorRequestNotComplete"));
  CHECK_FALSE(keel::aws::is_throttling_code("throttling"));  // case-sensitive
  CHECK_FALSE(keel::aws::is_throttling_code(""));
  CHECK_FALSE(keel::aws::is_throttling_code("AccessDenied"));
}

TEST_CASE("standard mode retries transient statuses, codes and transport errors", "[aws]") {
  for (int status : {500, 502, 503, 504}) {
    CHECK(keel::aws::is_transient(status, "", false, false));
    CHECK(keel::aws::standard_retryable(status, "AnyCode", false, false));
  }
  CHECK_FALSE(keel::aws::standard_retryable(501, "", false, false));
  CHECK(keel::aws::standard_retryable(400, "RequestTimeout", false, false));
  CHECK(keel::aws::standard_retryable(408, "RequestTimeoutException", false, false));
  CHECK(keel::aws::standard_retryable(0, "", true, false));
  CHECK(keel::aws::standard_retryable(0, "", false, true));
  CHECK_FALSE(keel::aws::standard_retryable(400, "ValidationException", false, false));
  CHECK_FALSE(keel::aws::is_transient(400, "ThrottlingException", false, false));
}

TEST_CASE("a 429 without a known code is retried by legacy but not by standard mode", "[aws]") {
  CHECK_FALSE(keel::aws::standard_retryable(429, "", false, false));
  CHECK(keel::aws::standard_retryable(429, "TooManyRequestsException", false, false));
  CHECK(keel::aws::legacy_retryable(429, "", false));
}

TEST_CASE("legacy global policies match statuses, 400 throttling codes and socket errors",
          "[aws]") {
  for (int status : {500, 502, 503, 504, 509, 429}) {
    CHECK(keel::aws::legacy_retryable(status, "", false));
  }
  CHECK_FALSE(keel::aws::legacy_retryable(501, "", false));
  for (auto code : keel::aws::legacy_throttling_codes) {
    CHECK(keel::aws::legacy_retryable(400, code, false));
    CHECK_FALSE(keel::aws::legacy_retryable(403, code, false));
  }
  // Codes that only service sections add are not in the global defaults.
  CHECK_FALSE(keel::aws::legacy_retryable(400, "TooManyRequestsException", false));
  CHECK_FALSE(keel::aws::legacy_retryable(400, "RequestTimeout", false));
  CHECK_FALSE(keel::aws::legacy_retryable(400, "LimitExceededException", false));
  CHECK(keel::aws::legacy_retryable(0, "", true));
}
