// The configuration of keel::llm::client and the keel command: an AG2-style `config_list` plus a
// keel `policy` block.
#pragma once

// Design
// ------
// A config file is JSON. Two shapes are accepted:
//
//   - a bare AG2 `config_list` array: `[ {"api_type": "openai", "model": "gpt-4o-mini", ...}, ...
//   ]`
//   - an object: `{"config_list": [ ... ], "policy": { ... }}`
//
// The first entry of `config_list` is the primary model; the others are fallbacks, tried in
// order. Entry keys (AG2 names; durations are seconds, fractional allowed):
//
//   api_type            "openai" | "anthropic" | "bedrock"                  (default "openai")
//   model               string, required, non-empty
//   base_url            string (empty: the provider's public URL)
//   api_key             string (secret)               } at most one of the two; for openai and
//   api_key_env         name of an environment var.   } anthropic one is required
//   aws_region          string (bedrock: required unless base_url is set, or AWS_REGION /
//                       AWS_DEFAULT_REGION / the AWS profile's `region` is set)
//   aws_access_key, aws_secret_key, aws_session_token   strings (secrets); both key parts or none
//   aws_profile_name    a profile of the AWS shared files (credentials, region, retry settings;
//                       absent: AWS_PROFILE, AWS_DEFAULT_PROFILE, else default)
//   total_max_attempts  integer >= 1: all attempts, wins over max_attempts
//   max_attempts        integer >= 0: *retries* (total = value + 1)
//   mode                "legacy" | "standard" | "adaptive": AWS retry semantics (any api_type)
//   timeout             number > 0: per-attempt timeout in seconds
//   response_format     object (sent as OpenAI's response_format)
//   requests_per_minute, tokens_per_minute   numbers >= 0 (keel extension: override the
//                       policy's rate limits for this entry; 0 = unlimited)
//   tags                array of strings (AG2 filter tags; kept, otherwise unused)
//   ca_file             path of a PEM file of CA certificates trusted for this entry's https://
//                       base_url, besides the system store (a private CA; keel extension).
//                       A relative path is taken from the config file's directory
//                       (`load_config`; `parse_config` takes it from the working directory).
//                       Must be readable.
//
// Any other key is an error. Which retry algorithm an entry uses:
//
//   - AWS semantics (keel::aws::with_retry) when the entry sets `mode`, or when it is a bedrock
//     entry. The mode and total attempts then resolve with botocore's precedence
//     (keel::aws::resolve_retry_config): entry mode/total_max_attempts/max_attempts, then
//     AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, then the AWS profile's retry_mode / max_attempts,
//     then the mode's default (legacy 5, standard/adaptive 3).
//   - otherwise keel's own with_retry with `policy.retry`; the entry's total_max_attempts or
//     max_attempts (+1) replaces `policy.retry.max_attempts`. AWS_* variables are not read.
//
// `policy` (every key optional):
//
//   retry:        {max_attempts: int >= 1 (6), backoff: <backoff>, backoff_by_condition:
//                  {"throttled"|"transient"|"timeout": <backoff>}, honour_retry_after: bool
//                  (true), max_retry_after: seconds (60)}
//   <backoff>:    {kind: "exponential"|"linear"|"constant"|"immediate" ("exponential"),
//                  base: s (0.5), cap: s (20), jitter: "none"|"full"|"equal"|"decorrelated"|
//                  "decorrelated_v2" ("full"), multiplier: number >= 1 (2),
//                  first_retry_immediate: bool (false)}
//                 With neither `backoff` nor `backoff_by_condition` given, transient failures
//                 get one immediate retry before the curve (the throttling hierarchy's first
//                 rung); naming either replaces that default.
//   deadline:     seconds > 0: overall limit per item, fallbacks included (300)
//   breaker:      {enabled: bool (true), failure_threshold: int >= 1 (10), break: s (5),
//   unanswered_grace: s >= 0 (30),
//                  break_growth: number >= 1 (2), max_break: s (300)}
//   retry_budget: {enabled: bool (true), max_tokens: number > 0 (100), token_ratio: number in
//                  (0, 1] (0.5: refuses retries only above ~33% failed attempts); only
//                  transient and timeout failures draw on it, throttling does not}
//   rate_limits:  {requests_per_minute: number >= 0 (0), tokens_per_minute: number >= 0 (0),
//                  burst: number >= 0 (0: one second's worth of requests)}
//   concurrency:  int in [1, 100000] (16)
//   queue:        {max_wait: seconds >= 0 (0 = no limit but the deadline): how long one attempt
//                  may wait for rate-limit capacity before it fails with queue_timeout}
//
// Errors name the file, the JSON pointer and what was expected, e.g.
//   policy.json: /config_list/1/timeout: expected a number > 0, got "abc"
//
// Secrets (`api_key`, the value of `api_key_env`, `aws_secret_key`, `aws_session_token`,
// `aws_access_key`, and the values of `base_url`'s query) never appear in errors or in
// `to_json(config, redact = true)`. A secret with a control character (a trailing newline from
// an environment variable) is refused at load time, naming the field and never the value: no
// HTTP header may carry it.
//
// Thread safety: plain values; `load_config` reads files and the environment through the
// given lookup only.

