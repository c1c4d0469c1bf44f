// Private declarations shared by the mock LLM server's source files (lib/testing/mock_*.cpp).
//
// The mock is split by purpose: mock_wire.cpp reads requests, mock_openai.cpp,
// mock_anthropic.cpp and mock_bedrock.cpp build each provider's bodies, mock_faults.cpp decides
// what a request gets (plans, limiter, headers), mock_schema.cpp builds structured-output answers
// and mock_llm_server.cpp runs the Beast sessions and the public API. Beast stays in the last.
#pragma once

#include <keel/random.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace keel::testing::detail {

using json = nlohmann::json;
using clock_type = std::chrono::steady_clock;
using std::chrono::milliseconds;

enum class wire { openai, anthropic, bedrock, unknown };

// What a request asked for, as far as the mock cares.
struct parsed_request {
  wire format = wire::unknown;
  bool malformed = false;  // body is not JSON or lacks the required fields
  std::string model;       // "" when it could not be read
  std::string last_user;   // text of the last user message
  std::size_t prompt_chars = 0;
  // OpenAI `response_format` json_object / json_schema: the content to answer with.
  std::optional<std::string> json_content;
  // The request offers tools, does not forbid them (tool_choice none) and does not end with tool
  // results: the mock answers with a call of the first tool (or the one tool_choice names) whose
  // arguments are the smallest instance of its schema (mock_schema.cpp).
  struct tool_answer {
    std::string name;
    std::string arguments;  // JSON text
  };
  std::optional<tool_answer> tool_call;
  bool stream = false;         // `"stream": true`, or Bedrock's converse-stream route
  bool include_usage = false;  // OpenAI `stream_options.include_usage`
};

// A streamed answer: the wire pieces in order, each written as its own HTTP chunk, and the
// mid-stream fault (if any) that replaces what follows `fault_at`.
struct stream_reply {
  struct part {
    std::string bytes;  // one SSE event, or one event-stream frame
    bool text = false;  // a text chunk: `chunk_latency` is waited before it
  };
  std::string content_type;
  std::vector<part> parts;
  milliseconds chunk_latency{0};
  fault_kind fault = fault_kind::ok;  // ok, or one of the stream_* kinds
  std::size_t fault_at = 0;           // parts written before the fault
  std::string fault_bytes;            // written at the fault (error event, half event, ...)
};

// One response, ready to write; `action` says whether to write it at all.
struct reply {
  fault_kind action = fault_kind::ok;  // ok: write normally; reset/stall/truncated: misbehave
  int status = 200;
  std::string reason;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  milliseconds latency{0};
  bool tail = false;                    // `latency` is the plan's tail latency
  fault_kind outcome = fault_kind::ok;  // what the plan decided (for the response log)
  std::optional<stream_reply> stream;   // set: stream this 200 instead of writing `body`
};

// ---- mock_wire.cpp: requests and shared wire helpers ----------------------------------------

// JSON dump that never throws on invalid UTF-8 cut out of a prompt.
std::string dump(const json& j);
// Reads the provider, model and prompt out of a request (see `parsed_request`).
parsed_request parse_request(std::string_view method, std::string_view target,
                             const std::string& body);
// The mock's token estimate: a quarter of the characters, at least one.
std::size_t tokens_for(std::size_t chars);
// The mock's canned answer to a prompt.
std::string completion_for(const std::string& prompt);
// The reason phrase the mock writes for `status`.
const char* reason_for(int status);
// `text` in pieces of about `bytes` bytes (at least 1), never splitting a UTF-8 sequence.
std::vector<std::string> split_text(const std::string& text, std::size_t bytes);
// One server-sent event: optional `event:` line, one `data:` line, blank line.
std::string sse_event(std::string_view event, std::string_view data);
// An SSE event whose JSON data is cut in half (still a complete event): `stream_corrupt`.
std::string corrupt_sse(const std::string& event);
// Sets `fault` to strike before part `at` (which must exist), writing `error_bytes` for the
// error kinds, the first half of part `at` for stream_truncated and `corrupted` for
// stream_corrupt. `fault` ok leaves the stream whole.
void place_fault(stream_reply& s, fault_kind fault, std::size_t at, std::string error_bytes,
                 std::string corrupted);

