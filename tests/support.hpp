// Shared helpers for keel's tests: spawning coroutines on virtual time and scripted operations.
#pragma once

#include <keel/clock.hpp>
#include <keel/error.hpp>
#include <keel/testing/manual_clock.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel_test {

namespace asio = boost::asio;
using keel::testing::manual_clock;
using namespace std::chrono_literals;
using ms = std::chrono::milliseconds;

/// Runs `ctx` in real time (waiting only for I/O) until `done()` or 20 s.
template <class Predicate>
bool run_real(asio::io_context& ctx, Predicate done) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!done()) {
    if (std::chrono::steady_clock::now() > end) {
      return false;
    }
    if (ctx.stopped()) {
      ctx.restart();
    }
    ctx.run_one_for(std::chrono::milliseconds(5));
  }
  return true;
}

/// The `what()` of the exception in `e`.
inline std::string what_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "(not a std::exception)";
  }
}

/// Milliseconds since the manual clock's epoch.
inline long long now_ms() {
  return std::chrono::duration_cast<ms>(manual_clock::now().time_since_epoch()).count();
}

/// The outcome of a spawned coroutine.
template <class T>
struct outcome {
  bool done = false;
  std::exception_ptr error;
  std::optional<T> value;
  long long finished_at_ms = -1;

  /// The keel/asio code of the error, if it was a system_error.
  boost::system::error_code code() const {
    try {
      if (error) {
        std::rethrow_exception(error);
      }
    } catch (const boost::system::system_error& e) {
      return e.code();
    } catch (...) {
    }
    return {};
  }
};

template <>
struct outcome<void> {
  bool done = false;
  std::exception_ptr error;
  long long finished_at_ms = -1;
  boost::system::error_code code() const {
    try {
      if (error) {
        std::rethrow_exception(error);
      }
    } catch (const boost::system::system_error& e) {
      return e.code();
    } catch (...) {
    }
    return {};
  }
};

/// Spawns `aw` on `ctx`, recording its outcome in `out` (which must outlive the run).
template <class T>
void spawn(asio::io_context& ctx, asio::awaitable<T> aw, outcome<T>& out,
           asio::cancellation_slot slot = {}) {
  if constexpr (std::is_void_v<T>) {
    asio::co_spawn(ctx, std::move(aw),
                   asio::bind_cancellation_slot(slot, [&out](std::exception_ptr e) {
                     out.done = true;
                     out.error = e;
                     out.finished_at_ms = now_ms();
                   }));
  } else {
    // co_spawn needs a default-constructible T: go through optional.
    auto wrapped = [](asio::awaitable<T> a) -> asio::awaitable<std::optional<T>> {
      co_return std::optional<T>(co_await std::move(a));
    };
    asio::co_spawn(
        ctx, wrapped(std::move(aw)),
        asio::bind_cancellation_slot(slot, [&out](std::exception_ptr e, std::optional<T> v) {
          out.done = true;
          out.error = e;
          out.finished_at_ms = now_ms();
          if (!e && v) {
            out.value.emplace(std::move(*v));
          }
        }));
  }
}

/// Spawns `aw` on `ctx` and runs it in real time to its end (waiting only for I/O); after 20 s
/// without an end, the outcome holds an error saying so.
template <class T>
outcome<T> run_one(asio::io_context& ctx, asio::awaitable<T> aw,
                   asio::cancellation_slot slot = {}) {
  outcome<T> out;
  spawn(ctx, std::move(aw), out, slot);
  if (!run_real(ctx, [&] { return out.done; })) {
    out.error = std::make_exception_ptr(std::runtime_error("run_one: no end within 20 s"));
  }
  return out;
}

/// Virtual time since the manual clock's epoch (tests reset it at their start).
inline std::chrono::nanoseconds elapsed() {
  return manual_clock::now().time_since_epoch();
}

/// Sleeps on the manual clock.
inline asio::awaitable<void> sleep_for(manual_clock::duration d) {
  keel::basic_timer<manual_clock> t(co_await asio::this_coro::executor);
  t.expires_after(d);
  co_await t.async_wait(asio::use_awaitable);
}

/// One step of a scripted operation: after `latency`, fail with `ec` (and `hint`) or succeed.
struct step {
  boost::system::error_code ec{};
  std::optional<std::chrono::nanoseconds> hint{};
  manual_clock::duration latency{0};
};

/// An operation that follows a script, one step per attempt, recording when each attempt began.
/// Steps past the end succeed. Every attempt that completes records its end time.
struct scripted {
  explicit scripted(std::vector<step> s = {}) : steps(std::move(s)) {}

  std::vector<step> steps;
  std::vector<long long> started_ms;
  std::vector<long long> ended_ms;
  int value = 42;

  asio::awaitable<int> run() {
    const std::size_t i = started_ms.size();
    started_ms.push_back(now_ms());
    const step s = i < steps.size() ? steps[i] : step{};
    if (s.latency > manual_clock::duration::zero()) {
      co_await sleep_for(s.latency);
    }
    ended_ms.push_back(now_ms());
    if (s.ec) {
      throw keel::failure(s.ec, s.ec.message(), {}, s.hint);
    }
    co_return value;
  }

  /// A factory for combinators.
  auto factory() {
    return [this] { return run(); };
  }
};

}  // namespace keel_test
