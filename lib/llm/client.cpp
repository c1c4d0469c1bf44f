// keel::llm::client, the configured policy stack (see keel/llm/client.hpp for the layering).
#include <keel/llm/client.hpp>

#include "wire_common.hpp"

#include <keel/aws/retry.hpp>
#include <keel/aws/sdk_request.hpp>
#include <keel/classify.hpp>
#include <keel/deadline.hpp>
#include <keel/fallback.hpp>
#include <keel/hedge.hpp>
#include <keel/http/error.hpp>
#include <keel/llm/aws_facts.hpp>
#include <keel/llm/complete.hpp>
#include <keel/llm/error.hpp>
#include <keel/llm/hints.hpp>
#include <keel/llm/stream.hpp>
#include <keel/llm/tokens.hpp>
#include <keel/retry.hpp>
#include <keel/stream_guard.hpp>

#include <boost/asio/error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

namespace keel::llm {
namespace asio = boost::asio;
using clock_type = std::chrono::steady_clock;
using std::chrono::duration_cast;
using std::chrono::nanoseconds;

namespace {

nanoseconds seconds_ns(double s) {
  if (!(s > 0)) {
    return nanoseconds{0};
  }
  return nanoseconds{static_cast<long long>(std::min(s, 1e9) * 1e9)};
}

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

bool is_code(const std::exception_ptr& e, keel::error code) {
  try {
    std::rethrow_exception(e);
  } catch (const boost::system::system_error& se) {
    return se.code() == keel::make_error_code(code);
  } catch (...) {
  }
  return false;
}

// True if the controller paces this dimension at a limit it learned from 429s.
bool learned(keel::pacing_phase p) {
  return p == keel::pacing_phase::search || p == keel::pacing_phase::cruise ||
         p == keel::pacing_phase::probe;
}

// Tells a bucket's controller how an attempt that failed ended: a rate limit (429,
// ThrottlingException) is a throttle, with the limit it names; any other answer from the server
// means its limiter let the call through; no answer (transport failure, timeout, cancellation)
// is no signal. True if it was a 429.
bool tell_pacing(keel::rate_controller& pacing, const keel::rate_controller::ticket& t,
                 const std::exception_ptr& e, nanoseconds max_hint) {
  try {
    std::rethrow_exception(e);
  } catch (const keel::llm::provider_error& pe) {
    if (pe.llm_code() == keel::llm::errc::rate_limited) {
      std::optional<keel::rate_controller::duration> hint;
      if (pe.retry_after()) {
        hint = std::chrono::duration_cast<keel::rate_controller::duration>(
            std::min<nanoseconds>(*pe.retry_after(), max_hint));
      }
      pacing.on_throttled(t, keel::llm::limit_of(pe), hint);
      return true;
    }
    if (pe.status() != 0) {
      pacing.on_accepted(t);
    } else {
      pacing.on_abandoned(t);
    }
    return false;
  } catch (...) {
  }
  pacing.on_abandoned(t);
  return false;
}

// The delay a 429 (or ThrottlingException) asked for, if it named one.
std::optional<nanoseconds> server_delay_of_429(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const keel::llm::provider_error& pe) {
    if (pe.llm_code() == keel::llm::errc::rate_limited && pe.retry_after()) {
      return std::chrono::duration_cast<nanoseconds>(*pe.retry_after());
    }
  } catch (...) {
  }
  return std::nullopt;
}

// True for a request keel refused to build (a part the entry's provider cannot take: status 0,
// bad_request): nothing was sent, so it says nothing about whether the server answers.
bool refused_locally(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const keel::llm::provider_error& pe) {
    return pe.status() == 0 && pe.llm_code() == keel::llm::errc::bad_request;
  } catch (...) {
  }
  return false;
}

// A stream consumer's own failure (its handler threw: in keel serve, the caller hung up and the
// write failed), carried through the policy stack as a cancellation and rethrown unchanged by
// finish_call. It is the caller's doing, not the provider's: as a cancellation no breaker,
// fleet breaker, retry budget or retry counts it (the socket error a hung-up caller leaves
// classifies as a transient failure, and 12 callers who hung up opened the provider's breaker
// for every other caller, and through Redis for the fleet).
class consumer_failure : public boost::system::system_error {
 public:
  // Hooks and the attempt's span see this (the attempt was abandoned: class "cancelled"), so
  // its message says what the consumer's error was.
  explicit consumer_failure(std::exception_ptr e)
      : boost::system::system_error(asio::error::operation_aborted,
                                    "the stream's consumer failed (" + keel::describe(e) + ")"),
        inner(std::move(e)) {}
  std::exception_ptr inner;
};

// `e`, or the consumer's own error if `e` is a consumer_failure.
std::exception_ptr unwrap_consumer_failure(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const consumer_failure& f) {
    return f.inner;
  } catch (...) {
  }
  return e;
}

// ---- traces (see docs/tracing.md for the attributes) ----------------------------------------

// OpenTelemetry GenAI's `gen_ai.provider.name` values.
const char* provider_name(keel::llm::provider_kind k) {
  switch (k) {
    case keel::llm::provider_kind::anthropic:
      return "anthropic";
    case keel::llm::provider_kind::bedrock:
      return "aws.bedrock";
    case keel::llm::provider_kind::openai:
      break;
  }
  return "openai";
}

// `server.address` and `server.port` of an entry (the provider's public host when no base_url).
std::pair<std::string, std::int64_t> server_of(const keel::llm::endpoint& ep) {
  std::string_view url = ep.base_url;
  std::int64_t port = 443;
  if (url.empty()) {
    switch (ep.kind) {
      case keel::llm::provider_kind::anthropic:
        return {"api.anthropic.com", port};
      case keel::llm::provider_kind::bedrock:
        return {"bedrock-runtime." + ep.region + ".amazonaws.com", port};
      case keel::llm::provider_kind::openai:
        break;
    }
    return {"api.openai.com", port};
  }
  if (url.starts_with("http://")) {
    port = 80;
  }
  if (const auto scheme = url.find("://"); scheme != std::string_view::npos) {
    url.remove_prefix(scheme + 3);
  }
  url = url.substr(0, url.find_first_of("/?#"));
  if (const auto at = url.rfind('@'); at != std::string_view::npos) {
    url.remove_prefix(at + 1);  // never the userinfo
  }
  const auto colon = url.rfind(':');
  if (colon != std::string_view::npos && url.find(']', colon) == std::string_view::npos) {
    std::int64_t p = 0;
    for (char c : url.substr(colon + 1)) {
      p = (c >= '0' && c <= '9' && p < 65536) ? p * 10 + (c - '0') : -1;
    }
    if (p > 0) {
      port = p;
    }
    url = url.substr(0, colon);
  }
  return {std::string(url), port};
}

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
  }
  return "unknown error";
}

double milliseconds_of(nanoseconds d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

// The GenAI request attributes of a call or attempt span.
void set_request_attributes(keel::trace::span& s, const keel::llm::chat_request& req,
                            const keel::llm::entry_config& e) {
  s.set("gen_ai.operation.name", "chat");
  s.set("gen_ai.provider.name", provider_name(e.api_type));
  s.set("gen_ai.system", provider_name(e.api_type));  // the attribute's older name
  s.set("gen_ai.request.model", req.model.empty() ? e.model : req.model);
  if (req.max_tokens > 0) {
    s.set("gen_ai.request.max_tokens", req.max_tokens);
  }
  if (req.temperature) {
    s.set("gen_ai.request.temperature", *req.temperature);
  }
  if (req.top_p) {
    s.set("gen_ai.request.top_p", *req.top_p);
  }
}

// The GenAI response attributes of a call or attempt span.
void set_response_attributes(keel::trace::span& s, const keel::llm::chat_response& r) {
  if (!r.model.empty()) {
    s.set("gen_ai.response.model", r.model);
  }
  // The completion's id (OpenAI `id`, Anthropic `id`); the HTTP request id is keel's own.
  if (!r.id.empty()) {
    s.set("gen_ai.response.id", r.id);
  }
  if (!r.request_id.empty()) {
    s.set("keel.request_id", r.request_id);
  }
  if (!r.finish_reason.empty()) {
    s.set("gen_ai.response.finish_reasons", std::vector<std::string>{r.finish_reason});
  }
  s.set("gen_ai.usage.input_tokens", static_cast<std::int64_t>(r.usage.input));
  s.set("gen_ai.usage.output_tokens", static_cast<std::int64_t>(r.usage.output));
}

// The record of an attempt sent at `sent`, for `client_hooks::on_attempt`.
attempt_report new_report(std::size_t entry, const void* context, clock_type::time_point sent) {
  attempt_report r;
  r.entry = entry;
  r.context = context;
  r.seconds = seconds_since(sent);
  return r;
}

// Forwards sends to the transport with the attempt's trace context in the header fields (added
// after SigV4 signing, unsigned, as the AWS SDKs add X-Amzn-Trace-Id).
struct traced_sender {
  keel::http::client& http;
  const keel::trace::span_context* context;
  asio::awaitable<keel::http::response> send(keel::http::request req) {
    if (context && context->valid()) {
      req.set("traceparent", keel::trace::to_traceparent(*context));
      if (!context->state.empty()) {
        req.set("tracestate", context->state);
      }
    }
    return http.send(std::move(req));
  }
};

}  // namespace

