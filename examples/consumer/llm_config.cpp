// Consumer of keel::llm: parses a config (primary and fallback model) and rejects a bad one.
#include <keel/llm/config.hpp>

#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

int main() {
  const auto no_env = [](std::string_view) { return std::optional<std::string>{}; };
  const auto config = keel::llm::parse_config(
      R"({"config_list": [{"model": "gpt-4o-mini", "api_key": "sk-test"},
                          {"api_type": "anthropic", "model": "claude-3-5-haiku", "api_key": "k"}],
          "policy": {"retry": {"max_attempts": 4}}})",
      "consumer.json", no_env);
  for (const auto& entry : config.entries) {
    std::printf("consumer_llm: %s (%d attempts)\n", entry.name().c_str(), entry.max_attempts);
  }
  bool rejected = false;
  try {
    (void)keel::llm::parse_config(R"([{"model": "m", "api_key": "k", "timeout": "abc"}])",
                                  "bad.json", no_env);
  } catch (const keel::llm::config_error& e) {
    std::printf("consumer_llm: rejected: %s\n", e.what());
    rejected = true;
  }
  const bool ok = config.entries.size() == 2 && config.entries[0].max_attempts == 4 &&
                  config.entries[1].name() == "anthropic/claude-3-5-haiku";
  return ok && rejected ? 0 : 1;
}
