// The AWS event-stream decoder and encoder (declared in keel/llm/event_stream.hpp).
#include <keel/llm/event_stream.hpp>

#include <boost/crc.hpp>

#include <algorithm>
#include <stdexcept>
#include <utility>

namespace keel::llm {

namespace {

constexpr std::size_t prelude_bytes = 12;

std::uint32_t read_u32(std::string_view s, std::size_t at) noexcept {
  auto b = [&](std::size_t i) {
    return static_cast<std::uint32_t>(static_cast<unsigned char>(s[at + i]));
  };
  return (b(0) << 24) | (b(1) << 16) | (b(2) << 8) | b(3);
}

std::size_t read_u16(std::string_view s, std::size_t at) noexcept {
  return (static_cast<std::size_t>(static_cast<unsigned char>(s[at])) << 8) |
         static_cast<unsigned char>(s[at + 1]);
}

void put_u32(std::string& out, std::uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) {
    out.push_back(static_cast<char>((v >> shift) & 0xFFU));
  }
}

// The size of a fixed-size value; -1 for the two length-prefixed types, -2 for unknown types.
int fixed_size(unsigned type) noexcept {
  switch (type) {
    case 0:
    case 1:
      return 0;
    case 2:
      return 1;
    case 3:
      return 2;
    case 4:
      return 4;
    case 5:
    case 8:
      return 8;
    case 9:
      return 16;
    case 6:
    case 7:
      return -1;
    default:
      return -2;
  }
}

std::string hex32(std::uint32_t v) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int shift = 28; shift >= 0; shift -= 4) {
    s.push_back(digits[(v >> shift) & 0xFU]);
  }
  return s;
}

}  // namespace

std::uint32_t crc32(std::string_view bytes) noexcept {
  boost::crc_32_type c;
  c.process_bytes(bytes.data(), bytes.size());
  return c.checksum();
}

std::optional<std::string_view> event_stream_message::header(std::string_view name) const noexcept {
  for (const auto& h : headers) {
    if (h.name == name && h.type == event_stream_header_type::string) {
      return std::string_view(h.value);
    }
  }
  return std::nullopt;
}

std::string encode_event_stream_message(const std::vector<event_stream_header>& headers,
                                        std::string_view payload) {
  std::string hdr;
  for (const auto& h : headers) {
    if (h.name.size() > 255) {
      throw std::length_error("event-stream header name longer than 255 bytes");
    }
    hdr.push_back(static_cast<char>(h.name.size()));
    hdr.append(h.name);
    const auto type = static_cast<unsigned>(h.type);
    hdr.push_back(static_cast<char>(type));
    const int size = fixed_size(type);
    if (size == -1) {
      if (h.value.size() > 0xFFFF) {
        throw std::length_error("event-stream header value longer than 65535 bytes");
      }
      hdr.push_back(static_cast<char>(h.value.size() >> 8));
      hdr.push_back(static_cast<char>(h.value.size() & 0xFFU));
    } else if (size < 0 || h.value.size() != static_cast<std::size_t>(size)) {
      throw std::length_error("event-stream header value has the wrong size for its type");
    }
    hdr.append(h.value);
  }
  const std::size_t total = prelude_bytes + hdr.size() + payload.size() + 4;
  if (total > 0xFFFFFFFFU) {
    throw std::length_error("event-stream message longer than 4 GiB");
  }
  std::string out;
  out.reserve(total);
  put_u32(out, static_cast<std::uint32_t>(total));
  put_u32(out, static_cast<std::uint32_t>(hdr.size()));
  put_u32(out, crc32(out));
  out.append(hdr);
  out.append(payload);
  put_u32(out, crc32(out));
  return out;
}

bool event_stream_decoder::fail(std::string why) {
  error_ = std::move(why);
  buffer_.clear();
  buffer_.shrink_to_fit();
  expected_ = 0;
  return false;
}