// ---- client --------------------------------------------------------------------------------

struct client::entry_state {
  std::size_t index = 0;
  const entry_config* cfg = nullptr;
  keel::llm::endpoint ep;
  keel::http::client* http = nullptr;  // the client of the entry's ca_file
  keel::throttler* bucket = nullptr;
  keel::rate_controller* pacing = nullptr;  // null with shared pacing off
  std::unique_ptr<keel::circuit_breaker> breaker;
  keel::retry_policy policy;                       // keel-native
  std::unique_ptr<keel::aws::retry_strategy> aws;  // AWS modes
  bool last = false;
  bool fleet_unreachable = false;  // the last fleet acquire failed (client_options::fleet)
  // True once the entry's server has sent any HTTP answer (a 503 too) in this client's life.
  // A server that has never answered, `policy.breaker.unanswered_grace` after its first
  // failure, is more likely a wrong base_url, port or network than an outage: its open breaker
  // is no longer waited for (see run_entry).
  bool answered = false;
  std::optional<clock_type::time_point> first_unanswered;  // its first failure without an answer
  std::exception_ptr last_unanswered;                      // the last one
  std::exception_ptr last_failure;   // the last failure its breaker counted (why it may be open)
  bool unanswered_reported = false;  // client_hooks::on_unanswered called
  nanoseconds unanswered_grace{0};   // policy.breaker.unanswered_grace
  bool given_up() const {
    return !answered && first_unanswered &&
           clock_type::now() - *first_unanswered >= unanswered_grace;
  }
  // policy.hedge (null when off): the entry's recent attempt latencies (streams: time to first
  // text) and its cap on hedges.
  std::unique_ptr<keel::latency_window> latencies;
  std::unique_ptr<keel::hedge_budget> hedges;
};

struct client::stream_state {
  explicit stream_state(bool restartable) : commit(restartable) {}
  delta_handler on_delta;
  double first_token_timeout = 0;  // seconds; 0: none (an entry's shorter timeout wins)
  double idle_timeout = 0;
  clock_type::time_point started;
  // The commit point (keel/stream_guard.hpp): past it a failure is not retried (unless
  // restartable) and the next attempt's first delta restarts the reply.
  keel::stream_commit commit;
  std::optional<double> first_token_seconds;
  // Tokens the failed attempt used, by estimate (settled into the bucket).
  double partial_tokens = 0;
  // True once no further retry or fallback may run.
  bool final() const noexcept { return commit.final(); }
};

struct client::call_state {
  keel::llm::chat_request request;
  const void* context = nullptr;
  int attempts = 0;
  std::size_t entry = 0;
  // The AWS SDK headers of the entry being tried (Bedrock only): one invocation per entry, as
  // each entry is a call on its own client, with its own attempt count and maximum.
  std::optional<keel::aws::sdk_invocation> invocation;
  // The attempt slot (client_options::attempt_slots) while the call holds one.
  keel::bulkhead_permit slot;
  // Streamed calls only (empty for `call`).
  std::optional<stream_state> stream;
  // The breaker permit of the attempt running for entry `gate_entry`, asked again just before
  // the request is sent (after the bucket's wait). Set by run_entry's `one` each time it enters
  // the entry's breaker, so an attempt of an entry with a breaker always finds its own permit
  // here; an attempt of another entry (a hedge to the next) does not use it.
  keel::circuit_breaker::permit* gate = nullptr;
  std::size_t gate_entry = 0;
  // Traces: the caller's context (invalid: none), the call's span (null without a tracer or
  // when not sampled), and what the call's span sums up at its end.
  keel::trace::span_context parent;
  keel::trace::span span;
  int fallbacks = 0;
  nanoseconds throttle_wait{0};
  // While the call is held at an open breaker (held_attempt): the entry's last counted failure,
  // the cause a deadline that ends the hold reports (else the record said only "deadline
  // exceeded", and a batch held at a failing provider never named the failure).
  std::exception_ptr held_because;
  // The context attempts send: the call's span's, or the caller's when there is no tracer.
  const keel::trace::span_context* outgoing() const noexcept {
    return span.context().valid() ? &span.context() : (parent.valid() ? &parent : nullptr);
  }
};

struct client::owned {
  owned(
      const asio::any_io_executor& ex, const client_options& options,
      std::function<void(const std::string&, const keel::pacing_state&, const keel::pacing_state&)>
          on_pacing)
      : seed(options.seed != 0 ? options.seed : std::random_device{}()),
        http(ex, options.http),
        buckets(ex, seed) {
    buckets.on_pacing = std::move(on_pacing);
  }
  std::uint64_t seed;
  http_clients http;
  bucket_registry buckets;
};

client::client(asio::any_io_executor ex, client_config cfg, client_hooks hooks,
               client_options options)
    // `hooks` is copied, not moved: the arguments' order of evaluation is unspecified.
    : client(std::make_unique<owned>(ex, options, hooks.on_pacing), ex, std::move(cfg), hooks,
             options) {}

client::client(std::unique_ptr<owned> own, asio::any_io_executor ex, client_config cfg,
               client_hooks hooks, client_options options)
    : client(
          std::move(ex), std::move(cfg),
          [p = own.get()](const entry_config& e) -> keel::http::client& {
            return p->http.get(e.ca_file);
          },
          own->buckets, std::move(hooks), own->seed, options) {
  own_ = std::move(own);  // the delegated constructor used them only while it ran
}

client::client(asio::any_io_executor ex, client_config cfg, http_clients& http,
               bucket_registry& buckets, client_hooks hooks, std::uint64_t seed,
               client_options options)
    : client(
          std::move(ex), std::move(cfg),
          [&http](const entry_config& e) -> keel::http::client& { return http.get(e.ca_file); },
          buckets, std::move(hooks), seed, options) {}

client::client(asio::any_io_executor ex, client_config cfg, keel::http::client& http,
               bucket_registry& buckets, client_hooks hooks, std::uint64_t seed,
               client_options options)
    : client(
          std::move(ex), std::move(cfg),
          [&http](const entry_config&) -> keel::http::client& { return http; }, buckets,
          std::move(hooks), seed, options) {}

