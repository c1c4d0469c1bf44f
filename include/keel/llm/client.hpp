// keel::llm::client: a configured policy stack over LLM providers. The config's entries are a
// fallback chain, each with its own retry algorithm, breaker and shared rate-limit bucket.
#pragma once

// Design
// ------
// A service builds one client from a `client_config` (`keel::llm::load_config(file)` reads the
// same file as the `keel` command) and shares it among all its calls:
//
//     keel::llm::client llm{io.get_executor(), keel::llm::load_config("keel.json")};
//     keel::llm::chat_response r = co_await llm.complete(
//         keel::llm::chat_request::from_prompt("", "Say hi", 64));   // model "": the entry's
//
// One call (`complete`, or `call`, which returns the outcome instead of throwing) is, from the
// outside in:
//
//   with_deadline(policy.deadline,                            overall limit per item
//     with_fallback(entry 0, entry 1, ...,                    primary, then fallbacks in order
//       retry(entry i):  keel::with_retry (policy.retry)      or keel::aws::with_retry (mode)
//         with_breaker(entry i's breaker,                     transient/timeout failures count
//           acquire(bucket of (provider, model, key)),        requests + estimated tokens
//           with_deadline(entry timeout, complete(...)))))    one HTTP attempt
//
// - Pacing: each bucket of (provider, model, key) has a `keel::rate_controller` (shared pacing,
//   the default) that learns the server's limit from the attempts' outcomes: 429s with or
//   without Retry-After, and the rate-limit headers when the server sends them (they win).
//   Configured `requests_per_minute` / `tokens_per_minute` are ceilings, not the only knowledge.
//   A 429 does not pause the bucket for everybody (a constant Retry-After says nothing about the
//   rate); the controller cuts the rate instead, and pauses only a block (nothing accepted for a
//   while). The bucket settles the token estimate with the real usage, and reports of fewer
//   remaining requests or tokens than the bucket holds lower it.
// - Buckets live in a `bucket_registry` keyed by (provider, model, key): entries, clients and
//   configs that share a key share its limits and its controller. Breakers, the retry budget
//   and the AWS retry quota/limiter belong to one client, so several clients with different
//   policies can live in one process.
// - An open breaker moves on to the next entry at once; on the last entry, keel-native retry
//   waits for the breaker's probe instead (its error carries the remaining open time); with
//   `client_options::hold_open_breaker` (keel batch) that wait costs no attempt. Not for a
//   server that has never sent an HTTP answer, after `policy.breaker.unanswered_grace`: that
//   is more likely a wrong base_url than an outage, and its calls fail with `circuit_open`.
// - An attempt asks its entry's breaker again after the bucket's wait, just before it is sent
//   (`permit::ensure_admitted`), and a retry the budget refuses while the breaker is open or
//   half-open is held by it rather than failed (`retry_policy::exempt_from_budget`).
// - Throttling (429) does not count against a breaker, nor against the retry budget: pacing is
//   the controller's job.
// - An entry in AWS `adaptive` mode is paced by that mode's CUBIC limiter instead (botocore's
//   behaviour); legacy and standard entries get the controller like any other.
// - `client_options::shared_pacing` (default on) is the controller. Turned off, the client paces
//   only by the configured rate limits, like a common SDK client; `keel bench` uses that for its
//   non-keel policy variants.
// - `client_options::attempt_slots` (keel batch: its concurrency) caps the attempts in flight,
//   not the items: a call sleeping before a retry or at an open breaker gives its slot to the
//   next item, and takes one again (FIFO) before its next attempt. Immediate retries keep it.
// - `call` never throws: it returns the reply or the final error with the attempts made;
//   `complete` returns the reply or throws that error.
// - Streams (`stream_call`, `stream`) run the same stack; one attempt opens the body and feeds
//   a `stream_decoder`, handing each text delta to the caller's handler and awaiting it before
//   the next read (back-pressure). The first-token timeout covers sending up to the first text,
//   the idle timeout each read after it (a `keel::stream_watch`, whose timer closes the
//   connection when it fires). The commit point (a `keel::stream_commit`) is the first delta:
//   before it a failure is retried and falls back like a whole call; after it the retry and
//   fallback predicates refuse (unless restartable), and the call's error becomes
//   `stream_interrupted` with the failure that cut it as its cause. Both are the core facility
//   of keel/stream_guard.hpp, tested there on virtual time.
// - Hedging (`policy.hedge`, off by default) wraps each attempt in `keel::with_hedge`, inside
//   the breaker and the retry: a hedged group is one attempt to them. Each entry has its own
//   latency window and hedge budget; a stream's copy commits at its first text, so only one
//   copy ever reaches the handler.
// - Traces (`client_options::tracer`, off by default): a span per call ("chat {model}",
//   internal) with a child per HTTP attempt (client), both with the OpenTelemetry GenAI
//   attributes, and events on the call's span for each retry decision, fallback move, throttle
//   wait, breaker rejection, hold and hedge. The caller's span context (`parent`) makes the call
//   a child of the caller's span; each attempt sends its own context as W3C `traceparent` (and
//   `tracestate`). Without a tracer a given `parent` is passed on unchanged. Prompt and reply
//   text are never recorded. The attributes are listed in docs/tracing.md.
// - Hooks see each call's opaque `context` pointer (what the caller passed to `call`), never a
//   type of the caller's: the keel command passes its batch item, a service its request id.
//
// Thread safety: a client and its registry live on one executor (one thread): call `call` and
// `complete` from coroutines on that executor.

