// keel::llm: every public header of the LLM provider layer in one include.
#pragma once

// Overview
// --------
// Including this header gives the whole of `keel::llm`: the configured client
// (`keel::llm::client`) and its config loader, the provider-neutral chat model and its
// dispatching `build_request` / `parse_response`, the OpenAI, Anthropic and Bedrock wire formats
// and their stream decoders (server-sent events, AWS event-stream), one-call `complete`, provider
// errors and server hints, SigV4 signing, token estimates, the JSON depth bound and the mapping
// onto AWS retry-mode facts. Link `keel::llm` (it brings
// nlohmann_json, OpenSSL and `keel::http`, which the client sends through). Each header can also
// be included on its own; include only what you use to keep compile times down.
//
// Example:
//
//     #include <keel/llm.hpp>
//     keel::llm::client llm{ex, keel::llm::load_config("keel.json")};
//     keel::llm::chat_response reply =
//         co_await llm.complete(keel::llm::chat_request::from_prompt("", "Say hi", 64));
//
// Thread safety: see each header (plain values and pure functions; a client lives on one
// executor).

#include <keel/llm/anthropic.hpp>
#include <keel/llm/aws_facts.hpp>
#include <keel/llm/aws_shared_files.hpp>
#include <keel/llm/bedrock.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/client.hpp>
#include <keel/llm/complete.hpp>
#include <keel/llm/config.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/event_stream.hpp>
#include <keel/llm/hints.hpp>
#include <keel/llm/json_depth.hpp>
#include <keel/llm/json_scan.hpp>
#include <keel/llm/json_writer.hpp>
#include <keel/llm/openai.hpp>
#include <keel/llm/sigv4.hpp>
#include <keel/llm/sse.hpp>
#include <keel/llm/stream.hpp>
#include <keel/llm/strict_json.hpp>
#include <keel/llm/tokens.hpp>
