// Parsing of server hints: Retry-After and friends, HTTP-dates, Go durations, rate-limit headers.
#include "civil_date.hpp"

#include <keel/llm/hints.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace keel::llm {
namespace {

using detail::civil_from_days;
using detail::days_from_civil;

using std::chrono::nanoseconds;
using std::chrono::system_clock;
using sv = std::string_view;

// Anything beyond this does not fit std::chrono::nanoseconds (int64, ~292 years); we treat such
// values as malformed rather than saturating, since no server means "wait 300 years".
constexpr double max_ns = 9.0e18;

sv trim(sv s) noexcept {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) {
    s.remove_suffix(1);
  }
  return s;
}

bool is_digit(char c) noexcept {
  return c >= '0' && c <= '9';
}

// Parses [0-9]+ ( '.' [0-9]* )? with no sign, exponent, inf or nan. Digits are accumulated by
// hand (locale-independent); precision beyond double's is irrelevant at these magnitudes.
std::optional<double> parse_unsigned_decimal(sv s) noexcept {
  if (s.empty() || !is_digit(s.front())) {
    return std::nullopt;
  }
  double v = 0;
  std::size_t i = 0;
  for (; i < s.size() && is_digit(s[i]); ++i) {
    v = v * 10 + (s[i] - '0');
    if (v > 1e300) {
      return std::nullopt;
    }
  }
  if (i < s.size() && s[i] == '.') {
    ++i;
    double scale = 0.1;
    for (; i < s.size() && is_digit(s[i]); ++i) {
      v += (s[i] - '0') * scale;
      scale /= 10;
    }
  }
  if (i != s.size()) {
    return std::nullopt;
  }
  return v;
}

// A plain unsigned integer that fits in int64.
std::optional<std::int64_t> parse_unsigned_int(sv s) noexcept {
  if (s.empty()) {
    return std::nullopt;
  }
  std::int64_t v = 0;
  for (char c : s) {
    if (!is_digit(c)) {
      return std::nullopt;
    }
    if (v > (std::numeric_limits<std::int64_t>::max() - (c - '0')) / 10) {
      return std::nullopt;
    }
    v = v * 10 + (c - '0');
  }
  return v;
}

std::optional<nanoseconds> ns_from(double count, double ns_per_unit) noexcept {
  const double ns = count * ns_per_unit;
  if (!(ns >= 0) || ns > max_ns) {
    return std::nullopt;
  }
  return nanoseconds(static_cast<std::int64_t>(std::llround(ns)));
}

