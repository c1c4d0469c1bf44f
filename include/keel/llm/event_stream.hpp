// An incremental, bounded decoder (and an encoder) of the AWS event-stream binary framing
// (application/vnd.amazon.eventstream), the body of Bedrock's ConverseStream.
#pragma once

// Overview
// --------
// An event-stream body is a sequence of messages, each:
//
//     total length (u32 BE) | headers length (u32 BE) | prelude CRC32 (u32 BE, of the 8 bytes
//     before) headers (headers-length bytes) | payload | message CRC32 (u32 BE, of every byte
//     before it)
//
// and each header is: name length (u8), name, value type (u8), value. The value's size follows
// from its type: 0 true and 1 false (no bytes), 2 byte (1), 3 short (2), 4 integer (4),
// 5 long (8), 6 byte array and 7 string (u16 BE length, then the bytes), 8 timestamp (8),
// 9 UUID (16). Any other type is an error.
//
// `event_stream_decoder` is a push parser: feed it the body's bytes as they arrive, split
// anywhere, and it appends each complete, verified message. It checks the prelude CRC before
// trusting the lengths (so a corrupt length cannot make it wait for, or buffer, gigabytes), then
// that the lengths are consistent, then the message CRC, then the headers.
//
// Bounds: it holds at most one partial message, and refuses one whose total length exceeds
// `max_message_bytes` (default 16 MiB, the AWS limit) or is below the 16-byte minimum. Any
// violation fails the decoder: `feed` returns false, `error()` says why, and every later call does
// nothing. No input makes it throw anything but `std::bad_alloc`.
//
// CRC32: the IEEE polynomial (reflected 0xEDB88320, as in zlib and Ethernet), computed with
// Boost.CRC (header-only, part of the Boost keel already depends on; zlib is not one of keel's
// declared dependencies). The tests check `crc32` against the standard check value and decode
// messages published in aws-c-event-stream's tests.
//
// Example:
//
//     keel::llm::event_stream_decoder dec;
//     std::vector<keel::llm::event_stream_message> msgs;
//     if (!dec.feed(chunk, msgs)) { /* dec.error() */ }
//     for (const auto& m : msgs) { if (auto t = m.header(":event-type")) { /* *t, m.payload */ } }
//
// Cancellation: these are synchronous pure functions (no I/O, no awaiting); there is nothing to
// cancel.
//
// Thread safety: a decoder is a plain value; use one per stream, from one thread at a time.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace keel::llm {

/// AWS's bound on one event-stream message (16 MiB), the decoder's default.
inline constexpr std::size_t default_event_stream_max_bytes = std::size_t{16} << 20;

/// The smallest possible message: prelude (12 bytes) and message CRC (4), no headers or payload.
inline constexpr std::size_t event_stream_min_bytes = 16;

/// The CRC32 (IEEE 802.3, reflected polynomial 0xEDB88320) of `bytes`.
std::uint32_t crc32(std::string_view bytes) noexcept;

/// The value types of an event-stream header.
enum class event_stream_header_type : std::uint8_t {
  bool_true = 0,   ///< no value bytes
  bool_false = 1,  ///< no value bytes
  byte = 2,        ///< 1 byte
  int16 = 3,       ///< 2 bytes, big-endian
  int32 = 4,       ///< 4 bytes, big-endian
  int64 = 5,       ///< 8 bytes, big-endian
  byte_array = 6,  ///< u16 BE length, then the bytes
  string = 7,      ///< u16 BE length, then UTF-8 bytes
  timestamp = 8,   ///< 8 bytes, big-endian milliseconds since the epoch
  uuid = 9,        ///< 16 bytes
};

/// One header of an event-stream message.
struct event_stream_header {
  /// The header's name, e.g. ":event-type".
  std::string name;
  /// The value's type.
  event_stream_header_type type = event_stream_header_type::string;
  /// The value's bytes as on the wire, without the u16 length of strings and byte arrays
  /// (integers stay big-endian; empty for the two booleans).
  std::string value;

  /// An empty header.
  event_stream_header() = default;
  /// A header with a name, a type and the value's bytes.
  event_stream_header(std::string n, event_stream_header_type t, std::string v)
      : name(std::move(n)), type(t), value(std::move(v)) {}
};

/// One decoded, CRC-checked event-stream message.
struct event_stream_message {
  /// The headers in wire order.
  std::vector<event_stream_header> headers;
  /// The payload bytes.
  std::string payload;

  /// The value of the first string header called `name`, if there is one.
  std::optional<std::string_view> header(std::string_view name) const noexcept;
};

/// Encodes one message: prelude, headers, payload and both CRCs. For tests and mock servers.
/// @throws std::length_error if a name exceeds 255 bytes, a string or byte-array value 65535
///   bytes, a fixed-size value has the wrong size, or the message exceeds 4 GiB.
std::string encode_event_stream_message(const std::vector<event_stream_header>& headers,
                                        std::string_view payload);

/// Decodes an event-stream body incrementally, with bounded buffers.
class event_stream_decoder {
 public:
  /// A decoder that refuses messages longer than `max_message_bytes` bytes.
  explicit event_stream_decoder(std::size_t max_message_bytes = default_event_stream_max_bytes)
      : max_bytes_(max_message_bytes) {}

  /// Decodes `bytes` (any split of the body) and appends every message they complete to `out`.
  /// @returns false if the decoder has failed (a bad CRC, length or header, now or earlier);
  ///   messages completed before the failure are still appended. Throws only `std::bad_alloc`.
  bool feed(std::string_view bytes, std::vector<event_stream_message>& out);

  /// True if part of a message has been received but not all of it (a body that ends now was
  /// cut mid-message).
  bool partial() const noexcept { return !buffer_.empty(); }

  /// True once the decoder has failed.
  bool failed() const noexcept { return !error_.empty(); }
  /// Why the decoder failed ("" if it has not).
  const std::string& error() const noexcept { return error_; }

 private:
  bool decode(std::string_view frame, std::vector<event_stream_message>& out);
  bool check_prelude(std::string_view prelude);
  bool fail(std::string why);

  std::size_t max_bytes_;
  std::string buffer_;        // the start of a message not yet complete
  std::size_t expected_ = 0;  // its total length once the prelude is verified, else 0
  std::string error_;
};

}  // namespace keel::llm
