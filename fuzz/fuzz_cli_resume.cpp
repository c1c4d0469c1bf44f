// Fuzz target: keel::cli::prepare_resume, the keel command's scan of a results file (tools/keel).
//
// The input is written to a results file in a private temporary directory (on /dev/shm when it
// exists, so the fsync of a rewrite is cheap) and scanned. prepare_resume must return or throw
// std::runtime_error. When it throws, the file must be left untouched; when it returns, the
// file must be clean: a second scan keeps the same records, drops nothing and rewrites nothing.
#include "fuzz_support.hpp"

#include "results_file.hpp"

#include <nlohmann/json.hpp>

#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <string_view>

namespace {

std::string temp_dir;

void remove_temp_dir() {
  std::error_code ec;
  std::filesystem::remove_all(temp_dir, ec);
}

// True if a rewrite left a temporary file (`results.jsonl.keel-tmp-XXXXXX`) in the directory.
bool temp_file_left() {
  std::error_code ec;
  for (const auto& f : std::filesystem::directory_iterator(temp_dir, ec)) {
    if (f.path().filename().string().find(".keel-tmp") != std::string::npos) {
      return true;
    }
  }
  return false;
}

const std::string& results_path() {
  static const std::string path = [] {
    std::string base = "/tmp";
    if (::access("/dev/shm", W_OK) == 0) {
      base = "/dev/shm";
    } else if (const char* t = std::getenv("TMPDIR"); t != nullptr && *t != '\0') {
      base = t;
    }
    temp_dir = base + "/keel-fuzz-resume-XXXXXX";
    if (::mkdtemp(temp_dir.data()) == nullptr) {
      std::perror("mkdtemp");
      std::abort();
    }
    std::atexit(remove_temp_dir);
    return temp_dir + "/results.jsonl";
  }();
  return path;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  KEEL_FUZZ_CHECK(out.good());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // No stack cap by default: known issue KEEL-FUZZ-2 (docs/FUZZING.md) would trip it. Set
  // KEEL_FUZZ_STACK_KB=512 to hunt for recursion on nested input once that is fixed.
  keel::fuzz::limit_stack(0);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = results_path();
  const std::string_view input = keel::fuzz::as_text(data, size);
  write_file(path, input);
  keel::cli::resume_state first;
  try {
    first = keel::cli::prepare_resume(path);
  } catch (const std::runtime_error&) {
    KEEL_FUZZ_CHECK(read_file(path) == input);  // documented: the file is left untouched
    KEEL_FUZZ_CHECK(!temp_file_left());
    return 0;
  } catch (const nlohmann::json::out_of_range& e) {
    keel::fuzz::known_number_overflow(e.id);  // KEEL-FUZZ-1
    KEEL_FUZZ_CHECK(read_file(path) == input);
    return 0;
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::cli::prepare_resume");
  }
  KEEL_FUZZ_CHECK(!temp_file_left());
  // Records about a line are dropped (their lines are read again): every kept one has an id.
  KEEL_FUZZ_CHECK(first.kept == first.done_keys.size());
  const std::string after = read_file(path);
  const bool dropped = first.dropped_cancelled > 0 || first.dropped_duplicates > 0 ||
                       first.dropped_line_records > 0 || first.dropped_torn_tail;
  if (!dropped && (input.empty() || input.back() == '\n')) {
    KEEL_FUZZ_CHECK(after == input);  // nothing to drop: no rewrite
  }
  // A clean file scans the same again and is not rewritten.
  keel::cli::resume_state second;
  try {
    second = keel::cli::prepare_resume(path);
  } catch (...) {
    keel::fuzz::unexpected_exception("keel::cli::prepare_resume (second scan)");
  }
  KEEL_FUZZ_CHECK(second.kept == first.kept);
  KEEL_FUZZ_CHECK(second.done_keys == first.done_keys);
  KEEL_FUZZ_CHECK(second.dropped_line_records == 0);
  KEEL_FUZZ_CHECK(second.dropped_cancelled == 0 && second.dropped_duplicates == 0);
  KEEL_FUZZ_CHECK(!second.dropped_torn_tail);
  KEEL_FUZZ_CHECK(read_file(path) == after);
  return 0;
}
