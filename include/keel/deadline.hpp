// with_deadline: run an operation against a timer and cancel it when time runs out.
#pragma once

// Overview
// --------
// `co_await keel::with_deadline(op, 10s)` runs `op()` and races it against a timer:
// - the operation completes first (value or error): its outcome is returned or rethrown at once,
//   and its deadline leaves the queue;
// - the timer expires first: the operation is cancelled through Asio's cancellation (terminal
//   cancellation of its coroutine thread, so the socket or timer it is waiting on completes with
//   `operation_aborted`), keel waits for it to unwind, and throws `keel::failure` with
//   `keel::error::deadline_exceeded` (condition `timeout`). Nothing of the operation runs after
//   `with_deadline` has returned.
//
// How: the operation runs as its own coroutine thread (`co_spawn`), so that it can be cancelled
// without cancelling the caller, with a cancellation slot that both the deadline and the caller's
// own cancellation emit on. The deadline itself is an entry in the execution context's deadline
// queue (detail/deadline_queue.hpp): one Asio timer per context and clock, armed at the earliest
// pending deadline, instead of a timer per call, which costs two system calls. Not built on
// `awaitable_operators::operator||`, which drops a fast failure and waits for the timer.
//
// Cost (bench/core_bench.cpp, docs/BENCHMARKS.md): about 1.5 µs and 1.6 KiB per call, most of
// it the spawned thread (0.6–1.0 µs; its frames and cancellation handler, 0.65 KiB); the queue
// adds about 0.1 µs and no allocation. When the operation's value type has a default
// constructor, the thread's body is the operation's own awaitable (`op()` is called just before
// the thread starts); otherwise (void, or no default constructor, which co_spawn's completion
// needs for an exception) a small coroutine wraps it, one frame more for the call's life.
//
// Nested deadlines: the tighter wins. The operation runs on an executor that carries its
// deadline, so code inside it can ask how much time is left (`keel::deadline_of`,
// `keel::current_deadline`); `with_retry` uses this so that it never starts a backoff sleep that
// would end after the enclosing deadline. Work that the operation `co_spawn`s onto its own
// executor inherits that deadline as information only: spawn detached work on
// `keel::without_deadline(ex)`.
//
// Example:
//
//     std::string reply = co_await keel::with_deadline([&] { return call_model(prompt); }, 10s);
//
// Cancellation: cancelling the caller cancels the operation; the caller sees the
// operation's error (normally `operation_aborted`), never `deadline_exceeded`.
// Thread safety: each call is independent; the operation runs on the caller's executor, and an
// expired deadline is delivered there too (dispatched, so a strand's order is kept). On an
// io_context run by several threads, make the calls from a strand: the deadline cancels the
// operation by emitting a cancellation signal from the timer's handler, and Asio's cancellation
// slots are not thread-safe, so that emission must be serialised with the operation's own
// completion. (Asio's own `a || b` on parallel groups has the same requirement.) On the plain
// executor of a multi-threaded io_context, an expiry racing the operation's completion is a
// data race.

#include <keel/clock.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/detail/deadline_executor.hpp>
#include <keel/detail/deadline_queue.hpp>
#include <keel/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <atomic>
#include <chrono>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>

