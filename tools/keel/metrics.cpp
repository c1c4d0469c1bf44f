// The keel command's Prometheus metrics registry: counters, gauges, histograms and the text
// exposition format 0.0.4 (the /metrics HTTP server is in metrics_server.cpp).
#include "metrics.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace keel::cli {

namespace {

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

}  // namespace keel::cli