#include <keel/llm/config.hpp>
#include <keel/llm/error.hpp>

#include <keel/aws/sdk_request.hpp>
#include <keel/bulkhead.hpp>
#include <keel/circuit_breaker.hpp>
#include <keel/hedge.hpp>
#include <keel/http/client.hpp>
#include <keel/random.hpp>
#include <keel/rate_controller.hpp>
#include <keel/retry.hpp>
#include <keel/retry_budget.hpp>
#include <keel/throttler.hpp>
#include <keel/trace.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace keel::llm {

/// Shared rate-limit buckets keyed by (provider, model, key), each with its rate controller.
class bucket_registry {
 public:
  /// Buckets whose timers run on `ex`; `seed` seeds the controllers' probe timing (0: random).
  explicit bucket_registry(boost::asio::any_io_executor ex, std::uint64_t seed = 0);

  /// The bucket of `e` (created on first use with `e.rate_limits`).
  /// @param adaptive if the bucket is created here, it gets a `keel::rate_controller` that
  ///   learns the server's limit (configured limits become its ceilings).
  keel::throttler& get(const entry_config& e, bool adaptive = false);

  /// The controller of `bucket` (null if it has none).
  keel::rate_controller* pacing(const keel::throttler& bucket) const;

  /// Every bucket with its (redaction-safe) name.
  std::vector<std::pair<std::string, keel::throttler*>> all() const;

  /// Called when a bucket's controller changes phase or estimate: the bucket's name and its
  /// request and token states. Set before the first `get`.
  std::function<void(const std::string&, const keel::pacing_state&, const keel::pacing_state&)>
      on_pacing;

 private:
  struct entry {
    std::string name;
    std::unique_ptr<keel::throttler> bucket;
    std::unique_ptr<keel::rate_controller> pacing;
  };
  boost::asio::any_io_executor ex_;
  keel::random_source random_;
  std::map<std::string, entry> buckets_;
};

/// What happened in one attempt (for metrics and logs).
struct attempt_report {
  /// The entry.
  std::size_t entry = 0;
  /// The call's context (what the caller passed to `client::call`; may be null).
  const void* context = nullptr;
  /// Null on success.
  std::exception_ptr error;
  /// HTTP status (0 without a response).
  int status = 0;
  /// Seconds from send to answer.
  double seconds = 0;
};

