// Maps keel::llm::provider_error (Bedrock, OpenAI, Anthropic) onto AWS retry-mode attempt facts.
#pragma once

// Overview
// --------
// `keel::aws::with_retry` decides from an `attempt_facts` (HTTP status, AWS error code, transport
// failure, timeout, x-amz-retry-after). `aws_attempt_facts` reads those from a
// `keel::llm::provider_error` of any provider, so the AWS modes (legacy, standard, adaptive)
// apply to OpenAI and Anthropic calls too:
//
// | provider error                          | status      | code                  | also         |
// | --------------------------------------- | ----------- | --------------------- | ------------ |
// | Bedrock, any errc                       | kept        | its provider code     | hint → amz   |
// | OpenAI / Anthropic `rate_limited`       | kept (429)  | `ThrottlingException` |              |
// | OpenAI / Anthropic `overloaded`         | **503**     | none                  |              |
// | OpenAI / Anthropic `quota_exhausted`    | **400**     | none                  | never retried |
// | OpenAI / Anthropic `timeout` (408, 504) | kept        | `RequestTimeout`      |              |
// | any provider, `transport`               | kept (0)    | as above              | transport    |
// | OpenAI / Anthropic, any other errc      | kept        | none                  |              |
// | not a `provider_error`                  | `keel::aws::default_attempt_facts(ep)`             |
//
// "hint → amz": Bedrock's server delay hint (`retry_after()`, from x-amz-retry-after), rounded up
// to whole milliseconds, becomes `amz_retry_after` (honoured by revision 2.1 only). "transport":
// `transport_error` and `socket_error` are set (connection refused, reset, EOF; no response).
// A transport failure that is not a `provider_error` (what `keel::http::client` throws) goes to
// `default_attempt_facts`, which tells a socket error from a malformed or broken-off response.
//
// Consequences in standard mode: a rate limit is a throttling error (retried, cost 5, adaptive
// slows down); an overload or 5xx is transient; a timeout is transient (cost 5 at 2.0, not 10:
// it is a response, not a socket timeout); 4xx such as auth, bad request or an exhausted quota
// are not retried. In legacy mode a 429 and 500/502/503/504/509 are retried by status.
//
// The server's delay hint of OpenAI and Anthropic errors (retry-after-ms, Retry-After) is not
// passed on: the AWS algorithm only knows x-amz-retry-after. `x-should-retry` is ignored.
//
// Example:
//
//     keel::aws::aws_retry_options opts;
//     opts.facts = keel::llm::aws_attempt_facts;
//     auto reply = co_await keel::aws::with_retry([&] { return call_openai(req); }, strategy,
//                                                 opts);
//
// Thread safety: a pure function.

#include <keel/aws/retry.hpp>

#include <exception>
#include <optional>

namespace keel::llm {

/// Reads AWS retry facts from a failed LLM call (see the table above); a `fact_extractor`.
/// @param ep the attempt's exception.
/// @return the facts of a `provider_error`; for any other exception, what
///   `keel::aws::default_attempt_facts` says (nullopt for cancellation and an open breaker).
std::optional<keel::aws::attempt_facts> aws_attempt_facts(const std::exception_ptr& ep);

}  // namespace keel::llm
