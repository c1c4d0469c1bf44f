// keel::trace: W3C trace context, spans and the tracer's bounded export queue.
#include <keel/trace.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <deque>
#include <random>

namespace keel::trace {
namespace asio = boost::asio;

namespace {

int hex_digit(char c) noexcept {
  if (c >= '0' && c <= '9') {
    return c - '0';
  }
  if (c >= 'a' && c <= 'f') {
    return c - 'a' + 10;
  }
  return -1;  // the spec allows lower case only
}

// Reads 2 * N lower-case hex digits into `out`.
template <std::size_t N>
bool read_hex(std::string_view s, std::array<std::uint8_t, N>& out) {
  if (s.size() != 2 * N) {
    return false;
  }
  for (std::size_t i = 0; i < N; ++i) {
    const int hi = hex_digit(s[2 * i]);
    const int lo = hex_digit(s[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      return false;
    }
    out[i] = static_cast<std::uint8_t>(hi * 16 + lo);
  }
  return true;
}

template <std::size_t N>
bool all_zero(const std::array<std::uint8_t, N>& a) noexcept {
  return std::all_of(a.begin(), a.end(), [](std::uint8_t b) { return b == 0; });
}

template <std::size_t N>
void fill_random(std::array<std::uint8_t, N>& out, keel::random_source& rng) {
  do {
    for (std::size_t i = 0; i < N; i += 8) {
      std::uint64_t r = rng.next();
      for (std::size_t j = i; j < std::min(N, i + 8); ++j) {
        out[j] = static_cast<std::uint8_t>(r);
        r >>= 8;
      }
    }
  } while (all_zero(out));
}

std::uint64_t system_now() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

}  // namespace

bool span_context::valid() const noexcept {
  return !all_zero(trace) && !all_zero(span);
}

std::string to_hex(const std::uint8_t* bytes, std::size_t n) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (std::size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[bytes[i] >> 4];
    out[2 * i + 1] = digits[bytes[i] & 15];
  }
  return out;
}

std::optional<span_context> parse_traceparent(std::string_view tp, std::string_view tracestate) {
  // version "-" trace-id "-" parent-id "-" flags; a future version may append "-" fields.
  if (tp.size() < 55) {
    return std::nullopt;
  }
  std::array<std::uint8_t, 1> version{};
  std::array<std::uint8_t, 1> flags{};
  span_context c;
  if (!read_hex(tp.substr(0, 2), version) || version[0] == 0xff || tp[2] != '-' ||
      !read_hex(tp.substr(3, 32), c.trace) || tp[35] != '-' ||
      !read_hex(tp.substr(36, 16), c.span) || tp[52] != '-' || !read_hex(tp.substr(53, 2), flags)) {
    return std::nullopt;
  }
  if ((version[0] == 0 && tp.size() != 55) || (tp.size() > 55 && tp[55] != '-')) {
    return std::nullopt;
  }
  if (!c.valid()) {
    return std::nullopt;
  }
  c.flags = flags[0];
  // tracestate: passed on as received, bounded (the spec allows 32 members of 256 bytes).
  if (tracestate.size() <= 512) {
    c.state = std::string(tracestate);
  }
  return c;
}

std::string to_traceparent(const span_context& c) {
  std::string out = "00-";
  out += to_hex(c.trace.data(), c.trace.size());
  out += '-';
  out += to_hex(c.span.data(), c.span.size());
  out += '-';
  out += to_hex(&c.flags, 1);
  return out;
}

const trace::value* span_data::find(std::string_view key) const noexcept {
  for (const attribute& a : attributes) {
    if (a.key == key) {
      return &a.value;
    }
  }
  return nullptr;
}

// ---- the tracer's state --------------------------------------------------------------------

namespace detail {

struct tracer_state {
  tracer_state(asio::any_io_executor ex, exporter& exp, tracer_options opts)
      : executor(std::move(ex)),
        out(&exp),
        options(std::move(opts)),
        ids(options.seed != 0
                ? options.seed
                : (std::uint64_t{std::random_device{}()} << 32) ^ std::random_device{}()),
        wake(executor),
        idle(executor) {
    if (!options.now) {
      options.now = system_now;
    }
    options.max_batch = std::max<std::size_t>(options.max_batch, 1);
    res.attributes.emplace_back("service.name", options.service_name);
    res.attributes.emplace_back("telemetry.sdk.name", "keel");
    res.attributes.emplace_back("telemetry.sdk.language", "cpp");
    res.attributes.emplace_back("telemetry.sdk.version", KEEL_VERSION_STRING);
    for (const attribute& a : options.resource_attributes) {
      res.attributes.push_back(a);
    }
    res.scope_version = KEEL_VERSION_STRING;
    wake.expires_at(asio::steady_timer::time_point::max());
    idle.expires_at(asio::steady_timer::time_point::max());
  }