#include <keel/aws/config.hpp>
#include <keel/backoff.hpp>
#include <keel/error.hpp>
#include <keel/llm/chat.hpp>
#include <keel/llm/sigv4.hpp>

#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace keel::llm {

/// Looks up an environment variable; empty optional when unset. Tests inject their own.
using env_lookup = std::function<std::optional<std::string>(std::string_view name)>;

/// The process environment (std::getenv).
env_lookup process_env();

/// A bad config: `what()` is "<source>: <path>: <message>" ("<source>: <message>" when the
/// path is empty: an unreadable file, a JSON syntax error, a bad top-level value).
class config_error : public std::runtime_error {
 public:
  /// An error in `source` (a file name or "<config>") at JSON pointer `path`.
  config_error(std::string source, std::string path, std::string message);
  /// The JSON pointer of the offending value ("" for the whole document).
  const std::string& path() const noexcept { return path_; }
  /// What is wrong, without file and path.
  const std::string& message() const noexcept { return message_; }

 private:
  std::string path_;
  std::string message_;
};

/// The curve of every condition without its own when the config names none: exponential from
/// 0.5 s, doubling, capped at 20 s, full jitter (`policy.retry.backoff`'s defaults).
keel::backoff default_backoff();

/// The default curve for transient failures when the config names no backoff: the throttling
/// hierarchy's first rung, one immediate retry, then `default_backoff`.
keel::backoff default_transient_backoff();

/// keel-native retry settings.
struct retry_config {
  /// Total attempts, including the first. 6, not the SDKs' 3: a batch item that fails is lost
  /// work, and at a 10% transient error rate 4 attempts fail one item in 10,000 (10⁻⁴ each)
  /// where 6 fail one in a million; exponential backoff keeps the extra attempts rare and cheap.
  int max_attempts = 6;
  /// The curve for every condition without its own. A config's `"kind": "immediate"` is
  /// `keel::backoff::immediate()` (a constant zero delay), and prints back as "immediate".
  keel::backoff backoff = default_backoff();
  /// Curves by condition (the config names "throttled", "transient", "timeout"). Default (when
  /// the config names neither `backoff` nor `backoff_by_condition`): transient →
  /// `default_transient_backoff`.
  std::map<keel::condition, keel::backoff> backoff_by_condition = {
      {keel::condition::transient, default_transient_backoff()}};
  /// Whether a server delay hint (Retry-After, ...) replaces the backoff.
  bool honour_retry_after = true;
  /// Longest server hint obeyed, seconds.
  double max_retry_after = 60;
};

/// Circuit breaker per entry (consecutive failures).
struct breaker_config {
  /// Whether entries have a breaker.
  bool enabled = true;
  /// Failures in a row that open it. 10, not the usual 5: one breaker sees the interleaved
  /// outcomes of every concurrent call, and at a 10% transient error rate 5 in a row turn up
  /// about once per 10⁵ attempts (a run of 10,000 items trips it one time in ten, holding every
  /// item for the 5 s break); 10 in a row turn up once per 10¹⁰. An outage still opens it within
  /// the first round of calls at a concurrency of 10 or more.
  int failure_threshold = 10;
  /// How long it stays open the first time, seconds. 5, as Polly and Microsoft's standard
  /// resilience handler: a batch holds its items at an open breaker, so the first break is what
  /// a short outage costs in wall time (30 s held a 2,000-item batch 25 s past a 5 s outage).
  /// Each re-opening doubles it (`break_growth`), so a long outage costs one probe per break.
  double break_duration = 5;
  /// Growth of the break on each re-opening.
  double break_growth = 2;
  /// Longest break, seconds.
  double max_break = 300;
  /// How long, seconds, a server that has not sent one HTTP answer (every failure a refused
  /// connection, a TLS, DNS or timeout error) is waited for at its open breaker, from its first
  /// failure. After it, the breaker is neither held for nor retried: calls fail at once with
  /// `circuit_open`, whose message says the server never answered and whose causes hold the
  /// last transport error. A wrong base_url then fails a batch within about this long instead
  /// of holding every item for its deadline (a 100-item batch took 25 minutes). 30 outlasts a
  /// plain retry loop's patience (the OpenAI SDK with 5 retries gives up after ~16 s). Any
  /// answer, a 503 too, ends the grace for good: an outage of a server that has answered is
  /// held as before. 0: give up as soon as the breaker opens.
  double unanswered_grace = 30;
};

