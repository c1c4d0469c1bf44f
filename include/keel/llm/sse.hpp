// An incremental, bounded decoder of server-sent events (text/event-stream), the framing of the
// OpenAI and Anthropic streaming APIs.
#pragma once

// Overview
// --------
// `sse_decoder` is a push parser for the event-stream format of the WHATWG HTML standard
// ("Server-sent events", section 9.2.6): feed it the body's bytes as they arrive, split anywhere,
// and it appends each complete event. It implements the standard's field rules: `data:` lines are
// joined with "\n", `event:` names the event, `id:` sets the last event id (ignored if it holds
// a NUL), `retry:` is kept if all digits, lines starting with `:` are comments, one space after
// the colon is dropped, a line without a colon is a field with an empty value, and lines end in
// CRLF, LF or CR (a CR at the end of one chunk and an LF at the start of the next are one line
// end). A blank line dispatches the event; an event with no data is not dispatched. A UTF-8 byte
// order mark at the very start is skipped. Text is passed through as bytes (no UTF-8 validation:
// the JSON parser above checks it).
//
// Bounds: the decoder holds at most one partial line and one event's data. A line, or an event's
// joined data, longer than `max_bytes` (default 1 MiB, far above any provider's chunk) fails the
// decoder: `feed` returns false, `error()` says why, and every later call does nothing. Memory is
// therefore O(max_bytes) whatever the input, and no input makes it throw anything but
// `std::bad_alloc`.
//
// End of stream: the standard discards an event that was not ended by a blank line. `finish()`
// departs from it in one case: an event whose every line was complete but which lacked the final
// blank line is dispatched, so that a server that omits the last blank line after
// `data: [DONE]` does not look cut short (which would make keel retry, and pay for, a complete
// reply). A line cut before its line end is discarded, and `finish()` says so, so that a protocol
// layer can call the body truncated.
//
// Example:
//
//     keel::llm::sse_decoder sse;
//     std::vector<keel::llm::sse_event> events;
//     if (!sse.feed(chunk, events)) { /* sse.error() */ }
//     for (const auto& e : events) { /* e.event, e.data */ }
//
// Cancellation: these are synchronous pure functions (no I/O, no awaiting); there is nothing to
// cancel.
//
// Thread safety: a decoder is a plain value; use one per stream, from one thread at a time.

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace keel::llm {

/// The default bound on one SSE line and on one event's data (1 MiB).
inline constexpr std::size_t default_sse_max_bytes = std::size_t{1} << 20;

/// One dispatched server-sent event.
struct sse_event {
  /// The `event:` field; empty if none was sent (the standard's default type "message").
  std::string event;
  /// The `data:` lines joined with "\n" (never empty for a dispatched event).
  std::string data;
  /// The last event id seen so far on the stream (the `id:` field persists across events).
  std::string id;
};

/// Decodes a text/event-stream body incrementally, with bounded buffers.
class sse_decoder {
 public:
  /// A decoder that bounds lines and event data at `max_bytes` bytes.
  explicit sse_decoder(std::size_t max_bytes = default_sse_max_bytes) : max_bytes_(max_bytes) {}

  /// Decodes `bytes` (any split of the body) and appends every event they complete to `out`.
  /// @returns false if the decoder has failed (a bound was exceeded, now or earlier); events
  ///   completed before the failure are still appended. Throws only `std::bad_alloc`.
  bool feed(std::string_view bytes, std::vector<sse_event>& out);

  /// Ends the stream: appends to `out` an event whose lines were all complete but which was not
  /// followed by a blank line, and discards a line cut before its line end.
  /// @returns true if such a cut line was pending (the body was cut mid-line). The decoder is
  ///   reset for a new stream except for a failure, which stays (then nothing is appended).
  bool finish(std::vector<sse_event>& out);

  /// True once a bound has been exceeded.
  bool failed() const noexcept { return !error_.empty(); }
  /// Why the decoder failed ("" if it has not).
  const std::string& error() const noexcept { return error_; }
  /// The last `retry:` value in milliseconds, if the stream sent one (-1 if not).
  long long retry_ms() const noexcept { return retry_ms_; }

 private:
  bool process_line(std::string_view line, std::vector<sse_event>& out);
  bool fail(std::string why);

  std::size_t max_bytes_;
  std::string line_;  // a line not yet ended
  std::string data_;  // the current event's data, each line followed by "\n"
  std::string event_;
  std::string id_;
  std::string error_;
  long long retry_ms_ = -1;
  bool has_data_ = false;
  bool after_cr_ = false;  // the last byte seen was a CR: a leading LF is part of that line end
  bool at_start_ = true;   // nothing seen yet: a UTF-8 BOM is skipped
  std::size_t bom_seen_ = 0;
};

}  // namespace keel::llm