client::client(asio::any_io_executor ex, client_config cfg, const transport_for& http,
               bucket_registry& buckets, client_hooks hooks, std::uint64_t seed,
               client_options options)
    : ex_(std::move(ex)),
      cfg_(std::move(cfg)),
      hooks_(std::move(hooks)),
      options_(options),
      random_(seed),
      invocation_ids_(seed ^ 0x616d7a2d73646bULL) {
  const policy_config& pol = cfg_.policy;
  if (options_.attempt_slots > 0) {
    keel::bulkhead_options bo;
    bo.max_concurrent = options_.attempt_slots;
    bo.max_queue = std::numeric_limits<std::size_t>::max();  // waits are bounded by the caller
    slots_ = std::make_unique<keel::bulkhead>(ex_, bo);
  }
  if (pol.retry_budget.enabled) {
    budget_ = std::make_unique<keel::retry_budget>(pol.retry_budget.max_tokens,
                                                   pol.retry_budget.token_ratio);
  }
  keel::backoff_strategy strategy{pol.retry.backoff};
  for (const auto& [c, b] : pol.retry.backoff_by_condition) {
    strategy.on(c, b);
  }
  for (const auto& e : cfg_.entries) {
    std::vector<const std::string*> candidates{&e.api_key};
    if (e.aws) {
      candidates.insert(candidates.end(),
                        {&e.aws->access_key, &e.aws->secret_key, &e.aws->session_token});
    }
    const std::vector<std::string> in_query = url_credentials(e.base_url);
    for (const std::string& v : in_query) {
      candidates.push_back(&v);
    }
    for (const std::string* c : candidates) {
      // A shorter string would match ordinary words; no real credential is that short.
      if (c->size() >= min_scrubbed_secret &&
          std::find(secrets_.begin(), secrets_.end(), *c) == secrets_.end()) {
        secrets_.push_back(*c);
      }
    }
  }
  for (std::size_t i = 0; i < cfg_.entries.size(); ++i) {
    auto es = std::make_unique<entry_state>();
    es->index = i;
    es->cfg = &cfg_.entries[i];
    es->ep = cfg_.entries[i].endpoint();
    es->http = &http(cfg_.entries[i]);
    // An entry in AWS adaptive mode is paced by that mode's own CUBIC limiter, as botocore
    // does; a second controller on the same calls would fight it.
    const bool aws_adaptive = cfg_.entries[i].aws_retry &&
                              cfg_.entries[i].aws_retry->mode == keel::aws::retry_mode::adaptive;
    es->bucket = &buckets.get(cfg_.entries[i], options_.shared_pacing && !aws_adaptive);
    es->pacing = options_.shared_pacing && !aws_adaptive ? buckets.pacing(*es->bucket) : nullptr;
    es->last = i + 1 == cfg_.entries.size();
    if (pol.breaker.enabled) {
      auto bp = keel::breaker_policy::consecutive(
          static_cast<std::size_t>(pol.breaker.failure_threshold),
          duration_cast<nanoseconds>(seconds_ns(pol.breaker.break_duration)));
      bp.break_growth = pol.breaker.break_growth;
      bp.max_break_duration = seconds_ns(pol.breaker.max_break);
      // Throttling is the bucket's business; a breaker opens on failures only.
      bp.counts_as_failure =
          keel::condition_set{keel::condition::transient, keel::condition::timeout};
      if (hooks_.on_breaker || options_.fleet) {
        bp.on_state_change = [this, i, es = es.get()](keel::breaker_state from,
                                                      keel::breaker_state to) {
          if (hooks_.on_breaker) {
            hooks_.on_breaker(i, from, to);
          }
          if (options_.fleet) {
            options_.fleet->on_breaker_change(*es->cfg, from, to,
                                              es->breaker->remaining_open_time());
          }
        };
      }
      es->breaker = std::make_unique<keel::circuit_breaker>(ex_, bp);
      es->unanswered_grace = seconds_ns(pol.breaker.unanswered_grace);
    }
    if (const auto& aws = cfg_.entries[i].aws_retry) {
      const double now =
          std::chrono::duration<double>(clock_type::now().time_since_epoch()).count();
      // The revision resolved with the mode (AWS_NEW_RETRIES_2026=true selects 2.1).
      es->aws = std::make_unique<keel::aws::retry_strategy>(*aws, now);
    } else {
      keel::retry_policy p;
      p.max_attempts = cfg_.entries[i].max_attempts;
      p.backoff = strategy;
      p.honour_retry_after = pol.retry.honour_retry_after;
      p.max_retry_after = seconds_ns(pol.retry.max_retry_after);
      p.budget = budget_.get();
      p.random = &random_;
      const bool last = es->last;
      // An open breaker is a reason to move on to the next entry; the last entry waits for it.
      p.retry_if = [last, es = es.get()](const std::exception_ptr& e, const keel::classification&) {
        return !is_code(e, keel::error::circuit_open) || (last && !es->given_up());
      };
      // A retry the budget refuses while the entry's breaker is open or half-open adds no load:
      // the breaker holds it (or, before the last entry, sends it on to the fallback) until a
      // probe has succeeded. Failing it instead failed every item whose attempt was in flight
      // when an outage began, beyond the budget's half (fleet.sh breaker; a 256-wide batch).
      if (es->breaker) {
        p.exempt_from_budget = [b = es->breaker.get()](const std::exception_ptr&,
                                                       const keel::classification&) {
          return b->state() != keel::breaker_state::closed;
        };
      }
      es->policy = std::move(p);
    }
    if (pol.hedge.enabled) {
      es->latencies = std::make_unique<keel::latency_window>();
      es->hedges =
          std::make_unique<keel::hedge_budget>(pol.hedge.budget_ratio, pol.hedge.budget_capacity);
    }
    entries_.push_back(std::move(es));
  }
}

client::~client() = default;

void client::scrub_secrets(std::string& field) const {
  // One search per field and secret: a reply is scanned a handful of times, not per character.
  for (const std::string& secret : secrets_) {
    for (auto at = field.find(secret); at != std::string::npos;
         at = field.find(secret, at + secret_marker.size())) {
      field.replace(at, secret.size(), secret_marker);
    }
  }
}

void client::scrub_secrets(keel::llm::chat_response& r) const {
  for (std::string* field : {&r.text, &r.refusal, &r.model, &r.finish_reason, &r.request_id}) {
    scrub_secrets(*field);
  }
  for (keel::llm::tool_call& c : r.tool_calls) {
    for (std::string* field : {&c.id, &c.name, &c.arguments}) {
      scrub_secrets(*field);
    }
  }
}

const keel::circuit_breaker* client::breaker(std::size_t i) const {
  return i < entries_.size() ? entries_[i]->breaker.get() : nullptr;
}

asio::awaitable<client::reply_box> client::hedged_attempt(entry_state& es, call_state& cs) {
  // Not a coroutine: without hedging the attempt's awaitable is returned as it is, with no frame
  // of this function held for the attempt's life (a stream's life, for a streamed call).
  if (!es.hedges) {
    return attempt(es, cs, nullptr);
  }
  return hedge_attempts(es, cs);
}

asio::awaitable<client::reply_box> client::hedge_attempts(entry_state& es, call_state& cs) {
  const hedge_config& hc = cfg_.policy.hedge;
  keel::hedge_policy hp;
  hp.max_attempts = static_cast<std::size_t>(hc.max_attempts);
  hp.delay = seconds_ns(hc.delay);
  if (hc.percentile > 0) {
    hp.latency = es.latencies.get();
    hp.percentile = hc.percentile;
    hp.min_samples = static_cast<std::size_t>(hc.min_samples);
  }
  hp.budget = es.hedges.get();
  hp.retry_budget = budget_.get();
  // A hedge goes to the same entry, or (target "next") to the next one unless its breaker is
  // open: a hedge must not be how traffic gets past an open breaker.
  auto target = [this, &es, &hc](std::size_t index) -> entry_state& {
    if (index == 0 || !hc.to_next || es.last) {
      return es;
    }
    entry_state& next = *entries_[es.index + 1];
    if (next.breaker && next.breaker->state() == keel::breaker_state::open) {
      return es;
    }
    return next;
  };
  if (hooks_.on_hedge || cs.span.recording()) {
    hp.on_hedge = [this, &es, &cs, &target](const keel::hedge_event& e) {
      const std::size_t to = target(e.attempt).index;
      if (cs.span.recording()) {
        cs.span.add_event("keel.hedge",
                          {{"keel.entry", es.index}, {"keel.hedge", e.attempt}, {"keel.to", to}});
      }
      if (hooks_.on_hedge) {
        hooks_.on_hedge(es.index, cs.context, e.attempt, to);
      }
    };
  }
  std::size_t winner = es.index;
  reply_box r = co_await keel::with_hedge(
      [&](keel::hedge_attempt& h) -> asio::awaitable<reply_box> {
        entry_state& to = target(h.index());
        reply_box out = co_await attempt(to, cs, &h);
        winner = to.index;  // only the winner completes: the others are cancelled
        co_return out;
      },
      hp);
  cs.entry = winner;
  co_return r;
}

