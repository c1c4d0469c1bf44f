// The keel command's Prometheus metrics: registry, text exposition and the /metrics HTTP server.
#include "metrics.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <exception>
#include <limits>
#include <stdexcept>
#include <unordered_set>

namespace keel::cli {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

// ---- names, values and escaping ------------------------------------------------------------

bool is_alpha_(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

// [a-zA-Z_:][a-zA-Z0-9_:]*
bool valid_metric_name(std::string_view s) {
  if (s.empty() || !(is_alpha_(s[0]) || s[0] == ':')) {
    return false;
  }
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return is_alpha_(c) || is_digit(c) || c == ':'; });
}

// [a-zA-Z_][a-zA-Z0-9_]*, and not the reserved __ prefix.
bool valid_label_name(std::string_view s) {
  if (s.empty() || !is_alpha_(s[0]) || s.starts_with("__")) {
    return false;
  }
  return std::all_of(s.begin(), s.end(), [](char c) { return is_alpha_(c) || is_digit(c); });
}

// Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF), the same rule as Go's
// utf8.ValidString, which Prometheus applies to label values.
bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  const std::size_t n = s.size();
  auto cont = [&](std::size_t k) {
    return k < n && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80;
  };
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    if (c >= 0xC2 && c <= 0xDF) {
      if (!cont(i + 1)) {
        return false;
      }
      i += 2;
      continue;
    }
    if (c >= 0xE0 && c <= 0xEF) {
      if (!cont(i + 1) || !cont(i + 2)) {
        return false;
      }
      const auto c1 = static_cast<unsigned char>(s[i + 1]);
      if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F)) {
        return false;  // overlong, or a UTF-16 surrogate
      }
      i += 3;
      continue;
    }
    if (c >= 0xF0 && c <= 0xF4) {
      if (!cont(i + 1) || !cont(i + 2) || !cont(i + 3)) {
        return false;
      }
      const auto c1 = static_cast<unsigned char>(s[i + 1]);
      if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F)) {
        return false;  // overlong, or above U+10FFFF
      }
      i += 4;
      continue;
    }
    return false;
  }
  return true;
}

std::string in_quotes(std::string_view s) {
  return "\"" + std::string(s) + "\"";
}

// Checks a metric name, help text and label set; returns the label set sorted by name, which
// identifies the series whatever order the caller listed the labels in.
label_set checked_key(std::string_view name, std::string_view help, const label_set& labels,
                      bool is_histogram) {
  if (!valid_metric_name(name)) {
    throw std::invalid_argument("metrics: invalid metric name " + in_quotes(name) +
                                " (must match [a-zA-Z_:][a-zA-Z0-9_:]*)");
  }
  if (!valid_utf8(help)) {
    throw std::invalid_argument("metrics: help text of " + std::string(name) +
                                " is not valid UTF-8");
  }
  for (const auto& [label, value] : labels) {
    if (!valid_label_name(label)) {
      throw std::invalid_argument("metrics: invalid label name " + in_quotes(label) + " on " +
                                  std::string(name) +
                                  " (must match [a-zA-Z_][a-zA-Z0-9_]* and not start with __)");
    }
    if (is_histogram && label == "le") {
      throw std::invalid_argument("metrics: histogram " + std::string(name) +
                                  " cannot use the label \"le\" (reserved for buckets)");
    }
    if (!valid_utf8(value)) {
      throw std::invalid_argument("metrics: value of label " + label + " on " + std::string(name) +
                                  " is not valid UTF-8");
    }
  }
  label_set key = labels;
  std::sort(key.begin(), key.end());
  for (std::size_t i = 1; i < key.size(); ++i) {
    if (key[i].first == key[i - 1].first) {
      throw std::invalid_argument("metrics: label " + key[i].first + " repeats on " +
                                  std::string(name));
    }
  }
  return key;
}

// Strictly increasing and finite; a trailing +Inf is dropped since the +Inf bucket is implicit.
std::vector<double> checked_bounds(std::string_view name, std::vector<double> bounds) {
  if (!bounds.empty() && bounds.back() == std::numeric_limits<double>::infinity()) {
    bounds.pop_back();
  }
  for (std::size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i]) || (i > 0 && !(bounds[i - 1] < bounds[i]))) {
      throw std::invalid_argument("metrics: bucket bounds of histogram " + std::string(name) +
                                  " must be finite and strictly increasing");
    }
  }
  return bounds;
}