/// A retry about to happen.
struct retry_report {
  /// The entry.
  std::size_t entry = 0;
  /// The call's context (what the caller passed to `client::call`; may be null).
  const void* context = nullptr;
  /// The attempt that failed (1-based).
  int attempt = 0;
  /// Its error.
  std::exception_ptr error;
  /// The sleep before the next attempt.
  std::chrono::nanoseconds delay{0};
  /// True if the delay came from the server.
  bool from_server_hint = false;
};

/// Observers of a client's calls; every member is optional.
/// State shared with other processes (`client_options::fleet`): pacing, asked for every attempt
/// after the entry's own bucket has granted it, and optionally the entries' breakers. The client
/// knows nothing of how it is shared (the `keel` command's `policy.shared` puts a
/// keel::redis::shared_pacer and a keel::redis::shared_breaker per entry behind it).
class fleet_pacing {
 public:
  virtual ~fleet_pacing() = default;
  /// Waits until the fleet allows one request of about `tokens` tokens to `entry`.
  /// @throws anything when the shared state cannot be reached in time: the attempt then goes on
  ///   under the entry's own bucket and `acquire_local`, and `client_hooks::on_fleet_pacing_error`
  ///   is told.
  /// Cancellation: the call's cancellation reaches it; its `operation_aborted` ends the call.
  virtual boost::asio::awaitable<void> acquire(const entry_config& entry, double tokens) = 0;
  /// After `acquire` threw: waits for this process's local share of the fleet's limit (e.g. the
  /// limit divided by the fleet's size), so that a fleet cut off from its shared state does not
  /// send N times the limit. The default waits for nothing (the entry's own bucket only).
  /// @throws only `operation_aborted` (cancellation).
  /// Cancellation: the call's cancellation reaches it; its `operation_aborted` ends the call.
  virtual boost::asio::awaitable<void> acquire_local(const entry_config& entry, double tokens) {
    (void)entry;
    (void)tokens;
    co_return;
  }
  /// `entry`'s server asked this process to wait `delay` (a 429's Retry-After): hold the fleet.
  /// Must not throw or block.
  virtual void on_server_delay(const entry_config& entry, std::chrono::nanoseconds delay) = 0;

  /// Closes what the fleet state holds open (e.g. its connection), so that the io_context can
  /// finish; the default does nothing.
  virtual void close() {}

  /// Before an attempt on `entry` waits for `pacing`'s bucket (this process's controller of the
  /// entry): shares what the controller learned with the fleet, or brings the fleet's learned
  /// rate into it (`keel::rate_controller::follow`/`lead`), e.g. keel/redis/shared_rate.hpp.
  /// The default does nothing (each process learns alone). Must not throw or block.
  virtual void sync_pacing(const entry_config& entry, keel::rate_controller& pacing) {
    (void)entry;
    (void)pacing;
  }

  // The fleet's breaker (each default does nothing: breakers stay per process).

  /// Before a call on `entry` goes through `breaker` (this process's): brings the fleet's state
  /// into it, e.g. `force_open_until` for a break another process started, `reset` after
  /// another process's probe closed the fleet's breaker. Must not throw or block.
  virtual void sync_breaker(const entry_config& entry, keel::circuit_breaker& breaker) {
    (void)entry;
    (void)breaker;
  }
  /// An attempt on `entry` ended: `failure` if it counts against a breaker (transient or
  /// timeout); cancelled attempts are not reported. Must not throw or block.
  virtual void on_breaker_outcome(const entry_config& entry, bool failure) {
    (void)entry;
    (void)failure;
  }
  /// This process's breaker of `entry` went from `from` to `to` (also when `sync_breaker`
  /// moved it); `open_for` is its break when `to` is open. Must not throw or block.
  virtual void on_breaker_change(const entry_config& entry, keel::breaker_state from,
                                 keel::breaker_state to, std::chrono::nanoseconds open_for) {
    (void)entry;
    (void)from;
    (void)to;
    (void)open_for;
  }
};

