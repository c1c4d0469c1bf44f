// The mock LLM server: Beast HTTP/1.1 sessions, provider wire formats and fault decisions.
#include <keel/llm/json_depth.hpp>
#include <keel/random.hpp>
#include <keel/testing/detail/json_schema_instance.hpp>
#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <mutex>
#include <unordered_set>
#include <vector>

namespace keel::testing {

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
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
};

// One response, ready to write; `action` says whether to write it at all.
struct reply {
  fault_kind action = fault_kind::ok;  // ok: write normally; reset/stall/truncated: misbehave
  int status = 200;
  std::string reason;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  milliseconds latency{0};
};

// JSON dump that never throws on invalid UTF-8 cut out of a prompt.
std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string text_of(const json& content) {
  if (content.is_string()) {
    return content.get<std::string>();
  }
  std::string out;
  if (content.is_array()) {
    for (const auto& part : content) {
      if (part.is_object() && part.contains("text") && part["text"].is_string()) {
        out += part["text"].get<std::string>();
      }
    }
  }
  return out;
}

std::string percent_decode(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      const std::string hex(s.substr(i + 1, 2));
      char* end = nullptr;
      const long v = std::strtol(hex.c_str(), &end, 16);
      if (end == hex.c_str() + 2) {
        out += static_cast<char>(v);
        i += 2;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

parsed_request parse(std::string_view method, std::string_view target, const std::string& body) {
  parsed_request r;
  const std::string_view path = target.substr(0, target.find('?'));
  if (method != "POST") {
    return r;
  }
  if (path == "/v1/chat/completions") {
    r.format = wire::openai;
  } else if (path == "/v1/messages") {
    r.format = wire::anthropic;
  } else if (path.starts_with("/model/") && path.ends_with("/converse") &&
             path.size() > std::string_view("/model//converse").size()) {
    r.format = wire::bedrock;
    r.model = percent_decode(path.substr(7, path.size() - 7 - 9));
  } else {
    return r;
  }
  json doc = keel::llm::json_too_deep_at(body) == std::string_view::npos
                 ? json::parse(body, nullptr, /*allow_exceptions=*/false)
                 : json(json::value_t::discarded);
  if (doc.is_discarded() || !doc.is_object()) {
    r.malformed = true;
    return r;
  }
  if (r.format != wire::bedrock) {
    if (doc.contains("model") && doc["model"].is_string()) {
      r.model = doc["model"].get<std::string>();
    }
  }
  if (!doc.contains("messages") || !doc["messages"].is_array() || r.model.empty()) {
    r.malformed = true;
    return r;
  }
  if (r.format == wire::openai) {
    const json& rf = doc.contains("response_format") ? doc["response_format"] : json();
    const std::string rf_type = rf.is_object() ? rf.value("type", "") : "";
    if (rf_type == "json_object") {
      r.json_content = "{}";
    } else if (rf_type == "json_schema" && rf.contains("json_schema") &&
               rf["json_schema"].is_object() && rf["json_schema"].contains("schema")) {
      r.json_content = detail::minimal_json_instance(dump(rf["json_schema"]["schema"]));
    }
  }
  if (doc.contains("system")) {
    r.prompt_chars += text_of(doc["system"]).size();
  }
  for (const auto& m : doc["messages"]) {
    if (!m.is_object()) {
      continue;
    }
    const std::string t = m.contains("content") ? text_of(m["content"]) : std::string();
    r.prompt_chars += t.size();
    if (m.value("role", "") == "user") {
      r.last_user = t;
    }
  }
  return r;
}

std::size_t tokens_for(std::size_t chars) {
  return std::max<std::size_t>(1, (chars + 3) / 4);
}

std::string completion_for(const std::string& prompt) {
  std::size_t n = std::min<std::size_t>(40, prompt.size());
  // Never cut a UTF-8 sequence in half.
  while (n > 0 && n < prompt.size() && (static_cast<unsigned char>(prompt[n]) & 0xC0) == 0x80) {
    --n;
  }
  return "mock answer to: " + prompt.substr(0, n);
}

// OpenAI's duration format for x-ratelimit-reset-*: "20ms", "1.5s", "6m0s".
std::string openai_duration(milliseconds d) {
  const auto ms = d.count();
  char buf[64];
  if (ms < 1000) {
    std::snprintf(buf, sizeof buf, "%lldms", static_cast<long long>(ms));
  } else if (ms < 60000) {
    if (ms % 1000 == 0) {
      std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(ms / 1000));
    } else {
      std::snprintf(buf, sizeof buf, "%.3gs", static_cast<double>(ms) / 1000.0);
    }
  } else {
    std::snprintf(buf, sizeof buf, "%lldm%llds", static_cast<long long>(ms / 60000),
                  static_cast<long long>((ms % 60000) / 1000));
  }
  return buf;
}

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

// Capped at a day: a tiny configured rate gives waits whose milliseconds do not fit in an
// int64 (and converting such a double is undefined behaviour).
milliseconds ceil_ms(double seconds) {
  constexpr double max_ms = 86'400'000.0;
  const double ms = std::ceil(seconds * 1000.0 - 1e-9);
  return milliseconds(static_cast<std::int64_t>(std::clamp(ms, 0.0, max_ms)));
}

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
std::vector<rate_change> sorted_schedule(const std::vector<rate_change>& changes) {
  std::vector<rate_change> out = changes;
  std::stable_sort(out.begin(), out.end(),
                   [](const rate_change& a, const rate_change& b) { return a.at < b.at; });
  return out;
}

// Per-model state: the plan, its generator, script position, limiter buckets and how much of the
// limit schedule has been applied.
struct model_state {
  fault_plan plan;
  std::unique_ptr<keel::random_source> rng;
  std::size_t script_pos = 0;
  bucket requests;
  bucket tokens;
  std::vector<rate_change> schedule;  // sorted
  std::size_t schedule_pos = 0;

  model_state(fault_plan p, std::uint64_t seed)
      : plan(std::move(p)),
        rng(std::make_unique<keel::random_source>(seed)),
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

std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 1469598103934665603ULL;
  for (char c : s) {
    h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ULL;
  }
  return h;
}

// ---- structured outputs ------------------------------------------------------------------

// Builds the smallest value a schema accepts. Recursive schemas ($ref cycles) and wide ones are
// cut off by the two budgets: the answer is then still JSON, just not a valid instance.
struct schema_instance_builder {
  static constexpr int max_ref_depth = 32;
  static constexpr std::size_t max_values = 10'000;
  static constexpr std::size_t max_repeat = 1'000;  // minItems / minLength honoured up to this

  const json& root;
  std::size_t values = 0;

  const json* resolve(const std::string& ref) const {
    if (ref == "#") {
      return &root;
    }
    if (!ref.starts_with("#/")) {
      return nullptr;
    }
    try {
      const json::json_pointer ptr(ref.substr(1));
      return root.contains(ptr) ? &root.at(ptr) : nullptr;
    } catch (const json::exception&) {
      return nullptr;
    }
  }

  static const json* first_branch(const json& s) {
    for (const char* key : {"anyOf", "oneOf", "allOf"}) {
      auto it = s.find(key);
      if (it != s.end() && it->is_array() && !it->empty()) {
        return &it->front();
      }
    }
    return nullptr;
  }

  static std::size_t count_of(const json& s, const char* key) {
    auto it = s.find(key);
    if (it == s.end() || !it->is_number()) {
      return 0;
    }
    const double v = it->get<double>();
    return v > 0 ? static_cast<std::size_t>(std::min(std::ceil(v), double{max_repeat})) : 0;
  }

  static double number_in_range(const json& s, bool integral) {
    double v = 0;
    auto num = [&](const char* key) -> std::optional<double> {
      auto it = s.find(key);
      return it != s.end() && it->is_number() ? std::optional(it->get<double>()) : std::nullopt;
    };
    if (auto lo = num("minimum"); lo && *lo > v) {
      v = integral ? std::ceil(*lo) : *lo;
    }
    if (auto lo = num("exclusiveMinimum"); lo && *lo >= v) {
      v = integral ? std::floor(*lo) + 1 : *lo + 1;
    }
    if (auto hi = num("maximum"); hi && *hi < v) {
      v = integral ? std::floor(*hi) : *hi;
    }
    return v;
  }

  json build(const json& s, int ref_depth) {
    if (++values > max_values || !s.is_object()) {
      return nullptr;  // `true` / `{}` accept anything, null included
    }
    if (auto it = s.find("const"); it != s.end()) {
      return *it;
    }
    if (auto it = s.find("enum"); it != s.end() && it->is_array() && !it->empty()) {
      return it->front();
    }
    if (auto it = s.find("$ref"); it != s.end() && it->is_string()) {
      const json* target = ref_depth < max_ref_depth ? resolve(it->get<std::string>()) : nullptr;
      return target ? build(*target, ref_depth + 1) : json(nullptr);
    }
    if (const json* branch = first_branch(s)) {
      return build(*branch, ref_depth);
    }
    std::string type;
    if (auto it = s.find("type"); it != s.end()) {
      if (it->is_string()) {
        type = it->get<std::string>();
      } else if (it->is_array() && !it->empty() && it->front().is_string()) {
        type = it->front().get<std::string>();
      }
    } else if (s.contains("properties") || s.contains("required")) {
      type = "object";
    } else if (s.contains("items") || s.contains("prefixItems")) {
      type = "array";
    }
    if (type == "object") {
      json out = json::object();
      const auto props = s.find("properties");
      const auto req = s.find("required");
      if (req != s.end() && req->is_array()) {
        for (const auto& name : *req) {
          if (!name.is_string()) {
            continue;
          }
          const std::string key = name.get<std::string>();
          const bool has = props != s.end() && props->is_object() && props->contains(key);
          out[key] = has ? build((*props)[key], ref_depth) : json(nullptr);
        }
      }
      return out;
    }
    if (type == "array") {
      json out = json::array();
      const std::size_t n = count_of(s, "minItems");
      const auto prefix = s.find("prefixItems");
      const auto items = s.find("items");
      for (std::size_t i = 0; i < n && values <= max_values; ++i) {
        if (prefix != s.end() && prefix->is_array() && i < prefix->size()) {
          out.push_back(build((*prefix)[i], ref_depth));
        } else if (items != s.end() && items->is_array()) {  // draft-04 tuple form
          out.push_back(i < items->size() ? build((*items)[i], ref_depth) : json(nullptr));
        } else {
          out.push_back(items != s.end() ? build(*items, ref_depth) : json(nullptr));
        }
      }
      return out;
    }
    if (type == "string") {
      return std::string(count_of(s, "minLength"), 'a');
    }
    if (type == "integer") {
      return static_cast<std::int64_t>(number_in_range(s, true));
    }
    if (type == "number") {
      return number_in_range(s, false);
    }
    if (type == "boolean") {
      return false;
    }
    return nullptr;
  }
};

// ---- provider error bodies ---------------------------------------------------------------

json openai_error(std::string_view message, std::string_view type, json param, json code) {
  return json{{"error", {{"message", message}, {"type", type}, {"param", param}, {"code", code}}}};
}

// Anthropic's documented error body carries the request id at the top level too.
json anthropic_error(std::string_view type, std::string_view message, std::string_view request_id) {
  return json{{"type", "error"},
              {"error", {{"type", type}, {"message", message}}},
              {"request_id", request_id}};
}

void bedrock_error(reply& r, int status, std::string_view type, std::string_view message) {
  r.status = status;
  r.headers.emplace_back(
      "x-amzn-ErrorType",
      std::string(type) + ":http://internal.amazon.com/coral/com.amazon.bedrock/");
  r.body = dump(json{{"message", message}});
}

const char* reason_for(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 408:
      return "Request Timeout";
    case 429:
      return "Too Many Requests";
    case 500:
      return "Internal Server Error";
    case 503:
      return "Service Unavailable";
    case 504:
      return "Gateway Timeout";
    case 529:
      return "Overloaded";
    default:
      return "Unknown";
  }
}

}  // namespace

