// Tests for keel/redis/client.hpp against a real redis-server (tests/redis_support.hpp) and, for
// a server that never answers, a silent acceptor; all on 127.0.0.1.
#include <keel/classify.hpp>
#include <keel/redis/client.hpp>

#include "redis_support.hpp"
#include "support.hpp"
#include "tls_support.hpp"

#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/system/errc.hpp>
#include <catch2/catch.hpp>

#include <list>
#include <memory>
#include <string>
#include <vector>

using namespace keel_test;
using keel::redis::reply;
using keel::redis::reply_kind;
using tcp = asio::ip::tcp;

namespace {

/// Accepts connections on 127.0.0.1 and reads from them forever, never answering.
struct silent_server {
  explicit silent_server(asio::io_context& ctx)
      : acceptor(ctx, {asio::ip::make_address("127.0.0.1"), 0}) {
    asio::co_spawn(ctx, accept(), asio::detached);
  }
  std::uint16_t port() const { return acceptor.local_endpoint().port(); }
  asio::awaitable<void> accept() {
    for (;;) {
      boost::system::error_code ec;
      tcp::socket s = co_await acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        co_return;
      }
      ++accepted;
      if (close_at_once) {
        s.close();
        continue;
      }
      sockets.push_back(std::move(s));
      asio::co_spawn(acceptor.get_executor(), drain(sockets.back()), asio::detached);
    }
  }
  static asio::awaitable<void> drain(tcp::socket& s) {
    char buf[4096];
    boost::system::error_code ec;
    while (!ec) {
      co_await s.async_read_some(asio::buffer(buf), asio::redirect_error(asio::use_awaitable, ec));
    }
  }
  tcp::acceptor acceptor;
  std::list<tcp::socket> sockets;
  int accepted = 0;
  /// Close each connection as soon as it is accepted (a Redis at maxclients, or a proxy with
  /// no backend).
  bool close_at_once = false;
};

}  // namespace

TEST_CASE("a redis client sends commands and reads every kind of reply", "[redis]") {
  redis_process server;
  asio::io_context ctx;
  keel::redis::client redis(ctx.get_executor(), redis_options(server.port()));
  const auto cmd = [&](std::vector<std::string> args) {
    outcome<reply> out = run_one(ctx, redis.command(std::move(args)));
    REQUIRE_FALSE(out.error);
    return std::move(*out.value);
  };
  reply r = cmd({"PING"});
  CHECK(r.kind == reply_kind::status);
  CHECK(r.text == "PONG");
  CHECK(cmd({"SET", "k", "v\r\nwith a CRLF"}).text == "OK");
  r = cmd({"GET", "k"});
  CHECK(r.kind == reply_kind::string);
  CHECK(r.text == "v\r\nwith a CRLF");  // bulk strings carry any bytes
  CHECK(cmd({"GET", "missing"}).kind == reply_kind::nil);
  r = cmd({"INCRBY", "n", "41"});
  CHECK(r.kind == reply_kind::integer);
  CHECK(r.integer == 41);
  r = cmd({"INCR", "k"});  // not a number: an error reply is a value
  CHECK(r.is_error());
  CHECK(r.text.find("not an integer") != std::string::npos);
  r = cmd({"EVAL", "return {1, 'a', {2}}", "0"});
  REQUIRE(r.kind == reply_kind::array);
  REQUIRE(r.elements.size() == 3);
  CHECK(r.elements[0].integer == 1);
  CHECK(r.elements[1].text == "a");
  REQUIRE(r.elements[2].elements.size() == 1);
  CHECK(r.elements[2].elements[0].integer == 2);
  CHECK(redis.connected());
  CHECK(redis.connects() == 1);
}