/// gRFC A6 retry budget shared by every entry of one client.
struct budget_config {
  /// Whether retries draw on a budget.
  bool enabled = true;
  /// Bucket size.
  double max_tokens = 100;
  /// Tokens a success gives back. 0.5, not gRPC's 0.1: the budget then drains only while more
  /// than ~33% of attempts fail (an outage), never at the few-to-10% of 5xx/529 an LLM batch
  /// normally sees, which 0.1 (draining above ~9%) turned into `budget_exhausted` failures.
  double token_ratio = 0.5;
};

/// Client-side rate limits (0: unlimited).
struct rate_limit_config {
  /// Requests per minute.
  double requests_per_minute = 0;
  /// LLM tokens (prompt + completion) per minute.
  double tokens_per_minute = 0;
  /// Request burst (0: one second's worth, at least 1).
  double burst = 0;
};

/// Streamed calls (`client::stream`): the deadlines a stream has besides the call's.
struct stream_config {
  /// Longest wait from sending a streamed attempt to its first text delta, seconds (0: none);
  /// an entry's `timeout`, when shorter, is used instead. A timeout here happens before the
  /// commit point, so the attempt is retried or falls back like any other. 60 s: far above a
  /// normal time to first token (0.2-5 s), below the call's `deadline`; raise it for reasoning
  /// models that think for minutes before they write.
  double first_token_timeout = 60;
  /// Longest silence between two pieces of a streamed body after its first text delta, seconds
  /// (0: none). Any byte counts (Anthropic's pings too), and time the caller spends consuming a
  /// delta does not.
  double idle_timeout = 30;
  /// True: a stream that fails after its first delta may be retried from the start (the caller
  /// is told to discard what it has, `stream_delta::restart`). False (the default): it ends with
  /// `stream_interrupted`.
  bool restartable = false;
};

/// Hedging (`keel::with_hedge`) of each attempt: a second copy of a slow attempt, the first to
/// answer (a stream: to produce its first text) wins and the other is cancelled, its connection
/// closed. Off by default: it trades extra requests (capped by the budget) for a shorter tail.
struct hedge_config {
  /// Hedge attempts.
  bool enabled = false;
  /// Copies of one attempt in total, the original included (2: one hedge).
  int max_attempts = 2;
  /// The hedge delay until `min_samples` latencies are known, seconds (and always, with
  /// `percentile` 0).
  double delay = 1;
  /// The hedge delay is this percentile of the entry's recent attempt latencies (streams: time
  /// to first token); 0: always `delay`.
  double percentile = 95;
  /// Latencies needed before the percentile is used.
  int min_samples = 20;
  /// Hedges per attempt allowed in steady state (a Finagle-style budget per entry); each hedge
  /// also takes a token from the retry budget when that is on.
  double budget_ratio = 0.05;
  /// Hedges the budget holds at most (and at start).
  double budget_capacity = 10;
  /// Where a hedge goes: false the same entry, true the next entry of the chain (the same one
  /// when there is none, or when its breaker is open).
  bool to_next = false;
};

