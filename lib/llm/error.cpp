// The keel.llm error category, provider_error and secret redaction.
#include <keel/llm/chat.hpp>
#include <keel/llm/error.hpp>
#include <keel/rate_controller.hpp>

#include <keel/http/message.hpp>

#include <algorithm>
#include <cctype>
#include <utility>

namespace keel::llm {
namespace {

class category_impl final : public boost::system::error_category {
 public:
  // A fixed id makes codes from different shared objects compare equal ("keel_llm").
  constexpr category_impl() noexcept : error_category(0x6b65656c5f6c6c6dULL) {}
  const char* name() const noexcept override { return "keel.llm"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::rate_limited:
        return "rate limited";
      case errc::quota_exhausted:
        return "quota exhausted";
      case errc::overloaded:
        return "provider overloaded";
      case errc::server_error:
        return "provider server error";
      case errc::timeout:
        return "provider timeout";
      case errc::transport:
        return "transport failure";
      case errc::context_length_exceeded:
        return "context length exceeded";
      case errc::content_filtered:
        return "content filtered";
      case errc::auth:
        return "authentication failed";
      case errc::bad_request:
        return "bad request";
      case errc::not_found:
        return "not found";
      case errc::malformed_response:
        return "malformed response";
      case errc::request_too_large:
        return "request too large";
      case errc::redirect:
        return "redirected (not followed)";
    }
    return "unknown keel.llm error";
  }
  boost::system::error_condition default_error_condition(int ev) const noexcept override {
    return make_error_condition(condition_of(static_cast<errc>(ev)));
  }
};

const category_impl category_instance;

bool starts_with_ci(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && keel::http::iequals(s.substr(0, prefix.size()), prefix);
}

bool is_key_char(char c) {
  return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '/' ||
         c == '+' || c == '=' || c == '.';
}

std::string summary(errc code, const provider_error_info& info) {
  std::string s = info.provider.empty() ? std::string("llm") : info.provider;
  s += ": ";
  s += to_string(code);
  if (info.status != 0 || !info.provider_code.empty()) {
    s += " (";
    if (info.status != 0) {
      s += "HTTP " + std::to_string(info.status);
    }
    if (!info.provider_code.empty()) {
      s += info.status != 0 ? " " : "";
      s += redact(info.provider_code, 80);
    }
    s += ")";
  }
  if (!info.message.empty()) {
    s += ": ";
    s += info.message;
  }
  if (!info.request_id.empty()) {
    s += " [request " + info.request_id.substr(0, 100) + "]";
  }
  return s;
}

}  // namespace

const boost::system::error_category& error_category() noexcept {
  return category_instance;
}

keel::condition condition_of(errc e) noexcept {
  switch (e) {
    case errc::rate_limited:
      return keel::condition::throttled;
    case errc::overloaded:
    case errc::server_error:
    case errc::transport:
      return keel::condition::transient;
    case errc::timeout:
      return keel::condition::timeout;
    case errc::quota_exhausted:
    case errc::context_length_exceeded:
    case errc::content_filtered:
    case errc::auth:
    case errc::bad_request:
    case errc::not_found:
    case errc::malformed_response:
    case errc::request_too_large:
    case errc::redirect:
      return keel::condition::permanent;
  }
  return keel::condition::permanent;
}

std::string_view to_string(errc e) noexcept {
  switch (e) {
    case errc::rate_limited:
      return "rate_limited";
    case errc::quota_exhausted:
      return "quota_exhausted";
    case errc::overloaded:
      return "overloaded";
    case errc::server_error:
      return "server_error";
    case errc::timeout:
      return "timeout";
    case errc::transport:
      return "transport";
    case errc::context_length_exceeded:
      return "context_length_exceeded";
    case errc::content_filtered:
      return "content_filtered";
    case errc::auth:
      return "auth";
    case errc::bad_request:
      return "bad_request";
    case errc::not_found:
      return "not_found";
    case errc::malformed_response:
      return "malformed_response";
    case errc::request_too_large:
      return "request_too_large";
    case errc::redirect:
      return "redirect";
  }
  return "unknown";
}

