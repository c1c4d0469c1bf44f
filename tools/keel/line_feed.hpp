// The batch's input lines, handed to worker coroutines without ever blocking the io_context.
#pragma once

// Why: a regular file reads at memory speed, so its lines are read inline, as before. A pipe,
// FIFO or terminal (`--in -` fed by another program, `--in <(cmd)`) delivers a line only when
// its writer sends it; a blocking read on the io_context's one thread would stall every item in
// flight (their timers, sockets, deadlines) and the signal handling until the next line came.
// For such input one thread reads ahead, at most `window` lines nobody has taken yet, and at most
// `window_bytes` of their text (300 lines of 8 MB read ahead by lines alone took 2.1 GB; a
// line longer than that still goes when nothing else waits), and posts
// each line to the io_context, where waiting workers take them in FIFO order from an Asio
// channel.
//
// Lifetime: the reading thread owns everything it touches (the reader, the queue state) through
// a shared_ptr and is detached, so closing or destroying the feed never waits for a read that is
// blocked on a silent writer. It posts to the io_context only while the feed is open, under the
// same lock `close` takes, so nothing reaches the context after `close` returns.
//
// Thread safety: `next` and `close` must be called from the io_context's thread.

#include "jsonl.hpp"

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>

#include <cstddef>
#include <memory>
#include <optional>
#include <string>

namespace keel::cli {

/// Input lines for the batch's workers.
class line_feed {
 public:
  /// Opens `path` ("-" for stdin); a non-regular input starts its reading thread.
  /// @param ex the io_context's executor, where lines are delivered.
  /// @param window how many read lines may wait unclaimed (the read-ahead) on a non-regular
  ///   input.
  /// @param window_bytes how many bytes of text those lines may hold together (one line may
  ///   exceed it alone).
  /// @throws std::runtime_error naming the file if it cannot be opened or is a directory.
  line_feed(boost::asio::any_io_executor ex, const std::string& path, std::size_t window = 256,
            std::size_t window_bytes = 32 * 1024 * 1024);
  /// Closes the feed; never waits for the reading thread.
  ~line_feed();
  line_feed(const line_feed&) = delete;
  line_feed& operator=(const line_feed&) = delete;

  /// The next non-blank line, in input order; nullopt at the end of the input or once closed.
  /// @throws std::runtime_error on a read error (every later call returns nullopt).
  /// Cancellation: none per call; `close` ends every wait with nullopt.
  boost::asio::awaitable<std::optional<input_reader::raw_line>> next();

  /// No more lines: every waiting and later `next` returns nullopt, and the reading thread stops
  /// at its next line.
  void close();

  /// True when lines come from the reading thread (the input is not a regular file).
  bool threaded() const noexcept { return shared_ != nullptr; }

  /// The reading thread's read-ahead now (for tests and diagnostics).
  struct read_ahead {
    /// Lines read and not yet taken by `next`.
    std::size_t lines = 0;
    /// Their text, bytes.
    std::size_t bytes = 0;
    /// True while the thread waits for room (the window is full).
    bool waiting_for_room = false;
    /// True once the thread has read the end of the input, an error, or stopped.
    bool done = false;
  };
  /// The reading thread's state; all zero for a regular file. Thread-safe.
  read_ahead read_ahead_state() const;

 private:
  struct shared;
  struct item;
  class queue;
  boost::asio::any_io_executor ex_;
  std::unique_ptr<input_reader> inline_reader_;  // a regular file
  std::shared_ptr<shared> shared_;               // a pipe, FIFO or terminal
  std::unique_ptr<queue> queue_;
  bool ended_ = false;
};

}  // namespace keel::cli
