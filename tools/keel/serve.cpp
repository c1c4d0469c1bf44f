// `keel serve` (serve.hpp).
#include "serve.hpp"

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
#include <boost/asio/signal_set.hpp>

#include <csignal>
#include <cstdio>
#include <random>
#include <stdexcept>

namespace keel::cli {

namespace asio = boost::asio;
using nlohmann::json;

int run_serve(const llm::client_config& cfg, const serve_options& o, logger& log) {
  const auto colon = o.listen.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == o.listen.size()) {
    throw std::invalid_argument("--listen " + o.listen + ": expected ADDR:PORT");
  }
  keel::gateway::server_options so;
  so.address = o.listen.substr(0, colon);
  try {
    const int port = std::stoi(o.listen.substr(colon + 1));
    if (port < 0 || port > 65535) {
      throw std::out_of_range("port");
    }
    so.port = static_cast<unsigned short>(port);
  } catch (const std::exception&) {
    throw std::invalid_argument("--listen " + o.listen + ": the port must be 0-65535");
  }
  if (cfg.entries.empty()) {
    throw std::invalid_argument(cfg.source + ": config_list is empty: nothing to serve");
  }
  // One route per config: the model of its first entry; the chain behind it is the config's.
  so.models = {cfg.entries.front().model};
  so.clients = cfg.serve.clients;

  asio::io_context ctx;
  const std::unique_ptr<llm::fleet_pacing> fleet = make_fleet_pacing(ctx.get_executor(), cfg);
  // The same client hooks, metric names and log lines as `keel batch` (calls carry no item).
  metrics_registry metrics;
  batch_stats stats;
  keel::http::client_options ho;
  ho.max_connections_per_host = 256;
  llm::http_clients http(ctx.get_executor(), ho);  // one per distinct ca_file
  llm::bucket_registry buckets(ctx.get_executor(), std::random_device{}());
  batch_detail::watch_pacing(buckets, metrics, log);
  const llm::client_hooks hooks = batch_detail::batch_hooks(cfg, stats, metrics, log);
  llm::client_options co;
  co.fleet = fleet.get();
  llm::client client(ctx.get_executor(), cfg, http, buckets, hooks, std::random_device{}(), co);
  for (const auto& e : cfg.entries) {
    metrics
        .gauge("keel_breaker_state", "Breaker state per entry: 0 closed, 1 half-open, 2 open.",
               {{"model", e.name()}})
        .set(0);
  }
  // The gateway's own counters, brought into the registry at each scrape.
  keel::gateway::server* served = nullptr;
  keel::gateway::server_stats told;
  so.metrics = [&]() {
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
  keel::gateway::server server(ctx.get_executor(), client, so);
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
  std::printf(
      "keel serve: listening on %s (POST /v1/chat/completions, GET /v1/models, GET /healthz, "
      "GET /metrics); model \"%s\" -> %zu entr%s; %s; Ctrl-C to stop\n",
      server.base_url().c_str(), so.models.front().c_str(), cfg.entries.size(),
      cfg.entries.size() == 1 ? "y" : "ies", who.c_str());
  std::fflush(stdout);

  asio::signal_set signals(ctx, SIGINT, SIGTERM);
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
          if (fleet) {
            fleet->close();
          }
        },
        asio::detached);
  });
  ctx.run();
  const auto s = server.stats();
  std::printf("keel serve: stopped after %llu requests (%llu completions, %llu errors)\n",
              static_cast<unsigned long long>(s.requests),
              static_cast<unsigned long long>(s.completions),
              static_cast<unsigned long long>(s.errors));
  (void)signal_number;
  return 0;
}

}  // namespace keel::cli
