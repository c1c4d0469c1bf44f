// End-to-end tests of the `keel` command: the real binary runs as a child process against the
// mock LLM server (in-process with `keel batch --mock`, or `keel mock` on 127.0.0.1), and the
// tests look only at what a user sees: exit status, stdout, stderr, the results file, the
// summary JSON and the metrics endpoint.
//
// Every wait polls an observable condition (a file reaching N lines, a line on stderr, the
// child's exit) with a short interval and an overall timeout; nothing sleeps to synchronise.
// Every random choice is seeded.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using namespace std::chrono_literals;
using std::chrono::milliseconds;

const std::string keel_binary = KEEL_CLI_PATH;

// ---- files ------------------------------------------------------------------------------------

// A directory under the system temp dir, removed with its files at scope exit (kept when
// KEEL_E2E_KEEP is set, for debugging).
class temp_dir {
 public:
  temp_dir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("keel_cli_e2e_" + std::to_string(::getpid()) + "_" + std::to_string(++counter));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~temp_dir() {
    if (std::getenv("KEEL_E2E_KEEP") == nullptr) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  const fs::path& path() const { return path_; }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  if (!f) {
    throw std::runtime_error("cannot write " + path);
  }
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    return {};
  }
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// Complete lines (a last line without '\n' is left out).
std::vector<std::string> complete_lines(const std::string& text) {
  std::vector<std::string> out;
  std::size_t start = 0;
  for (std::size_t nl; (nl = text.find('\n', start)) != std::string::npos; start = nl + 1) {
    out.push_back(text.substr(start, nl - start));
  }
  return out;
}

std::size_t count_lines(const std::string& path) {
  const std::string text = read_file(path);
  return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
}

// Every line of a results file as JSON; fails the test on a line that is not a JSON object or
// on a last line without its newline.
std::vector<json> read_records(const std::string& path) {
  const std::string text = read_file(path);
  INFO("results file " << path);
  CHECK((text.empty() || text.back() == '\n'));
  std::vector<json> out;
  std::size_t number = 0;
  for (const auto& line : complete_lines(text)) {
    ++number;
    INFO("record line " << number << ": " << line);
    json rec = json::parse(line, nullptr, false);
    REQUIRE(!rec.is_discarded());
    REQUIRE(rec.is_object());
    out.push_back(std::move(rec));
  }
  return out;
}

// `n` items with integer ids 1..n.
std::string prompts_jsonl(int n, const std::string& what = "Summarise ticket") {
  std::string out;
  for (int i = 1; i <= n; ++i) {
    out += json{{"id", i}, {"prompt", what + " #" + std::to_string(i)}}.dump() + "\n";
  }
  return out;
}

// How often each id (as `id.dump()`) appears.
std::map<std::string, int> id_counts(const std::vector<json>& records) {
  std::map<std::string, int> counts;
  for (const auto& r : records) {
    ++counts[r.at("id").dump()];
  }
  return counts;
}

// Checks that ids 1..n have exactly one record each and nothing else has one.
void check_each_id_once(const std::vector<json>& records, int n) {
  const auto counts = id_counts(records);
  CHECK(records.size() == static_cast<std::size_t>(n));
  CHECK(counts.size() == static_cast<std::size_t>(n));
  for (int i = 1; i <= n; ++i) {
    const auto it = counts.find(std::to_string(i));
    INFO("id " << i);
    CHECK(it != counts.end());
    if (it != counts.end()) {
      CHECK(it->second == 1);
    }
  }
}

// ---- waiting ----------------------------------------------------------------------------------

// Polls `cond` every 10 ms until it holds (true) or `timeout` passes (false).
template <class F>
bool eventually(F cond, milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (cond()) {
      return true;
    }
    if (std::chrono::steady_clock::now() >= end) {
      return false;
    }
    std::this_thread::sleep_for(10ms);
  }
}

// ---- child processes --------------------------------------------------------------------------

// Environment changes for a child: a value sets the variable, nullopt removes it.
using env_overrides = std::map<std::string, std::optional<std::string>>;

// Exit status as one int: the exit code when the child exited, -signo when a signal killed it.
int decode_status(int st) {
  if (WIFEXITED(st)) {
    return WEXITSTATUS(st);
  }
  if (WIFSIGNALED(st)) {
    return -WTERMSIG(st);
  }
  return -1000;
}

// A child process with stdout and stderr in files of `dir` (`<name>.out`, `<name>.err`). The
// environment is the test's, minus every AWS_* variable, with AWS shared files that do not exist
// and TMPDIR in `dir`, so the developer's ~/.aws cannot change a result; `env` applies on top.
// The destructor kills (SIGKILL) and reaps a child that is still running.
class child_process {
 public:
  child_process(const temp_dir& dir, const std::string& name, std::vector<std::string> args,
                const env_overrides& env = {}, const std::string& stdin_path = "/dev/null")
      : name_(name), out_(dir / (name + ".out")), err_(dir / (name + ".err")) {
    std::map<std::string, std::string> vars;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv = *e;
      const auto eq = kv.find('=');
      if (eq == std::string::npos || kv.rfind("AWS_", 0) == 0) {
        continue;
      }
      vars[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    vars["AWS_CONFIG_FILE"] = dir / "no-such-aws-config";
    vars["AWS_SHARED_CREDENTIALS_FILE"] = dir / "no-such-aws-credentials";
    vars["TMPDIR"] = dir.path().string();
    for (const auto& [k, v] : env) {
      if (v) {
        vars[k] = *v;
      } else {
        vars.erase(k);
      }
    }
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : vars) {
      env_strings.push_back(k + "=" + v);
    }
    std::vector<char*> argv, envp;
    for (auto& a : args) {
      argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    for (auto& s : env_strings) {
      envp.push_back(s.data());
    }
    envp.push_back(nullptr);

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, stdin_path.c_str(), O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, err_.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    // The test runner may have handlers or a mask for these; the child starts clean.
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t defaults, mask;
    sigemptyset(&defaults);
    for (int s : {SIGINT, SIGTERM, SIGPIPE, SIGHUP, SIGQUIT}) {
      sigaddset(&defaults, s);
    }
    sigemptyset(&mask);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setsigmask(&attr, &mask);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK);
    const int rc = ::posix_spawn(&pid_, argv[0], &fa, &attr, argv.data(), envp.data());
    posix_spawnattr_destroy(&attr);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0) {
      throw std::runtime_error("posix_spawn " + args[0] + ": " + std::strerror(rc));
    }
  }

  ~child_process() {
    if (!status_) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      ::waitpid(pid_, &st, 0);
    }
  }
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  pid_t pid() const { return pid_; }

  /// The exit status if the child has exited (see decode_status), without blocking.
  std::optional<int> poll() {
    if (!status_) {
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        status_ = decode_status(st);
      }
    }
    return status_;
  }

  bool running() { return !poll().has_value(); }

  /// Sends `signo` (only while the child has not been reaped, so the pid is still ours).
  void signal(int signo) {
    if (running()) {
      ::kill(pid_, signo);
    }
  }

  /// Waits for the exit; throws (after killing the child) if it takes longer than `timeout`.
  int wait(milliseconds timeout = 60s) {
    if (!eventually([&] { return poll().has_value(); }, timeout)) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      ::waitpid(pid_, &st, 0);
      status_ = -SIGKILL;
      throw std::runtime_error(name_ + " did not exit within " + std::to_string(timeout.count()) +
                               " ms; stderr:\n" + err());
    }
    return *status_;
  }

  std::string out() const { return read_file(out_); }
  std::string err() const { return read_file(err_); }

 private:
  std::string name_;
  std::string out_;
  std::string err_;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

struct run_result {
  int status = -1;
  std::string out;
  std::string err;
};

// Runs `keel args...` to completion.
run_result run_keel(const temp_dir& dir, const std::string& name, std::vector<std::string> args,
                    const env_overrides& env = {}, milliseconds timeout = 60s) {
  args.insert(args.begin(), keel_binary);
  child_process c(dir, name, std::move(args), env);
  run_result r;
  r.status = c.wait(timeout);
  r.out = c.out();
  r.err = c.err();
  return r;
}

std::vector<std::string> keel_args(std::vector<std::string> args) {
  args.insert(args.begin(), keel_binary);
  return args;
}

// Splits a command line printed with POSIX shell quoting (single quotes, '\'' inside them).
std::vector<std::string> shell_words(const std::string& line) {
  std::vector<std::string> out;
  std::string cur;
  bool in_word = false, quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '\'') {
        quoted = false;
      } else {
        cur += c;
      }
    } else if (c == '\'') {
      quoted = true;
      in_word = true;
    } else if (c == '\\' && i + 1 < line.size()) {
      cur += line[++i];
      in_word = true;
    } else if (c == ' ' || c == '\t') {
      if (in_word) {
        out.push_back(cur);
        cur.clear();
        in_word = false;
      }
    } else {
      cur += c;
      in_word = true;
    }
  }
  if (in_word) {
    out.push_back(cur);
  }
  return out;
}

// The stderr lines that start with '{', parsed (discarded values for lines that do not parse).
std::vector<json> json_lines(const std::string& text) {
  std::vector<json> out;
  for (const auto& line : complete_lines(text)) {
    if (!line.empty() && line[0] == '{') {
      out.push_back(json::parse(line, nullptr, false));
    }
  }
  return out;
}

// ---- a blocking HTTP/1.1 client on plain sockets ----------------------------------------------

struct http_answer {
  int status = 0;
  std::string headers;  // lower-cased
  std::string body;
};

std::string lower(std::string s) {
  for (auto& c : s) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return s;
}

std::string dechunk(const std::string& body) {
  std::string out;
  std::size_t pos = 0;
  for (;;) {
    const auto eol = body.find("\r\n", pos);
    if (eol == std::string::npos) {
      throw std::runtime_error("bad chunked body");
    }
    const std::size_t size = std::stoul(body.substr(pos, eol - pos), nullptr, 16);
    if (size == 0) {
      return out;
    }
    out += body.substr(eol + 2, size);
    pos = eol + 2 + size + 2;
  }
}

// One request with "Connection: close"; reads the answer to EOF (10 s socket timeouts).
http_answer http_request(unsigned short port, const std::string& method, const std::string& target,
                         const std::string& body = "") {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  }
  std::unique_ptr<int, void (*)(int*)> closer(new int(fd), [](int* p) {
    ::close(*p);
    delete p;
  });
  timeval tv{};
  tv.tv_sec = 10;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    throw std::runtime_error("connect to port " + std::to_string(port) + ": " +
                             std::strerror(errno));
  }
  std::string req = method + " " + target + " HTTP/1.1\r\nHost: 127.0.0.1:" + std::to_string(port) +
                    "\r\nConnection: close\r\n";
  if (!body.empty()) {
    req +=
        "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  req += "\r\n" + body;
  for (std::size_t sent = 0; sent < req.size();) {
    const ssize_t n = ::send(fd, req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      throw std::runtime_error(std::string("send: ") + std::strerror(errno));
    }
    sent += static_cast<std::size_t>(n);
  }
  std::string raw;
  char buf[16384];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0) {
      throw std::runtime_error(std::string("recv: ") + std::strerror(errno));
    }
    if (n == 0) {
      break;
    }
    raw.append(buf, static_cast<std::size_t>(n));
  }
  const auto end = raw.find("\r\n\r\n");
  if (raw.rfind("HTTP/1.", 0) != 0 || end == std::string::npos) {
    throw std::runtime_error("not an HTTP response: " + raw.substr(0, 200));
  }
  http_answer a;
  a.status = std::stoi(raw.substr(9, 3));
  a.headers = lower(raw.substr(0, end));
  a.body = raw.substr(end + 4);
  if (a.headers.find("transfer-encoding: chunked") != std::string::npos) {
    a.body = dechunk(a.body);
  } else if (const auto cl = a.headers.find("content-length:"); cl != std::string::npos) {
    a.body.resize(std::min(a.body.size(), std::stoul(a.headers.substr(cl + 15))));
  }
  return a;
}

