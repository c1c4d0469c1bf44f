// Tests for keel/error.hpp and keel/classify.hpp: codes, conditions and the default classifier.
#include <keel/classify.hpp>
#include <keel/error.hpp>

#include <boost/asio/error.hpp>
#include <catch2/catch.hpp>

#include <stdexcept>

using namespace std::chrono_literals;

TEST_CASE("keel errors map to the condition a caller should act on", "[error]") {
  CHECK(make_error_code(keel::error::deadline_exceeded) == keel::condition::timeout);
  CHECK(make_error_code(keel::error::circuit_open) == keel::condition::throttled);
  CHECK(make_error_code(keel::error::queue_full) == keel::condition::throttled);
  CHECK(make_error_code(keel::error::all_fallbacks_failed) == keel::condition::permanent);
  CHECK(make_error_code(keel::error::deadline_exceeded) != keel::condition::transient);
  CHECK(make_error_code(keel::error::retries_exhausted).message() == "retries exhausted");
}

TEST_CASE("Asio network errors are transient and cancellation is cancelled", "[error]") {
  namespace ae = boost::asio::error;
  CHECK(boost::system::error_code(ae::connection_reset) == keel::condition::transient);
  CHECK(boost::system::error_code(ae::connection_refused) == keel::condition::transient);
  CHECK(boost::system::error_code(ae::eof) == keel::condition::transient);
  CHECK(boost::system::error_code(ae::timed_out) == keel::condition::timeout);
  CHECK(boost::system::error_code(ae::operation_aborted) == keel::condition::cancelled);
  CHECK(boost::system::error_code(ae::access_denied) == keel::condition::permanent);
}

TEST_CASE("classify reads the condition and the server hint from a failure", "[error][classify]") {
  auto ep = std::make_exception_ptr(
      keel::failure(keel::error::throttled, "slow down", {}, std::chrono::nanoseconds(2s)));
  auto c = keel::classify(ep);
  CHECK(c.condition == keel::condition::throttled);
  REQUIRE(c.retry_after.has_value());
  CHECK(*c.retry_after == 2s);
  CHECK(c.code == keel::error::throttled);
}

TEST_CASE("classify sees through retries_exhausted to the last cause", "[error][classify]") {
  auto cause = std::make_exception_ptr(
      boost::system::system_error(boost::asio::error::connection_reset, "reset"));
  std::exception_ptr wrapped;
  try {
    keel::throw_failure(keel::error::retries_exhausted, cause, 5);
  } catch (const keel::failure& f) {
    CHECK(f.attempts() == 5);
    CHECK(f.causes().size() == 1);
    CHECK(std::string(f.what()).find("reset") != std::string::npos);
    wrapped = std::current_exception();
  }
  REQUIRE(wrapped);
  auto c = keel::classify(wrapped);
  CHECK(c.condition == keel::condition::transient);
  CHECK(c.code == keel::error::retries_exhausted);
  CHECK(keel::root_cause(wrapped) == cause);
}

TEST_CASE("classify treats unknown exceptions as permanent and null as permanent", "[classify]") {
  CHECK(keel::classify(std::make_exception_ptr(std::runtime_error("x"))).condition ==
        keel::condition::permanent);
  CHECK(keel::classify(std::exception_ptr{}).condition == keel::condition::permanent);
  CHECK(keel::describe(std::make_exception_ptr(std::runtime_error("boom"))) == "boom");
}

TEST_CASE("condition_set holds exactly what was inserted", "[classify]") {
  auto s = keel::condition_set::retryable();
  CHECK(s.contains(keel::condition::throttled));
  CHECK_FALSE(s.contains(keel::condition::permanent));
  s.erase(keel::condition::throttled).insert(keel::condition::permanent);
  CHECK_FALSE(s.contains(keel::condition::throttled));
  CHECK(s.contains(keel::condition::permanent));
  CHECK(keel::is_retryable(keel::condition::timeout));
  CHECK_FALSE(keel::is_retryable(keel::condition::cancelled));
}

TEST_CASE("generic and std error codes classify like system ones", "[error][review]") {
  namespace bs = boost::system;
  CHECK(keel::condition_of(bs::error_code(ECONNRESET, bs::generic_category())) ==
        keel::condition::transient);
  CHECK(keel::condition_of(bs::error_code(std::make_error_code(std::errc::connection_reset))) ==
        keel::condition::transient);
  CHECK(keel::condition_of(bs::error_code(std::make_error_code(std::errc::timed_out))) ==
        keel::condition::timeout);
  CHECK(keel::condition_of(bs::error_code(std::make_error_code(std::errc::operation_canceled))) ==
        keel::condition::cancelled);
  CHECK(keel::classify(std::make_exception_ptr(
                           std::system_error(std::make_error_code(std::errc::connection_refused))))
            .condition == keel::condition::transient);
}

TEST_CASE("keel's error and condition names are one table that reads back", "[error]") {
  CHECK(keel::to_string(keel::error::retries_exhausted) == "retries_exhausted");
  CHECK(keel::to_string(keel::error::all_fallbacks_failed) == "all_fallbacks_failed");
  CHECK(keel::to_string(keel::error::queue_timeout) == "queue_timeout");
  CHECK(keel::to_string(keel::error::stream_interrupted) == "stream_interrupted");
  CHECK(make_error_code(keel::error::stream_interrupted) == keel::condition::permanent);
  for (auto c : {keel::condition::transient, keel::condition::throttled, keel::condition::timeout,
                 keel::condition::permanent, keel::condition::cancelled}) {
    CHECK(keel::parse_condition(keel::to_string(c)) == c);
  }
  CHECK(keel::to_string(keel::condition::throttled) == "throttled");
  CHECK_FALSE(keel::parse_condition("Throttled").has_value());
  CHECK_FALSE(keel::parse_condition("").has_value());
}

TEST_CASE("deciding_cause follows the last cause through every wrapper that gave up", "[error]") {
  const auto first = std::make_exception_ptr(
      boost::system::system_error(boost::asio::error::connection_reset, "primary reset"));
  const auto last = std::make_exception_ptr(
      boost::system::system_error(boost::asio::error::timed_out, "backup timed out"));
  std::exception_ptr retried;
  try {
    keel::throw_failure(keel::error::budget_exhausted, last, 3);
  } catch (...) {
    retried = std::current_exception();
  }
  // Two alternatives: the first failed on its own, the second after its retries stopped.
  const auto both = std::make_exception_ptr(keel::failure(
      keel::make_error_code(keel::error::all_fallbacks_failed), "all failed", {first, retried}));
  const keel::decided_by d = keel::deciding_cause(both);
  CHECK(d.error == last);
  REQUIRE(d.gave_up.has_value());
  CHECK(*d.gave_up == keel::error::budget_exhausted);  // the innermost wrapper
  CHECK(keel::root_cause(both) == last);
  // Anything else stands for itself.
  const keel::decided_by plain = keel::deciding_cause(first);
  CHECK(plain.error == first);
  CHECK_FALSE(plain.gave_up.has_value());
  CHECK(keel::deciding_cause(nullptr).error == nullptr);
}
