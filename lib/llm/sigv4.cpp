// AWS Signature Version 4: canonical request, string to sign, signing key and the signer.
#include "civil_date.hpp"

#include <keel/llm/sigv4.hpp>

#include <keel/http/message.hpp>

#include <cstdlib>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <vector>

namespace keel::llm {
namespace {

struct url_parts {
  std::string scheme, host_header, path, query;
};

url_parts split_url(std::string_view url) {
  url_parts p;
  const auto sep = url.find("://");
  if (sep == std::string_view::npos || sep == 0) {
    throw std::invalid_argument("sigv4: the request URL is not absolute");
  }
  p.scheme = std::string(url.substr(0, sep));
  std::transform(p.scheme.begin(), p.scheme.end(), p.scheme.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  url.remove_prefix(sep + 3);
  if (auto hash = url.find('#'); hash != std::string_view::npos) {
    url = url.substr(0, hash);
  }
  const auto path_at = url.find_first_of("/?");
  std::string_view authority = url.substr(0, path_at);
  url = path_at == std::string_view::npos ? std::string_view() : url.substr(path_at);
  if (auto at = authority.rfind('@'); at != std::string_view::npos) {
    authority.remove_prefix(at + 1);
  }
  // The Host header omits the scheme's default port, as HTTP clients send it.
  const auto colon = authority.rfind(':');
  if (colon != std::string_view::npos && authority.find(']', colon) == std::string_view::npos) {
    const std::string_view port = authority.substr(colon + 1);
    if ((p.scheme == "https" && port == "443") || (p.scheme == "http" && port == "80")) {
      authority = authority.substr(0, colon);
    }
  }
  if (authority.empty()) {
    throw std::invalid_argument("sigv4: the request URL has no host");
  }
  p.host_header = std::string(authority);
  const auto q = url.find('?');
  p.path = std::string(url.substr(0, q));
  p.query = q == std::string_view::npos ? std::string() : std::string(url.substr(q + 1));
  return p;
}

bool unreserved(unsigned char c) {
  return std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~';
}

std::string encode(std::string_view s, bool keep_slash) {
  static constexpr char hexd[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if (unreserved(c) || (keep_slash && c == '/')) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hexd[c >> 4];
      out += hexd[c & 0xF];
    }
  }
  return out;
}

std::string canonical_query(std::string_view query) {
  std::vector<std::pair<std::string, std::string>> params;
  while (!query.empty()) {
    const auto amp = query.find('&');
    std::string_view part = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (part.empty()) {
      continue;
    }
    const auto eq = part.find('=');
    std::string_view k = part.substr(0, eq);
    std::string_view v = eq == std::string_view::npos ? std::string_view() : part.substr(eq + 1);
    params.emplace_back(encode(keel::http::percent_decode(k), false),
                        encode(keel::http::percent_decode(v), false));
  }
  std::sort(params.begin(), params.end());
  std::string out;
  for (const auto& [k, v] : params) {
    if (!out.empty()) {
      out += '&';
    }
    out += k;
    out += '=';
    out += v;
  }
  return out;
}

bool excluded(std::string_view lower_name) {
  return lower_name == "authorization" || lower_name == "user-agent" || lower_name == "expect" ||
         lower_name == "connection" || lower_name == "x-amzn-trace-id";
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

std::string canonical_value(std::string_view v) {
  std::string out;
  bool space = false;
  for (char c : v) {
    if (c == ' ' || c == '\t') {
      space = !out.empty();
      continue;
    }
    if (space) {
      out += ' ';
      space = false;
    }
    out += c;
  }
  return out;
}

// Lower-case name → values in order; std::map gives the sorted order SigV4 wants.
std::map<std::string, std::string> headers_to_sign(const keel::http::request& req) {
  std::map<std::string, std::string> h;
  for (const auto& [name, value] : req.headers.fields()) {
    std::string n = lower(name);
    if (excluded(n)) {
      continue;
    }
    auto [it, fresh] = h.try_emplace(std::move(n), canonical_value(value));
    if (!fresh) {
      it->second += ',';
      it->second += canonical_value(value);
    }
  }
  if (!h.contains("host")) {
    h.emplace("host", split_url(req.url).host_header);
  }
  return h;
}

}  // namespace

namespace sigv4 {

std::string hex(std::string_view bytes) {
  static constexpr char hexd[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out += hexd[c >> 4];
    out += hexd[c & 0xF];
  }
  return out;
}

std::string sha256_hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1) {
    throw std::runtime_error("sigv4: SHA-256 failed");
  }
  return hex(std::string_view(reinterpret_cast<const char*>(md), len));
}

std::string hmac_sha256(std::string_view key, std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(data.data()), data.size(), md, &len) == nullptr) {
    throw std::runtime_error("sigv4: HMAC-SHA256 failed");
  }
  return std::string(reinterpret_cast<const char*>(md), len);
}

