// Tests of the keel command's input parsing, results file and resume scan (tools/keel/jsonl.hpp),
// and of the summary statistics (tools/keel/stats.hpp).
#include "jsonl.hpp"
#include "line_feed.hpp"
#include "stats.hpp"

#include <catch2/catch.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

namespace {

using keel::cli::batch_item;
using keel::cli::input_error;
using keel::cli::parse_input_line;

namespace fs = std::filesystem;

struct temp_dir {
  fs::path path;
  temp_dir() {
    static std::atomic<int> n{0};
    path = fs::temp_directory_path() /
           ("keel-jsonl-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::string read_file(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_file(const std::string& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << text;
}

std::string error_of(std::string_view line) {
  auto r = parse_input_line(line, 7, 1024);
  REQUIRE(std::holds_alternative<input_error>(r));
  CHECK(std::get<input_error>(r).line == 7);
  return std::get<input_error>(r).message;
}

}  // namespace

TEST_CASE("a prompt line becomes a one-message request", "[cli_jsonl]") {
  auto r =
      parse_input_line(R"({"id": "a1", "prompt": "Hello", "max_tokens": 50, "system": "Be brief",
                              "model": "gpt-4o", "metadata": {"k": 1}})",
                       3, 1024);
  REQUIRE(std::holds_alternative<batch_item>(r));
  const auto& item = std::get<batch_item>(r);
  CHECK(item.line == 3);
  CHECK(item.key == "\"a1\"");
  CHECK(item.request.model == "gpt-4o");
  CHECK(item.request.system == "Be brief");
  CHECK(item.request.max_tokens == 50);
  REQUIRE(item.request.messages.size() == 1);
  CHECK(item.request.messages[0].role == "user");
  CHECK(item.request.messages[0].content == "Hello");
  CHECK(item.metadata["k"] == 1);
  CHECK(item.preview == "Hello");
}

TEST_CASE("a messages line keeps the turns and moves system turns to the system prompt",
          "[cli_jsonl]") {
  auto r = parse_input_line(
      R"({"id": 42, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]})",
      1, 256);
  REQUIRE(std::holds_alternative<batch_item>(r));
  const auto& item = std::get<batch_item>(r);
  CHECK(item.key == "42");
  CHECK(item.request.system == "S");
  CHECK(item.request.max_tokens == 256);
  REQUIRE(item.request.messages.size() == 3);
  CHECK(item.request.messages[2].content == "Q2");
  CHECK(item.preview == "Q2");
}

TEST_CASE("the log preview is the first 100 characters without cutting UTF-8", "[cli_jsonl]") {
  std::string prompt;
  for (int i = 0; i < 120; ++i) {
    prompt += "\xc3\xa9";  // é, two bytes
  }
  auto r = parse_input_line(R"({"id": 1, "prompt": ")" + prompt + R"("})", 1, 10);
  REQUIRE(std::holds_alternative<batch_item>(r));
  CHECK(std::get<batch_item>(r).preview.size() == 200);
}

TEST_CASE("bad input lines name the JSON path of the problem", "[cli_jsonl]") {
  CHECK(error_of("not json").find("not valid JSON") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "max_tokens": 1e400})").find("number overflow") !=
        std::string::npos);
  CHECK(error_of("[1, 2]").find("expected a JSON object, got an array") != std::string::npos);
  CHECK(error_of(R"({"prompt": "x"})").find("/id: missing") != std::string::npos);
  CHECK(error_of(R"({"id": 1.5, "prompt": "x"})").find("/id: expected a string or an integer") !=
        std::string::npos);
  CHECK(error_of(R"({"id": 1})").find("/prompt: missing") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": 3})").find("/prompt: expected a string, got an integer") !=
        std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "a", "messages": [{"role": "user", "content": "b"}]})")
            .find("not both") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "messages": [{"role": "user", "content": 5}]})")
            .find("/messages/0/content: expected a string") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "messages": [{"role": "robot", "content": "x"}]})")
            .find("/messages/0/role") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "messages": [{"role": "user", "content": "x", "name": "n"}]})")
            .find("/messages/0/name: unknown key") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "messages": [{"role": "assistant", "content": "x"}]})")
            .find("last message must have role \"user\"") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "max_tokens": 0})").find("/max_tokens") !=
        std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "metadata": [1]})")
            .find("/metadata: expected an object") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "promt": "y"})").find("/promt: unknown key") !=
        std::string::npos);
}

