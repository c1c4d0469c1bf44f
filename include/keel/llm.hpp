// keel::llm: every public header of the LLM provider layer in one include.
#pragma once

// Overview
// --------
// Including this header gives the whole of `keel::llm`: the provider-neutral chat model and its
// dispatching `build_request` / `parse_response`, the OpenAI, Anthropic and Bedrock wire formats,
// one-call `complete`, provider errors and server hints, SigV4 signing, token estimates, the JSON
// depth bound and the mapping onto AWS retry-mode facts. Link `keel::llm` (it brings
// nlohmann_json and OpenSSL::Crypto; the HTTP transport is `keel::http`, not included here). Each
// header can also be included on its own; include only what you use to keep compile times down.
//
// Example:
//
//     #include <keel/llm.hpp>
//     keel::llm::chat_request req("gpt-4o-mini", {{"user", "Say hi"}}, 64);
//     keel::llm::endpoint ep(keel::llm::provider_kind::openai, "", api_key);
//     keel::llm::chat_response reply = co_await keel::llm::complete(http, ep, req);
//
// Thread safety: see each header (plain values and pure functions, apart from `complete`, which
// is as thread-safe as its sender).

#include <keel/llm/anthropic.hpp>
#include <keel/llm/aws_facts.hpp>
#include <keel/llm/bedrock.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/complete.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/hints.hpp>
#include <keel/llm/json_depth.hpp>
#include <keel/llm/openai.hpp>
#include <keel/llm/sigv4.hpp>
#include <keel/llm/tokens.hpp>