namespace keel {

/// The deadline that applies to code running on `ex`, if a `with_deadline` on `Clock` set one.
template <class Clock = default_clock>
std::optional<typename Clock::time_point> deadline_of(
    const boost::asio::any_io_executor& ex) noexcept {
  return detail::deadline_of<Clock>(ex);
}

/// The deadline that applies to the calling coroutine, if any. Does not suspend.
template <class Clock = default_clock>
boost::asio::awaitable<std::optional<typename Clock::time_point>> current_deadline() {
  co_return detail::deadline_of<Clock>(co_await boost::asio::this_coro::executor);
}

/// Time left before the calling coroutine's deadline (`std::nullopt` if it has none; zero if it
/// has passed). Does not suspend.
template <class Clock = default_clock>
boost::asio::awaitable<std::optional<typename Clock::duration>> remaining_time() {
  auto d = detail::deadline_of<Clock>(co_await boost::asio::this_coro::executor);
  if (!d) {
    co_return std::nullopt;
  }
  const auto now = Clock::now();
  co_return *d > now ? *d - now : Clock::duration::zero();
}

/// `ex` without the keel deadline (on `Clock`) it may carry. Spawn detached work on this executor:
/// work spawned onto a deadline-carrying executor would otherwise report the caller's deadline
/// as its own, although nothing enforces it once the caller has returned.
template <class Clock = default_clock>
boost::asio::any_io_executor without_deadline(const boost::asio::any_io_executor& ex) {
  return detail::strip_deadline<Clock>(ex);
}

namespace detail {

/// What `with_deadline`'s operation thread hands back: the value, or `std::monostate` for void.
template <class T>
using deadline_value_t = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

/// Runs `op()` as the body of the operation's coroutine thread. `op` lives in the caller's frame,
/// which outlives the thread. (An empty optional cannot come back from here: co_spawn's
/// completion needs a default-constructible value, hence the optional.)
template <class MakeOp>
auto run_op_lifted(MakeOp& op)
    -> boost::asio::awaitable<std::optional<deadline_value_t<op_value_t<MakeOp>>>> {
  using V = deadline_value_t<op_value_t<MakeOp>>;
  if constexpr (std::is_void_v<op_value_t<MakeOp>>) {
    co_await op();
    co_return std::optional<V>(std::in_place);
  } else {
    co_return std::optional<V>(co_await op());
  }
}

/// True if the operation's own awaitable can be the spawned thread's body: co_spawn hands back a
/// default-constructed value with an exception, so `T` must have one. Otherwise (void, or no
/// default constructor) the body is `run_op_lifted`, one coroutine frame more for the call's life.
template <class T>
inline constexpr bool spawn_direct_v =
    !std::is_void_v<T> && std::is_default_constructible_v<T> && std::is_move_constructible_v<T>;

/// What the spawned thread's body returns: `T` itself when spawned directly, else the optional.
template <class T>
using spawn_result_t = std::conditional_t<spawn_direct_v<T>, T, std::optional<deadline_value_t<T>>>;

/// The spawned thread's body: `op()` itself, or `run_op_lifted(op)`. `op` lives in the caller's
/// frame, which outlives the thread; called here, before the thread starts, when spawned directly.
template <class MakeOp>
auto spawn_body(MakeOp& op) -> boost::asio::awaitable<spawn_result_t<op_value_t<MakeOp>>> {
  if constexpr (spawn_direct_v<op_value_t<MakeOp>>) {
    return op();
  } else {
    return run_op_lifted(op);
  }
}

/// `co_spawn(ex, body, ...)` with its completion bound to `slot`, as an async operation object
/// that a coroutine can `co_await` in place: unlike `use_awaitable`, it allocates no frame of its
/// own. Completes with `(std::tuple<std::exception_ptr, R>)`, because Asio 1.81 cannot
/// `co_await` an operation whose signature is `(std::exception_ptr, T)` and its
/// `bind_cancellation_slot` cannot wrap `deferred`.
template <class R>
struct spawn_with_slot {
  using outcome = std::tuple<std::exception_ptr, R>;

  boost::asio::any_io_executor ex;
  boost::asio::awaitable<R> body;
  boost::asio::cancellation_slot slot;

