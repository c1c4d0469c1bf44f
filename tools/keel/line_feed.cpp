// Input lines for the batch's workers; see line_feed.hpp for the design.
#include "line_feed.hpp"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/experimental/channel.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <condition_variable>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>

namespace keel::cli {
namespace asio = boost::asio;

// One read result: a line, the end of the input (no line, no error) or a read error.
struct line_feed::item {
  std::optional<input_reader::raw_line> line;
  std::string error;
};

// The io_context side: the channel waiting workers receive from, and the work that keeps the
// context running while lines may still come.
class line_feed::queue {
 public:
  queue(const asio::any_io_executor& ex, std::size_t capacity)
      : channel(ex, capacity), work(asio::prefer(ex, asio::execution::outstanding_work.tracked)) {}

  asio::experimental::channel<void(boost::system::error_code, item)> channel;
  asio::any_io_executor work;  // released at the end of the input or on close
};

// Shared by the feed and its reading thread; the thread keeps it alive after the feed is gone.
struct line_feed::shared {
  shared(std::unique_ptr<input_reader> r, std::size_t w, std::size_t wb)
      : reader(std::move(r)), window(w), window_bytes(wb) {}

  std::unique_ptr<input_reader> reader;  // used by the reading thread only
  mutable std::mutex mutex;
  std::condition_variable room;  // signalled when a line is taken or the feed closes
  std::size_t window;
  std::size_t window_bytes;
  std::size_t unclaimed = 0;        // lines posted and not yet taken (mutex)
  std::size_t unclaimed_bytes = 0;  // their text (mutex)
  bool waiting = false;             // the thread waits for room (mutex)
  bool done = false;                // the thread has posted its last item or stopped (mutex)
  bool closed = false;              // (mutex)
  queue* receiver = nullptr;        // io_context thread only; null once closed

  bool has_room() const {
    return unclaimed == 0 || (unclaimed < window && unclaimed_bytes < window_bytes);
  }

  // The reading thread: one line at a time, never more than `window` lines or `window_bytes`
  // ahead of the workers.
  static void read_lines(std::shared_ptr<shared> self, asio::any_io_executor ex) {
    struct mark_done {
      shared& s;
      ~mark_done() {
        std::lock_guard lock(s.mutex);
        s.done = true;
      }
    } on_exit{*self};
    for (;;) {
      {
        std::unique_lock lock(self->mutex);
        self->waiting = !self->has_room();
        self->room.wait(lock, [&] { return self->closed || self->has_room(); });
        self->waiting = false;
        if (self->closed) {
          return;
        }
      }
      item it;
      try {
        it.line = self->reader->next();  // may wait for the writer as long as it likes
      } catch (const std::exception& e) {
        it.error = e.what();
      }
      const bool last = !it.line;
      {
        std::lock_guard lock(self->mutex);
        if (self->closed) {
          return;  // nobody wants it, and the context may be gone: post nothing
        }
        ++self->unclaimed;
        self->unclaimed_bytes += it.line ? it.line->text.size() : 0;
        try {
          asio::post(ex, [self, it = std::move(it)]() mutable {
            if (self->receiver) {
              // The channel holds `window` + 1 items, more than can be outstanding.
              self->receiver->channel.try_send(boost::system::error_code(), std::move(it));
            }
          });
        } catch (...) {
          return;  // cannot allocate: the feed's waiters are released by close()
        }
      }
      if (last) {
        return;
      }
    }
  }
};

line_feed::line_feed(asio::any_io_executor ex, const std::string& path, std::size_t window,
                     std::size_t window_bytes)
    : ex_(std::move(ex)) {
  auto reader = std::make_unique<input_reader>(path);
  if (reader->is_regular_file()) {
    inline_reader_ = std::move(reader);
    return;
  }
  auto s = std::make_shared<shared>(std::move(reader), window == 0 ? 1 : window,
                                    window_bytes == 0 ? 1 : window_bytes);
  queue_ = std::make_unique<queue>(ex_, s->window + 1);
  s->receiver = queue_.get();
  shared_ = s;
  std::thread(&shared::read_lines, std::move(s), ex_).detach();
}

line_feed::~line_feed() {
  close();
}

void line_feed::close() {
  ended_ = true;
  inline_reader_.reset();
  if (!shared_) {
    return;
  }
  {
    std::lock_guard lock(shared_->mutex);
    shared_->closed = true;
  }
  shared_->room.notify_all();
  shared_->receiver = nullptr;
  queue_->channel.close();  // waiting workers get nullopt
  queue_->work = asio::any_io_executor();
}

line_feed::read_ahead line_feed::read_ahead_state() const {
  if (!shared_) {
    return {};
  }
  std::lock_guard lock(shared_->mutex);
  return {shared_->unclaimed, shared_->unclaimed_bytes, shared_->waiting, shared_->done};
}

asio::awaitable<std::optional<input_reader::raw_line>> line_feed::next() {
  if (ended_) {
    co_return std::nullopt;
  }
  if (inline_reader_) {
    std::optional<input_reader::raw_line> line = inline_reader_->next();
    ended_ = !line;
    co_return line;
  }
  auto [ec, it] = co_await queue_->channel.async_receive(asio::as_tuple(asio::use_awaitable));
  if (ec || ended_) {
    co_return std::nullopt;  // closed, or the end was reached while this call waited
  }
  {
    std::lock_guard lock(shared_->mutex);
    --shared_->unclaimed;
    shared_->unclaimed_bytes -= it.line ? it.line->text.size() : 0;
  }
  shared_->room.notify_one();
  if (!it.error.empty() || !it.line) {
    // The last item (the thread has stopped): close, which releases the workers still waiting
    // and the context's work.
    close();
    if (!it.error.empty()) {
      throw std::runtime_error(it.error);
    }
  }
  co_return std::move(it.line);
}

}  // namespace keel::cli
