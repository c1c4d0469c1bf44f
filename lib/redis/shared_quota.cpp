// keel::redis::shared_quota and shared_pacer (keel/redis/shared_quota.hpp).
#include <keel/redis/shared_quota.hpp>

#include "script.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace keel::redis {
namespace asio = boost::asio;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;

namespace {

constexpr const char* who = "keel::redis::shared_quota";

// The bucket: a hash {tokens, ts, pause} (times in ms on the server's clock, or ARGV's in tests).
// Numbers go back as strings: Redis truncates a Lua number reply to an integer.
constexpr const char* lease_body = R"lua(
local want = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local burst = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'pause')
local tokens = tonumber(s[1])
local ts = tonumber(s[2])
local pause = tonumber(s[3]) or 0
if tokens == nil or ts == nil then
  tokens = 0  -- new (or Redis restarted empty): the fleet may have been sending until now
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
  ts = now
end
local granted = 0
local wait = 0
if now < pause then
  wait = pause - now
else
  granted = math.min(want, tokens)
  tokens = tokens - granted
  if granted < want then
    if rate > 0 then
      wait = (want - granted) * 1000 / rate
    else
      wait = -1
    end
  end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts), 'pause', tostring(pause))
redis.call('PEXPIRE', KEYS[1], ttl)
local members = 0
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[2], now, ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[7]))
  redis.call('PEXPIRE', KEYS[2], ttl)
  members = redis.call('ZCARD', KEYS[2])
end
return {tostring(granted), tostring(wait), tostring(members)}
)lua";

// A pause empties the bucket and starts its refill at the pause's end.
constexpr const char* pause_body = R"lua(
local d = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local pause = tonumber(redis.call('HGET', KEYS[1], 'pause')) or 0
local ends = now + d
if ends > pause then
  redis.call('HSET', KEYS[1], 'tokens', '0', 'ts', tostring(ends), 'pause', tostring(ends))
  redis.call('PEXPIRE', KEYS[1], math.max(ttl, math.ceil(d)))
end
return 1
)lua";

}  // namespace

// ---- shared_quota ------------------------------------------------------------------------------

shared_quota::shared_quota(client& redis, quota_options options)
    : redis_(redis), options_(std::move(options)) {}

asio::awaitable<reply> shared_quota::run(const std::string& script, std::string& sha,
                                         const char* what, std::vector<std::string> keys,
                                         std::vector<std::string> argv) {
  return detail::eval_script(redis_, script, sha, "keel::redis::shared_quota", what,
                             std::move(keys), std::move(argv));
}

asio::awaitable<lease_result> shared_quota::lease(double want, std::optional<long long> now,
                                                  std::string member) {
  static const std::string script = std::string(detail::now_prelude) + lease_body;
  reply r = co_await run(script, lease_sha_, "lease", {options_.key, options_.key + ":members"},
                         {now ? std::to_string(*now) : std::string(), detail::number(want),
                          detail::number(options_.rate), detail::number(options_.burst),
                          std::to_string(options_.idle_ttl.count()), std::move(member),
                          std::to_string(std::max<long long>(1, options_.member_window.count()))});
  if (r.kind != reply_kind::array || r.elements.size() != 3) {
    throw std::runtime_error("keel::redis::shared_quota: lease answered an unexpected reply");
  }
  lease_result out;
  out.granted = detail::parse_number(r.elements[0], who);
  out.members = static_cast<std::size_t>(std::max(0.0, detail::parse_number(r.elements[2], who)));
  const double wait_ms = detail::parse_number(r.elements[1], who);
  out.retry_after = wait_ms < 0 ? nanoseconds(std::chrono::seconds(1))
                                : nanoseconds(static_cast<long long>(std::ceil(wait_ms * 1e6)));
  co_return out;
}

asio::awaitable<void> shared_quota::pause(milliseconds d, std::optional<long long> now) {
  static const std::string script = std::string(detail::now_prelude) + pause_body;
  co_await run(script, pause_sha_, "pause", {options_.key},
               {now ? std::to_string(*now) : std::string(), std::to_string(d.count()),
                std::to_string(options_.idle_ttl.count())});
}

// ---- shared_pacer ------------------------------------------------------------------------------

struct shared_pacer::state {
  state(shared_quota& q, milliseconds w) : quota(q), window(w) {}
  shared_quota& quota;
  milliseconds window;
  double pool = 0;
  bool leasing = false;
  std::uint64_t generation = 0;                           // leases finished
  std::exception_ptr last_error;                          // of the last lease, if it failed
  std::chrono::steady_clock::time_point next_lease_at{};  // no lease before (short grants)
  std::optional<asio::steady_timer> wake;  // waiters for a lease; cancelled when one ends
  std::uint64_t leases = 0;
  std::uint64_t granted = 0;
  bool closed = false;
  std::string member = detail::random_member();  // this pacer in the bucket's member set
  std::size_t members = 0;                       // as the last lease counted them
  // This process's demand (tokens per second, smoothed), measured between leases.
  double demand = 0;
  double taken = 0;           // tokens taken from the pool so far
  double taken_at_lease = 0;  // `taken` when the last lease started
  std::chrono::steady_clock::time_point lease_started{};
  double low_water = 0;  // below this the next lease starts early