/// Pacing shared with other processes through Redis (`policy.shared`, issue 16): every process
/// with the same key, provider and model takes its requests (and tokens, when a
/// `tokens_per_minute` is configured) from one bucket in Redis holding the entry's configured
/// `rate_limits`. Off unless `redis` is set. Used by the `keel` command; a library user gives
/// `client_options::fleet` an implementation (keel::redis::shared_pacer behind it).
struct shared_config {
  /// `redis://host[:port][/db]`, or `rediss://` for TLS (no credentials: see `password_env`);
  /// empty: off.
  std::string redis;
  /// With `rediss://`: a PEM file of the CAs to trust (empty: the system's trust store).
  std::string ca_file;
  /// First part of every Redis key; the rest is provider, model and a fingerprint of the key
  /// (never the key itself).
  std::string key_prefix = "keel";
  /// The Redis ACL user to log in as (empty: Redis's `default` user, `AUTH password`).
  std::string username;
  /// The environment variable whose value, if set, is the Redis password.
  std::string password_env = "KEEL_REDIS_PASSWORD";
  /// The Redis password, read from `password_env` when the config is loaded. Never printed.
  std::string password;
  /// Limit on each Redis command, seconds; past it (or with Redis unreachable) a call goes on
  /// under its process's own bucket and the `keel` command logs a WARNING.
  double timeout = 0.25;
  /// Seconds of quota a process leases at a time.
  double lease_window = 0.05;
  /// How often, at most, a process that makes calls checks its entry's breaker in Redis,
  /// seconds: the longest another process's open breaker goes unseen here.
  double breaker_sync = 0.25;
  /// How often, at most, a process that makes calls on an entry with no configured request limit
  /// syncs the learned rate with the fleet, seconds (keel/redis/shared_rate.hpp): one process
  /// learns the limit, the others follow its rate, seen here within this time.
  double rate_sync = 0.1;
  /// A fleet-wide half-open probe that reports nothing for this long (or twice its entry's
  /// `timeout`, if longer) is given to another process, seconds.
  double probe_timeout = 30;
  /// How many processes share the limit, for the local share while Redis cannot be reached
  /// (each then paces at limit / fleet_size); 0: unknown, each process then paces at the share
  /// it was last granted through Redis (the whole limit if it never reached Redis).
  int fleet_size = 0;
};

/// The keel `policy` block.
struct policy_config {
  /// keel-native retry.
  retry_config retry;
  /// Overall limit per item including fallbacks, seconds.
  double deadline = 300;
  /// Circuit breaker per entry.
  breaker_config breaker;
  /// Retry budget.
  budget_config retry_budget;
  /// Default rate limits of every entry.
  rate_limit_config rate_limits;
  /// Items in flight at once.
  int concurrency = 16;
  /// Longest wait for rate-limit capacity per attempt, seconds (0: no limit).
  double queue_max_wait = 0;
  /// Streamed calls.
  stream_config stream;
  /// Hedged attempts.
  hedge_config hedge;
  /// Pacing shared across processes (Redis).
  shared_config shared;
};

/// One `config_list` entry, resolved.
struct entry_config {
  /// Wire format.
  keel::llm::provider_kind api_type = keel::llm::provider_kind::openai;
  /// Model id.
  std::string model;
  /// Base URL (empty: public URL).
  std::string base_url;
  /// The API key, resolved from `api_key` or `api_key_env` (secret).
  std::string api_key;
  /// The variable named by `api_key_env` (empty if the key was given inline).
  std::string api_key_env;
  /// AWS region (bedrock).
  std::string aws_region;
  /// AWS credentials (bedrock), from the entry, the profile or the environment (secrets).
  std::optional<keel::llm::aws_credentials> aws;
  /// Where `aws` came from: "config", "profile <name>", "environment" or "" (none).
  std::string aws_credentials_source;
  /// AWS profile name, if given.
  std::string aws_profile_name;
  /// Per-attempt timeout, seconds.
  std::optional<double> timeout;
  /// Sent as OpenAI's response_format.
  std::optional<nlohmann::json> response_format;
  /// Generation parameters sent with every request to this entry, unless the input line gives
  /// its own (AG2 keys; see keel::llm::chat_request for how each provider gets them).
  std::optional<double> temperature;
  /// Nucleus sampling.
  std::optional<double> top_p;
  /// Stop sequences.
  std::vector<std::string> stop;
  /// Sampling seed (OpenAI only).
  std::optional<std::int64_t> seed;
  /// Anthropic: the `anthropic-version` sent (empty: keel::llm::anthropic_current_version).
  std::string anthropic_version;
  /// OpenAI: the field max_tokens goes in ("auto": by model family).
  keel::llm::max_tokens_field max_tokens_field = keel::llm::max_tokens_field::automatic;
  /// AG2 `price`: US dollars per 1,000 input tokens and per 1,000 output tokens; records and
  /// the summary then carry an estimated `cost`.
  std::optional<std::pair<double, double>> price;
  /// AG2 tags.
  std::vector<std::string> tags;
  /// PEM file of extra trusted CA certificates for this entry ("" : the system store only).
  std::string ca_file;
  /// Effective rate limits (policy defaults overridden by the entry).
  rate_limit_config rate_limits;
  /// AWS retry semantics, when they apply (see the header comment); else keel-native.
  std::optional<keel::aws::resolved_retry_config> aws_retry;
  /// Total attempts of keel-native retry (policy.retry.max_attempts unless the entry overrides).
  int max_attempts = 6;

