// Fuzz target: keel::llm's Anthropic messages stream decoder (see stream_fuzz.hpp for the input
// format).
#include "stream_fuzz.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return keel::fuzz::run_stream_fuzz(keel::llm::provider_kind::anthropic, data, size);
}