// ---- provider bodies: mock_openai.cpp, mock_anthropic.cpp, mock_bedrock.cpp ----------------

// What a provider's body for one answer is built from.
struct body_input {
  const std::string& id;          // the request's serial, e.g. "00000000002a"
  const std::string& request_id;  // Anthropic's request-id ("req_" + id)
  const parsed_request& request;
  const fault_plan* plan;  // null when no plan applies to the model
  std::optional<milliseconds> retry_after;
  bool tokens_limited;
  std::size_t prompt_tokens;
  const std::string& text;  // the completion of a successful answer
  std::size_t completion_tokens;
};

// OpenAI's duration format for x-ratelimit-reset-*: "20ms", "1.5s", "6m0s".
std::string openai_duration(milliseconds d);
json openai_error(std::string_view message, std::string_view type, json param, json code);
// Fills status and body of OpenAI's answer to a body that is not a valid request.
void openai_malformed(reply& r);
// Fills status and body of OpenAI's answer for `k` (an HTTP-level outcome other than malformed).
void openai_answer(reply& r, fault_kind k, const body_input& in);
// Builds OpenAI's streamed answer (`k` ok or content_filter) with the mid-stream `fault`.
stream_reply openai_stream(fault_kind k, fault_kind fault, const body_input& in);

// Anthropic's documented error body carries the request id at the top level too.
json anthropic_error(std::string_view type, std::string_view message, std::string_view request_id);
void anthropic_malformed(reply& r, const std::string& request_id);
void anthropic_answer(reply& r, fault_kind k, const body_input& in);
stream_reply anthropic_stream(fault_kind k, fault_kind fault, const body_input& in);

// Sets status, x-amzn-ErrorType and body of a Bedrock error.
void bedrock_error(reply& r, int status, std::string_view type, std::string_view message);
void bedrock_malformed(reply& r);
void bedrock_answer(reply& r, fault_kind k, const body_input& in);
stream_reply bedrock_stream(fault_kind k, fault_kind fault, const body_input& in);

// ---- mock_faults.cpp: limiter state and fault decisions ------------------------------------

// Capped at a day: a tiny configured rate gives waits whose milliseconds do not fit in an
// int64 (and converting such a double is undefined behaviour).
milliseconds ceil_ms(double seconds);

// A lazily refilled bucket: no timer, just arithmetic on the last refill instant.
struct bucket {
  double capacity = 0;
  double per_second = 0;
  double level = 0;
  clock_type::time_point last{};
  bool primed = false;

  bool enabled() const { return per_second > 0; }
  void refill(clock_type::time_point now) {
    if (!primed) {
      level = capacity;
      last = now;
      primed = true;
      return;
    }
    if (now > last) {
      level = std::min(capacity,
                       level + std::chrono::duration<double>(now - last).count() * per_second);
      last = now;
    }
  }
  // Seconds until `need` is available (0 if it is now).
  double wait_for(double need) const {
    need = std::min(need, capacity);
    // The epsilon keeps "retry exactly when the hint said" from failing on rounding.
    return level + 1e-9 >= need ? 0.0 : (need - level) / per_second;
  }
  milliseconds until_full() const { return ceil_ms((capacity - level) / per_second); }
  // Switches to `rate` (per second) at `at`. What was earned before `at` accrues at the old rate,
  // so a change applied late (at the next request) gives the same level as one applied on time.
  // The capacity is fixed when the bucket is first switched on (`configured`, else `derived`):
  // a later change is purely a change of rate. A bucket switched on starts full.
  void set_rate(double rate, double configured, double derived, clock_type::time_point at) {
    const bool was_enabled = enabled();
    if (was_enabled && primed) {
      refill(at);
    }
    per_second = rate;
    if (!enabled()) {
      return;
    }
    if (capacity <= 0) {
      capacity = configured > 0 ? configured : derived;
    }
    if (!was_enabled) {
      primed = false;
    }
  }
};