struct client_hooks {
  /// After every attempt.
  std::function<void(const attempt_report&)> on_attempt;
  /// Before every retry sleep.
  std::function<void(const retry_report&)> on_retry;
  /// Moving from entry `from` to entry `to` after `error`.
  std::function<void(const void* context, std::size_t from, std::size_t to, std::exception_ptr)>
      on_fallback;
  /// A breaker changed state.
  std::function<void(std::size_t entry, keel::breaker_state from, keel::breaker_state to)>
      on_breaker;
  /// An attempt waited this long for rate-limit capacity (bucket or AWS adaptive limiter).
  std::function<void(std::size_t entry, std::chrono::nanoseconds)> on_throttle_wait;
  /// The fleet's pacing (`client_options::fleet`) failed for an attempt, which went on under the
  /// entry's own bucket and the fleet's `acquire_local`.
  std::function<void(std::size_t entry, const std::exception_ptr&)> on_fleet_pacing_error;
  /// The fleet's pacing granted an attempt on `entry` again after failing for an earlier one.
  std::function<void(std::size_t entry)> on_fleet_pacing_restored;
  /// The last entry's breaker is open and the item waits for its probe
  /// (`client_options::hold_open_breaker`); the time left until the probe.
  std::function<void(std::size_t entry, const void* context, std::chrono::nanoseconds)> on_hold;
  /// Entry `entry`'s server has sent no HTTP answer for `policy.breaker.unanswered_grace` since
  /// its first failure: from now on its open breaker fails calls instead of holding them. Called
  /// once per entry, with the last transport error (e.g. a refused connection).
  std::function<void(std::size_t entry, const std::exception_ptr& last_error)> on_unanswered;
  /// A hedge of an attempt on entry `entry` starts (`policy.hedge`); `attempt` is 1 for the first
  /// hedge, `to` the entry it goes to.
  std::function<void(std::size_t entry, const void* context, std::size_t attempt, std::size_t to)>
      on_hedge;
  /// A bucket's controller changed phase or estimate: the bucket's (redaction-safe) name and its
  /// request and token states. Only for a client that owns its buckets (the constructor without
  /// a `bucket_registry`); with a shared registry, set `bucket_registry::on_pacing`.
  std::function<void(const std::string&, const keel::pacing_state&, const keel::pacing_state&)>
      on_pacing;
};

/// A piece of a streamed reply, as `client::stream` hands it to the caller.
struct stream_delta {
  /// The text (never empty for a text delta); valid until the handler's awaitable completes.
  /// For a tool-call delta (`tool` set): a fragment of the call's arguments (JSON text; may be
  /// empty on a call's first piece).
  std::string_view text;
  /// A tool-call delta: the call's `id` and `name` on its first piece (empty after), its
  /// `arguments` empty (the fragment is `text`); null for text. Valid until the handler's
  /// awaitable completes. The pieces joined per `tool_index` are `chat_response::tool_calls`.
  const keel::llm::tool_call* tool = nullptr;
  /// Which tool call of the reply a tool-call delta belongs to (0, 1, ...).
  std::size_t tool_index = 0;
  /// True on the first delta of an attempt that starts the reply over (`restartable` streams
  /// only, after an attempt that had delivered deltas failed): discard every earlier delta.
  bool restart = false;
  /// The entry answering.
  std::size_t entry = 0;
};

/// Consumes one delta of a streamed reply. keel reads nothing more from the connection until the
/// returned awaitable completes, so a slow consumer slows the server down (TCP flow control)
/// instead of making keel buffer: at most one read (64 KiB) is held per stream. It runs on the
/// client's executor; to consume on another, hand the delta to a bounded channel and await the
/// send. An exception it throws ends the call with that error (nothing is retried after it).
using delta_handler = std::function<boost::asio::awaitable<void>(const stream_delta&)>;

/// Per-call settings of a streamed call; an absent field takes the config's `policy.stream`.
struct stream_call_options {
  /// Seconds from sending an attempt to its first text delta (0: none).
  std::optional<double> first_token_timeout;
  /// Seconds of silence allowed between pieces of the body after the first text delta (0: none).
  std::optional<double> idle_timeout;
  /// May a stream that failed after its first delta be retried from the start?
  std::optional<bool> restartable;
};