// The port of "http://127.0.0.1:PORT..." inside `text` (0 if there is none).
unsigned short port_in(const std::string& text) {
  const std::string prefix = "http://127.0.0.1:";
  const auto p = text.find(prefix);
  if (p == std::string::npos) {
    return 0;
  }
  return static_cast<unsigned short>(std::stoul(text.substr(p + prefix.size())));
}

bool on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) {
    return false;
  }
  std::stringstream dirs(path);
  for (std::string d; std::getline(dirs, d, ':');) {
    if (!d.empty() && ::access((fs::path(d) / program).c_str(), X_OK) == 0) {
      return true;
    }
  }
  return false;
}

// ---- fixtures ---------------------------------------------------------------------------------

// One OpenAI-format entry, fast retries, no breaker (a 30 s break would stall a one-entry chain).
const char* const fast_config = R"({
  "config_list": [{"api_type": "openai", "model": "model-a", "api_key": "test-key-a", "timeout": 10}],
  "policy": {"retry": {"max_attempts": 8,
                       "backoff": {"kind": "exponential", "base": 0.01, "cap": 0.1}},
             "breaker": {"enabled": false}}
})";

// Every request succeeds at once.
const char* const instant_scenario = R"({"seed": 1, "models": {}})";

// `latency_ms` for model-a, no faults.
std::string slow_scenario(int latency_ms) {
  return R"({"seed": 1, "models": {"model-a": {"latency_ms": )" + std::to_string(latency_ms) +
         "}}}";
}

// The common arguments of a batch against the in-process mock.
std::vector<std::string> batch_args(const temp_dir& dir, std::vector<std::string> extra,
                                    const std::string& config = "config.json",
                                    const std::string& scenario = "scenario.json",
                                    const std::string& in = "in.jsonl",
                                    const std::string& out = "results.jsonl") {
  std::vector<std::string> args = {keel_binary, "batch", "--config", dir / config, "--in",
                                   dir / in,    "--out", dir / out,  "--mock",     dir / scenario};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

const json* find_line(const std::vector<json>& records, std::size_t line) {
  for (const auto& r : records) {
    if (r.at("line").get<std::size_t>() == line) {
      return &r;
    }
  }
  return nullptr;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace

// ---- 1. malformed input -----------------------------------------------------------------------

TEST_CASE("Malformed input lines each get one failure record naming the line and the JSON path",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl",
             R"({"id": "a", "prompt": "first valid item"})"
             "\n"
             R"({"id": "b", "prompt": "unterminated)"
             "\n"
             R"([1, 2, 3])"
             "\n"
             R"({"prompt": "an item without an id"})"
             "\n"
             R"({"id": "c", "messages": [{"role": "user", "content": 42}]})"
             "\n"
             R"({"id": "d", "prompt": "hello", "colour": "blue"})"
             "\n"
             "   \n"
             R"({"id": "e", "messages": [{"role": "user", "content": "second valid item"}]})"
             "\n"
             R"({"id": "a", "prompt": "the same id as line 1"})"
             "\n"
             R"({"id": 7, "prompt": "an integer id"})"
             "\n");

  child_process c(dir, "batch", batch_args(dir, {"--progress", "none"}));
  const int status = c.wait();
  INFO("stderr:\n" << c.err());
  CHECK(status == 1);

  const auto records = read_records(dir / "results.jsonl");
  std::set<std::size_t> lines;
  for (const auto& r : records) {
    CHECK(lines.insert(r.at("line").get<std::size_t>()).second);  // one record per line
    for (const char* field : {"id", "line", "status", "attempts", "latency_ms"}) {
      CHECK(r.contains(field));  // the fields every record has, failures of input included
    }
  }
  CHECK(lines == std::set<std::size_t>{1, 2, 3, 4, 5, 6, 8, 9, 10});  // not the blank line 7

  for (std::size_t ok_line : {1u, 8u, 10u}) {
    const json* r = find_line(records, ok_line);
    REQUIRE(r != nullptr);
    INFO(r->dump());
    CHECK(r->at("status") == "ok");
  }
  CHECK(find_line(records, 10)->at("id") == 7);

  struct expected_failure {
    std::size_t line;
    json id;
    std::vector<std::string> fragments;  // all must appear in the message
  };
  const std::vector<expected_failure> invalid = {
      {2, nullptr, {"line 2", "not valid JSON"}},
      {3, nullptr, {"line 3", "object"}},
      {4, nullptr, {"line 4", "/id"}},
      {5, "c", {"line 5", "/messages/0/content"}},
      {6, "d", {"line 6", "/colour", "unknown key"}},
  };
  for (const auto& e : invalid) {
    const json* r = find_line(records, e.line);
    REQUIRE(r != nullptr);
    INFO(r->dump());
    CHECK(r->at("status") == "failed");
    CHECK(r->at("error").at("class") == "invalid_input");
    CHECK(r->at("id") == e.id);
    const std::string message = r->at("error").at("message").get<std::string>();
    for (const auto& f : e.fragments) {
      CHECK(contains(message, f));
    }
  }

  const json* dup = find_line(records, 9);
  REQUIRE(dup != nullptr);
  INFO(dup->dump());
  CHECK(dup->at("status") == "failed");
  CHECK(dup->at("id") == "a");
  CHECK(dup->at("error").at("class") == "duplicate_id");
  const std::string dup_message = dup->at("error").at("message").get<std::string>();
  CHECK(contains(dup_message, "line 9"));
  CHECK(contains(dup_message, "line 1"));
}

// ---- 2. crash safety --------------------------------------------------------------------------

TEST_CASE("A batch killed with SIGKILL five times resumes to exactly one record per id",
          "[cli_e2e]") {
  temp_dir dir;
  constexpr int items = 400;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", R"({
    "seed": 5,
    "models": {"model-a": {"latency_ms": {"min": 20, "max": 60},
                           "errors": {"rate_limit": 0.03, "server_error": 0.04, "unavailable": 0.03},
                           "retry_after_ms": 30}}
  })");
  write_file(dir / "in.jsonl", prompts_jsonl(items));
  const std::string results = dir / "results.jsonl";

  std::mt19937 rng(20240611);
  std::uniform_int_distribution<std::size_t> new_lines(5, 60);
  for (int round = 0; round < 5; ++round) {
    const std::size_t before = count_lines(results);
    const std::size_t k = new_lines(rng);
    std::vector<std::string> extra = {"--concurrency", "16",     "--progress",
                                      "none",          "--seed", std::to_string(round)};
    if (round > 0) {
      extra.push_back("--resume");
    }
    child_process c(dir, "round" + std::to_string(round), batch_args(dir, extra));
    INFO("round " << round << ": " << before << " lines before, waiting for " << k << " more");
    const bool reached =
        eventually([&] { return count_lines(results) >= before + k || !c.running(); }, 30s);
    REQUIRE(reached);
    c.signal(SIGKILL);
    const int status = c.wait();
    INFO("stderr:\n" << c.err());
    CHECK(status == -SIGKILL);  // 5 x at most 60 records cannot finish 400 items
  }

  child_process last(
      dir, "final",
      batch_args(dir, {"--concurrency", "16", "--progress", "none", "--seed", "9", "--resume"}));
  const int status = last.wait();
  INFO("stderr:\n" << last.err());
  CHECK((status == 0 || status == 1));

  const auto records = read_records(results);  // every line is a complete JSON object
  check_each_id_once(records, items);
  for (const auto& r : records) {
    INFO(r.dump());
    CHECK((r.at("status") == "ok" || r.at("status") == "failed"));
    CHECK(r.at("line") == r.at("id"));  // item i is on line i
  }
}

TEST_CASE("A torn last line in the results file is dropped on resume and its item is redone",
          "[cli_e2e]") {
  temp_dir dir;
  constexpr int items = 8;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl", prompts_jsonl(items));
  const std::string results = dir / "results.jsonl";

  const auto first =
      run_keel(dir, "first",
               {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out",
                results, "--mock", dir / "scenario.json", "--progress", "none"});
  INFO("first stderr:\n" << first.err);
  REQUIRE(first.status == 0);
  auto lines = complete_lines(read_file(results));
  REQUIRE(lines.size() == static_cast<std::size_t>(items));

  // Tear the last record: keep its first half, without the newline.
  const std::string torn = lines.back();
  const json torn_id = json::parse(torn).at("id");
  lines.pop_back();
  std::string text;
  for (const auto& l : lines) {
    text += l + "\n";
  }
  text += torn.substr(0, torn.size() / 2);
  write_file(results, text);

  const auto second = run_keel(
      dir, "second",
      {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out", results,
       "--mock", dir / "scenario.json", "--progress", "none", "--resume", "--summary-json",
       dir / "summary.json", "--log-level", "info", "--log-format", "json"});
  INFO("second stderr:\n" << second.err);
  CHECK(second.status == 0);

  const auto records = read_records(results);
  check_each_id_once(records, items);
  const json summary = json::parse(read_file(dir / "summary.json"));
  CHECK(summary.at("items").at("done") == 1);  // only the torn item ran again
  CHECK(summary.at("items").at("skipped") == items - 1);
  bool saw_resume = false;
  for (const auto& j : json_lines(second.err)) {
    if (!j.is_discarded() && j.value("event", "") == "resume") {
      saw_resume = true;
      CHECK(j.at("dropped_torn_tail") == true);
    }
  }
  CHECK(saw_resume);
  for (const auto& r : records) {
    if (r.at("id") == torn_id) {
      CHECK(r.at("status") == "ok");
    }
  }
}

// ---- 3. signals -------------------------------------------------------------------------------

TEST_CASE(
    "SIGINT cancels the items in flight after the grace period and the printed command "
    "resumes the batch",
    "[cli_e2e]") {
  temp_dir dir;
  constexpr int items = 12;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(1500));
  write_file(dir / "in.jsonl", prompts_jsonl(items));
  const std::string results = dir / "results.jsonl";

  child_process c(dir, "interrupted",
                  batch_args(dir, {"--concurrency", "8", "--grace", "0.3", "--progress", "lines",
                                   "--progress-interval", "0.1"}));
  REQUIRE(eventually([&] { return contains(c.err(), "in flight 8") || !c.running(); }, 20s));
  REQUIRE(c.running());
  c.signal(SIGINT);
  const int status = c.wait(20s);
  const std::string err = c.err();
  INFO("stderr:\n" << err);
  CHECK(status == 130);

  // The run says how to resume: "Resume with:\n  <command>".
  const auto at = err.find("Resume with");
  REQUIRE(at != std::string::npos);
  const auto cmd_start = err.find('\n', at);
  REQUIRE(cmd_start != std::string::npos);
  const std::string cmd_line =
      err.substr(cmd_start + 1, err.find('\n', cmd_start + 1) - cmd_start - 1);
  const auto words = shell_words(cmd_line);
  REQUIRE(!words.empty());
  CHECK(words[0] == keel_binary);
  CHECK(std::count(words.begin(), words.end(), "--resume") == 1);
  CHECK(std::count(words.begin(), words.end(), results) == 1);

  // The 8 items in flight (1.5 s each, far longer than the 0.3 s grace) were cancelled; nothing
  // new was admitted after the signal.
  const auto interrupted = read_records(results);
  CHECK(interrupted.size() == 8);
  for (const auto& r : interrupted) {
    INFO(r.dump());
    CHECK(r.at("status") == "cancelled");
    CHECK(r.at("error").at("class") == "cancelled");
  }

  child_process resumed(dir, "resumed", words);
  const int resumed_status = resumed.wait();
  INFO("resumed stderr:\n" << resumed.err());
  CHECK(resumed_status == 0);
  const auto records = read_records(results);
  check_each_id_once(records, items);
  for (const auto& r : records) {
    INFO(r.dump());
    CHECK(r.at("status") == "ok");
  }
}

