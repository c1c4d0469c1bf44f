// `keel batch` with `policy.shared` against a real redis-server (tests/redis_support.hpp): the
// fleet's bucket in Redis, the fallback when Redis is unreachable, and secrets kept out.
#include <keel/redis/client.hpp>

#include "redis_support.hpp"
#include "support.hpp"
#include "tls_support.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>

using namespace keel_test;
namespace fs = std::filesystem;

namespace {

struct batch_dir {
  batch_dir() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("keel-redis-batch-" + std::to_string(rd()));
    fs::create_directories(path);
    write("scenario.json", R"({"seed": 1, "models": {}})");
    std::string in;
    for (int i = 1; i <= 30; ++i) {
      in += nlohmann::json{{"id", i}, {"prompt", "item " + std::to_string(i)}}.dump() + "\n";
    }
    write("in.jsonl", in);
  }
  ~batch_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name, std::ios::binary) << text;
  }
  std::string read(const std::string& name) const {
    std::ifstream f(path / name, std::ios::binary);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
  }
  // Runs keel with `args` (shell-quoted by the caller: only test paths), env prefix `env`.
  int keel(const std::string& args, const std::string& env = "") const {
    const std::string cmd = env + " " + std::string(KEEL_CLI_PATH) + " " + args + " > " +
                            (*this / "out.txt") + " 2> " + (*this / "err.txt");
    const int st = std::system(cmd.c_str());
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  }
  std::string config(const std::string& redis_url) const {
    return R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-FLEET-KEY-1"}],
               "policy": {"rate_limits": {"requests_per_minute": 6000},
                          "shared": {"redis": ")" +
           redis_url + R"(", "key_prefix": "keeltest", "timeout": 0.2}}})";
  }
  std::string batch_args(const std::string& out) const {
    return "batch --config " + (*this / "config.json") + " --in " + (*this / "in.jsonl") +
           " --out " + (*this / out) + " --mock " + (*this / "scenario.json") +
           " --progress none --overwrite";
  }
  std::size_t records(const std::string& out) const {
    std::size_t n = 0;
    std::istringstream s(read(out));
    for (std::string l; std::getline(s, l);) {
      n += nlohmann::json::parse(l).at("status") == "ok" ? 1 : 0;
    }
    return n;
  }
  fs::path path;
};

// One command to the redis-server on `port`, on a connection of its own.
keel::redis::reply redis_command(std::uint16_t port, std::vector<std::string> args) {
  asio::io_context ctx;
  keel::redis::client redis(ctx.get_executor(), redis_options(port));
  outcome<keel::redis::reply> out;
  spawn(ctx, redis.command(std::move(args)), out);
  REQUIRE(run_real(ctx, [&] { return out.done; }));
  REQUIRE_FALSE(out.error);
  return *out.value;
}

}  // namespace

TEST_CASE("keel batch with policy.shared paces through one bucket in Redis", "[redis]") {
  redis_process server;
  batch_dir dir;
  dir.write("config.json", dir.config("redis://127.0.0.1:" + std::to_string(server.port()) + "/0"));
  REQUIRE(dir.keel(dir.batch_args("r.jsonl")) == 0);
  INFO("stderr: " << dir.read("err.txt"));
  CHECK(dir.records("r.jsonl") == 30);
  CHECK(dir.read("err.txt").find("fleet_pacing_unavailable") == std::string::npos);
  // The bucket is there, named by provider, model and a fingerprint, never the key.
  keel::redis::reply keys = redis_command(server.port(), {"KEYS", "keeltest:*:requests*"});
  REQUIRE(keys.elements.size() == 2);  // the bucket and its member set
  std::sort(keys.elements.begin(), keys.elements.end(),
            [](const auto& x, const auto& y) { return x.text < y.text; });
  CHECK(keys.elements[1].text == keys.elements[0].text + ":members");
  const std::string key = keys.elements[0].text;
  CHECK(redis_command(server.port(), {"ZCARD", key + ":members"}).integer ==
        1);  // one process leased
  // The entry's breaker is shared too, under the same name.
  CHECK(redis_command(server.port(),
                      {"HGET", key.substr(0, key.size() - 9) + ":breaker", "open_until"})
            .text == "0");  // closed
  CHECK(key.rfind("keeltest:openai:m:", 0) == 0);
  CHECK(key.size() > std::string("keeltest:openai:m::requests").size());
  CHECK(key.substr(key.size() - 9) == ":requests");
  CHECK(key.find("FLEET-KEY") == std::string::npos);
}

TEST_CASE("keel batch goes on under its own limit when Redis is unreachable, and says so",
          "[redis]") {
  batch_dir dir;
  dir.write("config.json", dir.config("redis://127.0.0.1:" + std::to_string(free_port())));
  const int status = dir.keel(dir.batch_args("r.jsonl") + " --log-format json");
  const std::string err = dir.read("err.txt");
  INFO("stderr: " << err);
  CHECK(status == 0);
  CHECK(dir.records("r.jsonl") == 30);
  CHECK(err.find("\"event\":\"fleet_pacing_unavailable\"") != std::string::npos);
}