// The attempt's frame is held for a streamed call's whole life, so what does not wait is in plain
// functions around it (attempt_request, start_attempt_span, stream_request, attempt_failed,
// attempt_succeeded), whose temporaries are on the stack rather than in the frame; and no call
// awaited here takes arguments by value (their temporaries would live in the frame across the
// wait): the stream's request is built inside a lambda.
asio::awaitable<client::reply_box> client::attempt(entry_state& es, call_state& cs,
                                                   keel::hedge_attempt* hedge) {
  const keel::llm::chat_request req = attempt_request(es, cs);
  if (slots_ && !cs.slot) {
    cs.slot = co_await slots_->acquire();  // given up while the call slept; FIFO
  }
  const double estimate = keel::llm::estimate_tokens(req);
  keel::throttle_cost cost;
  cost.requests = 1;
  cost.tokens = estimate;
  if (options_.fleet && es.pacing) {
    options_.fleet->sync_pacing(*es.cfg, *es.pacing);  // the fleet's learned rate, or ours to it
  }
  const auto waited_from = clock_type::now();
  if (cfg_.policy.queue_max_wait > 0) {
    try {
      co_await keel::with_deadline([&] { return es.bucket->acquire(cost); },
                                   seconds_ns(cfg_.policy.queue_max_wait));
    } catch (const boost::system::system_error& e) {
      if (e.code() == keel::make_error_code(keel::error::deadline_exceeded)) {
        keel::throw_failure(keel::error::queue_timeout);
      }
      throw;
    }
  } else {
    co_await es.bucket->acquire(cost);
  }
  // Until the attempt is counted (below), the bucket's grant goes back however this ends: a
  // refusal by the breaker, or a cancellation in the fleet's waits (a hedge that lost as its
  // wait ended, a deadline, a caller gone) sends nothing.
  struct grant_back {
    keel::throttler& bucket;
    keel::throttle_cost cost;
    bool armed = true;
    ~grant_back() {
      if (armed) {
        try {
          bucket.release(cost);
        } catch (...) {
          // Out of memory while waking a waiter: the grant is lost, not the process.
        }
      }
    }
  } give_back{*es.bucket, cost};
  const auto waited = clock_type::now() - waited_from;
  if (waited > std::chrono::milliseconds(1)) {
    if (hooks_.on_throttle_wait) {
      hooks_.on_throttle_wait(es.index, waited);
    }
    cs.throttle_wait += waited;
    if (cs.span.recording()) {
      cs.span.add_event("keel.throttle_wait",
                        {{"keel.entry", es.index}, {"keel.wait_ms", milliseconds_of(waited)}});
    }
  }
  if (options_.fleet) {
    // The fleet's bucket, after this process's own: if it cannot be reached, the attempt goes on
    // under the entry's own bucket and the fleet's local share, and the hook says so.
    bool unreachable = false;
    try {
      co_await options_.fleet->acquire(*es.cfg, estimate);
      if (es.fleet_unreachable) {
        es.fleet_unreachable = false;
        if (hooks_.on_fleet_pacing_restored) {
          hooks_.on_fleet_pacing_restored(es.index);
        }
      }
    } catch (...) {
      const std::exception_ptr e = std::current_exception();
      if (keel::classify(e).condition == keel::condition::cancelled) {
        throw;
      }
      unreachable = true;
      es.fleet_unreachable = true;
      if (hooks_.on_fleet_pacing_error) {
        hooks_.on_fleet_pacing_error(es.index, e);
      }
    }
    if (unreachable) {
      co_await options_.fleet->acquire_local(*es.cfg, estimate);
    }
  }

  if (es.breaker && cs.gate && cs.gate_entry == es.index) {
    // The breaker admitted this call before its wait for the bucket; if it opened meanwhile
    // (here or, through the fleet, elsewhere), the call must not go out into the outage. Its
    // place in the bucket is given back.
    if (options_.fleet) {
      options_.fleet->sync_breaker(*es.cfg, *es.breaker);
    }
    if (!cs.gate->still_admitted()) {
      cs.gate->ensure_admitted();  // throws circuit_open (the grant goes back)
    }
  }
  if ((co_await asio::this_coro::cancellation_state).cancelled() != asio::cancellation_type::none) {
    // Cancelled as the last wait ended (a hedge whose wait ended in the turn another copy won):
    // it neither counts as an attempt nor names the call's entry.
    throw boost::system::system_error(asio::error::operation_aborted);
  }
  give_back.armed = false;
  ++cs.attempts;
  cs.entry = es.index;
  // Counted here, where a request really goes out: an open breaker's refusals send nothing.
  std::optional<keel::aws::sdk_request_info> sdk;
  if (cs.invocation) {
    sdk = cs.invocation->next_attempt();
  }
  keel::rate_controller::ticket ticket{};
  if (es.pacing) {
    ticket = es.pacing->on_send(cost);
  }
  keel::trace::span span = start_attempt_span(es, cs, req, waited, hedge);
  const keel::trace::span_context* outgoing =
      span.context().valid() ? &span.context() : cs.outgoing();
  const auto sent = clock_type::now();
  std::exception_ptr failed;
  reply_box reply;
  try {
    if (cs.stream) {
      reply = co_await [&] {
        return stream_attempt(es, cs, stream_request(es, req, sdk, outgoing),
                              estimate - std::max(req.max_tokens, 0), hedge);
      }();
    } else {
      reply = co_await complete_attempt(es, req, sdk, outgoing);
    }
  } catch (...) {
    failed = std::current_exception();
  }
  if (failed) {
    attempt_failed(es, cs, ticket, estimate, failed, span, sent);
    std::rethrow_exception(failed);
  }
  attempt_succeeded(es, cs, ticket, estimate - std::max(req.max_tokens, 0), estimate, *reply, span,
                    sent);
  co_return reply;
}

keel::llm::chat_request client::attempt_request(const entry_state& es, const call_state& cs) {
  keel::llm::chat_request req = cs.request;
  if (req.model.empty() || es.index != 0) {
    req.model = es.cfg->model;
  }
  if (es.cfg->response_format) {
    req.response_format = es.cfg->response_format;
  }
  // The entry's generation parameters, where the input line gave none.
  if (!req.temperature) {
    req.temperature = es.cfg->temperature;
  }
  if (!req.top_p) {
    req.top_p = es.cfg->top_p;
  }
  if (req.stop.empty()) {
    req.stop = es.cfg->stop;
  }
  if (!req.seed) {
    req.seed = es.cfg->seed;
  }
  req.token_field = es.cfg->max_tokens_field;
  return req;
}

keel::trace::span client::start_attempt_span(entry_state& es, call_state& cs,
                                             const keel::llm::chat_request& req, nanoseconds waited,
                                             const keel::hedge_attempt* hedge) {
  // The attempt's span (a child of the call's); its context is what the request carries.
  keel::trace::span span;
  if (options_.tracer) {
    span = options_.tracer->start("chat " + req.model, keel::trace::span_kind::client,
                                  &cs.span.context());
    if (span.recording()) {
      set_request_attributes(span, req, *es.cfg);
      const auto [host, port] = server_of(es.ep);
      span.set("server.address", host);
      span.set("server.port", port);
      span.set("keel.entry", es.index);
      span.set("keel.attempt", cs.attempts);
      span.set("keel.throttle_wait_ms", milliseconds_of(waited));
      if (hedge && hedge->index() > 0) {
        span.set("keel.hedge", hedge->index());
      }
    }
  }
  return span;
}

const std::optional<keel::llm::aws_credentials>& client::credentials(const entry_state& es) {
  if (es.cfg->api_type == keel::llm::provider_kind::bedrock && !es.cfg->aws) {
    // No credentials (e.g. against the mock server): sign with placeholders.
    static const std::optional<keel::llm::aws_credentials> placeholder(
        std::in_place, "AKIDKEELPLACEHOLDER", "keel-placeholder-secret");
    return placeholder;
  }
  return es.cfg->aws;
}

keel::http::request client::stream_request(entry_state& es, const keel::llm::chat_request& req,
                                           const std::optional<keel::aws::sdk_request_info>& sdk,
                                           const keel::trace::span_context* outgoing) {
  keel::http::request http_req = keel::llm::build_stream_request(req, es.ep);
  if (es.cfg->api_type == keel::llm::provider_kind::bedrock) {
    if (sdk) {
      keel::llm::bedrock::add_sdk_request_headers(http_req, *sdk);
    }
    keel::llm::sign_request(http_req, *credentials(es), es.ep.region, "bedrock",
                            std::chrono::system_clock::now());
  }
  if (outgoing) {
    http_req.set("traceparent", keel::trace::to_traceparent(*outgoing));
    if (!outgoing->state.empty()) {
      http_req.set("tracestate", outgoing->state);
    }
  }
  return http_req;
}