TEST_CASE("SIGTERM stops a batch with exit status 143", "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(1500));
  write_file(dir / "in.jsonl", prompts_jsonl(6));

  child_process c(dir, "terminated",
                  batch_args(dir, {"--concurrency", "4", "--grace", "0.3", "--progress", "lines",
                                   "--progress-interval", "0.1"}));
  REQUIRE(eventually([&] { return contains(c.err(), "in flight 4") || !c.running(); }, 20s));
  REQUIRE(c.running());
  c.signal(SIGTERM);
  const int status = c.wait(20s);
  const std::string err = c.err();
  INFO("stderr:\n" << err);
  CHECK(status == 143);
  CHECK(contains(err, "SIGTERM"));
  CHECK(contains(err, "--resume"));
  const auto records = read_records(dir / "results.jsonl");
  CHECK(records.size() == 4);
  for (const auto& r : records) {
    CHECK(r.at("status") == "cancelled");
  }
}

// ---- 4. config errors -------------------------------------------------------------------------

TEST_CASE("keel config check names the JSON path of a bad value and prints a good config resolved",
          "[cli_e2e]") {
  temp_dir dir;
  struct bad_case {
    const char* text;
    const char* path;
  };
  const std::vector<bad_case> bad = {
      {R"({"config_list": [{"model": "m", "api_key": "k", "timeout": "abc"}]})",
       "/config_list/0/timeout"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}],
           "policy": {"retry": {"max_attempts": 0}}})",
       "/policy/retry/max_attempts"},
      {R"({"config_list": [{"model": "m", "api_key": "k"},
                           {"model": "n", "api_key": "k", "temprature": 0.5}]})",
       "/config_list/1/temprature"},
      {R"({"config_list": [{"model": "m", "api_key": "k"}], "policy": {"retyr": {}}})",
       "/policy/retyr"},
  };
  int i = 0;
  for (const auto& b : bad) {
    const std::string file = dir / ("bad" + std::to_string(++i) + ".json");
    write_file(file, b.text);
    const auto r = run_keel(dir, "check" + std::to_string(i), {"config", "check", file});
    INFO(b.text << "\nstderr:\n" << r.err);
    CHECK(r.status == 2);
    CHECK(contains(r.err, b.path));
    CHECK(contains(r.err, file));
    CHECK(r.out.empty());
  }

  const std::string good = dir / "good.json";
  write_file(good, fast_config);
  const auto r = run_keel(dir, "check-good", {"config", "check", good});
  INFO("stderr:\n" << r.err);
  CHECK(r.status == 0);
  const json resolved = json::parse(r.out, nullptr, false);
  REQUIRE(!resolved.is_discarded());
  CHECK(resolved.at("config_list").at(0).at("model") == "model-a");
  CHECK(resolved.at("policy").at("retry").at("max_attempts") == 8);
  CHECK(resolved.at("policy").at("deadline") == 300);  // a default, filled in
}

TEST_CASE("keel batch refuses to append to existing results without resume or overwrite",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl", prompts_jsonl(3));
  const std::string existing =
      R"({"id":1,"line":1,"status":"ok","text":"earlier run","attempts":1})"
      "\n";
  write_file(dir / "results.jsonl", existing);

  child_process c(dir, "refused", batch_args(dir, {"--progress", "none"}));
  const int status = c.wait();
  const std::string err = c.err();
  INFO("stderr:\n" << err);
  CHECK(status == 2);
  CHECK(contains(err, dir / "results.jsonl"));
  CHECK(contains(err, "--resume"));
  CHECK(contains(err, "--overwrite"));
  CHECK(read_file(dir / "results.jsonl") == existing);
}

TEST_CASE(
    "keel batch --overwrite keeps earlier results when the run cannot start, never eats the input",
    "[cli_e2e][review]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  const std::string input = prompts_jsonl(3);
  write_file(dir / "in.jsonl", input);
  const std::string existing =
      R"({"id":1,"line":1,"status":"ok","text":"earlier run","attempts":1})"
      "\n";
  write_file(dir / "results.jsonl", existing);
  fs::create_directory(dir / "a_directory");

  SECTION("a missing input") {
    child_process c(
        dir, "missing",
        batch_args(dir, {"--overwrite"}, "config.json", "scenario.json", "no-such-input.jsonl"));
    CHECK(c.wait() == 2);
    CHECK(contains(c.err(), "no-such-input.jsonl"));
    CHECK(read_file(dir / "results.jsonl") == existing);
  }
  SECTION("a directory as input") {
    child_process c(
        dir, "dir_in",
        batch_args(dir, {"--overwrite"}, "config.json", "scenario.json", "a_directory"));
    CHECK(c.wait() == 2);
    CHECK(contains(c.err(), "directory"));
    CHECK(read_file(dir / "results.jsonl") == existing);
  }
  SECTION("the input named as the output") {
    for (const std::string out : {"in.jsonl", "./in.jsonl"}) {
      // With no flag, too: not "already has results; pass --resume", which would be wrong.
      for (const std::vector<std::string>& flags :
           {std::vector<std::string>{"--overwrite"}, std::vector<std::string>{}}) {
        child_process c(dir, "same",
                        batch_args(dir, flags, "config.json", "scenario.json", "in.jsonl", out));
        CHECK(c.wait() == 2);
        CHECK(contains(c.err(), "--in and --out name the same file"));
        CHECK(read_file(dir / "in.jsonl") == input);
      }
    }
  }
  SECTION("--trace naming the results or the input") {
    for (const std::string trace : {"results.jsonl", "./in.jsonl"}) {
      child_process c(
          dir, "trace_same",
          batch_args(dir, {"--resume", "--trace", dir / trace}, "config.json", "scenario.json"));
      CHECK(c.wait() == 2);
      CHECK(contains(c.err(), "--trace names the same file"));
      CHECK(read_file(dir / "results.jsonl") == existing);
      CHECK(read_file(dir / "in.jsonl") == input);
    }
  }
  SECTION("--summary-json naming the results, the input or the trace") {
    for (const std::string summary : {"results.jsonl", "./in.jsonl", "spans.jsonl"}) {
      child_process c(
          dir, "summary_same",
          batch_args(dir,
                     {"--resume", "--trace", dir / "spans.jsonl", "--summary-json", dir / summary},
                     "config.json", "scenario.json"));
      CHECK(c.wait() == 2);
      CHECK(contains(c.err(), "--summary-json names the same file as"));
      CHECK(read_file(dir / "results.jsonl") == existing);
      CHECK(read_file(dir / "in.jsonl") == input);
    }
  }
  SECTION("--summary-json naming a results file the run would create") {
    // It does not exist yet, so the two paths differ only in spelling.
    child_process c(dir, "summary_fresh",
                    batch_args(dir, {"--summary-json", dir / "./fresh.jsonl"}, "config.json",
                               "scenario.json", "in.jsonl", "fresh.jsonl"));
    CHECK(c.wait() == 2);
    CHECK(contains(c.err(), "--summary-json names the same file as --out"));
    CHECK_FALSE(std::filesystem::exists(dir / "fresh.jsonl"));
  }
  SECTION("a --summary-json that cannot be written") {
    child_process c(dir, "summary_dir",
                    batch_args(dir, {"--overwrite", "--summary-json", dir / "no-such-dir/s.json"},
                               "config.json", "scenario.json"));
    CHECK(c.wait() == 2);
    CHECK(contains(c.err(), "cannot write the summary to"));
    CHECK(read_file(dir / "results.jsonl") == existing);
  }
  SECTION("a metrics port already in use") {
    const int busy = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(busy >= 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    REQUIRE(::bind(busy, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(busy, 1) == 0);
    REQUIRE(::getsockname(busy, reinterpret_cast<sockaddr*>(&addr), &len) == 0);
    const std::string port = std::to_string(ntohs(addr.sin_port));
    child_process c(dir, "port", batch_args(dir, {"--overwrite", "--metrics-port", port}));
    CHECK(c.wait() == 2);
    ::close(busy);
    CHECK(read_file(dir / "results.jsonl") == existing);
  }
  SECTION("a directory as output") {
    child_process c(dir, "dir_out",
                    batch_args(dir, {}, "config.json", "scenario.json", "in.jsonl", "a_directory"));
    CHECK(c.wait() == 2);
    CHECK(contains(c.err(), "is a directory"));
  }
  SECTION("and when the run starts, the earlier results are replaced") {
    child_process c(dir, "ok", batch_args(dir, {"--overwrite", "--progress", "none"}));
    CHECK(c.wait() == 0);
    CHECK(read_records(dir / "results.jsonl").size() == 3);
  }
}

TEST_CASE("keel demo keeps the results of a file it was pointed at unless told to overwrite",
          "[cli_e2e][review]") {
  temp_dir dir;
  const std::string mine = R"({"id":1,"line":1,"status":"ok","text":"mine","attempts":1})"
                           "\n";
  write_file(dir / "mine.jsonl", mine);
  const auto refused =
      run_keel(dir, "demo_refused", {"demo", "-n", "5", "--quiet", "--out", dir / "mine.jsonl"});
  CHECK(refused.status == 2);
  CHECK(contains(refused.err, "--overwrite"));
  CHECK(read_file(dir / "mine.jsonl") == mine);
  const auto replaced =
      run_keel(dir, "demo_replaced",
               {"demo", "-n", "5", "--quiet", "--out", dir / "mine.jsonl", "--overwrite"});
  CHECK(replaced.status == 0);
  CHECK(read_records(dir / "mine.jsonl").size() == 5);
}

TEST_CASE("usage errors exit with status 2, help with 0", "[cli_e2e][review]") {
  temp_dir dir;
  for (const std::vector<std::string>& args : {std::vector<std::string>{"batch", "-c", "abc"},
                                               {"batch", "--bogus"},
                                               {"batch", "--log-level", "verbose"},
                                               {"frobnicate"},
                                               {"config", "check"},
                                               {"mock", "--port", "99999"}}) {
    const run_result r = run_keel(dir, "usage", args);
    INFO(args.front() << " " << (args.size() > 1 ? args[1] : "") << ": " << r.err);
    CHECK(r.status == 2);
  }
  CHECK(run_keel(dir, "help", {"--help"}).status == 0);
  // What was wrong, not CLI11's "A subcommand is required" (issue 13).
  CHECK(contains(
      run_keel(dir, "unknown", {"frobnicate"}).err,
      "keel: unknown command 'frobnicate'; the commands are batch, demo, mock, serve, bench, "
      "config"));
  // keel serve: a bad --listen and a missing --config are usage errors.
  write_file(dir / "serve.json", R"([{"model": "m", "api_key": "k"}])");
  const run_result listen =
      run_keel(dir, "serve-listen", {"serve", "--config", dir / "serve.json", "--listen", "8080"});
  CHECK(listen.status == 2);
  CHECK(contains(listen.err, "--listen 8080: expected ADDR:PORT"));
  const run_result host = run_keel(
      dir, "serve-host", {"serve", "--config", dir / "serve.json", "--listen", "example.com:8080"});
  CHECK(host.status == 2);
  CHECK(contains(host.err, "--listen example.com:8080: ADDR must be an IP address"));
  CHECK(run_keel(dir, "serve-noconfig", {"serve"}).status == 2);
  // Refused before it listens, as batch refuses them (it used to start with the defaults).
  for (const std::vector<std::string>& bad :
       {std::vector<std::string>{"--log-level", "bogus"}, {"--log-format", "xml"}}) {
    std::vector<std::string> args = {"serve", "--config", dir / "serve.json", "--listen",
                                     "127.0.0.1:0"};
    args.insert(args.end(), bad.begin(), bad.end());
    const run_result r = run_keel(dir, "serve-log", args);
    CHECK(r.status == 2);
    CHECK(contains(r.err, bad.front()));
  }
  const run_result twice = run_keel(dir, "serve-twice",
                                    {"serve", "--config", dir / "serve.json", "--config",
                                     dir / "serve.json", "--listen", "127.0.0.1:0"});
  CHECK(twice.status == 2);
  CHECK(contains(twice.err, "both serve the model \"m\""));
  // A range a person can read, not 300 digits of DBL_MAX.
  const run_result grace = run_keel(dir, "grace", {"batch", "--grace", "-1"});
  CHECK(grace.status == 2);
  CHECK(contains(grace.err, "--grace: Value -1 not in range 0.000000 to 86400.000000"));
}

// ---- 5. secrets -------------------------------------------------------------------------------

TEST_CASE("API keys and AWS credentials never appear in output, logs or results", "[cli_e2e]") {
  temp_dir dir;
  const std::vector<std::string> secrets = {"sk-e2eSECRETabcdefghijklmnop123456",
                                            "e2eSECRETabcdefghijklmnop",
                                            "e2eAWSsecretKEYvalue0123456789abcdefghij",
                                            "AWSsecretKEYvalue0123456789",
                                            "AKIAE2ETESTKEY000001",
                                            "E2ETESTKEY000001"};
  write_file(dir / "config.json", R"({
    "config_list": [
      {"api_type": "openai", "model": "primary-model", "api_key": "sk-e2eSECRETabcdefghijklmnop123456",
       "timeout": 10},
      {"api_type": "bedrock", "model": "anthropic.claude-3-haiku-20240307-v1:0",
       "aws_region": "us-east-1", "aws_access_key": "AKIAE2ETESTKEY000001",
       "aws_secret_key": "e2eAWSsecretKEYvalue0123456789abcdefghij", "timeout": 10}
    ],
    "policy": {"retry": {"max_attempts": 2, "backoff": {"kind": "constant", "base": 0.01}}}
  })");
  write_file(dir / "scenario.json",
             R"({"seed": 3, "models": {"primary-model": {"errors": {"auth": 1.0}}}})");
  write_file(dir / "in.jsonl", prompts_jsonl(4));

  // The two batches run side by side.
  child_process text_run(
      dir, "text",
      batch_args(dir,
                 {"--log-level", "debug", "--log-format", "text", "--progress", "lines",
                  "--progress-interval", "0.1", "--summary-json", dir / "summary-text.json"},
                 "config.json", "scenario.json", "in.jsonl", "results-text.jsonl"));
  child_process json_run(
      dir, "json",
      batch_args(dir,
                 {"--log-level", "debug", "--log-format", "json", "--progress", "lines",
                  "--progress-interval", "0.1", "--summary-json", dir / "summary-json.json"},
                 "config.json", "scenario.json", "in.jsonl", "results-json.jsonl"));
  CHECK(text_run.wait() == 0);
  CHECK(json_run.wait() == 0);
  const auto printed = run_keel(
      dir, "print",
      {"batch", "--config", dir / "config.json", "--print-config", "--log-level", "debug"});
  CHECK(printed.status == 0);
  CHECK(contains(printed.out, "<redacted>"));
  const auto checked = run_keel(dir, "check", {"config", "check", dir / "config.json"});
  CHECK(checked.status == 0);
  CHECK(contains(checked.out, "<redacted>"));

  // The run did go through the failure path: every item failed on the primary with auth and
  // was answered by the fallback.
  for (const char* name : {"results-text.jsonl", "results-json.jsonl"}) {
    const auto records = read_records(dir / name);
    check_each_id_once(records, 4);
    for (const auto& r : records) {
      INFO(r.dump());
      CHECK(r.at("status") == "ok");
      CHECK(r.at("fallback") == true);
    }
  }

  // Nothing the runs wrote (stdout, stderr, results, summaries) holds a secret.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) {
    if (e.path().filename() == "config.json") {
      continue;
    }
    ++files;
    const std::string text = read_file(e.path().string());
    for (const auto& s : secrets) {
      INFO(e.path().filename().string() << " holds " << s);
      CHECK(!contains(text, s));
    }
  }
  CHECK(files >= 12);  // 4 runs x (out, err) + 2 results + 2 summaries
}

