// Tests for keel/stream_guard.hpp on virtual time: the first-token and idle timeouts of a
// streamed attempt, and the commit point as retry and fallback see it.
#include <keel/fallback.hpp>
#include <keel/retry.hpp>
#include <keel/stream_guard.hpp>

#include "support.hpp"

#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/redirect_error.hpp>
#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

using namespace keel_test;
using keel::testing::run_until;

namespace {

const boost::system::error_code reset = asio::error::connection_reset;

/// One read of a fake stream: after `after`, a piece of text (empty: bytes that carry no text,
/// such as a response head), the end of the stream (`end`), or the error `ec`.
struct piece {
  ms after{0};
  std::string text;
  boost::system::error_code ec{};
  bool end = false;
};

/// A streamed call whose attempts follow scripts, on the manual clock, delivering into `text` as
/// a caller would (discarding it on a restart).
struct fake_stream {
  fake_stream(std::vector<std::vector<piece>> s, bool restartable = false)
      : scripts(std::move(s)), commit(restartable) {}

  std::vector<std::vector<piece>> scripts;
  keel::stream_commit commit;
  keel::stream_timeouts timeouts;
  ms consumer_time{0};                // the caller's time per delta
  std::size_t consumer_fails_at = 0;  // the caller's handler throws at this delta (1-based)
  std::string text;                   // what the caller holds
  std::vector<bool> restarts;         // each delta's restart flag
  std::vector<long long> started_ms;
  int reads = 0;
  // Reads through `next(op, abort)`: the read sleeps on `read_timer`, which the abort cancels
  // (as closing a connection ends a socket read). Otherwise through `next(op)`.
  bool abortable = false;
  int aborts = 0;
  std::optional<keel::basic_timer<manual_clock>> read_timer;

  asio::awaitable<std::optional<std::string>> read(const piece& p) {
    ++reads;
    if (abortable) {
      read_timer.emplace(co_await asio::this_coro::executor);
      read_timer->expires_after(p.after);
      boost::system::error_code ec;
      co_await read_timer->async_wait(asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        throw boost::system::system_error(ec);  // aborted
      }
    } else {
      co_await sleep_for(p.after);
    }
    if (p.ec) {
      throw boost::system::system_error(p.ec);
    }
    if (p.end) {
      co_return std::nullopt;
    }
    co_return p.text;
  }

  asio::awaitable<std::string> attempt() {
    const std::size_t i = started_ms.size();
    started_ms.push_back(now_ms());
    REQUIRE(i < scripts.size());
    keel::basic_stream_watch<manual_clock> watch(timeouts);
    bool first = true;
    for (const piece& p : scripts[i]) {
      std::optional<std::string> got = abortable ? co_await watch.next([&] { return read(p); },
                                                                       [&] {
                                                                         ++aborts;
                                                                         read_timer->cancel();
                                                                       })
                                                 : co_await watch.next([&] { return read(p); });
      if (!got) {
        break;
      }
      if (got->empty()) {
        continue;
      }
      watch.first_token_seen();
      const bool restart = commit.deliver(got->size(), std::exchange(first, false));
      restarts.push_back(restart);
      if (restart) {
        text.clear();
      }
      text += *got;
      if (restarts.size() == consumer_fails_at) {
        commit.consumer_failed();
        throw boost::system::system_error(reset);  // retryable, were it not the consumer's
      }
      if (consumer_time > ms{0}) {
        co_await sleep_for(consumer_time);
      }
    }
    co_return text;
  }

  /// The attempts under with_retry (3 attempts, 10 ms apart) that stops at the commit point.
  asio::awaitable<std::string> with_retry() {
    keel::retry_policy p = keel::retry_policy::with_backoff(3, keel::backoff::constant(10ms));
    p.retry_if = [this](const std::exception_ptr&, const keel::classification&) {
      return !commit.final();
    };
    return keel::with_retry<manual_clock>([this] { return attempt(); }, std::move(p));
  }
};

}  // namespace

