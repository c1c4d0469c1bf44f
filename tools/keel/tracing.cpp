// The keel command's traces (see tracing.hpp).
#include "tracing.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>

#include <nlohmann/json.hpp>

#include <stdexcept>

namespace keel::cli {
namespace asio = boost::asio;

namespace {

std::string trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) {
    return {};
  }
  return std::string(s.substr(b, s.find_last_not_of(" \t") - b + 1));
}

}  // namespace

std::vector<std::pair<std::string, std::string>> parse_otlp_headers(const std::string& text,
                                                                    const std::string& source) {
  std::vector<std::pair<std::string, std::string>> out;
  std::size_t start = 0;
  int index = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = std::string_view(text).substr(start, comma - start);
    ++index;
    if (!trim(item).empty()) {
      const std::size_t eq = item.find('=');
      const std::string name = eq == std::string_view::npos ? "" : trim(item.substr(0, eq));
      if (name.empty()) {
        throw std::runtime_error("environment variable " + source + ": header " +
                                 std::to_string(index) +
                                 " is not name=value (expected name=value,name=value; the "
                                 "value is not shown)");
      }
      out.emplace_back(keel::http::percent_decode(name),
                       keel::http::percent_decode(trim(item.substr(eq + 1))));
    }
    start = comma + 1;
  }
  return out;
}

// Hands each batch to every exporter; fails if any failed (after trying all).
struct trace_sink::tee : keel::trace::exporter {
  std::vector<keel::trace::exporter*> to;
  asio::awaitable<void> export_spans(const keel::trace::resource& from,
                                     std::vector<keel::trace::span_data> spans) override {
    std::exception_ptr failed;
    for (std::size_t i = 0; i < to.size(); ++i) {
      try {
        if (i + 1 == to.size()) {
          co_await to[i]->export_spans(from, std::move(spans));
        } else {
          co_await to[i]->export_spans(from, spans);
        }
      } catch (...) {
        failed = std::current_exception();
      }
    }
    if (failed) {
      std::rethrow_exception(failed);
    }
  }
};

trace_sink::trace_sink(asio::any_io_executor ex, const keel::llm::trace_config& cfg,
                       const std::string& file, logger& log, const keel::llm::env_lookup& env)
    : log_(&log) {
  if (!file.empty()) {
    exporters_.push_back(std::make_unique<keel::otlp::file_exporter>(file));
    where_ = file;
  }
  if (!cfg.otlp_endpoint.empty()) {
    keel::otlp::http_exporter_options ho;
    ho.timeout = std::chrono::milliseconds(static_cast<long long>(cfg.timeout * 1000));
    if (!cfg.headers_env.empty()) {
      if (const auto text = env(cfg.headers_env)) {
        ho.headers = parse_otlp_headers(*text, cfg.headers_env);
      }
    }
    http_ = std::make_unique<keel::http::client>(ex, keel::http::client_options{});
    auto exp = std::make_unique<keel::otlp::http_exporter>(*http_, cfg.otlp_endpoint, ho);
    where_ += (where_.empty() ? "" : " and ") + keel::http::redact_url(exp->url());
    exporters_.push_back(std::move(exp));
  }
  if (exporters_.empty()) {
    return;
  }
  keel::trace::exporter* out = exporters_.front().get();
  if (exporters_.size() > 1) {
    auto t = std::make_unique<tee>();
    for (auto& e : exporters_) {
      t->to.push_back(e.get());
    }
    tee_ = std::move(t);
    out = tee_.get();
  }
  keel::trace::tracer_options to;
  to.service_name = cfg.service_name;
  to.sample_ratio = cfg.sample_ratio;
  to.xray_ids = cfg.xray_ids;
  to.max_queue = 8192;
  to.on_export_error = [this](const std::exception_ptr& e, std::size_t n) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex2) {
      what = ex2.what();
    } catch (...) {
    }
    log_->log(log_level::warning, "trace_export_failed", what, nlohmann::json{{"spans_lost", n}});
  };
  tracer_ = std::make_unique<keel::trace::tracer>(ex, *out, std::move(to));
}

trace_sink::~trace_sink() = default;

void trace_sink::finish(asio::io_context& ctx) {
  if (!tracer_) {
    return;
  }
  ctx.restart();
  asio::co_spawn(
      ctx,
      [this, &ctx]() -> asio::awaitable<void> {
        try {
          co_await tracer_->flush();
        } catch (...) {
        }
        ctx.stop();
      },
      asio::detached);
  ctx.run();
  const keel::trace::tracer_stats s = tracer_->stats();
  log_->log(log_level::info, "traces", "spans exported to " + where_,
            nlohmann::json{{"exported", s.exported}, {"dropped", s.dropped}, {"failed", s.failed}});
}

}  // namespace keel::cli