  template <class CompletionToken>
  requires boost::asio::completion_token_for<CompletionToken, void(outcome)>
  auto operator()(CompletionToken&& token) && {
    return boost::asio::async_initiate<CompletionToken, void(outcome)>(
        [](auto handler, boost::asio::any_io_executor spawn_ex, boost::asio::awaitable<R> body_,
           boost::asio::cancellation_slot s) {
          // The spawned thread runs on `spawn_ex`, which wraps the caller's executor, so its
          // completion is dispatched there too.
          boost::asio::co_spawn(spawn_ex, std::move(body_),
                                boost::asio::bind_cancellation_slot(
                                    s, [h = std::move(handler)](std::exception_ptr e, R v) mutable {
                                      std::move(h)(outcome(e, std::move(v)));
                                    }));
        },
        token, std::move(ex), std::move(body), slot);
  }
};

/// One `with_deadline` call's registration with the context's deadline queue. Lives in the
/// caller's frame. `fire` runs on the caller's executor: if the operation has not finished, it
/// marks the call expired and cancels the operation.
template <class Clock>
struct deadline_race final : deadline_entry<Clock> {
  explicit deadline_race(boost::asio::any_io_executor caller) : ex(std::move(caller)) {
    this->fire = &deadline_race::on_due;
  }

  static void on_due(deadline_entry<Clock>* e) noexcept {
    auto* self = static_cast<deadline_race*>(e);
    boost::asio::dispatch(self->ex, [self] {
      if (!self->op_done.load(std::memory_order_acquire)) {
        self->expired.store(true, std::memory_order_relaxed);
        self->cancel_op.emit(boost::asio::cancellation_type::terminal);
      }
      self->fire_done.store(true, std::memory_order_release);
    });
  }

