// keel::basic_rate_controller: learns a server's rate limit from the outcomes of calls alone and
// paces a shared throttler at it.
#pragma once

// Overview
// --------
// Most servers that rate-limit LLM calls do not say what their limit is: Bedrock, vLLM, most
// OpenAI-compatible servers, API gateways and reverse proxies (nginx `limit_req`) answer `429`
// (with a constant `Retry-After`, or none) and nothing else. A shared pause alone herds: every
// waiting call resumes in the same instant, the server admits its burst and rejects the rest,
// and throughput collapses to burst/Retry-After. A `basic_rate_controller` watches every
// attempt's outcome and sets the rate of one shared `basic_throttler`, so that all the calls
// that share it converge on the rate the server accepts and stay there.
//
// Design (and why)
// ----------------
// The families studied (see docs/core/rate_controller.md for the longer comparison):
//
// - AWS adaptive mode (CUBIC on the measured send rate: x0.7 on a throttle, cubic regrowth)
//   never measures the server's rate; it only backs off from what it sent. Measured against a
//   200 r/s limiter it needed 38 s for a 10 s job: the cut is deep, and the regrowth is scaled
//   in absolute requests/s, so it is slow far from the start and aggressive near it.
// - AIMD/Vegas/Gradient2 (Netflix concurrency-limits) and Envoy's adaptive concurrency steer a
//   *concurrency* limit from latency. A rate limiter's rejections are fast and its latency tells
//   nothing, and 429s are a rate signal, not a queueing one.
// - TCP BBR paces at a *measured delivery rate* and probes above it periodically. That is the
//   model here, with one change that makes the measurement exact for token-bucket limiters
//   (nginx `limit_req` is GCRA, OpenAI and Anthropic refill continuously):
//
// **The estimator: accepted work between two rejections.** A token-bucket limiter rejects only
// when its bucket is empty. Between two rejections (by send time) t1 < t2, while the server
// stays busy, everything it admitted was exactly what it refilled: accepted(t1, t2) = r x (t2 -
// t1), within one request. So r = accepted / span, whatever the burst, the client's concurrency
// or the server's latency; counting *sends* not yet rejected as accepted makes it independent of
// how long successful answers take (LLM answers take seconds, 429s come back at once). The first
// and the latest rejection of an *episode* (rejections without a quiet gap of `quiet` between
// them) give the longest such span, so the estimate sharpens while rejections continue. The
// server may have refilled between rejections while the client sent less than r, so an estimate
// is a lower bound; the controller paces at `(1 - margin)` of it.
//
// Phases of each dimension (requests, and LLM tokens when a 429 says the tokens were the limit):
//
// 1. *Startup* (requests only; no limit known): a ramp. `initial_window` calls may go at once,
//    then calls are granted at a rate that doubles once per round trip (the fastest answer or
//    429 so far), but at least every 100 ms and at most every 25 ms (`startup_doubling`), with
//    or without answers: an LLM answer can take seconds, and waiting for it would cost the
//    first calls that long. Against a burst-limited server the first 429 comes back before
//    more than about one round trip's doubling beyond its burst has gone (answers do not free
//    slots early, so a fast server cannot pull a whole window into the 429s); an unthrottled
//    one is not held back once the ramp exceeds the demand (about 100 ms for 64 calls in
//    flight at 50 ms latency).
// 2. *Search* (after the first 429, before an estimate): pace at the rate accepted over the last
//    second, and double it every `search_doubling` while calls are waiting for the bucket, until
//    an episode yields an estimate. A rejection in search cuts the rate back to the accepted rate.
// 3. *Cruise*: pace at `(1 - margin) x estimate`. After a randomised plateau (`plateau_min` ..
//    `plateau_max`, so that a fleet does not probe in lockstep) with no rejection, *probe*: raise
//    the rate by `probe_step x (2^k - 1)` in round k of `probe_round` (BBRv2's probe-up), while
//    calls wait for the bucket. The next rejection ends the probe and starts an episode whose
//    estimate replaces the old one: up if the limit rose, down if it fell. A limit that halves
//    is re-measured within a few hundred milliseconds of rejections; one that doubles is found
//    within plateau + about 0.7 s.
//    A rejection *at the plateau* lowers the estimate: to the rate the server accepted since the
//    previous rejection when a share of at least `margin` was refused since then (the limit
//    fell), else only by the share refused (a tight bucket, 20 ms of burst at 1000 r/s, refuses
//    an odd bunched send of a plateau below its limit; cutting to the client's own rate each time
//    ratcheted the estimate down). Samples of one episode that under-measure (callers parked by
//    Retry-After leave the server idle) take the margin at most once per episode.
//
// Other signals:
//
// - **Advertised limits** (`x-ratelimit-limit-*`, `anthropic-ratelimit-*-limit`) win: they set
//   the estimate and a ceiling at once (no startup, no probing above them); 429s below them
//   still cut the rate (the key may be shared with other clients).
// - **Configured limits** (`max_requests_per_second`, `max_tokens_per_minute`) are ceilings: the
//   controller starts at them and never paces above them, but 429s still teach it a lower rate.
// - **Retry-After** is a statement about one request, and a constant one (nginx setups send
//   `Retry-After: 1`) says nothing about the rate, so a 429 does not pause the shared bucket:
//   the rejected call waits its own Retry-After (the retry policy's business) while the others
//   continue at the cut rate. Only a *block* pauses everybody: rejections spanning at least
//   `block_span` with nothing accepted between them (a quota window exhausted, an account
//   suspended). The pause lasts the longest Retry-After seen in the block, capped at
//   `max_pause`, and ends at the learned rate, never in a burst (`basic_throttler::pause_until`
//   releases waiters at its rate).
// - **429s that do not depend on the rate** (a shared pool busy with other tenants, a flaky
//   proxy, keel's mock with a `rate_limit` fault) are told apart by the experiment a cut already
//   is: a token-bucket limiter refuses next to nothing once the client sends clearly below what
//   it accepted, random refusals keep their share at any rate. Each 429 that starts a reaction
//   once an estimate exists starts a *trial* that compares the second before it (up to 3 s at a
//   low rate) with the latest 2 s from 0.5 s after it, counting only bins where calls waited for
//   the bucket (both at least 30 calls over 0.4 s). If the window that sent less (below 90% of what
//   the other had accepted, and 5% below the pace before the trial) kept the refused share (half or
//   more, or within two standard errors), the pacing goes back to where it was and probes up at
//   once; the first such verdict sets the dimension's *noise* (the lower window's share). Later
//   429s react only when the calls refused since the latest wave or cut exceed the noise's share
//   by the margin (and three standard deviations plus three calls). The noise fades when the
//   refusals do and never rises after the first verdict (a client slightly above a real limit
//   also sees a small steady share; learning it as noise would let it stay there). A probe whose
//   last round (10 rounds of doubling gain) drew no 429 beyond the noise raises the estimate to
//   what the server accepted over its last 200 ms: without it a server with no limit but random
//   429s would cap the client at that round's gain. Measured: 5% random 429s (`Retry-After` 10 ms),
//   no limit, keel's mock, 20,000 prompts at concurrency 64: 3,578 items/s (before: 28; 14,544
//   without the faults). Finding them takes 2-5 s, once 31 s (docs/BENCHMARKS.md).
// - **Growth is earned by waiting.** Search and probes grow only by the time in which the rate
//   held calls back: the bucket had a queue and no pause (`throttler::total_queued_time`).
//   Time in which nobody waited (every caller sleeping out a `Retry-After`) proves nothing
//   about the server; credited, one idle second doubled search's rate 18 times, and the
//   callers herded into the limit every second (a slow process that sent its whole first
//   window before the first 429 came back).
// - **Stalls.** A process that ran nothing for a while (a loaded machine, a VM's steal time)
//   fires every timer that fell due at once and sends its backlog within a millisecond. A gap of
//   20 ms or more between events in which the rate held calls back for long enough to grant two
//   or more is a stall: growth (ramp, search, probe) takes one step at most after it, and for a
//   second an estimate is capped at 2x what the server accepted over the last second (bunched
//   sends make a sample's span meaningless).
// - Failures that are not 429s (5xx, 529 overloaded, timeouts) are not rate signals: random
//   faults must not lower the rate (the breaker and the retry policy handle them). For the
//   estimator they count as accepted (the limiter let them through), except transport failures
//   without an answer (`on_abandoned`), which count as nothing.
// - **A fleet probes as one.** Processes that share one key (keel/redis/shared_rate.hpp) each
//   learn their share of the limit as above, but only one of them (the leader) probes; the
//   others `follow_probes`: they raise their rates by the leader's probe gain at the same time.
//   Learning alone, each process probed at its own random time, the others drew the 429s of
//   its probe and cut, and the shares walked (4 processes against 200 r/s: 1.25-1.53 attempts
//   per prompt, docs/BENCHMARKS.md). Probing together, a crossing is the fleet's, every process
//   draws its part of the 429s and measures its share again. A fleet member's noise trial is
//   stricter (the lower window must keep half the refused share whatever the sample size, and
//   refuse at most twice the higher's): the other processes fill the limiter too, and a process
//   that cut while they were still above their shares kept part of its 429s.
//
// Example:
//
//     keel::throttler bucket{ex};                      // no configured limit
//     keel::rate_controller pacing{bucket};            // shared by every call to one key
//
//     co_await bucket.acquire({.requests = 1, .tokens = estimate});
//     auto ticket = pacing.on_send({.requests = 1, .tokens = estimate});
//     try {
//       auto reply = co_await keel::llm::complete(http, ep, req);  // <keel/llm/complete.hpp>
//       pacing.on_accepted(ticket);
//     } catch (const keel::llm::provider_error& e) {
//       if (e.code() == keel::llm::errc::rate_limited) {
//         pacing.on_throttled(ticket, keel::llm::limit_of(e), e.retry_after());
//       } else {
//         pacing.on_accepted(ticket);               // the limiter let it through
//       }
//       throw;
//     } catch (...) {
//       pacing.on_abandoned(ticket);                // no answer: transport failure, cancelled
//       throw;
//     }
//
// Time is read from `Clock` on every call; nothing runs in the background (no timer), so an idle
// controller costs nothing, and the phases advance lazily on the next event.
//
// Thread safety: every member may be called concurrently from any thread (one mutex). The
// throttler must outlive the controller.

