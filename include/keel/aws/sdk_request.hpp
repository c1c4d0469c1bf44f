// The AWS SDKs' per-call invocation id and per-attempt `amz-sdk-request` values.
#pragma once

// Overview
// --------
// Every AWS SDK sends two headers on every attempt of a call:
//
// | header                  | value                                                          |
// | ----------------------- | -------------------------------------------------------------- |
// | `amz-sdk-invocation-id` | a UUID v4 drawn once per call, the same on every attempt        |
// | `amz-sdk-request`       | `attempt=N; max=M`: N the 1-based attempt, M the total max      |
// |                         | attempts in force                                              |
//
// The AWS SDK for JavaScript v3 sends `attempt=N; max=M` from the first attempt on; botocore
// adds `ttl=...` to retries (2.0), which keel does not (it needs the server's clock skew). Both
// SDKs set the headers before signing and neither excludes them from SigV4, so they are signed.
//
// This header only makes the values; it knows no HTTP. `keel::llm::complete` sends them on a
// Bedrock request (`keel::llm::bedrock::add_sdk_request_headers`). Each call of a retry
// combinator's factory is one attempt, so a factory that asks `sdk_invocation::next_attempt()`
// numbers the attempts without the combinator knowing about headers.
//
// Example:
//
//     keel::aws::sdk_invocation call{keel::aws::make_invocation_id(rng),
//                                    strategy.total_max_attempts()};
//     auto reply = co_await keel::aws::with_retry(
//         [&] { return keel::llm::complete(http, ep, req, creds, call.next_attempt()); },
//         strategy, opts);
//
// Thread safety: `make_invocation_id` is safe to call concurrently on one `random_source`; an
// `sdk_invocation` belongs to one call and must not be shared.

#include <keel/random.hpp>

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

namespace keel::aws {

/// The name of the per-call id header.
inline constexpr std::string_view invocation_id_header = "amz-sdk-invocation-id";

/// The name of the per-attempt header.
inline constexpr std::string_view sdk_request_header = "amz-sdk-request";

/// What one attempt of a call sends in the SDK headers.
struct sdk_request_info {
  /// The call's id (a UUID v4), the same on every attempt.
  std::string invocation_id;
  /// This attempt's number, from 1.
  int attempt = 1;
  /// The total max attempts in force for the call (including the first).
  int max_attempts = 1;

  /// Nothing yet: attempt 1 of 1 with an empty id.
  sdk_request_info() = default;
  /// The values of one attempt.
  sdk_request_info(std::string id, int n, int max)
      : invocation_id(std::move(id)), attempt(n), max_attempts(max) {}

  /// The `amz-sdk-request` value: "attempt=N; max=M".
  std::string header_value() const {
    return "attempt=" + std::to_string(attempt) + "; max=" + std::to_string(max_attempts);
  }
};

/// A random (version 4, RFC 9562 variant) UUID in lower-case 8-4-4-4-12 form, drawn from `rng`.
/// @param rng the source of the 122 random bits (seed it for reproducible ids).
inline std::string make_invocation_id(keel::random_source& rng) {
  std::uint64_t hi = rng.next();
  std::uint64_t lo = rng.next();
  hi = (hi & ~0xF000ULL) | 0x4000ULL;                  // version 4
  lo = (lo & ~(0xC000ULL << 48)) | (0x8000ULL << 48);  // variant 10xx
  constexpr char digits[] = "0123456789abcdef";
  std::string out;
  out.reserve(36);
  const auto put = [&](std::uint64_t v, int from_nibble, int count) {
    for (int i = 0; i < count; ++i) {
      out.push_back(digits[(v >> (4 * (from_nibble - i))) & 0xF]);
    }
  };
  put(hi, 15, 8);
  out.push_back('-');
  put(hi, 7, 4);
  out.push_back('-');
  put(hi, 3, 4);
  out.push_back('-');
  put(lo, 15, 4);
  out.push_back('-');
  put(lo, 11, 12);
  return out;
}

/// One call's invocation: its id and attempt counter.
class sdk_invocation {
 public:
  /// Starts a call before its first attempt.
  /// @param id the call's invocation id (`make_invocation_id`).
  /// @param max_attempts the total max attempts in force (values below 1 are sent as 1).
  sdk_invocation(std::string id, int max_attempts)
      : id_(std::move(id)), max_attempts_(max_attempts < 1 ? 1 : max_attempts) {}

  /// Counts one more attempt and returns what it sends (attempt 1 on the first call).
  sdk_request_info next_attempt() { return sdk_request_info(id_, ++attempts_, max_attempts_); }

  /// The call's invocation id.
  const std::string& id() const noexcept { return id_; }

  /// The attempts counted so far.
  int attempts() const noexcept { return attempts_; }

 private:
  std::string id_;
  int max_attempts_;
  int attempts_ = 0;
};

}  // namespace keel::aws
