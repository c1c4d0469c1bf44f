// The keel command's input: JSONL items parsed, and read line by line.
#include "jsonl.hpp"

#include <keel/llm/strict_json.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace keel::cli {
namespace {

// "/" + `key` as one JSON Pointer reference token (RFC 6901, by nlohmann: "~" is "~0", "/" is
// "~1"), as the strict reader names a repeated key: "/a~1b" is the member "a/b".
std::string pointer_to(const std::string& key) {
  return (nlohmann::json::json_pointer() / key).to_string();
}

using nlohmann::json;

std::string type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer";
    case json::value_t::number_float:
      return "a number";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "a value";
  }
}

struct bad_line : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& path, const std::string& expected, const json& got) {
  throw bad_line(path + ": expected " + expected + ", got " + type_name(got));
}

const std::string& get_string(const json& v, const std::string& path) {
  if (!v.is_string()) {
    fail(path, "a string", v);
  }
  return v.get_ref<const std::string&>();
}

std::string preview_of(std::string_view text) {
  // 100 characters, not bytes: never cut a UTF-8 sequence.
  std::size_t chars = 0, i = 0;
  while (i < text.size() && chars < 100) {
    const auto c = static_cast<unsigned char>(text[i]);
    const std::size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
    i += len;
    ++chars;
  }
  return std::string(text.substr(0, std::min(i, text.size())));
}

void throw_errno(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

}  // namespace

std::variant<batch_item, input_error> parse_input_line(std::string_view text, std::size_t line,
                                                       int default_max_tokens) {
  // nlohmann's parser takes a NUL for the end of its input: `{"id": "a"}\0{"id": "b"}` would
  // be read as item a, and b silently lost.
  if (const auto nul = text.find('\0'); nul != std::string_view::npos) {
    return input_error{
        line, nullptr,
        "a NUL byte at byte " + std::to_string(nul) + " of the line (JSON text cannot hold one)"};
  }
  json doc;
  try {
    doc = keel::llm::parse_strict_json(text);
  } catch (const keel::llm::json_refused& e) {
    const std::string at = " at byte " + std::to_string(e.byte()) + " of the line";
    switch (e.problem()) {
      case keel::llm::json_problem::duplicate_key:
        return input_error{line, nullptr, e.pointer() + ": " + e.what()};
      case keel::llm::json_problem::too_deep:
        return input_error{line, nullptr, e.what() + at};
      case keel::llm::json_problem::syntax:
        return input_error{line, nullptr,
                           "not valid JSON (" + at.substr(1) + ": " + e.what() + ")"};
      case keel::llm::json_problem::unusable:
        break;
    }
    return input_error{line, nullptr, std::string("not usable JSON: ") + e.what()};
  }
  if (!doc.is_object()) {
    return input_error{line, nullptr, "expected a JSON object, got " + type_name(doc)};
  }
  json id = nullptr;
  try {
    const auto it = doc.find("id");
    if (it == doc.end()) {
      throw bad_line("/id: missing (every item needs a string or integer id)");
    }
    if (!it->is_string() && !it->is_number_integer() && !it->is_number_unsigned()) {
      fail("/id", "a string or an integer", *it);
    }
    id = *it;
    batch_item item;
    item.line = line;
    item.id = id;
    item.key = id.dump();
    item.request.max_tokens = default_max_tokens;
    bool has_prompt = false, has_messages = false;
    for (const auto& [key, value] : doc.items()) {
      const std::string path = pointer_to(key);
      if (key == "id") {
        continue;
      }
      if (key == "prompt") {
        const std::string& p = get_string(value, path);
        if (p.empty()) {
          throw bad_line("/prompt: expected a non-empty string");
        }
        item.request.messages.emplace_back("user", p);
        has_prompt = true;
      } else if (key == "messages") {
        if (!value.is_array() || value.empty()) {
          fail(path, "a non-empty array of {\"role\", \"content\"} objects", value);
        }
        for (std::size_t i = 0; i < value.size(); ++i) {
          const json& m = value[i];
          const std::string mp = path + "/" + std::to_string(i);
          if (!m.is_object()) {
            fail(mp, "an object", m);
          }
          std::string role, content;
          bool has_role = false, has_content = false;
          for (const auto& [mk, mv] : m.items()) {
            if (mk == "role") {
              role = get_string(mv, mp + "/role");
              has_role = true;
            } else if (mk == "content") {
              content = get_string(mv, mp + "/content");
              has_content = true;
            } else {
              throw bad_line(mp + pointer_to(mk) + ": unknown key (allowed: role, content)");
            }
          }
          if (!has_role) {
            throw bad_line(mp + "/role: missing");
          }
          if (!has_content) {
            throw bad_line(mp + "/content: missing");
          }
          if (role == "system") {
            item.request.system += item.request.system.empty() ? content : "\n" + content;
          } else if (role == "user" || role == "assistant") {
            item.request.messages.emplace_back(role, content);
          } else {
            throw bad_line(mp + "/role: expected \"user\", \"assistant\" or \"system\", got \"" +
                           preview_of(role) + "\"");
          }
        }
        has_messages = true;
      } else if (key == "model") {
        item.request.model = get_string(value, path);
        if (item.request.model.empty()) {
          throw bad_line("/model: expected a non-empty string");
        }
      } else if (key == "max_tokens") {
        if (!value.is_number_integer() && !value.is_number_unsigned()) {
          fail(path, "an integer in [1, 1000000]", value);
        }
        // An unsigned value above LLONG_MAX (18446744073709551615) must not be read as a signed
        // one: it would be reported as -1. The error shows the number as written.
        const bool in_range =
            value.is_number_unsigned()
                ? value.get<std::uint64_t>() >= 1 && value.get<std::uint64_t>() <= 1000000
                : value.get<long long>() >= 1 && value.get<long long>() <= 1000000;
        if (!in_range) {
          throw bad_line("/max_tokens: expected an integer in [1, 1000000], got " + value.dump());
        }
        item.request.max_tokens = static_cast<int>(value.get<long long>());
      } else if (key == "system") {
        const std::string& s = get_string(value, path);
        item.request.system = item.request.system.empty() ? s : s + "\n" + item.request.system;
      } else if (key == "metadata") {
        if (!value.is_object()) {
          fail(path, "an object", value);
        }
        item.metadata = value;
      } else if (key == "temperature" || key == "top_p") {
        const double hi = key == "temperature" ? 2 : 1;
        const char* range = key == "temperature" ? "a number in [0, 2]" : "a number in [0, 1]";
        if (!value.is_number()) {
          fail(path, range, value);
        }
        const double x = value.get<double>();
        if (!(x >= 0 && x <= hi)) {
          throw bad_line(path + ": expected " + range + ", got " + value.dump());
        }
        (key == "temperature" ? item.request.temperature : item.request.top_p) = x;
      } else if (key == "stop") {
        if (value.is_string() && !value.get_ref<const std::string&>().empty()) {
          item.request.stop = {value.get<std::string>()};
        } else if (value.is_array() && !value.empty()) {
          for (std::size_t i = 0; i < value.size(); ++i) {
            const std::string& s = get_string(value[i], path + "/" + std::to_string(i));
            if (s.empty()) {
              fail(path + "/" + std::to_string(i), "a non-empty string", value[i]);
            }
            item.request.stop.push_back(s);
          }
        } else {
          fail(path, "a non-empty string or a non-empty array of them", value);
        }
      } else if (key == "seed") {
        if (!value.is_number_integer() ||
            (value.is_number_unsigned() && value.get<std::uint64_t>() > INT64_MAX)) {
          fail(path, "a 64-bit integer", value);
        }
        item.request.seed = value.get<std::int64_t>();
      } else {
        throw bad_line(path +
                       ": unknown key (allowed: id, prompt, messages, model, max_tokens, system, "
                       "metadata, temperature, top_p, stop, seed)");
      }
    }
    if (has_prompt == has_messages) {
      throw bad_line(has_prompt ? "/: give either prompt or messages, not both"
                                : "/prompt: missing (give prompt or messages)");
    }
    if (item.request.messages.empty() || item.request.messages.back().role != "user") {
      throw bad_line("/messages: the last message must have role \"user\"");
    }
    item.preview = preview_of(item.request.messages.back().content);
    return item;
  } catch (const bad_line& e) {
    return input_error{line, id, e.what()};
  }
}