constexpr bool is_leap(std::int64_t y) noexcept {
  return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

constexpr unsigned days_in_month(std::int64_t y, unsigned m) noexcept {
  constexpr std::array<unsigned, 12> d = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  return m == 2 && is_leap(y) ? 29 : d[m - 1];
}

// Civil year of a time point (for RFC 850's two-digit years).
std::int64_t year_of(system_clock::time_point t) noexcept {
  const auto days = std::chrono::floor<std::chrono::days>(t).time_since_epoch().count();
  return civil_from_days(days).year;
}

struct civil_time {
  std::int64_t year = 0;
  unsigned month = 0, day = 0, hour = 0, minute = 0, second = 0;
};

std::optional<system_clock::time_point> to_time_point(const civil_time& c) noexcept {
  if (c.month < 1 || c.month > 12 || c.day < 1 || c.day > days_in_month(c.year, c.month) ||
      c.hour > 23 || c.minute > 59 || c.second > 60 || c.year < 1 || c.year > 9999) {
    return std::nullopt;
  }
  const std::int64_t secs =
      days_from_civil(c.year, c.month, c.day) * 86400 + c.hour * 3600 + c.minute * 60 + c.second;
  // libstdc++'s system_clock counts int64 nanoseconds, so only 1677-09-21..2262-04-11 fits; a
  // well-formed date outside that ("9999") would overflow the conversion below (undefined
  // behaviour, found by fuzz/fuzz_hints). It is out of range. The day of margin keeps the
  // RFC 3339 offset and fraction that callers add from overflowing either.
  constexpr std::int64_t secs_limit =
      std::chrono::duration_cast<std::chrono::seconds>(system_clock::duration::max()).count() -
      86400;
  if (secs > secs_limit || secs < -secs_limit) {
    return std::nullopt;
  }
  return system_clock::time_point(
      std::chrono::duration_cast<system_clock::duration>(std::chrono::seconds(secs)));
}

// A cursor over the input with the few primitives the date grammars need; every step checks
// bounds so that truncated input fails cleanly.
class cursor {
 public:
  explicit cursor(sv s) noexcept : s_(s) {}
  bool lit(sv l) noexcept {
    if (s_.substr(i_, l.size()) == l) {
      i_ += l.size();
      return true;
    }
    return false;
  }
  std::optional<unsigned> digits(std::size_t n) noexcept {
    if (i_ + n > s_.size()) {
      return std::nullopt;
    }
    unsigned v = 0;
    for (std::size_t k = 0; k < n; ++k) {
      if (!is_digit(s_[i_ + k])) {
        return std::nullopt;
      }
      v = v * 10 + static_cast<unsigned>(s_[i_ + k] - '0');
    }
    i_ += n;
    return v;
  }
  // One of `names` (exact case, as RFC 9110 requires); returns its index.
  template <std::size_t N>
  std::optional<unsigned> one_of(const std::array<sv, N>& names) noexcept {
    for (unsigned k = 0; k < N; ++k) {
      if (lit(names[k])) {
        return k;
      }
    }
    return std::nullopt;
  }
  char peek() const noexcept { return i_ < s_.size() ? s_[i_] : '\0'; }
  bool done() const noexcept { return i_ == s_.size(); }

 private:
  sv s_;
  std::size_t i_ = 0;
};

constexpr std::array<sv, 7> short_days = {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"};
constexpr std::array<sv, 7> long_days = {"Monday", "Tuesday",  "Wednesday", "Thursday",
                                         "Friday", "Saturday", "Sunday"};
constexpr std::array<sv, 12> months = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};

bool parse_clock(cursor& c, civil_time& t) noexcept {
  auto h = c.digits(2);
  if (!h || !c.lit(":")) {
    return false;
  }
  auto m = c.digits(2);
  if (!m || !c.lit(":")) {
    return false;
  }
  auto s = c.digits(2);
  if (!s) {
    return false;
  }
  t.hour = *h;
  t.minute = *m;
  t.second = *s;
  return true;
}

std::optional<system_clock::time_point> parse_imf_fixdate(sv v) noexcept {
  cursor c(v);
  civil_time t;
  if (!c.one_of(short_days) || !c.lit(", ")) {
    return std::nullopt;
  }
  auto d = c.digits(2);
  if (!d || !c.lit(" ")) {
    return std::nullopt;
  }
  auto mon = c.one_of(months);
  if (!mon || !c.lit(" ")) {
    return std::nullopt;
  }
  auto y = c.digits(4);
  if (!y || !c.lit(" ") || !parse_clock(c, t) || !c.lit(" GMT") || !c.done()) {
    return std::nullopt;
  }
  t.day = *d;
  t.month = *mon + 1;
  t.year = *y;
  return to_time_point(t);
}

std::optional<system_clock::time_point> parse_rfc850(sv v, system_clock::time_point now) noexcept {
  cursor c(v);
  civil_time t;
  if (!c.one_of(long_days) || !c.lit(", ")) {
    return std::nullopt;
  }
  auto d = c.digits(2);
  if (!d || !c.lit("-")) {
    return std::nullopt;
  }
  auto mon = c.one_of(months);
  if (!mon || !c.lit("-")) {
    return std::nullopt;
  }
  auto yy = c.digits(2);
  if (!yy || !c.lit(" ") || !parse_clock(c, t) || !c.lit(" GMT") || !c.done()) {
    return std::nullopt;
  }
  // RFC 9110 §5.6.7: a year more than 50 years in the future is the most recent past year with
  // the same last two digits. We also move a year more than 50 years in the past forward, so the
  // result is always within (now - 50, now + 50] years.
  const std::int64_t now_year = year_of(now);
  std::int64_t year = now_year - (now_year % 100) + *yy;
  if (year > now_year + 50) {
    year -= 100;
  } else if (year <= now_year - 50) {
    year += 100;
  }
  t.day = *d;
  t.month = *mon + 1;
  t.year = year;
  return to_time_point(t);
}

std::optional<system_clock::time_point> parse_asctime(sv v) noexcept {
  cursor c(v);
  civil_time t;
  if (!c.one_of(short_days) || !c.lit(" ")) {
    return std::nullopt;
  }
  auto mon = c.one_of(months);
  if (!mon || !c.lit(" ")) {
    return std::nullopt;
  }
  std::optional<unsigned> d;
  if (c.peek() == ' ') {
    c.lit(" ");
    d = c.digits(1);
  } else {
    d = c.digits(2);
  }
  if (!d || !c.lit(" ") || !parse_clock(c, t) || !c.lit(" ")) {
    return std::nullopt;
  }
  auto y = c.digits(4);
  if (!y || !c.done()) {
    return std::nullopt;
  }
  t.day = *d;
  t.month = *mon + 1;
  t.year = *y;
  return to_time_point(t);
}

nanoseconds delay_until(system_clock::time_point at, system_clock::time_point now) noexcept {
  if (at <= now) {
    return nanoseconds::zero();
  }
  return std::chrono::duration_cast<nanoseconds>(at - now);
}

std::optional<double> parse_count(std::optional<sv> v) noexcept {
  if (!v) {
    return std::nullopt;
  }
  return parse_unsigned_decimal(trim(*v));
}

}  // namespace

