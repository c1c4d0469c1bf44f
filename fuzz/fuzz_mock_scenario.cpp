// Fuzz target: keel::testing::scenario::from_json, the mock LLM server's scenario files.
//
// from_json must return a scenario or throw scenario_error; anything else is a finding. A
// returned scenario must hold plans the server can run: latency min <= max, probabilities in
// [0, 1] adding up to at most 1, outage windows that end after they start, no negative delays.
#include "fuzz_support.hpp"

#include <keel/testing/mock_llm_server.hpp>

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  keel::fuzz::limit_stack(256 * 1024);  // see limit_stack: catches recursive JSON copies
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text = keel::fuzz::as_text(data, size);
  try {
    const keel::testing::scenario s = keel::testing::scenario::from_json(text);
    for (const auto& [model, plan] : s.plans) {
      KEEL_FUZZ_CHECK(plan.latency_min.count() >= 0);
      KEEL_FUZZ_CHECK(plan.latency_min <= plan.latency_max);
      KEEL_FUZZ_CHECK(plan.retry_after.count() >= 0);
      double sum = 0;
      for (const auto& [kind, p] : plan.probability) {
        KEEL_FUZZ_CHECK(p >= 0 && p <= 1);
        KEEL_FUZZ_CHECK(!keel::testing::to_string(kind).empty());
        sum += p;
      }
      KEEL_FUZZ_CHECK(sum <= 1.0 + 1e-6);
      for (const auto& w : plan.outages) {
        KEEL_FUZZ_CHECK(w.from.count() >= 0 && w.from <= w.to);
      }
      KEEL_FUZZ_CHECK(plan.requests_per_second >= 0 && plan.burst >= 0 &&
                      plan.tokens_per_minute >= 0);
    }
  } catch (const keel::testing::scenario_error& e) {
    KEEL_FUZZ_CHECK(e.path().empty() || e.path().front() == '/');
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::testing::scenario::from_json");
  }
  return 0;
}