// ---- input_reader ----------------------------------------------------------------------------

input_reader::input_reader(const std::string& path) : path_(path) {
  if (path == "-") {
    file_ = stdin;
    return;
  }
  file_ = std::fopen(path.c_str(), "rb");
  if (!file_) {
    throw_errno("cannot open input", path);
  }
  owned_ = true;
  struct stat st {};
  if (::fstat(::fileno(file_), &st) == 0 && S_ISDIR(st.st_mode)) {
    std::fclose(file_);  // the destructor does not run for a constructor that throws
    file_ = nullptr;
    throw std::runtime_error("cannot read input " + path + ": it is a directory");
  }
}

input_reader::~input_reader() {
  if (owned_ && file_) {
    std::fclose(file_);
  }
}

std::optional<input_reader::raw_line> input_reader::next() {
  for (;;) {
    raw_line out;
    bool any = false;
    int c;
    while ((c = std::getc(file_)) != EOF) {
      any = true;
      if (c == '\n') {
        break;
      }
      if (out.text.size() < max_line_bytes) {
        out.text.push_back(static_cast<char>(c));
      } else {
        out.too_long = true;
      }
    }
    if (std::ferror(file_)) {
      throw_errno("cannot read input", path_);
    }
    if (!any) {
      return std::nullopt;
    }
    out.number = ++number_;
    if (!out.text.empty() && out.text.back() == '\r') {
      out.text.pop_back();
    }
    if (out.text.find_first_not_of(" \t\r") == std::string::npos && !out.too_long) {
      continue;  // blank lines are not items (the same test as count_items)
    }
    return out;
  }
}

bool input_reader::is_regular_file() const {
  struct stat st {};
  return ::fstat(::fileno(file_), &st) == 0 && S_ISREG(st.st_mode);
}

std::optional<std::size_t> count_items(const std::string& path) {
  struct stat st {};
  if (path == "-" || ::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return std::nullopt;  // reading a pipe to count it would take its lines from the batch
  }
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    return std::nullopt;
  }
  std::size_t n = 0;
  bool blank = true;
  std::vector<char> buf(1 << 16);
  std::size_t got;
  while ((got = std::fread(buf.data(), 1, buf.size(), f)) > 0) {
    for (std::size_t i = 0; i < got; ++i) {
      const char c = buf[i];
      if (c == '\n') {
        n += blank ? 0 : 1;
        blank = true;
      } else if (c != ' ' && c != '\t' && c != '\r') {
        blank = false;
      }
    }
  }
  n += blank ? 0 : 1;
  std::fclose(f);
  return n;
}

}  // namespace keel::cli
