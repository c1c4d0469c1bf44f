// `keel serve` (serve.hpp).
#include "serve.hpp"
#include "tracing.hpp"

#include "batch_detail.hpp"
#include "fleet_pacing.hpp"
#include "metrics.hpp"
#include "stats.hpp"

#include <keel/gateway/server.hpp>
#include <keel/llm/client.hpp>
#include <keel/llm/error.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/signal_set.hpp>

#include <csignal>
#include <cstdio>
#include <random>
#include <stdexcept>

namespace keel::cli {

namespace asio = boost::asio;
using nlohmann::json;

int run_serve(const std::vector<llm::client_config>& cfgs, const serve_options& o, logger& log) {
  const auto colon = o.listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == o.listen.size()) {
    throw std::invalid_argument("--listen " + o.listen + ": expected ADDR:PORT");
  }
  keel::gateway::server_options so;
  so.address = o.listen.substr(0, colon);
  if (so.address == "localhost") {
    so.address = "127.0.0.1";
  } else if (so.address.size() > 2 && so.address.front() == '[' && so.address.back() == ']') {
    so.address = so.address.substr(1, so.address.size() - 2);  // [::1]:8080
  }
  if (boost::system::error_code ec; asio::ip::make_address(so.address, ec), ec) {
    throw std::invalid_argument("--listen " + o.listen +
                                ": ADDR must be an IP address (127.0.0.1, 0.0.0.0, [::1]) or "
                                "localhost");
  }
  try {
    const int port = std::stoi(o.listen.substr(colon + 1));
    if (port < 0 || port > 65535) {
      throw std::out_of_range("port");
    }
    so.port = static_cast<unsigned short>(port);
  } catch (const std::exception&) {
    throw std::invalid_argument("--listen " + o.listen + ": the port must be 0-65535");
  }
  if (cfgs.empty()) {
    throw std::invalid_argument("keel serve: no config");
  }
  // One route per config, named by its first entry's model; the callers' keys of every config.
  for (std::size_t i = 0; i < cfgs.size(); ++i) {
    const llm::client_config& cfg = cfgs[i];
    if (cfg.entries.empty()) {
      throw std::invalid_argument(cfg.source + ": config_list is empty: nothing to serve");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (cfgs[j].entries.front().model == cfg.entries.front().model) {
        throw std::invalid_argument(cfg.source + " and " + cfgs[j].source +
                                    " both serve the model \"" + cfg.entries.front().model +
                                    "\" (each config is the route of its first entry's model)");
      }
    }
    for (const llm::serve_client& c : cfg.serve.clients) {
      for (const llm::serve_client& other : so.clients) {
        if (other.name == c.name || other.key_sha256 == c.key_sha256) {
          throw std::invalid_argument(cfg.source + ": serve client \"" + c.name +
                                      "\" is also in another config (by name or key)");
        }
      }
      so.clients.push_back(c);
    }
  }

  // One tracer for every route: the first config's `trace` block (a later config may repeat
  // its endpoint or name none).
  const llm::trace_config& trace_cfg = cfgs.front().trace;
  for (const llm::client_config& cfg : cfgs) {
    if (!cfg.trace.otlp_endpoint.empty() && cfg.trace.otlp_endpoint != trace_cfg.otlp_endpoint) {
      throw std::invalid_argument(cfg.source + ": trace.otlp_endpoint differs from " +
                                  cfgs.front().source +
                                  "'s (one keel serve exports to one collector)");
    }
  }