// A sample value as Prometheus parses it (Go's strconv.ParseFloat): exact integers without an
// exponent, other values in the shortest form that round-trips.
void append_number(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
    return;
  }
  if (std::isinf(v)) {
    out += v > 0 ? "+Inf" : "-Inf";
    return;
  }
  constexpr double exact_limit = 9007199254740992.0;  // 2^53
  if (v == std::trunc(v) && std::fabs(v) <= exact_limit) {
    out += std::to_string(static_cast<long long>(v));  // -0.0 becomes "0"
    return;
  }
  std::array<char, 32> buf{};
  const auto r = std::to_chars(buf.data(), buf.data() + buf.size(), v);
  out.append(buf.data(), r.ptr);
}

void append_escaped_help(std::string& out, std::string_view s) {
  for (const char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
}

void append_escaped_label_value(std::string& out, std::string_view s) {
  for (const char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
}

// One sample line: `name{labels[,le="bound"]} value`.
void append_sample(std::string& out, std::string_view name, std::string_view suffix,
                   const label_set& labels, const double* le, double value) {
  out += name;
  out += suffix;
  if (!labels.empty() || le) {
    out += '{';
    bool first = true;
    for (const auto& [label, v] : labels) {
      if (!first) {
        out += ',';
      }
      first = false;
      out += label;
      out += "=\"";
      append_escaped_label_value(out, v);
      out += '"';
    }
    if (le) {
      if (!first) {
        out += ',';
      }
      out += "le=\"";
      append_number(out, *le);
      out += '"';
    }
    out += '}';
  }
  out += ' ';
  append_number(out, value);
  out += '\n';
}

constexpr std::array<std::string_view, 3> histogram_suffixes = {"_bucket", "_sum", "_count"};

}  // namespace

// ---- metric values -------------------------------------------------------------------------

void counter::inc(double v) {
  if (!(v >= 0)) {
    throw std::invalid_argument(
        "metrics: a counter cannot be increased by a negative or NaN "
        "amount");
  }
  double cur = value_.load(std::memory_order_relaxed);
  while (!value_.compare_exchange_weak(cur, cur + v, std::memory_order_relaxed)) {
  }
}

void gauge::add(double v) noexcept {
  double cur = value_.load(std::memory_order_relaxed);
  while (!value_.compare_exchange_weak(cur, cur + v, std::memory_order_relaxed)) {
  }
}

histogram::histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)), buckets_(upper_bounds_.size() + 1, 0) {}

void histogram::observe(double v) {
  // le means "less than or equal"; NaN compares false with everything and lands in +Inf only.
  const std::size_t i = std::isnan(v)
                            ? upper_bounds_.size()
                            : static_cast<std::size_t>(
                                  std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), v) -
                                  upper_bounds_.begin());
  std::lock_guard lock(mu_);
  ++buckets_[i];
  ++count_;
  sum_ += v;
}

std::uint64_t histogram::count() const {
  std::lock_guard lock(mu_);
  return count_;
}

double histogram::sum() const {
  std::lock_guard lock(mu_);
  return sum_;
}

// ---- the registry --------------------------------------------------------------------------

enum class metrics_registry::kind : unsigned char { counter, gauge, histogram };

struct metrics_registry::family {
  struct series {
    label_set labels;  // as first registered: the render order
    std::unique_ptr<keel::cli::counter> c;
    std::unique_ptr<keel::cli::gauge> g;
    std::unique_ptr<keel::cli::histogram> h;
  };

  std::string name;
  std::string help;
  kind type;
  std::vector<double> bounds;               // histograms only
  std::vector<series> all;                  // insertion order; the metric objects never move
  std::map<label_set, std::size_t> by_key;  // sorted label set -> index in `all`

  // The series for `key`, created by `make` if absent. Strong guarantee: on an exception nothing
  // was added.
  template <class Make>
  series& find_or_add(label_set labels, label_set key, Make make) {
    if (const auto it = by_key.find(key); it != by_key.end()) {
      return all[it->second];
    }
    series s{std::move(labels), nullptr, nullptr, nullptr};
    make(s);
    all.push_back(std::move(s));
    try {
      by_key.emplace(std::move(key), all.size() - 1);
    } catch (...) {
      all.pop_back();
      throw;
    }
    return all.back();
  }
};

metrics_registry::metrics_registry() = default;
metrics_registry::~metrics_registry() = default;

