// Splitting one input file across processes or machines (`keel batch --shard I/N`) and proving
// afterwards that every input line got exactly one record (`keel check`).
#pragma once

// Design (issue 16, item 6)
// ------
// A shard is chosen per input line, the same way on every machine, from the input alone:
// - a valid item by its id: FNV-1a (64-bit) of `id.dump()`, modulo N. Two lines with the same id
//   land in the same shard, so the second is still reported as `duplicate_id`, as in one run;
// - a line that is not a valid item (no readable id, or too long) by its line number, modulo N.
// So N runs over the same file with `--shard 0/N` ... `--shard N-1/N`, each with its own
// results file, together write one record per input line, as one run would. Each shard resumes
// on its own (`--resume` with its own results file).
//
// `keel check --in FILE RESULTS...` reads the input and every results file and says whether
// every non-blank input line has exactly one final record (`ok` or `failed`) across them, with
// the input's id; it names each line that has none, more than one, or only a `cancelled` one,
// each record for a line the input does not have or with another id, and each line of a results
// file that is not a keel record (file:line). With `--merge OUT` it also writes every final
// record, in input-line order, to OUT. It holds one small entry per input line and, with
// `--merge`, the records themselves.
//
// Thread safety: pure functions and file reads; none shared.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace keel::cli {

/// One part of an input split into `count` parts.
struct shard_spec {
  /// This part, 0-based, below `count`.
  std::size_t index = 0;
  /// How many parts.
  std::size_t count = 1;
};

/// Parses "I/N" (0 <= I < N, 1 <= N <= 1,000,000).
/// @throws std::invalid_argument naming the text and what is wrong.
shard_spec parse_shard(std::string_view text);

/// FNV-1a, 64-bit: a hash that is the same on every machine and every build.
std::uint64_t fnv1a64(std::string_view bytes) noexcept;

/// The part of a valid item whose key (`id.dump()`) is `key`.
std::size_t shard_of_key(std::string_view key, std::size_t count) noexcept;

/// The part of an input line that is not a valid item.
std::size_t shard_of_line(std::size_t line, std::size_t count) noexcept;

/// What `check_results` found.
struct check_report {
  /// Non-blank input lines.
  std::size_t lines = 0;
  /// Final records (`ok`, `failed`) read.
  std::size_t records = 0;
  /// Input lines with no final record (of which `cancelled` had only a cancelled one).
  std::size_t missing = 0;
  /// Input lines whose only records are `cancelled` (counted in `missing` too).
  std::size_t cancelled = 0;
  /// Input lines with more than one final record.
  std::size_t duplicated = 0;
  /// Records for a line the input does not have, or with another id than the line's.
  std::size_t unexpected = 0;
  /// Results-file lines that are not keel records.
  std::size_t unreadable = 0;
  /// One message per problem (the first `max_problems`), each naming file:line.
  std::vector<std::string> problems;

  /// True if every line has exactly one final record and nothing else was found.
  bool complete() const noexcept {
    return missing == 0 && duplicated == 0 && unexpected == 0 && unreadable == 0;
  }
};

/// Checks `results` against `input` (see the top of this header).
/// @param merge_to if not empty, each input line's first final record is written there in
///   input-line order (also when the check fails: what there is), through a temporary file
///   beside it renamed over it at the end.
/// @param max_problems how many problem messages to keep.
/// @throws std::runtime_error naming the file when one cannot be read or written.
/// @throws std::invalid_argument if `merge_to` is the input or one of `results`.
check_report check_results(const std::string& input, const std::vector<std::string>& results,
                           const std::string& merge_to = {}, std::size_t max_problems = 20);

}  // namespace keel::cli