std::optional<nanoseconds> parse_retry_after_ms(sv value) noexcept {
  auto v = parse_unsigned_decimal(trim(value));
  if (!v) {
    return std::nullopt;
  }
  return ns_from(*v, 1e6);
}

std::optional<system_clock::time_point> parse_http_date(sv value,
                                                        system_clock::time_point now) noexcept {
  value = trim(value);
  // The formats differ by the character after the day name: ',' then space and two digits
  // (IMF), ',' after a long name (RFC 850), or a space (asctime). Trying each is cheap.
  if (auto t = parse_imf_fixdate(value)) {
    return t;
  }
  if (auto t = parse_rfc850(value, now)) {
    return t;
  }
  return parse_asctime(value);
}

std::optional<nanoseconds> parse_retry_after(sv value, system_clock::time_point now) noexcept {
  value = trim(value);
  if (!value.empty() && is_digit(value.front())) {
    auto secs = parse_unsigned_int(value);
    if (!secs) {
      return std::nullopt;
    }
    return ns_from(static_cast<double>(*secs), 1e9);
  }
  if (auto at = parse_http_date(value, now)) {
    return delay_until(*at, now);
  }
  return std::nullopt;
}

std::optional<nanoseconds> parse_amz_retry_after(sv value) noexcept {
  value = trim(value);
  bool negative = false;
  if (!value.empty() && (value.front() == '+' || value.front() == '-')) {
    negative = value.front() == '-';
    value.remove_prefix(1);
  }
  auto ms = parse_unsigned_int(value);
  if (!ms || (negative && *ms != 0)) {
    return std::nullopt;
  }
  return ns_from(static_cast<double>(*ms), 1e6);
}

std::optional<bool> parse_should_retry(sv value) noexcept {
  value = trim(value);
  if (keel::http::iequals(value, "true")) {
    return true;
  }
  if (keel::http::iequals(value, "false")) {
    return false;
  }
  return std::nullopt;
}

std::optional<nanoseconds> server_delay_hint(const keel::http::header_list& headers,
                                             system_clock::time_point now) noexcept {
  if (auto v = headers.find("retry-after-ms")) {
    if (auto d = parse_retry_after_ms(*v)) {
      return d;
    }
  }
  if (auto v = headers.find("retry-after")) {
    if (auto d = parse_retry_after(*v, now)) {
      return d;
    }
  }
  if (auto v = headers.find("x-amz-retry-after")) {
    if (auto d = parse_amz_retry_after(*v)) {
      return d;
    }
  }
  return std::nullopt;
}

std::optional<nanoseconds> parse_go_duration(sv value) noexcept {
  value = trim(value);
  if (value == "0") {
    return nanoseconds::zero();
  }
  if (value.empty()) {
    return std::nullopt;
  }
  double total = 0;
  while (!value.empty()) {
    std::size_t n = 0;
    while (n < value.size() && (is_digit(value[n]) || value[n] == '.')) {
      ++n;
    }
    auto num = parse_unsigned_decimal(value.substr(0, n));
    if (!num) {
      return std::nullopt;
    }
    value.remove_prefix(n);
    std::size_t u = 0;
    while (u < value.size() && !is_digit(value[u]) && value[u] != '.') {
      ++u;
    }
    const sv unit = value.substr(0, u);
    value.remove_prefix(u);
    double scale = 0;
    if (unit == "h") {
      scale = 3600e9;
    } else if (unit == "m") {
      scale = 60e9;
    } else if (unit == "s") {
      scale = 1e9;
    } else if (unit == "ms") {
      scale = 1e6;
    } else if (unit == "us" || unit == "\xC2\xB5s" || unit == "\xCE\xBCs") {
      scale = 1e3;
    } else if (unit == "ns") {
      scale = 1;
    } else {
      return std::nullopt;
    }
    total += *num * scale;
    if (total > max_ns) {
      return std::nullopt;
    }
  }
  return ns_from(total, 1);
}

