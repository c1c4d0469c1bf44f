// keel::aws::with_retry: run any awaitable operation under an AWS SDK retry mode (botocore).
#pragma once

// Overview
// --------
// `co_await keel::aws::with_retry(op, strategy, opts)` runs the factory `op()` with exactly
// botocore's per-attempt state machine for the strategy's retry mode (sections refer to
// `reference/aws-retry-modes.md`):
//
// | step                         | legacy (§6)                 | standard, adaptive (§2–§5)   |
// | ---------------------------- | --------------------------- | ---------------------------- |
// | before every send            | –                           | adaptive: wait for limiter   |
// | 1. attempt cap, first        | `n < total_max_attempts`    | same                         |
// | 2. retryable                 | socket error; 500, 502, 503 | transport error; 500, 502,   |
// |                              | 504, 509, 429; 400 + a      | 503, 504; transient or       |
// |                              | throttling code             | throttling code (not a bare  |
// |                              |                             | 429)                         |
// | 3. quota                     | none                        | 2.0: 5, 10 after a timeout;  |
// |                              |                             | 2.1: 14, 5 if throttling     |
// | 4. backoff                   | `rand·2^(n−1)`, no cap      | 2.0: `rand·min(2^(n−1),20)`  |
// |                              |                             | 2.1: scaled, amz retry-after |
// | on success                   | –                           | give back the last retry's   |
// |                              |                             | cost, or 1                   |
//
// In adaptive mode the client-side rate limiter is asked before **every** send (retries
// included) and told after every attempt outcome (a success is a non-throttling response).
// When the call gives up (attempt cap, not retryable, quota empty, no time left) the attempt's
// **original** exception is rethrown unchanged, as botocore does; keel's `retries_exhausted`
// wrapper is not used. `aws_retry_options::on_give_up` tells the caller which of those it was.
//
// What the algorithm needs to know about a failed attempt (HTTP status, AWS error code,
// transport failure, timeout, x-amz-retry-after) is an `attempt_facts`, read from the exception
// by a `fact_extractor`. `default_attempt_facts` knows only keel's conditions (cancellation,
// circuit breaker, timeouts, network errors); for LLM provider calls use
// `keel::llm::aws_attempt_facts` (keel/llm/aws_facts.hpp), which maps `provider_error` of every
// provider (Bedrock, OpenAI, Anthropic) onto AWS statuses and codes.
//
// Example:
//
//     // One strategy per client, shared by all its calls.
//     auto cfg = keel::aws::resolve_retry_config(client_cfg, env.mode, env.max_attempts,
//                                                std::nullopt, std::nullopt, env.new_retries_2026);
//     keel::aws::retry_strategy strategy{cfg, keel::aws::now_seconds()};  // 2.1 if the env says
//     keel::aws::aws_retry_options opts;
//     opts.facts = keel::llm::aws_attempt_facts;
//     opts.on_retry = [](const keel::retry_event& e) { log_warning(e); };
//     auto reply = co_await keel::aws::with_retry([&] { return send_converse(req); }, strategy,
//                                                 opts);
//
// Cancellation: cancellation is checked first after every attempt and is never retried nor
// recorded in the quota or the limiter; cancelling the caller during an attempt cancels that
// attempt, and during a backoff or rate-limit sleep ends the call at once with
// `operation_aborted`. An enclosing `keel::with_deadline` is honoured: a backoff sleep (or, before
// a retry, a rate-limit wait) that would end at or after its deadline is not started, and the
// original error is rethrown at once.
//
// Thread safety: a `retry_strategy` may be shared by concurrent calls on any threads (the quota
// is lock-free, the adaptive limiter has a mutex); each `with_retry` call is independent and
// runs its hooks on the caller's executor.

#include <keel/aws/adaptive.hpp>
#include <keel/aws/backoff.hpp>
#include <keel/aws/classification.hpp>
#include <keel/aws/config.hpp>
#include <keel/aws/retry_quota.hpp>
#include <keel/classify.hpp>
#include <keel/clock.hpp>
#include <keel/detail/awaitable_traits.hpp>
#include <keel/detail/deadline_executor.hpp>
#include <keel/error.hpp>
#include <keel/random.hpp>
#include <keel/retry.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace keel::aws {

