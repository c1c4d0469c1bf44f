// The mock LLM server's fault decisions: which outcome a request gets (outages, scripts, context
// window, the rate limiter, probabilities), its latency, and the rate-limit and retry-after
// headers that go with it.
#include "mock_detail.hpp"

#include <cmath>
#include <cstdio>
#include <ctime>

namespace keel::testing {

using namespace detail;  // this file implements the mock's private declarations

namespace {

// Retry-After as an HTTP-date (RFC 9110 IMF-fixdate): the wall clock plus `d`, rounded up to the
// next whole second so that a client never retries before the delay is over.
std::string http_date_after(milliseconds d) {
  const auto t = std::chrono::ceil<std::chrono::seconds>(std::chrono::system_clock::now() + d);
  const std::time_t tt = std::chrono::system_clock::to_time_t(
      std::chrono::time_point_cast<std::chrono::system_clock::duration>(t));
  std::tm tm{};
  gmtime_r(&tt, &tm);
  // strftime's %a/%b follow the locale; HTTP wants the English names.
  static constexpr const char* days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
  static constexpr const char* months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s, %02d %s %04d %02d:%02d:%02d GMT", days[tm.tm_wday % 7],
                tm.tm_mday, months[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                tm.tm_sec);
  return buf;
}

// Anthropic's reset headers are RFC 3339 instants.
std::string rfc3339_after(milliseconds d) {
  const auto t = std::chrono::system_clock::now() + d;
  const std::time_t tt = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 1469598103934665603ULL;
  for (char c : s) {
    h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
  }
  return h;
}

// Like the providers, limits are stated per minute; a dimension the plan does not limit is not
// reported at all (a client must not learn a limit that is not enforced).
void add_rate_headers(reply& r, wire f, model_state* st) {
  if (st && !st->plan.rate_limit_headers) {
    return;
  }
  const bool has_req = st && st->requests.enabled();
  const bool has_tok = st && st->tokens.enabled();
  const char* const names[2][2][3] = {
      {{"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests"},
       {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}},
      {{"anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset"},
       {"anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset"}}};
  if (f != wire::openai && f != wire::anthropic) {
    return;
  }
  const int w = f == wire::openai ? 0 : 1;
  for (int d = 0; d < 2; ++d) {
    if (!(d == 0 ? has_req : has_tok)) {
      continue;
    }
    const bucket& b = d == 0 ? st->requests : st->tokens;
    const auto per_minute = static_cast<long long>(std::llround(b.per_second * 60));
    const auto left = static_cast<long long>(std::floor(b.level));
    const milliseconds reset = b.until_full();
    r.headers.emplace_back(names[w][d][0], std::to_string(per_minute));
    r.headers.emplace_back(names[w][d][1], std::to_string(left));
    r.headers.emplace_back(names[w][d][2], w == 0 ? openai_duration(reset) : rfc3339_after(reset));
  }
}

// `provider` resolved for one answer. The limiter's 429s keep both headers: they model a server
// that states its exact wait, which is what the limiter is for (and what benchmarks rely on).
retry_after_style effective_style(retry_after_style style, wire f, bool limiter_429) {
  if (style != retry_after_style::provider || limiter_429) {
    return style == retry_after_style::provider ? retry_after_style::both : style;
  }
  switch (f) {
    case wire::anthropic:
      return retry_after_style::seconds;  // Anthropic documents `retry-after` only
    case wire::bedrock:
      return retry_after_style::none;  // Bedrock documents no delay header
    default:
      return retry_after_style::both;  // OpenAI's SDKs read retry-after-ms, then retry-after
  }
}

void add_retry_after(reply& r, milliseconds d, retry_after_style style) {
  const auto secs = (d.count() + 999) / 1000;
  switch (style) {
    case retry_after_style::provider:  // resolved by effective_style
    case retry_after_style::both:
      r.headers.emplace_back("retry-after", std::to_string(secs));
      r.headers.emplace_back("retry-after-ms", std::to_string(d.count()));
      break;
    case retry_after_style::milliseconds:
      r.headers.emplace_back("retry-after-ms", std::to_string(d.count()));
      break;
    case retry_after_style::seconds:
      r.headers.emplace_back("retry-after", std::to_string(secs));
      break;
    case retry_after_style::http_date:
      r.headers.emplace_back("retry-after", http_date_after(d));
      break;
    case retry_after_style::amz:
      r.headers.emplace_back("x-amz-retry-after", std::to_string(d.count()));
      break;
    case retry_after_style::none:
      break;
  }
}

}  // namespace

namespace detail {

// Capped at a day: a tiny configured rate gives waits whose milliseconds do not fit in an
// int64 (and converting such a double is undefined behaviour).
milliseconds ceil_ms(double seconds) {
  constexpr double max_ms = 86'400'000.0;
  const double ms = std::ceil(seconds * 1000.0 - 1e-9);
  return milliseconds(static_cast<std::int64_t>(std::clamp(ms, 0.0, max_ms)));
}

// The schedule in the order it applies: by instant, ties in list order.
std::vector<rate_change> sorted_schedule(const std::vector<rate_change>& changes) {
  std::vector<rate_change> out = changes;
  std::stable_sort(out.begin(), out.end(),
                   [](const rate_change& a, const rate_change& b) { return a.at < b.at; });
  return out;
}

}  // namespace detail

model_state* mock_llm_server::impl::state_for(const std::string& model) {
  auto it = states.find(model);
  if (it != states.end()) {
    return it->second.get();
  }
  auto p = plans.find(model);
  if (p == plans.end()) {
    p = plans.find("*");
  }
  if (p == plans.end()) {
    return nullptr;
  }
  auto st = std::make_unique<model_state>(p->second, seed ^ fnv1a(model));
  auto* raw = st.get();
  states.emplace(model, std::move(st));
  return raw;
}

std::string mock_llm_server::impl::request_id() {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%012llx", static_cast<unsigned long long>(++next_id));
  return buf;
}

void mock_llm_server::impl::answer(reply& r, fault_kind k, const parsed_request& pr,
                                   model_state* st, std::optional<milliseconds> retry_after,
                                   bool tokens_limited, bool limiter_429) {
  const std::string id = request_id();
  const std::string rid = "req_" + id;  // Anthropic's request-id, also in its error bodies
  switch (pr.format) {
    case wire::openai:
      r.headers.emplace_back("x-request-id", "req_" + id);
      break;
    case wire::anthropic:
      r.headers.emplace_back("request-id", rid);
      break;
    case wire::bedrock:
      r.headers.emplace_back("x-amzn-RequestId", "mock-" + id);
      break;
    case wire::unknown:
      break;
  }
  const std::size_t prompt_tokens = tokens_for(pr.prompt_chars);
  const std::string text = completion_for(pr.last_user);
  const std::size_t completion_tokens = tokens_for(text.size());

  if (pr.format == wire::unknown) {
    r.status = 404;
    r.body = dump(openai_error("Unknown request URL. Please check the URL and method.",
                               "invalid_request_error", nullptr, "unknown_url"));
    return;
  }
  if (pr.malformed) {
    if (pr.format == wire::openai) {
      openai_malformed(r);
    } else if (pr.format == wire::anthropic) {
      anthropic_malformed(r, rid);
    } else {
      bedrock_malformed(r);
    }
    return;
  }

  // A mid-stream fault strikes only a streamed answer; before that it is a success.
  fault_kind stream_fault = fault_kind::ok;
  if (is_stream_fault(k)) {
    stream_fault = pr.stream ? k : fault_kind::ok;
    k = fault_kind::ok;
  }
  const bool is_rate_limit = k == fault_kind::rate_limit || k == fault_kind::throttling;
  const retry_after_style style = st ? st->plan.retry_after_format : retry_after_style::both;
  if (style == retry_after_style::none) {
    retry_after.reset();
  }
  // A malformed answer is a success body cut in half, still framed as a complete 200.
  const bool cut_body = k == fault_kind::malformed;
  if (cut_body) {
    k = fault_kind::ok;
  }
  const body_input in{id,
                      rid,
                      pr,
                      st ? &st->plan : nullptr,
                      retry_after,
                      tokens_limited,
                      prompt_tokens,
                      text,
                      completion_tokens};
  switch (pr.format) {
    case wire::openai:
      openai_answer(r, k, in);
      break;
    case wire::anthropic:
      anthropic_answer(r, k, in);
      break;
    case wire::bedrock:
      bedrock_answer(r, k, in);
      break;
    case wire::unknown:
      break;
  }
  if (pr.format != wire::bedrock || r.status == 200) {
    add_rate_headers(r, pr.format, st);
  }
  if (is_rate_limit && retry_after) {
    add_retry_after(r, *retry_after, effective_style(style, pr.format, limiter_429));
  }
  if (cut_body) {
    r.body.resize(r.body.size() / 2);
  } else if (pr.stream && r.status == 200 &&
             (k == fault_kind::ok || k == fault_kind::content_filter)) {
    // Errors before the first byte stay plain JSON answers, as the providers send them.
    switch (pr.format) {
      case wire::openai:
        r.stream = openai_stream(k, stream_fault, in);
        break;
      case wire::anthropic:
        r.stream = anthropic_stream(k, stream_fault, in);
        break;
      case wire::bedrock:
        r.stream = bedrock_stream(k, stream_fault, in);
        break;
      case wire::unknown:
        break;
    }
  }
}

reply mock_llm_server::impl::decide(const parsed_request& pr) {
  std::lock_guard lock(mu);
  reply r;
  model_state* st = pr.model.empty() ? nullptr : state_for(pr.model);
  fault_kind k = fault_kind::ok;
  std::optional<milliseconds> retry_after;
  bool tokens_limited = false;
  bool limiter_429 = false;
  if (st && pr.format != wire::unknown && !pr.malformed) {
    const fault_plan& plan = st->plan;
    const auto t = now();
    st->apply_schedule(started, t);
    const auto since_start = std::chrono::duration_cast<milliseconds>(t - started);
    const std::size_t cost =
        tokens_for(pr.prompt_chars) + tokens_for(completion_for(pr.last_user).size());
    bool decided = false;
    for (const auto& w : plan.outages) {
      if (since_start >= w.from && since_start < w.to) {
        k = fault_kind::unavailable;
        decided = true;
        break;
      }
    }
    if (!decided && st->script_pos < plan.script.size()) {
      k = plan.script[st->script_pos++];
      retry_after = plan.retry_after;
      decided = true;
    }
    if (!decided && plan.context_window > 0 && tokens_for(pr.prompt_chars) > plan.context_window) {
      k = fault_kind::context_length;
      decided = true;
    }
    if (!decided && (st->requests.enabled() || st->tokens.enabled())) {
      double wait = 0;
      if (st->requests.enabled()) {
        st->requests.refill(t);
        wait = st->requests.wait_for(1);
      }
      if (st->tokens.enabled()) {
        st->tokens.refill(t);
        const double tw = st->tokens.wait_for(static_cast<double>(cost));
        if (tw > wait) {
          wait = tw;
          tokens_limited = true;
        }
      }
      if (wait > 0) {
        k = fault_kind::rate_limit;
        limiter_429 = true;
        switch (plan.limiter_retry_after) {
          case limiter_retry_after_mode::exact:
            retry_after = ceil_ms(wait);
            break;
          case limiter_retry_after_mode::constant:
            retry_after = plan.retry_after;
            break;
          case limiter_retry_after_mode::none:
            break;
        }
        decided = true;
      } else {
        if (st->requests.enabled()) {
          st->requests.level -= 1;
        }
        if (st->tokens.enabled()) {
          st->tokens.level -= std::min(static_cast<double>(cost), st->tokens.capacity);
        }
      }
    }
    if (!decided) {
      const double u = st->rng->uniform();
      double acc = 0;
      for (const auto& [fk, p] : plan.probability) {
        acc += p;
        if (u < acc) {
          k = fk;
          retry_after = plan.retry_after;
          break;
        }
      }
    }
    if (plan.latency_max > plan.latency_min) {
      const double span = static_cast<double>((plan.latency_max - plan.latency_min).count());
      r.latency =
          plan.latency_min +
          milliseconds(static_cast<std::int64_t>(std::floor(st->rng->uniform() * (span + 1))));
    } else {
      r.latency = plan.latency_min;
    }
    if (plan.tail_fraction > 0 && st->tail_rng->uniform() < plan.tail_fraction) {
      r.latency = std::max(r.latency, plan.tail_latency);
      r.tail = true;
      ++counters.total.tail_delays;  // `count()` would take mu again
      ++counters.by_model[pr.model].tail_delays;
    }
  }
  r.outcome = is_stream_fault(k) && !pr.stream ? fault_kind::ok : k;
  r.action = is_stream_fault(k) ? fault_kind::ok : k;
  if (k == fault_kind::reset || k == fault_kind::stall) {
    return r;
  }
  // A truncated answer cuts a would-be success short.
  answer(r, k == fault_kind::truncated ? fault_kind::ok : k, pr, st, retry_after, tokens_limited,
         limiter_429);
  r.reason = reason_for(r.status);
  return r;
}

rate_limits fault_plan::limits_at(std::chrono::milliseconds since_start) const {
  rate_limits out{requests_per_second, tokens_per_minute};
  for (const rate_change& c : sorted_schedule(rate_schedule)) {
    if (c.at > since_start) {
      break;
    }
    if (c.requests_per_second) {
      out.requests_per_second = *c.requests_per_second;
    }
    if (c.tokens_per_minute) {
      out.tokens_per_minute = *c.tokens_per_minute;
    }
  }
  return out;
}

}  // namespace keel::testing