  void push(span_data&& d) {
    if (closed) {
      ++stats.dropped;  // ended after its tracer: nobody exports it
      return;
    }
    if (queue.size() >= options.max_queue) {
      ++stats.dropped;
      return;
    }
    queue.push_back(std::move(d));
    if (!running) {
      running = true;
      asio::co_spawn(executor, export_loop(shared_from_this_), asio::detached);
    } else if (queue.size() >= options.max_batch) {
      wake.cancel();  // a full batch need not wait for the interval
    }
  }

  // The loop ends (and wakes `flush`) when the queue is empty or the tracer is gone: a closed
  // tracer's exporter may be gone too, so nothing is exported after `closed`.
  static void loop_ended(tracer_state& s) {
    s.running = false;
    s.idle.cancel();
  }

  static asio::awaitable<void> export_loop(std::weak_ptr<tracer_state> weak) {
    boost::system::error_code ignored;
    for (;;) {
      std::shared_ptr<tracer_state> self = weak.lock();
      if (!self) {
        co_return;
      }
      if (self->queue.empty() || self->closed) {
        loop_ended(*self);
        co_return;
      }
      if (self->queue.size() < self->options.max_batch && self->flushing == 0) {
        self->wake.expires_after(self->options.interval);
        asio::steady_timer& timer = self->wake;
        self.reset();  // a tracer destroyed during the wait ends the loop
        co_await timer.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
        self = weak.lock();
        if (!self) {
          co_return;
        }
        if (self->closed) {
          loop_ended(*self);
          co_return;
        }
      }
      const std::size_t n = std::min(self->queue.size(), self->options.max_batch);
      std::vector<span_data> batch;
      batch.reserve(n);
      for (std::size_t i = 0; i < n; ++i) {
        batch.push_back(std::move(self->queue.front()));
        self->queue.pop_front();
      }
      // After a failed export, batches are dropped (and counted) for `failure_pause`: a
      // collector that is down costs one timeout per pause, not one per batch, and a program
      // that flushes at exit is not held for the whole queue's worth of timeouts.
      if (std::chrono::steady_clock::now() < self->paused_until) {
        self->stats.failed += n;
        continue;
      }
      try {
        co_await self->out->export_spans(self->res, std::move(batch));
        self->stats.exported += n;
      } catch (...) {
        ++self->stats.failed_exports;
        self->stats.failed += n;
        self->paused_until = std::chrono::steady_clock::now() + self->options.failure_pause;
        if (self->options.on_export_error) {
          self->options.on_export_error(std::current_exception(), n);
        }
      }
    }
  }

  static asio::awaitable<void> flush(std::shared_ptr<tracer_state> st) {
    ++st->flushing;
    struct done {
      tracer_state* s;
      ~done() { --s->flushing; }
    } guard{st.get()};
    while (!st->closed && (st->running || !st->queue.empty())) {
      if (!st->running) {
        st->running = true;
        asio::co_spawn(st->executor, export_loop(st), asio::detached);
      }
      st->wake.cancel();
      boost::system::error_code ec;
      co_await st->idle.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      if ((co_await asio::this_coro::cancellation_state).cancelled() !=
          asio::cancellation_type::none) {
        throw boost::system::system_error(asio::error::operation_aborted);
      }
    }
  }