/// What the AWS retry algorithm needs to know about one failed attempt.
struct attempt_facts {
  /// The HTTP status of the error response, or 0 if there was none.
  int status = 0;
  /// The parsed AWS error code (`Error.Code`, e.g. "ThrottlingException"); empty if none.
  std::string code;
  /// The attempt failed in transport (botocore's ConnectionError / HTTPClientError family:
  /// refused, reset, closed, SSL, proxy, a broken response stream, an unparsable response).
  /// Standard and adaptive modes retry every transport error.
  bool transport_error = false;
  /// The transport error is one of botocore's *socket errors*, the only exceptions legacy mode
  /// retries: connect or read timeout, endpoint connection failure (refused, unreachable, name
  /// resolution), proxy, SSL, or a connection closed before the response began. A response
  /// that broke off mid-stream (`ResponseStreamingError`) or any other HTTP-client failure
  /// (`HTTPClientError`, e.g. a malformed response) is a transport error but not a socket error.
  bool socket_error = false;
  /// The attempt hit a connect or read timeout (costs 10 at 2.0; a socket error in legacy mode).
  bool timeout = false;
  /// The raw `x-amz-retry-after` header (integer milliseconds), if the response had one.
  std::optional<std::string> amz_retry_after;
};

/// Reads an attempt's facts from its exception. Returning `std::nullopt` means "not an attempt
/// outcome" (cancellation, an open circuit breaker): `with_retry` rethrows it at once, retries
/// nothing and records nothing in the quota or the limiter.
using fact_extractor = std::function<std::optional<attempt_facts>(const std::exception_ptr&)>;

namespace detail {

// keel::http's `protocol_error` (the peer sent something that is not HTTP/1.1) and
// `truncated_response` (the peer closed mid-response) are botocore's HTTPClientError and
// ResponseStreamingError: transport errors, but not socket errors. keel::aws does not link
// keel::http, so the category is recognised by its name; the values are part of keel::http's
// public enum (`keel/http/error.hpp`) and must stay in step with it.
inline bool is_http_response_error(const boost::system::error_code& ec) noexcept {
  constexpr int protocol_error = 7;      // keel::http::error::protocol_error
  constexpr int truncated_response = 9;  // keel::http::error::truncated_response
  return std::string_view(ec.category().name()) == "keel.http" &&
         (ec.value() == protocol_error || ec.value() == truncated_response);
}

// keel::http's `tls_verification_failed` and `tls_error`: botocore's `SSLError`, which is a
// `ConnectionError`, so both legacy and standard mode retry it (a certificate that does not
// verify too: the retries cost time, never a wrong answer). keel's own classification calls
// them permanent; only the AWS modes retry them, to behave as botocore does.
inline bool is_http_tls_error(const boost::system::error_code& ec) noexcept {
  constexpr int tls_verification_failed = 10;  // keel::http::error::tls_verification_failed
  constexpr int tls_error = 11;                // keel::http::error::tls_error
  return std::string_view(ec.category().name()) == "keel.http" &&
         (ec.value() == tls_verification_failed || ec.value() == tls_error);
}

}  // namespace detail

