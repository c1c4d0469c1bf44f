// Fuzz target: the W3C trace context reader of keel/trace.hpp (`parse_traceparent`), which
// `keel serve` runs on every caller's `traceparent` and `tracestate` header.
//
// The input is `traceparent` up to the first newline, `tracestate` after it. The reader promises
// never to throw or crash; on top of that we check that what it accepts is valid (both ids
// nonzero), that writing it back and reading again gives the same context, that a version-00
// value is written back byte for byte, and that a kept `tracestate` is bounded.
#include "fuzz_support.hpp"

#include <keel/trace.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text = keel::fuzz::as_text(data, size);
  const std::size_t nl = text.find('\n');
  const std::string_view tp = text.substr(0, nl);
  const std::string_view ts =
      nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
  std::optional<keel::trace::span_context> c;
  try {
    c = keel::trace::parse_traceparent(tp, ts);
  } catch (...) {
    keel::fuzz::unexpected_exception("parse_traceparent");
  }
  if (!c) {
    return 0;
  }
  KEEL_FUZZ_CHECK(c->valid());
  KEEL_FUZZ_CHECK(c->state.size() <= 512);
  KEEL_FUZZ_CHECK(c->state.empty() || c->state == ts);
  const std::string back = keel::trace::to_traceparent(*c);
  KEEL_FUZZ_CHECK(back.size() == 55);
  if (tp.substr(0, 2) == "00") {
    KEEL_FUZZ_CHECK(back == tp);
  }
  const auto again = keel::trace::parse_traceparent(back, c->state);
  KEEL_FUZZ_CHECK(again);
  KEEL_FUZZ_CHECK(again->trace == c->trace && again->span == c->span && again->flags == c->flags);
  return 0;
}