std::string detail::minimal_json_instance(std::string_view schema_json) {
  const json schema = keel::llm::json_too_deep_at(schema_json) == std::string_view::npos
                          ? json::parse(schema_json, nullptr, /*allow_exceptions=*/false)
                          : json(json::value_t::discarded);
  if (schema.is_discarded()) {
    return "{}";
  }
  schema_instance_builder b{schema};
  return dump(b.build(schema, 0));
}

// ---- the server --------------------------------------------------------------------------

struct mock_llm_server::impl : std::enable_shared_from_this<impl> {
  struct connection {
    tcp::socket socket;
    asio::steady_timer timer;
    explicit connection(tcp::socket s) : socket(std::move(s)), timer(socket.get_executor()) {}
  };

  asio::any_io_executor ex;
  mock_options opts;
  tcp::acceptor acceptor;
  unsigned short bound_port = 0;
  bool running = false;
  std::unordered_set<connection*> live;  // touched on the executor only

  mutable std::mutex mu;  // guards everything below
  std::uint64_t seed;
  std::map<std::string, fault_plan> plans;
  std::map<std::string, std::unique_ptr<model_state>> states;  // by request model
  clock_type::time_point started{};
  std::uint64_t next_id = 0;
  mock_stats counters;

  impl(asio::any_io_executor e, mock_options o)
      : ex(std::move(e)), opts(std::move(o)), acceptor(ex), seed(opts.seed) {}