#include <keel/clock.hpp>
#include <keel/random.hpp>
#include <keel/throttler.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>

namespace keel {

/// Which of a server's limits a throttled answer hit.
enum class limit_kind {
  unknown,   ///< The answer does not say; learned as a request limit.
  requests,  ///< Requests per unit of time.
  tokens,    ///< LLM tokens per unit of time.
};

/// Where a dimension of a `basic_rate_controller` is.
enum class pacing_phase {
  unlimited,  ///< Nothing limits it (tokens before any token 429; requests never start here).
  startup,    ///< No limit known: calls granted at a rate that doubles once per round trip.
  search,     ///< Throttled, no estimate yet: pacing at the accepted rate, doubling it.
  cruise,     ///< Pacing at (1 - margin) x the estimate; probing above it after a plateau.
  probe,      ///< Cruise, raising the rate round by round until the next 429.
  fixed,      ///< Paced at a configured or advertised limit that no 429 has contradicted.
};

/// The name of a phase ("startup", "search", ...).
const char* to_string(pacing_phase p) noexcept;

/// What a controller knows about one dimension now (for logs, metrics and tests).
struct pacing_state {
  /// The phase.
  pacing_phase phase = pacing_phase::unlimited;
  /// The paced rate per second (requests, or tokens); 0 when not limited.
  double rate = 0;
  /// The estimated server limit per second; 0 when none.
  double estimate = 0;
  /// The startup ramp's burst, calls (requests in startup only; it doubles once per round
  /// trip, see `startup_doubling`).
  double window = 0;
  /// Estimates made so far.
  std::uint64_t samples = 0;
  /// Rejections seen so far in this dimension.
  std::uint64_t rejections = 0;
  /// The share of calls the server refuses whatever the rate, as a trial found it (0: none
  /// found). 429s within it are counted, not reacted to.
  double noise = 0;
  /// In `probe`: how far above the plateau's rate the probe is (rate = plateau rate x (1 +
  /// gain)); 0 otherwise.
  double gain = 0;
};

/// Settings of a rate controller. The defaults suit LLM APIs and HTTP rate limiters; every
/// duration is in the controller's clock.
struct rate_controller_options {
  /// Ceiling on the request rate (e.g. a configured requests per minute / 60); 0: none. The
  /// controller starts at it (no startup window) and never paces above it.
  double max_requests_per_second = 0;
  /// Ceiling on the LLM token rate, per minute; 0: none.
  double max_tokens_per_minute = 0;
  /// Calls that may go at once at first, before anything is known (the startup ramp's burst).
  double initial_window = 16;
  /// The startup ramp's rate (and burst) doubles at most this often until the first 429: once
  /// per round trip (the fastest answer so far) within [this, 4 x this], and every 4 x this
  /// before any answer.
  std::chrono::nanoseconds startup_doubling = std::chrono::milliseconds(25);
  /// Pace at (1 - margin) x the estimate, so small estimation errors do not keep hitting 429s.
  double margin = 0.03;
  /// The throttler's burst is this much time at the paced rate (at least one request).
  std::chrono::nanoseconds burst_time = std::chrono::milliseconds(50);
  /// Search doubles the rate this often while calls wait for the bucket.
  std::chrono::nanoseconds search_doubling = std::chrono::milliseconds(50);
  /// An episode of rejections ends after this long without one.
  std::chrono::nanoseconds quiet = std::chrono::milliseconds(250);
  /// Accepted calls (or tokens / the mean token cost) needed between two rejections for an
  /// estimate; fewer are enough once the rejections are a second apart.
  double min_sample = 8;
  /// Shortest plateau after an episode before probing (uniform in [min, max]).
  std::chrono::nanoseconds plateau_min = std::chrono::milliseconds(500);
  /// Longest plateau after an episode before probing.
  std::chrono::nanoseconds plateau_max = std::chrono::milliseconds(1000);
  /// Length of one probe round.
  std::chrono::nanoseconds probe_round = std::chrono::milliseconds(100);
  /// Relative increase of the first probe round; round k adds probe_step x (2^k - 1).
  double probe_step = 0.02;
  /// Rejections with nothing accepted between them over this span are a block.
  std::chrono::nanoseconds block_span = std::chrono::milliseconds(250);
  /// Longest shared pause for a block.
  std::chrono::nanoseconds max_pause = std::chrono::seconds(60);
  /// The request rate never goes below this (requests per second).
  double min_requests_per_second = 0.5;
  /// Randomness for the plateau (null: a per-controller source seeded from std::random_device).
  random_source* random = nullptr;
  /// Called when a dimension's phase, estimate or noise changes (not on every rate step), with both
  /// dimensions' states, outside the controller's lock, on the thread of the call that caused
  /// it. It may read the controller (`requests()`, `tokens()`) and must not throw. Empty:
  /// nobody is told.
  std::function<void(const pacing_state& requests, const pacing_state& tokens)> on_change;
};

namespace detail {
template <class Clock>
class rate_controller_state;
}  // namespace detail

/// Paces a `basic_throttler` at a server's rate limit, learned from the outcomes of calls.
///
/// Construct it on a throttler; it takes over that throttler's rates and bursts (call no
/// `set_rate` or `set_burst` of your own while it runs). For each attempt: after
/// `acquire`, call `on_send`; then exactly one of `on_accepted`, `on_throttled` or
/// `on_abandoned` with the ticket.
///
/// Thread safety: all members may be called concurrently from any thread.
template <class Clock = std::chrono::steady_clock>
class basic_rate_controller {
 public:
  /// The clock.
  using clock_type = Clock;
  /// The clock's duration.
  using duration = typename Clock::duration;
  /// The clock's time point.
  using time_point = typename Clock::time_point;

