// Fuzz target: keel::llm::parse_config, the keel command's config file parser (tools/keel).
//
// The environment lookup returns nothing, so no variable and no AWS shared file is ever read.
// parse_config must return a usable config or throw config_error; anything else is a finding.
// A returned config must have entries with models, and must print (`to_json`) without throwing;
// an error must name a JSON pointer (or none).
#include "fuzz_support.hpp"

#include <keel/llm/config.hpp>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // No stack cap by default: known issue KEEL-FUZZ-2 (docs/FUZZING.md) would trip it. Set
  // KEEL_FUZZ_STACK_KB=512 to hunt for recursion on nested input once that is fixed.
  keel::fuzz::limit_stack(0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const keel::llm::env_lookup no_env = [](std::string_view) -> std::optional<std::string> {
    return std::nullopt;
  };
  static const std::string source = "fuzz.json";
  const std::string_view text = keel::fuzz::as_text(data, size);
  try {
    const keel::llm::client_config c = keel::llm::parse_config(text, source, no_env);
    KEEL_FUZZ_CHECK(!c.entries.empty());
    KEEL_FUZZ_CHECK(c.source == source);
    KEEL_FUZZ_CHECK(c.policy.concurrency >= 1);
    for (const auto& e : c.entries) {
      KEEL_FUZZ_CHECK(!e.model.empty());
      KEEL_FUZZ_CHECK(e.max_attempts >= 1);
      KEEL_FUZZ_CHECK(!e.timeout || *e.timeout > 0);
      if (e.api_type != keel::llm::provider_kind::bedrock) {
        KEEL_FUZZ_CHECK(!e.api_key.empty());  // the environment is empty: it came inline
      }
    }
    // `keel config check` prints this; secrets are redacted and dumping must not throw.
    const nlohmann::json shown = keel::llm::to_json(c, /*redact=*/true);
    (void)shown.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const keel::llm::config_error& e) {
    KEEL_FUZZ_CHECK(e.path().empty() || e.path().front() == '/');
    KEEL_FUZZ_CHECK(std::string_view(e.what()).starts_with(source + ": "));
    KEEL_FUZZ_CHECK(!e.message().empty());
  } catch (const nlohmann::json::out_of_range& e) {
    keel::fuzz::known_number_overflow(e.id);  // KEEL-FUZZ-1
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::llm::parse_config");
  }
  return 0;
}