TEST_CASE("commands issued together go out in few writes and are answered in order", "[redis]") {
  redis_process server;
  asio::io_context ctx;
  keel::redis::client redis(ctx.get_executor(), redis_options(server.port()));
  constexpr int n = 1000;
  std::vector<outcome<reply>> outs(n);
  for (int i = 0; i < n; ++i) {
    spawn(ctx, redis.command({"INCR", "counter"}), outs[i]);
  }
  REQUIRE(run_real(ctx, [&] { return outs.back().done; }));
  REQUIRE(run_real(
      ctx, [&] { return std::all_of(outs.begin(), outs.end(), [](auto& o) { return o.done; }); }));
  for (int i = 0; i < n; ++i) {
    REQUIRE_FALSE(outs[i].error);
    CHECK(outs[i].value->integer == i + 1);  // in the order they were issued
  }
  CHECK(redis.commands() == n);
  // All 1,000 were queued before the first write ran (it is posted): one write, plus at most a
  // couple more if the connect finished while they were still being queued.
  CHECK(redis.writes() <= 3);
}

TEST_CASE("a server that does not answer times the command out and the next one reconnects",
          "[redis]") {
  asio::io_context ctx;
  silent_server silent(ctx);
  keel::redis::client_options o = redis_options(silent.port(), 0ms);
  o.command_timeout = std::chrono::milliseconds(50);
  keel::redis::client redis(ctx.get_executor(), o);
  outcome<reply> out = run_one(ctx, redis.command({"PING"}));
  REQUIRE(out.error);
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(what_of(out.error).find("no reply within 50 ms") != std::string::npos);
  CHECK_FALSE(redis.connected());  // taken for gone
  out = run_one(ctx, redis.command({"PING"}));
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(redis.connects() == 2);
  CHECK(run_real(ctx, [&] { return silent.accepted == 2; }));  // each on a connection of its own
}

TEST_CASE("with no server, commands fail fast and none connects during the reconnect delay",
          "[redis]") {
  asio::io_context ctx;
  const std::uint16_t port = free_port();
  keel::redis::client_options o = redis_options(port);
  o.reconnect_delay = std::chrono::minutes(1);
  keel::redis::client redis(ctx.get_executor(), o);
  outcome<reply> out = run_one(ctx, redis.command({"PING"}));
  REQUIRE(out.error);
  CHECK(out.code() == boost::system::errc::connection_refused);
  CHECK(what_of(out.error).find("redis 127.0.0.1:" + std::to_string(port)) != std::string::npos);
  CHECK(redis.connects() == 1);
  out = run_one(ctx, redis.command({"PING"}));
  REQUIRE(out.error);
  CHECK(what_of(out.error).find("unavailable") != std::string::npos);
  CHECK(redis.connects() == 1);  // no new attempt
}

TEST_CASE("a server killed mid-run fails what was in flight; restarted, it is used again",
          "[redis]") {
  redis_process server;
  asio::io_context ctx;
  keel::redis::client redis(ctx.get_executor(), redis_options(server.port(), 0ms));
  REQUIRE_FALSE(run_one(ctx, redis.command({"SET", "k", "1"})).error);
  // A command blocked on the server when it dies.
  outcome<reply> blocked;
  spawn(ctx, redis.command({"BLPOP", "list", "0"}), blocked);
  REQUIRE(run_real(ctx, [&] { return redis.writes() >= 2; }));
  server.stop();
  REQUIRE(run_real(ctx, [&] { return blocked.done; }));
  REQUIRE(blocked.error);
  CHECK(keel::classify(blocked.error).condition == keel::condition::transient);
  // Down: an error, not a hang.
  CHECK(run_one(ctx, redis.command({"PING"})).error);
  server.start();  // empty, as after a restart
  outcome<reply> out = run_one(ctx, redis.command({"GET", "k"}));
  REQUIRE_FALSE(out.error);
  CHECK(out.value->kind == reply_kind::nil);
  CHECK(redis.connects() >= 2);
}

