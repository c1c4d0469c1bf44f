// keel::llm::aws_attempt_facts: provider_error to AWS retry-mode attempt facts.
#include <keel/llm/aws_facts.hpp>

#include <keel/llm/error.hpp>

#include <chrono>
#include <string>

namespace keel::llm {

namespace {

// The status a Bedrock exception of this kind has as a whole response.
int stream_exception_status(errc c) {
  switch (c) {
    case errc::rate_limited:
      return 429;
    case errc::overloaded:
      return 503;
    case errc::server_error:
    case errc::transport:
      return 500;
    case errc::timeout:
      return 408;
    default:
      return 400;
  }
}

}  // namespace

std::optional<keel::aws::attempt_facts> aws_attempt_facts(const std::exception_ptr& ep) {
  if (!ep) {
    return keel::aws::default_attempt_facts(ep);
  }
  try {
    std::rethrow_exception(ep);
  } catch (const provider_error& e) {
    keel::aws::attempt_facts f;
    f.status = e.status();
    // With no response at all there is nothing to read but the failure itself; every provider
    // reports it the same way. No response at all is a connection failure: a socket error, which
    // legacy mode retries too.
    f.transport_error = e.llm_code() == errc::transport;
    f.socket_error = f.transport_error;
    if (e.provider() == "bedrock") {
      // Bedrock speaks AWS already: its error type is the AWS error code. The hint came from
      // x-amz-retry-after (or a standard header, which means the same); rounding up keeps a
      // sub-millisecond hint from being shortened.
      f.code = e.provider_code();
      if (f.status >= 200 && f.status <= 299) {
        // An exception event of a ConverseStream before its first text (past it nothing is
        // retried): its `:exception-type` is lowerCamelCase where the AWS retry tables name
        // codes in UpperCamelCase, and its status is the stream's 200. Judge it as the same
        // exception answered as a whole response would be; `modelStreamErrorException` (424 to
        // AWS, "try your request again") counts as the server error keel classifies it as.
        if (!f.code.empty() && f.code[0] >= 'a' && f.code[0] <= 'z') {
          f.code[0] = static_cast<char>(f.code[0] - 'a' + 'A');
        }
        f.status = stream_exception_status(e.llm_code());
      }
      if (const auto hint = e.retry_after()) {
        f.amz_retry_after =
            std::to_string(std::chrono::ceil<std::chrono::milliseconds>(*hint).count());
      }
      return f;
    }
    switch (e.llm_code()) {
      case errc::rate_limited:
        f.code = "ThrottlingException";
        break;
      case errc::overloaded:
        // Anthropic's 529 means what 503 means to AWS.
        f.status = 503;
        break;
      case errc::timeout:
        f.code = "RequestTimeout";
        break;
      case errc::quota_exhausted:
        // OpenAI says insufficient_quota with a 429; AWS says ServiceQuotaExceededException
        // with a 400. Retrying cannot help, so legacy mode must not see a bare 429.
        f.status = 400;
        break;
      default:
        break;
    }
    return f;
  } catch (...) {
  }
  return keel::aws::default_attempt_facts(ep);
}

}  // namespace keel::llm
