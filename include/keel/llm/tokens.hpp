// A cheap, conservative estimate of the tokens a chat request will consume.
#pragma once

// Overview
// --------
// Token-based rate limits (OpenAI TPM, Anthropic ITPM/OTPM, Bedrock tokens per minute) are
// charged before the provider has tokenised anything, so a client-side token bucket needs an
// estimate up front. `estimate_tokens` uses the common rule of thumb for English text with BPE
// tokenisers, rounded up everywhere so that it errs on the side of pacing too much:
//
//     ceil(bytes / 4) for the system prompt, the model-visible text of every message (text
//                     parts, a tool turn's result, tool calls' names and arguments) and every
//                     tool definition (name, description, parameters schema as JSON)
//   + 1,600 per image (Anthropic's figure for a 1.15-megapixel image, the size it scales
//     larger ones down to; OpenAI's high-detail 1024x1024 is about 765)
//   + 4 per message (role and separators) + 3 for the reply's priming
//   + max_tokens (the reply may use all of it; providers reserve it against the limit)
//
// It counts UTF-8 bytes, not characters, which over-estimates non-Latin scripts (a CJK character
// is 3 bytes and usually 1-2 tokens): conservative, as intended. It is not a tokenizer; for
// billing use the provider's reported `chat_response::usage`.
//
// Example:
//
//     const double estimate = keel::llm::estimate_tokens(req);
//     co_await bucket.acquire({.requests = 1, .tokens = estimate});   // a keel::throttler
//     ...
//     bucket.settle(estimate, reply.usage.total());
//
// Token counts are `double` wherever they meet pacing (`keel::throttle_cost::tokens`,
// `keel::throttler::settle`, `keel::rate_controller`, `rate_limit_info::limit_tokens`, this
// estimate, `token_usage::total()`): buckets refill continuously, so fractions are meaningful.
// The provider's billed counts (`token_usage::input`/`output`) stay integers.
//
// Thread safety: a pure function.

#include <keel/llm/chat.hpp>

#include <algorithm>

namespace keel::llm {

/// Estimated tokens per message for role and separators.
inline constexpr long long tokens_per_message = 4;
/// Estimated tokens that prime the reply.
inline constexpr long long tokens_reply_priming = 3;
/// Estimated tokens per image part.
inline constexpr long long tokens_per_image = 1600;

/// Estimates the tokens `req` will consume (prompt plus the full reply budget); see the header.
/// @return a non-negative whole number, as a `double` (the throttler's unit).
inline double estimate_tokens(const chat_request& req) noexcept {
  auto text_tokens = [](const std::string& s) {
    return static_cast<long long>((s.size() + 3) / 4);
  };
  long long total = tokens_reply_priming;
  if (!req.system.empty()) {
    total += text_tokens(req.system) + tokens_per_message;
  }
  for (const auto& m : req.messages) {
    total += text_tokens(m.content) + tokens_per_message;
    for (const auto& p : m.parts) {
      total += p.kind == part_kind::image ? tokens_per_image : text_tokens(p.text);
    }
    for (const auto& c : m.tool_calls) {
      total += text_tokens(c.name) + text_tokens(c.arguments) + tokens_per_message;
    }
  }
  for (const auto& t : req.tools) {
    total += text_tokens(t.name) + text_tokens(t.description) + tokens_per_message;
    try {
      total +=
          text_tokens(t.parameters.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));
    } catch (...) {
      // Out of memory while estimating: count the tool as its name and description.
    }
  }
  total += std::max(req.max_tokens, 0);
  return static_cast<double>(total);
}

}  // namespace keel::llm
