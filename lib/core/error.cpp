// keel's error categories, the failure exception and the default classifier.
#include <keel/classify.hpp>
#include <keel/error.hpp>

#include <boost/asio/error.hpp>

#include <boost/system/errc.hpp>
#include <new>

#include <system_error>

namespace keel {
namespace {

class error_category_impl final : public boost::system::error_category {
 public:
  // A fixed id makes codes from different shared objects compare equal.
  constexpr error_category_impl() noexcept : error_category(0x6b65656c5f657272ULL) {}
  const char* name() const noexcept override { return "keel"; }
  std::string message(int ev) const override {
    switch (static_cast<error>(ev)) {
      case error::retries_exhausted:
        return "retries exhausted";
      case error::deadline_exceeded:
        return "deadline exceeded";
      case error::circuit_open:
        return "circuit breaker is open";
      case error::throttled:
        return "throttled";
      case error::budget_exhausted:
        return "retry budget exhausted";
      case error::queue_full:
        return "queue is full";
      case error::queue_timeout:
        return "timed out waiting in queue";
      case error::all_fallbacks_failed:
        return "all fallbacks failed";
      case error::stream_interrupted:
        return "stream interrupted after its first delta";
    }
    return "unknown keel error";
  }
  boost::system::error_condition default_error_condition(int ev) const noexcept override {
    switch (static_cast<error>(ev)) {
      case error::deadline_exceeded:
        return condition::timeout;
      case error::circuit_open:
      case error::throttled:
      case error::queue_full:
      case error::queue_timeout:
        return condition::throttled;
      case error::retries_exhausted:
      case error::budget_exhausted:
      case error::all_fallbacks_failed:
      case error::stream_interrupted:
        return condition::permanent;
    }
    return condition::permanent;
  }
};

class condition_category_impl final : public boost::system::error_category {
 public:
  constexpr condition_category_impl() noexcept : error_category(0x6b65656c5f636f6eULL) {}
  const char* name() const noexcept override { return "keel.condition"; }
  std::string message(int ev) const override {
    switch (static_cast<condition>(ev)) {
      case condition::transient:
        return "transient failure";
      case condition::throttled:
        return "throttled";
      case condition::timeout:
        return "timeout";
      case condition::permanent:
        return "permanent failure";
      case condition::cancelled:
        return "cancelled";
    }
    return "unknown condition";
  }
  bool equivalent(const boost::system::error_code& code, int cond) const noexcept override {
    return static_cast<int>(condition_of(code)) == cond;
  }
};

const error_category_impl error_category_instance;
const condition_category_impl condition_category_instance;

}  // namespace

const boost::system::error_category& error_category() noexcept {
  return error_category_instance;
}
const boost::system::error_category& condition_category() noexcept {
  return condition_category_instance;
}

condition condition_of(const boost::system::error_code& ec) noexcept {
  namespace ae = boost::asio::error;
  if (!ec) {
    return condition::permanent;
  }
  // A category that maps its codes onto keel conditions (keel's own, a provider's) decides.
  const auto def = ec.category().default_error_condition(ec.value());
  if (def.category() == condition_category_instance) {
    return static_cast<condition>(def.value());
  }
  // Compare through error conditions (`ec == errc::...`), not codes: that matches the system,
  // generic and wrapped std::error_code categories alike.
  using boost::system::errc::errc_t;
  if (ec == ae::operation_aborted || ec == errc_t::operation_canceled) {
    return condition::cancelled;
  }
  if (ec == errc_t::timed_out) {
    return condition::timeout;
  }
  static constexpr errc_t transient_errors[] = {
      errc_t::connection_reset,   errc_t::connection_refused,
      errc_t::connection_aborted, errc_t::broken_pipe,
      errc_t::host_unreachable,   errc_t::network_unreachable,
      errc_t::network_down,       errc_t::network_reset,
      errc_t::not_connected,      errc_t::resource_unavailable_try_again};
  for (errc_t e : transient_errors) {
    if (ec == e) {
      return condition::transient;
    }
  }
  if (ec == ae::eof || ec == ae::host_not_found_try_again || ec == ae::shut_down) {
    return condition::transient;
  }
  return condition::permanent;
}

failure::failure(boost::system::error_code ec, const std::string& what,
                 std::vector<std::exception_ptr> causes,
                 std::optional<std::chrono::nanoseconds> retry_after)
    : boost::system::system_error(ec, what),
      what_(what.empty() ? ec.message() : what),
      causes_(std::move(causes)),
      retry_after_(retry_after) {}

std::string describe(const std::exception_ptr& ep) {
  if (!ep) {
    return "no error";
  }
  try {
    std::rethrow_exception(ep);
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "unknown exception";
  }
}

void throw_failure(error e, std::exception_ptr cause, int attempts) {
  std::string what = make_error_code(e).message();
  if (attempts > 0) {
    what += " after " + std::to_string(attempts) + (attempts == 1 ? " attempt" : " attempts");
  }
  std::vector<std::exception_ptr> causes;
  if (cause) {
    what += ": ";
    what += describe(cause);
    causes.push_back(std::move(cause));
  }
  failure f(e, what, std::move(causes));
  f.set_attempts(attempts);
  throw f;
}

std::string_view to_string(error e) noexcept {
  switch (e) {
    case error::retries_exhausted:
      return "retries_exhausted";
    case error::deadline_exceeded:
      return "deadline_exceeded";
    case error::circuit_open:
      return "circuit_open";
    case error::throttled:
      return "throttled";
    case error::budget_exhausted:
      return "budget_exhausted";
    case error::queue_full:
      return "queue_full";
    case error::queue_timeout:
      return "queue_timeout";
    case error::all_fallbacks_failed:
      return "all_fallbacks_failed";
    case error::stream_interrupted:
      return "stream_interrupted";
  }
  return "unknown";
}

namespace {
constexpr std::string_view condition_names[] = {"transient", "throttled", "timeout", "permanent",
                                                "cancelled"};
}  // namespace

std::string_view to_string(condition c) noexcept {
  const int i = static_cast<int>(c) - 1;
  return i >= 0 && i < 5 ? condition_names[i] : std::string_view("unknown");
}

std::optional<condition> parse_condition(std::string_view name) noexcept {
  for (int i = 0; i < 5; ++i) {
    if (condition_names[i] == name) {
      return static_cast<condition>(i + 1);
    }
  }
  return std::nullopt;
}

decided_by deciding_cause(const std::exception_ptr& ep) {
  decided_by out{ep, std::nullopt};
  for (int depth = 0; out.error && depth < 64; ++depth) {
    try {
      std::rethrow_exception(out.error);
    } catch (const failure& f) {
      const auto& ec = f.code();
      if (ec.category() != error_category() || f.causes().empty()) {
        return out;
      }
      const auto k = static_cast<error>(ec.value());
      if (k != error::retries_exhausted && k != error::budget_exhausted &&
          k != error::all_fallbacks_failed) {
        return out;
      }
      out.gave_up = k;  // the innermost wrapper wins: why the last entry gave up
      out.error = f.causes().back();
    } catch (...) {
      return out;
    }
  }
  return out;
}

std::exception_ptr root_cause(std::exception_ptr ep) {
  return deciding_cause(ep).error;
}

classification classify(const boost::system::error_code& ec) noexcept {
  return {condition_of(ec), std::nullopt, ec};
}

classification classify(const std::exception_ptr& ep) noexcept {
  if (!ep) {
    return {};
  }
  try {
    std::rethrow_exception(ep);
  } catch (const failure& f) {
    // A wrapper that stands for its cause ("gave up after N attempts of X") is classified as X,
    // so that an outer layer (fallback, breaker) reacts to what actually happened.
    if ((f.code() == error::retries_exhausted || f.code() == error::budget_exhausted) &&
        !f.causes().empty()) {
      classification c = classify(f.causes().back());
      c.code = f.code();
      return c;
    }
    return {condition_of(f.code()), f.retry_after(), f.code()};
  } catch (const boost::system::system_error& e) {
    return classify(e.code());
  } catch (const std::system_error& e) {
    const boost::system::error_code ec(e.code());
    return classify(ec);
  } catch (...) {
    return {};
  }
}

}  // namespace keel
