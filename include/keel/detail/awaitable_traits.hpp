// Private: what an operation factory returns, and helpers shared by the combinators.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <optional>
#include <type_traits>
#include <utility>

namespace keel::detail {

template <class A>
struct awaitable_traits {
  static constexpr bool is_awaitable = false;
};
template <class T, class Executor>
struct awaitable_traits<boost::asio::awaitable<T, Executor>> {
  static constexpr bool is_awaitable = true;
  using value_type = T;
  using executor_type = Executor;
};

/// The awaitable type a factory returns.
template <class MakeOp>
using op_awaitable_t = std::invoke_result_t<MakeOp&>;

/// The value type of the awaitable a factory returns.
template <class MakeOp>
using op_value_t = typename awaitable_traits<op_awaitable_t<MakeOp>>::value_type;

/// Checked at every combinator: a factory must return a fresh boost::asio::awaitable<T>.
template <class MakeOp>
inline constexpr bool is_op_factory_v =
    std::is_invocable_v<MakeOp&>&& awaitable_traits<std::invoke_result_t<MakeOp&>>::is_awaitable&&
        std::is_same_v<typename awaitable_traits<std::invoke_result_t<MakeOp&>>::executor_type,
                       boost::asio::any_io_executor>;

}  // namespace keel::detail
