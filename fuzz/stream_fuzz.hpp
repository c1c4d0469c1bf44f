// The body of the three stream-decoder fuzz targets (fuzz_stream_openai, _anthropic, _bedrock).
#pragma once

// Input: byte 0 is a control byte, the rest is the response body.
//   - bits 0-3: the decoder is fed the body in pieces of (bits + 1) bytes, and also all at once;
//     both must give the same events (split invariance);
//   - bit 4: use small bounds (256 bytes per SSE line/event, 512 per event-stream message), so
//     that the bound checks are reached;
//   - bit 5 (Bedrock only): before decoding, walk the body as event-stream messages and rewrite
//     both CRCs to be correct, so that the fuzzer reaches the headers and payloads behind them.
// Findings besides crashes, UB and leaks: any exception; events that differ between the splits;
// a `done` or `error` that is not the last event, or more than one; `ended()` false after
// `finish`; an error without the provider's name, with a code outside keel.llm, or with an
// unbounded message; an empty text delta; a negative token count.
#include "fuzz_support.hpp"

#include <keel/llm/chat.hpp>
#include <keel/llm/event_stream.hpp>
#include <keel/llm/stream.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace keel::fuzz {

inline std::string describe(const std::vector<keel::llm::stream_event>& events) {
  std::string s;
  for (const auto& e : events) {
    s += std::string(keel::llm::to_string(e.kind)) + "\x1f" + e.text + "\x1f" + e.id + "\x1f" +
         e.model + "\x1f" + e.role + "\x1f" + e.finish_reason + "\x1f" +
         std::to_string(e.usage.input) + "/" + std::to_string(e.usage.output);
    if (e.error) {
      s += "\x1f" + std::to_string(static_cast<int>(e.error->llm_code())) + e.error->message();
    }
    s += "\x1e";
  }
  return s;
}

inline void check_events(const std::vector<keel::llm::stream_event>& events,
                         keel::llm::provider_kind kind) {
  using keel::llm::stream_event_kind;
  KEEL_FUZZ_CHECK(!events.empty());  // finish always ends the stream with done or error
  for (std::size_t i = 0; i < events.size(); ++i) {
    const auto& e = events[i];
    const bool terminal = e.kind == stream_event_kind::done || e.kind == stream_event_kind::error;
    KEEL_FUZZ_CHECK(terminal == (i + 1 == events.size()));
    KEEL_FUZZ_CHECK(e.error.has_value() == (e.kind == stream_event_kind::error));
    if (e.kind == stream_event_kind::text) {
      KEEL_FUZZ_CHECK(!e.text.empty());
    }
    KEEL_FUZZ_CHECK(e.usage.input >= 0 && e.usage.output >= 0);
    if (e.error) {
      KEEL_FUZZ_CHECK(e.error->provider() == keel::llm::to_string(kind));
      KEEL_FUZZ_CHECK(e.error->code() == keel::llm::make_error_code(e.error->llm_code()));
      KEEL_FUZZ_CHECK(e.error->message().size() <= 303);
      KEEL_FUZZ_CHECK(std::string_view(e.error->what()).size() <= 1024);
    }
  }
}

// Rewrites the CRCs of every complete message in `body` (lengths are left as they are).
inline void fix_event_stream_crcs(std::string& body) {
  auto put = [&](std::size_t at, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) {
      body[at + i] = static_cast<char>((v >> (24 - 8 * i)) & 0xFFU);
    }
  };
  std::size_t at = 0;
  while (body.size() - at >= 12) {
    std::uint32_t total = 0;
    for (int i = 0; i < 4; ++i) {
      total = (total << 8) | static_cast<unsigned char>(body[at + i]);
    }
    put(at + 8, keel::llm::crc32(std::string_view(body).substr(at, 8)));
    if (total < 16 || total > body.size() - at) {
      return;
    }
    put(at + total - 4, keel::llm::crc32(std::string_view(body).substr(at, total - 4)));
    at += total;
  }
}

inline int run_stream_fuzz(keel::llm::provider_kind kind, const std::uint8_t* data,
                           std::size_t size) {
  if (size < 1) {
    return 0;
  }
  const unsigned control = data[0];
  std::string body(as_text(data + 1, size - 1));
  keel::llm::stream_options opts;
  if ((control & 0x10U) != 0) {
    opts.max_event_bytes = 256;
    opts.max_message_bytes = 512;
  }
  if (kind == keel::llm::provider_kind::bedrock && (control & 0x20U) != 0) {
    fix_event_stream_crcs(body);
  }
  try {
    auto whole = keel::llm::make_stream_decoder(kind, opts);
    std::vector<keel::llm::stream_event> a;
    whole->feed(body, a);
    whole->finish(a);
    KEEL_FUZZ_CHECK(whole->ended());
    check_events(a, kind);

    const std::size_t piece = (control & 0x0FU) + 1;
    auto split = keel::llm::make_stream_decoder(kind, opts);
    std::vector<keel::llm::stream_event> b;
    for (std::size_t i = 0; i < body.size(); i += piece) {
      split->feed(std::string_view(body).substr(i, piece), b);
    }
    split->finish(b);
    KEEL_FUZZ_CHECK(describe(a) == describe(b));
  } catch (...) {
    unexpected_exception("keel::llm stream decoder");
  }
  return 0;
}

}  // namespace keel::fuzz