  // Starts a lease of about one window of this process's demand (at least 16 times `cost`, so
  // that a request costs at most 1/16 round trip; at most one window of the bucket's rate).
  void start_lease(const asio::any_io_executor& ex, double cost,
                   const std::shared_ptr<state>& self) {
    const auto now = std::chrono::steady_clock::now();
    if (lease_started != std::chrono::steady_clock::time_point{}) {
      const double dt = std::chrono::duration<double>(now - lease_started).count();
      if (dt > 0) {
        const double r = (taken - taken_at_lease) / dt;
        demand = demand == 0 ? r : 0.7 * demand + 0.3 * r;
      }
    }
    lease_started = now;
    taken_at_lease = taken;
    const double w = effective_window().count();
    const double size =
        std::min(std::max(16 * cost, demand * w), std::max(quota.options().rate * w, cost));
    low_water = size / 2;
    leasing = true;
    asio::co_spawn(ex, lease_task(self, std::max(cost - pool, size)), asio::detached);
  }

  // The lease window, at most burst / rate (seconds).
  std::chrono::duration<double> effective_window() const {
    const auto& o = quota.options();
    std::chrono::duration<double> w = window;
    if (o.rate > 0) {
      w = std::min(w, std::chrono::duration<double>(o.burst / o.rate));
    }
    return w;
  }
};

shared_pacer::shared_pacer(shared_quota& quota, milliseconds lease_window)
    : state_(std::make_shared<state>(quota, lease_window)) {}

shared_pacer::~shared_pacer() {
  state_->closed = true;
  if (state_->wake) {
    state_->wake->cancel();
  }
}

asio::awaitable<void> shared_pacer::acquire(double cost) {
  std::shared_ptr<state> st = state_;
  const auto ex = co_await asio::this_coro::executor;
  if (!st->wake) {
    st->wake.emplace(ex, asio::steady_timer::time_point::max());
  }
  const auto cancelled = [&]() -> asio::awaitable<bool> {
    co_return (co_await asio::this_coro::cancellation_state).cancelled() !=
        asio::cancellation_type::none;
  };
  for (;;) {
    if (st->closed) {
      throw boost::system::system_error(asio::error::operation_aborted);
    }
    if (st->pool >= cost) {
      st->pool -= cost;
      st->taken += cost;
      ++st->granted;
      // Running low: the next lease starts now, so that callers seldom wait for a round trip.
      if (st->pool < st->low_water && !st->leasing &&
          std::chrono::steady_clock::now() >= st->next_lease_at) {
        st->start_lease(ex, cost, st);
      }
      co_return;
    }
    if (!st->leasing && std::chrono::steady_clock::now() < st->next_lease_at) {
      // The shared bucket was short at the last lease (other processes take from it too): no
      // new lease until it could give what was missing, and not before one lease window, so
      // that a process leases at most once per window however many share the key (round trips
      // per request <= processes / (rate * window)).
      asio::steady_timer t(ex, st->next_lease_at);
      boost::system::error_code ec;
      co_await t.async_wait(asio::redirect_error(asio::use_awaitable, ec));
      if (co_await cancelled()) {
        throw boost::system::system_error(asio::error::operation_aborted);
      }
      continue;
    }
    // Taken before the lease starts: co_spawn may run a lease that fails at once (Redis in its
    // reconnect delay) to its end before returning, and a wait begun after that would miss it.
    const std::uint64_t seen = st->generation;
    if (!st->leasing) {
      st->start_lease(ex, cost, st);
    }
    if (st->generation == seen) {
      boost::system::error_code ec;
      co_await st->wake->async_wait(asio::redirect_error(asio::use_awaitable, ec));
      if (co_await cancelled()) {
        throw boost::system::system_error(asio::error::operation_aborted);
      }
    }
    if (st->generation != seen && st->last_error) {
      std::rethrow_exception(st->last_error);  // the caller falls back to its local limit
    }
  }
}

// One lease, detached from the callers so that a cancelled caller loses nothing: what it brings
// goes to the pool.
asio::awaitable<void> shared_pacer::lease_task(std::shared_ptr<state> st, double want) {
  try {
    const lease_result r = co_await st->quota.lease(want, std::nullopt, st->member);
    st->pool += r.granted;
    st->members = r.members;
    st->last_error = nullptr;
    if (r.granted < want) {
      // The window is at most burst / rate: a longer wait would let the bucket overflow.
      const auto window = std::chrono::duration_cast<nanoseconds>(st->effective_window());
      st->next_lease_at =
          std::chrono::steady_clock::now() +
          std::min<nanoseconds>(std::max(r.retry_after, window), std::chrono::seconds(1));
    }
  } catch (...) {
    st->last_error = std::current_exception();
  }
  ++st->leases;
  ++st->generation;
  st->leasing = false;
  if (st->wake) {
    st->wake->cancel();
  }
}

double shared_pacer::pooled() const noexcept {
  return state_->pool;
}
std::uint64_t shared_pacer::leases() const noexcept {
  return state_->leases;
}
std::uint64_t shared_pacer::granted() const noexcept {
  return state_->granted;
}
std::size_t shared_pacer::members() const noexcept {
  return state_->members;
}

}  // namespace keel::redis