/// The outcome of one call.
struct call_outcome {
  /// The reply, on success.
  std::optional<keel::llm::chat_response> response;
  /// The final error, on failure (`operation_aborted` when cancelled).
  std::exception_ptr error;
  /// The entry that answered (or the last one tried).
  std::size_t entry = 0;
  /// HTTP attempts made over all entries.
  int attempts = 0;
  /// Seconds from start to end.
  double seconds = 0;
  /// Streamed calls: seconds from the start to the first delta handed to the caller (absent: none
  /// was). After a restart it still says when the caller first saw text, not when the attempt
  /// that finished produced its own.
  std::optional<double> first_token_seconds;
  /// Streamed calls: text bytes handed to the caller (since the last restart).
  std::size_t delivered_bytes = 0;
  /// Streamed calls: deltas handed to the caller (since the last restart).
  std::size_t delivered_deltas = 0;
};

/// Switches of a client that are not part of the config file.
struct client_options {
  /// When true (the default), each bucket has a `keel::rate_controller` that learns the
  /// server's limit from outcomes and rate-limit headers, and a lower `remaining` in the headers
  /// is adopted. When false, the bucket paces by the configured `rate_limits` only (with none
  /// configured it never waits), and each call retries on its own schedule.
  bool shared_pacing = true;
  /// When true, the last entry's open breaker holds the call until the breaker admits a probe
  /// (bounded by the call's deadline) without spending an attempt; when false (the library's
  /// way), the wait is an ordinary retry whose delay is the time left until the probe.
  bool hold_open_breaker = false;
  /// When nonzero, at most this many calls hold an attempt slot at once (`client::call`).
  /// A call gives its slot up while it sleeps (a retry's backoff or server delay, a hold at an
  /// open breaker) and takes one again, in FIFO order, before its next attempt: a sleeping item
  /// then does not idle the run's concurrency, while no more than this many attempts are ever
  /// in flight (or waiting for pacing). Zero (the default): no slots.
  std::size_t attempt_slots = 0;
  /// When false, replies are returned with `chat_response::raw` null: an OpenAI body is then read
  /// without building a JSON tree (`keel::llm::parse_response`), which the `keel` command's
  /// batch and gateway do, since they read only the mapped fields. True (the default): `raw`
  /// holds the parsed body.
  bool keep_raw = true;
  /// Seeds the jitter and the probe timing of a client that owns its buckets (the constructor
  /// without a `bucket_registry`); 0 (the default): drawn from `std::random_device`, so that
  /// processes of a fleet do not draw the same jitter. The other constructors take a seed.
  std::uint64_t seed = 0;
  /// Pacing shared with other processes, asked after each entry's own bucket (not owned; must
  /// outlive the client). Null (the default): none.
  fleet_pacing* fleet = nullptr;
  /// Records spans of calls and attempts (not owned; must outlive the client). Null (the
  /// default): no spans, and a call's `parent` is passed on unchanged in `traceparent`.
  keel::trace::tracer* tracer = nullptr;
  /// The transport settings of a client that owns its transports (TLS verification on by
  /// default); an entry's `ca_file` replaces `tls.ca_file` for that entry's transport.
  keel::http::client_options http;
};

/// Workers beyond `slots` attempt slots that a batch runs (a quarter more, rounded down: 0 below
/// 4), so that items asleep before a retry leave no slot idle. At a 10% transient error rate about
/// one item in a hundred sleeps (the first retry is immediate), so a quarter is ample; a run
/// whose items mostly sleep (an outage) is paced by its breaker and retry budget, not by slots.
constexpr std::size_t spare_workers(std::size_t slots) noexcept {
  return slots / 4;
}

/// The HTTP clients of one run: one per distinct `entry_config::ca_file`, because a
/// `keel::http::client` has a single TLS context (trust store) for every host. Entries with the
/// same (or no) CA file share a client and its connection pools.
/// Thread safety: as `keel::http::client` (one executor).
class http_clients {
 public:
  /// Clients created on `ex` with `base` (its `tls.ca_file` is replaced per client).
  http_clients(boost::asio::any_io_executor ex, keel::http::client_options base);

