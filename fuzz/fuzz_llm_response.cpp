// Fuzz target: keel::llm::parse_response for the OpenAI, Anthropic and Bedrock wire formats.
//
// Input format (readable, so seeds are easy to write by hand):
//
//     <kind><d><d><d> anything up to the end of the line
//     header-name: value            (zero or more lines)
//                                   (an empty line)
//     body bytes ...
//
// `kind` is byte % 3 ('o' openai, 'a' anthropic, 'b' bedrock) and the status is the three bytes
// after it, each read as (byte - '0') % 10 so that digits mean themselves ("429"). parse_response
// must return (2xx only) or throw keel::llm::provider_error; any other exception is a finding.
// We also check what the error carries: status, provider name, a bounded and redacted message, a
// non-negative delay hint, and the x-should-retry override rule.
#include "fuzz_support.hpp"

#include <keel/error.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace {

using keel::llm::errc;
using keel::llm::provider_kind;

constexpr provider_kind kinds[] = {provider_kind::openai, provider_kind::anthropic,
                                   provider_kind::bedrock};

void check_error(const keel::llm::provider_error& e, const keel::http::response& res,
                 provider_kind kind) {
  KEEL_FUZZ_CHECK(e.status() == res.status);
  KEEL_FUZZ_CHECK(e.provider() == keel::llm::to_string(kind));
  KEEL_FUZZ_CHECK(e.code() == keel::llm::make_error_code(e.llm_code()));
  // Safe to log: messages are truncated ("..." added) and the summary stays bounded.
  KEEL_FUZZ_CHECK(e.message().size() <= 303);
  KEEL_FUZZ_CHECK(std::string_view(e.what()).size() <= 1024);
  if (e.retry_after()) {
    KEEL_FUZZ_CHECK(e.retry_after()->count() >= 0);
  }
  const bool ok_status = res.status >= 200 && res.status <= 299;
  if (ok_status) {
    // A 2xx fails only for an unreadable body or a refusal.
    KEEL_FUZZ_CHECK(e.llm_code() == errc::malformed_response ||
                    e.llm_code() == errc::content_filtered);
  } else if (e.should_retry() == true) {
    // x-should-retry: true lifts any permanent error but an exhausted quota.
    KEEL_FUZZ_CHECK(e.code() != keel::condition::permanent ||
                    e.llm_code() == errc::quota_exhausted);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keel::fuzz::limit_stack(256 * 1024);  // see limit_stack: catches recursive JSON copies
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 4) {
    return 0;
  }
  const std::string_view text = keel::fuzz::as_text(data, size);
  const provider_kind kind = kinds[data[0] % 3];
  keel::http::response res;
  auto digit = [](std::uint8_t c) { return static_cast<std::uint8_t>(c - '0') % 10; };
  res.status = digit(data[1]) * 100 + digit(data[2]) * 10 + digit(data[3]);
  res.reason = "Fuzz";
  std::string_view rest = text.substr(4);
  const auto eol = rest.find('\n');
  rest = eol == std::string_view::npos ? std::string_view() : rest.substr(eol + 1);
  res.body = std::string(keel::fuzz::read_header_block(rest, res.headers));

  // 2026-05-28, for HTTP-date and RFC 3339 hints.
  const std::chrono::system_clock::time_point now(
      std::chrono::duration_cast<std::chrono::system_clock::duration>(
          std::chrono::seconds(1'780'000'000)));
  // Without `raw`, an OpenAI body is read by a scanner that builds no tree (json_scan.hpp): it
  // must give the same reply or the same error as the tree on every input.
  std::optional<keel::llm::chat_response> fast;
  std::optional<keel::llm::provider_error> fast_error;
  try {
    fast = keel::llm::parse_response(res, kind, now, /*keep_raw=*/false);
    KEEL_FUZZ_CHECK(fast->raw.is_null());
  } catch (const keel::llm::provider_error& e) {
    fast_error = e;
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::llm::parse_response without raw");
  }
  try {
    const keel::llm::chat_response r = keel::llm::parse_response(res, kind, now);
    KEEL_FUZZ_CHECK(fast.has_value());
    KEEL_FUZZ_CHECK(fast->text == r.text && fast->finish_reason == r.finish_reason &&
                    fast->model == r.model && fast->id == r.id &&
                    fast->usage.input == r.usage.input && fast->usage.output == r.usage.output &&
                    fast->tool_calls.size() == r.tool_calls.size());
    for (std::size_t i = 0; i < r.tool_calls.size(); ++i) {
      KEEL_FUZZ_CHECK(fast->tool_calls[i].id == r.tool_calls[i].id &&
                      fast->tool_calls[i].name == r.tool_calls[i].name &&
                      fast->tool_calls[i].arguments == r.tool_calls[i].arguments);
    }
    KEEL_FUZZ_CHECK(res.status >= 200 && res.status <= 299);
    KEEL_FUZZ_CHECK(r.usage.input >= 0 && r.usage.output >= 0);
    KEEL_FUZZ_CHECK(r.raw.is_object());
    for (const auto& reset :
         {r.rate_limits.reset_requests, r.rate_limits.reset_tokens,
          r.rate_limits.reset_input_tokens, r.rate_limits.reset_output_tokens}) {
      KEEL_FUZZ_CHECK(!reset || reset->count() >= 0);
    }
  } catch (const keel::llm::provider_error& e) {
    check_error(e, res, kind);
    KEEL_FUZZ_CHECK(fast_error.has_value() && fast_error->llm_code() == e.llm_code() &&
                    std::string_view(fast_error->what()) == e.what());
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::llm::parse_response");
  }
  return 0;
}
