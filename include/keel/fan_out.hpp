// fan_out: run a function over many items with bounded concurrency; one result per item.
#pragma once

// Overview
// --------
// `co_await keel::fan_out(items, 64, fn)` awaits `fn(item)` for every item with at most 64 in
// flight, and returns a `std::vector<keel::result<T, std::exception_ptr>>` in input order: each
// entry is the item's value or the exception it ended with (gather with return-exceptions
// semantics). No item is lost and none is run twice: a failure of one item never stops the
// others.
//
// Workers: `min(concurrency, size)` coroutines on the caller's executor pull the next item in
// input order, so items start in order and at most `concurrency` are in flight. On a
// multi-threaded executor they may run in parallel; the item queue is guarded by a mutex and each
// worker writes only its own result slots.
//
// Example:
//
//     auto results = co_await keel::fan_out(prompts, 64, [&](const prompt& p) {
//       return keel::with_retry([&] { return call_model(p); }, policy);
//     });
//     for (auto& r : results) { if (r) use(*r); else report(r.error()); }
//
// Cancellation: cancelling the caller cancels every in-flight `fn` (their results hold
// `operation_aborted`, or whatever they ended with), starts no further item, and reports every
// item that never started as `operation_aborted`. `fan_out` then returns normally with the full
// vector, so the caller still sees one result per item.
// Lifetime: `items` and `fn` are held by reference until the awaitable completes.
// Thread safety: each call is independent.

#include <keel/detail/awaitable_traits.hpp>
#include <keel/result.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <cstddef>
#include <exception>
#include <iterator>
#include <mutex>
#include <ranges>
#include <stdexcept>
#include <vector>

namespace keel {

namespace detail {

template <class Range, class Fn>
using fan_out_value_t = typename awaitable_traits<
    std::invoke_result_t<Fn&, std::ranges::range_reference_t<Range>>>::value_type;

template <class Range, class Fn, class T>
struct fan_out_state {
  Range& items;
  Fn& fn;
  std::vector<result<T, std::exception_ptr>>& results;
  std::mutex mutex;
  std::ranges::iterator_t<Range> next;
  std::size_t next_index = 0;
  bool stop = false;
};

template <class Range, class Fn, class T>
boost::asio::awaitable<void> fan_out_worker(fan_out_state<Range, Fn, T>* st) {
  for (;;) {
    std::size_t index = 0;
    std::ranges::iterator_t<Range> it;
    {
      std::lock_guard lock(st->mutex);
      if (st->stop || st->next == std::ranges::end(st->items)) {
        co_return;
      }
      it = st->next++;
      index = st->next_index++;
    }
    auto cs = co_await boost::asio::this_coro::cancellation_state;
    if (cs.cancelled() != boost::asio::cancellation_type::none) {
      // The item stays reported as aborted; stop handing out items to anyone.
      std::lock_guard lock(st->mutex);
      st->stop = true;
      co_return;
    }
    try {
      if constexpr (std::is_void_v<T>) {
        co_await st->fn(*it);
        st->results[index] = result<T, std::exception_ptr>();
      } else {
        st->results[index] =
            result<T, std::exception_ptr>(boost::system::in_place_value, co_await st->fn(*it));
      }
    } catch (...) {
      st->results[index] =
          result<T, std::exception_ptr>(boost::system::in_place_error, std::current_exception());
    }
  }
}

}  // namespace detail

/// Awaits `fn(item)` for every item, at most `concurrency` at a time, and returns one result per
/// item in input order.
///
/// @param items a forward range; held by reference until completion.
/// @param concurrency the most items in flight; must be at least 1.
/// @param fn called once per item, returning a fresh `awaitable<T>`; held by reference.
/// @returns one `result<T, std::exception_ptr>` per item, in input order.
/// @throws std::invalid_argument if `concurrency` is 0. Never throws for an item's failure.
/// Cancellation: see the header overview; the vector is still complete.
template <std::ranges::forward_range Range, class Fn>
auto fan_out(Range&& items, std::size_t concurrency, Fn&& fn) -> boost::asio::awaitable<
    std::vector<result<detail::fan_out_value_t<Range, Fn>, std::exception_ptr>>> {
  namespace asio = boost::asio;
  using T = detail::fan_out_value_t<Range, Fn>;
  using R = std::remove_reference_t<Range>;
  using F = std::remove_reference_t<Fn>;
  if (concurrency == 0) {
    throw std::invalid_argument("keel::fan_out: concurrency must be at least 1");
  }
  const auto count = static_cast<std::size_t>(std::ranges::distance(items));
  std::vector<result<T, std::exception_ptr>> results;
  results.reserve(count);
  const auto not_started =
      std::make_exception_ptr(boost::system::system_error(asio::error::operation_aborted));
  for (std::size_t i = 0; i < count; ++i) {
    results.emplace_back(boost::system::in_place_error, not_started);
  }
  if (count == 0) {
    co_return results;
  }

  detail::fan_out_state<R, F, T> st{items, fn, results, {}, std::ranges::begin(items)};
  auto ex = co_await asio::this_coro::executor;
  using op_type = decltype(asio::co_spawn(ex, detail::fan_out_worker(&st), asio::deferred));
  std::vector<op_type> workers;
  const std::size_t n = std::min(concurrency, count);
  workers.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    workers.push_back(asio::co_spawn(ex, detail::fan_out_worker(&st), asio::deferred));
  }
  // Workers never throw; wait for all of them even when cancelled, so that every in-flight item
  // has finished before `st` and `results` go away.
  co_await asio::experimental::make_parallel_group(std::move(workers))
      .async_wait(asio::experimental::wait_for_all(), asio::use_awaitable);
  co_return results;
}

}  // namespace keel