// A coroutine of its own, so that a non-streamed attempt's temporaries are not in the frame a
// streamed attempt holds.
asio::awaitable<client::reply_box> client::complete_attempt(
    entry_state& es, const keel::llm::chat_request& req,
    const std::optional<keel::aws::sdk_request_info>& sdk,
    const keel::trace::span_context* outgoing) {
  traced_sender sender{*es.http, outgoing};  // `complete` keeps a reference to it
  auto one = [&] {
    return keel::llm::complete(sender, es.ep, req, credentials(es), sdk, options_.keep_raw);
  };
  if (es.cfg->timeout) {
    co_return std::make_unique<keel::llm::chat_response>(
        co_await keel::with_deadline(one, seconds_ns(*es.cfg->timeout)));
  }
  co_return std::make_unique<keel::llm::chat_response>(co_await one());
}

void client::attempt_failed(entry_state& es, call_state& cs,
                            const keel::rate_controller::ticket& ticket, double estimate,
                            const std::exception_ptr& failed, keel::trace::span& span,
                            clock_type::time_point sent) {
  attempt_report report = new_report(es.index, cs.context, sent);
  // A refused call used no tokens, but under a controller a 429 keeps its reservation: giving
  // it back lets the next caller go at once into the same refusal, and at a token limit every
  // probe ended with all 64 callers drawing a 429 within 100 ms (and sleeping its Retry-After).
  // (One classification of the error serves both the controller and the settling.)
  // A server's delay holds the pacing (and the fleet) no longer than the longest hint the retry
  // obeys (`retry.max_retry_after`): one 429 with a Retry-After of ten minutes stopped every
  // process of a fleet for ten minutes, whatever the policy said.
  const nanoseconds max_hint = seconds_ns(cfg_.policy.retry.max_retry_after);
  const bool throttled = es.pacing && tell_pacing(*es.pacing, ticket, failed, max_hint);
  if (options_.fleet) {
    if (const auto delay = server_delay_of_429(failed)) {
      // Hold the fleet, not just this process.
      options_.fleet->on_server_delay(*es.cfg, std::min<nanoseconds>(*delay, max_hint));
    }
  }
  // A stream cut short used what it generated (its estimate); a refusal used nothing.
  const double used = cs.stream ? std::min(cs.stream->partial_tokens, estimate) : 0;
  es.bucket->settle(estimate, throttled ? estimate : used);
  report.error = failed;
  report.status = error_status(failed);
  const keel::condition c = keel::classify(failed).condition;
  if (report.status > 0) {
    es.answered = true;
  } else if (c != keel::condition::cancelled && !refused_locally(failed)) {
    es.last_unanswered = failed;
    if (!es.first_unanswered) {
      es.first_unanswered = clock_type::now();
    }
  }
  if (es.breaker && es.breaker->policy().counts_as_failure.contains(c)) {
    es.last_failure = failed;
  }
  if (options_.fleet && es.breaker) {
    if (c != keel::condition::cancelled) {
      options_.fleet->on_breaker_outcome(*es.cfg,
                                         es.breaker->policy().counts_as_failure.contains(c));
    }
  }
  if (hooks_.on_attempt) {
    hooks_.on_attempt(report);
  }
  if (span.recording()) {
    if (report.status > 0) {
      span.set("http.response.status_code", report.status);
    }
    span.set_error(keel::llm::error_class(failed), message_of(failed));
  }
}

void client::attempt_succeeded(entry_state& es, call_state& cs,
                               const keel::rate_controller::ticket& ticket, double prompt_estimate,
                               double estimate, const keel::llm::chat_response& reply,
                               keel::trace::span& span, clock_type::time_point sent) {
  attempt_report report = new_report(es.index, cs.context, sent);
  es.answered = true;
  // A token limit the controller learned from 429s is measured in this client's estimates:
  // settling with the real usage would give back the over-estimate and send more tokens than
  // the server allows (an estimate of 635 against 514 charged sent 240 r/s into a 200 r/s
  // limit). A configured or stated limit is in real tokens: settle. A configured limit stays the
  // bucket's ceiling after 429s have made the dimension a learned one, so it keeps settling
  // (without, 102,800 configured tokens/s paced 635-token estimates at 162 calls/s, not 200).
  if (!es.pacing ||
      settles_token_usage(es.pacing->tokens().phase, es.cfg->rate_limits.tokens_per_minute)) {
    // A reply without usage (a server that reports none) used about what it wrote, not nothing.
    const double used = reply.usage.total() > 0
                            ? reply.usage.total()
                            : prompt_estimate + static_cast<double>((reply.text.size() + 3) / 4);
    es.bucket->settle(estimate, used);
  }
  if (es.pacing) {
    es.pacing->on_accepted(ticket);
    // Headers win: a stated limit is the estimate and a ceiling; a lower `remaining` than the
    // bucket holds is adopted (the key may be shared with other clients).
    const auto& rl = reply.rate_limits;
    es.pacing->on_advertised(rl.limit_requests, rl.limit_tokens);
    if (rl.remaining_requests && *rl.remaining_requests < es.bucket->available_requests()) {
      es.bucket->set_available_requests(*rl.remaining_requests);
    }
    if (rl.remaining_tokens && *rl.remaining_tokens < es.bucket->available_tokens()) {
      es.bucket->set_available_tokens(*rl.remaining_tokens);
    }
  }
  report.status = 200;
  if (span.recording()) {
    span.set("http.response.status_code", 200);
    set_response_attributes(span, reply);
  }
  if (options_.fleet && es.breaker) {
    options_.fleet->on_breaker_outcome(*es.cfg, false);
  }
  if (hooks_.on_attempt) {
    hooks_.on_attempt(report);
  }
}

