// Tests of the keel command's input parsing (tools/keel/jsonl.hpp), results file and resume scan
// (tools/keel/results_file.hpp), records (tools/keel/record.hpp), and of the summary statistics
// (tools/keel/stats.hpp).
#include "jsonl.hpp"
#include "line_feed.hpp"
#include "record.hpp"
#include "results_file.hpp"
#include "stats.hpp"

#include <keel/llm/json_depth.hpp>

#include <catch2/catch.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <atomic>
#include <condition_variable>
#include <csignal>
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

TEST_CASE("a line's generation parameters become the request's", "[cli_jsonl]") {
  // That the request's win over the entry's on the wire is keel::llm::client's business
  // (test_llm_client_wire.cpp).
  auto r = parse_input_line(
      R"({"id": 1, "prompt": "hi", "max_tokens": 32, "temperature": 1.5, "stop": ["A", "B"]})", 1,
      1024);
  REQUIRE(std::holds_alternative<batch_item>(r));
  const auto& req = std::get<batch_item>(r).request;
  CHECK(req.max_tokens == 32);
  REQUIRE(req.temperature);
  CHECK(*req.temperature == 1.5);
  CHECK(req.stop == std::vector<std::string>{"A", "B"});
  CHECK_FALSE(req.top_p);  // not on the line: the entry's applies
  CHECK_FALSE(req.seed);
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
  CHECK(error_of(R"({"id": 1, "prompt": "x", "max_tokens": 1e400})") ==
        "not valid JSON (at byte 39 of the line: a number too large for a double)");
  // What is wrong, without the parser's echo of the line.
  CHECK(error_of("{\"id\": 1, \"prompt\": \"\xff\"}") ==
        "not valid JSON (at byte 21 of the line: syntax error while parsing value - invalid "
        "string: ill-formed UTF-8 byte)");
  CHECK(error_of(R"({"id": 1, "prompt": "\ud800"})") ==
        "not valid JSON (at byte 27 of the line: syntax error while parsing value - invalid "
        "string: surrogate U+D800..U+DBFF must be followed by U+DC00..U+DFFF)");
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
  // A key with "/" or "~" is one JSON Pointer token, as a repeated key's path names it.
  CHECK(error_of(R"({"id": 1, "prompt": "x", "a/b~": 1})").find("/a~1b~0: unknown key") !=
        std::string::npos);
  // A key given twice: nlohmann kept the last silently, so id "b" ran as "c" (issue 13).
  CHECK(error_of(R"({"id": "b", "id": "c", "prompt": "x"})")
            .find("/id: the key appears twice in one object") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "messages": [{"role": "user", "content": "a"},)"
                 R"( {"role": "user", "content": "b", "content": "c"}]})")
            .find("/messages/1/content: the key appears twice") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "metadata": {"a/b": [0, {"~": 1, "~": 2}]}})")
            .find("/metadata/a~1b/1/~0: the key appears twice") != std::string::npos);
  // The same key in two objects is no duplicate.
  CHECK(std::holds_alternative<batch_item>(parse_input_line(
      R"({"id": 1, "prompt": "x", "metadata": {"a": {"k": 1}, "b": {"k": 2}}})", 1, 10)));
}

TEST_CASE("an out-of-range max_tokens is reported as written, not wrapped to a signed value",
          "[cli_jsonl]") {
  // 2^64 - 1 used to be read as a signed integer and reported as "got -1".
  const std::string huge =
      error_of(R"({"id": 1, "prompt": "x", "max_tokens": 18446744073709551615})");
  CHECK(huge.find("got 18446744073709551615") != std::string::npos);
  CHECK(huge.find("-1") == std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "max_tokens": 9223372036854775808})")
            .find("got 9223372036854775808") != std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "max_tokens": -7})").find("got -7") !=
        std::string::npos);
  CHECK(error_of(R"({"id": 1, "prompt": "x", "max_tokens": 1000001})").find("got 1000001") !=
        std::string::npos);
  auto ok = parse_input_line(R"({"id": 1, "prompt": "x", "max_tokens": 1000000})", 1, 10);
  REQUIRE(std::holds_alternative<batch_item>(ok));
  CHECK(std::get<batch_item>(ok).request.max_tokens == 1000000);
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
  write_file(in, "a\n\n  \nb\r\nc\n\r\r\n \r\t");  // the last lines are blank too
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
  ::chmod(out.c_str(), 0640);  // not mkstemp's 0600: the rewrite must carry it over
  const auto st = keel::cli::prepare_resume(out);
  CHECK(st.done_keys == std::unordered_set<std::string>{"1", "\"b\""});
  CHECK(st.kept == 2);
  CHECK(st.kept_failed == 1);  // "b": the exit status must not say success
  CHECK(st.dropped_cancelled == 1);
  CHECK(st.dropped_duplicates == 1);
  // Lines 4 and 5 are read again (the input may have been fixed since) and recorded again.
  CHECK(st.dropped_line_records == 2);
  CHECK(st.dropped_torn_tail);
  const std::string after = read_file(out);
  CHECK(after.find("cancelled") == std::string::npos);
  CHECK(after.find("\"id\":6") == std::string::npos);
  CHECK(after.find("invalid_input") == std::string::npos);
  CHECK(std::count(after.begin(), after.end(), '\n') == 2);
  CHECK(after.back() == '\n');
  // Rewritten through a new temporary file that took the file's permissions; none left.
  CHECK((fs::status(out).permissions() & fs::perms::all) ==
        (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read));
  for (const auto& f : fs::directory_iterator(dir.path)) {
    CHECK(f.path().filename().string().find(".keel-tmp") == std::string::npos);
  }
}