  asio::io_context ctx(1);  // one thread runs it (Asio skips waking others)
  // Taken over now, not once listening: a SIGTERM during start-up is then a drain of nothing
  // (exit 0), not the default action's death (143). Asio keeps a signal until a wait takes it.
  asio::signal_set signals(ctx, SIGINT, SIGTERM);
  trace_sink traces(ctx.get_executor(), trace_cfg, o.trace_file, log, llm::process_env());
  so.tracer = traces.tracer();
  // The same client hooks, metric names and log lines as `keel batch` (calls carry no item).
  // Routes share the transports and the rate-limit buckets: two routes on one provider key and
  // model pace through one bucket.
  metrics_registry metrics;
  batch_stats stats;
  keel::http::client_options ho;
  ho.max_connections_per_host = 256;
  llm::http_clients http(ctx.get_executor(), ho);  // one per distinct ca_file
  llm::bucket_registry buckets(ctx.get_executor(), std::random_device{}());
  batch_detail::watch_pacing(buckets, metrics, log);
  struct served_route {
    std::unique_ptr<llm::fleet_pacing> fleet;
    llm::client_hooks hooks;
    std::unique_ptr<llm::client> client;
  };
  std::vector<served_route> routes;
  std::vector<keel::gateway::route> table;
  for (const llm::client_config& cfg : cfgs) {
    served_route r;
    r.fleet = make_fleet_pacing(ctx.get_executor(), cfg);
    r.hooks = batch_detail::batch_hooks(cfg, stats, metrics, log);
    llm::client_options co;
    co.keep_raw = false;  // answers are written from the mapped fields
    co.fleet = r.fleet.get();
    co.tracer = traces.tracer();
    r.client = std::make_unique<llm::client>(ctx.get_executor(), cfg, http, buckets, r.hooks,
                                             std::random_device{}(), co);
    for (const auto& e : cfg.entries) {
      metrics
          .gauge("keel_breaker_state", "Breaker state per entry: 0 closed, 1 half-open, 2 open.",
                 {{"model", e.name()}})
          .set(0);
    }
    table.push_back(keel::gateway::route{cfg.entries.front().model, r.client.get()});
    routes.push_back(std::move(r));
  }
  // The gateway's own counters, brought into the registry at each scrape.
  keel::gateway::server* served = nullptr;
  keel::gateway::server_stats told;
  keel::trace::tracer_stats traced;
  so.metrics = [&]() {
    if (const keel::trace::tracer* t = traces.tracer()) {
      // The tracer's counters (issue 17: drops are counted), as deltas since the last scrape.
      const keel::trace::tracer_stats now = t->stats();
      auto spans = [&](const char* name, const char* help, std::uint64_t v, std::uint64_t before) {
        metrics.counter(name, help).inc(static_cast<double>(v - before));
      };
      spans("keel_trace_spans_sampled_total", "Spans recorded (sampled).", now.sampled,
            traced.sampled);
      spans("keel_trace_spans_exported_total", "Spans the exporter accepted.", now.exported,
            traced.exported);
      spans("keel_trace_spans_dropped_total", "Spans dropped because the export queue was full.",
            now.dropped, traced.dropped);
      spans("keel_trace_spans_failed_total",
            "Spans lost to failed exports (or dropped during the pause after one).", now.failed,
            traced.failed);
      traced = now;
    }
    const keel::gateway::server_stats now = served->stats();
    auto add = [&](const char* name, const char* help, std::uint64_t value, std::uint64_t before) {
      metrics.counter(name, help).inc(static_cast<double>(value - before));
    };
    add("keel_serve_requests_total", "HTTP requests read by keel serve (every path).", now.requests,
        told.requests);
    add("keel_serve_completions_total", "Chat completions answered 200 (streams included).",
        now.completions, told.completions);
    add("keel_serve_errors_total", "Answers with a status of 400 or more.", now.errors,
        told.errors);
    add("keel_serve_unauthorized_total", "Requests refused for a missing or unknown key.",
        now.unauthorized, told.unauthorized);
    add("keel_serve_limited_total", "Requests refused for a client's rate or concurrency limit.",
        now.limited, told.limited);
    add("keel_serve_refused_connections_total",
        "Connections closed at once because 4096 were open.", now.refused_connections,
        told.refused_connections);
    metrics.gauge("keel_serve_open_connections", "Connections open now.")
        .set(static_cast<double>(now.open_connections));
    metrics.gauge("keel_in_flight", "Chat completions running now.")
        .set(static_cast<double>(now.in_flight));
    told = now;
    return metrics.render();
  };
  keel::gateway::server server(ctx.get_executor(), table, so);
  served = &server;
  try {
    server.start();
  } catch (const boost::system::system_error& e) {
    throw std::runtime_error("keel serve: cannot listen on " + o.listen + ": " +
                             e.code().message());
  }
  const std::string who =
      so.clients.empty()
          ? std::string("no client keys: anyone who can connect is served")
          : std::to_string(so.clients.size()) + " client key" + (so.clients.size() == 1 ? "" : "s");
  std::string served_models;
  for (const llm::client_config& cfg : cfgs) {
    served_models += std::string(served_models.empty() ? "" : ", ") + "model \"" +
                     cfg.entries.front().model + "\" -> " + std::to_string(cfg.entries.size()) +
                     (cfg.entries.size() == 1 ? " entry" : " entries");
  }
  std::printf(
      "keel serve: listening on %s (POST /v1/chat/completions, GET /v1/models, GET /healthz, "
      "GET /metrics); %s; %s; Ctrl-C to stop\n",
      server.base_url().c_str(), served_models.c_str(), who.c_str());
  std::fflush(stdout);

  int signal_number = 0;
  signals.async_wait([&](const boost::system::error_code& ec, int sig) {
    if (ec) {
      return;
    }
    signal_number = sig;
    log.log(log_level::warning, "draining", "",
            json{{"signal", sig}, {"grace_s", o.grace}, {"in_flight", server.stats().in_flight}});
    // A second signal stops at once.
    signals.async_wait([&](const boost::system::error_code& ec2, int) {
      if (!ec2) {
        server.stop();
      }
    });
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          co_await server.drain(std::chrono::duration_cast<std::chrono::nanoseconds>(
              std::chrono::duration<double>(o.grace)));
          signals.cancel();
          for (served_route& r : routes) {
            if (r.fleet) {
              r.fleet->close();
            }
          }
        },
        asio::detached);
  });
  ctx.run();
  traces.finish(ctx);
  const auto s = server.stats();
  std::printf("keel serve: stopped after %llu requests (%llu completions, %llu errors)\n",
              static_cast<unsigned long long>(s.requests),
              static_cast<unsigned long long>(s.completions),
              static_cast<unsigned long long>(s.errors));
  (void)signal_number;
  return 0;
}

}  // namespace keel::cli