asio::awaitable<client::reply_box> client::stream_attempt(entry_state& es, call_state& cs,
                                                          keel::http::request http_req,
                                                          double prompt_tokens,
                                                          keel::hedge_attempt* hedge) {
  stream_state& ss = *cs.stream;
  ss.partial_tokens = 0;
  double first = ss.first_token_timeout;
  if (es.cfg->timeout && *es.cfg->timeout > 0 && (first <= 0 || *es.cfg->timeout < first)) {
    first = *es.cfg->timeout;
  }
  // The first-token timeout runs from here; the idle timeout per read after the first text
  // (the consumer's time between reads is not silence of the server).
  keel::stream_timeouts timeouts;
  if (first > 0) {
    timeouts.first_token = seconds_ns(first);
  }
  if (ss.idle_timeout > 0) {
    timeouts.idle = seconds_ns(ss.idle_timeout);
  }
  keel::stream_watch watch(timeouts);
  const std::optional<keel::llm::aws_credentials>& creds = es.cfg->aws;
  auto masked = [&](const keel::llm::provider_error& e) {
    // A server may echo the credentials it was sent, as in `keel::llm::complete`.
    keel::llm::provider_error out =
        creds ? keel::llm::without_secrets(
                    e, {es.ep.api_key, creds->secret_key, creds->session_token, creds->access_key})
              : keel::llm::without_secrets(e, {es.ep.api_key});
    for (const std::string& q : keel::llm::url_credentials(es.ep.base_url)) {
      out = keel::llm::without_secrets(out, {q});
    }
    return out;
  };

  std::optional<keel::http::response_reader> reader;
  // A read that times out is ended by closing the connection (no coroutine thread per read).
  auto read = [&] {
    return watch.next([&] { return reader->read_some(); }, [&] { reader->close(); });
  };
  std::size_t attempt_bytes = 0;  // text this attempt received
  keel::llm::token_usage usage;
  try {
    reader.emplace(co_await watch.next([&] { return es.http->open(std::move(http_req)); }));
    const keel::http::response& head = reader->head();
    if (head.status < 200 || head.status > 299) {
      // An error answer is a whole JSON body: read it (bounded by the transport) and classify
      // it exactly as a non-streamed call would.
      keel::http::response res = head;
      while (auto piece = co_await read()) {
        res.body += *piece;
      }
      try {
        keel::llm::parse_response(res, es.cfg->api_type, std::chrono::system_clock::now());
      } catch (const keel::llm::provider_error& e) {
        throw masked(e);
      }
      throw std::logic_error("keel: a non-2xx response parsed as a reply");  // unreachable
    }
    // A server that ignores `"stream": true` answers one JSON body (a stream's content type is
    // text/event-stream, or application/vnd.amazon.eventstream for Bedrock): read it whole and
    // hand it on as the events a stream of it would give. Retrying would get the same answer.
    std::optional<std::vector<keel::llm::stream_event>> whole;
    if (const auto type = head.headers.find("content-type");
        type &&
        keel::http::iequals(keel::llm::detail::trim_blanks(type->substr(0, type->find(';'))),
                            "application/json")) {
      // The reply is written: its body is bounded by the idle timeout between reads (the
      // transport bounds its size), not by the first-token timeout as a whole.
      watch.first_token_seen();
      keel::http::response res = head;
      while (auto piece = co_await read()) {
        res.body += *piece;
      }
      try {
        whole = keel::llm::events_of(
            keel::llm::parse_response(res, es.cfg->api_type, std::chrono::system_clock::now()));
      } catch (const keel::llm::provider_error& e) {
        throw masked(e);
      }
    }
    keel::llm::stream_options opts;
    opts.http_status = head.status;
    for (std::string_view name : {"x-request-id", "request-id", "x-amzn-requestid"}) {
      if (auto v = head.headers.find(name); v && opts.request_id.empty()) {
        opts.request_id = std::string(*v);
      }
    }
    auto out = std::make_unique<keel::llm::chat_response>();
    out->request_id = opts.request_id;
    out->rate_limits = keel::llm::parse_rate_limits(head.headers, std::chrono::system_clock::now());
    auto decoder = keel::llm::make_stream_decoder(es.cfg->api_type, std::move(opts));
    // A key the server echoes never reaches the consumer, even split across two deltas.
    keel::llm::stream_scrubber scrubber(secrets_, secret_marker);
    std::string safe;
    std::size_t attempt_delivered = 0;  // bytes this attempt handed to the consumer
    // Each tool call's arguments pass their own scrubber (fragments of two calls may interleave).
    std::vector<keel::llm::stream_scrubber> tool_scrubbers;
    keel::llm::tool_call piece_call;  // the tool-call piece being delivered
    auto deliver = [&](std::string_view text,
                       std::optional<std::size_t> tool_index = {}) -> asio::awaitable<void> {
      if (text.empty() && !tool_index) {
        co_return;
      }
      if (attempt_delivered == 0 && hedge) {
        if (!hedge->commit()) {
          // A hedged stream: another copy produced its first text first.
          reader->close();
          throw boost::system::system_error(asio::error::operation_aborted);
        }
        // The call is this copy's from here: if the stream then fails, the failure is this
        // entry's (the hedge that started last, now cancelled, had set cs.entry).
        cs.entry = es.index;
      }
      stream_delta d;
      d.text = text;
      d.entry = es.index;
      if (tool_index) {
        d.tool = &piece_call;
        d.tool_index = *tool_index;
      }
      const std::size_t bytes =
          std::max<std::size_t>(1, text.size() + piece_call.id.size() + piece_call.name.size());
      // A restartable stream's new attempt: the caller discards what it has.
      d.restart = ss.commit.deliver(bytes, attempt_delivered == 0);
      if (!ss.first_token_seconds) {
        ss.first_token_seconds = seconds_since(ss.started);
      }
      attempt_delivered += bytes;
      std::exception_ptr consumer_error;
      try {
        co_await ss.on_delta(d);
      } catch (...) {
        consumer_error = std::current_exception();
      }
      if (consumer_error) {
        ss.commit.consumer_failed();  // the caller's own failure: never retried
        reader->close();              // nobody reads the rest: stop the generation now
        throw consumer_failure(std::move(consumer_error));
      }
      if ((co_await asio::this_coro::cancellation_state).cancelled() !=
          asio::cancellation_type::none) {
        reader->close();  // the consumer was cancelled: stop the generation now
        throw boost::system::system_error(asio::error::operation_aborted);
      }
    };
    std::vector<keel::llm::stream_event> events;
    for (bool ended = false; !ended;) {
      events.clear();
      bool body_ended = true;
      if (whole) {
        events.swap(*whole);  // ends with done
      } else if (std::optional<std::string> piece = co_await read()) {
        decoder->feed(*piece, events);
        body_ended = false;
      } else {
        decoder->finish(events);  // appends done or (cut short) a transport error
      }
      for (keel::llm::stream_event& ev : events) {
        switch (ev.kind) {
          case keel::llm::stream_event_kind::start:
            if (!ev.model.empty()) {
              out->model = std::move(ev.model);
            }
            break;
          case keel::llm::stream_event_kind::text: {
            watch.first_token_seen();
            attempt_bytes += ev.text.size();
            out->text += ev.text;  // scrubbed whole in run_call
            safe.clear();
            scrubber.feed(ev.text, safe);
            co_await deliver(safe);
            break;
          }
          case keel::llm::stream_event_kind::tool_call: {
            watch.first_token_seen();
            const std::size_t ti = ev.tool_index;
            attempt_bytes += ev.tool.arguments.size() + ev.tool.name.size();
            // Decoders number calls densely from 0, so a new call is always the next one.
            while (out->tool_calls.size() <= ti) {
              out->tool_calls.emplace_back();
              tool_scrubbers.emplace_back(secrets_, secret_marker);
            }
            keel::llm::tool_call& call = out->tool_calls[ti];  // scrubbed whole in run_call
            // The id and name come whole (a server may repeat them on every piece); only the
            // arguments come in fragments.
            if (!ev.tool.id.empty()) {
              call.id = ev.tool.id;
            }
            if (!ev.tool.name.empty()) {
              call.name = ev.tool.name;
            }
            call.arguments += ev.tool.arguments;
            safe.clear();
            tool_scrubbers[ti].feed(ev.tool.arguments, safe);
            piece_call = keel::llm::tool_call(std::move(ev.tool.id), std::move(ev.tool.name), {});
            scrub_secrets(piece_call.id);
            scrub_secrets(piece_call.name);
            if (!safe.empty() || !piece_call.id.empty() || !piece_call.name.empty()) {
              co_await deliver(safe, ti);
            }
            piece_call = {};
            break;
          }
          case keel::llm::stream_event_kind::finish:
            out->finish_reason = std::move(ev.finish_reason);
            break;
          case keel::llm::stream_event_kind::usage:
            usage = ev.usage;
            out->usage = ev.usage;
            break;
          case keel::llm::stream_event_kind::done:
            safe.clear();
            scrubber.finish(safe);
            co_await deliver(safe);
            for (std::size_t ti = 0; ti < tool_scrubbers.size(); ++ti) {
              safe.clear();
              tool_scrubbers[ti].finish(safe);
              if (!safe.empty()) {
                co_await deliver(safe, ti);
              }
            }
            ended = true;
            break;
          case keel::llm::stream_event_kind::error:
            throw masked(*ev.error);
        }
      }
      if (body_ended) {
        ended = true;
      }
    }
    co_return out;
  } catch (...) {
    // What the cut stream used: its reported usage, or the prompt and the text it wrote.
    ss.partial_tokens =
        std::max(usage.total(), prompt_tokens + static_cast<double>((attempt_bytes + 3) / 4));
    throw;
  }
}

// Not a coroutine with keel's own retry: a frame of this function would be held for the call's
// life (a stream's life, for a streamed call) with nothing in it the retry's frame does not hold.
asio::awaitable<client::reply_box> client::run_entry(std::size_t i, call_state& cs) {
  entry_state& es = *entries_[i];
  cs.invocation.reset();
  if (es.cfg->api_type == keel::llm::provider_kind::bedrock) {
    const int max = es.aws ? es.aws->total_max_attempts() : es.policy.max_attempts;
    cs.invocation.emplace(keel::aws::make_invocation_id(invocation_ids_), max);
  }
  if (es.aws) {
    return run_entry_aws(es, cs);
  }
  keel::retry_policy p = es.policy;
  p.on_retry = retry_hook(es, cs);
  if (cs.stream) {
    p.retry_if = [base = std::move(p.retry_if), &cs](const std::exception_ptr& e,
                                                     const keel::classification& c) {
      return !cs.stream->final() && (!base || base(e, c));  // past the commit point: no retry
    };
  }
  return keel::with_retry([this, &es, &cs] { return gated_attempt(es, cs); }, std::move(p));
}