TEST_CASE("resume rewrites a symlinked results file through the link, never a planted temp",
          "[cli_jsonl][hardening]") {
  // Before: the rewrite replaced the link with a regular file (the target kept stale records),
  // and opened a fixed `<out>.keel-tmp` with O_TRUNC, following a symlink planted there.
  temp_dir dir;
  const auto target = dir.file("target.jsonl");
  const auto link = dir.file("link.jsonl");
  const auto victim = dir.file("victim.txt");
  write_file(target, "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n{\"id\":2,\"line\":2,\"sta");
  write_file(victim, "precious\n");
  fs::create_symlink(target, link);
  fs::create_symlink(victim, link + ".keel-tmp");
  fs::create_symlink(victim, target + ".keel-tmp");
  const auto st = keel::cli::prepare_resume(link);
  CHECK(st.dropped_torn_tail);
  CHECK(fs::is_symlink(link));
  CHECK(read_file(target) == "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n");
  CHECK(read_file(victim) == "precious\n");
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
  CHECK(table.find("  failed by class 1 ") != std::string::npos);  // was "class1"
  CHECK(table.find("cost") == std::string::npos);                  // no entry had a price
  s.cost = 0.01234;
  s.priced = 1;
  s.unpriced = 1;
  const std::string priced = keel::cli::summary_table(s, "title");
  CHECK(priced.find("  cost            $0.0123 estimated from the configured prices (1 answers "
                    "from entries without a price not counted)") != std::string::npos);
  CHECK(keel::cli::summary_json(s).at("cost_usd") == 0.01234);
  CHECK(table.find("6 (1.50 per item)") != std::string::npos);
  CHECK(table.find("2.0 items/s") != std::string::npos);
}

TEST_CASE("a streamed run's summary has the time to first token, a plain run's has none",
          "[cli_jsonl]") {
  keel::cli::batch_stats s;
  s.done = 5;
  s.ok = 5;
  s.latencies = {0.5, 0.6, 0.7, 0.8, 0.9};
  s.first_tokens = {0.04, 0.01, 0.03, 0.02};
  CHECK_FALSE(keel::cli::summary_json(s).contains("ttft_seconds"));
  CHECK(keel::cli::summary_table(s, "t").find("first token") == std::string::npos);
  s.streamed = true;
  const auto j = keel::cli::summary_json(s);
  CHECK(j["ttft_seconds"]["p50"] == 0.02);
  CHECK(j["ttft_seconds"]["p90"] == 0.04);
  CHECK(j["ttft_seconds"]["p99"] == 0.04);
  CHECK(j["ttft_seconds"]["max"] == 0.04);
  CHECK(j["ttft_seconds"]["items"] == 4);
  CHECK(j["latency_seconds"]["p50"] == 0.7);  // the items' latency is unchanged
  const std::string table = keel::cli::summary_table(s, "t");
  CHECK(table.find("  first token     p50 20 ms, p90 40 ms, p99 40 ms (4 of 5 items had one)\n") !=
        std::string::npos);
}

namespace {
// An input item (line, id) and the config entry of model "m" that answered it.
struct record_inputs {
  batch_item item;
  keel::llm::entry_config entry;
  record_inputs(std::size_t line, nlohmann::json id) {
    item.line = line;
    item.id = std::move(id);
    entry.model = "m";
  }
};
}  // namespace

