// LLM provider errors: the keel.llm error codes, their keel conditions and provider_error.
#pragma once

// Overview
// --------
// Every provider layer (OpenAI, Anthropic, Amazon Bedrock) reports a failed call by throwing
// `keel::llm::provider_error`, a `keel::failure` whose code is a `keel::llm::errc`. The "keel.llm"
// category maps each code to the coarse `keel::condition` that keel's combinators act on:
//
// | errc                      | condition   | retried by default |
// | ------------------------- | ----------- | ------------------ |
// | rate_limited              | throttled   | yes (server hint)  |
// | overloaded, server_error, transport | transient | yes (backoff) |
// | timeout                   | timeout     | yes                |
// | quota_exhausted           | permanent   | **never**          |
// | context_length_exceeded, content_filtered, auth, bad_request, not_found, malformed_response, |
// | request_too_large (413), redirect (3xx) | permanent | no (fall back) |
//
// The error also carries what the provider said (HTTP status, provider name, provider error code,
// message, request id), the server's delay hint (`retry_after()`, from retry-after-ms /
// Retry-After / x-amz-retry-after) and the `x-should-retry` header when sent. `what()` is a
// one-line summary; provider messages are truncated and anything that looks like an API key or an
// AWS access key id is redacted, so it is safe to log.
//
// Example:
//
//     try {
//       auto reply = keel::llm::openai::parse_response(res, std::chrono::system_clock::now());
//     } catch (const keel::llm::provider_error& e) {
//       if (e.code() == keel::llm::errc::context_length_exceeded) { /* use a bigger model */ }
//       auto c = keel::classify(std::current_exception());  // condition + retry_after
//     }
//
// Thread safety: the category and the exception are immutable after construction.

#include <keel/error.hpp>

#include <nlohmann/json.hpp>

#include <boost/system/error_category.hpp>
#include <boost/system/error_code.hpp>

#include <chrono>
#include <cstddef>
#include <exception>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace keel {
enum class limit_kind;  // keel/rate_controller.hpp
}  // namespace keel

namespace keel::llm {

struct chat_response;  // <keel/llm/chat.hpp>

/// Specific failures of an LLM provider call.
enum class errc {
  /// The provider's request or token rate limit was hit (HTTP 429): throttled, retry after a hint.
  rate_limited = 1,
  /// The account ran out of money or quota (OpenAI `insufficient_quota`): never retried.
  quota_exhausted,
  /// The provider is overloaded (Anthropic 529, HTTP 503, Bedrock `ModelNotReadyException`).
  overloaded,
  /// The provider failed (HTTP 5xx, 409, Bedrock `ModelErrorException`): transient.
  server_error,
  /// The provider or the request timed out (HTTP 408, Bedrock `ModelTimeoutException`).
  timeout,
  /// The connection failed (refused, reset, EOF mid-body): transient.
  transport,
  /// The prompt does not fit the model's context window: fall back to a larger model.
  context_length_exceeded,
  /// The provider refused on policy grounds (content filter, refusal, guardrail).
  content_filtered,
  /// Authentication or authorisation failed (HTTP 401/403).
  auth,
  /// The request was invalid (other 4xx).
  bad_request,
  /// The model or endpoint does not exist (HTTP 404).
  not_found,
  /// A 2xx reply whose body could not be understood; the message names the JSON path.
  malformed_response,
  /// The server refused the request as too large (HTTP 413, Anthropic `request_too_large`): the
  /// same bytes would be refused again, so never retried; a fallback with a bigger limit may take
  /// it.
  request_too_large,
  /// The server answered with a redirect (HTTP 3xx), which keel does not follow (it would resend
  /// the API key to another URL): the base URL is wrong, e.g. http:// for https://. Permanent.
  redirect,
};

/// The "keel.llm" category; its `default_error_condition` maps each `errc` to a `keel::condition`.
const boost::system::error_category& error_category() noexcept;

/// Makes an `error_code` from an `errc`.
inline boost::system::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

/// The keel condition of an `errc` (same as comparing its `error_code` with a condition).
keel::condition condition_of(errc e) noexcept;

/// The name of an `errc`, e.g. "rate_limited".
std::string_view to_string(errc e) noexcept;

/// What a provider said about a failed call; the fields of `provider_error`.
struct provider_error_info {
  /// HTTP status (0 when there was no HTTP response, e.g. a transport failure).
  int status = 0;
  /// "openai", "anthropic" or "bedrock".
  std::string provider;
  /// The provider's own code, e.g. "rate_limit_exceeded", "overloaded_error",
  /// "ThrottlingException" (empty if none).
  std::string provider_code;
  /// The provider's message (will be truncated and redacted in `what()`).
  std::string message;
  /// The request id from x-request-id / request-id / x-amzn-requestid (empty if none).
  std::string request_id;
  /// The server's delay hint, if it sent one.
  std::optional<std::chrono::nanoseconds> retry_after;
  /// The `x-should-retry` header, if sent.
  std::optional<bool> should_retry;
  /// For `errc::content_filtered` from a whole (not streamed) answer: what the provider answered
  /// along with the filter or refusal (the text before it, tool calls, `finish_reason`, usage,
  /// and OpenAI's `refusal`), for a caller that passes such an answer on as the provider gave
  /// it (`keel serve` answers it as OpenAI does: a completion whose finish reason is
  /// "content_filter", or whose message has the refusal). Null otherwise.
  std::shared_ptr<const chat_response> filtered_reply;