  /// One send as the controller saw it; pass it back with the outcome.
  struct ticket {
    /// Position of the send (1-based; 0: not a send of this controller).
    std::uint64_t seq = 0;
    /// When it was sent.
    time_point sent{};
    /// Its estimated LLM tokens.
    double tokens = 0;
    /// Estimated LLM tokens of every earlier send.
    double tokens_before = 0;
  };

  /// Takes over `bucket`: sets its rates and bursts for the startup window (or the configured
  /// ceilings).
  /// @param bucket the shared throttler; must outlive the controller.
  /// @param options settings; negative and NaN values count as their defaults' zero.
  explicit basic_rate_controller(basic_throttler<Clock>& bucket,
                                 rate_controller_options options = {});

  /// Leaves the throttler at its current settings.
  ~basic_rate_controller();

  /// Not copyable.
  basic_rate_controller(const basic_rate_controller&) = delete;
  /// Not copyable.
  basic_rate_controller& operator=(const basic_rate_controller&) = delete;

  /// Records a send (call it right after the throttler granted `cost`).
  /// @returns the ticket to pass to the outcome.
  ticket on_send(throttle_cost cost = {});

  /// The server let the call through: a success, or a failure that is not a rate limit (a 5xx,
  /// an overload, a 400).
  void on_accepted(const ticket& t);

