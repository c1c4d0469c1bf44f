// Plain HTTP request/response values shared by the transport, the providers and the mock server.
#pragma once

// Overview
// --------
// The layers of keel stay visible: the core knows nothing of HTTP; `keel::llm` (providers and
// their wire formats) builds and reads these plain values without knowing how they travel; and
// `keel::http` (Beast + OpenSSL, kept inside a few .cpp files) sends them. Nothing here includes
// Beast.
//
// Header names compare case-insensitively (`find`); values are kept as received. A header may
// appear more than once; `find` returns the first.
//
// Example:
//
//     keel::http::request req{"POST", "https://api.openai.com/v1/chat/completions"};
//     req.set("authorization", "Bearer " + key);
//     req.set("content-type", "application/json");
//     req.body = R"({"model":"gpt-4o-mini","messages":[]})";
//
// Thread safety: plain values.

#include <algorithm>
#include <cctype>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::http {

/// One header field.
using header = std::pair<std::string, std::string>;

/// `s` with each `%XX` (two hex digits, either case) replaced by its byte; a `%` not followed
/// by two hex digits is kept as it is.
inline std::string percent_decode(std::string_view s) {
  auto hex = [](char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
  };
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && hex(s[i + 1]) >= 0 && hex(s[i + 2]) >= 0) {
      out += static_cast<char>(hex(s[i + 1]) * 16 + hex(s[i + 2]));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

/// True if two header names are equal ignoring ASCII case.
inline bool iequals(std::string_view a, std::string_view b) noexcept {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) ==
                  std::tolower(static_cast<unsigned char>(y));
         });
}

/// A list of header fields with case-insensitive lookup.
class header_list {
 public:
  header_list() = default;
  /// Builds from name/value pairs.
  header_list(std::initializer_list<header> h) : fields_(h) {}

  /// The first value of `name`, if present.
  std::optional<std::string_view> find(std::string_view name) const noexcept {
    for (const auto& [n, v] : fields_) {
      if (iequals(n, name)) {
        return std::string_view(v);
      }
    }
    return std::nullopt;
  }
  /// Replaces every `name` field by one with `value`.
  void set(std::string_view name, std::string value) {
    erase(name);
    fields_.emplace_back(std::string(name), std::move(value));
  }
  /// Adds a field, keeping existing ones of the same name.
  void add(std::string name, std::string value) {
    fields_.emplace_back(std::move(name), std::move(value));
  }
  /// Removes every `name` field.
  void erase(std::string_view name) {
    std::erase_if(fields_, [&](const header& h) { return iequals(h.first, name); });
  }
  /// The fields in order.
  const std::vector<header>& fields() const noexcept { return fields_; }
  /// How many fields.
  std::size_t size() const noexcept { return fields_.size(); }

 private:
  std::vector<header> fields_;
};

/// An HTTP request: method, absolute URL, headers, body.
struct request {
  /// Method, e.g. "POST".
  std::string method = "GET";
  /// Absolute URL: `http://host[:port]/path?query` or `https://...`.
  std::string url;
  /// Header fields (the client adds Host, Content-Length and User-Agent if absent).
  header_list headers;
  /// Body bytes.
  std::string body;

  request() = default;
  /// A request with a method and URL.
  request(std::string m, std::string u) : method(std::move(m)), url(std::move(u)) {}

  /// Sets a header, replacing earlier ones of the same name.
  void set(std::string_view name, std::string value) { headers.set(name, std::move(value)); }
};

/// An HTTP response: status, headers, body.
struct response {
  /// Status code, e.g. 200.
  int status = 0;
  /// Reason phrase as sent.
  std::string reason;
  /// Header fields.
  header_list headers;
  /// Body bytes (already de-chunked).
  std::string body;
};

}  // namespace keel::http