TEST_CASE("the first-token timeout runs from the attempt's start, across reads that bring no text",
          "[stream_guard]") {
  const bool abortable = GENERATE(false, true);
  INFO((abortable ? "next(op, abort)" : "next(op)"));
  manual_clock::reset();
  asio::io_context ctx;
  // A head at 40 ms, a keep-alive at 70 ms, then text would come at 130 ms: too late for 100 ms.
  fake_stream s({{piece{40ms, {}}, piece{30ms, {}}, piece{60ms, "late"}}});
  s.timeouts = {.first_token = 100ms, .idle = 30ms};
  s.abortable = abortable;
  outcome<std::string> out;
  spawn(ctx, s.attempt(), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 100);  // not 40 + 100, nor 70 + 30
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(keel::classify(out.error).condition == keel::condition::timeout);
  CHECK(what_of(out.error) == "no first token within 0.1 s");
  CHECK(s.aborts == (abortable ? 1 : 0));
  CHECK(s.text.empty());
  CHECK_FALSE(s.commit.committed());
}

TEST_CASE("after the first token each read gets the idle timeout; the caller's time is not counted",
          "[stream_guard]") {
  const bool abortable = GENERATE(false, true);
  INFO((abortable ? "next(op, abort)" : "next(op)"));
  manual_clock::reset();
  asio::io_context ctx;
  // Reads of 25 ms pass a 30 ms idle timeout although the caller takes 50 ms per delta; the
  // 40 ms gap after the fourth delta does not.
  fake_stream s(
      {{piece{10ms, "a"}, piece{25ms, "b"}, piece{25ms, "c"}, piece{25ms, "d"}, piece{40ms, "e"}}});
  s.timeouts = {.first_token = 100ms, .idle = 30ms};
  s.abortable = abortable;
  s.consumer_time = 50ms;
  outcome<std::string> out;
  spawn(ctx, s.attempt(), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  // Deltas at 10, 85, 160, 235 (each read 25 ms after the caller's 50 ms); the last read starts
  // at 285 and times out at 315.
  CHECK(out.finished_at_ms == 315);
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(what_of(out.error) == "stream idle for 0.03 s");
  CHECK(s.aborts == (abortable ? 1 : 0));  // the reads that came in time were not aborted
  CHECK(s.text == "abcd");
  CHECK(s.commit.delivered_deltas() == 4);
  CHECK(s.commit.delivered_bytes() == 4);
}

TEST_CASE("without timeouts a streamed read is not bounded", "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  fake_stream s({{piece{10s, {}}, piece{5s, "slow"}, piece{20s, "er"}, piece{1s, {}, {}, true}}});
  outcome<std::string> out;
  spawn(ctx, s.attempt(), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  REQUIRE_FALSE(out.error);
  CHECK(out.value == "slower");
  CHECK(out.finished_at_ms == 36000);
}

TEST_CASE("a deadline error from inside a read stays the read's", "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::basic_stream_watch<manual_clock> watch({.first_token = 100ms});
  outcome<int> out;
  spawn(ctx, watch.next([]() -> asio::awaitable<int> {
    co_await sleep_for(5ms);
    throw keel::failure(make_error_code(keel::error::deadline_exceeded), "the read's own");
  }),
        out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 5);
  CHECK(out.code() == keel::error::deadline_exceeded);
  CHECK(what_of(out.error) == "the read's own");
}

TEST_CASE("a read after the first-token deadline fails at once without running", "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::basic_stream_watch<manual_clock> watch({.first_token = 100ms, .idle = 1s});
  manual_clock::advance(150ms);
  bool ran = false;
  outcome<int> out;
  spawn(ctx, watch.next([&]() -> asio::awaitable<int> {
    ran = true;
    co_return 1;
  }),
        out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK_FALSE(ran);
  CHECK(what_of(out.error) == "no first token within 0.1 s");
}

TEST_CASE("cancelling a watched read cancels it and is not reported as a timeout",
          "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::basic_stream_watch<manual_clock> watch({.first_token = 100ms, .idle = 30ms});
  asio::cancellation_signal cancel;
  outcome<int> out;
  spawn(ctx, watch.next([]() -> asio::awaitable<int> {
    co_await sleep_for(1s);
    co_return 1;
  }),
        out, cancel.slot());
  REQUIRE(run_until(ctx, [] { return manual_clock::now().time_since_epoch() >= 20ms; }));
  cancel.emit(asio::cancellation_type::terminal);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 20);
  CHECK(out.code() == asio::error::operation_aborted);
}

TEST_CASE("before the first delta a failure is retried; after it the call is final",
          "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  // Attempt 1 fails before any text (retried); attempt 2 delivers two deltas and is cut.
  fake_stream s({{piece{5ms, {}}, piece{5ms, {}, reset}},
                 {piece{5ms, "he"}, piece{5ms, "llo"}, piece{5ms, {}, reset}},
                 {piece{5ms, "never"}}});
  outcome<std::string> out;
  spawn(ctx, s.with_retry(), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  REQUIRE(out.error);
  CHECK(s.started_ms == std::vector<long long>{0, 20});  // 10 ms of failure + 10 ms backoff
  CHECK(s.text == "hello");
  CHECK(s.commit.final());
  // The call's outcome: stream_interrupted, naming what was delivered, caused by the cut.
  const std::exception_ptr e = s.commit.outcome(out.error, 2, "transport");
  CHECK(keel::classify(e).code == keel::error::stream_interrupted);
  CHECK(what_of(e) == "stream interrupted after 5 bytes in 2 deltas (transport)");
  try {
    std::rethrow_exception(e);
  } catch (const keel::failure& f) {
    CHECK(f.attempts() == 2);
    REQUIRE(f.causes().size() == 1);
    CHECK(keel::classify(f.causes()[0]).code == reset);
  }
}

TEST_CASE("a restartable stream is retried past the commit point and the caller discards",
          "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  fake_stream s({{piece{5ms, "hel"}, piece{5ms, {}, reset}},
                 {piece{5ms, "hello"}, piece{5ms, " world"}, piece{5ms, {}, {}, true}}},
                /*restartable=*/true);
  outcome<std::string> out;
  spawn(ctx, s.with_retry(), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  REQUIRE_FALSE(out.error);
  CHECK(out.value == "hello world");
  CHECK(s.restarts == std::vector<bool>{false, true, false});
  CHECK(s.commit.delivered_bytes() == 11);  // counted again from the restart
  CHECK(s.commit.delivered_deltas() == 2);
  CHECK(s.commit.outcome(nullptr, 2) == nullptr);
}

TEST_CASE("a first-token timeout before the commit point is retried like any timeout",
          "[stream_guard]") {
  const bool abortable = GENERATE(false, true);
  INFO((abortable ? "next(op, abort)" : "next(op)"));
  manual_clock::reset();
  asio::io_context ctx;
  fake_stream s({{piece{500ms, "too late"}}, {piece{20ms, "ok"}, piece{1ms, {}, {}, true}}});
  s.timeouts = {.first_token = 50ms};
  s.abortable = abortable;
  outcome<std::string> out;
  spawn(ctx, s.with_retry(), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  REQUIRE_FALSE(out.error);
  CHECK(out.value == "ok");
  CHECK(s.started_ms == std::vector<long long>{0, 60});
  CHECK(out.finished_at_ms == 81);
  CHECK(s.restarts == std::vector<bool>{false});
}

TEST_CASE("the caller's own failure ends a restartable stream and is reported unchanged",
          "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  fake_stream s({{piece{5ms, "a"}, piece{5ms, "b"}}, {piece{5ms, "never"}}}, true);
  s.consumer_fails_at = 2;
  outcome<std::string> out;
  spawn(ctx, s.with_retry(), out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.code() == reset);
  CHECK(s.started_ms.size() == 1);
  CHECK(s.commit.has_consumer_failed());
  CHECK(s.commit.final());
  CHECK(s.commit.outcome(out.error, 1) == out.error);
}

TEST_CASE("a cancelled stream past the commit point is reported as cancelled", "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  fake_stream s({{piece{5ms, "a"}, piece{1s, "b"}}});
  asio::cancellation_signal cancel;
  outcome<std::string> out;
  spawn(ctx, s.with_retry(), out, cancel.slot());
  REQUIRE(run_until(ctx, [&] { return s.commit.committed(); }));
  cancel.emit(asio::cancellation_type::terminal);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(keel::classify(out.error).condition == keel::condition::cancelled);
  CHECK(s.commit.outcome(out.error, 1) == out.error);
  CHECK(s.started_ms.size() == 1);
}

TEST_CASE("past the commit point no fallback alternative runs", "[stream_guard]") {
  for (bool committed : {false, true}) {
    INFO((committed ? "cut after a delta" : "failed before any delta"));
    manual_clock::reset();
    asio::io_context ctx;
    fake_stream s({committed ? std::vector<piece>{piece{5ms, "a"}, piece{5ms, {}, reset}}
                             : std::vector<piece>{piece{5ms, {}, reset}}});
    bool fell_back = false;
    keel::fallback_policy fp;
    fp.should_try = [&](const std::exception_ptr&, const keel::classification&, std::size_t,
                        std::size_t) { return !s.commit.final(); };
    outcome<std::string> out;
    spawn(ctx,
          keel::with_fallback<std::string, manual_clock>(
              keel::alternatives([&] { return s.attempt(); },
                                 [&]() -> asio::awaitable<std::string> {
                                   fell_back = true;
                                   co_return "from the fallback";
                                 }),
              fp),
          out);
    REQUIRE(run_until(ctx, [&] { return out.done; }));
    CHECK(fell_back == !committed);
    if (committed) {
      CHECK(out.code() == keel::error::all_fallbacks_failed);  // the one tried; the rest skipped
      CHECK(keel::classify(s.commit.outcome(out.error, 1)).code == keel::error::stream_interrupted);
    } else {
      CHECK(out.value == "from the fallback");
    }
  }
}

TEST_CASE("an aborted read that still returns a value is reported as the timeout",
          "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  keel::basic_stream_watch<manual_clock> watch({.first_token = 10ms});
  keel::basic_timer<manual_clock> t(ctx.get_executor());
  outcome<int> out;
  spawn(ctx,
        watch.next(
            [&]() -> asio::awaitable<int> {
              t.expires_after(1s);
              boost::system::error_code ec;
              co_await t.async_wait(asio::redirect_error(asio::use_awaitable, ec));
              co_return 7;  // ends early when aborted, but with a value
            },
            [&] { t.cancel(); }),
        out);
  REQUIRE(run_until(ctx, [&] { return out.done; }));
  CHECK(out.finished_at_ms == 10);
  CHECK(what_of(out.error) == "no first token within 0.01 s");
}

TEST_CASE("a watch's timer does not abort a read that finished, nor outlive the watch",
          "[stream_guard]") {
  manual_clock::reset();
  asio::io_context ctx;
  int aborts = 0;
  outcome<int> out;
  {
    auto run = [&]() -> asio::awaitable<int> {
      keel::basic_stream_watch<manual_clock> watch({.first_token = 10ms, .idle = 10ms});
      int sum = 0;
      for (int i = 0; i < 5; ++i) {
        // Each read ends 1 ms before its limit: its timer wait is cancelled, not fired.
        sum += co_await watch.next(
            [&]() -> asio::awaitable<int> {
              co_await sleep_for(9ms);
              co_return 1;
            },
            [&] { ++aborts; });
        watch.first_token_seen();
      }
      co_return sum;  // the watch (and its timer) goes with this frame
    };
    spawn(ctx, run(), out);
    REQUIRE(run_until(ctx, [&] { return out.done; }));
  }
  // Let any late timer handler run: it must not call the abort of a finished read.
  manual_clock::advance(1s);
  keel::testing::poll_all(ctx);
  CHECK(out.value == 5);
  CHECK(aborts == 0);
}