TEST_CASE("an input error keeps the id when it could be read", "[cli_jsonl]") {
  auto r = parse_input_line(R"({"id": "x9", "prompt": 1})", 2, 10);
  REQUIRE(std::holds_alternative<input_error>(r));
  CHECK(std::get<input_error>(r).id == "x9");
}

TEST_CASE("the input reader numbers lines, skips blank ones and flags overlong ones",
          "[cli_jsonl]") {
  temp_dir dir;
  const auto in = dir.file("in.jsonl");
  write_file(in, "a\n\n  \nb\r\nc");
  keel::cli::input_reader reader(in);
  auto l1 = reader.next();
  auto l2 = reader.next();
  auto l3 = reader.next();
  REQUIRE(l1);
  REQUIRE(l2);
  REQUIRE(l3);
  CHECK(l1->number == 1);
  CHECK(l1->text == "a");
  CHECK(l2->number == 4);
  CHECK(l2->text == "b");
  CHECK(l3->number == 5);
  CHECK(l3->text == "c");
  CHECK_FALSE(reader.next());
  CHECK(keel::cli::count_items(in) == 3u);
  CHECK_THROWS_WITH(keel::cli::input_reader(dir.file("missing.jsonl")),
                    Catch::Contains("missing.jsonl"));
}

TEST_CASE("records are appended one line each", "[cli_jsonl]") {
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  {
    keel::cli::record_writer w(out);
    w.write({{"id", 1}, {"line", 1}, {"status", "ok"}});
    w.write({{"id", 2}, {"line", 2}, {"status", "failed"}});
    CHECK(w.written() == 2);
  }
  {
    keel::cli::record_writer w(out);
    w.write({{"id", 3}, {"line", 3}, {"status", "ok"}});
  }
  CHECK(read_file(out) ==
        "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n{\"id\":2,\"line\":2,\"status\":\"failed\"}\n"
        "{\"id\":3,\"line\":3,\"status\":\"ok\"}\n");
}

TEST_CASE("resume keeps finished records and drops cancelled ones and a torn tail", "[cli_jsonl]") {
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  write_file(
      out,
      "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n"
      "{\"id\":\"b\",\"line\":2,\"status\":\"failed\",\"error\":{\"class\":\"rate_limited\"}}\n"
      "{\"id\":3,\"line\":3,\"status\":\"cancelled\"}\n"
      "{\"id\":null,\"line\":4,\"status\":\"failed\",\"error\":{\"class\":\"invalid_input\"}}\n"
      "{\"id\":1,\"line\":5,\"status\":\"failed\",\"error\":{\"class\":\"duplicate_id\"}}\n"
      "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n"
      "{\"id\":6,\"line\":6,\"sta");
  const auto st = keel::cli::prepare_resume(out);
  CHECK(st.done_keys == std::unordered_set<std::string>{"1", "\"b\""});
  CHECK(st.done_lines == std::unordered_set<std::size_t>{4, 5});
  CHECK(st.kept == 4);
  CHECK(st.kept_failed == 3);  // "b", line 4 and line 5: the exit status must not say success
  CHECK(st.dropped_cancelled == 1);
  CHECK(st.dropped_duplicates == 1);
  CHECK(st.dropped_torn_tail);
  const std::string after = read_file(out);
  CHECK(after.find("cancelled") == std::string::npos);
  CHECK(after.find("\"id\":6") == std::string::npos);
  CHECK(std::count(after.begin(), after.end(), '\n') == 4);
  CHECK(after.back() == '\n');
  CHECK_FALSE(fs::exists(out + ".keel-tmp"));
}