std::string redact(std::string_view text, std::size_t max_bytes) {
  // Providers echo (partially masked) keys in auth errors ("Incorrect API key provided: sk-..."),
  // and a caller may pass any text here; we mask whole tokens that look like credentials rather
  // than trying to recognise every provider's masking scheme.
  std::string out;
  out.reserve(std::min(text.size(), max_bytes));
  std::size_t i = 0;
  bool after_bearer = false;
  while (i < text.size()) {
    if (!is_key_char(text[i])) {
      const char c = text[i];
      const bool control = static_cast<unsigned char>(c) < 0x20 || c == 0x7f;
      // Line breaks become spaces; other control characters (a NUL would cut what() short, an
      // ESC could drive a terminal) become '?'.
      out += (c == '\n' || c == '\r' || c == '\t') ? ' ' : control ? '?' : c;
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < text.size() && is_key_char(text[j])) {
      ++j;
    }
    std::string_view word = text.substr(i, j - i);
    // A URL's port and path ("http://127.0.0.1:20999/openai/deployments/gpt4o" in a transport
    // error) read as one long word with digits, which looked like a key and hid the very part
    // of base_url a reader must check: the port is split off and the rest judged on its own.
    if (i > 0 && text[i - 1] == ':') {
      std::size_t digits = 0;
      while (digits < word.size() && digits < 6 && word[digits] >= '0' && word[digits] <= '9') {
        ++digits;
      }
      if (digits > 0 && digits <= 5 && digits < word.size() && word[digits] == '/') {
        out += word.substr(0, digits);
        i += digits;
        continue;
      }
    }
    // "Bearer [redacted]" is already masked: redacting twice (keel serve redacts a message the
    // client redacted) must not make it "Bearer [[redacted]]".
    const bool masked_already =
        word == "redacted" && i > 0 && j < text.size() &&
        ((text[i - 1] == '[' && text[j] == ']') || (text[i - 1] == '<' && text[j] == '>'));
    const bool looks_like_key =
        (after_bearer && !masked_already) || (starts_with_ci(word, "sk-") && word.size() >= 8) ||
        ((word.starts_with("AKIA") || word.starts_with("ASIA")) && word.size() >= 16) ||
        (word.size() >= 32 && word.find_first_of("0123456789") != std::string_view::npos &&
         word.find(' ') == std::string_view::npos && word.find('.') == std::string_view::npos &&
         word.find('-') == std::string_view::npos);
    after_bearer = keel::http::iequals(word, "bearer");
    out += looks_like_key ? std::string_view("[redacted]") : word;
    i = j;
  }
  if (out.size() > max_bytes) {
    out.resize(max_bytes);
    out += "...";
  }
  return out;
}

provider_error::provider_error(errc code, provider_error_info info)
    : keel::failure(make_error_code(code),
                    summary(code,
                            [&] {
                              info.message = redact(info.message);
                              info.request_id = redact(info.request_id, 200);
                              return info;
                            }()),
                    {}, info.retry_after),
      code_(code),
      info_(std::move(info)) {}

}  // namespace keel::llm