TEST_CASE("a password logs in; a wrong one is refused and never printed", "[redis]") {
  redis_process server({"--requirepass", "s3cret-PW-77"});
  asio::io_context ctx;
  {
    keel::redis::client_options o = redis_options(server.port());
    o.server.password = "s3cret-PW-77";
    keel::redis::client redis(ctx.get_executor(), o);
    outcome<reply> out = run_one(ctx, redis.command({"PING"}));
    REQUIRE_FALSE(out.error);
    CHECK(out.value->text == "PONG");
    CHECK(o.server.to_string().find("s3cret") == std::string::npos);
  }
  {
    keel::redis::client_options o = redis_options(server.port());
    o.server.password = "WRONG-pass-123";
    keel::redis::client redis(ctx.get_executor(), o);
    outcome<reply> out = run_one(ctx, redis.command({"PING"}));
    REQUIRE(out.error);
    CHECK(out.code() == boost::system::errc::permission_denied);
    CHECK(what_of(out.error).find("login refused") != std::string::npos);
    CHECK(what_of(out.error).find("WRONG-pass-123") == std::string::npos);
  }
  {
    keel::redis::client redis(ctx.get_executor(), redis_options(server.port()));
    outcome<reply> out = run_one(ctx, redis.command({"PING"}));
    REQUIRE_FALSE(out.error);
    CHECK(out.value->is_error());  // NOAUTH: the server's answer to a command without login
  }
}

TEST_CASE("a database number is selected before the first command", "[redis]") {
  redis_process server;
  asio::io_context ctx;
  keel::redis::client_options o3 = redis_options(server.port());
  o3.server.db = 3;
  keel::redis::client db3(ctx.get_executor(), o3);
  keel::redis::client db0(ctx.get_executor(), redis_options(server.port()));
  REQUIRE_FALSE(run_one(ctx, db3.command({"SET", "only-in-3", "x"})).error);
  CHECK(run_one(ctx, db3.command({"GET", "only-in-3"})).value->text == "x");
  CHECK(run_one(ctx, db0.command({"GET", "only-in-3"})).value->kind == reply_kind::nil);
}

TEST_CASE("cancelling a command ends it at once and keeps the connection", "[redis]") {
  asio::io_context ctx;
  silent_server silent(ctx);
  keel::redis::client_options o = redis_options(silent.port());
  o.command_timeout = std::chrono::seconds(30);
  keel::redis::client redis(ctx.get_executor(), o);
  asio::cancellation_signal cancel;
  outcome<reply> out;
  spawn(ctx, redis.command({"PING"}), out, cancel.slot());
  REQUIRE(run_real(ctx, [&] { return redis.writes() == 1; }));
  const auto t0 = std::chrono::steady_clock::now();
  cancel.emit(asio::cancellation_type::terminal);
  REQUIRE(run_real(ctx, [&] { return out.done; }));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  CHECK(out.code() == asio::error::operation_aborted);
  CHECK(redis.connected());
}

TEST_CASE("bounds: commands waiting and reply size", "[redis]") {
  SECTION("past max_pending a command fails at once") {
    asio::io_context ctx;
    silent_server silent(ctx);
    keel::redis::client_options o = redis_options(silent.port());
    o.max_pending = 2;
    keel::redis::client redis(ctx.get_executor(), o);
    outcome<reply> a, b;
    spawn(ctx, redis.command({"PING"}), a);
    spawn(ctx, redis.command({"PING"}), b);
    REQUIRE(run_real(ctx, [&] { return redis.commands() == 2; }));
    outcome<reply> c = run_one(ctx, redis.command({"PING"}));
    CHECK(c.code() == keel::error::queue_full);
    CHECK_FALSE(a.done);
  }
  SECTION("a reply over max_reply_bytes is a protocol error") {
    redis_process server;
    asio::io_context ctx;
    keel::redis::client_options o = redis_options(server.port());
    o.max_reply_bytes = 10000;
    keel::redis::client redis(ctx.get_executor(), o);
    REQUIRE_FALSE(run_one(ctx, redis.command({"SET", "big", std::string(100000, 'x')})).error);
    outcome<reply> out = run_one(ctx, redis.command({"GET", "big"}));
    REQUIRE(out.error);
    CHECK(out.code() == boost::system::errc::protocol_error);
    CHECK_FALSE(redis.connected());
  }
}