TEST_CASE("a streamed call's record has ttft_ms, null without a first token", "[cli_jsonl]") {
  const record_inputs in(3, "a");
  const batch_item& item = in.item;
  const keel::llm::entry_config& entry = in.entry;
  keel::llm::call_outcome out;
  out.response.emplace();
  out.response->text = "hello";
  out.attempts = 1;
  out.seconds = 0.25;
  const auto plain = keel::cli::outcome_record(item, out, entry, std::nullopt, false);
  CHECK_FALSE(plain.contains("ttft_ms"));
  const auto none = keel::cli::outcome_record(item, out, entry, std::nullopt, true);
  REQUIRE(none.contains("ttft_ms"));
  CHECK(none.at("ttft_ms").is_null());
  out.first_token_seconds = 0.01234;
  const auto rec = keel::cli::outcome_record(item, out, entry, std::nullopt, true);
  CHECK(rec.at("ttft_ms") == 12.3);
  CHECK(rec.at("latency_ms") == 250.0);
  auto without = rec;
  without.erase("ttft_ms");
  CHECK(without == plain);
}

TEST_CASE("an answer's record written as text is the tree's record byte for byte", "[cli]") {
  // outcome_line writes an answer's record with json_writer in the tree's sorted key order; the
  // results file must not change. Every optional member, on and off, and strings that escape.
  auto dumped = [](const nlohmann::json& j) {
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  };
  int compared = 0;
  for (int variant = 0; variant < 64; ++variant) {
    batch_item item;
    item.line = 7 + static_cast<std::size_t>(variant);
    item.id = variant % 2 ? nlohmann::json("id \"q\" \xc3\xa9") : nlohmann::json(123456789012LL);
    if (variant & 2) {
      item.metadata = {{"z", 1}, {"a", {{"nested", "x\ny"}}}, {"bad", "\xff"}};
    }
    if (variant & 4) {
      item.request.model = "asked-model";
    }
    keel::llm::entry_config entry;
    entry.model = "entry-model";
    keel::llm::call_outcome out;
    out.response.emplace();
    out.response->text = variant & 8 ? "plain" : "tab\there \"q\" \x01 caf\xc3\xa9 bad\xc3(";
    out.response->finish_reason = variant & 16 ? "stop" : "";
    out.response->model = variant & 32 ? "answered-model" : "";
    out.response->usage.input = 12;
    out.response->usage.output = variant;
    out.entry = static_cast<std::size_t>(variant % 3 == 0 ? 1 : 0);
    out.attempts = 1 + variant % 4;
    out.seconds = 0.123456 * variant;
    if (variant % 5 == 0) {
      out.first_token_seconds = 0.0101 * variant;
    }
    for (const bool streamed : {false, true}) {
      for (const std::optional<double> cost :
           {std::optional<double>(), std::optional<double>(0.25)}) {
        INFO("variant " << variant << " streamed " << streamed << " cost " << cost.has_value());
        CHECK(keel::cli::outcome_line(item, out, entry, cost, streamed) ==
              dumped(keel::cli::outcome_record(item, out, entry, cost, streamed)));
        ++compared;
      }
    }
  }
  CHECK(compared == 256);
  // Failures and cancellations go through the tree.
  const record_inputs in(1, "f");
  keel::llm::call_outcome failed;
  failed.attempts = 3;
  CHECK(keel::cli::outcome_line(in.item, failed, in.entry, std::nullopt, false) ==
        dumped(keel::cli::outcome_record(in.item, failed, in.entry, std::nullopt, false)));
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

// ---- hardening (issue 13) ---------------------------------------------------------------------

TEST_CASE("json_too_deep_at counts nesting outside strings only", "[cli_jsonl][hardening]") {
  using keel::llm::json_too_deep_at;
  constexpr auto none = std::string_view::npos;
  CHECK(json_too_deep_at(R"({"a": [1, {"b": 2}]})", 3) == none);
  CHECK(json_too_deep_at(R"({"a": [1, {"b": 2}]})", 2) == 10);
  // Brackets inside strings, escaped quotes included, are text.
  CHECK(json_too_deep_at(R"({"a": "[[[[{{{{\"[[[["})", 1) == none);
  CHECK(json_too_deep_at(R"(["\\", [[]]])", 2) == 8);
  CHECK(json_too_deep_at("", 0) == none);
  CHECK(json_too_deep_at("[]", 0) == 0);
}

TEST_CASE("an input line nested 80,000 deep is one invalid_input error, not a crash",
          "[cli_jsonl][hardening]") {
  // Before: parsed, then a recursive copy of `metadata` overflowed the stack (SIGSEGV).
  const std::string deep = R"({"id":"d","prompt":"x","metadata":{"a":)" + std::string(80000, '[') +
                           std::string(80000, ']') + "}}";
  const std::string message = error_of(deep);
  CHECK(message.find("nested deeper than 128 levels at byte 165") != std::string::npos);
  // 50,000 objects deep, the other shape of the report.
  std::string objects = R"({"id":"o","prompt":"x","metadata":)";
  for (int i = 0; i < 50000; ++i) {
    objects += R"({"k":)";
  }
  objects += "1" + std::string(50000, '}') + "}";
  CHECK(error_of(objects).find("nested deeper than 128 levels") != std::string::npos);
  // Within the bound: accepted, and the metadata survives a copy.
  const std::string ok = R"({"id":"m","prompt":"x","metadata":{"a":)" + std::string(100, '[') +
                         std::string(100, ']') + "}}";
  auto r = parse_input_line(ok, 1, 10);
  REQUIRE(std::holds_alternative<batch_item>(r));
  const nlohmann::json copy = std::get<batch_item>(r).metadata;
  CHECK(copy.contains("a"));
}

TEST_CASE("a NUL byte in an input line makes it invalid_input", "[cli_jsonl][hardening]") {
  // Before: nlohmann stopped at the NUL, so item a was run and item b silently dropped.
  const std::string line =
      std::string(R"({"id":"a","prompt":"x"})") + '\0' + R"({"id":"b","prompt":"y"})";
  CHECK(error_of(line).find("a NUL byte at byte 23") != std::string::npos);
}

TEST_CASE("resume treats a last record padded with NUL bytes as a torn tail",
          "[cli_jsonl][hardening]") {
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  // What a power loss can leave: the file's size was extended, its last block never written.
  write_file(out,
             "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n{\"id\":2,\"line\":2,\"status\":\"ok\"}" +
                 std::string(37, '\0'));
  const auto st = keel::cli::prepare_resume(out);
  CHECK(st.kept == 1);
  CHECK(st.dropped_torn_tail);
  CHECK(st.done_keys == std::unordered_set<std::string>{"1"});  // item 2 runs again
  CHECK(read_file(out) == "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n");
}

TEST_CASE("a short record write is cut back to the record boundary", "[cli_jsonl][hardening]") {
  // A file size limit makes write(2) write part of a record and fail the rest (EFBIG), as a
  // full disk does; SIGXFSZ is ignored meanwhile, as keel ignores nothing but SIGPIPE.
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  const std::string first = "{\"id\":1,\"line\":1,\"status\":\"ok\"}\n";
  struct rlimit old {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old;
  small.rlim_cur = first.size() + 20;
  {
    keel::cli::record_writer w(out);
    w.write({{"id", 1}, {"line", 1}, {"status", "ok"}});
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    CHECK_THROWS_WITH(w.write({{"id", 2}, {"line", 2}, {"status", "ok"}, {"text", "long enough"}}),
                      Catch::Contains("cannot write output"));
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &old) == 0);
    // Before: the fragment stayed and this record was glued to it.
    CHECK(read_file(out) == first);
    w.write({{"id", 3}, {"line", 3}, {"status", "ok"}});
    CHECK(w.written() == 2);
  }
  std::signal(SIGXFSZ, old_handler);
  CHECK(read_file(out) == first + "{\"id\":3,\"line\":3,\"status\":\"ok\"}\n");
  const auto st = keel::cli::prepare_resume(out);
  CHECK(st.kept == 2);
  CHECK_FALSE(st.dropped_torn_tail);
}

TEST_CASE("a results file has one writer: a second lock names the holder's pid",
          "[cli_jsonl][hardening]") {
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  {
    keel::cli::results_lock first(out);
    CHECK(fs::exists(out + ".lock"));
    CHECK(read_file(out + ".lock") == std::to_string(::getpid()) + "\n");
    // flock conflicts between open file descriptions, so a second lock in one process is
    // refused as another process's would be.
    CHECK_THROWS_WITH(keel::cli::results_lock(out),
                      Catch::Contains("another keel run (pid " + std::to_string(::getpid()) +
                                      ") is writing " + out));
  }
  CHECK_FALSE(fs::exists(out + ".lock"));  // released and removed
  keel::cli::results_lock again(out);      // free again
  CHECK(fs::exists(out + ".lock"));
}

TEST_CASE("replace_file leaves the file as it was when what it writes fails",
          "[cli_jsonl][hardening]") {
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  write_file(out, "old\n");
  CHECK_THROWS_WITH(keel::cli::replace_file(out,
                                            [](const keel::cli::byte_sink& sink) {
                                              sink(std::string(100000, 'x'));  // one flush
                                              throw std::runtime_error("reading failed");
                                            }),
                    "reading failed");
  CHECK(read_file(out) == "old\n");
  for (const auto& f : fs::directory_iterator(dir.path)) {
    CHECK(f.path().filename().string().find(".keel-tmp") == std::string::npos);
  }
  keel::cli::replace_file(out, [](const keel::cli::byte_sink& sink) {
    for (int i = 0; i < 5000; ++i) {
      sink("0123456789abcdef\n");  // over the buffer: written in several flushes
    }
  });
  CHECK(read_file(out).size() == 5000 * 17);
}

TEST_CASE("a results file's lock holds under another name: a symlink or a hard link",
          "[cli_jsonl][hardening]") {
  // Before: the lock was `<the path given>.lock`, so a second run through a link got its own.
  temp_dir dir;
  const auto out = dir.file("out.jsonl");
  write_file(out, "");
  fs::create_symlink(out, dir.file("sym.jsonl"));
  fs::create_hard_link(out, dir.file("hard.jsonl"));
  {
    keel::cli::results_lock first(out);
    keel::cli::record_writer writing(out);  // a run holds the file itself while it writes
    CHECK_THROWS_WITH(keel::cli::results_lock(dir.file("sym.jsonl")),
                      Catch::Contains("another keel run (pid " + std::to_string(::getpid())));
    CHECK_THROWS_WITH(keel::cli::results_lock(dir.file("hard.jsonl")),
                      Catch::Contains("under another name"));
    CHECK_FALSE(fs::exists(dir.file("hard.jsonl.lock")));  // a refused lock leaves none
    CHECK_THROWS_WITH(keel::cli::record_writer(dir.file("hard.jsonl")),
                      Catch::Contains("under another name"));
  }
  // A device is not locked: two runs may both write to /dev/null.
  keel::cli::record_writer null_1("/dev/null");
  CHECK_NOTHROW(keel::cli::record_writer("/dev/null"));
  keel::cli::results_lock again(dir.file("hard.jsonl"));  // free again
}

TEST_CASE("a pipe's read-ahead is bounded in bytes as well as lines",
          "[cli_jsonl][hardening][threads]") {
  // Before: 256 lines of read-ahead whatever their size (300 lines of 8 MB: 2.1 GB RSS).
  pipe_fds p;
  const std::string line = R"({"id":1,"prompt":")" + std::string(100000, 'x') + "\"}\n";
  // Catch's assertions are not thread-safe: the writer only counts, the test thread checks.
  std::atomic<int> short_writes{0};
  std::thread writer([&] {
    for (int i = 0; i < 40; ++i) {
      // Blocks while the pipe is full and the reader waits for room.
      const ssize_t n = ::write(p.write, line.data(), line.size());
      short_writes += n == static_cast<ssize_t>(line.size()) ? 0 : 1;
    }
    p.close_write();
  });
  boost::asio::io_context ctx;
  keel::cli::line_feed feed(ctx.get_executor(), p.path(), /*window*/ 256,
                            /*window_bytes*/ 350000);
  // Nobody takes a line until the reading thread waits for room or has read everything.
  keel::cli::line_feed::read_ahead ra;
  do {
    std::this_thread::yield();
    ra = feed.read_ahead_state();
  } while (!ra.waiting_for_room && !ra.done);
  CHECK(ra.waiting_for_room);
  CHECK(ra.lines == 4);  // 3 lines are under 350,000 bytes, the 4th crosses it
  CHECK(ra.bytes < 350000 + line.size());
  std::size_t got = 0;
  boost::asio::co_spawn(
      ctx,
      [&]() -> boost::asio::awaitable<void> {
        while (auto l = co_await feed.next()) {
          ++got;
          CHECK(feed.read_ahead_state().bytes < 350000 + line.size());
        }
      },
      boost::asio::detached);
  ctx.run();
  writer.join();
  CHECK(short_writes == 0);
  CHECK(got == 40);
}