// ---- 6. logging -------------------------------------------------------------------------------

TEST_CASE(
    "JSON logs are one object per line and every retry names attempt, class, delay, model "
    "and a short prompt",
    "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", R"({
    "seed": 21,
    "models": {"model-a": {"latency_ms": {"min": 1, "max": 5},
                           "errors": {"rate_limit": 0.25, "overloaded": 0.25},
                           "retry_after_ms": 20}}
  })");
  const std::string tail(150, 'x');
  std::map<std::string, std::string> prompts;  // id -> prompt
  std::string in;
  for (int i = 1; i <= 12; ++i) {
    const std::string p = "Prompt number " + std::to_string(i) + " is long on purpose: " + tail;
    prompts[std::to_string(i)] = p;
    in += json{{"id", i}, {"prompt", p}}.dump() + "\n";
  }
  write_file(dir / "in.jsonl", in);

  child_process c(dir, "logs",
                  batch_args(dir, {"--log-format", "json", "--log-level", "warning",
                                   "--concurrency", "4", "--progress", "none", "--seed", "4"}));
  const int status = c.wait();
  const std::string err = c.err();
  INFO("stderr:\n" << err);
  CHECK((status == 0 || status == 1));

  int retries = 0;
  for (const auto& line : complete_lines(err)) {
    if (line.empty() || line[0] != '{') {
      continue;
    }
    INFO(line);
    const json j = json::parse(line, nullptr, false);
    REQUIRE(!j.is_discarded());
    REQUIRE(j.is_object());
    CHECK(j.contains("ts"));
    CHECK(j.contains("level"));
    if (j.value("event", "") != "retry") {
      continue;
    }
    ++retries;
    CHECK(j.at("level") == "warning");
    CHECK(j.at("attempt").is_number_integer());
    CHECK(j.at("attempt").get<int>() >= 1);
    CHECK(j.at("class").is_string());
    CHECK(!j.at("class").get<std::string>().empty());
    CHECK(j.at("delay").is_string());
    CHECK(j.at("model") == "openai/model-a");
    REQUIRE(j.at("prompt").is_string());
    const std::string prompt = j.at("prompt").get<std::string>();
    CHECK(prompt.size() <= 100);
    CHECK(!prompt.empty());
    const std::string& original = prompts.at(j.at("id").dump());
    CHECK(original.rfind(prompt, 0) == 0);  // a prefix of the item's prompt
  }
  CHECK(retries >= 1);
}

// ---- 7. rate limits ---------------------------------------------------------------------------

namespace {

// The issue's workload: 2000 prompts at concurrency 64 against a server that allows 200
// requests/s per model and answers 429 with a whole-second Retry-After. Checks that every item
// succeeds with at most 10% extra attempts (wall time is the benchmark's business).
void check_rate_limited_workload(const std::string& config_text) {
  temp_dir dir;
  constexpr int items = 2000;
  write_file(dir / "config.json", config_text);
  write_file(dir / "scenario.json", R"({
    "seed": 8,
    "models": {"*": {"latency_ms": {"min": 5, "max": 15},
                     "rate_limit": {"requests_per_second": 200, "burst": 200},
                     "retry_after_format": "seconds"}}
  })");
  write_file(dir / "in.jsonl", prompts_jsonl(items));
  child_process c(dir, "batch",
                  batch_args(dir, {"--concurrency", "64", "--progress", "none", "--summary-json",
                                   dir / "summary.json"}));
  const int status = c.wait(100s);
  const std::string out = c.out();
  INFO("stdout:\n" << out);
  CHECK(status == 0);
  const json summary = json::parse(read_file(dir / "summary.json"), nullptr, false);
  REQUIRE(!summary.is_discarded());
  CHECK(summary.at("items").at("ok") == items);
  CHECK(summary.at("items").at("failed") == 0);
  CHECK(summary.at("attempts").get<double>() <= 1.1 * items);
  const auto records = read_records(dir / "results.jsonl");
  check_each_id_once(records, items);
  CHECK(std::count_if(records.begin(), records.end(),
                      [](const json& r) { return r.at("status") == "ok"; }) == items);
}

}  // namespace

// With no client limit, the client adopts the per-minute limit the server reports in its
// rate-limit headers after the first answers.
TEST_CASE(
    "2000 prompts against a 200 per second server limit with no client limit all succeed "
    "with at most 10 percent extra attempts",
    "[cli_e2e]") {
  check_rate_limited_workload(R"({
    "config_list": [{"api_type": "openai", "model": "model-a", "api_key": "k"}],
    "policy": {"retry": {"max_attempts": 6}}
  })");
}

TEST_CASE(
    "2000 prompts against a 200 per second server limit with a 12000 per minute client "
    "limit all succeed with at most 10 percent extra attempts",
    "[cli_e2e]") {
  check_rate_limited_workload(R"({
    "config_list": [{"api_type": "openai", "model": "model-a", "api_key": "k",
                     "requests_per_minute": 12000}],
    "policy": {"retry": {"max_attempts": 6}}
  })");
}

// ---- 8. metrics -------------------------------------------------------------------------------

namespace {

// The metrics URL a batch run with `--metrics-port 0 --log-level info --log-format json` logs
// (empty if it exits, or 20 s pass, without logging one).
std::string logged_metrics_url(child_process& c) {
  std::string url;
  eventually(
      [&] {
        for (const auto& j : json_lines(c.err())) {
          if (!j.is_discarded() && j.value("event", "") == "metrics") {
            url = j.value("url", "");
            return true;
          }
        }
        return !c.running();
      },
      20s);
  return url;
}

}  // namespace

TEST_CASE("A running batch serves Prometheus metrics on the port it logs", "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(300));
  write_file(dir / "in.jsonl", prompts_jsonl(16));

  child_process c(
      dir, "metrics",
      batch_args(dir, {"--metrics-port", "0", "--log-level", "info", "--log-format", "json",
                       "--concurrency", "2", "--progress", "none", "--grace", "0"}));
  const std::string url = logged_metrics_url(c);
  INFO("stderr:\n" << c.err());
  REQUIRE(!url.empty());
  const unsigned short port = port_in(url);
  REQUIRE(port != 0);
  CHECK(url.substr(url.size() - 8) == "/metrics");

  // Once one record is written, at least one attempt has been counted.
  REQUIRE(eventually([&] { return count_lines(dir / "results.jsonl") >= 1 || !c.running(); }, 20s));
  REQUIRE(c.running());
  const http_answer a = http_request(port, "GET", "/metrics");
  CHECK(c.running());  // fetched while the batch runs (16 items x 300 ms at concurrency 2)
  INFO("body:\n" << a.body);
  CHECK(a.status == 200);
  for (const char* name : {"keel_attempts_total", "keel_items_total",
                           "keel_item_latency_seconds_bucket", "keel_breaker_state"}) {
    CHECK(contains(a.body, name));
  }
  // The per-item series count what was written (the batch looks each up once and keeps it).
  auto value_of = [&](const std::string& series) {
    const auto at = a.body.find("\n" + series + " ");
    return at == std::string::npos ? -1.0 : std::stod(a.body.substr(at + series.size() + 2));
  };
  CHECK(value_of(R"(keel_items_total{status="ok"})") >= 1);
  CHECK(value_of(R"(keel_tokens_total{direction="input"})") >= 1);
  CHECK(value_of(R"(keel_tokens_total{direction="output"})") >= 1);
  if (on_path("promtool")) {
    write_file(dir / "metrics.txt", a.body);
    child_process promtool(dir, "promtool", {"/bin/sh", "-c", "exec promtool check metrics"}, {},
                           dir / "metrics.txt");
    const int promtool_status = promtool.wait(30s);
    INFO("promtool stdout:\n" << promtool.out() << "\npromtool stderr:\n" << promtool.err());
    CHECK(promtool_status == 0);
  } else {
    WARN("promtool is not on PATH; the exposition format was not linted");
  }

  c.signal(SIGTERM);
  CHECK(c.wait(20s) == 143);
}