metrics_registry::family& metrics_registry::family_for(std::string_view name, std::string_view help,
                                                       kind type,
                                                       const std::vector<double>* bounds) {
  static constexpr std::array<const char*, 3> type_names = {"counter", "gauge", "histogram"};
  if (const auto it = families_.find(name); it != families_.end()) {
    family& f = *it->second;
    if (f.type != type) {
      throw std::logic_error("metrics: " + f.name + " is already registered as a " +
                             type_names[static_cast<std::size_t>(f.type)] + ", not a " +
                             type_names[static_cast<std::size_t>(type)]);
    }
    if (bounds && *bounds != f.bounds) {
      throw std::logic_error("metrics: histogram " + f.name +
                             " is already registered with other bucket bounds");
    }
    return f;
  }
  // A histogram `h` writes h_bucket, h_sum and h_count samples, which must not collide with
  // another family's samples.
  for (const std::string_view suffix : histogram_suffixes) {
    if (name.ends_with(suffix)) {
      const auto base = families_.find(name.substr(0, name.size() - suffix.size()));
      if (base != families_.end() && base->second->type == kind::histogram) {
        throw std::logic_error("metrics: " + std::string(name) + " clashes with the " +
                               std::string(suffix) + " series of histogram " + base->first);
      }
    }
    if (type == kind::histogram) {
      const std::string sample = std::string(name) + std::string(suffix);
      if (families_.contains(sample)) {
        throw std::logic_error("metrics: histogram " + std::string(name) +
                               " would clash with the metric " + sample);
      }
    }
  }
  auto f = std::make_unique<family>();
  f->name = std::string(name);
  f->help = std::string(help);
  f->type = type;
  if (bounds) {
    f->bounds = *bounds;
  }
  family& ref = *f;
  families_.emplace(ref.name, std::move(f));
  return ref;
}

keel::cli::counter& metrics_registry::counter(std::string_view name, std::string_view help,
                                              label_set labels) {
  label_set key = checked_key(name, help, labels, false);
  std::lock_guard lock(mu_);
  family& f = family_for(name, help, kind::counter, nullptr);
  return *f.find_or_add(std::move(labels), std::move(key), [](family::series& s) {
             s.c.reset(new keel::cli::counter());
           }).c;
}

keel::cli::gauge& metrics_registry::gauge(std::string_view name, std::string_view help,
                                          label_set labels) {
  label_set key = checked_key(name, help, labels, false);
  std::lock_guard lock(mu_);
  family& f = family_for(name, help, kind::gauge, nullptr);
  return *f.find_or_add(std::move(labels), std::move(key), [](family::series& s) {
             s.g.reset(new keel::cli::gauge());
           }).g;
}

keel::cli::histogram& metrics_registry::histogram(std::string_view name, std::string_view help,
                                                  std::vector<double> upper_bounds,
                                                  label_set labels) {
  label_set key = checked_key(name, help, labels, true);
  std::vector<double> bounds = checked_bounds(name, std::move(upper_bounds));
  std::lock_guard lock(mu_);
  family& f = family_for(name, help, kind::histogram, &bounds);
  return *f.find_or_add(std::move(labels), std::move(key), [&](family::series& s) {
             s.h.reset(new keel::cli::histogram(bounds));
           }).h;
}

std::string metrics_registry::render() const {
  std::string out;
  std::lock_guard lock(mu_);
  for (const auto& [name, fp] : families_) {
    const family& f = *fp;
    if (f.all.empty()) {
      continue;  // only if creating its first series failed
    }
    out += "# HELP ";
    out += name;
    if (!f.help.empty()) {
      out += ' ';
      append_escaped_help(out, f.help);
    }
    out += "\n# TYPE ";
    out += name;
    switch (f.type) {
      case kind::counter:
        out += " counter\n";
        break;
      case kind::gauge:
        out += " gauge\n";
        break;
      case kind::histogram:
        out += " histogram\n";
        break;
    }
    for (const auto& s : f.all) {
      switch (f.type) {
        case kind::counter:
          append_sample(out, name, "", s.labels, nullptr, s.c->value());
          break;
        case kind::gauge:
          append_sample(out, name, "", s.labels, nullptr, s.g->value());
          break;
        case kind::histogram: {
          std::vector<std::uint64_t> buckets;
          std::uint64_t count = 0;
          double sum = 0;
          {
            // One snapshot, so that +Inf equals _count and the buckets add up.
            std::lock_guard hlock(s.h->mu_);
            buckets = s.h->buckets_;
            count = s.h->count_;
            sum = s.h->sum_;
          }
          std::uint64_t cumulative = 0;
          for (std::size_t i = 0; i < f.bounds.size(); ++i) {
            cumulative += buckets[i];
            append_sample(out, name, "_bucket", s.labels, &f.bounds[i],
                          static_cast<double>(cumulative));
          }
          constexpr double inf = std::numeric_limits<double>::infinity();
          append_sample(out, name, "_bucket", s.labels, &inf, static_cast<double>(count));
          append_sample(out, name, "_sum", s.labels, nullptr, sum);
          append_sample(out, name, "_count", s.labels, nullptr, static_cast<double>(count));
          break;
        }
      }
    }
  }
  return out;
}