  /// No information (status 0).
  provider_error_info() = default;
  /// Status, provider, provider code and message; the rest stays empty.
  provider_error_info(int s, std::string p, std::string code, std::string msg)
      : status(s),
        provider(std::move(p)),
        provider_code(std::move(code)),
        message(std::move(msg)) {}
};

/// How many bytes of a provider's message `provider_error` keeps (`redact`'s default cut).
inline constexpr std::size_t message_limit = 300;

/// The exception a provider layer throws: a `keel::failure` with a `keel::llm::errc` code.
class provider_error : public keel::failure {
 public:
  /// Constructs the error; `what()` becomes a one-line summary of `info`.
  /// @param code the specific failure.
  /// @param info what the provider said; `info.retry_after` becomes `failure::retry_after()`.
  provider_error(errc code, provider_error_info info);

  /// The specific failure.
  errc llm_code() const noexcept { return code_; }
  /// HTTP status (0 without a response).
  int status() const noexcept { return info_.status; }
  /// "openai", "anthropic" or "bedrock".
  const std::string& provider() const noexcept { return info_.provider; }
  /// The provider's own error code or type.
  const std::string& provider_code() const noexcept { return info_.provider_code; }
  /// The provider's message, redacted and truncated to `message_limit` bytes.
  const std::string& message() const noexcept { return info_.message; }
  /// The provider's request id (empty if none), redacted like the message and cut at 200 bytes.
  const std::string& request_id() const noexcept { return info_.request_id; }
  /// The `x-should-retry` header, if sent.
  std::optional<bool> should_retry() const noexcept { return info_.should_retry; }
  /// Everything the provider said, as stored (message redacted and truncated).
  const provider_error_info& info() const noexcept { return info_; }

 private:
  errc code_;
  provider_error_info info_;
};

/// Which of its limits a rate-limited answer says it hit, from the provider's words: OpenAI's
/// "... on tokens per min (TPM)" / "requests per min (RPM)" (error type "tokens"/"requests"),
/// Anthropic's "... input tokens per minute", Bedrock's "Too many tokens/requests". Any other
/// error, or an answer that names neither, is `limit_kind::unknown` (include
/// <keel/rate_controller.hpp> for the enumerators).
keel::limit_kind limit_of(const provider_error& e) noexcept;

/// Redacts substrings that look like secrets (`sk-...`, `sk-ant-...`, `AKIA...`/`ASIA...` key ids,
/// `Bearer ...`) and truncates to `max_bytes`; used for every message that goes into `what()`.
std::string redact(std::string_view text, std::size_t max_bytes = message_limit);

/// Returns `e` with every occurrence of each non-empty value in `secrets` masked as
/// "[redacted]" in its message, provider code and request id, and a secret's beginning cut off by
/// the message's truncation masked too. For the secrets `redact`'s patterns cannot recognise, such
/// as an OpenAI-compatible server's API key echoed in a 401's message; `complete` applies it
/// with the endpoint's key and AWS credentials. A `filtered_reply` is masked too (in a copy).
/// Values shorter than 4 bytes are ignored (they would mask ordinary words).
provider_error without_secrets(const provider_error& e,
                               std::initializer_list<std::string_view> secrets);

/// The values of `url`'s query parameters whose names say they hold a credential (a name with
/// "key", "token", "secret", "sig", "auth", "pass", "cred" or "code" in it, any case), as sent
/// and percent-decoded: a server that echoes its request URL in an error puts them in the
/// message, so `complete` and `client` mask them with `without_secrets` as they mask the key.
/// Not every value: an Azure `api-version` date is not a secret, and would be masked in replies;
/// nor one shorter than 8 bytes (`?auth=true` would mask every "true").
std::vector<std::string> url_credentials(std::string_view url);

/// A short name for the kind of error that decided a failure (`keel::deciding_cause`: through
/// retries_exhausted, budget_exhausted and all_fallbacks_failed to the last attempt's error):
/// the keel::llm errc
/// ("rate_limited", "overloaded", ...), else keel's error or condition ("deadline_exceeded",
/// "circuit_open", "cancelled", "timeout", "connection", ...); "ok" for null.
std::string error_class(const std::exception_ptr& e);

/// The HTTP status of the deciding provider error (0 otherwise).
int error_status(const std::exception_ptr& e);

/// The error part of a failure record: class, condition, and for a provider error its status,
/// provider, code, message and request id; `gave_up` says why retrying or falling back stopped
/// ("retries_exhausted", "budget_exhausted", "all_fallbacks_failed"). Never holds a secret.
nlohmann::json error_json(const std::exception_ptr& e);

}  // namespace keel::llm

namespace boost::system {
template <>
struct is_error_code_enum<keel::llm::errc> : std::true_type {};
}  // namespace boost::system