std::function<void(const keel::retry_event&)> client::retry_hook(entry_state& es, call_state& cs) {
  return [this, &es, &cs](const keel::retry_event& ev) {
    if (ev.delay > nanoseconds::zero()) {
      cs.slot.release();  // asleep until the retry: let another item use the slot
    }
    if (cs.span.recording()) {
      const std::string type = keel::llm::error_class(ev.error);
      if (type == "circuit_open") {
        cs.span.add_event("keel.breaker_rejected", {{"keel.entry", es.index}});
      }
      cs.span.add_event("keel.retry", {{"keel.entry", es.index},
                                       {"keel.attempt", ev.attempt},
                                       {"error.type", type},
                                       {"keel.delay_ms", milliseconds_of(ev.delay)},
                                       {"keel.delay_from_server", ev.from_server_hint}});
    }
    if (hooks_.on_retry) {
      retry_report r;
      r.entry = es.index;
      r.context = cs.context;
      r.attempt = ev.attempt;
      r.error = ev.error;
      r.delay = ev.delay;
      r.from_server_hint = ev.from_server_hint;
      hooks_.on_retry(r);
    }
  };
}

asio::awaitable<client::reply_box> client::run_entry_aws(entry_state& es, call_state& cs) {
  keel::aws::aws_retry_options opts;
  opts.facts = [&cs](const std::exception_ptr& e) -> std::optional<keel::aws::attempt_facts> {
    if (cs.stream && cs.stream->final()) {
      return std::nullopt;  // past a stream's commit point: not retried
    }
    return keel::llm::aws_attempt_facts(e);
  };
  opts.rand = [this] { return random_.uniform(); };
  opts.on_retry = retry_hook(es, cs);
  opts.on_rate_limit_wait = [this, &es](nanoseconds d) {
    if (hooks_.on_throttle_wait) {
      hooks_.on_throttle_wait(es.index, d);
    }
  };
  // AWS modes rethrow the last attempt's error unchanged, as botocore does. For the record's
  // `gave_up` (and `--summary`), say why as keel's own retry does: attempts used up is
  // `retries_exhausted`, an empty retry quota (AWS's retry budget) is `budget_exhausted`.
  std::optional<keel::aws::give_up_reason> why;
  opts.on_give_up = [&why](keel::aws::give_up_reason r) { why = r; };
  const int attempts_before = cs.attempts;
  std::exception_ptr failed;
  try {
    co_return co_await keel::aws::with_retry([this, &es, &cs] { return gated_attempt(es, cs); },
                                             *es.aws, std::move(opts));
  } catch (...) {
    failed = std::current_exception();
  }
  const int attempts = cs.attempts - attempts_before;
  if (why == keel::aws::give_up_reason::attempts_exhausted) {
    keel::throw_failure(keel::error::retries_exhausted, failed, attempts);
  }
  if (why == keel::aws::give_up_reason::quota_exhausted) {
    keel::throw_failure(keel::error::budget_exhausted, failed, attempts);
  }
  std::rethrow_exception(failed);
}

// An attempt under the entry's breaker. Not a coroutine unless the call may wait for an open
// breaker's probe (held_attempt): with_breaker's frame is all it holds for the attempt's life.
asio::awaitable<client::reply_box> client::gated_attempt(entry_state& es, call_state& cs) {
  if (!es.breaker) {
    return hedged_attempt(es, cs);
  }
  if (options_.fleet) {
    options_.fleet->sync_breaker(*es.cfg, *es.breaker);
  }
  const bool hold = es.last && options_.hold_open_breaker;
  if (!hold && !es.given_up()) {
    return keel::with_breaker(*es.breaker, [this, &es, &cs](keel::circuit_breaker::permit& p) {
      return admitted_attempt(es, cs, p);
    });
  }
  return held_attempt(es, cs);
}

asio::awaitable<client::reply_box> client::admitted_attempt(entry_state& es, call_state& cs,
                                                            keel::circuit_breaker::permit& p) {
  cs.gate = &p;
  cs.gate_entry = es.index;
  return hedged_attempt(es, cs);
}

asio::awaitable<client::reply_box> client::held_attempt(entry_state& es, call_state& cs) {
  auto gated = [this, &es, &cs](keel::circuit_breaker::permit& p) {
    return admitted_attempt(es, cs, p);
  };
  // No HTTP answer at all for `unanswered_grace` since the first failure: an open breaker is
  // no longer waited for (held or retried), so that a wrong base_url fails its items within
  // the grace instead of holding each one for its deadline. The error says why, with the last
  // transport error as its cause.
  auto unanswered = [this, &es](const std::exception_ptr& rejected) {
    if (!es.unanswered_reported) {
      es.unanswered_reported = true;
      if (hooks_.on_unanswered) {
        hooks_.on_unanswered(es.index, es.last_unanswered);
      }
    }
    std::vector<std::exception_ptr> causes;
    if (es.last_unanswered) {
      causes.push_back(es.last_unanswered);
    }
    causes.push_back(rejected);
    return keel::failure(keel::make_error_code(keel::error::circuit_open),
                         "circuit open: " + es.cfg->model +
                             " has not answered one request (every failure had no HTTP "
                             "answer), so calls no longer wait for its probe: check base_url, "
                             "the network and TLS",
                         std::move(causes));
  };
  // Nothing to fall back to: wait for the breaker's probe instead of failing the item (the
  // call's deadline still bounds the wait). Waiters wake with jitter and go through the
  // paced bucket, so the breaker closing does not release them in one burst.
  const bool hold = es.last && options_.hold_open_breaker;
  asio::steady_timer timer(co_await asio::this_coro::executor);
  for (bool first = true;; first = false) {
    if (options_.fleet && !first) {
      options_.fleet->sync_breaker(*es.cfg, *es.breaker);  // the fleet's latest word first
    }
    std::exception_ptr rejected;
    cs.held_because = nullptr;  // an attempt that runs now is what a deadline would end
    try {
      co_return co_await keel::with_breaker(*es.breaker, gated);
    } catch (const boost::system::system_error& e) {
      if (e.code() != keel::make_error_code(keel::error::circuit_open)) {
        throw;
      }
      rejected = std::current_exception();
    }
    if (es.given_up()) {
      throw unanswered(rejected);
    }
    if (!hold) {
      std::rethrow_exception(rejected);
    }
    if (hooks_.on_hold) {
      hooks_.on_hold(es.index, cs.context, es.breaker->remaining_open_time());
    }
    if (cs.span.recording()) {
      cs.span.add_event("keel.breaker_hold",
                        {{"keel.entry", es.index},
                         {"keel.wait_ms", milliseconds_of(es.breaker->remaining_open_time())}});
    }
    cs.slot.release();  // a held item sends nothing: let another one use the slot
    cs.held_because = es.last_failure ? es.last_failure : rejected;
    // Until the probe, or (half-open, the probe slots taken) a short while; for a server
    // that has never answered, no later than the end of its grace.
    auto wait = es.breaker->remaining_open_time() +
                std::chrono::duration_cast<nanoseconds>(
                    std::chrono::duration<double>(0.05 + 0.2 * random_.uniform()));
    if (!es.answered && es.first_unanswered) {
      const auto grace_left = *es.first_unanswered + es.unanswered_grace - clock_type::now();
      wait = std::min(
          wait, std::max(std::chrono::duration_cast<nanoseconds>(grace_left), nanoseconds::zero()));
    }
    timer.expires_after(wait);
    co_await timer.async_wait(asio::use_awaitable);
  }
}

asio::awaitable<keel::bulkhead_permit> client::admit() {
  if (!slots_) {
    co_return keel::bulkhead_permit{};
  }
  co_return co_await slots_->acquire();
}