/// The default fact extractor, built on `keel::classify`: cancellation and
/// `keel::error::circuit_open` are not attempt outcomes (nullopt); condition `timeout` (a
/// timed-out socket, a per-attempt `with_deadline`) is a transport timeout and a socket error;
/// condition `transient` from a system, Asio or transport error code (any category but keel's
/// own) is a transport error, and a socket error too unless it is keel::http's `protocol_error`
/// or `truncated_response` (a malformed or broken-off response, which legacy mode does not
/// retry); keel::http's TLS failures (`tls_verification_failed`, `tls_error`), permanent for
/// keel, are transport and socket errors here, as botocore's `SSLError` is a `ConnectionError`
/// that every mode retries; anything else is a failure with status 0 and no code, which neither
/// standard nor legacy mode retries.
///
/// It knows no HTTP statuses: for LLM provider errors use `keel::llm::aws_attempt_facts`.
/// @param ep the attempt's exception (null gives a failure with status 0).
/// @return the facts, or nullopt if the exception is not an attempt outcome.
inline std::optional<attempt_facts> default_attempt_facts(const std::exception_ptr& ep) {
  const keel::classification c = keel::classify(ep);
  if (c.condition == keel::condition::cancelled || c.code == keel::error::circuit_open) {
    return std::nullopt;
  }
  attempt_facts facts;
  if (c.condition == keel::condition::timeout) {
    facts.transport_error = true;
    facts.socket_error = true;
    facts.timeout = true;
  } else if (c.condition == keel::condition::transient && c.code &&
             c.code.category() != keel::error_category()) {
    facts.transport_error = true;
    facts.socket_error = !detail::is_http_response_error(c.code);
  } else if (detail::is_http_tls_error(c.code)) {
    facts.transport_error = true;
    facts.socket_error = true;
  }
  return facts;
}