TEST_CASE("redis URLs name their parts; a bad one says which part", "[redis]") {
  keel::redis::endpoint e = keel::redis::parse_url("redis://127.0.0.1:6380/2");
  CHECK(e.host == "127.0.0.1");
  CHECK(e.port == 6380);
  CHECK(e.db == 2);
  CHECK(e.password.empty());
  e = keel::redis::parse_url("redis://app:p%w@cache.internal");
  CHECK(e.username == "app");
  CHECK(e.password == "p%w");
  CHECK(e.host == "cache.internal");
  CHECK(e.port == 6379);
  CHECK(e.to_string() == "cache.internal:6379/0");
  CHECK_FALSE(e.tls);
  e = keel::redis::parse_url("redis://:only-pw@h:1/");
  CHECK(e.username.empty());
  CHECK(e.password == "only-pw");
  e = keel::redis::parse_url("rediss://cache.internal:6380");
  CHECK(e.tls);
  CHECK(e.port == 6380);
  CHECK(e.to_string() == "rediss://cache.internal:6380/0");
  const auto error_of = [](const char* url) {
    try {
      keel::redis::parse_url(url);
    } catch (const std::invalid_argument& x) {
      return std::string(x.what());
    }
    return std::string("no error");
  };
  CHECK(error_of("http://h").find("redis://") != std::string::npos);
  // IPv6, bracketed as in any URL.
  e = keel::redis::parse_url("redis://[::1]:6380/1");
  CHECK(e.host == "::1");
  CHECK(e.port == 6380);
  CHECK(e.db == 1);
  CHECK(keel::redis::parse_url("redis://[::1]").host == "::1");
  CHECK(e.to_string() == "[::1]:6380/1");
  // Not bracketed, it was read as host "::" and port 1, and failed only when connecting.
  CHECK(error_of("redis://::1/0").find("must be bracketed") != std::string::npos);
  CHECK(error_of("redis://fe80::1:6379").find("must be bracketed") != std::string::npos);
  // What is wrong, without echoing it (a password typed into the path would be printed).
  CHECK(error_of("redis://h:99999") == "redis URL: the port is not a number in 1-65535");
  CHECK(error_of("redis://h/pw-IN-PATH") ==
        "redis URL: the database (after the '/') is not a non-negative integer");
  CHECK(error_of("redis://:pw-SECRET@/0").find("no host") != std::string::npos);
  CHECK(error_of("redis://:pw-SECRET@/0").find("SECRET") == std::string::npos);
}

TEST_CASE("rediss:// talks TLS, verifies the certificate and its name, and says why it refuses",
          "[redis]") {
  keel_test::test_pki pki;
  redis_process server(tls_args(pki), true);
  asio::io_context ctx;
  keel::redis::client_options o = redis_options(server.port());
  o.server.tls = true;
  o.ca_file = pki.ca_file;
  {
    keel::redis::client redis(ctx.get_executor(), o);
    outcome<keel::redis::reply> set = run_one(ctx, redis.command({"SET", "k", "over TLS"}));
    REQUIRE_FALSE(set.error);
    outcome<keel::redis::reply> get = run_one(ctx, redis.command({"GET", "k"}));
    REQUIRE_FALSE(get.error);
    CHECK(get.value->text == "over TLS");
  }
  // Plain RESP to the TLS port gets no answer it understands.
  {
    keel::redis::client_options plain = o;
    plain.server.tls = false;
    plain.command_timeout = std::chrono::milliseconds(300);
    keel::redis::client redis(ctx.get_executor(), plain);
    CHECK(run_one(ctx, redis.command({"PING"})).error);
  }
  // The error a PING ends with (it must fail).
  auto ping_error = [&](const keel::redis::client_options& opts) {
    keel::redis::client redis(ctx.get_executor(), opts);
    outcome<keel::redis::reply> r = run_one(ctx, redis.command({"PING"}));
    REQUIRE(r.error);
    return what_of(r.error);
  };
  // A certificate from a CA it does not trust.
  {
    keel_test::test_pki other;
    keel::redis::client_options untrusted = o;
    untrusted.ca_file = other.ca_file;
    const std::string what = ping_error(untrusted);
    INFO(what);
    CHECK(what.find("TLS handshake failed") != std::string::npos);
    CHECK(what.find("the certificate chain did not verify") != std::string::npos);
  }
  // A trusted certificate for another name.
  {
    keel_test::test_pki elsewhere("DNS:elsewhere.example");
    redis_process named(tls_args(elsewhere), true);
    keel::redis::client_options wrong_name = o;
    wrong_name.server.port = named.port();
    wrong_name.ca_file = elsewhere.ca_file;
    const std::string what = ping_error(wrong_name);
    INFO(what);
    CHECK(what.find("not valid for \"127.0.0.1\"") != std::string::npos);
  }
}