  boost::asio::any_io_executor ex;
  boost::asio::cancellation_signal cancel_op;  // bound to the operation's coroutine thread
  bool caller_cancelled = false;               // the caller's slot fired during this call
  std::atomic<bool> op_done{false};
  std::atomic<bool> fire_done{false};
  std::atomic<bool> expired{false};
};

/// The body shared by `with_deadline` and `with_deadline_at`: the deadline is `at` if given,
/// else `timeout` after the moment the returned awaitable first runs.
template <class Clock, class MakeOp>
auto deadline_impl(MakeOp op, std::optional<typename Clock::time_point> at,
                   typename Clock::duration timeout) -> boost::asio::awaitable<op_value_t<MakeOp>> {
  namespace asio = boost::asio;
  using T = op_value_t<MakeOp>;
  // `race` is the call's only executor copy: the frame stays small with 100,000 calls in flight.
  deadline_race<Clock> race(co_await asio::this_coro::executor);
  const auto& ex = race.ex;
  const auto now = Clock::now();
  const auto deadline = at ? *at : saturating_add(now, timeout);
  if (now >= deadline) {
    throw failure(error::deadline_exceeded, "deadline exceeded before the operation started");
  }

  // Code inside sees the tighter of the enclosing deadline and ours. Our own deadline is queued
  // even when the enclosing one is tighter: work spawned onto a deadline executor (detached work)
  // is not covered by the enclosing call, so each with_deadline enforces its own.
  const auto outer = detail::deadline_of<Clock>(ex);
  const auto visible = outer && *outer < deadline ? *outer : deadline;

  // The operation runs as its own coroutine thread so that it can be cancelled alone; its
  // cancellation slot is `race.cancel_op`, which the deadline and the caller's own cancellation
  // (forwarded below) both emit on. The thread is awaited as an async operation object, which lives
  // in this frame, rather than through `use_awaitable`, which allocates a frame of its own per
  // call. Made (allocating the operation's frame, and calling `op()` when it is spawned directly)
  // before the deadline is queued and before the caller's slot is connected to `race`: an exception
  // from either must not leave the queue or the caller's slot pointing into this unwinding frame.
  spawn_with_slot<spawn_result_t<T>> spawn{detail::with_deadline_executor<Clock>(ex, visible),
                                           detail::spawn_body(op), race.cancel_op.slot()};
  race.at = deadline;
  deadline_queue<Clock>* queue = nullptr;
  if (deadline != Clock::time_point::max()) {
    queue = &deadline_queue<Clock>::of(ex);
    if (!queue->add(race, ex)) {
      queue = nullptr;  // the context is shutting down; nothing would fire
    }
  }
  struct unregister {
    deadline_queue<Clock>* queue;
    deadline_race<Clock>& race;
    ~unregister() {
      if (queue) {
        queue->remove(race);  // normally already done; this covers a frame destroyed mid-call
      }
    }
  } guard{queue, race};

  auto cs = co_await asio::this_coro::cancellation_state;
  if (auto caller = cs.slot(); caller.is_connected()) {
    caller.assign([&race](asio::cancellation_type type) {
      race.caller_cancelled = true;
      race.cancel_op.emit(type);
    });
  }
  // The caller's slot is cleared by the awaitable machinery when the co_await completes.
  auto [op_error, value] = co_await std::move(spawn);
  race.op_done.store(true, std::memory_order_release);

  if (queue && !queue->remove(race)) {
    // The queue has taken the entry: `on_due` has run or is queued on our executor. Wait for it,
    // since it refers to `race`. On one thread it has always run by now; on a strand it may be
    // queued behind this coroutine, and one post lets it run.
    guard.queue = nullptr;
    if (!race.fire_done.load(std::memory_order_acquire)) {
      const bool throw_if_cancelled = co_await asio::this_coro::throw_if_cancelled();
      co_await asio::this_coro::throw_if_cancelled(false);
      while (!race.fire_done.load(std::memory_order_acquire)) {
        co_await asio::post(ex, asio::use_awaitable);
      }
      co_await asio::this_coro::throw_if_cancelled(throw_if_cancelled);
    }
  } else {
    guard.queue = nullptr;
  }

  // The deadline expired only if it fired before the operation finished and the caller was not
  // cancelled during this call; otherwise the operation's own outcome (value or error) is the
  // answer. (A cancellation of the caller before this call, which the caller chose to survive
  // with throw_if_cancelled(false), does not count: `cs.cancelled()` would still show it.)
  if (race.expired.load(std::memory_order_relaxed) && !race.caller_cancelled) {
    throw failure(error::deadline_exceeded, "deadline exceeded");
  }
  if (op_error) {
    std::rethrow_exception(op_error);
  }
  if constexpr (spawn_direct_v<T>) {
    co_return std::move(value);
  } else {
    if (!value) {
      throw boost::system::system_error(asio::error::operation_aborted);
    }
    if constexpr (!std::is_void_v<T>) {
      co_return std::move(*value);
    }
  }
}

}  // namespace detail

/// Runs `op()` and cancels it if it has not completed by `deadline`.
///
/// @param op a callable returning a fresh `awaitable<T>`; called once, taken by value.
/// @param deadline the instant on `Clock` at which the operation is cancelled.
/// @returns the operation's value.
/// @throws keel::failure with `error::deadline_exceeded` if the deadline passed first (also,
///   without calling `op`, if it has already passed); otherwise whatever the operation threw.
/// Cancellation: cancelling the caller cancels the operation; its error propagates.
template <class Clock = default_clock, class MakeOp>
requires detail::is_op_factory_v<MakeOp>
auto with_deadline_at(MakeOp op, typename Clock::time_point deadline)
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  return detail::deadline_impl<Clock>(std::move(op), deadline, {});
}

/// Runs `op()` and cancels it if it has not completed within `timeout`, counted from the moment
/// the returned awaitable starts.
///
/// Same semantics as `with_deadline_at`.
template <class Clock = default_clock, class MakeOp, class Rep, class Period>
requires detail::is_op_factory_v<MakeOp>
auto with_deadline(MakeOp op, std::chrono::duration<Rep, Period> timeout)
    -> boost::asio::awaitable<detail::op_value_t<MakeOp>> {
  return detail::deadline_impl<Clock>(std::move(op), std::nullopt,
                                      saturating_cast<typename Clock::duration>(timeout));
}

}  // namespace keel