// ---- 9. keel mock -----------------------------------------------------------------------------

TEST_CASE("keel mock prints its URL, answers a chat completion and exits 0 on SIGTERM",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "scenario.json", R"({"seed": 2, "models": {"model-a": {"latency_ms": 5}}})");
  child_process c(dir, "mock",
                  keel_args({"mock", "--port", "0", "--scenario", dir / "scenario.json"}));
  unsigned short port = 0;
  REQUIRE(eventually(
      [&] {
        port = port_in(c.out());
        return port != 0 || !c.running();
      },
      20s));
  INFO("stdout:\n" << c.out() << "\nstderr:\n" << c.err());
  REQUIRE(port != 0);

  const http_answer a =
      http_request(port, "POST", "/v1/chat/completions",
                   R"({"model": "model-a", "messages": [{"role": "user", "content": "hi"}]})");
  INFO("body: " << a.body);
  CHECK(a.status == 200);
  const json body = json::parse(a.body, nullptr, false);
  REQUIRE(!body.is_discarded());
  CHECK(body.at("choices").at(0).at("message").at("content") == "mock answer to: hi");

  c.signal(SIGTERM);
  CHECK(c.wait(20s) == 0);
  CHECK(contains(c.out(), "stopped after 1 requests (1 answered 200)"));
}

// ---- 9b. keel serve ---------------------------------------------------------------------------

TEST_CASE("keel serve answers through its config's policy, serves /metrics and drains on SIGTERM",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "scenario.json",
             R"({"seed": 3, "models": {"served": {"script": ["unavailable", "ok"]}}})");
  child_process mock(dir, "mock",
                     keel_args({"mock", "--port", "0", "--scenario", dir / "scenario.json"}));
  unsigned short mock_port = 0;
  REQUIRE(eventually(
      [&] {
        mock_port = port_in(mock.out());
        return mock_port != 0 || !mock.running();
      },
      20s));
  REQUIRE(mock_port != 0);
  write_file(dir / "keel.json",
             R"({"config_list": [{"model": "served", "base_url": "http://127.0.0.1:)" +
                 std::to_string(mock_port) + R"(", "api_key": "sk-e2e-serve-key"}],
                 "policy": {"retry": {"backoff": {"kind": "constant", "base": 0.01}}}})");
  write_file(dir / "second.json",
             R"({"config_list": [{"model": "second", "base_url": "http://127.0.0.1:)" +
                 std::to_string(mock_port) + R"(", "api_key": "sk-e2e-serve-key-2"}]})");
  child_process serve(
      dir, "serve",
      keel_args({"serve", "--config", dir / "keel.json", "--config", dir / "second.json",
                 "--listen", "localhost:0", "--grace", "5", "--trace", dir / "trace.jsonl"}));
  unsigned short port = 0;
  REQUIRE(eventually(
      [&] {
        port = port_in(serve.out());
        return port != 0 || !serve.running();
      },
      20s));
  INFO("stdout:\n" << serve.out() << "\nstderr:\n" << serve.err());
  REQUIRE(port != 0);
  CHECK(contains(serve.out(), "model \"served\" -> 1 entry, model \"second\" -> 1 entry"));

  const http_answer a =
      http_request(port, "POST", "/v1/chat/completions",
                   R"({"model": "served", "messages": [{"role": "user", "content": "hi"}]})");
  INFO("body: " << a.body);
  CHECK(a.status == 200);  // after keel retried the 503
  const json body = json::parse(a.body, nullptr, false);
  REQUIRE(!body.is_discarded());
  CHECK(body.at("choices").at(0).at("message").at("content") == "mock answer to: hi");

  const http_answer second =
      http_request(port, "POST", "/v1/chat/completions",
                   R"({"model": "second", "messages": [{"role": "user", "content": "yo"}]})");
  CHECK(second.status == 200);
  CHECK(contains(second.body, "mock answer to: yo"));
  const http_answer m = http_request(port, "GET", "/metrics", "");
  CHECK(m.status == 200);
  CHECK(contains(m.body, "keel_retries_total{cause=\"overloaded\"} 1"));
  CHECK(contains(m.body, "keel_serve_completions_total 2"));
  // Traced (--trace): per request a server span and a call span, per attempt one (2 + 1).
  CHECK(contains(m.body, "keel_trace_spans_sampled_total 7"));

  serve.signal(SIGTERM);
  CHECK(serve.wait(20s) == 0);
  CHECK(contains(serve.out(), "stopped after 3 requests (2 completions, 0 errors)"));
  CHECK(contains(serve.err(), "retry"));
  CHECK_FALSE(contains(serve.err(), "sk-e2e-serve-key"));
  // The spans were flushed to the file at exit.
  std::size_t spans = 0;
  std::ifstream trace(dir / "trace.jsonl");
  for (std::string line; std::getline(trace, line);) {
    const json j = json::parse(line, nullptr, false);
    REQUIRE_FALSE(j.is_discarded());
    spans += j["resourceSpans"][0]["scopeSpans"][0]["spans"].size();
  }
  CHECK(spans == 7);
  mock.signal(SIGTERM);
  CHECK(mock.wait(20s) == 0);
}

// ---- 10. keel demo ----------------------------------------------------------------------------

TEST_CASE("keel demo runs 300 prompts to success and reports fallbacks", "[cli_e2e]") {
  temp_dir dir;
  const auto r = run_keel(dir, "demo", {"demo", "-n", "300", "--quiet", "--seed", "1"});
  INFO("stdout:\n" << r.out << "\nstderr:\n" << r.err);
  CHECK(r.status == 0);
  CHECK(contains(r.out, "300 done: 300 ok, 0 failed"));
  CHECK(contains(r.out, "fallbacks"));
  CHECK(contains(r.out, "mock server"));
  CHECK(contains(r.out, "--seed 1 draws the same jitter again"));
}

// ---- 11. attempts precedence ------------------------------------------------------------------

TEST_CASE("AWS retry attempts resolve entry settings over AWS_MAX_ATTEMPTS end to end",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "scenario.json",
             R"({"seed": 4, "models": {"always-503": {"errors": {"unavailable": 1.0}}}})");
  write_file(dir / "in.jsonl", prompts_jsonl(1));
  struct attempts_case {
    std::string name;
    std::string entry_extra;  // added to the entry
    std::optional<std::string> aws_max_attempts;
    int expected;
  };
  const std::vector<attempts_case> cases = {
      {"env", "", "2", 2},
      {"total", R"(, "total_max_attempts": 4, "max_attempts": 1)", "2", 4},
      {"retries", R"(, "max_attempts": 1)", "2", 2},
      {"retries-env5", R"(, "max_attempts": 1)", "5", 2},  // the entry wins over the variable
      {"default", "", std::nullopt, 3},                    // standard mode's default
  };
  // All cases run side by side; each waits through AWS standard backoff.
  std::vector<std::unique_ptr<child_process>> runs;
  for (const auto& k : cases) {
    write_file(dir / (k.name + ".json"),
               R"({"config_list": [{"api_type": "openai", "model": "always-503", "api_key": "k",
                                    "mode": "standard")" +
                   k.entry_extra + R"(}], "policy": {"breaker": {"enabled": false}}})");
    env_overrides env;
    env["AWS_MAX_ATTEMPTS"] = k.aws_max_attempts;
    runs.push_back(std::make_unique<child_process>(
        dir, k.name,
        batch_args(dir, {"--progress", "none", "--seed", "6"}, k.name + ".json", "scenario.json",
                   "in.jsonl", k.name + "-results.jsonl"),
        env));
  }
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const int status = runs[i]->wait(60s);
    INFO(cases[i].name << " stderr:\n" << runs[i]->err());
    CHECK(status == 1);
    const auto records = read_records(dir / (cases[i].name + "-results.jsonl"));
    REQUIRE(records.size() == 1);
    INFO(records[0].dump());
    CHECK(records[0].at("status") == "failed");
    CHECK(records[0].at("attempts") == cases[i].expected);
  }
}

TEST_CASE("A failure record says whether the retries or the retry budget ran out", "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "scenario.json",
             R"({"seed": 4, "models": {"always-503": {"errors": {"unavailable": 1.0}}}})");
  write_file(dir / "in.jsonl", prompts_jsonl(1));
  const std::string entry =
      R"({"config_list": [{"api_type": "openai", "model": "always-503", "api_key": "k"}],)";
  write_file(dir / "retries.json", entry + R"( "policy": {"retry": {"max_attempts": 3,
                                             "backoff": {"kind": "constant", "base": 0.01}},
                                   "breaker": {"enabled": false}}})");
  // A budget of 2 tokens allows no retry at all (gRFC A6: retries need more than half).
  write_file(dir / "budget.json", entry + R"( "policy": {"retry": {"max_attempts": 3,
                                             "backoff": {"kind": "constant", "base": 0.01}},
                                   "breaker": {"enabled": false},
                                   "retry_budget": {"max_tokens": 2, "token_ratio": 0.1}}})");
  struct gave_up_case {
    std::string name;
    int attempts;
    std::string gave_up;
  };
  // AWS retry modes rethrow the last error unchanged; the record still says why they stopped,
  // alone and as the last entry after a fallback.
  const std::string aws_entry =
      R"({"api_type": "openai", "model": "always-503", "api_key": "k", "mode": "standard",
          "total_max_attempts": 2})";
  const std::string constant_retry = R"("retry": {"max_attempts": 3,
                                          "backoff": {"kind": "constant", "base": 0.01}})";
  write_file(dir / "aws.json", R"({"config_list": [)" + aws_entry +
                                   R"(], "policy": {"breaker": {"enabled": false}}})");
  write_file(dir / "aws-fallback.json",
             R"({"config_list": [{"api_type": "openai", "model": "always-503", "api_key": "k"},
                                 )" +
                 aws_entry + R"(], "policy": {)" + constant_retry +
                 R"(, "breaker": {"enabled": false}}})");
  for (const gave_up_case& k :
       {gave_up_case{"retries", 3, "retries_exhausted"},
        gave_up_case{"budget", 1, "budget_exhausted"}, gave_up_case{"aws", 2, "retries_exhausted"},
        gave_up_case{"aws-fallback", 5, "retries_exhausted"}}) {
    child_process c(dir, k.name,
                    batch_args(dir, {"--progress", "none", "--seed", "6"}, k.name + ".json",
                               "scenario.json", "in.jsonl", k.name + "-results.jsonl"));
    CHECK(c.wait() == 1);
    const auto records = read_records(dir / (k.name + "-results.jsonl"));
    REQUIRE(records.size() == 1);
    INFO(records[0].dump());
    CHECK(records[0].at("attempts") == k.attempts);
    CHECK(records[0].at("error").at("gave_up") == k.gave_up);
  }
}

// ---- 12. defaults that never fail what a plain retry loop completes (issue 12) -----------------