// `call` and `stream_call` are not coroutines: the call's state moves into `run_call`'s frame,
// so a call holds one frame fewer for its life (a stream's life, for a streamed call).
asio::awaitable<call_outcome> client::call(keel::llm::chat_request request, const void* context,
                                           keel::bulkhead_permit slot,
                                           const keel::trace::span_context* parent) {
  call_state cs;
  cs.request = std::move(request);
  cs.context = context;
  cs.slot = std::move(slot);
  if (parent) {
    cs.parent = *parent;
  }
  return run_call(std::move(cs));
}

asio::awaitable<call_outcome> client::stream_call(keel::llm::chat_request request,
                                                  delta_handler on_delta,
                                                  stream_call_options options, const void* context,
                                                  keel::bulkhead_permit slot,
                                                  const keel::trace::span_context* parent) {
  const stream_config& sc = cfg_.policy.stream;
  call_state cs;
  cs.request = std::move(request);
  cs.context = context;
  cs.slot = std::move(slot);
  if (parent) {
    cs.parent = *parent;
  }
  stream_state& ss = cs.stream.emplace(options.restartable.value_or(sc.restartable));
  ss.on_delta = std::move(on_delta);
  ss.first_token_timeout = options.first_token_timeout.value_or(sc.first_token_timeout);
  ss.idle_timeout = options.idle_timeout.value_or(sc.idle_timeout);
  return run_call(std::move(cs));
}

// A streamed call holds this frame for the stream's life: what does not wait is in
// start_call_span, call_chain and finish_call, and the outcome is made only at the end.
asio::awaitable<call_outcome> client::run_call(call_state cs) {
  if (slots_ && !cs.slot) {
    // Before the item's clock starts: its latency does not count the wait for a slot.
    std::exception_ptr cancelled;
    try {
      cs.slot = co_await slots_->acquire();
    } catch (...) {
      cancelled = std::current_exception();  // cancelled while waiting: no attempt made
    }
    if (cancelled) {
      call_outcome out;
      out.error = cancelled;
      co_return out;
    }
  }
  const auto t0 = clock_type::now();
  if (cs.stream) {
    cs.stream->started = t0;
  }
  start_call_span(cs);
  reply_box reply;
  std::exception_ptr error;
  try {
    reply = co_await keel::with_deadline([this, &cs] { return call_chain(cs); },
                                         seconds_ns(cfg_.policy.deadline));
  } catch (...) {
    error = std::current_exception();
  }
  auto state = co_await asio::this_coro::cancellation_state;
  if (error && state.cancelled() != asio::cancellation_type::none) {
    error = std::make_exception_ptr(boost::system::system_error(asio::error::operation_aborted));
  }
  co_return finish_call(cs, std::move(reply), error, t0);
}

void client::start_call_span(call_state& cs) {
  if (options_.tracer) {
    const entry_config& first = *entries_.front()->cfg;
    cs.span = options_.tracer->start(
        "chat " + (cs.request.model.empty() ? first.model : cs.request.model),
        keel::trace::span_kind::internal, &cs.parent);
    if (cs.span.recording()) {
      set_request_attributes(cs.span, cs.request, first);
      cs.span.set("keel.stream", cs.stream.has_value());
    }
  }
}

asio::awaitable<client::reply_box> client::call_chain(call_state& cs) {
  if (entries_.size() == 1) {
    return run_entry(0, cs);  // nothing to fall back to: no all_fallbacks_failed wrapper
  }
  std::vector<keel::alternative<reply_box>> alts;
  alts.reserve(entries_.size());
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    alts.emplace_back([this, i, &cs] { return run_entry(i, cs); });
  }
  keel::fallback_policy fp;
  if (hooks_.on_fallback || cs.span.recording()) {
    fp.on_fallback = [this, &cs](const keel::fallback_event& e) {
      ++cs.fallbacks;
      if (cs.span.recording()) {
        const std::string type = keel::llm::error_class(e.error);
        if (type == "circuit_open") {
          cs.span.add_event("keel.breaker_rejected", {{"keel.entry", e.from}});
        }
        cs.span.add_event("keel.fallback",
                          {{"keel.from", e.from}, {"keel.to", e.to}, {"error.type", type}});
      }
      if (hooks_.on_fallback) {
        hooks_.on_fallback(cs.context, e.from, e.to, e.error);
      }
    };
  }
  if (cs.stream) {
    // Past a stream's commit point no other entry may answer.
    fp.should_try = [&cs](const std::exception_ptr&, const keel::classification&, std::size_t,
                          std::size_t) { return !cs.stream->final(); };
  }
  return keel::with_fallback(std::move(alts), std::move(fp));
}

call_outcome client::finish_call(call_state& cs, reply_box reply, std::exception_ptr error,
                                 std::chrono::steady_clock::time_point t0) {
  call_outcome out;
  out.error = error ? unwrap_consumer_failure(std::move(error)) : nullptr;
  if (cs.held_because && out.error && !reply &&
      keel::classify(out.error).condition == keel::condition::timeout) {
    // The deadline ended a hold at an open breaker: say so, with what opened it as the cause.
    const std::string model = entries_[cs.entry]->cfg->model;
    out.error = std::make_exception_ptr(
        keel::failure(keel::make_error_code(keel::error::deadline_exceeded),
                      "deadline exceeded while held at " + model +
                          "'s open breaker; its last failure: " + keel::describe(cs.held_because),
                      {out.error, cs.held_because}));
  }
  if (reply) {
    out.response = std::move(*reply);
  }
  if (out.response) {
    scrub_secrets(*out.response);
  }
  cs.slot.release();  // the next item may start while the caller writes this one's record
  out.entry = cs.entry;
  out.attempts = cs.attempts;
  out.seconds = seconds_since(t0);
  if (cs.stream) {
    const stream_state& ss = *cs.stream;
    out.first_token_seconds = ss.first_token_seconds;
    out.delivered_bytes = ss.commit.delivered_bytes();
    out.delivered_deltas = ss.commit.delivered_deltas();
    if (out.error) {
      // Past the commit point: the caller has part of a reply that keel could not finish.
      out.error = ss.commit.outcome(out.error, out.attempts, keel::llm::error_class(out.error));
    }
  }
  if (cs.span.recording()) {
    const entry_config& e = *entries_[cs.entry]->cfg;
    cs.span.set("gen_ai.provider.name", provider_name(e.api_type));
    cs.span.set("gen_ai.system", provider_name(e.api_type));
    cs.span.set("keel.entry", cs.entry);
    cs.span.set("keel.attempts", cs.attempts);
    cs.span.set("keel.fallbacks", cs.fallbacks);
    cs.span.set("keel.throttle_wait_ms", milliseconds_of(cs.throttle_wait));
    if (out.response) {
      set_response_attributes(cs.span, *out.response);
      cs.span.set_ok();
    } else {
      cs.span.set_error(keel::llm::error_class(out.error), message_of(out.error));
    }
    if (cs.stream) {
      cs.span.set("keel.stream.delivered_deltas", out.delivered_deltas);
      if (out.first_token_seconds) {
        cs.span.set("keel.stream.first_token_ms", *out.first_token_seconds * 1000.0);
      }
    }
  }
  cs.span.end();
  return out;
}

namespace {

// The reply of a call's outcome, or its error thrown.
asio::awaitable<keel::llm::chat_response> reply_of(asio::awaitable<call_outcome> call) {
  call_outcome out = co_await std::move(call);
  if (out.error) {
    std::rethrow_exception(out.error);
  }
  co_return std::move(*out.response);
}

}  // namespace

// `complete` and `stream` are not coroutines either: `call` and `stream_call` copy `parent`
// now, so the caller's context may go away before the awaitable starts.
asio::awaitable<keel::llm::chat_response> client::complete(
    keel::llm::chat_request request, const void* context, const keel::trace::span_context* parent) {
  return reply_of(call(std::move(request), context, {}, parent));
}

asio::awaitable<keel::llm::chat_response> client::stream(keel::llm::chat_request request,
                                                         delta_handler on_delta,
                                                         stream_call_options options,
                                                         const void* context,
                                                         const keel::trace::span_context* parent) {
  return reply_of(
      stream_call(std::move(request), std::move(on_delta), options, context, {}, parent));
}

bool settles_token_usage(keel::pacing_phase token_phase, double configured_tokens_per_minute) {
  return !learned(token_phase) || configured_tokens_per_minute > 0;
}

}  // namespace keel::llm