  clock_type::time_point now() const { return opts.now ? opts.now() : clock_type::now(); }

  // ---- decisions (under mu) ----

  model_state* state_for(const std::string& model) {
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

  std::string request_id() {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%012llx", static_cast<unsigned long long>(++next_id));
    return buf;
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
      r.headers.emplace_back(names[w][d][2],
                             w == 0 ? openai_duration(reset) : rfc3339_after(reset));
    }
  }

  // `provider` resolved for one answer. The limiter's 429s keep both headers: they model a server
  // that states its exact wait, which is what the limiter is for (and what benchmarks rely on).
  static retry_after_style effective_style(retry_after_style style, wire f, bool limiter_429) {
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

  static void add_retry_after(reply& r, milliseconds d, retry_after_style style) {
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

  // Fills `r` with the provider's answer for `k` (an HTTP-level outcome). A 429 states
  // `retry_after` unless it is empty or the plan's format is `none`.
  void answer(reply& r, fault_kind k, const parsed_request& pr, model_state* st,
              std::optional<milliseconds> retry_after, bool tokens_limited, bool limiter_429) {
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
    const std::string& model = pr.model;

    if (pr.format == wire::unknown) {
      r.status = 404;
      r.body = dump(openai_error("Unknown request URL. Please check the URL and method.",
                                 "invalid_request_error", nullptr, "unknown_url"));
      return;
    }
    if (pr.malformed) {
      r.status = 400;
      if (pr.format == wire::openai) {
        r.body = dump(openai_error(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON. If you have trouble figuring out how to fix "
            "this, please contact us through our help center at help.openai.com.)",
            "invalid_request_error", nullptr, nullptr));
      } else if (pr.format == wire::anthropic) {
        r.body = dump(anthropic_error("invalid_request_error",
                                      "There was an issue with the format of your request body: "
                                      "expected a JSON object with \"model\" and \"messages\"",
                                      rid));
      } else {
        bedrock_error(r, 400, "ValidationException",
                      "Malformed input request, please reformat your input and try again.");
      }
      return;
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
    switch (pr.format) {
      case wire::openai:
        switch (k) {
          case fault_kind::ok:
            r.body =
                dump(json{{"id", "chatcmpl-mock" + id},
                          {"object", "chat.completion"},
                          {"created", static_cast<std::int64_t>(std::time(nullptr))},
                          {"model", model},
                          {"choices", json::array({{{"index", 0},
                                                    {"message",
                                                     {{"role", "assistant"},
                                                      {"content", pr.json_content.value_or(text)}}},
                                                    {"logprobs", nullptr},
                                                    {"finish_reason", "stop"}}})},
                          {"usage",
                           {{"prompt_tokens", prompt_tokens},
                            {"completion_tokens", completion_tokens},
                            {"total_tokens", prompt_tokens + completion_tokens}}},
                          {"system_fingerprint", "fp_mock"}});
            break;
          case fault_kind::rate_limit:
          case fault_kind::throttling: {
            r.status = 429;
            const char* what = tokens_limited ? "tokens per min (TPM)" : "requests per min (RPM)";
            // A server that states no delay does not state one in the body either.
            const std::string when = retry_after
                                         ? "Please try again in " + openai_duration(*retry_after)
                                         : std::string("Please try again later");
            r.body = dump(openai_error(
                "Rate limit reached for " + model + " in organization org-mock on " + what + ". " +
                    when + ". Visit https://platform.openai.com/account/rate-limits to learn more.",
                tokens_limited ? "tokens" : "requests", nullptr, "rate_limit_exceeded"));
            break;
          }
          case fault_kind::quota_exhausted:
            r.status = 429;
            r.body = dump(openai_error(
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota", nullptr, "insufficient_quota"));
            break;
          case fault_kind::context_length: {
            const std::size_t limit =
                st && st->plan.context_window ? st->plan.context_window : 128000;
            r.status = 400;
            r.body = dump(
                openai_error("This model's maximum context length is " + std::to_string(limit) +
                                 " tokens. However, your messages resulted in " +
                                 std::to_string(std::max(prompt_tokens, limit + 1)) +
                                 " tokens. Please reduce the length of the messages.",
                             "invalid_request_error", "messages", "context_length_exceeded"));
            break;
          }
          case fault_kind::server_error:
            r.status = 500;
            r.body = dump(openai_error(
                "The server had an error while processing your request. Sorry about that!",
                "server_error", nullptr, nullptr));
            break;
          case fault_kind::auth:
            r.status = 401;
            r.body = dump(
                openai_error("Incorrect API key provided: sk-****. You can find your API key at "
                             "https://platform.openai.com/account/api-keys.",
                             "invalid_request_error", nullptr, "invalid_api_key"));
            break;
          case fault_kind::bad_request:
            r.status = 400;
            r.body = dump(
                openai_error("Invalid value for 'temperature': expected a number between 0 and 2.",
                             "invalid_request_error", "temperature", "invalid_value"));
            break;
          case fault_kind::not_found:
            r.status = 404;
            r.body = dump(openai_error(
                "The model `" + model + "` does not exist or you do not have access to it.",
                "invalid_request_error", nullptr, "model_not_found"));
            break;
          case fault_kind::content_filter:
            if (!(st && st->plan.quirks.azure_content_filter)) {
              // OpenAI itself answers 200 and says so in finish_reason; the 400 below is Azure's.
              r.body = dump(
                  json{{"id", "chatcmpl-mock" + id},
                       {"object", "chat.completion"},
                       {"created", static_cast<std::int64_t>(std::time(nullptr))},
                       {"model", model},
                       {"choices",
                        json::array(
                            {{{"index", 0},
                              {"message",
                               {{"role", "assistant"}, {"content", nullptr}, {"refusal", nullptr}}},
                              {"logprobs", nullptr},
                              {"finish_reason", "content_filter"}}})},
                       {"usage",
                        {{"prompt_tokens", prompt_tokens},
                         {"completion_tokens", 0},
                         {"total_tokens", prompt_tokens}}},
                       {"system_fingerprint", "fp_mock"}});
              break;
            }
            r.status = 400;
            r.body = dump(openai_error(
                "The response was filtered due to the prompt triggering the content management "
                "policy. Please modify your prompt and retry.",
                "invalid_request_error", "prompt", "content_filter"));
            break;
          case fault_kind::timeout:
            // OpenAI documents no timeout status; 408 is a client-side notion (the SDKs retry it),
            // while a server-side timeout reaches clients as a 504 from the front end.
            r.status = st && st->plan.quirks.openai_timeout_408 ? 408 : 504;
            r.body = dump(openai_error("Request timed out.", "server_error", nullptr, "timeout"));
            break;
          default:  // unavailable, overloaded
            r.status = 503;
            r.body =
                dump(openai_error("The server is overloaded. Please try again later.",
                                  "service_unavailable_error", nullptr, "server_is_overloaded"));
            break;
        }
        break;
      case wire::anthropic:
        switch (k) {
          case fault_kind::ok:
          case fault_kind::content_filter: {
            // keel::llm reads stop_reason "refusal" as content_filtered; a refusal has no text.
            const bool refused = k == fault_kind::content_filter;
            r.body =
                dump(json{{"id", "msg_mock" + id},
                          {"type", "message"},
                          {"role", "assistant"},
                          {"model", model},
                          {"content", refused ? json::array()
                                              : json::array({{{"type", "text"}, {"text", text}}})},
                          {"stop_reason", refused ? "refusal" : "end_turn"},
                          {"stop_sequence", nullptr},
                          {"usage",
                           {{"input_tokens", prompt_tokens},
                            {"output_tokens", refused ? std::size_t{0} : completion_tokens}}}});
            break;
          }
          case fault_kind::rate_limit:
          case fault_kind::throttling:
            r.status = 429;
            r.body = dump(anthropic_error(
                "rate_limit_error",
                std::string("This request would exceed your organization's rate limit of ") +
                    (tokens_limited ? "input tokens per minute" : "requests per minute") +
                    ". For details, refer to: https://docs.anthropic.com/en/api/rate-limits.",
                rid));
            break;
          case fault_kind::quota_exhausted:
            r.status = 400;
            r.body = dump(anthropic_error(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API. Please go to Plans "
                "& Billing to upgrade or purchase credits.",
                rid));
            break;
          case fault_kind::context_length: {
            const std::size_t limit =
                st && st->plan.context_window ? st->plan.context_window : 200000;
            r.status = 400;
            r.body = dump(anthropic_error(
                "invalid_request_error",
                "prompt is too long: " + std::to_string(std::max(prompt_tokens, limit + 1)) +
                    " tokens > " + std::to_string(limit) + " maximum",
                rid));
            break;
          }
          case fault_kind::server_error:
            r.status = 500;
            r.body = dump(anthropic_error("api_error", "Internal server error", rid));
            break;
          case fault_kind::overloaded:
            r.status = 529;
            r.body = dump(anthropic_error("overloaded_error", "Overloaded", rid));
            break;
          case fault_kind::auth:
            r.status = 401;
            r.body = dump(anthropic_error("authentication_error", "invalid x-api-key", rid));
            break;
          case fault_kind::not_found:
            r.status = 404;
            r.body = dump(anthropic_error("not_found_error", "model: " + model, rid));
            break;
          case fault_kind::bad_request:
            r.status = 400;
            r.body =
                dump(anthropic_error("invalid_request_error",
                                     "temperature: Input should be less than or equal to 1", rid));
            break;
          case fault_kind::timeout:
            r.status = 504;
            r.body = dump(anthropic_error("timeout_error", "Request timed out", rid));
            break;
          default:  // unavailable
            r.status = 503;
            r.body = dump(anthropic_error("api_error", "Service Unavailable", rid));
            break;
        }
        break;
      case wire::bedrock:
        switch (k) {
          case fault_kind::ok:
          case fault_kind::content_filter: {
            // A guardrail answers 200 with its canned message and stopReason
            // "guardrail_intervened", which keel::llm reads as content_filtered.
            const bool blocked = k == fault_kind::content_filter;
            r.body = dump(
                json{{"output",
                      {{"message",
                        {{"role", "assistant"},
                         {"content",
                          json::array({{{"text", blocked ? std::string("Sorry, the model cannot "
                                                                       "answer this question.")
                                                         : text}}})}}}}},
                     {"stopReason", blocked ? "guardrail_intervened" : "end_turn"},
                     {"usage",
                      {{"inputTokens", prompt_tokens},
                       {"outputTokens", completion_tokens},
                       {"totalTokens", prompt_tokens + completion_tokens}}},
                     {"metrics", {{"latencyMs", r.latency.count()}}}});
            break;
          }
          case fault_kind::rate_limit:
          case fault_kind::throttling:
            bedrock_error(r, 429, "ThrottlingException",
                          "Too many requests, please wait before trying again.");
            break;
          case fault_kind::quota_exhausted:
            bedrock_error(r, 400, "ServiceQuotaExceededException",
                          "Your request exceeds the service quota for your account. You can view "
                          "your quotas at https://console.aws.amazon.com/servicequotas.");
            break;
          case fault_kind::context_length:
            bedrock_error(r, 400, "ValidationException", "Input is too long for requested model.");
            break;
          case fault_kind::server_error:
            bedrock_error(r, 500, "InternalServerException",
                          "The system encountered an unexpected error during processing. Try "
                          "your request again.");
            break;
          case fault_kind::auth:
            bedrock_error(r, 403, "AccessDeniedException",
                          "You don't have access to the model with the specified model ID.");
            break;
          case fault_kind::not_found:
            bedrock_error(r, 404, "ResourceNotFoundException",
                          "Could not resolve the foundation model from the provided model "
                          "identifier.");
            break;
          case fault_kind::bad_request:
            bedrock_error(r, 400, "ValidationException",
                          "1 validation error detected: Value at 'inferenceConfig.temperature' "
                          "failed to satisfy constraint: Member must have value less than or "
                          "equal to 1");
            break;
          case fault_kind::timeout:
            bedrock_error(r, 408, "ModelTimeoutException",
                          "Model has timed out in processing the request. Try your request "
                          "again.");
            break;
          default:  // unavailable, overloaded
            bedrock_error(r, 503, "ServiceUnavailableException",
                          "Bedrock is unable to process your request.");
            break;
        }
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
    }
  }

  reply decide(const parsed_request& pr) {
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
      if (!decided && plan.context_window > 0 &&
          tokens_for(pr.prompt_chars) > plan.context_window) {
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
    }
    r.action = k;
    if (k == fault_kind::reset || k == fault_kind::stall) {
      return r;
    }
    // A truncated answer cuts a would-be success short.
    answer(r, k == fault_kind::truncated ? fault_kind::ok : k, pr, st, retry_after, tokens_limited,
           limiter_429);
    r.reason = reason_for(r.status);
    return r;
  }

  // ---- counters (under mu) ----

  template <class F>
  void count(const std::string& model, F f) {
    std::lock_guard lock(mu);
    f(counters.total);
    if (!model.empty()) {
      f(counters.by_model[model]);
    }
  }

  // ---- I/O (on the executor) ----

  static asio::awaitable<void> session(std::shared_ptr<impl> self, std::shared_ptr<connection> c) {
    self->live.insert(c.get());
    struct unregister {
      impl* s;
      connection* c;
      ~unregister() { s->live.erase(c); }
    } guard{self.get(), c.get()};

    beast::flat_buffer buffer;
    for (;;) {
      bhttp::request_parser<bhttp::string_body> parser;
      parser.body_limit(self->opts.max_request_body);
      auto [ec, n] = co_await bhttp::async_read(c->socket, buffer, parser,
                                                asio::as_tuple(asio::use_awaitable));
      if (ec == bhttp::error::body_limit) {
        co_await refuse_too_large(self, c, std::string(parser.get().target()));
        co_return;
      }
      if (ec) {
        break;
      }
      bhttp::request<bhttp::string_body> req = parser.release();
      const parsed_request pr = parse(req.method_string(), req.target(), req.body());
      self->count(pr.model, [&req](mock_model_stats& s) {
        ++s.requests;
        s.last_body = req.body();
      });
      const reply r = self->decide(pr);
      if (r.latency.count() > 0) {
        c->timer.expires_after(r.latency);
        auto [tec] = co_await c->timer.async_wait(asio::as_tuple(asio::use_awaitable));
        if (tec || !self->running) {
          break;
        }
      }
      if (r.action == fault_kind::reset) {
        self->count(pr.model, [](mock_model_stats& s) { ++s.resets; });
        boost::system::error_code ignored;
        // SO_LINGER 0 makes close() send RST: the client sees a reset, not a clean EOF.
        c->socket.set_option(asio::socket_base::linger(true, 0), ignored);
        c->socket.close(ignored);
        co_return;
      }
      if (r.action == fault_kind::stall) {
        self->count(pr.model, [](mock_model_stats& s) { ++s.stalls; });
        // Wait for the client to give up (EOF/reset) or for stop(); discard anything it sends.
        char sink[512];
        for (;;) {
          auto [rec, rn] = co_await c->socket.async_read_some(asio::buffer(sink),
                                                              asio::as_tuple(asio::use_awaitable));
          if (rec) {
            break;
          }
        }
        boost::system::error_code ignored;
        c->socket.close(ignored);
        co_return;
      }
      if (r.action == fault_kind::truncated) {
        self->count(pr.model, [&](mock_model_stats& s) { ++s.truncations; });
        // Written by hand: Beast would refuse to send a body shorter than its Content-Length.
        std::string head = "HTTP/1.1 " + std::to_string(r.status) + " " + r.reason + "\r\n";
        for (const auto& [name, value] : r.headers) {
          head += name + ": " + value + "\r\n";
        }
        head += "Content-Type: application/json\r\nContent-Length: " +
                std::to_string(r.body.size() + 64) + "\r\n\r\n";
        head += r.body.substr(0, r.body.size() / 2);
        co_await asio::async_write(c->socket, asio::buffer(head),
                                   asio::as_tuple(asio::use_awaitable));
        boost::system::error_code ignored;
        c->socket.shutdown(tcp::socket::shutdown_both, ignored);
        c->socket.close(ignored);
        co_return;
      }
      bhttp::response<bhttp::string_body> res;
      res.version(req.version());
      res.result(static_cast<unsigned>(r.status));
      res.reason(r.reason);
      for (const auto& [name, value] : r.headers) {
        res.insert(name, value);
      }
      res.set(bhttp::field::content_type, "application/json");
      res.keep_alive(req.keep_alive());
      res.body() = r.body;
      res.prepare_payload();
      const int status = r.status;
      self->count(pr.model, [status](mock_model_stats& s) { ++s.by_status[status]; });
      auto [wec, wn] =
          co_await bhttp::async_write(c->socket, res, asio::as_tuple(asio::use_awaitable));
      if (wec || !res.keep_alive()) {
        break;
      }
    }
    boost::system::error_code ignored;
    c->socket.shutdown(tcp::socket::shutdown_send, ignored);
    c->socket.close(ignored);
  }

  // A request body over max_request_body: 413 in the provider's shape, as a real front end
  // (nginx: "413 Request Entity Too Large") answers. Closing at once would leave the client's
  // unsent bytes in flight, and the kernel would answer them with a reset that hides the 413;
  // so the send side is shut after the answer and the rest of the request is read and dropped
  // until the client closes (nginx's lingering close), bounded in bytes.
  static asio::awaitable<void> refuse_too_large(std::shared_ptr<impl> self,
                                                std::shared_ptr<connection> c,
                                                const std::string& target) {
    const std::string_view path = std::string_view(target).substr(0, target.find('?'));
    const std::string limit = std::to_string(self->opts.max_request_body);
    bhttp::response<bhttp::string_body> res;
    res.version(11);
    res.result(bhttp::status::payload_too_large);
    res.set(bhttp::field::content_type, "application/json");
    res.set(bhttp::field::connection, "close");
    if (path == "/v1/messages") {
      std::string rid;
      {
        std::lock_guard lock(self->mu);
        rid = "req_" + self->request_id();
      }
      res.set("request-id", rid);
      res.body() = anthropic_error("request_too_large",
                                   "Request exceeds the maximum allowed number of bytes.", rid)
                       .dump();
    } else if (path == "/v1/chat/completions") {
      res.body() = openai_error("Request too large: the body exceeds " + limit + " bytes.",
                                "invalid_request_error", nullptr, "request_too_large")
                       .dump();
    } else {
      res.body() = json{{"message", "Request Entity Too Large"}}.dump();
    }
    res.prepare_payload();
    self->count("", [](mock_model_stats& st) { ++st.by_status[413]; });
    auto [wec, wn] =
        co_await bhttp::async_write(c->socket, res, asio::as_tuple(asio::use_awaitable));
    boost::system::error_code ignored;
    if (!wec) {
      c->socket.shutdown(tcp::socket::shutdown_send, ignored);
      std::vector<char> sink(64 * 1024);
      constexpr std::size_t max_drain = std::size_t{256} * 1024 * 1024;
      for (std::size_t drained = 0; drained < max_drain;) {
        auto [rec, rn] = co_await c->socket.async_read_some(asio::buffer(sink),
                                                            asio::as_tuple(asio::use_awaitable));
        if (rec) {
          break;
        }
        drained += rn;
      }
    }
    c->socket.close(ignored);
  }

  static asio::awaitable<void> accept_loop(std::shared_ptr<impl> self) {
    while (self->running) {
      auto [ec, sock] = co_await self->acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) {
        if (!self->running || !self->acceptor.is_open()) {
          co_return;
        }
        continue;
      }
      {
        std::lock_guard lock(self->mu);
        ++self->counters.accepted_connections;
      }
      sock.set_option(tcp::no_delay(true), ec);
      asio::co_spawn(self->ex, session(self, std::make_shared<connection>(std::move(sock))),
                     asio::detached);
    }
  }

  void start() {
    if (running) {
      return;
    }
    const tcp::endpoint ep(asio::ip::make_address(opts.address), opts.port);
    acceptor.open(ep.protocol());
    acceptor.set_option(tcp::acceptor::reuse_address(true));
    acceptor.bind(ep);
    acceptor.listen();
    bound_port = acceptor.local_endpoint().port();
    {
      std::lock_guard lock(mu);
      started = now();
    }
    running = true;
    asio::co_spawn(ex, accept_loop(shared_from_this()), asio::detached);
  }

  void stop() {
    running = false;
    boost::system::error_code ignored;
    acceptor.close(ignored);
    for (connection* c : live) {
      c->timer.cancel();
      c->socket.close(ignored);
    }
  }
};

mock_llm_server::mock_llm_server(boost::asio::any_io_executor ex, mock_options opts)
    : impl_(std::make_shared<impl>(std::move(ex), std::move(opts))) {}

mock_llm_server::mock_llm_server(boost::asio::io_context& ctx, mock_options opts)
    : mock_llm_server(ctx.get_executor(), std::move(opts)) {}

mock_llm_server::~mock_llm_server() {
  impl_->stop();
}

void mock_llm_server::start() {
  impl_->start();
}

void mock_llm_server::stop() {
  impl_->stop();
}

unsigned short mock_llm_server::port() const noexcept {
  return impl_->bound_port;
}

std::string mock_llm_server::base_url() const {
  return "http://" + impl_->opts.address + ":" + std::to_string(impl_->bound_port);
}

void mock_llm_server::set_plan(const std::string& model, fault_plan plan) {
  std::lock_guard lock(impl_->mu);
  impl_->plans[model] = std::move(plan);
  // The model's state (or, for "*", every state derived from "*") restarts from the new plan.
  if (model == "*") {
    std::erase_if(impl_->states, [&](const auto& kv) { return !impl_->plans.contains(kv.first); });
  } else {
    impl_->states.erase(model);
  }
}

void mock_llm_server::set_scenario(const scenario& s) {
  std::lock_guard lock(impl_->mu);
  impl_->plans = s.plans;
  impl_->states.clear();
  if (s.seed) {
    impl_->seed = *s.seed;
  }
}

void mock_llm_server::clear_plans() {
  std::lock_guard lock(impl_->mu);
  impl_->plans.clear();
  impl_->states.clear();
}

mock_stats mock_llm_server::stats() const {
  std::lock_guard lock(impl_->mu);
  return impl_->counters;
}

rate_limits mock_llm_server::current_limit(const std::string& model) const {
  std::lock_guard lock(impl_->mu);
  auto p = impl_->plans.find(model);
  if (p == impl_->plans.end()) {
    p = impl_->plans.find("*");
  }
  if (p == impl_->plans.end()) {
    return {};
  }
  return p->second.limits_at(
      std::chrono::duration_cast<milliseconds>(impl_->now() - impl_->started));
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

void mock_llm_server::reset_stats() {
  std::lock_guard lock(impl_->mu);
  impl_->counters = mock_stats{};
}

}  // namespace keel::testing