TEST_CASE("resume adds the missing newline after a complete last record", "[cli_jsonl]") {
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  write_file(out, "{\"id\":1,\"line\":1,\"status\":\"ok\"}");
  const auto st = keel::cli::prepare_resume(out);
  CHECK(st.kept == 1);
  CHECK_FALSE(st.dropped_torn_tail);
  CHECK(read_file(out) == "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n");
}

TEST_CASE("resume refuses a results file corrupted before its last line", "[cli_jsonl]") {
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  const std::string text =
      "{\"id\":1,\"line\":1,\"status\":\"ok\"}\ngarbage\n{\"id\":2,\"line\":2,"
      "\"status\":\"ok\"}\n";
  write_file(out, text);
  CHECK_THROWS_WITH(keel::cli::prepare_resume(out), Catch::Contains("out.jsonl:2"));
  CHECK(read_file(out) == text);
}

TEST_CASE("resume of a missing results file starts empty", "[cli_jsonl]") {
  temp_dir dir;
  const auto st = keel::cli::prepare_resume(dir.file("none.jsonl"));
  CHECK(st.kept == 0);
  CHECK(st.done_keys.empty());
}

TEST_CASE("percentiles use the nearest rank", "[cli_jsonl]") {
  std::vector<double> v;
  for (int i = 100; i >= 1; --i) {
    v.push_back(i);
  }
  CHECK(keel::cli::percentile(v, 50) == 50);
  CHECK(keel::cli::percentile(v, 90) == 90);
  CHECK(keel::cli::percentile(v, 99) == 99);
  CHECK(keel::cli::percentile(v, 100) == 100);
  CHECK(keel::cli::percentile({}, 50) == 0);
}

TEST_CASE("the summary counts items, failures by class and throughput", "[cli_jsonl]") {
  keel::cli::batch_stats s;
  s.total = 4;
  s.done = 4;
  s.ok = 3;
  s.failed = 1;
  s.failed_by_class["rate_limited"] = 1;
  s.attempts = 6;
  s.retries = 2;
  s.retries_by_cause["overloaded"] = 2;
  s.latencies = {0.1, 0.2, 0.3, 0.4};
  s.tokens_in = 10;
  s.tokens_out = 20;
  s.wall_seconds = 2;
  const auto j = keel::cli::summary_json(s);
  CHECK(j["items"]["ok"] == 3);
  CHECK(j["failed_by_class"]["rate_limited"] == 1);
  CHECK(j["attempts_per_item"] == 1.5);
  CHECK(j["retries_by_cause"]["overloaded"] == 2);
  CHECK(j["latency_seconds"]["p50"] == 0.2);
  CHECK(j["items_per_second"] == 2.0);
  const std::string table = keel::cli::summary_table(s, "title");
  CHECK(table.find("1 rate_limited") != std::string::npos);
  CHECK(table.find("6 (1.50 per item)") != std::string::npos);
  CHECK(table.find("2.0 items/s") != std::string::npos);
}

// ---- line_feed: input from a pipe never blocks the io_context ---------------------------------

