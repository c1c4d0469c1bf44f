// URL handling of keel::http: parsing request URLs, `valid_url` and `redact_url`.
#include "url.hpp"

#include <keel/http/client.hpp>
#include <keel/http/message.hpp>

#include <boost/asio/ip/address.hpp>

#include <algorithm>
#include <charconv>

namespace keel::http {

namespace detail {

bool has_control(std::string_view s) {
  return std::any_of(s.begin(), s.end(),
                     [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
}

namespace {

bool istarts_with(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && iequals(s.substr(0, prefix.size()), prefix);
}

}  // namespace

std::optional<url_parts> parse_url(std::string_view url) {
  url_parts u;
  std::string_view rest;
  if (istarts_with(url, "http://")) {
    rest = url.substr(7);
  } else if (istarts_with(url, "https://")) {
    u.tls = true;
    rest = url.substr(8);
  } else {
    return std::nullopt;
  }
  if (has_control(url) || url.find(' ') != std::string_view::npos) {
    return std::nullopt;
  }
  const auto auth_end = rest.find_first_of("/?#");
  std::string_view auth = rest.substr(0, auth_end);
  std::string_view target = auth_end == std::string_view::npos ? "/" : rest.substr(auth_end);
  target = target.substr(0, target.find('#'));
  if (auth.find('@') != std::string_view::npos || auth.empty()) {
    return std::nullopt;  // userinfo would put credentials into error messages and logs
  }
  std::string_view port_text;
  if (auth.front() == '[') {
    const auto close = auth.find(']');
    if (close == std::string_view::npos) {
      return std::nullopt;
    }
    u.host = std::string(auth.substr(1, close - 1));
    const auto after = auth.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') {
        return std::nullopt;
      }
      port_text = after.substr(1);
    }
  } else {
    const auto colon = auth.find(':');
    u.host = std::string(auth.substr(0, colon));
    if (colon != std::string_view::npos) {
      port_text = auth.substr(colon + 1);
    }
  }
  if (u.host.empty()) {
    return std::nullopt;
  }
  u.port = u.tls ? 443 : 80;
  if (!port_text.empty()) {
    unsigned p = 0;
    const auto [end, ec] =
        std::from_chars(port_text.data(), port_text.data() + port_text.size(), p);
    if (ec != std::errc() || end != port_text.data() + port_text.size() || p == 0 || p > 65535) {
      return std::nullopt;
    }
    u.port = static_cast<std::uint16_t>(p);
  }
  u.target =
      target.empty() || target.front() != '/' ? "/" + std::string(target) : std::string(target);
  boost::system::error_code ec;
  boost::asio::ip::make_address(u.host, ec);
  u.host_is_ip = !ec;
  return u;
}

}  // namespace detail

std::string redact_url(std::string_view url) {
  std::string out(url.substr(0, url.find('#')));  // a fragment is never sent, nor shown
  // Userinfo (`user:password@`) is never shown.
  if (const auto scheme = out.find("://"); scheme != std::string::npos) {
    const auto auth_begin = scheme + 3;
    const auto auth_end = out.find_first_of("/?", auth_begin);
    const auto at = out.substr(auth_begin, auth_end - auth_begin).rfind('@');
    if (at != std::string::npos) {
      out.replace(auth_begin, at, "<redacted>");
    }
  }
  // The query can carry an API key (Gemini's `?key=`): names stay, values go.
  const auto q = out.find('?');
  if (q == std::string::npos) {
    return out;
  }
  const std::string query = out.substr(q + 1);
  out.resize(q + 1);
  std::size_t begin = 0;
  while (begin <= query.size()) {
    const auto amp = std::min(query.find('&', begin), query.size());
    const std::string_view param(query.data() + begin, amp - begin);
    if (begin > 0) {
      out += '&';
    }
    if (const auto eq = param.find('='); eq != std::string_view::npos) {
      out.append(param.substr(0, eq)).append("=<redacted>");
    } else if (!param.empty()) {
      out += "<redacted>";
    }
    begin = amp + 1;
  }
  return out;
}

bool valid_url(std::string_view url) {
  return detail::parse_url(url).has_value();
}

}  // namespace keel::http