namespace {

// A scenario in which exactly every 10th request to model-a answers 503 (`unavailable`), for the
// first `requests` requests. With one item in flight at a time a failed attempt's retry is the
// next request, which succeeds, so no item can run out of attempts or trip the breaker: only the
// retry budget can fail an item.
std::string every_tenth_unavailable(int requests) {
  json script = json::array();
  for (int i = 1; i <= requests; ++i) {
    script.push_back(i % 10 == 0 ? "unavailable" : "ok");
  }
  return json{{"seed", 3}, {"models", {{"model-a", {{"script", script}}}}}}.dump();
}

std::size_t count_gave_up(const std::vector<json>& records, const std::string& why) {
  return static_cast<std::size_t>(std::count_if(records.begin(), records.end(), [&](const json& r) {
    return r.contains("error") && r.at("error").value("gave_up", "") == why;
  }));
}

}  // namespace

TEST_CASE("With the default policy 400 prompts against 10 percent 503s all succeed", "[cli_e2e]") {
  temp_dir dir;
  constexpr int items = 400;
  // Nothing but the entry: every policy default applies (backoff, breaker, retry budget).
  write_file(dir / "config.json",
             R"({"config_list": [{"api_type": "openai", "model": "model-a", "api_key": "k"}]})");
  write_file(dir / "scenario.json", every_tenth_unavailable(500));
  write_file(dir / "in.jsonl", prompts_jsonl(items));
  child_process c(dir, "batch",
                  batch_args(dir, {"--concurrency", "1", "--progress", "none", "--summary-json",
                                   dir / "summary.json"}));
  const int status = c.wait(120s);
  INFO("stdout:\n" << c.out() << "\nstderr:\n" << c.err());
  CHECK(status == 0);
  const json summary = json::parse(read_file(dir / "summary.json"), nullptr, false);
  REQUIRE(!summary.is_discarded());
  CHECK(summary.at("items").at("ok") == items);
  CHECK(summary.at("items").at("failed") == 0);
  CHECK(summary.at("retries") == 44);  // requests 10, 20, ..., 440 failed and were retried once
  const auto records = read_records(dir / "results.jsonl");
  check_each_id_once(records, items);
  CHECK(count_gave_up(records, "budget_exhausted") == 0);
}

TEST_CASE("policy.hedge hedges stalled attempts in a batch and counts them in the summary",
          "[cli_e2e][hedge]") {
  temp_dir dir;
  constexpr int items = 20;
  write_file(dir / "config.json",
             R"({"config_list": [{"api_type": "openai", "model": "model-a", "api_key": "k"}],
                 "policy": {"hedge": {"enabled": true, "delay": 0.05, "percentile": 0}}})");
  // One at a time: requests 1 and 12 stall (each hedged by the next request), the rest answer.
  json script = json::array();
  for (int i = 1; i <= items + 2; ++i) {
    script.push_back(i == 1 || i == 12 ? "stall" : "ok");
  }
  write_file(dir / "scenario.json",
             json{{"seed", 3}, {"models", {{"model-a", {{"script", script}}}}}}.dump());
  write_file(dir / "in.jsonl", prompts_jsonl(items));
  child_process c(dir, "batch",
                  batch_args(dir, {"--concurrency", "1", "--progress", "none", "--summary-json",
                                   dir / "summary.json"}));
  const int status = c.wait(120s);
  INFO("stdout:\n" << c.out() << "\nstderr:\n" << c.err());
  CHECK(status == 0);
  const json summary = json::parse(read_file(dir / "summary.json"), nullptr, false);
  REQUIRE(!summary.is_discarded());
  CHECK(summary.at("items").at("ok") == items);
  CHECK(summary.at("hedges") == 2);
  CHECK(summary.at("attempts") == items + 2);
  CHECK(contains(c.out(), "hedges"));
  check_each_id_once(read_records(dir / "results.jsonl"), items);
}

// The long run is where gRPC's ratio (0.1) lost: 10% failures drain it by 0.01 token per prompt,
// and after about 4,500 prompts it refused 59 retries that would have succeeded.
TEST_CASE("5000 prompts against 10 percent 503s never exhaust the default retry budget",
          "[cli_e2e]") {
  temp_dir dir;
  constexpr int items = 5000;
  // Only the backoff is shortened (to keep the test fast); the budget is the default.
  write_file(dir / "config.json", R"({
    "config_list": [{"api_type": "openai", "model": "model-a", "api_key": "k"}],
    "policy": {"retry": {"backoff": {"base": 0.001, "cap": 0.01}}}
  })");
  write_file(dir / "scenario.json", every_tenth_unavailable(6000));
  write_file(dir / "in.jsonl", prompts_jsonl(items));
  child_process c(dir, "batch",
                  batch_args(dir, {"--concurrency", "1", "--progress", "none", "--summary-json",
                                   dir / "summary.json"}));
  const int status = c.wait(120s);
  INFO("stdout:\n" << c.out());
  CHECK(status == 0);
  const json summary = json::parse(read_file(dir / "summary.json"), nullptr, false);
  REQUIRE(!summary.is_discarded());
  CHECK(summary.at("items").at("ok") == items);
  CHECK(summary.at("items").at("failed") == 0);
  CHECK(summary.at("retries") == 555);
  const auto records = read_records(dir / "results.jsonl");
  REQUIRE(records.size() == static_cast<std::size_t>(items));
  CHECK(count_gave_up(records, "budget_exhausted") == 0);
}

TEST_CASE("A rate-limited item is retried past an exhausted retry budget", "[cli_e2e]") {
  temp_dir dir;
  // A budget of 2 tokens allows no charged retry at all (gRFC A6: retries need more than half),
  // yet 429s with Retry-After are retried until they succeed; a 503 is still refused.
  write_file(dir / "config.json", R"({
    "config_list": [{"api_type": "openai", "model": "model-a", "api_key": "k"}],
    "policy": {"retry": {"max_attempts": 4, "backoff": {"kind": "constant", "base": 0.01}},
               "breaker": {"enabled": false},
               "retry_budget": {"max_tokens": 2}}
  })");
  write_file(dir / "scenario.json", R"({"seed": 5, "models": {"model-a": {
    "retry_after_ms": 20,
    "script": ["rate_limit", "rate_limit", "rate_limit", "ok", "unavailable", "ok"]}}})");
  write_file(dir / "in.jsonl", prompts_jsonl(2));
  child_process c(dir, "batch",
                  batch_args(dir, {"--concurrency", "1", "--progress", "none", "--summary-json",
                                   dir / "summary.json"}));
  CHECK(c.wait() == 1);
  INFO("stderr:\n" << c.err());
  const auto records = read_records(dir / "results.jsonl");
  REQUIRE(records.size() == 2);
  const json* first = find_line(records, 1);
  const json* second = find_line(records, 2);
  REQUIRE(first != nullptr);
  REQUIRE(second != nullptr);
  INFO(first->dump() << "\n" << second->dump());
  CHECK(first->at("status") == "ok");
  CHECK(first->at("attempts") == 4);  // three 429s, then the answer
  CHECK(second->at("status") == "failed");
  CHECK(second->at("attempts") == 1);
  CHECK(second->at("error").at("gave_up") == "budget_exhausted");
}

// ---- 13. the jitter seed ----------------------------------------------------------------------

namespace {

// What one run says about its jitter seed: the summary JSON's, the INFO log line's (with its
// message) and the summary table on stdout.
struct seed_report {
  int status = -1;
  json summary_seed;
  json logged_seed;
  std::string logged_message;
  std::string out;
};

seed_report run_for_seed(const temp_dir& dir, const std::string& name,
                         std::vector<std::string> extra) {
  std::vector<std::string> flags = {
      "--progress",   "none", "--log-level",    "info",
      "--log-format", "json", "--summary-json", dir / (name + ".json")};
  flags.insert(flags.end(), extra.begin(), extra.end());
  child_process c(
      dir, name,
      batch_args(dir, flags, "config.json", "scenario.json", "in.jsonl", name + "-results.jsonl"));
  seed_report r;
  r.status = c.wait();
  r.out = c.out();
  const json summary = json::parse(read_file(dir / (name + ".json")), nullptr, false);
  if (summary.is_object()) {
    r.summary_seed = summary.value("seed", json());
  }
  for (const auto& j : json_lines(c.err())) {
    if (j.is_object() && j.value("event", "") == "seed") {
      r.logged_seed = j.value("seed", json());
      r.logged_message = j.value("message", "");
    }
  }
  return r;
}

}  // namespace

TEST_CASE("Every run without --seed draws and names its own jitter seed and --seed N is honoured",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl", prompts_jsonl(3));

  const seed_report a = run_for_seed(dir, "a", {});
  const seed_report b = run_for_seed(dir, "b", {});
  INFO("a stdout:\n" << a.out << "\nb stdout:\n" << b.out);
  CHECK(a.status == 0);
  CHECK(b.status == 0);
  REQUIRE(a.summary_seed.is_number_unsigned());
  REQUIRE(b.summary_seed.is_number_unsigned());
  const auto seed_a = a.summary_seed.get<std::uint64_t>();
  const auto seed_b = b.summary_seed.get<std::uint64_t>();
  CHECK(seed_a != seed_b);  // two 53-bit draws
  CHECK(seed_a < (std::uint64_t{1} << 53));
  CHECK(seed_b < (std::uint64_t{1} << 53));
  // The INFO line and the summary table name the same seed, and say how to repeat it.
  CHECK(a.logged_seed == a.summary_seed);
  CHECK(contains(a.logged_message, "random"));
  CHECK(contains(a.out, "--seed " + std::to_string(seed_a)));

  const seed_report fixed = run_for_seed(dir, "fixed", {"--seed", "7"});
  INFO("fixed stdout:\n" << fixed.out);
  CHECK(fixed.status == 0);
  CHECK(fixed.summary_seed == 7);
  CHECK(fixed.logged_seed == 7);
  CHECK(contains(fixed.logged_message, "--seed"));
  CHECK(contains(fixed.out, "--seed 7 "));
}

// ---- hardening (issue 13) ---------------------------------------------------------------------

TEST_CASE("A line nested 80,000 deep fails alone; the batch and its resume finish",
          "[cli_e2e][hardening]") {
  // Before: SIGSEGV in a recursive copy of the metadata, at every run and every resume.
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl", prompts_jsonl(3) + R"({"id":4,"prompt":"x","metadata":{"a":)" +
                                   std::string(80000, '[') + std::string(80000, ']') + "}}\n" +
                                   R"({"id":5,"prompt":"y"})" + "\n");
  const auto r =
      run_keel(dir, "deep",
               {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out",
                dir / "results.jsonl", "--mock", dir / "scenario.json", "--progress", "none"});
  INFO(r.err);
  CHECK(r.status == 1);
  const auto records = read_records(dir / "results.jsonl");
  REQUIRE(records.size() == 5);
  const json* deep = find_line(records, 4);
  REQUIRE(deep != nullptr);
  CHECK(deep->at("error").at("class") == "invalid_input");
  CHECK(contains(deep->at("error").at("message").get<std::string>(),
                 "line 4: nested deeper than 128 levels"));
  const auto again = run_keel(
      dir, "resume",
      {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out",
       dir / "results.jsonl", "--mock", dir / "scenario.json", "--progress", "none", "--resume"});
  CHECK(again.status == 1);  // the earlier invalid_input record still counts
  CHECK(read_records(dir / "results.jsonl").size() == 5);
}

TEST_CASE("A line fixed in the input after a run gets one record on --resume",
          "[cli_e2e][hardening]") {
  // Before: the fixed line ran and kept its stale invalid_input record too (two records, exit 1).
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(1));
  write_file(dir / "in.jsonl", R"({"id":"a","prompt":"x"})"
                               "\n"
                               R"({"id":"b","prompt":5})"
                               "\n"
                               R"({"id":"c","prompt":"z"})"
                               "\n");
  const std::vector<std::string> args = {"batch",
                                         "--config",
                                         dir / "config.json",
                                         "--in",
                                         dir / "in.jsonl",
                                         "--out",
                                         dir / "results.jsonl",
                                         "--mock",
                                         dir / "scenario.json",
                                         "--progress",
                                         "none"};
  CHECK(run_keel(dir, "first", args).status == 1);
  write_file(dir / "in.jsonl", R"({"id":"a","prompt":"x"})"
                               "\n"
                               R"({"id":"b","prompt":"fixed"})"
                               "\n"
                               R"({"id":"c","prompt":"z"})"
                               "\n");
  auto resume_args = args;
  resume_args.push_back("--resume");
  const auto again = run_keel(dir, "resume", resume_args);
  INFO(again.err);
  CHECK(again.status == 0);
  const auto records = read_records(dir / "results.jsonl");
  CHECK(records.size() == 3);
  const json* b = find_line(records, 2);
  REQUIRE(b != nullptr);
  CHECK(b->at("status") == "ok");
}

