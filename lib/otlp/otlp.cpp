// keel::otlp: OTLP/JSON encoding of spans, and the file, HTTP and memory exporters.
#include <keel/otlp.hpp>

#include <keel/deadline.hpp>
#include <keel/http/client.hpp>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace keel::otlp {
using nlohmann::json;
namespace trace = keel::trace;

namespace {

json any_value(const trace::value& v) {
  struct visit {
    json operator()(bool b) const { return {{"boolValue", b}}; }
    // 64-bit integers are decimal strings in proto3's JSON mapping.
    json operator()(std::int64_t i) const { return {{"intValue", std::to_string(i)}}; }
    json operator()(double d) const {
      if (!std::isfinite(d)) {
        return {{"stringValue", std::isnan(d) ? "NaN" : (d > 0 ? "Infinity" : "-Infinity")}};
      }
      return {{"doubleValue", d}};
    }
    json operator()(const std::string& s) const { return {{"stringValue", s}}; }
    json operator()(const std::vector<std::string>& a) const {
      json values = json::array();
      for (const std::string& s : a) {
        values.push_back({{"stringValue", s}});
      }
      return {{"arrayValue", {{"values", std::move(values)}}}};
    }
  };
  return std::visit(visit{}, v);
}

json attributes(const std::vector<trace::attribute>& attrs) {
  json out = json::array();
  for (const trace::attribute& a : attrs) {
    out.push_back({{"key", a.key}, {"value", any_value(a.value)}});
  }
  return out;
}

std::string hex(const auto& bytes) {
  return trace::to_hex(bytes.data(), bytes.size());
}

json span_json(const trace::span_data& s) {
  json j = {
      {"traceId", hex(s.context.trace)},
      {"spanId", hex(s.context.span)},
      {"name", s.name},
      {"kind", static_cast<int>(s.kind)},
      {"startTimeUnixNano", std::to_string(s.start_unix_nano)},
      {"endTimeUnixNano", std::to_string(s.end_unix_nano)},
      {"attributes", attributes(s.attributes)},
      // The W3C flags in the low byte (OTLP's SpanFlags), as the OpenTelemetry SDKs send them.
      {"flags", static_cast<std::uint32_t>(s.context.flags)},
  };
  if (std::any_of(s.parent.begin(), s.parent.end(), [](std::uint8_t b) { return b != 0; })) {
    j["parentSpanId"] = hex(s.parent);
  }
  if (!s.context.state.empty()) {
    j["traceState"] = s.context.state;
  }
  if (s.dropped_attributes > 0) {
    j["droppedAttributesCount"] = s.dropped_attributes;
  }
  if (s.dropped_events > 0) {
    j["droppedEventsCount"] = s.dropped_events;
  }
  if (!s.events.empty()) {
    json events = json::array();
    for (const trace::event& e : s.events) {
      events.push_back({{"timeUnixNano", std::to_string(e.time_unix_nano)},
                        {"name", e.name},
                        {"attributes", attributes(e.attributes)}});
    }
    j["events"] = std::move(events);
  }
  json status = json::object();
  if (s.status != trace::status_code::unset) {
    status["code"] = static_cast<int>(s.status);
  }
  if (s.status == trace::status_code::error && !s.status_message.empty()) {
    status["message"] = s.status_message;
  }
  j["status"] = std::move(status);
  return j;
}

}  // namespace

std::string to_json(const trace::resource& from, const std::vector<trace::span_data>& spans) {
  json list = json::array();
  for (const trace::span_data& s : spans) {
    list.push_back(span_json(s));
  }
  json scope = {{"name", from.scope_name}};
  if (!from.scope_version.empty()) {
    scope["version"] = from.scope_version;
  }
  json request = {{"resourceSpans",
                   json::array({{{"resource", {{"attributes", attributes(from.attributes)}}},
                                 {"scopeSpans", json::array({{{"scope", std::move(scope)},
                                                              {"spans", std::move(list)}}})}}})}};
  // Error messages can carry a server's bytes: never throw on a cut UTF-8 sequence.
  return request.dump(-1, ' ', false, json::error_handler_t::replace);
}

// ---- file_exporter ---------------------------------------------------------------------------

file_exporter::file_exporter(const std::string& path) : path_(path) {
  // Appended: a resumed run, or a second run with the same file, keeps the spans already there.
  file_ = std::fopen(path.c_str(), "a");
  if (!file_) {
    throw std::runtime_error("cannot open trace file " + path + ": " + std::strerror(errno));
  }
}

file_exporter::~file_exporter() {
  if (file_) {
    std::fclose(file_);
  }
}

boost::asio::awaitable<void> file_exporter::export_spans(const trace::resource& from,
                                                         std::vector<trace::span_data> spans) {
  std::string line = to_json(from, spans);
  line += '\n';
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    throw std::runtime_error("cannot write trace file " + path_ + ": " + std::strerror(errno));
  }
  co_return;
}

// ---- http_exporter ---------------------------------------------------------------------------

http_exporter::http_exporter(keel::http::client& http, std::string endpoint,
                             http_exporter_options options)
    : http_(&http), url_(std::move(endpoint)), options_(std::move(options)) {
  if (url_.rfind("http://", 0) != 0 && url_.rfind("https://", 0) != 0) {
    throw std::invalid_argument("OTLP endpoint must be an http:// or https:// URL, got \"" +
                                keel::http::redact_url(url_) + "\"");
  }
  // The path gets "/v1/traces" (unless it ends so already) before the query, if any: appended
  // after it, the suffix became part of the last query value (a collector's token).
  const std::size_t q = std::min(url_.find('?'), url_.size());
  std::string base = url_.substr(0, q);
  const std::string query = url_.substr(q);
  constexpr std::string_view suffix = "/v1/traces";
  if (base.size() < suffix.size() ||
      base.compare(base.size() - suffix.size(), suffix.size(), suffix) != 0) {
    while (!base.empty() && base.back() == '/') {
      base.pop_back();
    }
    base += suffix;
  }
  url_ = base + query;
}

boost::asio::awaitable<void> http_exporter::export_spans(const trace::resource& from,
                                                         std::vector<trace::span_data> spans) {
  keel::http::request req("POST", url_);
  req.set("Content-Type", "application/json");
  for (const auto& [name, val] : options_.headers) {
    req.set(name, val);
  }
  req.body = to_json(from, spans);
  keel::http::response res = co_await keel::with_deadline(
      [&] { return http_->send(std::move(req)); },
      std::chrono::duration_cast<std::chrono::nanoseconds>(options_.timeout));
  if (res.status < 200 || res.status > 299) {
    throw std::runtime_error("OTLP collector at " + keel::http::redact_url(url_) +
                             " answered HTTP " + std::to_string(res.status));
  }
}

// ---- memory_exporter -------------------------------------------------------------------------

boost::asio::awaitable<void> memory_exporter::export_spans(const trace::resource&,
                                                           std::vector<trace::span_data> spans) {
  ++batches_;
  for (trace::span_data& s : spans) {
    spans_.push_back(std::move(s));
  }
  co_return;
}

}  // namespace keel::otlp
