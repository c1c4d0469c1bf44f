// Internal to lib/redis: running a Lua script by its SHA, loading it on first use and again
// after NOSCRIPT (a Redis restarted empty), and the number formats the scripts exchange.
#pragma once

#include <keel/redis/client.hpp>

#include <boost/asio/awaitable.hpp>

#include <string>
#include <vector>

namespace keel::redis::detail {

/// Runs `script` with EVALSHA `sha` (filled on first use, loaded again once after NOSCRIPT).
/// `who` and `what` name it in errors ("keel::redis::shared_quota", "lease").
/// @throws what `client::command` throws; std::runtime_error for an error reply.
boost::asio::awaitable<reply> eval_script(client& redis, const std::string& script,
                                          std::string& sha, const char* who, const char* what,
                                          std::vector<std::string> keys,
                                          std::vector<std::string> argv);

/// `v` with every digit a double holds ("%.17g").
std::string number(double v);

/// A number the script answered (an integer, or a string such as "2.5").
/// @throws std::runtime_error naming `who` if it is not one.
double parse_number(const reply& r, const char* who);

/// 16 random hex digits: a process's name in a bucket's member set or as a breaker's prober.
std::string random_member();

/// The prelude of keel's scripts: `now` in ms on the server's clock (`TIME`), unless ARGV[1]
/// (tests) gives it.
extern const char* const now_prelude;

}  // namespace keel::redis::detail