TEST_CASE("policy.shared keeps the Redis password out of the config and of --print-config",
          "[redis]") {
  batch_dir dir;
  dir.write("config.json", dir.config("redis://:pw-IN-URL-9@127.0.0.1:6379"));
  CHECK(dir.keel("config check " + (dir / "config.json")) == 2);
  CHECK(dir.read("err.txt").find("/policy/shared/redis") != std::string::npos);
  CHECK(dir.read("err.txt").find("pw-IN-URL-9") == std::string::npos);
  // A mistyped scheme is not echoed either when the URL holds credentials.
  dir.write("config.json", dir.config("Redis:/:pw-TYPO-3@127.0.0.1:6379"));
  CHECK(dir.keel("config check " + (dir / "config.json")) == 2);
  CHECK(dir.read("err.txt").find("/policy/shared/redis") != std::string::npos);
  CHECK(dir.read("err.txt").find("pw-TYPO-3") == std::string::npos);
  dir.write("config.json", dir.config("redis://127.0.0.1:6379"));
  CHECK(dir.keel("batch --config " + (dir / "config.json") + " --print-config",
                 "KEEL_REDIS_PASSWORD=pw-FROM-ENV-7") == 0);
  const std::string out = dir.read("out.txt");
  CHECK(out.find("\"password_env\": \"KEEL_REDIS_PASSWORD\"") != std::string::npos);
  CHECK(out.find("pw-FROM-ENV-7") == std::string::npos);
}

TEST_CASE("keel batch loses nothing when Redis is killed mid-run, paces on by itself and rejoins",
          "[redis]") {
  redis_process server;
  batch_dir dir;
  std::string in;
  for (int i = 1; i <= 400; ++i) {
    in += nlohmann::json{{"id", i}, {"prompt", "item " + std::to_string(i)}}.dump() + "\n";
  }
  dir.write("in.jsonl", in);
  // 6,000 per minute: 100 per second after the burst, so the run lasts about 3 s.
  dir.write("config.json", dir.config("redis://127.0.0.1:" + std::to_string(server.port()) + "/0"));
  int status = -1;
  std::thread run([&] { status = dir.keel(dir.batch_args("r.jsonl") + " --log-format json"); });
  // Kill Redis once a quarter of the items have records, start it again (empty) at 150
  // (polling the file, no fixed sleep).
  const auto lines = [&] {
    const std::string text = dir.read("r.jsonl");
    return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
  };
  const auto wait_for = [&](std::size_t n) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (lines() < n && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return lines();
  };
  const std::size_t at_kill = wait_for(100);
  server.stop();
  const std::size_t at_restart = wait_for(150);
  server.start();
  run.join();
  const std::string err = dir.read("err.txt");
  INFO("stderr: " << err);
  CHECK(at_kill >= 100);
  CHECK(at_restart < 400);  // restarted mid-run, not after
  CHECK(status == 0);
  CHECK(dir.records("r.jsonl") == 400);  // every item, exactly once (ok)
  CHECK(lines() == 400);
  const auto unavailable = err.find("\"event\":\"fleet_pacing_unavailable\"");
  const auto restored = err.find("\"event\":\"fleet_pacing_restored\"");
  CHECK(unavailable != std::string::npos);
  CHECK(restored != std::string::npos);
  CHECK(restored > unavailable);
  // It rejoined: the restarted, empty server holds the fleet's bucket again.
  CHECK(redis_command(server.port(), {"KEYS", "keeltest:*:requests"}).elements.size() == 1);
}

TEST_CASE("keel batch cut off from Redis paces at its share of the limit (fleet_size)", "[redis]") {
  batch_dir dir;
  std::string in;
  for (int i = 1; i <= 8; ++i) {
    in += nlohmann::json{{"id", i}, {"prompt", "item " + std::to_string(i)}}.dump() + "\n";
  }
  dir.write("in.jsonl", in);
  // 1,200 per minute (20/s, burst 1) for a fleet of 4: 5 per second for this process, so 8
  // items take at least 7 × 0.2 s; under its own limit alone they would take 0.35 s.
  dir.write("config.json",
            R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-FLEET-KEY-1"}],
                "policy": {"rate_limits": {"requests_per_minute": 1200, "burst": 1},
                           "shared": {"redis": "redis://127.0.0.1:)" +
                std::to_string(free_port()) + R"(", "fleet_size": 4, "timeout": 0.2}}})");
  const auto started = std::chrono::steady_clock::now();
  const int status = dir.keel(dir.batch_args("r.jsonl") + " --log-format json");
  const auto took = std::chrono::steady_clock::now() - started;
  INFO("stderr: " << dir.read("err.txt"));
  CHECK(status == 0);
  CHECK(dir.records("r.jsonl") == 8);
  CHECK(took >= std::chrono::milliseconds(1350));  // a lower bound: pacing, not speed
  CHECK(dir.read("err.txt").find("fleet_pacing_unavailable") != std::string::npos);
}

TEST_CASE("keel batch shares its bucket through Redis over TLS (rediss://, shared.ca_file)",
          "[redis]") {
  keel_test::test_pki pki;
  redis_process server(tls_args(pki), true);
  batch_dir dir;
  const auto config = [&](const std::string& ca_file) {
    return R"({"config_list": [{"api_type": "openai", "model": "m", "api_key": "sk-FLEET-KEY-1"}],
               "policy": {"rate_limits": {"requests_per_minute": 6000},
                          "shared": {"redis": "rediss://127.0.0.1:)" +
           std::to_string(server.port()) + R"(", "ca_file": ")" + ca_file +
           R"(", "key_prefix": "keeltest", "timeout": 0.5}}})";
  };
  dir.write("config.json", config(pki.ca_file));
  REQUIRE(dir.keel(dir.batch_args("r.jsonl") + " --log-format json") == 0);
  INFO("stderr: " << dir.read("err.txt"));
  CHECK(dir.records("r.jsonl") == 30);
  CHECK(dir.read("err.txt").find("fleet_pacing_unavailable") == std::string::npos);
  // A CA file that cannot be read is a config error that names it.
  dir.write("config.json", config(dir / "no-such-ca.pem"));
  CHECK(dir.keel(dir.batch_args("r2.jsonl")) == 2);
  CHECK(dir.read("err.txt").find("/policy/shared/ca_file") != std::string::npos);
}
