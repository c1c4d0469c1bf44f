// keel::redis::shared_rate (keel/redis/shared_rate.hpp).
#include <keel/redis/shared_rate.hpp>

#include "script.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace keel::redis {
namespace asio = boost::asio;

namespace {

constexpr const char* who = "keel::redis::shared_rate";

// KEYS: the hash {leader, leader_until, limit, gain, hit, pause_until}, the sorted set of active
// members (score: when each stops counting), the hash of their estimates. ARGV: now, member,
// active ("1"/"0"), estimate, new sample ("1"/"0"), gain, probe hit ("1"/"0"), pause ms, this
// member's window ms, ttl ms, wants lead ("1"/"0").
// Answers {role, share, limit, members, gain, hit, pause ms} as strings; role is "leader" or
// "follower".
constexpr const char* body = R"lua(
local member = ARGV[2]
local active = ARGV[3] == '1'
local estimate = tonumber(ARGV[4])
local new_sample = ARGV[5] == '1'
local gain = tonumber(ARGV[6])
local hit = ARGV[7] == '1'
local pause = tonumber(ARGV[8])
local window = tonumber(ARGV[9])
local ttl = tonumber(ARGV[10])
local wants_lead = active and ARGV[11] == '1'
-- Members that have not synced within their windows are gone (their estimates with them).
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. tostring(now))
if #stale > 0 then
  redis.call('HDEL', KEYS[3], unpack(stale))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. tostring(now))
end
if active then
  redis.call('ZADD', KEYS[2], now + window, member)
  if estimate > 0 then
    redis.call('HSET', KEYS[3], member, tostring(estimate))
  end
else
  redis.call('ZREM', KEYS[2], member)
  redis.call('HDEL', KEYS[3], member)
end
local members = redis.call('ZCARD', KEYS[2])
local h = redis.call('HMGET', KEYS[1], 'leader', 'leader_until', 'limit', 'gain', 'hit',
                    'pause_until')
local leader = h[1] or ''
local leader_until = tonumber(h[2]) or 0
local limit = tonumber(h[3]) or 0
local pub_gain = tonumber(h[4]) or 0
local pub_hit = h[5] == '1'
local pause_until = tonumber(h[6]) or 0
if leader ~= '' and now >= leader_until then
  leader = ''  -- lapsed: its probe is over
  pub_gain = 0
  pub_hit = false
end
if leader == member and not wants_lead then
  leader = ''
  pub_gain = 0
  pub_hit = false
elseif leader == '' and wants_lead then
  leader = member
end
local role = 'follower'
local answer_gain = pub_gain
local answer_hit = false
if leader == member then
  role = 'leader'
  leader_until = now + window
  pub_gain = gain
  answer_gain = 0
  answer_hit = pub_hit
  pub_hit = false
elseif hit and pub_gain > 0 then
  pub_hit = true
end
if new_sample and estimate > 0 then
  -- A new measurement: the fleet's limit is what its active members measured, together.
  -- Members with no estimate yet were sending too: scale by active / reporting members.
  local sum = 0
  local reporting = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[3])) do
    sum = sum + tonumber(v)
    reporting = reporting + 1
  end
  if reporting > 0 then
    limit = sum * members / reporting
  end
end
if pause > 0 and now + pause > pause_until then
  pause_until = now + pause
end
redis.call('HSET', KEYS[1], 'leader', leader, 'leader_until', tostring(leader_until),
           'limit', tostring(limit), 'gain', tostring(pub_gain), 'hit', pub_hit and '1' or '0',
           'pause_until', tostring(pause_until))
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], ttl)
end
local share = 0
if limit > 0 and members > 0 then
  share = limit / members
end
local remaining = 0
if pause_until > now then
  remaining = pause_until - now
end
return {role, tostring(share), tostring(limit), tostring(members), tostring(answer_gain),
        answer_hit and '1' or '0', tostring(remaining)}
)lua";

// A non-negative finite number, or 0.
double clean(double v) {
  return std::isfinite(v) ? std::max(0.0, v) : 0.0;
}

}  // namespace

shared_rate::shared_rate(client& redis, rate_options options)
    : redis_(redis), options_(std::move(options)), member_(detail::random_member()) {}

asio::awaitable<rate_view> shared_rate::sync(const rate_report& mine,
                                             std::optional<long long> now) {
  static const std::string script = std::string(detail::now_prelude) + body;
  const reply r = co_await detail::eval_script(
      redis_, script, sha_, who, "sync",
      {options_.key, options_.key + ":members", options_.key + ":estimates"},
      {now ? std::to_string(*now) : std::string(), member_, mine.active ? "1" : "0",
       detail::number(clean(mine.estimate)), mine.new_sample ? "1" : "0",
       detail::number(clean(mine.gain)), mine.probe_hit ? "1" : "0",
       std::to_string(std::max<long long>(0, mine.pause.count())),
       std::to_string(std::max(options_.member_window, mine.window).count()),
       std::to_string(options_.idle_ttl.count()), mine.wants_lead ? "1" : "0"});
  if (r.kind != reply_kind::array || r.elements.size() != 7) {
    throw std::runtime_error(std::string(who) + ": sync answered an unexpected reply");
  }
  rate_view v;
  v.leader = r.elements[0].text == "leader";
  v.share = clean(detail::parse_number(r.elements[1], who));
  v.limit = clean(detail::parse_number(r.elements[2], who));
  v.members = static_cast<std::size_t>(clean(detail::parse_number(r.elements[3], who)));
  v.gain = clean(detail::parse_number(r.elements[4], who));
  v.probe_hit = r.elements[5].text == "1";
  v.pause = std::chrono::milliseconds(
      static_cast<long long>(std::ceil(clean(detail::parse_number(r.elements[6], who)))));
  co_return v;
}

}  // namespace keel::redis
