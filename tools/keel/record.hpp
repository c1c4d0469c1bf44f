// The results file's records: what one holds, for `keel batch` writing it and `--resume` reading
// it back.
#pragma once

// Schema
// ------
// One JSON object per input line (keys are written in byte order, as nlohmann::json sorts
// them). Every record has `id` (as the input gave it; null if the line had none that could be
// read), `line` (the 1-based input line), `status`, `attempts` and `latency_ms`:
//
//   ok          text, model (the answer's, else the model asked for), entry (the config entry's
//               name), fallback (true if a later entry answered), finish_reason,
//               usage {input, output}, and cost (dollars) when the entry has a price
//   failed      error (llm::error_json: class, condition, message, ... and gave_up) and entry;
//               for a line that never became a call, error {class: invalid_input or
//               duplicate_id, condition: permanent, message}, attempts 0 and latency_ms 0
//   cancelled   error {class: cancelled, condition: cancelled, message}; dropped on --resume
//
// and `metadata` when the input line had one. A streamed run (`--stream`) gives every record of
// a call `ttft_ms`: the time to the first text of the reply, null if none came.
//
// Reading back (--resume): a record is an object with a string `status`, an unsigned `line`
// and an `id`. An item is identified by its id (`id.dump()`, the batch's key), except the
// records about the line itself (invalid_input, duplicate_id), identified by line number (and
// dropped on --resume: the resumed run reads the line again).
//
// Thread safety: these are pure functions.

#include <keel/llm/client.hpp>
#include <keel/llm/config.hpp>
#include "jsonl.hpp"

#include <nlohmann/json.hpp>

#include <cstddef>
#include <optional>
#include <string>

namespace keel::cli {

/// `status` of an item that was answered.
inline constexpr const char* record_status_ok = "ok";
/// `status` of an item (or input line) that failed.
inline constexpr const char* record_status_failed = "failed";
/// `status` of an item interrupted by a signal (run again on --resume).
inline constexpr const char* record_status_cancelled = "cancelled";

/// Error class of a line that is not a valid item.
inline constexpr const char* record_invalid_input = "invalid_input";
/// Error class of a line whose id an earlier line already used.
inline constexpr const char* record_duplicate_id = "duplicate_id";

/// The record of an input line that never became a call (status `failed`, 0 attempts).
/// @param line the 1-based input line.
/// @param id the line's id if it could be read, else null.
/// @param cls `record_invalid_input` or `record_duplicate_id`.
/// @param message what is wrong with the line.
nlohmann::json line_failure_record(std::size_t line, const nlohmann::json& id,
                                   const std::string& cls, const std::string& message);

/// What an answer from `entry` cost at the entry's configured price, US dollars; nullopt if the
/// entry has none.
std::optional<double> answer_cost(const llm::entry_config& entry, const llm::chat_response& r);

/// The record of a call's outcome: `ok` with the answer, `cancelled` if a signal interrupted it,
/// else `failed` with the error.
/// @param item the input item.
/// @param out the call's outcome.
/// @param entry the config entry `out.entry` names.
/// @param cost `answer_cost` of the answer (written as `cost` when set).
/// @param streamed true if the call was streamed: the record has `ttft_ms`
///   (`out.first_token_seconds`, null without a first token).
nlohmann::json outcome_record(const batch_item& item, const llm::call_outcome& out,
                              const llm::entry_config& entry, std::optional<double> cost,
                              bool streamed);

/// A record as one line of the results file (no newline). Invalid UTF-8 from a provider must
/// not make a record unwritable: it becomes U+FFFD.
inline std::string record_text(const nlohmann::json& record) {
  return record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

/// `outcome_record` as the text the results file holds
/// (`record_text`), byte for byte; an answer's record (the
/// hot path) is written straight as text (keel/llm/json_writer.hpp), its keys in the order the
/// tree would sort them, the others through the tree.
std::string outcome_line(const batch_item& item, const llm::call_outcome& out,
                         const llm::entry_config& entry, std::optional<double> cost, bool streamed);

/// A record read back from a results file: what --resume needs of it.
struct stored_record {
  /// `status`: "ok", "failed", "cancelled" (or another string).
  std::string status;
  /// `line`, the input line.
  std::size_t line = 0;
  /// `id.dump()`: the item's key, as batch_item::key.
  std::string key;
  /// `error.class` if the record has one, else empty.
  std::string error_class;

  /// True for a record about its input line (invalid_input, duplicate_id), which is identified
  /// by `line`; any other is identified by `key`.
  bool about_line() const;
};

/// Reads one line of a results file (without its newline).
/// @returns nullopt if the line is not a keel record: not JSON (or holding a NUL byte, or nested
///   deeper than keel::llm::max_json_depth), not an object, or without a string `status`, an
///   unsigned `line` and an `id`.
std::optional<stored_record> read_record(const std::string& text);

}  // namespace keel::cli
