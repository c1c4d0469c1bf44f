// `keel batch`'s SIGINT/SIGTERM handling: the first signal stops new items and starts a grace
// timer; a second signal, or the grace running out, cancels the items in flight.
#pragma once

#include "log.hpp"
#include "stats.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>

#include <functional>

namespace keel::cli::batch_detail {

/// Catches SIGINT and SIGTERM for one batch run from construction until `close()`.
///
/// The first signal calls `stop` (no new items), logs `interrupted` at WARNING and starts a
/// timer of `grace` seconds; when it expires (`grace_expired`) or a second signal arrives
/// (`interrupted` again), `cancel_all` cancels the items in flight. Log lines name the number of
/// items in flight from `st`.
///
/// Thread safety: lives on the run's io_context, whose single thread calls every method.
class batch_signals {
 public:
  /// Starts catching the signals (`start()` must follow for them to be handled).
  /// @param grace seconds the items in flight get to finish after the first signal.
  /// @param log, @param st must outlive this object.
  batch_signals(boost::asio::any_io_executor ex, double grace, logger& log, const batch_stats& st,
                std::function<void()> stop, std::function<void()> cancel_all);

  /// Waits for the first signal.
  void start();

  /// The run is over: signals and the grace timer are no longer acted on.
  void close();

  /// The first signal caught (SIGINT or SIGTERM), or 0 if none was.
  int signal_number() const { return signal_number_; }

 private:
  void wait();
  void on_signal(int signo);

  boost::asio::signal_set signals_;
  boost::asio::steady_timer grace_timer_;
  double grace_;
  logger& log_;
  const batch_stats& st_;
  std::function<void()> stop_;
  std::function<void()> cancel_all_;
  int signal_number_ = 0;
  bool closed_ = false;
};

}  // namespace keel::cli::batch_detail