// The schedule in the order it applies: by instant, ties in list order.
std::vector<rate_change> sorted_schedule(const std::vector<rate_change>& changes);

// Per-model state: the plan, its generator, script position, limiter buckets and how much of the
// limit schedule has been applied.
struct model_state {
  fault_plan plan;
  std::unique_ptr<keel::random_source> rng;
  // The tail draw has a generator of its own, drawn once per request that gets a latency: which
  // requests are slow then depends on the seed and the request's rank only, not on how many
  // draws the faults and the latency range took before it.
  std::unique_ptr<keel::random_source> tail_rng;
  std::size_t script_pos = 0;
  bucket requests;
  bucket tokens;
  std::vector<rate_change> schedule;  // sorted
  std::size_t schedule_pos = 0;

  model_state(fault_plan p, std::uint64_t seed)
      : plan(std::move(p)),
        rng(std::make_unique<keel::random_source>(seed)),
        tail_rng(std::make_unique<keel::random_source>(seed ^ 0x7461696c5f726e67ULL)),
        schedule(sorted_schedule(plan.rate_schedule)) {
    set_requests(plan.requests_per_second, {});
    set_tokens(plan.tokens_per_minute, {});
  }

  void set_requests(double rps, clock_type::time_point at) {
    requests.set_rate(rps, plan.burst, std::max(1.0, rps), at);
  }
  void set_tokens(double tpm, clock_type::time_point at) {
    tokens.set_rate(tpm / 60.0, plan.token_burst, tpm, at);
  }

  // Applies, in order, every scheduled change due by `now`. Lazy like the buckets: no timer.
  void apply_schedule(clock_type::time_point started, clock_type::time_point now) {
    while (schedule_pos < schedule.size() && started + schedule[schedule_pos].at <= now) {
      const rate_change& c = schedule[schedule_pos++];
      const auto at = started + c.at;
      if (c.requests_per_second) {
        set_requests(*c.requests_per_second, at);
      }
      if (c.tokens_per_minute) {
        set_tokens(*c.tokens_per_minute, at);
      }
    }
  }
};

}  // namespace keel::testing::detail

namespace keel::testing {

// The server's state. Decisions (mock_faults.cpp) run under `mu` on any thread; I/O
// (mock_llm_server.cpp) runs on the executor.
struct mock_llm_server::impl : std::enable_shared_from_this<impl> {
  // One accepted connection. While a response is in progress a "close watcher" keeps a read
  // outstanding on the socket (see watch_client in mock_llm_server.cpp), so that a client that
  // gives up is noticed at once, even while the mock sleeps out latency: the watcher records the
  // instant and cancels `timer`. Touched on the executor only.
  struct connection {
    boost::asio::ip::tcp::socket socket;
    boost::asio::steady_timer timer;       // latency and chunk pacing
    boost::asio::steady_timer watch_done;  // never expires; cancelled when the watcher stops
    boost::asio::cancellation_signal watch_cancel;
    std::uint64_t serial = 0;
    unsigned short peer_port = 0;
    detail::clock_type::time_point accepted_at{};
    bool watching = false;       // a watcher read is outstanding
    bool unwatch = false;        // stop_watch asked the watcher not to read again
    bool client_closed = false;  // the watcher saw EOF or an error from the client
    detail::clock_type::time_point closed_at{};
    // Bytes the client sent while a response was in progress (a pipelined request), handed to
    // the request parser afterwards. Bounded: when full the watcher stops reading.
    std::vector<char> early;
    std::size_t early_size = 0;
    explicit connection(boost::asio::ip::tcp::socket s)
        : socket(std::move(s)),
          timer(socket.get_executor()),
          watch_done(socket.get_executor()),
          early(16 * 1024) {}
  };

  boost::asio::any_io_executor ex;
  mock_options opts;
  boost::asio::ip::tcp::acceptor acceptor;
  unsigned short bound_port = 0;
  bool running = false;
  std::unordered_set<connection*> live;  // touched on the executor only

