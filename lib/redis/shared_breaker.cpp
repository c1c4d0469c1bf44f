// keel::redis::shared_breaker (keel/redis/shared_breaker.hpp).
#include <keel/redis/shared_breaker.hpp>

#include "script.hpp"

#include <cmath>
#include <stdexcept>

namespace keel::redis {
namespace asio = boost::asio;

namespace {

constexpr const char* who = "keel::redis::shared_breaker";

// The hash {open_until, epoch, failures, probe, probe_until}; open_until 0 is closed. ARGV:
// now, mode ("sync", "opened", "closed"), member, A, B, threshold, break ms, probe ms, ttl ms;
// for sync A = failures after the batch's last success, B = "1" if it held a success; for
// opened A = the break in ms. Answers {state, remaining ms, epoch} as strings.
constexpr const char* body = R"lua(
local mode = ARGV[2]
local member = ARGV[3]
local threshold = tonumber(ARGV[6])
local brk = tonumber(ARGV[7])
local probe_ms = tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local h = redis.call('HMGET', KEYS[1], 'open_until', 'epoch', 'failures', 'probe', 'probe_until',
                    'incarnation')
local incarnation = h[6]
if not incarnation then
  -- A new hash (first use, expired, or Redis restarted empty): epochs start again, so answers
  -- carry this name with them.
  incarnation = tostring(now) .. ':' .. member
end
local open_until = tonumber(h[1]) or 0
local epoch = tonumber(h[2]) or 0
local failures = tonumber(h[3]) or 0
local probe = h[4] or ''
local probe_until = tonumber(h[5]) or 0
if mode == 'sync' then
  if open_until == 0 then
    if ARGV[5] == '1' then
      failures = tonumber(ARGV[4])
    else
      failures = failures + tonumber(ARGV[4])
    end
    if failures >= threshold then
      open_until = now + brk
      epoch = epoch + 1
      failures = 0
      probe = ''
      probe_until = 0
    end
  end
elseif mode == 'opened' then
  if open_until == 0 then
    epoch = epoch + 1
  end
  if now + tonumber(ARGV[4]) > open_until then
    open_until = now + tonumber(ARGV[4])
  end
  if probe == member then
    probe = ''
    probe_until = 0
  end
  failures = 0
elseif mode == 'closed' then
  if open_until ~= 0 then
    epoch = epoch + 1
  end
  open_until = 0
  failures = 0
  probe = ''
  probe_until = 0
end
local what = 'closed'
local remaining = 0
if open_until ~= 0 then
  if now < open_until then
    what = 'open'
    remaining = open_until - now
  else
    if probe == '' or now >= probe_until then
      probe = member
      probe_until = now + probe_ms
    end
    if probe == member then
      what = 'probe'
    else
      what = 'probing'
      remaining = probe_until - now
    end
  end
end
redis.call('HSET', KEYS[1], 'open_until', tostring(open_until), 'epoch', tostring(epoch),
           'failures', tostring(failures), 'probe', probe, 'probe_until', tostring(probe_until),
           'incarnation', incarnation)
redis.call('PEXPIRE', KEYS[1], ttl)
return {what, tostring(remaining), tostring(epoch), incarnation}
)lua";

}  // namespace

shared_breaker::shared_breaker(client& redis, breaker_options options)
    : redis_(redis), options_(std::move(options)), member_(detail::random_member()) {}

asio::awaitable<breaker_view> shared_breaker::run(const char* mode, std::optional<long long> now,
                                                  std::string a, std::string b) {
  static const std::string script = std::string(detail::now_prelude) + body;
  const reply r = co_await detail::eval_script(
      redis_, script, sha_, who, mode, {options_.key},
      {now ? std::to_string(*now) : std::string(), mode, member_, std::move(a), std::move(b),
       std::to_string(options_.failure_threshold), std::to_string(options_.break_duration.count()),
       std::to_string(options_.probe_timeout.count()), std::to_string(options_.idle_ttl.count())});
  if (r.kind != reply_kind::array || r.elements.size() != 4) {
    throw std::runtime_error(std::string(who) + ": " + mode + " answered an unexpected reply");
  }
  breaker_view v;
  const std::string& what = r.elements[0].text;
  v.what = what == "open"      ? breaker_view::state::open
           : what == "probe"   ? breaker_view::state::probe
           : what == "probing" ? breaker_view::state::probing
                               : breaker_view::state::closed;
  v.remaining = std::chrono::milliseconds(
      static_cast<long long>(std::ceil(detail::parse_number(r.elements[1], who))));
  v.epoch = static_cast<std::uint64_t>(detail::parse_number(r.elements[2], who));
  v.incarnation = r.elements[3].text;
  co_return v;
}

asio::awaitable<breaker_view> shared_breaker::sync(std::size_t failures, bool had_success,
                                                   std::optional<long long> now) {
  return run("sync", now, std::to_string(failures), had_success ? "1" : "0");
}

asio::awaitable<breaker_view> shared_breaker::opened(std::chrono::milliseconds break_duration,
                                                     std::optional<long long> now) {
  return run("opened", now, std::to_string(break_duration.count()), "");
}

asio::awaitable<breaker_view> shared_breaker::closed(std::optional<long long> now) {
  return run("closed", now, "", "");
}

}  // namespace keel::redis