std::optional<system_clock::time_point> parse_rfc3339(sv value) noexcept {
  value = trim(value);
  cursor c(value);
  civil_time t;
  auto y = c.digits(4);
  if (!y || !c.lit("-")) {
    return std::nullopt;
  }
  auto mon = c.digits(2);
  if (!mon || !c.lit("-")) {
    return std::nullopt;
  }
  auto d = c.digits(2);
  if (!d || !(c.lit("T") || c.lit("t") || c.lit(" ")) || !parse_clock(c, t)) {
    return std::nullopt;
  }
  t.year = *y;
  t.month = *mon;
  t.day = *d;
  nanoseconds frac{0};
  if (c.lit(".")) {
    std::int64_t scale = 100'000'000;
    bool any = false;
    while (is_digit(c.peek())) {
      auto digit = c.digits(1);
      frac += nanoseconds(static_cast<std::int64_t>(*digit) * scale);
      scale /= 10;
      any = true;
    }
    if (!any) {
      return std::nullopt;
    }
  }
  std::chrono::seconds offset{0};
  if (c.lit("Z") || c.lit("z")) {
    // UTC
  } else if (c.peek() == '+' || c.peek() == '-') {
    const bool minus = c.peek() == '-';
    c.lit(minus ? "-" : "+");
    auto oh = c.digits(2);
    if (!oh || !c.lit(":")) {
      return std::nullopt;
    }
    auto om = c.digits(2);
    if (!om || *oh > 23 || *om > 59) {
      return std::nullopt;
    }
    offset = std::chrono::seconds((*oh * 3600 + *om * 60) * (minus ? -1 : 1));
  } else {
    return std::nullopt;
  }
  if (!c.done()) {
    return std::nullopt;
  }
  auto tp = to_time_point(t);
  if (!tp) {
    return std::nullopt;
  }
  return *tp - offset + std::chrono::duration_cast<system_clock::duration>(frac);
}

rate_limit_info parse_rate_limits(const keel::http::header_list& h,
                                  system_clock::time_point now) noexcept {
  rate_limit_info r;
  auto anthropic_reset = [&](sv name) -> std::optional<nanoseconds> {
    auto v = h.find(name);
    if (!v) {
      return std::nullopt;
    }
    auto at = parse_rfc3339(*v);
    if (!at) {
      return std::nullopt;
    }
    return delay_until(*at, now);
  };
  auto go_reset = [&](sv name) -> std::optional<nanoseconds> {
    auto v = h.find(name);
    return v ? parse_go_duration(*v) : std::nullopt;
  };
  auto first = [](auto a, auto b) { return a ? a : b; };

  r.limit_requests = first(parse_count(h.find("x-ratelimit-limit-requests")),
                           parse_count(h.find("anthropic-ratelimit-requests-limit")));
  r.remaining_requests = first(parse_count(h.find("x-ratelimit-remaining-requests")),
                               parse_count(h.find("anthropic-ratelimit-requests-remaining")));
  r.reset_requests = first(go_reset("x-ratelimit-reset-requests"),
                           anthropic_reset("anthropic-ratelimit-requests-reset"));
  r.limit_tokens = first(parse_count(h.find("x-ratelimit-limit-tokens")),
                         parse_count(h.find("anthropic-ratelimit-tokens-limit")));
  r.remaining_tokens = first(parse_count(h.find("x-ratelimit-remaining-tokens")),
                             parse_count(h.find("anthropic-ratelimit-tokens-remaining")));
  r.reset_tokens = first(go_reset("x-ratelimit-reset-tokens"),
                         anthropic_reset("anthropic-ratelimit-tokens-reset"));
  r.limit_input_tokens = parse_count(h.find("anthropic-ratelimit-input-tokens-limit"));
  r.remaining_input_tokens = parse_count(h.find("anthropic-ratelimit-input-tokens-remaining"));
  r.reset_input_tokens = anthropic_reset("anthropic-ratelimit-input-tokens-reset");
  r.limit_output_tokens = parse_count(h.find("anthropic-ratelimit-output-tokens-limit"));
  r.remaining_output_tokens = parse_count(h.find("anthropic-ratelimit-output-tokens-remaining"));
  r.reset_output_tokens = anthropic_reset("anthropic-ratelimit-output-tokens-reset");
  return r;
}

}  // namespace keel::llm