  /// The server rejected the call for its rate limit (429, ThrottlingException).
  /// @param kind which limit, if the answer says (`unknown` is learned as requests).
  /// @param retry_after the server's delay hint, if any; used only to pause a block.
  /// A caller that reserved tokens for the call should keep them (not `settle` them back to 0):
  /// a refund lets the next waiting caller go at once into the same refusal, and at a token
  /// limit every probe then ended with every caller drawing a 429.
  void on_throttled(const ticket& t, limit_kind kind = limit_kind::unknown,
                    std::optional<duration> retry_after = std::nullopt);

  /// The call ended without an answer from the server (cancelled, connection failed, timed out):
  /// not a rate signal.
  void on_abandoned(const ticket& t);

  /// Limits the server advertised (rate-limit headers), per minute; an absent or non-positive
  /// value changes nothing. They set the estimate and become a ceiling.
  void on_advertised(std::optional<double> requests_per_minute,
                     std::optional<double> tokens_per_minute);

  /// Makes this controller a *follower* of a fleet's probes (keel/redis/shared_rate.hpp): its
  /// request dimension no longer starts probes of its own after a plateau; instead, while
  /// `gain` is positive and it cruises without a rejection to react to, it probes at its plateau
  /// rate x (1 + gain), the gain of the leader's probe (`pacing_state::gain`), and a `gain` of 0
  /// ends that probe. Everything else (startup, search, estimates, cuts on its own 429s) is its
  /// own. A non-finite or negative gain counts as 0.
  void follow_probes(double gain);

  /// Probes on its own again (after `follow_probes`); the plateau starts again from now.
  void lead();

  /// Ends a probe of the request rate as a 429 would, without one of its own: another process
  /// of the fleet drew the 429 of this probe. The rate falls back to the plateau's and a new
  /// plateau starts; not probing, nothing changes.
  void end_probe();

  /// Takes `requests_per_second` as its estimate of the server's limit for this process: its
  /// share of a limit the fleet learned (keel/redis/shared_rate.hpp). A controller that is
  /// reacting to a 429 (an episode is open), has a ceiling (configured or advertised), or is not
  /// positive and finite changes nothing; one in startup or search goes to cruise at the share.
  void adopt_share(double requests_per_second);

  /// The request dimension's state.
  pacing_state requests() const;

  /// The token dimension's state (rates per second).
  pacing_state tokens() const;

  /// The throttler it paces.
  basic_throttler<Clock>& bucket() const noexcept;

 private:
  std::unique_ptr<detail::rate_controller_state<Clock>> state_;
};

/// The rate controller on `std::chrono::steady_clock`.
using rate_controller = basic_rate_controller<>;

}  // namespace keel

#include <keel/impl/rate_controller.hpp>
