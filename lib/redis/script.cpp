// Internal to lib/redis (script.hpp).
#include "script.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <stdexcept>

namespace keel::redis::detail {

const char* const now_prelude = R"lua(
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
)lua";

boost::asio::awaitable<reply> eval_script(client& redis, const std::string& script,
                                          std::string& sha, const char* who, const char* what,
                                          std::vector<std::string> keys,
                                          std::vector<std::string> argv) {
  for (int loads = 0;; ++loads) {
    if (sha.empty()) {
      reply loaded = co_await redis.command({"SCRIPT", "LOAD", script});
      if (loaded.kind != reply_kind::string) {
        throw std::runtime_error(std::string(who) + ": SCRIPT LOAD failed: " + loaded.text);
      }
      sha = loaded.text;
    }
    std::vector<std::string> args = {"EVALSHA", sha, std::to_string(keys.size())};
    args.insert(args.end(), keys.begin(), keys.end());
    args.insert(args.end(), argv.begin(), argv.end());
    reply r = co_await redis.command(std::move(args));
    if (r.is_error() && r.text.rfind("NOSCRIPT", 0) == 0 && loads == 0) {
      sha.clear();  // the server restarted empty: load it again, once
      continue;
    }
    if (r.is_error()) {
      throw std::runtime_error(std::string(who) + ": " + what + " on " +
                               (keys.empty() ? std::string() : keys.front()) + ": " + r.text);
    }
    co_return r;
  }
}

std::string random_member() {
  std::random_device rd;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%08x%08x", rd(), rd());
  return buf;
}

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

double parse_number(const reply& r, const char* who) {
  if (r.kind == reply_kind::integer) {
    return static_cast<double>(r.integer);
  }
  char* end = nullptr;
  const double v = std::strtod(r.text.c_str(), &end);
  if (r.text.empty() || end != r.text.c_str() + r.text.size() || !std::isfinite(v)) {
    throw std::runtime_error(std::string(who) + ": the script answered \"" + r.text +
                             "\", not a number");
  }
  return v;
}

}  // namespace keel::redis::detail
