// Test helper shared by the mock LLM server's tests: run a client coroutine against a started mock.
#pragma once

#include <keel/testing/mock_llm_server.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <exception>
#include <functional>

namespace keel_test {

/// Lets the server's handlers run (the client shares its io_context) until `done()` holds: no
/// timer, so a test waits exactly as long as the server takes.
inline boost::asio::awaitable<void> until(std::function<bool()> done) {
  while (!done()) {
    co_await boost::asio::post(co_await boost::asio::this_coro::executor,
                               boost::asio::use_awaitable);
  }
}

/// Starts `server`, runs the client coroutine `body` on `ctx` (in real time, at most `limit`),
/// then stops the server; rethrows what `body` threw.
inline void run_against(boost::asio::io_context& ctx, keel::testing::mock_llm_server& server,
                        std::function<boost::asio::awaitable<void>()> body,
                        std::chrono::steady_clock::duration limit) {
  server.start();
  bool done = false;
  std::exception_ptr error;
  boost::asio::co_spawn(ctx, body(), [&](std::exception_ptr e) {
    error = e;
    done = true;
    server.stop();
  });
  ctx.run_for(limit);
  REQUIRE(done);
  if (error) {
    std::rethrow_exception(error);
  }
}

}  // namespace keel_test
