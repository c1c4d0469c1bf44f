// keel::result<T> and try_await: values instead of exceptions at aggregation edges.
#pragma once

// Overview
// --------
// Inside coroutines keel reports failures as exceptions (see error.hpp). Code that aggregates
// many outcomes (a batch, a CLI) prefers values: `keel::try_await` turns an awaitable that may
// throw into a `keel::result<T>` holding either the value or an `error_code`. When the error's
// details matter (a provider's message, every fallback's cause), use `keel::try_await_ptr`, which
// keeps the exception itself in a `result<T, std::exception_ptr>`.
//
// Example:
//
//     keel::result<std::string> r = co_await keel::try_await(call_model(prompt));
//     if (!r && r.error() == keel::condition::throttled) { ... }
//
// Cancellation: `try_await` does not swallow cancellation: the awaited operation sees the
// caller's cancellation as usual, and its `operation_aborted` becomes the result's error.
// Thread safety: stateless.

#include <keel/error.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/system/result.hpp>

#include <exception>
#include <type_traits>
#include <utility>

namespace keel {

/// A value or an error; `E` defaults to `boost::system::error_code`.
template <class T, class E = boost::system::error_code>
using result = boost::system::result<T, E>;

/// Awaits `aw` and returns its value or the error it threw.
///
/// A `boost::system::system_error` (including `keel::failure`) becomes its code. Any other
/// exception (for example `std::bad_alloc`) is not a failure keel can describe with a code and is
/// rethrown.
/// @param aw the awaitable to run; it is awaited exactly once.
/// @returns the value, or the error code of the failure.
template <class T, class Executor>
boost::asio::awaitable<result<T>, Executor> try_await(boost::asio::awaitable<T, Executor> aw) {
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(aw);
      co_return result<T>{};
    } else {
      co_return result<T>{boost::system::in_place_value, co_await std::move(aw)};
    }
  } catch (const boost::system::system_error& e) {
    co_return result<T>{boost::system::in_place_error, e.code()};
  }
}

/// Awaits `aw` and returns its value or the exception it threw, with every detail kept.
/// @param aw the awaitable to run; it is awaited exactly once.
/// @returns the value, or a pointer to the exception (never null on error).
template <class T, class Executor>
boost::asio::awaitable<result<T, std::exception_ptr>, Executor> try_await_ptr(
    boost::asio::awaitable<T, Executor> aw) {
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(aw);
      co_return result<T, std::exception_ptr>{};
    } else {
      co_return result<T, std::exception_ptr>{boost::system::in_place_value,
                                              co_await std::move(aw)};
    }
  } catch (...) {
    co_return result<T, std::exception_ptr>{boost::system::in_place_error,
                                            std::current_exception()};
  }
}

}  // namespace keel
