// The server-sent events decoder (declared in keel/llm/sse.hpp).
#include <keel/llm/sse.hpp>

#include <algorithm>
#include <utility>

namespace keel::llm {

namespace {
constexpr std::string_view bom = "\xEF\xBB\xBF";
}  // namespace

bool sse_decoder::fail(std::string why) {
  error_ = std::move(why);
  line_.clear();
  line_.shrink_to_fit();
  data_.clear();
  data_.shrink_to_fit();
  return false;
}

bool sse_decoder::feed(std::string_view bytes, std::vector<sse_event>& out) {
  if (failed()) {
    return false;
  }
  // The BOM may itself be split across chunks: hold a matching prefix until it is complete or
  // proven not to be one (then its bytes are ordinary line content).
  while (at_start_ && !bytes.empty()) {
    if (bytes.front() == bom[bom_seen_]) {
      bytes.remove_prefix(1);
      if (++bom_seen_ == bom.size()) {
        at_start_ = false;
      }
    } else {
      at_start_ = false;
      line_.assign(bom.substr(0, bom_seen_));
    }
  }
  while (!bytes.empty()) {
    if (after_cr_) {
      after_cr_ = false;
      if (bytes.front() == '\n') {
        bytes.remove_prefix(1);
        continue;
      }
    }
    const std::size_t eol = bytes.find_first_of("\r\n");
    if (eol == std::string_view::npos) {
      if (line_.size() + bytes.size() > max_bytes_) {
        return fail("an event-stream line is longer than " + std::to_string(max_bytes_) + " bytes");
      }
      line_.append(bytes);
      return true;
    }
    if (line_.size() + eol > max_bytes_) {
      return fail("an event-stream line is longer than " + std::to_string(max_bytes_) + " bytes");
    }
    after_cr_ = bytes[eol] == '\r';
    bool ok;
    if (line_.empty()) {
      ok = process_line(bytes.substr(0, eol), out);
    } else {
      line_.append(bytes.substr(0, eol));
      ok = process_line(line_, out);
      // Give back a long line's buffer: idle streams should cost little memory.
      if (line_.capacity() > 4096) {
        line_ = std::string();
      } else {
        line_.clear();
      }
    }
    if (!ok) {
      return false;
    }
    bytes.remove_prefix(eol + 1);
  }
  return true;
}

bool sse_decoder::process_line(std::string_view line, std::vector<sse_event>& out) {
  if (line.empty()) {
    if (has_data_) {
      data_.pop_back();  // the "\n" after the last data line
      out.push_back(sse_event{std::move(event_), std::move(data_), id_});
    }
    data_.clear();
    event_.clear();
    has_data_ = false;
    return true;
  }
  if (line.front() == ':') {
    return true;  // a comment (keep-alive)
  }
  const std::size_t colon = line.find(':');
  const std::string_view field = line.substr(0, colon);
  std::string_view value;
  if (colon != std::string_view::npos) {
    value = line.substr(colon + 1);
    if (!value.empty() && value.front() == ' ') {
      value.remove_prefix(1);
    }
  }
  if (field == "data") {
    if (data_.size() + value.size() + 1 > max_bytes_) {
      return fail("an event's data is longer than " + std::to_string(max_bytes_) + " bytes");
    }
    data_.append(value);
    data_.push_back('\n');
    has_data_ = true;
  } else if (field == "event") {
    event_.assign(value);
  } else if (field == "id") {
    if (value.find('\0') == std::string_view::npos) {
      id_.assign(value);
    }
  } else if (field == "retry") {
    const bool digits =
        !value.empty() && value.size() <= 18 &&
        std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (digits) {
      retry_ms_ = std::stoll(std::string(value));
    }
  }
  return true;
}

bool sse_decoder::finish(std::vector<sse_event>& out) {
  const bool pending = !line_.empty() || (at_start_ && bom_seen_ > 0);
  if (!failed()) {
    process_line({}, out);  // dispatches complete data lines not followed by a blank line
    line_.clear();
    data_.clear();
    event_.clear();
    id_.clear();
    retry_ms_ = -1;
    has_data_ = false;
    after_cr_ = false;
    at_start_ = true;
    bom_seen_ = 0;
  }
  return pending;
}

}  // namespace keel::llm