  mutable std::mutex mu;  // guards everything below
  std::uint64_t seed;
  std::map<std::string, fault_plan> plans;
  std::map<std::string, std::unique_ptr<detail::model_state>> states;  // by request model
  detail::clock_type::time_point started{};
  std::uint64_t next_id = 0;
  mock_stats counters;
  std::deque<response_record> log;  // becomes counters.responses in stats()

  impl(boost::asio::any_io_executor e, mock_options o)
      : ex(std::move(e)), opts(std::move(o)), acceptor(ex), seed(opts.seed) {}

  detail::clock_type::time_point now() const {
    return opts.now ? opts.now() : detail::clock_type::now();
  }

  // ---- decisions (under mu), in mock_faults.cpp ----

  detail::model_state* state_for(const std::string& model);
  std::string request_id();
  // Fills `r` with the provider's answer for `k` (an HTTP-level outcome). A 429 states
  // `retry_after` unless it is empty or the plan's format is `none`.
  void answer(detail::reply& r, fault_kind k, const detail::parsed_request& pr,
              detail::model_state* st, std::optional<detail::milliseconds> retry_after,
              bool tokens_limited, bool limiter_429);
  detail::reply decide(const detail::parsed_request& pr);

  // ---- counters (under mu) ----

  template <class F>
  void count(const std::string& model, F f) {
    std::lock_guard lock(mu);
    f(counters.total);
    if (!model.empty()) {
      f(counters.by_model[model]);
    }
  }

  // Appends to the response log (under mu), dropping the oldest beyond opts.response_log.
  void log_response(response_record rec);

  // ---- I/O (on the executor), in mock_llm_server.cpp ----

  static boost::asio::awaitable<void> session(std::shared_ptr<impl> self,
                                              std::shared_ptr<connection> c);
  // Starts the close watcher on `c` (a read outstanding until stop_watch, a close or stop()).
  static void watch_client(std::shared_ptr<connection> c);
  // Marks `rec` abandoned (at the instant the watcher saw the close, else now) and counts it.
  static void abandon(const std::shared_ptr<impl>& self, const connection& c,
                      const std::string& model, response_record& rec);
  // After the last write of a response: completed, or abandoned if the write failed or the
  // client had closed. Returns whether it completed.
  static bool finish(const std::shared_ptr<impl>& self, const connection& c,
                     const std::string& model, response_record& rec,
                     const boost::system::error_code& ec);
  // Stops the close watcher and waits until its read has completed.
  static boost::asio::awaitable<void> stop_watch(std::shared_ptr<connection> c);
  // Waits until the client closes `c` (true) or stop() does (false), dropping what it sends.
  static boost::asio::awaitable<bool> await_close(std::shared_ptr<impl> self,
                                                  std::shared_ptr<connection> c);
  // Waits out the latency and writes (or withholds) `r`, filling `rec`'s instants. Returns
  // whether the connection may serve another request.
  static boost::asio::awaitable<bool> respond(std::shared_ptr<impl> self,
                                              std::shared_ptr<connection> c, const detail::reply& r,
                                              const std::string& model, unsigned version,
                                              bool keep_alive, response_record& rec);
  // Writes a streamed 200 (`r.stream`), one HTTP chunk per part, and carries out its fault.
  // Returns whether the connection may serve another request.
  static boost::asio::awaitable<bool> write_stream(std::shared_ptr<impl> self,
                                                   std::shared_ptr<connection> c,
                                                   const detail::reply& r, const std::string& model,
                                                   unsigned version, bool keep_alive,
                                                   response_record& rec);
  static boost::asio::awaitable<void> refuse_too_large(std::shared_ptr<impl> self,
                                                       std::shared_ptr<connection> c,
                                                       const std::string& target);
  static boost::asio::awaitable<void> accept_loop(std::shared_ptr<impl> self);
  void start();
  void stop();
};

}  // namespace keel::testing