/// `Clock::now()` as seconds since the clock's epoch: the time scale `with_retry<Clock>` gives
/// the adaptive limiter, so construct a `retry_strategy` with `now_seconds<Clock>()`.
template <class Clock = keel::default_clock>
double now_seconds() noexcept {
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

/// The constants the AWS SDKs let a client change, and the adaptive limiter's injectable parts.
/// Every default is botocore's, so a default-constructed `retry_tuning` changes nothing.
struct retry_tuning {
  /// The retry quota's initial (and maximum) amount (standard and adaptive modes).
  int initial_quota = retry_quota::default_capacity;
  /// The cap on the standard modes' computed backoff, in seconds (2.0 and 2.1; legacy has none).
  double max_backoff = max_backoff_seconds;
  /// The adaptive limiter's β, minimum fill rate and optional replacement rate calculator.
  adaptive_options adaptive;
  /// The time in seconds the adaptive limiter reads (botocore's injectable `clock`); empty:
  /// `now_seconds<Clock>()` of the `with_retry` call. Sleeps still run on `Clock`'s timers, so
  /// give a clock on the same scale as `Clock` (or one a test advances in step with it).
  std::function<double()> limiter_clock;

  /// botocore's defaults.
  retry_tuning() = default;
};

/// One client's AWS retry state: its mode, attempt cap, revision, retry quota (standard and
/// adaptive) and client-side rate limiter (adaptive), shared by all the client's calls.
///
/// Thread safety: safe to use from any thread and by any number of concurrent `with_retry`
/// calls (the quota is atomic, the adaptive limiter has a mutex). Not copyable or movable; it
/// must outlive every call that uses it.
class retry_strategy {
 public:
  /// Creates the state for a client.
  /// @param config the resolved mode and total max attempts (values below 1 are treated as 1).
  /// @param revision the standard algorithm's revision (ignored by legacy mode).
  /// @param now the current time in seconds on the clock `with_retry` will use
  ///   (`now_seconds<Clock>()`); starts the adaptive limiter's clocks (the injected
  ///   `retry_tuning::limiter_clock` instead, when given).
  /// @param tuning the SDK constants and injected limiter parts (botocore's by default).
  retry_strategy(resolved_retry_config config, retry_revision revision, double now,
                 retry_tuning tuning = {})
      : mode_(config.mode),
        total_max_attempts_(std::max(config.total_max_attempts, 1)),
        revision_(revision),
        max_backoff_(tuning.max_backoff),
        limiter_clock_(std::move(tuning.limiter_clock)) {
    if (mode_ != retry_mode::legacy) {
      quota_.emplace(tuning.initial_quota);
    }
    if (mode_ == retry_mode::adaptive) {
      limiter_.emplace(limiter_clock_ ? limiter_clock_() : now, std::move(tuning.adaptive));
    }
  }

  /// Creates the state for a client with the revision the configuration resolved
  /// (`AWS_NEW_RETRIES_2026`).
  /// @param config the resolved mode, total max attempts and revision.
  /// @param now the current time in seconds on the clock `with_retry` will use.
  /// @param tuning the SDK constants and injected limiter parts (botocore's by default).
  retry_strategy(resolved_retry_config config, double now, retry_tuning tuning = {})
      : retry_strategy(config, config.revision, now, std::move(tuning)) {}

  retry_strategy(const retry_strategy&) = delete;
  retry_strategy& operator=(const retry_strategy&) = delete;

  /// The retry mode.
  retry_mode mode() const noexcept { return mode_; }

  /// The maximum number of attempts per call, including the first (at least 1).
  int total_max_attempts() const noexcept { return total_max_attempts_; }

  /// The standard algorithm's revision.
  retry_revision revision() const noexcept { return revision_; }

  /// The quota costs of the revision (2.0 or 2.1).
  quota_costs costs() const noexcept {
    return revision_ == retry_revision::v2_1 ? quota_costs::v2_1() : quota_costs::v2_0();
  }

  /// The cap on the standard modes' computed backoff, in seconds (20 unless tuned).
  double max_backoff() const noexcept { return max_backoff_; }

  /// The time the adaptive limiter reads, in seconds: the injected clock, or `fallback` when
  /// none was given.
  /// @param fallback the caller's clock reading (`now_seconds<Clock>()`).
  double limiter_now(double fallback) const { return limiter_clock_ ? limiter_clock_() : fallback; }

  /// The client's retry quota (500 at start unless tuned); null in legacy mode.
  retry_quota* quota() noexcept { return quota_ ? &*quota_ : nullptr; }
  /// The client's retry quota (500 at start); null in legacy mode.
  const retry_quota* quota() const noexcept { return quota_ ? &*quota_ : nullptr; }

  /// The client-side rate limiter; null unless the mode is adaptive.
  adaptive_rate_limiter* limiter() noexcept { return limiter_ ? &*limiter_ : nullptr; }
  /// The client-side rate limiter; null unless the mode is adaptive.
  const adaptive_rate_limiter* limiter() const noexcept { return limiter_ ? &*limiter_ : nullptr; }

 private:
  retry_mode mode_;
  int total_max_attempts_;
  retry_revision revision_;
  double max_backoff_;
  std::function<double()> limiter_clock_;
  std::optional<retry_quota> quota_;
  std::optional<adaptive_rate_limiter> limiter_;
};

/// Why `keel::aws::with_retry` gave up and rethrew an attempt's error.
enum class give_up_reason {
  /// The attempt cap (`total_max_attempts`) was reached.
  attempts_exhausted,
  /// The mode does not retry this error.
  not_retryable,
  /// The retry quota (standard and adaptive modes) refused the retry's cost.
  quota_exhausted,
  /// The next sleep would end at or after the enclosing deadline.
  no_time_left,
};

/// The per-call options of `keel::aws::with_retry`: how to read failures, randomness and hooks.
///
/// A value type; hooks are `std::function`s, so keep their captures small.
struct aws_retry_options {
  /// Reads an attempt's facts from its exception; `default_attempt_facts` when empty.
  fact_extractor facts;
  /// A uniform draw on [0, 1) for the backoff jitter;
  /// `keel::random_source::thread_default().uniform()` when empty. Return 1 to pin the jitter.
  std::function<double()> rand;
  /// Called before every backoff sleep (log retries at WARNING here). `from_server_hint` is true
  /// when x-amz-retry-after (2.1) lengthened the delay.
  std::function<void(const keel::retry_event&)> on_retry;
  /// Called when the adaptive limiter delays a send, with the wait, before sleeping it.
  std::function<void(std::chrono::nanoseconds)> on_rate_limit_wait;
  /// Called once when the call gives up on an attempt's error, with the reason, just before
  /// that error is rethrown (not for cancellation, nor for an error the extractor says is not
  /// an attempt outcome). The error itself stays unchanged, as botocore's does; this is how a
  /// caller tells "attempts used up" from "quota empty" for its own reporting.
  std::function<void(give_up_reason)> on_give_up;

  /// No hooks: default facts, per-thread randomness.
  aws_retry_options() = default;
};

namespace detail {

// Seconds (double) to nanoseconds without overflow. Backoff delays round to nearest (0.3 s is
// reported as 300 ms, not 299.999999 ms); limiter waits round up and last at least 1 ns, so a
// waiter never wakes a hair early and loops on a zero-length timer.
inline std::chrono::nanoseconds to_nanoseconds(double seconds, bool round_up) noexcept {
  using ns = std::chrono::nanoseconds;
  if (!(seconds > 0)) {
    return ns::zero();
  }
  const double count = seconds * 1e9;
  if (count >= static_cast<double>(ns::max().count())) {
    return ns::max();
  }
  const auto n = static_cast<ns::rep>(round_up ? std::ceil(count) : std::round(count));
  return ns(round_up ? std::max<ns::rep>(n, 1) : n);
}

// §2 (standard / adaptive) or §6 (legacy), before the attempt cap.
inline bool aws_retryable(retry_mode mode, const attempt_facts& f) noexcept {
  if (mode == retry_mode::legacy) {
    // Only botocore's socket-error family; a broken response stream or another HTTP-client
    // error propagates at once (§6).
    return legacy_retryable(f.status, f.code, f.socket_error || f.timeout);
  }
  return standard_retryable(f.status, f.code, f.transport_error, f.timeout);
}

// §3.1 / §6: the backoff in seconds before the attempt after `attempt`; `from_hint` is set when
// x-amz-retry-after (2.1 only) lengthened it.
inline double aws_backoff(const retry_strategy& s, const attempt_facts& f, bool is_throttling,
                          double rand, int attempt, bool& from_hint) noexcept {
  from_hint = false;
  if (s.mode() == retry_mode::legacy) {
    return legacy_delay(rand, attempt);
  }
  if (s.revision() == retry_revision::v2_0) {
    return standard_delay_v2_0(rand, attempt, s.max_backoff());
  }
  const double t = standard_delay_v2_1(rand, attempt, is_throttling, false, s.max_backoff());
  std::optional<std::string_view> header;
  if (f.amz_retry_after) {
    header = *f.amz_retry_after;
  }
  const double delay = apply_retry_after(t, header);
  from_hint = delay > t;
  return delay;
}

}  // namespace detail

/// Runs `op()` under the strategy's AWS retry mode until it succeeds or botocore would give up.
///
/// @param op a callable returning a fresh `awaitable<T>` per attempt; taken by value.
/// @param s the client's strategy (mode, cap, quota, limiter); must outlive the call.
/// @param opts the fact extractor, jitter source and hooks.
/// @returns the first successful attempt's value (a success counts as a 2xx response: the quota
///   gets back the last retry's cost, or 1).
/// @throws the last attempt's original exception, unchanged, when the call gives up (attempt cap,
///   not retryable, quota empty, or the next sleep would end past the enclosing deadline);
///   immediately, whatever the extractor says is not an attempt outcome; `operation_aborted` when
///   cancelled.
/// Cancellation: never retried or recorded; a backoff or rate-limit sleep is cut short at once.
template <class Clock = keel::default_clock, class MakeOp>
requires keel::detail::is_op_factory_v<MakeOp>
auto with_retry(MakeOp op, retry_strategy& s, aws_retry_options opts = {})
    -> boost::asio::awaitable<keel::detail::op_value_t<MakeOp>> {
  namespace asio = boost::asio;
  using T = keel::detail::op_value_t<MakeOp>;
  using clock_duration = typename Clock::duration;

  auto cs = co_await asio::this_coro::cancellation_state;
  auto ex = co_await asio::this_coro::executor;
  // The enclosing with_deadline's deadline (what `keel::current_deadline<Clock>()` reports); the
  // executor is fixed for the whole call, so it is too.
  const std::optional<typename Clock::time_point> deadline = keel::detail::deadline_of<Clock>(ex);
  const auto ends_too_late = [&](std::chrono::nanoseconds sleep) {
    return deadline && saturating_add(Clock::now(), sleep) >= *deadline;
  };

  std::optional<basic_timer<Clock>> timer;
  adaptive_rate_limiter* const limiter = s.limiter();
  const auto limiter_now = [&s] { return s.limiter_now(now_seconds<Clock>()); };
  std::optional<standard_call_state> call;
  if (retry_quota* q = s.quota()) {
    call.emplace(*q, s.costs());
  }
  // The previous attempt's error while a retry is on its way (for a give-up before its send).
  std::exception_ptr pending;
  const auto give_up = [&opts](give_up_reason why, const std::exception_ptr& error) {
    if (opts.on_give_up) {
      opts.on_give_up(why);
    }
    std::rethrow_exception(error);
  };

  for (int attempt = 1;; ++attempt) {
    // §5.5: before every send, retries included. The limiter never blocks; it says how long.
    if (limiter) {
      for (double w = limiter->before_send(limiter_now()); w > 0;
           w = limiter->before_send(limiter_now())) {
        const std::chrono::nanoseconds wait = detail::to_nanoseconds(w, /*round_up=*/true);
        if (pending && ends_too_late(wait)) {
          give_up(give_up_reason::no_time_left, pending);
        }
        if (opts.on_rate_limit_wait) {
          opts.on_rate_limit_wait(wait);
        }
        if (!timer) {
          timer.emplace(ex);
        }
        timer->expires_after(saturating_cast<clock_duration>(wait));
        co_await timer->async_wait(asio::use_awaitable);
        if (keel::detail::cancellation_requested(cs)) {
          keel::detail::throw_aborted();
        }
      }
    }

    std::exception_ptr failed;
    try {
      if constexpr (std::is_void_v<T>) {
        co_await op();
      } else {
        T value = co_await op();
        if (limiter) {
          limiter->after_response(false, limiter_now());
        }
        if (call) {
          call->on_call_finished(200);
        }
        co_return value;
      }
    } catch (...) {
      failed = std::current_exception();
    }
    if constexpr (std::is_void_v<T>) {
      if (!failed) {
        if (limiter) {
          limiter->after_response(false, limiter_now());
        }
        if (call) {
          call->on_call_finished(200);
        }
        co_return;
      }
    }

    // Cancellation first, whatever the attempt turned it into: never retried, never recorded.
    if (keel::detail::cancellation_requested(cs)) {
      keel::detail::throw_aborted();
    }
    const std::optional<attempt_facts> facts =
        opts.facts ? opts.facts(failed) : default_attempt_facts(failed);
    if (!facts) {
      std::rethrow_exception(failed);
    }
    const bool throttling = is_throttling_code(facts->code);
    // §5.5: after every response or exception, including the final attempt.
    if (limiter) {
      limiter->after_response(throttling, limiter_now());
    }
    // §3: the attempt cap first, then the classification. A failed call gives back nothing.
    if (attempt >= s.total_max_attempts()) {
      give_up(give_up_reason::attempts_exhausted, failed);
    }
    if (!detail::aws_retryable(s.mode(), *facts)) {
      give_up(give_up_reason::not_retryable, failed);
    }

    const double r = opts.rand ? opts.rand() : keel::random_source::thread_default().uniform();
    bool from_hint = false;
    const std::chrono::nanoseconds delay = detail::to_nanoseconds(
        detail::aws_backoff(s, *facts, throttling, r, attempt, from_hint), /*round_up=*/false);
    // Not enough time left: give up before charging the quota for a retry that cannot happen.
    if (ends_too_late(delay)) {
      give_up(give_up_reason::no_time_left, failed);
    }
    // §4: all or nothing; when refused (RetryQuotaReached) the error is returned, no retry.
    if (call && !call->try_acquire_retry(facts->timeout, throttling)) {
      give_up(give_up_reason::quota_exhausted, failed);
    }

    if (opts.on_retry) {
      opts.on_retry(keel::retry_event{attempt, failed, keel::classify(failed), delay, from_hint});
    }
    if (delay > std::chrono::nanoseconds::zero()) {
      if (!timer) {
        timer.emplace(ex);
      }
      timer->expires_after(saturating_cast<clock_duration>(delay));
      co_await timer->async_wait(asio::use_awaitable);
    }
    if (keel::detail::cancellation_requested(cs)) {
      keel::detail::throw_aborted();
    }
    pending = failed;
  }
}

}  // namespace keel::aws