TEST_CASE("keel batch refuses an output that names its config file, even with --overwrite",
          "[cli_e2e][hardening]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(1));
  write_file(dir / "in.jsonl", prompts_jsonl(3));
  const auto r = run_keel(
      dir, "own-config",
      {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out",
       dir / "config.json", "--overwrite", "--mock", dir / "scenario.json", "--progress", "none"});
  CHECK(r.status == 2);
  CHECK(contains(r.err, "--out names the config file"));
  CHECK(read_file(dir / "config.json") == fast_config);  // before: replaced by the results
  const auto s = run_keel(dir, "summary-config",
                          {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl",
                           "--out", dir / "r.jsonl", "--summary-json", dir / "config.json",
                           "--mock", dir / "scenario.json", "--progress", "none"});
  CHECK(s.status == 2);
  CHECK(contains(s.err, "--summary-json names the config file"));
  CHECK(read_file(dir / "config.json") == fast_config);
}

TEST_CASE("A file size limit is an output error, not a signal", "[cli_e2e][hardening]") {
  // Before: SIGXFSZ killed keel (exit 153) with a torn last record and no summary.
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(1));
  write_file(dir / "in.jsonl", prompts_jsonl(300));
  const std::string results = dir / "results.jsonl";
  child_process c(dir, "fsize",
                  {"/bin/sh", "-c", "ulimit -f 64 && exec \"$0\" \"$@\"", keel_binary, "batch",
                   "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out", results,
                   "--mock", dir / "scenario.json", "--progress", "none", "--log-level", "error"});
  CHECK(c.wait() == 2);
  INFO(c.err());
  CHECK(contains(c.err(), "cannot write output"));
  const std::string text = read_file(results);
  REQUIRE_FALSE(text.empty());
  CHECK(text.back() == '\n');  // cut back to the last whole record
  CHECK(contains(c.out(), "not written"));
}

TEST_CASE("A results file deleted during the run is an output error", "[cli_e2e][hardening]") {
  // Before: exit status 0 and "40 done" with every record in a file that no longer existed.
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(50));
  write_file(dir / "in.jsonl", prompts_jsonl(40));
  const std::string results = dir / "results.jsonl";
  child_process c(dir, "deleted",
                  keel_args({"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl",
                             "--out", results, "--mock", dir / "scenario.json", "--progress",
                             "none", "--concurrency", "2"}));
  REQUIRE(eventually([&] { return count_lines(results) >= 1 || !c.running(); }, 30s));
  fs::remove(results);
  CHECK(c.wait() == 2);
  CHECK(contains(c.err(), "was deleted during the run"));
}

TEST_CASE("A closed stderr does not stop a batch", "[cli_e2e][hardening]") {
  // Before: `keel batch ... 2>&1 | head -2` died of SIGPIPE (exit 141) after a few records,
  // with no summary and no resume hint.
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl", prompts_jsonl(50));
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  ::close(fds[0]);  // nobody reads stderr: every write to it fails with EPIPE (or SIGPIPE)
  auto args = batch_args(
      dir, {"--progress", "lines", "--progress-interval", "0.1", "--log-level", "debug"});
  std::vector<char*> argv;
  for (auto& a : args) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, (dir / "summary.out").c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&fa, fds[1], STDERR_FILENO);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t defaults;
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0], &fa, &attr, argv.data(), environ);
  posix_spawnattr_destroy(&attr);
  posix_spawn_file_actions_destroy(&fa);
  ::close(fds[1]);
  REQUIRE(rc == 0);
  int st = 0;
  REQUIRE(::waitpid(pid, &st, 0) == pid);
  CHECK(decode_status(st) == 0);
  check_each_id_once(read_records(dir / "results.jsonl"), 50);
  CHECK(contains(read_file(dir / "summary.out"), "50 done: 50 ok"));
}

TEST_CASE("A second run on the same results file is refused while the first runs",
          "[cli_e2e][hardening]") {
  // Before: two --resume runs on one file wrote two records for thousands of ids.
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", slow_scenario(200));
  write_file(dir / "in.jsonl", prompts_jsonl(40));
  const std::string results = dir / "results.jsonl";
  child_process first(dir, "first", batch_args(dir, {"--progress", "none", "--concurrency", "2"}));
  REQUIRE(eventually([&] { return count_lines(results) >= 1 || !first.running(); }, 30s));
  REQUIRE(first.running());
  const auto second =
      run_keel(dir, "second",
               {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out",
                results, "--mock", dir / "scenario.json", "--progress", "none", "--resume"});
  CHECK(second.status == 2);
  CHECK(contains(second.err,
                 "another keel run (pid " + std::to_string(first.pid()) + ") is writing"));
  first.signal(SIGKILL);  // a crashed run's lock goes with it
  first.wait();
  const auto third = run_keel(
      dir, "third",
      {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out", results,
       "--mock", dir / "scenario.json", "--progress", "none", "--resume", "--concurrency", "40"});
  INFO(third.err);
  CHECK(third.status == 0);
  check_each_id_once(read_records(results), 40);
  CHECK_FALSE(fs::exists(results + ".lock"));
}

TEST_CASE("The summary counts only the records that were written", "[cli_e2e][hardening]") {
  // Before: with --out /dev/full the summary said "1 done: 1 ok" and nothing was written.
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl", prompts_jsonl(1));
  const auto r = run_keel(dir, "full",
                          {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl",
                           "--out", "/dev/full", "--mock", dir / "scenario.json", "--progress",
                           "none", "--summary-json", dir / "summary.json"});
  CHECK(r.status == 2);
  CHECK(contains(r.err, "cannot write output /dev/full"));
  CHECK(contains(r.out, "0 done: 0 ok, 0 failed, 0 cancelled, 1 not written"));
  const json summary = json::parse(read_file(dir / "summary.json"));
  CHECK(summary.at("items").at("done") == 0);
  CHECK(summary.at("items").at("unwritten") == 1);
}

// ---- credentials, classes and TLS settings (issue 13, items 9, 10, 12, 14) -------------------

TEST_CASE("keel config check refuses a key with a trailing newline, naming entry and variable",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json",
             R"([{"api_type": "openai", "model": "m", "api_key_env": "KEEL_E2E_KEY"}])");
  const auto r = run_keel(dir, "check", {"config", "check", dir / "config.json"},
                          {{"KEEL_E2E_KEY", std::string("sk-e2e-NEWLINE9999\n")}});
  CHECK(r.status == 2);
  CHECK(contains(r.err, "/0/api_key_env (the value of $KEEL_E2E_KEY)"));
  CHECK(contains(r.err, "a line feed (0x0a) at the end"));
  CHECK_FALSE(contains(r.err + r.out, "sk-e2e-NEWLINE9999"));
}

TEST_CASE("config check and --print-config hide base_url query values; --ca-file fills entries",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "ca.pem", "-----BEGIN CERTIFICATE-----\n");
  write_file(dir / "own.pem", "-----BEGIN CERTIFICATE-----\n");
  write_file(dir / "config.json", R"([
      {"model": "a", "api_key": "k", "base_url": "https://gw.example/v1?key=AIzaE2ESECRET"},
      {"model": "b", "api_key": "k", "ca_file": ")" +
                                      (dir / "own.pem") + R"("}])");
  const auto checked = run_keel(dir, "check", {"config", "check", dir / "config.json"});
  CHECK(checked.status == 0);
  CHECK(contains(checked.out, "https://gw.example/v1?key=<redacted>"));
  CHECK_FALSE(contains(checked.out + checked.err, "AIzaE2ESECRET"));
  const auto printed = run_keel(
      dir, "print",
      {"batch", "--config", dir / "config.json", "--print-config", "--ca-file", dir / "ca.pem"});
  CHECK(printed.status == 0);
  CHECK_FALSE(contains(printed.out + printed.err, "AIzaE2ESECRET"));
  const json j = json::parse(printed.out);
  CHECK(j["config_list"][0]["ca_file"] == dir / "ca.pem");   // from the flag
  CHECK(j["config_list"][1]["ca_file"] == dir / "own.pem");  // the entry's own wins
  const auto missing = run_keel(
      dir, "missing",
      {"batch", "--config", dir / "config.json", "--print-config", "--ca-file", dir / "nope.pem"});
  CHECK(missing.status == 2);
  CHECK(contains(missing.err, "--ca-file"));
}

TEST_CASE("a prompt over the mock's 1 MiB limit fails as request_too_large without retries",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  write_file(dir / "in.jsonl", R"({"id": "big", "prompt": ")" + std::string(2 * 1024 * 1024, 'x') +
                                   "\"}\n" + R"({"id": "small", "prompt": "hi"})" + "\n");
  child_process run(dir, "batch", batch_args(dir, {"--quiet"}));
  CHECK(run.wait() == 1);
  const auto records = read_records(dir / "results.jsonl");
  REQUIRE(records.size() == 2);
  const json* big = find_line(records, 1);
  REQUIRE(big != nullptr);
  INFO(big->dump());
  CHECK(big->at("status") == "failed");
  CHECK(big->at("error").at("class") == "request_too_large");
  CHECK(big->at("error").at("status") == 413);
  CHECK(big->at("attempts") == 1);  // fast_config allows 8: a 413 is not retried
  CHECK(find_line(records, 2)->at("status") == "ok");
}

// ---- 14. streamed batches (issue 15) ----------------------------------------------------------

namespace {

// The API key or AWS secret key of `stream_config(api_type)`.
std::string stream_secret(const std::string& api_type) {
  return api_type == "bedrock" ? "streamTestSecret0123" : "test-key-a";
}

// One entry of `api_type` for model-a (fake credentials: the mock checks none), fast retries, no
// breaker.
std::string stream_config(const std::string& api_type) {
  json entry = {{"api_type", api_type}, {"model", "model-a"}, {"timeout", 10}};
  if (api_type == "bedrock") {
    entry["aws_region"] = "us-east-1";
    entry["aws_access_key"] = "AKIASTREAMTEST000001";
    entry["aws_secret_key"] = stream_secret(api_type);
  } else {
    entry["api_key"] = stream_secret(api_type);
  }
  return json{
      {"config_list", {entry}},
      {"policy",
       {{"retry", {{"max_attempts", 4}, {"backoff", {{"kind", "constant"}, {"base", 0.01}}}}},
        {"breaker", {{"enabled", false}}}}}}
      .dump();
}

// The summary JSON a run wrote (fails the test if it is not JSON).
json read_summary(const std::string& path) {
  const json j = json::parse(read_file(path), nullptr, false);
  INFO("summary " << path);
  REQUIRE(!j.is_discarded());
  return j;
}

}  // namespace