  /// The client trusting `ca_file` besides the system store ("": the system store only),
  /// created on first use.
  /// @throws std::runtime_error naming the file if it cannot be loaded as PEM certificates.
  keel::http::client& get(const std::string& ca_file);

 private:
  boost::asio::any_io_executor ex_;
  keel::http::client_options base_;
  std::map<std::string, std::unique_ptr<keel::http::client>> clients_;
};

/// What replaces a credential that a reply echoes (in its text, model, finish reason or request
/// id) before the reply leaves `client::call`: records never hold a key.
inline constexpr std::string_view secret_marker = "<redacted>";

/// Credentials shorter than this many bytes are not searched for in replies (they would match
/// ordinary text; no real API key or AWS secret is that short).
inline constexpr std::size_t min_scrubbed_secret = 8;

/// The configured policy stack: one call runs the fallback chain of entries, each with its
/// retries, breaker and shared pacing (see the header comment).
class client {
 public:
  /// A client that owns its transports (one per CA file) and its rate-limit buckets: the
  /// simplest way to use keel from a service. Hooks and options are optional.
  /// @throws std::runtime_error if an entry's CA file cannot be loaded.
  client(boost::asio::any_io_executor ex, client_config cfg, client_hooks hooks = {},
         client_options options = {});
  /// Builds the entries' breakers, retry strategies and buckets; each entry sends through the
  /// client of its `ca_file` (created now, so a bad CA file fails here).
  /// @param http the transports (must outlive the client).
  /// @param buckets the shared buckets (must outlive the client).
  /// @param seed seeds the jitter.
  /// @param options switches outside the config (shared pacing on by default).
  /// @throws std::runtime_error if an entry's CA file cannot be loaded.
  client(boost::asio::any_io_executor ex, client_config cfg, http_clients& http,
         bucket_registry& buckets, client_hooks hooks = {}, std::uint64_t seed = 0,
         client_options options = {});
  /// Builds the entries' breakers, retry strategies and buckets; every entry sends through
  /// `http`, whatever its `ca_file` (the caller chose the transport).
  /// @param http the transport (must outlive the client).
  /// @param buckets the shared buckets (must outlive the client).
  /// @param seed seeds the jitter.
  /// @param options switches outside the config (shared pacing on by default).
  client(boost::asio::any_io_executor ex, client_config cfg, keel::http::client& http,
         bucket_registry& buckets, client_hooks hooks = {}, std::uint64_t seed = 0,
         client_options options = {});
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// Waits (FIFO) for an attempt slot (`client_options::attempt_slots`) to give to `call`, for a
  /// caller that counts an item as started only once it has one; with no slots configured
  /// returns an empty permit at once.
  /// Cancellation: throws `boost::system::system_error` (`operation_aborted`); no slot is taken.
  boost::asio::awaitable<keel::bulkhead_permit> admit();

  /// Runs one request through the whole chain. Never throws. A reply that echoes any entry's API
  /// key or AWS credentials has each occurrence replaced by `secret_marker`. The request's model
  /// is used on the first entry when it is not empty; every other entry (and an empty model)
  /// gets the entry's model. `context` is handed to every hook of this call, untouched.
  /// With `client_options::attempt_slots`, the call holds `slot` or first waits (FIFO) for one,
  /// before its latency clock starts; it gives the slot up while it sleeps and takes one again
  /// before its next attempt, and releases it at its end.
  /// `parent` (may be null or invalid) is the caller's span: the call's span becomes its child
  /// (see `client_options::tracer`); it is copied before the first suspension.
  /// Cancellation: the attempt in flight (or the wait for a slot) is cancelled and the
  /// outcome's error is `operation_aborted`.
  boost::asio::awaitable<call_outcome> call(keel::llm::chat_request request,
                                            const void* context = nullptr,
                                            keel::bulkhead_permit slot = {},
                                            const keel::trace::span_context* parent = nullptr);