// ---- the server ----------------------------------------------------------------------------

namespace {

// Limits on what a client may send: a scrape is a tiny GET.
constexpr std::size_t max_request_bytes = 64 * 1024;
// How long a connection may take to send a request (idle keep-alive time included) or to take a
// response. Longer than Prometheus' default scrape interval (1 min), so that a scraper's
// keep-alive connection normally survives from one scrape to the next.
constexpr std::chrono::seconds session_timeout{120};
// After an error response, how long and how much of the rest of the request we read and discard
// before closing, so that the client sees the response instead of a reset.
constexpr std::chrono::seconds linger_timeout{5};
constexpr std::size_t linger_bytes = 1024 * 1024;
// Pause after a failed accept (e.g. EMFILE) so that the loop does not spin.
constexpr std::chrono::milliseconds accept_backoff{100};

constexpr const char* exposition_content_type = "text/plain; version=0.0.4; charset=utf-8";

bool is_http_error(const boost::system::error_code& ec) {
  return ec.category() == bhttp::make_error_code(bhttp::error::end_of_stream).category();
}

std::string endpoint_text(const std::string& address, unsigned short port) {
  const bool v6 = address.find(':') != std::string::npos;
  return (v6 ? "[" + address + "]" : address) + ":" + std::to_string(port);
}

}  // namespace

struct metrics_server::impl : std::enable_shared_from_this<impl> {
  enum class state { idle, running, stopped };

  asio::any_io_executor ex;
  const metrics_registry& registry;
  std::string address;
  unsigned short requested_port;
  tcp::acceptor acceptor;
  asio::steady_timer backoff;
  unsigned short bound_port = 0;
  state st = state::idle;
  std::unordered_set<beast::tcp_stream*> live;  // open sessions; touched on the executor only

  impl(asio::any_io_executor e, const metrics_registry& r, std::string a, unsigned short p)
      : ex(std::move(e)),
        registry(r),
        address(std::move(a)),
        requested_port(p),
        acceptor(ex),
        backoff(ex) {}

  bool running() const { return st == state::running; }

  static bhttp::response<bhttp::string_body> text_response(bhttp::status status, unsigned version,
                                                           std::string body) {
    bhttp::response<bhttp::string_body> res{status, version};
    res.set(bhttp::field::content_type, "text/plain; charset=utf-8");
    res.body() = std::move(body);
    return res;
  }

  bhttp::response<bhttp::string_body> answer(const bhttp::request<bhttp::string_body>& req) const {
    const std::string_view target = req.target();
    const std::string_view path = target.substr(0, target.find('?'));
    if (path != "/metrics") {
      auto res = text_response(bhttp::status::not_found, req.version(), "not found\n");
      res.prepare_payload();
      return res;
    }
    const bool head = req.method() == bhttp::verb::head;
    if (req.method() != bhttp::verb::get && !head) {
      auto res =
          text_response(bhttp::status::method_not_allowed, req.version(), "method not allowed\n");
      res.set(bhttp::field::allow, "GET, HEAD");
      res.prepare_payload();
      return res;
    }
    bhttp::response<bhttp::string_body> res{bhttp::status::ok, req.version()};
    res.set(bhttp::field::content_type, exposition_content_type);
    res.body() = registry.render();
    res.prepare_payload();
    if (head) {
      res.body().clear();  // Content-Length still states the GET body's size
    }
    return res;
  }

  // Answers a request that could not be read with `status`, then closes gracefully: shut down
  // our side, and read and drop what the client is still sending (bounded in time and size).
  // Closing with unread data would send a reset, and the client could lose the answer.
  static asio::awaitable<void> reject(beast::tcp_stream& stream, bhttp::status status) {
    auto res = text_response(status, 11, std::string(bhttp::obsolete_reason(status)) + "\n");
    res.keep_alive(false);
    res.prepare_payload();
    stream.expires_after(linger_timeout);
    auto [wec, wn] = co_await bhttp::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
    if (wec) {
      co_return;
    }
    boost::system::error_code ignored;
    stream.socket().shutdown(tcp::socket::shutdown_send, ignored);
    std::array<char, 4096> sink{};
    std::size_t drained = 0;
    while (drained < linger_bytes) {
      auto [rec, rn] =
          co_await stream.async_read_some(asio::buffer(sink), asio::as_tuple(asio::use_awaitable));
      if (rec) {
        break;
      }
      drained += rn;
    }
  }