namespace keel::llm {

namespace {

// Masks every occurrence of `secret` in `text`, and a beginning of it (4 bytes or more) that
// ends the text just before the "..." that truncation appends. Returns whether it masked any.
bool mask_secret(std::string& text, std::string_view secret) {
  constexpr std::string_view mask = "[redacted]";
  bool masked = false;
  for (std::size_t at = text.find(secret); at != std::string::npos;
       at = text.find(secret, at + mask.size())) {
    text.replace(at, secret.size(), mask);
    masked = true;
  }
  constexpr std::string_view ellipsis = "...";
  if (text.size() >= ellipsis.size() && std::string_view(text).ends_with(ellipsis)) {
    const std::string_view body = std::string_view(text).substr(0, text.size() - ellipsis.size());
    for (std::size_t k = std::min(secret.size() - 1, body.size()); k >= 4; --k) {
      if (body.ends_with(secret.substr(0, k))) {
        // Keep the result within the `message_limit` bytes `redact` allows, so that re-making
        // the error does not cut the mask itself.
        std::string kept(body.substr(0, body.size() - k));
        kept.resize(std::min(kept.size(), message_limit - mask.size() - ellipsis.size()));
        text = kept + std::string(mask) + std::string(ellipsis);
        masked = true;
        break;
      }
    }
  }
  return masked;
}

}  // namespace

provider_error without_secrets(const provider_error& e,
                               std::initializer_list<std::string_view> secrets) {
  provider_error_info info = e.info();
  bool masked = false;
  // What a content filter's answer held is passed on to callers (keel serve): masked too.
  std::shared_ptr<chat_response> reply;
  if (info.filtered_reply) {
    reply = std::make_shared<chat_response>(*info.filtered_reply);
  }
  for (std::string_view secret : secrets) {
    if (secret.size() < 4) {
      continue;
    }
    masked = mask_secret(info.message, secret) || masked;
    masked = mask_secret(info.provider_code, secret) || masked;
    masked = mask_secret(info.request_id, secret) || masked;
    if (reply) {
      // Whole occurrences only: a reply's fields are not messages cut at message_limit, so
      // mask_secret's rule for a secret cut off before "..." does not apply to them.
      auto replace_all = [&](std::string& field) {
        for (auto at = field.find(secret); at != std::string::npos;
             at = field.find(secret, at + 10)) {
          field.replace(at, secret.size(), "[redacted]");
          masked = true;
        }
      };
      for (std::string* field : {&reply->text, &reply->refusal, &reply->model,
                                 &reply->finish_reason, &reply->request_id}) {
        replace_all(*field);
      }
      for (tool_call& c : reply->tool_calls) {
        for (std::string* field : {&c.id, &c.name, &c.arguments}) {
          replace_all(*field);
        }
      }
    }
  }
  if (reply) {
    info.filtered_reply = std::move(reply);
  }
  return masked ? provider_error(e.llm_code(), std::move(info)) : e;
}

std::vector<std::string> url_credentials(std::string_view url) {
  auto contains_word = [](std::string_view hay, std::string_view word) {
    return std::search(hay.begin(), hay.end(), word.begin(), word.end(), [](char a, char b) {
             return std::tolower(static_cast<unsigned char>(a)) ==
                    std::tolower(static_cast<unsigned char>(b));
           }) != hay.end();
  };
  std::vector<std::string> out;
  const auto q = url.find('?');
  if (q == std::string_view::npos) {
    return out;
  }
  std::string_view rest = url.substr(q + 1);
  while (!rest.empty()) {
    const auto amp = rest.find('&');
    const std::string_view pair = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view() : rest.substr(amp + 1);
    const auto eq = pair.find('=');
    if (eq == std::string_view::npos) {
      continue;
    }
    const std::string_view name = pair.substr(0, eq);
    const std::string_view value = pair.substr(eq + 1);
    bool secret = false;
    for (const std::string_view word :
         {"key", "token", "secret", "sig", "auth", "pass", "cred", "code"}) {
      secret = secret || contains_word(name, word);
    }
    if (!secret || value.size() < 8) {
      continue;  // shorter values ("?auth=true") would mask ordinary words; no key is that short
    }
    out.emplace_back(value);
    std::string decoded;
    for (std::size_t i = 0; i < value.size(); ++i) {
      const auto hex = [](char c) {
        return c >= '0' && c <= '9'   ? c - '0'
               : c >= 'a' && c <= 'f' ? c - 'a' + 10
               : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                      : -1;
      };
      if (value[i] == '%' && i + 2 < value.size() && hex(value[i + 1]) >= 0 &&
          hex(value[i + 2]) >= 0) {
        decoded.push_back(static_cast<char>(hex(value[i + 1]) * 16 + hex(value[i + 2])));
        i += 2;
      } else {
        decoded.push_back(value[i] == '+' ? ' ' : value[i]);
      }
    }
    if (decoded != value && decoded.size() >= 8) {
      out.push_back(std::move(decoded));
    }
  }
  return out;
}

keel::limit_kind limit_of(const provider_error& e) noexcept {
  if (e.llm_code() != errc::rate_limited) {
    return keel::limit_kind::unknown;
  }
  auto mentions = [](std::string_view text, std::string_view word) {
    auto it = std::search(text.begin(), text.end(), word.begin(), word.end(), [](char a, char b) {
      return std::tolower(static_cast<unsigned char>(a)) ==
             std::tolower(static_cast<unsigned char>(b));
    });
    return it != text.end();
  };
  for (std::string_view text :
       {std::string_view(e.message()), std::string_view(e.provider_code())}) {
    if (mentions(text, "token") || mentions(text, "TPM")) {
      return keel::limit_kind::tokens;
    }
  }
  for (std::string_view text :
       {std::string_view(e.message()), std::string_view(e.provider_code())}) {
    if (mentions(text, "request") || mentions(text, "RPM")) {
      return keel::limit_kind::requests;
    }
  }
  return keel::limit_kind::unknown;
}

}  // namespace keel::llm
