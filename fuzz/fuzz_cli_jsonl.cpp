// Fuzz target: keel::cli::parse_input_line, the keel command's JSONL input items (tools/keel).
//
// The input is a JSONL file: it is split into lines the way input_reader does (LF, a trailing CR
// removed, blank lines skipped) and every line is parsed. parse_input_line reports bad lines as
// values and must never throw. An item must be runnable (its last message is the user's, its
// max_tokens is in range) and keyed by its id; an error must name its line.
#include "fuzz_support.hpp"

#include "jsonl.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

namespace {

constexpr int default_max_tokens = 1024;

void check_line(std::string_view line, std::size_t number) {
  std::variant<keel::cli::batch_item, keel::cli::input_error> parsed;
  try {
    parsed = keel::cli::parse_input_line(line, number, default_max_tokens);
  } catch (const nlohmann::json::out_of_range& e) {
    keel::fuzz::known_number_overflow(e.id);  // KEEL-FUZZ-1
    return;
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::cli::parse_input_line");
  }
  if (const auto* bad = std::get_if<keel::cli::input_error>(&parsed)) {
    KEEL_FUZZ_CHECK(bad->line == number);
    KEEL_FUZZ_CHECK(!bad->message.empty());
    KEEL_FUZZ_CHECK(bad->id.is_null() || bad->id.is_string() || bad->id.is_number_integer());
    return;
  }
  const auto& item = std::get<keel::cli::batch_item>(parsed);
  KEEL_FUZZ_CHECK(item.line == number);
  KEEL_FUZZ_CHECK(item.id.is_string() || item.id.is_number_integer());
  KEEL_FUZZ_CHECK(item.key == item.id.dump());
  KEEL_FUZZ_CHECK(!item.request.messages.empty());
  KEEL_FUZZ_CHECK(item.request.messages.back().role == "user");
  for (const auto& m : item.request.messages) {
    KEEL_FUZZ_CHECK(m.role == "user" || m.role == "assistant");
  }
  KEEL_FUZZ_CHECK(item.request.max_tokens >= 1 && item.request.max_tokens <= 1'000'000);
  KEEL_FUZZ_CHECK(item.metadata.is_null() || item.metadata.is_object());
  // The log preview is a prefix of the last user message: at most 100 UTF-8 characters.
  const std::string& last = item.request.messages.back().content;
  KEEL_FUZZ_CHECK(item.preview.size() <= 400);
  KEEL_FUZZ_CHECK(std::string_view(last).starts_with(item.preview));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // No stack cap by default: known issue KEEL-FUZZ-2 (docs/FUZZING.md) would trip it. Set
  // KEEL_FUZZ_STACK_KB=512 to hunt for recursion on nested input once that is fixed.
  keel::fuzz::limit_stack(0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view text = keel::fuzz::as_text(data, size);
  std::size_t number = 0;
  while (!text.empty()) {
    const auto eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
    ++number;
    if (!line.empty() && line.back() == '\r') {
      line.remove_suffix(1);
    }
    if (line.find_first_not_of(" \t") == std::string_view::npos) {
      continue;  // blank lines are not items
    }
    check_line(line, number);
  }
  return 0;
}
