// `keel batch`'s SIGINT/SIGTERM handling: stop admitting, a grace period, then cancel.
#include "batch_signals.hpp"

#include "batch_detail.hpp"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <utility>

namespace keel::cli::batch_detail {

batch_signals::batch_signals(boost::asio::any_io_executor ex, double grace, logger& log,
                             const batch_stats& st, std::function<void()> stop,
                             std::function<void()> cancel_all)
    : signals_(ex, SIGINT, SIGTERM),
      grace_timer_(ex),
      grace_(grace),
      log_(log),
      st_(st),
      stop_(std::move(stop)),
      cancel_all_(std::move(cancel_all)) {}

void batch_signals::start() {
  wait();
}

void batch_signals::close() {
  closed_ = true;
  boost::system::error_code ignored;
  signals_.cancel(ignored);
  grace_timer_.cancel();
}

void batch_signals::wait() {
  signals_.async_wait([this](const boost::system::error_code& ec, int signo) {
    if (ec || closed_) {
      return;
    }
    on_signal(signo);
  });
}

void batch_signals::on_signal(int signo) {
  if (signal_number_ != 0) {
    log_.log(log_level::warning, "interrupted", "second signal: cancelling the items in flight",
             {{"in_flight", st_.in_flight}});
    cancel_all_();
    return;
  }
  stop_();
  signal_number_ = signo;
  log_.log(
      log_level::warning, "interrupted",
      "no new items; waiting for the items in flight (signal again to cancel them now)",
      {{"signal", signo == SIGINT ? "SIGINT" : "SIGTERM"},
       {"in_flight", st_.in_flight},
       {"grace", seconds_text(std::chrono::nanoseconds(static_cast<long long>(grace_ * 1e9)))}});
  grace_timer_.expires_after(
      std::chrono::nanoseconds(static_cast<long long>(std::max(0.0, grace_) * 1e9)));
  grace_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (!ec && !closed_) {
      log_.log(log_level::warning, "grace_expired", "cancelling the items in flight",
               {{"in_flight", st_.in_flight}});
      cancel_all_();
    }
  });
  wait();
}

}  // namespace keel::cli::batch_detail