  static asio::awaitable<void> session(std::shared_ptr<impl> self,
                                       std::shared_ptr<beast::tcp_stream> stream) {
    self->live.insert(stream.get());
    struct unregister {
      impl* s;
      beast::tcp_stream* c;
      ~unregister() { s->live.erase(c); }
    } guard{self.get(), stream.get()};

    beast::flat_buffer buffer;
    for (;;) {
      bhttp::request_parser<bhttp::string_body> parser;
      parser.header_limit(static_cast<std::uint32_t>(max_request_bytes));
      parser.body_limit(max_request_bytes);
      stream->expires_after(session_timeout);
      auto [ec, n] =
          co_await bhttp::async_read(*stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
      if (!self->running()) {
        // stop() was called, perhaps after this read had completed: never touch the registry
        // again, it may be gone.
        co_return;
      }
      if (ec) {
        if (ec == bhttp::error::header_limit) {
          co_await reject(*stream, bhttp::status::request_header_fields_too_large);
        } else if (ec == bhttp::error::body_limit) {
          co_await reject(*stream, bhttp::status::payload_too_large);
        } else if (is_http_error(ec) && ec != bhttp::error::end_of_stream &&
                   ec != bhttp::error::partial_message) {
          co_await reject(*stream, bhttp::status::bad_request);
        }
        break;  // EOF, reset, timeout or a rejected request
      }
      const auto& req = parser.get();
      auto res = self->answer(req);
      res.keep_alive(req.keep_alive());
      stream->expires_after(session_timeout);
      auto [wec, wn] =
          co_await bhttp::async_write(*stream, res, asio::as_tuple(asio::use_awaitable));
      if (wec || !res.keep_alive() || !self->running()) {
        break;
      }
    }
    boost::system::error_code ignored;
    stream->socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream->close();
  }

  static asio::awaitable<void> accept_loop(std::shared_ptr<impl> self) {
    for (;;) {
      auto [ec, sock] = co_await self->acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
      if (!self->running()) {
        co_return;  // `sock`, if any, closes here
      }
      if (ec) {
        self->backoff.expires_after(accept_backoff);
        co_await self->backoff.async_wait(asio::as_tuple(asio::use_awaitable));
        if (!self->running()) {
          co_return;
        }
        continue;
      }
      boost::system::error_code ignored;
      sock.set_option(tcp::no_delay(true), ignored);
      // A failed session (only bad_alloc can escape it) must not take the program down.
      asio::co_spawn(self->ex, session(self, std::make_shared<beast::tcp_stream>(std::move(sock))),
                     [](const std::exception_ptr&) {});
    }
  }

  void start() {
    if (st == state::running) {
      return;
    }
    if (st == state::stopped) {
      throw std::logic_error("metrics_server: a stopped server cannot be started again");
    }
    const std::string where = endpoint_text(address, requested_port);
    boost::system::error_code ec;
    const auto addr = asio::ip::make_address(address, ec);
    if (ec) {
      throw boost::system::system_error(ec, "metrics_server: invalid listen address " + where);
    }
    const tcp::endpoint ep(addr, requested_port);
    acceptor.open(ep.protocol(), ec);
    if (!ec) {
      acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
    }
    if (!ec) {
      acceptor.bind(ep, ec);
    }
    if (!ec) {
      acceptor.listen(asio::socket_base::max_listen_connections, ec);
    }
    tcp::endpoint local;
    if (!ec) {
      local = acceptor.local_endpoint(ec);
    }
    if (ec) {
      boost::system::error_code ignored;
      acceptor.close(ignored);
      // A copy of the code without Asio's source location, which what() would otherwise show.
      throw boost::system::system_error(boost::system::error_code(ec.value(), ec.category()),
                                        "metrics_server: cannot listen on " + where);
    }
    bound_port = local.port();
    st = state::running;
    asio::co_spawn(ex, accept_loop(shared_from_this()), asio::detached);
  }

  void stop() {
    st = state::stopped;
    boost::system::error_code ignored;
    acceptor.close(ignored);
    backoff.cancel();
    for (beast::tcp_stream* s : live) {
      s->close();
    }
  }
};

metrics_server::metrics_server(boost::asio::any_io_executor ex, const metrics_registry& registry,
                               std::string address, unsigned short port)
    : impl_(std::make_shared<impl>(std::move(ex), registry, std::move(address), port)) {}

metrics_server::~metrics_server() {
  impl_->stop();
}

void metrics_server::start() {
  impl_->start();
}

unsigned short metrics_server::port() const noexcept {
  return impl_->bound_port;
}

void metrics_server::stop() {
  impl_->stop();
}

}  // namespace keel::cli
