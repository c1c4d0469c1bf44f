// The results file's records: built for `keel batch` and read back for `--resume` (record.hpp).
#include "record.hpp"

#include <keel/llm/json_depth.hpp>
#include <keel/llm/json_writer.hpp>

#include <cmath>
#include <string_view>

namespace keel::cli {

using nlohmann::json;

namespace {

// Seconds as a record's milliseconds, to a tenth.
double record_ms(double seconds) {
  return std::round(seconds * 1e4) / 10;
}

}  // namespace

json line_failure_record(std::size_t line, const json& id, const std::string& cls,
                         const std::string& message) {
  json rec;
  rec["id"] = id;
  rec["line"] = line;
  rec["status"] = record_status_failed;
  rec["error"] = {{"class", cls}, {"condition", "permanent"}, {"message", message}};
  rec["attempts"] = 0;
  rec["latency_ms"] = 0;  // every record has it; nothing was sent
  return rec;
}

std::optional<double> answer_cost(const llm::entry_config& entry, const llm::chat_response& r) {
  if (!entry.price) {
    return std::nullopt;
  }
  return (static_cast<double>(r.usage.input) * entry.price->first +
          static_cast<double>(r.usage.output) * entry.price->second) /
         1000;
}

json outcome_record(const batch_item& item, const llm::call_outcome& out,
                    const llm::entry_config& entry, std::optional<double> cost, bool streamed) {
  json rec;
  rec["id"] = item.id;
  rec["line"] = item.line;
  if (out.response) {
    const auto& r = *out.response;
    rec["status"] = record_status_ok;
    rec["text"] = r.text;
    rec["model"] =
        r.model.empty()
            ? (out.entry == 0 && !item.request.model.empty() ? item.request.model : entry.model)
            : r.model;
    rec["entry"] = entry.name();
    rec["fallback"] = out.entry != 0;
    rec["finish_reason"] = r.finish_reason;
    rec["usage"] = {{"input", r.usage.input}, {"output", r.usage.output}};
  } else if (llm::error_class(out.error) == "cancelled") {
    rec["status"] = record_status_cancelled;
    rec["error"] = {{"class", "cancelled"},
                    {"condition", "cancelled"},
                    {"message", "interrupted by a signal; rerun with --resume"}};
  } else {
    rec["status"] = record_status_failed;
    rec["error"] = llm::error_json(out.error);
    rec["entry"] = entry.name();
  }
  rec["attempts"] = out.attempts;
  rec["latency_ms"] = record_ms(out.seconds);
  if (streamed) {
    rec["ttft_ms"] = out.first_token_seconds ? json(record_ms(*out.first_token_seconds)) : json();
  }
  if (!item.metadata.is_null()) {
    rec["metadata"] = item.metadata;
  }
  if (out.response && cost) {
    rec["cost"] = *cost;
  }
  return rec;
}

std::string outcome_line(const batch_item& item, const llm::call_outcome& out,
                         const llm::entry_config& entry, std::optional<double> cost,
                         bool streamed) {
  if (!out.response) {
    return record_text(outcome_record(item, out, entry, cost, streamed));
  }
  // The members of `outcome_record`'s answer, in the order nlohmann's sorted map dumps them.
  const auto& r = *out.response;
  std::string text;
  text.reserve(160 + r.text.size());
  llm::json_writer w(text);
  w.begin_object().key("attempts").value(out.attempts);
  if (cost) {
    w.key("cost").value(*cost);
  }
  w.key("entry").value(entry.name());
  w.key("fallback").value(out.entry != 0);
  w.key("finish_reason").value(r.finish_reason);
  w.key("id").value(item.id);
  w.key("latency_ms").value(record_ms(out.seconds));
  w.key("line").value(item.line);
  if (!item.metadata.is_null()) {
    w.key("metadata").value(item.metadata);
  }
  w.key("model").value(
      r.model.empty()
          ? (out.entry == 0 && !item.request.model.empty() ? item.request.model : entry.model)
          : r.model);
  w.key("status").value(record_status_ok);
  w.key("text").value(r.text);
  if (streamed) {
    w.key("ttft_ms");
    if (out.first_token_seconds) {
      w.value(record_ms(*out.first_token_seconds));
    } else {
      w.null();
    }
  }
  w.key("usage").begin_object().key("input").value(r.usage.input);
  w.key("output").value(r.usage.output).end_object();
  w.end_object();
  return text;
}

bool stored_record::about_line() const {
  return error_class == record_invalid_input || error_class == record_duplicate_id;
}

std::optional<stored_record> read_record(const std::string& text) {
  json rec;
  bool ok = true;
  try {
    // A NUL ends nlohmann's input: "record + NUL padding" (what a power loss can leave) would
    // parse as the record and be kept with its NULs. Too deep a line is not keel's either.
    ok = text.find('\0') == std::string::npos &&
         keel::llm::json_too_deep_at(text) == std::string_view::npos;
    if (ok) {
      rec = json::parse(text);
    }
    ok = ok && rec.is_object() && rec.contains("status") && rec.contains("line") &&
         rec.contains("id") && rec["status"].is_string() && rec["line"].is_number_unsigned();
  } catch (const json::exception&) {  // parse_error, or out_of_range for "1e400"
    ok = false;
  }
  if (!ok) {
    return std::nullopt;
  }
  stored_record out;
  out.status = rec["status"].get<std::string>();
  out.line = rec["line"].get<std::size_t>();
  out.key = rec["id"].dump();
  if (auto e = rec.find("error");
      e != rec.end() && e->is_object() && e->contains("class") && (*e)["class"].is_string()) {
    out.error_class = (*e)["class"].get<std::string>();
  }
  return out;
}

}  // namespace keel::cli
