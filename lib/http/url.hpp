// Private URL helpers of keel::http (lib/http/url.cpp): splitting a request URL into what the
// client connects to, and the control-character check shared with header validation.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace keel::http::detail {

struct url_parts {
  bool tls = false;
  std::string host;  // without brackets for IPv6
  std::uint16_t port = 0;
  std::string target;
  bool host_is_ip = false;
};

// True if `s` holds an ASCII control character (below 0x20, or DEL).
bool has_control(std::string_view s);

// Splits an absolute `http://` or `https://` URL; nullopt for anything `valid_url` refuses
// (userinfo, control characters or spaces, a bad port, no host).
std::optional<url_parts> parse_url(std::string_view url);

}  // namespace keel::http::detail