namespace {

// A named pipe in the temporary directory (no /dev/fd needed, so this runs in a bare chroot).
// The test's end is opened read-write, which on Linux does not wait for a reader, so the feed's
// fopen finds a writer and does not block either; closing it is the writer's EOF.
struct pipe_fds {
  std::string fifo;
  int write = -1;
  pipe_fds()
      : fifo((fs::temp_directory_path() /
              ("keel-feed-fifo-" + std::to_string(::getpid()) + "-" + std::to_string(serial++)))
                 .string()) {
    ::unlink(fifo.c_str());
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    write = ::open(fifo.c_str(), O_RDWR);
    REQUIRE(write >= 0);
  }
  ~pipe_fds() {
    close_write();
    ::unlink(fifo.c_str());
  }
  void send(const std::string& text) const {
    REQUIRE(::write(write, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
  }
  void close_write() {
    if (write >= 0) {
      ::close(write);
      write = -1;
    }
  }
  std::string path() const { return fifo; }
  static inline int serial = 0;
};

}  // namespace

TEST_CASE("lines of a pipe reach waiting workers while the io_context keeps running",
          "[cli_jsonl][review][threads]") {
  // A worker waits for line 2, which the writer sends only once another handler of the same
  // io_context has run: with a blocking read on the io_context's thread that handler could
  // never run. A watchdog sends the line after 10 s anyway, so a regression fails instead of
  // hanging, and says so.
  pipe_fds p;
  p.send("{\"prompt\": \"one\"}\n\n");  // and a blank line, which is not an item
  boost::asio::io_context ctx;
  keel::cli::line_feed feed(ctx.get_executor(), p.path(), /*window*/ 2);
  CHECK(feed.threaded());
  CHECK_FALSE(keel::cli::count_items(p.path()).has_value());  // counting would eat the lines

  std::mutex m;
  std::condition_variable cv;
  bool other_handler_ran = false;
  std::atomic<bool> sent_by_watchdog{false};
  std::thread watchdog([&] {
    std::unique_lock lock(m);
    if (!cv.wait_for(lock, std::chrono::seconds(10), [&] { return other_handler_ran; })) {
      sent_by_watchdog = true;
    }
    lock.unlock();
    p.send("{\"prompt\": \"two\"}\n");
    p.close_write();
  });

  std::vector<std::pair<std::size_t, std::string>> got;
  bool ended = false;
  boost::asio::co_spawn(
      ctx,
      [&]() -> boost::asio::awaitable<void> {
        while (auto line = co_await feed.next()) {
          got.emplace_back(line->number, line->text);
          if (got.size() == 1) {
            boost::asio::post(ctx, [&] {
              std::lock_guard lock(m);
              other_handler_ran = true;
              cv.notify_one();
            });
          }
        }
        ended = true;
      },
      boost::asio::detached);
  ctx.run();
  watchdog.join();
  CHECK_FALSE(sent_by_watchdog);
  CHECK(ended);
  REQUIRE(got.size() == 2);
  CHECK(got[0] == std::pair<std::size_t, std::string>{1, "{\"prompt\": \"one\"}"});
  CHECK(got[1] == std::pair<std::size_t, std::string>{3, "{\"prompt\": \"two\"}"});
}

TEST_CASE("closing a line_feed releases every worker waiting on a silent pipe",
          "[cli_jsonl][review][threads]") {
  pipe_fds p;  // nothing is ever written until the end
  boost::asio::io_context ctx;
  keel::cli::line_feed feed(ctx.get_executor(), p.path());
  int released = 0;
  for (int i = 0; i < 3; ++i) {
    boost::asio::co_spawn(
        ctx,
        [&]() -> boost::asio::awaitable<void> {
          auto line = co_await feed.next();
          released += line ? 0 : 1;
        },
        boost::asio::detached);
  }
  ctx.poll();
  CHECK(released == 0);
  feed.close();
  ctx.run();  // returns: the feed holds no work once closed
  CHECK(released == 3);
  p.close_write();  // the reading thread, still in its read, ends at EOF without posting
}

TEST_CASE("a regular file is read inline, a line at a time", "[cli_jsonl][review]") {
  const fs::path file = fs::temp_directory_path() / ("keel-feed-" + std::to_string(::getpid()));
  std::ofstream(file) << "a\n\nb\r\n";
  boost::asio::io_context ctx;
  keel::cli::line_feed feed(ctx.get_executor(), file.string());
  CHECK_FALSE(feed.threaded());
  std::vector<std::string> got;
  boost::asio::co_spawn(
      ctx,
      [&]() -> boost::asio::awaitable<void> {
        while (auto line = co_await feed.next()) {
          got.push_back(line->text);
        }
      },
      boost::asio::detached);
  ctx.run();
  CHECK(got == std::vector<std::string>{"a", "b"});
  fs::remove(file);
}
