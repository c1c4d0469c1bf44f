// Private: an executor wrapper that carries the enclosing deadline to everything run under it.
#pragma once

// Why an executor: Asio coroutines have no coroutine-local storage, but every coroutine can read
// its executor (`co_await this_coro::executor`) without suspending, and everything awaited or
// spawned inside a coroutine thread inherits that executor. `with_deadline` runs its operation on
// `deadline_executor{inner, deadline}`; `with_retry`, `with_fallback` and `keel::deadline_of` look
// the deadline up with `any_io_executor::target<>()`. The wrapper forwards every property, query
// and `execute` to the inner executor, so I/O objects created under a deadline behave exactly as
// they would on the inner executor.
//
// Cost: for an io_context executor (8 bytes) the wrapper is 16 bytes, which fits the small-object
// buffer of `any_io_executor`: no allocation. Other inner executors are kept type-erased as an
// `any_io_executor`, which allocates once per `with_deadline`.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/execution.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/query.hpp>
#include <boost/asio/require.hpp>

#include <optional>
#include <type_traits>
#include <utility>

namespace keel::detail {

template <class Inner, class Clock>
class deadline_executor {
 public:
  using time_point = typename Clock::time_point;

  deadline_executor(Inner inner, time_point deadline) noexcept
      : inner_(std::move(inner)), deadline_(deadline) {}

  deadline_executor(const deadline_executor&) noexcept = default;
  deadline_executor(deadline_executor&&) noexcept = default;
  deadline_executor& operator=(const deadline_executor&) noexcept = default;
  deadline_executor& operator=(deadline_executor&&) noexcept = default;

  const Inner& inner() const noexcept { return inner_; }
  time_point deadline() const noexcept { return deadline_; }

  template <class Property>
  requires boost::asio::can_query<const Inner&, Property>::value decltype(auto) query(
      const Property& p) const
      noexcept(boost::asio::is_nothrow_query<const Inner&, Property>::value) {
    return boost::asio::query(inner_, p);
  }

  template <class Property>
  requires boost::asio::can_require<const Inner&, Property>::value auto require(const Property& p)
      const noexcept(boost::asio::is_nothrow_require<const Inner&, Property>::value) {
    using result = std::decay_t<decltype(boost::asio::require(inner_, p))>;
    return deadline_executor<result, Clock>(boost::asio::require(inner_, p), deadline_);
  }

  template <class Property>
  requires boost::asio::can_prefer<const Inner&, Property>::value auto prefer(const Property& p)
      const noexcept(boost::asio::is_nothrow_prefer<const Inner&, Property>::value) {
    using result = std::decay_t<decltype(boost::asio::prefer(inner_, p))>;
    return deadline_executor<result, Clock>(boost::asio::prefer(inner_, p), deadline_);
  }

  template <class Function>
  void execute(Function&& f) const {
    boost::asio::execution::execute(inner_, std::forward<Function>(f));
  }

  friend bool operator==(const deadline_executor& a, const deadline_executor& b) noexcept {
    return a.inner_ == b.inner_ && a.deadline_ == b.deadline_;
  }
  friend bool operator!=(const deadline_executor& a, const deadline_executor& b) noexcept {
    return !(a == b);
  }

 private:
  Inner inner_;
  time_point deadline_;
};

using io_executor = boost::asio::io_context::executor_type;

/// The deadline carried by `ex`, if it is a deadline executor on `Clock`.
template <class Clock>
std::optional<typename Clock::time_point> deadline_of(
    const boost::asio::any_io_executor& ex) noexcept {
  if (auto* d = ex.target<deadline_executor<io_executor, Clock>>()) {
    return d->deadline();
  }
  if (auto* d = ex.target<deadline_executor<boost::asio::any_io_executor, Clock>>()) {
    return d->deadline();
  }
  return std::nullopt;
}

/// `ex` with its deadline (if any) replaced by `deadline`.
template <class Clock>
boost::asio::any_io_executor with_deadline_executor(const boost::asio::any_io_executor& ex,
                                                    typename Clock::time_point deadline) {
  if (auto* d = ex.target<deadline_executor<io_executor, Clock>>()) {
    return deadline_executor<io_executor, Clock>(d->inner(), deadline);
  }
  if (auto* d = ex.target<deadline_executor<boost::asio::any_io_executor, Clock>>()) {
    return deadline_executor<boost::asio::any_io_executor, Clock>(d->inner(), deadline);
  }
  if (auto* io = ex.target<io_executor>()) {
    return deadline_executor<io_executor, Clock>(*io, deadline);
  }
  return deadline_executor<boost::asio::any_io_executor, Clock>(ex, deadline);
}

/// `ex` without a deadline on `Clock`.
template <class Clock>
boost::asio::any_io_executor strip_deadline(const boost::asio::any_io_executor& ex) {
  if (auto* d = ex.target<deadline_executor<io_executor, Clock>>()) {
    return d->inner();
  }
  if (auto* d = ex.target<deadline_executor<boost::asio::any_io_executor, Clock>>()) {
    return d->inner();
  }
  return ex;
}

}  // namespace keel::detail
