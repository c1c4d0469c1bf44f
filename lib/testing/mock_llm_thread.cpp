// keel::testing::mock_llm_thread (see keel/testing/mock_llm_thread.hpp).
#include <keel/testing/mock_llm_thread.hpp>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <sys/resource.h>

#include <optional>
#include <thread>

namespace keel::testing {

namespace {

double thread_cpu_seconds() {
  rusage u{};
  if (::getrusage(RUSAGE_THREAD, &u) != 0) {
    return 0;
  }
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

}  // namespace

struct mock_llm_thread::impl {
  explicit impl(mock_options options) : work(ctx.get_executor()), server(ctx, options) {}
  boost::asio::io_context ctx;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work;
  mock_llm_server server;
  std::thread thread;
  double cpu_seconds = 0;

  void run() {
    server.start();
    thread = std::thread([this] {
      ctx.run();
      cpu_seconds = thread_cpu_seconds();
    });
  }
};

mock_llm_thread::mock_llm_thread(mock_options options,
                                 const std::function<void(mock_llm_server&)>& setup)
    : impl_(std::make_unique<impl>(options)) {
  if (setup) {
    setup(impl_->server);
  }
  impl_->run();
}

mock_llm_thread::mock_llm_thread(const scenario& s, mock_options options)
    : impl_(std::make_unique<impl>(options)) {
  impl_->server.set_scenario(s);
  impl_->run();
}

mock_llm_thread::~mock_llm_thread() {
  stop();
}

double mock_llm_thread::stop() {
  if (impl_->thread.joinable()) {
    boost::asio::post(impl_->ctx, [this] {
      impl_->server.stop();
      impl_->work.reset();
    });
    impl_->thread.join();
  }
  return impl_->cpu_seconds;
}

std::string mock_llm_thread::base_url() const {
  return impl_->server.base_url();
}

mock_stats mock_llm_thread::stats() const {
  return impl_->server.stats();
}

rate_limits mock_llm_thread::current_limit(const std::string& model) const {
  return impl_->server.current_limit(model);
}

mock_llm_server& mock_llm_thread::server() noexcept {
  return impl_->server;
}

}  // namespace keel::testing