  /// Runs one request through the whole chain (as `call`, `parent` included) and returns the
  /// reply.
  /// @throws the call's final error: the deciding provider error or transport error, or a
  ///   `keel::failure` (`retries_exhausted`, `budget_exhausted`, `all_fallbacks_failed`,
  ///   `deadline_exceeded`, ...) whose causes lead to it; `error_class` names it.
  /// Cancellation: the attempt in flight (or the wait for a slot) is cancelled and
  /// `boost::system::system_error` (`operation_aborted`) is thrown.
  boost::asio::awaitable<keel::llm::chat_response> complete(
      keel::llm::chat_request request, const void* context = nullptr,
      const keel::trace::span_context* parent = nullptr);

  /// Runs one request through the whole chain as `call` does, streamed: each piece of the reply's
  /// text goes to `on_delta` as it arrives, and the outcome's `response` holds the whole text,
  /// the finish reason and the usage (from the stream's usage event) at the end. Never throws.
  ///
  /// The commit point is the first delta handed to `on_delta`. Before it, any failure (a 429, a
  /// 5xx, an error event, a dropped connection, no first token within `first_token_timeout`)
  /// is retried or falls back exactly like a `call`. After it, nothing is retried unless the
  /// call is `restartable` (then a new attempt's first delta has `restart` set); the call ends
  /// with a `keel::failure` `stream_interrupted` whose cause is the failure that cut it, and the
  /// outcome says how much was delivered. An idle timeout after the commit point is such a
  /// failure.
  ///
  /// The token bucket settles with the stream's reported usage; a stream cut short settles with
  /// an estimate (the prompt plus the text delivered, about 4 bytes a token). `parent` as in
  /// `call`.
  /// Cancellation: the attempt in flight is cancelled and its connection closed at once (the
  /// server stops generating); a cancellation that arrives while `on_delta` runs is seen by the
  /// handler's own operations, and the connection is closed when it returns. The outcome's error
  /// is `operation_aborted`.
  boost::asio::awaitable<call_outcome> stream_call(
      keel::llm::chat_request request, delta_handler on_delta, stream_call_options options = {},
      const void* context = nullptr, keel::bulkhead_permit slot = {},
      const keel::trace::span_context* parent = nullptr);

  /// Runs one request as `stream_call` and returns the whole reply. `context` is handed to every
  /// hook, as in `complete`; `parent` as in `call`.
  /// @throws the call's final error, as `complete` does (`stream_interrupted` after the commit
  ///   point).
  /// Cancellation: as `stream_call`; throws `boost::system::system_error`
  ///   (`operation_aborted`).
  boost::asio::awaitable<keel::llm::chat_response> stream(
      keel::llm::chat_request request, delta_handler on_delta, stream_call_options options = {},
      const void* context = nullptr, const keel::trace::span_context* parent = nullptr);

  /// The config.
  const client_config& cfg() const noexcept { return cfg_; }

  /// Breaker of entry `i` (null when breakers are off).
  const keel::circuit_breaker* breaker(std::size_t i) const;

  /// The shared retry budget (null when off).
  const keel::retry_budget* budget() const noexcept { return budget_.get(); }

