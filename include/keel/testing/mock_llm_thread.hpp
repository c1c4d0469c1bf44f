// keel::testing::mock_llm_thread: the mock LLM server on its own thread and io_context.
#pragma once

// Overview
// --------
// A provider runs on another machine; a benchmark, a demo or an example that runs the mock in
// the same process should at least give it its own thread, so that the client's event loop and
// the server's do not take turns. `mock_llm_thread` owns an io_context, a
// `keel::testing::mock_llm_server` on it (started with the given plans or scenario) and the
// thread that runs it:
//
//     keel::testing::mock_llm_thread mock{{.seed = 7}, [](keel::testing::mock_llm_server& s) {
//       s.set_plan("gpt-4o-mini", keel::testing::fault_plan{}.with_rate_limit(100));
//     }};
//     // ... point a client at mock.base_url() ...
//     const double server_cpu = mock.stop();   // also done by the destructor
//
// Lifetime: the server and its thread live until `stop()` or destruction.
// Thread safety: `base_url`, `stats`, `current_limit` and `server()`'s thread-safe members
// (`set_plan`, `set_scenario`, `stats`, ...) may be called from any thread; `stop` from one
// thread at a time (not from the mock's own thread).

#include <keel/testing/mock_llm_server.hpp>

#include <functional>
#include <memory>
#include <string>

namespace keel::testing {

/// The mock LLM server on its own thread and io_context.
class mock_llm_thread {
 public:
  /// Creates the server with `options`, lets `setup` configure it (plans, scenario) before it
  /// starts, starts it on 127.0.0.1 and runs it on a new thread.
  /// @throws what the server's constructor or `start` throws (no thread is left running).
  explicit mock_llm_thread(mock_options options = {},
                           const std::function<void(mock_llm_server&)>& setup = {});
  /// As above, with the plans of a scenario (`set_scenario`).
  mock_llm_thread(const scenario& s, mock_options options);
  /// Stops the server and joins its thread (`stop`).
  ~mock_llm_thread();
  mock_llm_thread(const mock_llm_thread&) = delete;
  mock_llm_thread& operator=(const mock_llm_thread&) = delete;

  /// Stops the server (closing its connections) and joins its thread; returns the CPU seconds
  /// the thread used. Later calls return the same value at once.
  double stop();

  /// "http://127.0.0.1:PORT".
  std::string base_url() const;

  /// What the server has seen (thread-safe).
  mock_stats stats() const;

  /// The limits in force now for `model` (thread-safe).
  rate_limits current_limit(const std::string& model) const;

  /// The server, for its thread-safe members (`set_plan`, `set_scenario`, `reset_stats`, ...).
  mock_llm_server& server() noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace keel::testing