  asio::any_io_executor executor;
  exporter* out;
  tracer_options options;
  keel::random_source ids;
  trace::resource res;
  std::deque<span_data> queue;
  tracer_stats stats;
  asio::steady_timer wake;  // the export loop's wait for a batch
  asio::steady_timer idle;  // cancelled when the export loop ends (for `flush`)
  std::chrono::steady_clock::time_point paused_until{};  // after a failed export
  bool running = false;
  bool closed = false;
  int flushing = 0;
  std::weak_ptr<tracer_state> shared_from_this_;
};

}  // namespace detail

// ---- span ------------------------------------------------------------------------------------

span::span(span&& other) noexcept
    : owner_(std::move(other.owner_)),
      context_(std::move(other.context_)),
      data_(std::move(other.data_)) {}

span& span::operator=(span&& other) noexcept {
  if (this != &other) {
    end();
    owner_ = std::move(other.owner_);
    context_ = std::move(other.context_);
    data_ = std::move(other.data_);
  }
  return *this;
}

void span::set_value(std::string_view key, trace::value v) {
  for (attribute& a : data_->attributes) {
    if (a.key == key) {
      a.value = std::move(v);
      return;
    }
  }
  if (data_->attributes.size() >= max_span_attributes) {
    ++data_->dropped_attributes;
    return;
  }
  data_->attributes.emplace_back(std::string(key), std::move(v));
}

void span::add_event(std::string_view name, std::vector<attribute> attributes) {
  if (!data_) {
    return;
  }
  if (data_->events.size() >= max_span_events) {
    ++data_->dropped_events;  // e.g. an item held at an open breaker through a long outage
    return;
  }
  data_->events.push_back(event{std::string(name), owner_->options.now(), std::move(attributes)});
}

void span::set_name(std::string name) {
  if (data_) {
    data_->name = std::move(name);
  }
}

void span::set_error(std::string_view type, std::string_view message) {
  if (!data_) {
    return;
  }
  data_->status = status_code::error;
  data_->status_message = std::string(message);
  set_value("error.type", std::string(type));
}

void span::set_ok() {
  if (data_) {
    data_->status = status_code::ok;
  }
}

void span::finish() {
  data_->end_unix_nano = owner_->options.now();
  owner_->push(std::move(*data_));
  data_.reset();
  owner_.reset();
}

// ---- tracer ----------------------------------------------------------------------------------

tracer::tracer(asio::any_io_executor ex, exporter& exp, tracer_options options)
    : state_(std::make_shared<detail::tracer_state>(std::move(ex), exp, std::move(options))) {
  state_->shared_from_this_ = state_;
}

tracer::~tracer() {
  // Spans still open keep the state alive but queue nothing more. What is queued is dropped
  // (`flush` first to export it); a waiting export loop and any `flush` wake and end without
  // touching the exporter.
  state_->closed = true;
  state_->stats.dropped += state_->queue.size();
  state_->queue.clear();
  state_->wake.cancel();
  state_->idle.cancel();
}

span tracer::start(std::string_view name, span_kind kind, const span_context* parent) {
  detail::tracer_state& st = *state_;
  span s;
  const bool child = parent && parent->valid();
  if (child) {
    s.context_.trace = parent->trace;
    s.context_.flags = parent->flags & 1;  // version 00 defines only "sampled"
    s.context_.state = parent->state;
  } else {
    fill_random(s.context_.trace, st.ids);
    if (st.options.xray_ids) {
      const auto secs = static_cast<std::uint32_t>(st.options.now() / 1'000'000'000ULL);
      for (std::size_t i = 0; i < 4; ++i) {
        s.context_.trace[i] = static_cast<std::uint8_t>(secs >> (24 - 8 * i));
      }
    }
    // TraceIdRatioBased: the last 8 bytes as a big-endian number against ratio x 2^64.
    std::uint64_t low = 0;
    for (std::size_t i = 8; i < 16; ++i) {
      low = (low << 8) | s.context_.trace[i];
    }
    const double ratio = std::clamp(st.options.sample_ratio, 0.0, 1.0);
    const bool sampled = ratio >= 1.0 || static_cast<double>(low) < ratio * 0x1.0p64;
    s.context_.flags = sampled ? 1 : 0;
  }
  fill_random(s.context_.span, st.ids);
  if (!s.context_.sampled()) {
    return s;
  }
  ++st.stats.sampled;
  s.owner_ = state_;
  s.data_ = std::make_unique<span_data>();
  s.data_->context = s.context_;
  if (child) {
    s.data_->parent = parent->span;
  }
  s.data_->attributes.reserve(24);  // keel's spans carry up to ~20: no regrowth on the way
  s.data_->name = std::string(name);
  s.data_->kind = kind;
  s.data_->start_unix_nano = st.options.now();
  return s;
}

std::uint64_t tracer::now() const {
  return state_->options.now();
}

// Not a coroutine: the state is taken now, so a flush started before the tracer's destruction
// holds what it needs.
asio::awaitable<void> tracer::flush() {
  return detail::tracer_state::flush(state_);
}

tracer_stats tracer::stats() const noexcept {
  return state_->stats;
}

const trace::resource& tracer::resource() const noexcept {
  return state_->res;
}

}  // namespace keel::trace