std::string amz_date(std::chrono::system_clock::time_point t) {
  const auto secs = std::chrono::floor<std::chrono::seconds>(t).time_since_epoch().count();
  std::int64_t days = secs / 86400;
  std::int64_t rem = secs % 86400;
  if (rem < 0) {
    rem += 86400;
    --days;
  }
  const detail::civil_date date = detail::civil_from_days(days);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%04lld%02u%02uT%02lld%02lld%02lldZ",
                static_cast<long long>(date.year), date.month, date.day,
                static_cast<long long>(rem / 3600), static_cast<long long>(rem / 60 % 60),
                static_cast<long long>(rem % 60));
  return buf;
}

std::string signed_headers(const keel::http::request& req) {
  std::string out;
  for (const auto& [name, value] : headers_to_sign(req)) {
    if (!out.empty()) {
      out += ';';
    }
    out += name;
  }
  return out;
}

std::string canonical_request(const keel::http::request& req, std::string_view payload_hash,
                              std::string_view service) {
  const url_parts u = split_url(req.url);
  std::string path = u.path.empty() ? std::string("/") : u.path;
  if (service != "s3") {
    path = encode(path, true);
  }
  std::string out = req.method;
  out += '\n';
  out += path;
  out += '\n';
  out += canonical_query(u.query);
  out += '\n';
  for (const auto& [name, value] : headers_to_sign(req)) {
    out += name;
    out += ':';
    out += value;
    out += '\n';
  }
  out += '\n';
  out += signed_headers(req);
  out += '\n';
  out += payload_hash;
  return out;
}

std::string scope(std::string_view date, std::string_view region, std::string_view service) {
  std::string out(date);
  out += '/';
  out += region;
  out += '/';
  out += service;
  out += "/aws4_request";
  return out;
}

std::string string_to_sign(std::string_view date_time, std::string_view scope_,
                           std::string_view canonical) {
  std::string out = "AWS4-HMAC-SHA256\n";
  out += date_time;
  out += '\n';
  out += scope_;
  out += '\n';
  out += sha256_hex(canonical);
  return out;
}

std::string signing_key(std::string_view secret_key, std::string_view date, std::string_view region,
                        std::string_view service) {
  std::string k = "AWS4";
  k += secret_key;
  std::string key = hmac_sha256(k, date);
  OPENSSL_cleanse(k.data(), k.size());
  key = hmac_sha256(key, region);
  key = hmac_sha256(key, service);
  return hmac_sha256(key, "aws4_request");
}

}  // namespace sigv4

void sign_request(keel::http::request& req, const aws_credentials& creds, std::string_view region,
                  std::string_view service, std::chrono::system_clock::time_point now,
                  sigv4_options opts) {
  if (creds.access_key.empty() || creds.secret_key.empty()) {
    throw std::invalid_argument("sigv4: missing AWS access key or secret key");
  }
  const url_parts u = split_url(req.url);
  req.headers.erase("authorization");
  req.headers.erase("x-amz-security-token");
  req.headers.erase("x-amz-content-sha256");
  if (!req.headers.find("host")) {
    req.set("host", u.host_header);
  }
  const std::string date_time = sigv4::amz_date(now);
  const std::string date = date_time.substr(0, 8);
  req.set("x-amz-date", date_time);
  if (!creds.session_token.empty()) {
    req.set("x-amz-security-token", creds.session_token);
  }
  const std::string payload_hash = sigv4::sha256_hex(req.body);
  if (opts.add_content_sha256) {
    req.set("x-amz-content-sha256", payload_hash);
  }
  const std::string scope = sigv4::scope(date, region, service);
  const std::string sts =
      sigv4::string_to_sign(date_time, scope, sigv4::canonical_request(req, payload_hash, service));
  std::string key = sigv4::signing_key(creds.secret_key, date, region, service);
  const std::string signature = sigv4::hex(sigv4::hmac_sha256(key, sts));
  OPENSSL_cleanse(key.data(), key.size());
  req.set("authorization", "AWS4-HMAC-SHA256 Credential=" + creds.access_key + "/" + scope +
                               ", SignedHeaders=" + sigv4::signed_headers(req) +
                               ", Signature=" + signature);
}

std::optional<aws_credentials> aws_credentials_from_environment() {
  auto get = [](const char* name) -> std::string {
    const char* v = std::getenv(name);  // NOLINT(concurrency-mt-unsafe): read once at set-up
    return v ? std::string(v) : std::string();
  };
  aws_credentials c(get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY"),
                    get("AWS_SESSION_TOKEN"));
  if (c.access_key.empty() || c.secret_key.empty()) {
    return std::nullopt;
  }
  return c;
}

}  // namespace keel::llm