  /// "api_type/model", e.g. "openai/gpt-4o-mini" (never contains a secret).
  std::string name() const;
  /// The transport endpoint of this entry.
  keel::llm::endpoint endpoint() const;
};

/// One caller of `keel serve`: its gateway key (as a SHA-256 digest: the key itself is never
/// stored) and its limits.
struct serve_client {
  /// Names the caller in logs and metrics (never the key).
  std::string name;
  /// SHA-256 of the caller's key, 64 lowercase hex digits (`printf %s "$KEY" | sha256sum`).
  std::string key_sha256;
  /// Requests per minute this caller may send; past it keel answers 429 with retry-after at
  /// once. 0: no limit.
  double requests_per_minute = 0;
  /// Calls this caller may have in flight; past it, 429 at once. 0: no limit.
  int concurrency = 0;
};

/// The `serve` block: what `keel serve` needs beyond the policy.
struct serve_config {
  /// The callers allowed, by key (`Authorization: Bearer <key>`); empty: any caller, no key
  /// needed (serve on loopback only, or behind a proxy that authenticates).
  std::vector<serve_client> clients;
};

/// The `trace` block: where spans go (see docs/tracing.md). Tracing is on when `otlp_endpoint`
/// is set, or when a command is given a trace file (`keel batch --trace FILE`).
struct trace_config {
  /// Base URL of an OpenTelemetry collector's OTLP/HTTP receiver, e.g. "http://127.0.0.1:4318"
  /// (keel appends /v1/traces unless the path already ends so); empty: no OTLP export.
  std::string otlp_endpoint;
  /// Share of traces recorded, in [0, 1]; a caller's `traceparent` decides for its own trace.
  double sample_ratio = 1.0;
  /// The resource's `service.name`.
  std::string service_name = "keel";
  /// Environment variable holding extra export header fields as `name=value,name=value`
  /// (OpenTelemetry's format), e.g. a backend's key: read at start, never printed.
  std::string headers_env = "OTEL_EXPORTER_OTLP_HEADERS";
  /// Longest time one export may take, seconds.
  double timeout = 10;
  /// Root trace ids in AWS X-Ray's form (their first 4 bytes the Unix time), for a collector
  /// that exports to X-Ray.
  bool xray_ids = false;
};

/// A whole resolved config.
struct client_config {
  /// Primary first, then fallbacks in order; never empty.
  std::vector<entry_config> entries;
  /// The policy block.
  policy_config policy;
  /// The `serve` block (`keel serve` only).
  serve_config serve;
  /// The `trace` block.
  trace_config trace;
  /// Where it was read from (file name or "<config>").
  std::string source;
};

/// Why `path` cannot be read as a file ("" if it can): "it is a directory" or strerror's text.
std::string unreadable_file(const std::string& path);

/// Parses and validates config JSON text.
/// @param text the JSON.
/// @param source named in errors (a file name).
/// @param env environment lookup (api_key_env, AWS_* variables, AWS shared file locations).
/// @throws config_error naming the JSON path of the first bad value.
client_config parse_config(std::string_view text, const std::string& source, const env_lookup& env);

/// The largest config file `load_config` reads (64 MiB).
inline constexpr std::size_t max_config_bytes = std::size_t{64} << 20;

/// Reads and parses a config file.
/// @throws config_error if the file cannot be read (path ""), is larger than `max_config_bytes`
///   (e.g. /dev/zero) or is invalid.
client_config load_config(const std::string& file, const env_lookup& env = process_env());

/// The resolved config as JSON (every default filled in), for `--print-config` and
/// `keel config check`. With `redact`, secrets are replaced by "<redacted>" (or by
/// "<from $VAR>" for api_key_env), never shown, and so are the query values of `base_url`.
nlohmann::json to_json(const client_config& c, bool redact = true);

}  // namespace keel::llm