TEST_CASE(
    "keel batch --stream writes a plain run's records plus ttft_ms and the summary's TTFT "
    "percentiles, in every wire format",
    "[cli_e2e][stream]") {
  constexpr int items = 12;
  for (const std::string api_type : {"openai", "anthropic", "bedrock"}) {
    INFO("api_type " << api_type);
    temp_dir dir;
    write_file(dir / "config.json", stream_config(api_type));
    // 4-byte chunks, each after 5 ms: a reply of two chunks or more ends at least 5 ms after its
    // first token.
    write_file(dir / "scenario.json",
               R"({"seed": 1, "models": {"*": {"stream": {"chunk_bytes": 4,
                                                         "chunk_latency_ms": 5}}}})");
    // The mock's reply quotes the prompt, so every reply echoes the credential: no record may.
    const std::string secret = stream_secret(api_type);
    write_file(dir / "in.jsonl", prompts_jsonl(items, secret));
    child_process plain(dir, "plain",
                        batch_args(dir,
                                   {"--concurrency", "4", "--progress", "none", "--seed", "5",
                                    "--summary-json", dir / "plain-summary.json"},
                                   "config.json", "scenario.json", "in.jsonl", "plain.jsonl"));
    child_process streamed(
        dir, "stream",
        batch_args(dir,
                   {"--stream", "--concurrency", "4", "--progress", "none", "--seed", "5",
                    "--summary-json", dir / "stream-summary.json"},
                   "config.json", "scenario.json", "in.jsonl", "stream.jsonl"));
    CHECK(plain.wait() == 0);
    const int status = streamed.wait();
    INFO("stream stdout:\n" << streamed.out() << "\nstream stderr:\n" << streamed.err());
    CHECK(status == 0);

    const auto plain_records = read_records(dir / "plain.jsonl");
    const auto stream_records = read_records(dir / "stream.jsonl");
    check_each_id_once(plain_records, items);
    check_each_id_once(stream_records, items);
    std::map<std::string, json> plain_by_id;
    for (const auto& r : plain_records) {
      CHECK_FALSE(r.contains("ttft_ms"));
      plain_by_id[r.at("id").dump()] = r;
    }
    double max_ttft_ms = 0;
    for (json r : stream_records) {
      INFO(r.dump());
      CHECK(r.at("status") == "ok");
      REQUIRE(r.at("text").is_string());
      CHECK(r.at("text").get<std::string>().size() > 4);  // two chunks or more
      CHECK(contains(r.at("text").get<std::string>(), "<redacted>"));
      CHECK_FALSE(contains(r.dump(), secret));
      REQUIRE(r.contains("ttft_ms"));
      REQUIRE(r.at("ttft_ms").is_number());
      const double ttft = r.at("ttft_ms").get<double>();
      CHECK(ttft > 0);
      CHECK(ttft < r.at("latency_ms").get<double>());
      max_ttft_ms = std::max(max_ttft_ms, ttft);
      // The same record as the plain run's, but for the timings.
      json plain_record = plain_by_id[r.at("id").dump()];
      INFO("plain " << plain_record.dump());
      r.erase("ttft_ms");
      r.erase("latency_ms");
      plain_record.erase("latency_ms");
      CHECK(r == plain_record);
    }

    CHECK_FALSE(read_summary(dir / "plain-summary.json").contains("ttft_seconds"));
    CHECK_FALSE(contains(plain.out(), "first token"));
    const json summary = read_summary(dir / "stream-summary.json");
    CHECK(summary.at("items").at("ok") == items);
    REQUIRE(summary.contains("ttft_seconds"));
    const json& ttft = summary.at("ttft_seconds");
    INFO(ttft.dump());
    CHECK(ttft.at("items") == items);
    const double p50 = ttft.at("p50").get<double>();
    const double p99 = ttft.at("p99").get<double>();
    CHECK(p50 > 0);
    CHECK(p50 <= p99);
    CHECK(p99 <= ttft.at("max").get<double>());
    CHECK(std::abs(ttft.at("max").get<double>() * 1000 - max_ttft_ms) < 0.06);  // ms to 0.1
    CHECK(p99 < summary.at("latency_seconds").at("max").get<double>());
    CHECK(contains(streamed.out(), "first token     p50 "));
    CHECK(contains(streamed.out(), "(12 of 12 items had one)"));
  }
}

TEST_CASE(
    "keel batch --stream fails an item whose stream broke after its first token and records "
    "null ttft_ms for a reply without text",
    "[cli_e2e][stream]") {
  temp_dir dir;
  write_file(dir / "config.json", stream_config("openai"));
  // One item at a time, so the script's requests are the items in order: the second stream
  // breaks after one text chunk (a non-streamed request gets a normal answer instead), the
  // fourth is a refusal without text.
  write_file(dir / "scenario.json", R"({"seed": 1, "models": {"model-a": {
      "stream": {"fault_after_chunks": 1},
      "script": ["ok", "stream_error", "ok", "content_filter"]}}})");
  write_file(dir / "in.jsonl", prompts_jsonl(4));
  child_process plain(dir, "plain",
                      batch_args(dir, {"--concurrency", "1", "--progress", "none", "--seed", "5"},
                                 "config.json", "scenario.json", "in.jsonl", "plain.jsonl"));
  CHECK(plain.wait() == 1);  // the refusal fails a plain run too
  child_process streamed(dir, "stream",
                         batch_args(dir,
                                    {"--stream", "--concurrency", "1", "--progress", "none",
                                     "--seed", "5", "--summary-json", dir / "summary.json"},
                                    "config.json", "scenario.json", "in.jsonl", "stream.jsonl"));
  const int status = streamed.wait();
  INFO("stream stdout:\n" << streamed.out() << "\nstream stderr:\n" << streamed.err());
  CHECK(status == 1);

  const auto plain_records = read_records(dir / "plain.jsonl");
  check_each_id_once(plain_records, 4);
  CHECK(find_line(plain_records, 2)->at("status") == "ok");  // not streamed: no mid-stream fault
  const auto records = read_records(dir / "stream.jsonl");
  check_each_id_once(records, 4);
  for (const auto& r : records) {
    INFO(r.dump());
    CHECK(r.contains("ttft_ms"));
  }
  const json* broken = find_line(records, 2);
  REQUIRE(broken != nullptr);
  INFO(broken->dump());
  CHECK(broken->at("status") == "failed");
  CHECK(broken->at("attempts") == 1);  // past the first token a stream is not retried
  CHECK(broken->at("error").at("class") == "stream_interrupted");
  CHECK(broken->at("ttft_ms").is_number());
  CHECK(find_line(records, 1)->at("status") == "ok");
  CHECK(find_line(records, 3)->at("status") == "ok");
  const json* refusal = find_line(records, 4);
  REQUIRE(refusal != nullptr);
  INFO(refusal->dump());
  CHECK(refusal->at("ttft_ms").is_null());
  CHECK(refusal->at("status") == "failed");
  CHECK(refusal->at("error").at("class") == "content_filtered");
  CHECK(find_line(plain_records, 4)->at("error").at("class") == "content_filtered");

  const json summary = read_summary(dir / "summary.json");
  CHECK(summary.at("items").at("ok") == 2);
  CHECK(summary.at("failed_by_class").at("stream_interrupted") == 1);
  CHECK(summary.at("ttft_seconds").at("items") == 3);
  CHECK(contains(streamed.out(), "(3 of 4 items had one)"));
}

TEST_CASE("keel batch --stream serves the time to first token as a Prometheus histogram",
          "[cli_e2e][stream]") {
  temp_dir dir;
  write_file(dir / "config.json", stream_config("openai"));
  write_file(dir / "scenario.json", slow_scenario(300));
  write_file(dir / "in.jsonl", prompts_jsonl(16));
  child_process c(
      dir, "metrics",
      batch_args(dir, {"--stream", "--metrics-port", "0", "--log-level", "info", "--log-format",
                       "json", "--concurrency", "2", "--progress", "none", "--grace", "0"}));
  const std::string url = logged_metrics_url(c);
  INFO("stderr:\n" << c.err());
  const unsigned short port = port_in(url);
  REQUIRE(port != 0);
  // A written record has been observed (the record and the histogram are updated together).
  REQUIRE(eventually([&] { return count_lines(dir / "results.jsonl") >= 1 || !c.running(); }, 20s));
  REQUIRE(c.running());
  const http_answer a = http_request(port, "GET", "/metrics");
  INFO("body:\n" << a.body);
  CHECK(a.status == 200);
  CHECK(contains(a.body, "# TYPE keel_first_token_seconds histogram"));
  const auto count_at = a.body.find("\nkeel_first_token_seconds_count ");
  REQUIRE(count_at != std::string::npos);
  CHECK(std::stod(a.body.substr(count_at + 32)) >= 1);
  c.signal(SIGTERM);
  CHECK(c.wait(20s) == 143);
}

// ---- shards (issue 16 item 6) -----------------------------------------------------------------

TEST_CASE("Shards of one input write one record per line between them and keel check proves it",
          "[cli_e2e]") {
  temp_dir dir;
  write_file(dir / "config.json", fast_config);
  write_file(dir / "scenario.json", instant_scenario);
  // 40 items, a line that is not JSON and a repeated id: each must end in exactly one shard.
  write_file(dir / "in.jsonl", prompts_jsonl(40) + "not json\n" +
                                   R"({"id": 3, "prompt": "the same id as line 3"})" + "\n");
  std::vector<std::string> outs;
  std::size_t total = 0;
  for (int i = 0; i < 3; ++i) {
    const std::string out = dir / ("r" + std::to_string(i) + ".jsonl");
    const auto r = run_keel(
        dir, "shard" + std::to_string(i),
        {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl", "--out", out, "--mock",
         dir / "scenario.json", "--progress", "none", "--shard", std::to_string(i) + "/3"});
    INFO("shard " << i << " stderr:\n" << r.err);
    CHECK((r.status == 0 || r.status == 1));  // 1: the shard holding a failed line
    const auto n = read_records(out).size();
    CHECK(n > 0);
    CHECK(n < 42);  // a share, not everything
    total += n;
    outs.push_back(out);
  }
  CHECK(total == 42);
  // The repeated id met its first use in the same shard: still a duplicate_id failure.
  bool saw_duplicate = false;
  for (const auto& out : outs) {
    for (const auto& r : read_records(out)) {
      if (r.at("line") == 42) {
        saw_duplicate = r.at("error").at("class") == "duplicate_id";
      }
    }
  }
  CHECK(saw_duplicate);

  std::vector<std::string> args = {"check", "--in", dir / "in.jsonl", "--merge",
                                   dir / "merged.jsonl"};
  args.insert(args.end(), outs.begin(), outs.end());
  const auto ok = run_keel(dir, "check", args);
  INFO("check stdout:\n" << ok.out << "\nstderr:\n" << ok.err);
  CHECK(ok.status == 0);
  CHECK(ok.out.find("42 input lines, 42 final records in 3 files") != std::string::npos);
  CHECK(ok.out.find("complete") != std::string::npos);
  const auto merged = read_records(dir / "merged.jsonl");
  REQUIRE(merged.size() == 42);
  for (std::size_t i = 0; i < merged.size(); ++i) {
    CHECK(merged[i].at("line") == i + 1);
  }

  // Without one shard's file: each of its lines is named, status 1.
  const auto missing =
      run_keel(dir, "check-missing", {"check", "--in", dir / "in.jsonl", outs[0], outs[1]});
  CHECK(missing.status == 1);
  CHECK(missing.out.find("INCOMPLETE") != std::string::npos);
  CHECK(missing.err.find(": no record") != std::string::npos);

  const auto bad = run_keel(dir, "bad-shard",
                            {"batch", "--config", dir / "config.json", "--in", dir / "in.jsonl",
                             "--out", dir / "x.jsonl", "--shard", "3/3"});
  CHECK(bad.status == 2);
  CHECK(bad.err.find("--shard \"3/3\": I must be below N") != std::string::npos);
}