 private:
  struct entry_state;
  struct call_state;
  struct stream_state;
  // Inside the policy stack a reply travels boxed: every layer's frame keeps a slot for the value
  // it awaits (clang 14 does not overlap them), and a streamed call holds those frames for the
  // stream's life, so a pointer instead of a 408-byte `chat_response` in each is about 3 KiB less
  // per open stream. The box is made once per call, where the reply is complete.
  using reply_box = std::unique_ptr<keel::llm::chat_response>;
  boost::asio::awaitable<call_outcome> run_call(call_state cs);
  void start_call_span(call_state& cs);
  boost::asio::awaitable<reply_box> call_chain(call_state& cs);
  call_outcome finish_call(call_state& cs, reply_box reply, std::exception_ptr error,
                           std::chrono::steady_clock::time_point t0);
  boost::asio::awaitable<reply_box> hedged_attempt(entry_state& es, call_state& cs);
  boost::asio::awaitable<reply_box> hedge_attempts(entry_state& es, call_state& cs);
  boost::asio::awaitable<reply_box> attempt(entry_state& es, call_state& cs,
                                            keel::hedge_attempt* hedge);
  // The parts of an attempt that do not wait (see `attempt` in client.cpp).
  keel::llm::chat_request attempt_request(const entry_state& es, const call_state& cs);
  keel::trace::span start_attempt_span(entry_state& es, call_state& cs,
                                       const keel::llm::chat_request& req,
                                       std::chrono::nanoseconds waited,
                                       const keel::hedge_attempt* hedge);
  static const std::optional<keel::llm::aws_credentials>& credentials(const entry_state& es);
  keel::http::request stream_request(entry_state& es, const keel::llm::chat_request& req,
                                     const std::optional<keel::aws::sdk_request_info>& sdk,
                                     const keel::trace::span_context* outgoing);
  boost::asio::awaitable<reply_box> complete_attempt(
      entry_state& es, const keel::llm::chat_request& req,
      const std::optional<keel::aws::sdk_request_info>& sdk,
      const keel::trace::span_context* outgoing);
  void attempt_failed(entry_state& es, call_state& cs, const keel::rate_controller::ticket& ticket,
                      double estimate, const std::exception_ptr& failed, keel::trace::span& span,
                      std::chrono::steady_clock::time_point sent);
  void attempt_succeeded(entry_state& es, call_state& cs,
                         const keel::rate_controller::ticket& ticket, double prompt_estimate,
                         double estimate, const keel::llm::chat_response& reply,
                         keel::trace::span& span, std::chrono::steady_clock::time_point sent);
  boost::asio::awaitable<reply_box> stream_attempt(entry_state& es, call_state& cs,
                                                   keel::http::request req, double estimate,
                                                   keel::hedge_attempt* hedge);
  boost::asio::awaitable<reply_box> run_entry(std::size_t i, call_state& cs);
  boost::asio::awaitable<reply_box> run_entry_aws(entry_state& es, call_state& cs);
  boost::asio::awaitable<reply_box> gated_attempt(entry_state& es, call_state& cs);
  boost::asio::awaitable<reply_box> admitted_attempt(entry_state& es, call_state& cs,
                                                     keel::circuit_breaker::permit& p);
  std::function<void(const keel::retry_event&)> retry_hook(entry_state& es, call_state& cs);
  boost::asio::awaitable<reply_box> held_attempt(entry_state& es, call_state& cs);
  void scrub_secrets(keel::llm::chat_response& r) const;
  void scrub_secrets(std::string& field) const;

  struct owned;  // the transports and buckets of a client that owns them
  using transport_for = std::function<keel::http::client&(const entry_config&)>;
  client(std::unique_ptr<owned> own, boost::asio::any_io_executor ex, client_config cfg,
         client_hooks hooks, client_options options);
  client(boost::asio::any_io_executor ex, client_config cfg, const transport_for& http,
         bucket_registry& buckets, client_hooks hooks, std::uint64_t seed, client_options options);

  std::unique_ptr<owned> own_;  // null unless this client owns its transports and buckets
  boost::asio::any_io_executor ex_;
  client_config cfg_;
  client_hooks hooks_;
  client_options options_;
  keel::random_source random_;
  keel::random_source invocation_ids_;  // amz-sdk-invocation-id, apart from the jitter draws
  std::unique_ptr<keel::retry_budget> budget_;
  std::unique_ptr<keel::bulkhead> slots_;  // client_options::attempt_slots (null: none)
  std::vector<std::unique_ptr<entry_state>> entries_;
  std::vector<std::string> secrets_;  // every entry's credentials (and base_url query keys)
};

/// True if an answered call's token reservation is settled with the real usage: unless the
/// controller paces tokens at a limit it learned from 429s (measured in this client's
/// estimates), and no tokens_per_minute is configured (a configured ceiling is in real tokens
/// and stays one after 429s).
bool settles_token_usage(keel::pacing_phase token_phase, double configured_tokens_per_minute);

}  // namespace keel::llm