TEST_CASE("a refused login or a silent server waits the reconnect delay before the next try",
          "[redis][review]") {
  // Before, the delay was reset once TCP connected: a wrong password (or a database out of
  // range) had every command open a new connection, 430 a second.
  redis_process server({"--requirepass", "s3cret-PW-77"});
  asio::io_context ctx;
  keel::redis::client_options o = redis_options(server.port());
  o.server.password = "WRONG-pass-123";
  o.reconnect_delay = std::chrono::minutes(1);
  o.max_reconnect_delay = std::chrono::minutes(10);
  keel::redis::client redis(ctx.get_executor(), o);
  // The delay left, in ms, that a refusal names.
  const auto left_ms = [](const outcome<reply>& r) {
    const std::string w = what_of(r.error);
    const auto at = w.find("next connection attempt in ");
    return at == std::string::npos ? -1 : std::stol(w.substr(at + 27));
  };
  outcome<reply> out = run_one(ctx, redis.command({"PING"}));
  REQUIRE(out.error);
  CHECK(what_of(out.error).find("login refused") != std::string::npos);
  out = run_one(ctx, redis.command({"PING"}));
  REQUIRE(out.error);
  CHECK(what_of(out.error).find("next connection attempt in") != std::string::npos);
  CHECK(what_of(out.error).find("login refused") != std::string::npos);
  CHECK(left_ms(out) > 50'000);
  CHECK(redis.connects() == 1);

  // A password that logs in and a database out of range: AUTH's +OK does not reset the delay
  // that SELECT's refusal then doubles.
  keel::redis::client_options db = o;
  db.server.password = "s3cret-PW-77";
  db.server.db = 99;
  keel::redis::client wrong_db(ctx.get_executor(), db);
  out = run_one(ctx, wrong_db.command({"PING"}));
  REQUIRE(out.error);
  CHECK(what_of(out.error).find("login refused") != std::string::npos);
  out = run_one(ctx, wrong_db.command({"PING"}));
  CHECK(left_ms(out) > 50'000);
  CHECK(wrong_db.connects() == 1);

  // A server that accepts and never answers: the same.
  silent_server silent(ctx);
  keel::redis::client_options so = redis_options(silent.port());
  so.command_timeout = std::chrono::milliseconds(50);
  so.reconnect_delay = std::chrono::minutes(1);
  so.max_reconnect_delay = std::chrono::minutes(10);
  keel::redis::client quiet(ctx.get_executor(), so);
  // Two commands time out together: one reconnect delay, not two.
  outcome<reply> a;
  outcome<reply> b;
  spawn(ctx, quiet.command({"PING"}), a);
  spawn(ctx, quiet.command({"PING"}), b);
  REQUIRE(run_real(ctx, [&] { return a.done && b.done; }));
  CHECK(a.code() == keel::error::deadline_exceeded);
  out = run_one(ctx, quiet.command({"PING"}));
  REQUIRE(out.error);
  CHECK(what_of(out.error).find("next connection attempt in") != std::string::npos);
  CHECK(left_ms(out) > 50'000);
  CHECK(left_ms(out) <= 60'000);  // one delay (a second back-off would make it 120 s)
  CHECK(quiet.connects() == 1);

  // A server that closes before it ever answered: the same (before, every command reconnected).
  silent_server closing(ctx);
  closing.close_at_once = true;
  keel::redis::client_options co = redis_options(closing.port());
  co.reconnect_delay = std::chrono::minutes(1);
  co.max_reconnect_delay = std::chrono::minutes(10);
  keel::redis::client shut(ctx.get_executor(), co);
  out = run_one(ctx, shut.command({"PING"}));
  REQUIRE(out.error);
  INFO(what_of(out.error));
  out = run_one(ctx, shut.command({"PING"}));
  REQUIRE(out.error);
  CHECK(left_ms(out) > 50'000);
  CHECK(shut.connects() == 1);
}