bool event_stream_decoder::check_prelude(std::string_view prelude) {
  const std::uint32_t total = read_u32(prelude, 0);
  const std::uint32_t headers = read_u32(prelude, 4);
  const std::uint32_t want = read_u32(prelude, 8);
  const std::uint32_t got = crc32(prelude.substr(0, 8));
  if (got != want) {
    return fail("event-stream prelude CRC mismatch (computed " + hex32(got) + ", message says " +
                hex32(want) + ")");
  }
  if (total < event_stream_min_bytes) {
    return fail("event-stream message length " + std::to_string(total) + " is below 16");
  }
  if (total > max_bytes_) {
    return fail("event-stream message length " + std::to_string(total) + " exceeds the limit of " +
                std::to_string(max_bytes_) + " bytes");
  }
  if (headers > total - event_stream_min_bytes) {
    return fail("event-stream headers length " + std::to_string(headers) +
                " does not fit in a message of " + std::to_string(total) + " bytes");
  }
  expected_ = total;
  return true;
}

bool event_stream_decoder::feed(std::string_view bytes, std::vector<event_stream_message>& out) {
  if (failed()) {
    return false;
  }
  while (!bytes.empty()) {
    if (buffer_.empty() && bytes.size() >= prelude_bytes) {
      // Fast path: decode straight from the caller's bytes when a whole message is there.
      if (!check_prelude(bytes.substr(0, prelude_bytes))) {
        return false;
      }
      if (bytes.size() >= expected_) {
        const std::size_t n = expected_;
        expected_ = 0;
        if (!decode(bytes.substr(0, n), out)) {
          return false;
        }
        bytes.remove_prefix(n);
        continue;
      }
      buffer_.assign(bytes);
      return true;
    }
    if (expected_ == 0) {
      const std::size_t take = std::min(prelude_bytes - buffer_.size(), bytes.size());
      buffer_.append(bytes.substr(0, take));
      bytes.remove_prefix(take);
      if (buffer_.size() < prelude_bytes || !check_prelude(buffer_)) {
        return !failed();
      }
    }
    // No reserve(expected_): a 12-byte prelude with a valid CRC would then cost up to
    // max_bytes_ at once; appending makes memory follow the bytes actually received.
    const std::size_t take = std::min(expected_ - buffer_.size(), bytes.size());
    buffer_.append(bytes.substr(0, take));
    bytes.remove_prefix(take);
    if (buffer_.size() == expected_) {
      std::string frame = std::move(buffer_);
      buffer_.clear();
      expected_ = 0;
      if (!decode(frame, out)) {
        return false;
      }
    }
  }
  return true;
}

bool event_stream_decoder::decode(std::string_view frame, std::vector<event_stream_message>& out) {
  const std::size_t total = frame.size();
  const std::size_t headers_len = read_u32(frame, 4);
  const std::uint32_t want = read_u32(frame, total - 4);
  const std::uint32_t got = crc32(frame.substr(0, total - 4));
  if (got != want) {
    return fail("event-stream message CRC mismatch (computed " + hex32(got) + ", message says " +
                hex32(want) + ")");
  }
  event_stream_message msg;
  std::string_view h = frame.substr(prelude_bytes, headers_len);
  while (!h.empty()) {
    const std::size_t name_len = static_cast<unsigned char>(h[0]);
    if (name_len == 0 || h.size() < 1 + name_len + 1) {
      return fail(name_len == 0 ? "event-stream header with an empty name"
                                : "event-stream header runs past the headers section");
    }
    event_stream_header header;
    header.name.assign(h.substr(1, name_len));
    const unsigned type = static_cast<unsigned char>(h[1 + name_len]);
    h.remove_prefix(1 + name_len + 1);
    const int size = fixed_size(type);
    if (size == -2) {
      return fail("event-stream header '" + header.name + "' has unknown value type " +
                  std::to_string(type));
    }
    std::size_t value_len = static_cast<std::size_t>(size);
    if (size == -1) {
      if (h.size() < 2) {
        return fail("event-stream header '" + header.name + "' runs past the headers section");
      }
      value_len = read_u16(h, 0);
      h.remove_prefix(2);
    }
    if (h.size() < value_len) {
      return fail("event-stream header '" + header.name + "' runs past the headers section");
    }
    header.type = static_cast<event_stream_header_type>(type);
    header.value.assign(h.substr(0, value_len));
    h.remove_prefix(value_len);
    msg.headers.push_back(std::move(header));
  }
  msg.payload.assign(
      frame.substr(prelude_bytes + headers_len, total - prelude_bytes - headers_len - 4));
  out.push_back(std::move(msg));
  return true;
}

}  // namespace keel::llm
