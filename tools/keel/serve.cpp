// `keel serve` (serve.hpp).
#include "serve.hpp"

#include "fleet_pacing.hpp"

#include <keel/gateway/server.hpp>
#include <keel/llm/client.hpp>
#include <keel/llm/error.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <csignal>
#include <cstdio>
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
  llm::client_hooks hooks;
  hooks.on_retry = [&cfg, &log](const llm::retry_report& r) {
    if (log.enabled(log_level::warning)) {
      json f;
      f["attempt"] = r.attempt;
      f["class"] = llm::error_class(r.error);
      if (const int status = llm::error_status(r.error)) {
        f["status"] = status;
      }
      f["delay_ms"] = std::chrono::duration_cast<std::chrono::milliseconds>(r.delay).count();
      f["model"] = cfg.entries[r.entry].name();
      log.log(log_level::warning, "retry", "", f);
    }
  };
  hooks.on_fallback = [&cfg, &log](const void*, std::size_t from, std::size_t to,
                                   std::exception_ptr e) {
    log.log(log_level::warning, "fallback", "",
            json{{"from", cfg.entries[from].name()},
                 {"to", cfg.entries[to].name()},
                 {"class", llm::error_class(e)}});
  };
  hooks.on_breaker = [&cfg, &log](std::size_t entry, keel::breaker_state from,
                                  keel::breaker_state to) {
    log.log(log_level::warning, "breaker", "",
            json{{"model", cfg.entries[entry].name()},
                 {"from", keel::to_string(from)},
                 {"to", keel::to_string(to)}});
  };
  llm::client_options co;
  co.fleet = fleet.get();
  llm::client client(ctx.get_executor(), cfg, hooks, co);
  keel::gateway::server server(ctx.get_executor(), client, so);
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
      "keel serve: listening on %s (POST /v1/chat/completions, GET /v1/models, GET "
      "/healthz); model \"%s\" -> %zu entr%s; %s; Ctrl-C to stop\n",
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
