// A fault-injecting mock of the OpenAI, Anthropic and Bedrock HTTP APIs, for tests and benchmarks.
#pragma once

// Overview
// --------
// `keel::testing::mock_llm_server` is a real HTTP/1.1 server (Beast, kept inside lib/testing)
// that listens on `127.0.0.1:0` and answers the three wire formats keel speaks:
//
//   - OpenAI chat completions   `POST /v1/chat/completions`
//   - Anthropic messages        `POST /v1/messages`
//   - Amazon Bedrock Converse   `POST /model/{modelId}/converse`
//                               `POST /model/{modelId}/converse-stream`
//
// Requests with `"stream": true` (and every converse-stream request) are answered with the
// provider's stream: OpenAI `chat.completion.chunk` server-sent events ending in `data: [DONE]`
// (with a usage chunk when `stream_options.include_usage` is true), Anthropic's `message_start`
// ... `message_stop` events, or Bedrock ConverseStream event-stream frames. Each event is its
// own HTTP chunk (chunked transfer encoding), paced by `stream_settings::chunk_latency`, and the
// `stream_*` fault kinds break a stream midway: a dropped connection, a stall, an error event,
// a truncated event or frame, a bad CRC.
//
// Successful answers are deterministic: the completion text is "mock answer to: " followed by
// the first 40 bytes of the last user message, and usage is estimated as one token per four
// bytes. An OpenAI request with `response_format` `json_object` gets `{}` and one with
// `json_schema` gets a minimal instance of the schema, so that a client that parses the content
// as JSON (an SDK's `parse()`) succeeds. Malformed JSON is answered with the provider's own 400
// error body.
//
// A `fault_plan` per model (the request's model, or "*" as a template for every model without a
// plan of its own) makes the server misbehave the way providers do: latency, random errors
// (429, 500, 503, 529, Bedrock ThrottlingException, quota exhausted, context too long, 401/403,
// 404, content filter, 408/504 timeouts, a 200 that is not JSON), a server-side rate limit with
// an honest delay hint (`retry-after`/`retry-after-ms`, or one chosen form: seconds, HTTP-date,
// milliseconds, `x-amz-retry-after`), outage windows, connection resets, stalls, truncated
// bodies and scripted sequences. The limiter can also behave like servers that do not advertise
// their limits (Bedrock, vLLM, nginx `limit_req`): no `x-ratelimit-*` headers, a constant or
// absent Retry-After, a small token bucket, and limits that change on a schedule. Every error is
// sent with the body shape and headers the provider documents; `fault_plan::quirks` and
// `retry_after_format` bring back non-documented variants (Azure's content filter, ...). Random
// choices come from a seeded generator per model, so a single-client run is reproducible.
//
// For each request the server decides, in this order: outage window (503) → next scripted
// outcome (decides outright, even "ok") → context window → rate limit (429) → random faults →
// success. Latency is applied before every answer, including errors; a seeded fraction of
// requests can get a much longer "tail" latency instead (`fault_plan::tail_fraction`).
//
// `stats()` counts requests, statuses, resets, stalls, truncations, streams and mid-stream
// faults per model and in total, plus accepted connections, so a test can measure retry
// amplification exactly. It also counts responses the client abandoned (closed the connection
// before their last byte: while the mock waited out latency, stalled or streamed; the mock
// watches the socket throughout, so it notices at once), and keeps a bounded log of the latest
// responses with their real `steady_clock` instants (`mock_stats::responses`), so a benchmark can
// measure how soon a hedging client drops the loser after the winner finished.
//
// Example:
//
//     using keel::testing::fault_kind;
//     boost::asio::io_context ctx;
//     keel::testing::mock_llm_server server{ctx, {.seed = 42}};
//     server.set_plan("gpt-4o-mini",
//                     keel::testing::fault_plan{}
//                         .with_script({fault_kind::unavailable, fault_kind::unavailable})
//                         .with_probability(fault_kind::rate_limit, 0.1));
//     server.start();
//     // ... point a client at server.base_url() and run ctx ...
//     CHECK(server.stats().status_count(503) == 2);
//
// Scenario files (JSON; format in docs/mock_llm_server.md) give the same plans without code:
// `server.set_scenario(keel::testing::load_scenario("docs/scenarios/demo.json"))`.
//
// Lifetime: the io_context must outlive the server.
//
// Thread safety: the server lives on the executor it was given. `start()` and `stop()` must be
// called on that executor's thread or while it is not running; `stats()`, `reset_stats()`,
// `current_limit()`, `set_plan()`, `set_scenario()` and `clear_plans()` are safe from any thread
// (one mutex).

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keel::testing {

/// What the mock server does with one request.
enum class fault_kind {
  ok,               ///< Answer normally (200).
  rate_limit,       ///< 429 rate limit (Bedrock: ThrottlingException) with Retry-After.
  server_error,     ///< 500 (OpenAI server_error, Anthropic api_error, Bedrock InternalServer).
  unavailable,      ///< 503 (Bedrock ServiceUnavailableException).
  overloaded,       ///< Anthropic 529 overloaded_error; 503 "overloaded" for the others.
  throttling,       ///< Bedrock 429 ThrottlingException; the others' 429 rate limit.
  quota_exhausted,  ///< OpenAI 429 insufficient_quota; Anthropic 400 credit balance;
                    ///< Bedrock 400 ServiceQuotaExceededException.
  context_length,   ///< OpenAI 400 context_length_exceeded; Anthropic 400 "prompt is too
                    ///< long"; Bedrock 400 ValidationException "Input is too long".
  reset,            ///< Close the connection without answering (TCP RST).
  stall,            ///< Never answer; the connection stays open until the client gives up.
  truncated,        ///< Send a Content-Length larger than the body, then close.
  auth,             ///< OpenAI 401 invalid_api_key; Anthropic 401 authentication_error;
                    ///< Bedrock 403 AccessDeniedException.
  not_found,        ///< OpenAI 404 model_not_found; Anthropic 404 not_found_error; Bedrock 404
                    ///< ResourceNotFoundException.
  content_filter,   ///< OpenAI 200 with finish_reason "content_filter" (Azure's 400 with
                    ///< `quirks.azure_content_filter`); Anthropic 200 with stop_reason
                    ///< "refusal"; Bedrock 200 with stopReason "guardrail_intervened".
  timeout,          ///< OpenAI 504 (408 with `quirks.openai_timeout_408`); Anthropic 504
                    ///< timeout_error; Bedrock 408 ModelTimeoutException.
  malformed,        ///< 200 whose body is cut in half: not valid JSON.
  bad_request,      ///< OpenAI 400 invalid_request_error (bad parameter); Anthropic 400
                    ///< invalid_request_error; Bedrock 400 ValidationException.
  // Mid-stream faults: a streaming request gets a 200 stream that goes wrong after
  // `stream_settings::fault_after_chunks` text chunks; a non-streaming request is answered
  // normally (as `ok`).
  stream_drop,       ///< Close the connection (FIN) mid-body: the chunked body never ends.
  stream_stall,      ///< Send nothing more; the connection stays open until the client gives up.
  stream_error,      ///< The provider's mid-stream error event: OpenAI `{"error":{"type":
                     ///< "server_error"}}` data, Anthropic `event: error` overloaded_error,
                     ///< Bedrock exception modelStreamErrorException; then the body ends.
  stream_throttled,  ///< A mid-stream rate-limit error: OpenAI `rate_limit_exceeded` data,
                     ///< Anthropic `event: error` rate_limit_error, Bedrock exception
                     ///< throttlingException; then the body ends.
  stream_truncated,  ///< Send the first half of the next event (Bedrock: frame), then end the
                     ///< body properly: the HTTP response is complete, the stream is not.
  stream_corrupt,    ///< Bedrock: the next frame with a wrong message CRC; OpenAI and Anthropic:
                     ///< a complete event whose JSON data is cut in half. Then the body ends.
};

/// True for the mid-stream fault kinds (`stream_drop` ... `stream_corrupt`).
constexpr bool is_stream_fault(fault_kind k) noexcept {
  return k >= fault_kind::stream_drop && k <= fault_kind::stream_corrupt;
}

/// The scenario-file name of a fault kind ("ok", "rate_limit", ..., "malformed").
std::string_view to_string(fault_kind k) noexcept;

/// The fault kind named `name`, if any (the names `to_string` returns).
std::optional<fault_kind> parse_fault_kind(std::string_view name) noexcept;

/// Which delay headers a 429 carries (every form states the same delay: `fault_plan::retry_after`,
/// or for the limiter's own 429s what `fault_plan::limiter_retry_after` chooses).
enum class retry_after_style {
  provider,      ///< What each provider documents (the default). Random and scripted 429s: OpenAI
                 ///< `retry-after` (seconds, rounded up) and `retry-after-ms`; Anthropic only
                 ///< `retry-after`; Bedrock none (it documents no delay header). The limiter's own
                 ///< 429s keep `both` on every format: its honest hint is what they are for.
  both,          ///< `retry-after` (seconds, rounded up) and `retry-after-ms`, on every format.
  milliseconds,  ///< Only `retry-after-ms`.
  seconds,       ///< Only `Retry-After` delta-seconds, rounded up.
  http_date,     ///< Only `Retry-After` as an IMF-fixdate: `system_clock::now()` + delay, rounded
                 ///< up to the next whole second (real wall clock, not `mock_options::now`).
  amz,           ///< Only `x-amz-retry-after` in milliseconds (Bedrock's form; sent on any format).
  none,          ///< No delay header on any 429 (scripted, random or from the limiter), and no
                 ///< "try again in" in the OpenAI body.
};

/// The scenario-file name of a retry-after style ("provider", "both", "milliseconds", "seconds",
/// "http_date", "amz", "none").
std::string_view to_string(retry_after_style s) noexcept;

/// The retry-after style named `name`, if any (the names `to_string` returns).
std::optional<retry_after_style> parse_retry_after_style(std::string_view name) noexcept;

/// What delay the rate limiter's own 429s state (random and scripted 429s always state
/// `fault_plan::retry_after`).
enum class limiter_retry_after_mode {
  exact,     ///< The exact time until the buckets have room, in `retry_after_format` (default).
  constant,  ///< `fault_plan::retry_after` whatever the real wait, in `retry_after_format` (an
             ///< nginx `limit_req` with `add_header Retry-After 1`).
  none,      ///< No delay header and no "try again in" in the OpenAI body (vLLM, most proxies).
};

/// The scenario-file name of a limiter retry-after mode ("exact", "constant", "none").
std::string_view to_string(limiter_retry_after_mode m) noexcept;

/// The limiter retry-after mode named `name`, if any (the names `to_string` returns).
std::optional<limiter_retry_after_mode> parse_limiter_retry_after_mode(
    std::string_view name) noexcept;

/// A change of the server-side rate limit, in force from `at` (measured from `start()`) on.
/// An empty field keeps its current value; 0 switches that part of the limit off.
struct rate_change {
  /// When the change takes effect, from server start.
  std::chrono::milliseconds at{0};
  /// New request rate, if it changes.
  std::optional<double> requests_per_second;
  /// New token rate, if it changes.
  std::optional<double> tokens_per_minute;
};

/// The rates of a server-side limiter at one instant (0: that part is off).
struct rate_limits {
  /// Requests per second.
  double requests_per_second = 0;
  /// Tokens (prompt + completion) per minute.
  double tokens_per_minute = 0;
};

/// A period, measured from `start()`, during which every request is answered 503.
struct outage_window {
  /// Start of the outage, from server start.
  std::chrono::milliseconds from{0};
  /// End of the outage (exclusive), from server start.
  std::chrono::milliseconds to{0};
};

/// Deviations from the providers' documented shapes, for clients written against them (all off
/// by default: the mock then answers as each provider documents).
struct provider_quirks {
  /// OpenAI `timeout` answers 408 Request Timeout (the mock's old shape) instead of 504.
  bool openai_timeout_408 = false;
  /// OpenAI `content_filter` answers as Azure OpenAI does: 400 with `code: "content_filter"`,
  /// instead of OpenAI's 200 with `finish_reason: "content_filter"`.
  bool azure_content_filter = false;
};

/// How the mock streams a reply (requests with `"stream": true`, or Bedrock `converse-stream`).
struct stream_settings {
  /// Delay before each text chunk (the head of the stream, up to the first text chunk, goes out
  /// after the plan's latency without it).
  std::chrono::milliseconds chunk_latency{0};
  /// Bytes of reply text per chunk (never splitting a UTF-8 sequence; at least 1). The default,
  /// 4, gives as many chunks as the mock counts completion tokens.
  std::size_t chunk_bytes = 4;
  /// Text chunks sent before a mid-stream fault (`stream_drop` ... `stream_corrupt`); at or past
  /// the number of chunks, the fault comes after the last one, before the stream's end.
  std::size_t fault_after_chunks = 1;

  stream_settings() = default;
};

/// How one model misbehaves. A default-constructed plan never fails and answers at once.
struct fault_plan {
  /// Smallest added latency before each answer.
  std::chrono::milliseconds latency_min{0};
  /// Largest added latency (uniform in [min, max]; equal values mean fixed latency).
  std::chrono::milliseconds latency_max{0};
  /// Probability of each random fault per request (kinds are tried in enum order; the sum
  /// should be at most 1).
  std::map<fault_kind, double> probability;
  /// Retry-After sent with randomly injected or scripted 429s.
  std::chrono::milliseconds retry_after{1000};
  /// Which headers carry the delay of every 429 (scripted, random or from the limiter).
  retry_after_style retry_after_format = retry_after_style::provider;
  /// What delay the limiter's own 429s state: the exact wait, `retry_after`, or none.
  limiter_retry_after_mode limiter_retry_after = limiter_retry_after_mode::exact;
  /// Whether responses carry `x-ratelimit-*` / `anthropic-ratelimit-*` headers for the limits
  /// this plan enforces (false: none at all, like Bedrock, vLLM or an nginx limiter).
  bool rate_limit_headers = true;
  /// Server-side request rate limit (0: none).
  double requests_per_second = 0;
  /// Request bucket capacity (0: max(1, requests_per_second)).
  double burst = 0;
  /// Server-side token rate limit on prompt + completion tokens (0: none).
  double tokens_per_minute = 0;
  /// Token bucket capacity (0: one minute's worth, `tokens_per_minute`). A request larger than
  /// the capacity is admitted when the bucket is full, and empties it.
  double token_burst = 0;
  /// Changes of `requests_per_second` / `tokens_per_minute` over time, applied in order of `at`
  /// (equal instants: in list order). From each change on the buckets refill at the new rate,
  /// keeping their level; their capacities never change (`burst`/`token_burst`, or derived once
  /// from the first non-zero rate), so a change is purely a change of rate. A part switched on
  /// (from 0) starts with a full bucket.
  std::vector<rate_change> rate_schedule;
  /// Prompt-token limit; a longer prompt gets the context-length error (0: none).
  std::size_t context_window = 0;
  /// Outage windows.
  std::vector<outage_window> outages;
  /// Outcomes for the first requests, consumed in order; afterwards the plan applies.
  std::vector<fault_kind> script;
  /// Non-documented shapes to answer with instead of the documented ones.
  provider_quirks quirks;
  /// How streamed replies are paced and where mid-stream faults strike.
  stream_settings stream;
  /// Probability (0..1) that a request waits `tail_latency` instead of its drawn latency: the
  /// slow tail of a real provider. Drawn from a seeded generator of its own (one draw per
  /// request that gets a latency), so the same requests are slow whatever the other faults.
  double tail_fraction = 0;
  /// Latency of a tail request, in place of the drawn one (a tail never shortens a request: the
  /// longer of the two is waited). Absolute rather than a multiple of the draw, so that the
  /// slow calls take a known time a test or a hedge delay can be set against, even when the
  /// plan's latency is zero or spread out. Like all latency it is waited before the first byte:
  /// for a stream it delays the head and first token, not each chunk.
  std::chrono::milliseconds tail_latency{0};

  fault_plan() = default;

  /// Sets a fixed latency. @returns *this.
  fault_plan& with_latency(std::chrono::milliseconds fixed) {
    latency_min = latency_max = fixed;
    return *this;
  }
  /// Sets a uniform latency in [lo, hi]. @returns *this.
  fault_plan& with_latency(std::chrono::milliseconds lo, std::chrono::milliseconds hi) {
    latency_min = lo;
    latency_max = hi;
    return *this;
  }
  /// Sets the Retry-After delay of random and scripted 429s and how it is sent. @returns *this.
  fault_plan& with_retry_after(std::chrono::milliseconds delay,
                               retry_after_style style = retry_after_style::provider) {
    retry_after = delay;
    retry_after_format = style;
    return *this;
  }
  /// Sets the probability of a random fault. @returns *this.
  fault_plan& with_probability(fault_kind k, double p) {
    probability[k] = p;
    return *this;
  }
  /// Sets a server-side rate limit (0 disables either part). @returns *this.
  fault_plan& with_rate_limit(double rps, double tpm = 0, double bucket_burst = 0) {
    requests_per_second = rps;
    tokens_per_minute = tpm;
    burst = bucket_burst;
    return *this;
  }
  /// Sets the token bucket capacity (0: one minute's worth). @returns *this.
  fault_plan& with_token_burst(double tokens) {
    token_burst = tokens;
    return *this;
  }
  /// Sends or suppresses the rate-limit headers. @returns *this.
  fault_plan& with_rate_limit_headers(bool send) {
    rate_limit_headers = send;
    return *this;
  }
  /// Sets what delay the limiter's own 429s state. @returns *this.
  fault_plan& with_limiter_retry_after(limiter_retry_after_mode mode) {
    limiter_retry_after = mode;
    return *this;
  }
  /// Adds a limit change at `at` from server start (an empty rate keeps its value; 0 switches
  /// that part off). @returns *this.
  fault_plan& with_rate_change(std::chrono::milliseconds at, std::optional<double> rps,
                               std::optional<double> tpm = std::nullopt) {
    rate_schedule.push_back(rate_change{at, rps, tpm});
    return *this;
  }
  /// The rates in force `since_start` after server start: the plan's, updated by every
  /// `rate_schedule` change with `at <= since_start`.
  rate_limits limits_at(std::chrono::milliseconds since_start) const;
  /// Adds an outage window [from, to) measured from server start. @returns *this.
  fault_plan& with_outage(std::chrono::milliseconds from, std::chrono::milliseconds to) {
    outages.push_back(outage_window{from, to});
    return *this;
  }
  /// Sets the non-documented shapes to answer with. @returns *this.
  fault_plan& with_quirks(provider_quirks q) {
    quirks = q;
    return *this;
  }
  /// Sets how streamed replies are paced and where mid-stream faults strike. @returns *this.
  fault_plan& with_stream(stream_settings s) {
    stream = s;
    return *this;
  }
  /// Makes a `fraction` (0..1) of requests wait `latency` instead of their drawn latency.
  /// @returns *this.
  fault_plan& with_tail(double fraction, std::chrono::milliseconds latency) {
    tail_fraction = fraction;
    tail_latency = latency;
    return *this;
  }
  /// Appends scripted outcomes, consumed one per request. @returns *this.
  fault_plan& with_script(std::vector<fault_kind> outcomes) {
    script.insert(script.end(), outcomes.begin(), outcomes.end());
    return *this;
  }
};

/// A bad scenario file or JSON text; `what()` and `path()` name the offending JSON location.
class scenario_error : public std::runtime_error {
 public:
  /// An error at JSON pointer `json_path` (e.g. "/models/gpt-4o/latency_ms/min").
  scenario_error(std::string json_path, std::string message)
      : std::runtime_error((json_path.empty() ? std::string("(document)") : json_path) + ": " +
                           message),
        path_(std::move(json_path)),
        message_(std::move(message)) {}
  /// The JSON pointer of the offending value ("" for the whole document or the file).
  const std::string& path() const noexcept { return path_; }
  /// What is wrong, without the path.
  const std::string& message() const noexcept { return message_; }

 private:
  std::string path_;
  std::string message_;
};

/// Fault plans for several models, as loaded from a scenario file.
struct scenario {
  /// Seed to use instead of `mock_options::seed`, if the file gives one.
  std::optional<std::uint64_t> seed;
  /// Plans by model name; "*" applies to models without their own plan.
  std::map<std::string, fault_plan> plans;

  /// Parses scenario JSON text (format in docs/mock_llm_server.md).
  /// @throws scenario_error naming the JSON path of the first bad value.
  static scenario from_json(std::string_view json_text);
};

/// Reads and parses a scenario file.
/// @throws scenario_error if the file cannot be read (path "") or its JSON is bad.
scenario load_scenario(const std::string& file_path);

/// Counters for one model (or for the whole server).
struct mock_model_stats {
  /// Requests received (parsed HTTP requests, whatever the outcome).
  std::uint64_t requests = 0;
  /// Responses sent, by HTTP status.
  std::map<int, std::uint64_t> by_status;
  /// Connections reset instead of answering.
  std::uint64_t resets = 0;
  /// Requests left unanswered on purpose.
  std::uint64_t stalls = 0;
  /// Responses cut short.
  std::uint64_t truncations = 0;
  /// Streamed responses started (also counted in `by_status`).
  std::uint64_t streams = 0;
  /// Mid-stream faults carried out (a fault planned after the client went away is not).
  std::uint64_t stream_faults = 0;
  /// Requests given the plan's tail latency (`fault_plan::tail_fraction`).
  std::uint64_t tail_delays = 0;
  /// Responses the client abandoned: it closed the connection (FIN or RST) while the mock was
  /// waiting out latency, stalling (`stall`, `stream_stall`) or writing, before the last byte.
  std::uint64_t abandoned = 0;
  /// The body of the latest request (what a client sent, for tests of its wire format).
  std::string last_body;
  /// The W3C `traceparent` of each request that carried one, in arrival order (the first 4096;
  /// for tests of trace propagation).
  std::vector<std::string> traceparents;

  /// Responses sent with `status` (0 if none).
  std::uint64_t status_count(int status) const {
    auto it = by_status.find(status);
    return it == by_status.end() ? 0 : it->second;
  }
};

/// How one response went, for benchmarks that match the mock's view to a client's. Instants are
/// the real `std::chrono::steady_clock` (not `mock_options::now`), taken on the mock's executor.
struct response_record {
  using time_point = std::chrono::steady_clock::time_point;
  /// Serial of the connection the request came on (1 for the first accepted).
  std::uint64_t connection = 0;
  /// The client's port on that connection (its `local_endpoint().port()`), to match a record to
  /// one of the client's attempts without any header.
  unsigned short peer_port = 0;
  /// The request's model ("" when it could not be read).
  std::string model;
  /// What the plan decided (`ok` for a plain success; a stream fault for a faulty stream).
  fault_kind outcome = fault_kind::ok;
  /// HTTP status of the response, as decided (also when it was never written).
  int status = 0;
  /// Whether the request got the tail latency.
  bool tail = false;
  /// The latency waited (or to be waited) before the first byte.
  std::chrono::milliseconds latency{0};
  /// When the connection was accepted.
  time_point accepted_at{};
  /// When the request had been read whole.
  time_point received_at{};
  /// When the mock began to write the response (after the latency); empty if it never did.
  std::optional<time_point> first_byte_at;
  /// When the mock was done: the last byte handed to the socket, or the reset, truncation or
  /// mid-stream fault carried out. Empty for an abandoned response.
  std::optional<time_point> completed_at;
  /// When the mock noticed that the client had closed the connection before `completed_at`
  /// (set exactly for the responses counted in `mock_model_stats::abandoned`).
  std::optional<time_point> closed_by_client_at;
};

/// A snapshot of the server's counters.
struct mock_stats {
  /// TCP connections accepted.
  std::uint64_t accepted_connections = 0;
  /// Totals over every model (requests whose model could not be read count here only).
  mock_model_stats total;
  /// Counters per request model.
  std::map<std::string, mock_model_stats> by_model;
  /// The latest responses, oldest first, in the order they ended (completed, abandoned, or cut
  /// off by `stop()`: those have neither `completed_at` nor `closed_by_client_at`); at most
  /// `mock_options::response_log` of them. A 413 (body too large) has none.
  std::vector<response_record> responses;
  /// Records dropped from the front of `responses` to keep it within its bound.
  std::uint64_t responses_dropped = 0;

  /// Responses sent with `status`, over every model.
  std::uint64_t status_count(int status) const { return total.status_count(status); }
  /// Counters for `model` (zeros if it was never seen).
  mock_model_stats model(const std::string& name) const {
    auto it = by_model.find(name);
    return it == by_model.end() ? mock_model_stats{} : it->second;
  }
};

/// Construction options for `mock_llm_server`.
struct mock_options {
  /// Address to bind.
  std::string address = "127.0.0.1";
  /// Port to bind (0: any free port; read it back with `port()`).
  unsigned short port = 0;
  /// Seed of the per-model random generators.
  std::uint64_t seed = 0;
  /// Time source for outage windows and the rate limiter (empty: `steady_clock::now`). Tests
  /// inject a fake one to assert exact Retry-After values; latency always uses real timers.
  std::function<std::chrono::steady_clock::time_point()> now;
  /// Largest request body accepted, in bytes (nginx's default `client_max_body_size`, 1 MiB). A
  /// larger request is answered 413 in the provider's error shape (OpenAI `request_too_large`,
  /// Anthropic `request_too_large`, Bedrock a bare 413), with `Connection: close`, after the rest
  /// of the request body has been read and discarded (so that the client sees the answer rather
  /// than a reset), as nginx does.
  std::size_t max_request_body = 1024 * 1024;
  /// How many of the latest responses `stats().responses` keeps (0: none). Each is about 150
  /// bytes, and `stats()` copies them all.
  std::size_t response_log = 4096;
};

/// A mock LLM provider server with per-model fault plans and exact counters.
class mock_llm_server {
 public:
  /// Creates a stopped server that will run on `ex`.
  explicit mock_llm_server(boost::asio::any_io_executor ex, mock_options opts = {});
  /// Creates a stopped server that will run on `ctx`.
  explicit mock_llm_server(boost::asio::io_context& ctx, mock_options opts = {});
  /// Stops the server; in-flight sessions end when the executor next runs.
  ~mock_llm_server();

  mock_llm_server(const mock_llm_server&) = delete;
  mock_llm_server& operator=(const mock_llm_server&) = delete;

  /// Binds, listens and starts accepting; outage windows are measured from now.
  /// @throws boost::system::system_error if the address cannot be bound.
  void start();
  /// Stops accepting and closes every open connection (stalled ones too). Idempotent.
  void stop();
  /// The bound port (valid after `start()`).
  unsigned short port() const noexcept;
  /// "http://address:port", the base URL to give a client.
  std::string base_url() const;

  /// Sets the plan for `model` ("*": every model without its own plan), resetting its script
  /// position and rate-limit state.
  void set_plan(const std::string& model, fault_plan plan);
  /// Replaces every plan with the scenario's (and reseeds if it carries a seed).
  void set_scenario(const scenario& s);
  /// Removes every plan: the server then always succeeds at once.
  void clear_plans();

  /// A snapshot of the counters.
  mock_stats stats() const;
  /// The rates of `model`'s limiter at `mock_options::now` (its plan, or "*"'s, with the
  /// schedule applied; zeros without a plan). Meaningful after `start()`.
  rate_limits current_limit(const std::string& model) const;
  /// Sets every counter to zero.
  void reset_stats();

 private:
  struct impl;
  std::shared_ptr<impl> impl_;
};

}  // namespace keel::testing
