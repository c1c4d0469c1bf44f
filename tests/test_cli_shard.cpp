// Tests for tools/keel/shard.hpp: `--shard I/N` parsing and assignment, and `keel check`.
#include "shard.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using keel::cli::check_results;
using nlohmann::json;

namespace {

// A directory of its own under the temp dir, removed at scope exit.
struct scratch {
  scratch() {
    std::random_device rd;
    path = fs::temp_directory_path() / ("keel-shard-" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string write(const std::string& name, const std::string& text) const {
    const std::string p = (path / name).string();
    std::ofstream(p, std::ios::binary) << text;
    return p;
  }
  fs::path path;
};

std::string record(std::size_t line, const json& id, const std::string& status = "ok") {
  json r = {{"id", id}, {"line", line}, {"status", status}, {"attempts", 1}, {"latency_ms", 1}};
  if (status != "ok") {
    r["error"] = {{"class", status == "cancelled" ? "cancelled" : "transport"}};
  }
  return r.dump() + "\n";
}

// Input: ids a, b, c on lines 1, 2, 4 (line 3 blank), and line 5 not JSON.
const std::string input_text =
    "{\"id\": \"a\", \"prompt\": \"x\"}\n{\"id\": \"b\", \"prompt\": \"x\"}\n\n"
    "{\"id\": \"c\", \"prompt\": \"x\"}\nnot json\n";

}  // namespace

TEST_CASE("shard specs I/N are parsed, with errors that say what is wrong", "[cli_shard]") {
  const auto s = keel::cli::parse_shard("2/5");
  CHECK(s.index == 2);
  CHECK(s.count == 5);
  CHECK(keel::cli::parse_shard("0/1").count == 1);
  const auto error_of = [](const char* text) {
    try {
      keel::cli::parse_shard(text);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(error_of("5/5").find("I must be below N") != std::string::npos);
  CHECK(error_of("1/0").find("N must be 1") != std::string::npos);
  CHECK(error_of("3").find("no '/'") != std::string::npos);
  CHECK(error_of("a/4").find("I is not a number") != std::string::npos);
  CHECK(error_of("1/4x").find("N is not a number") != std::string::npos);
  CHECK(error_of("-1/4").find("--shard \"-1/4\"") != std::string::npos);
}

TEST_CASE("items are assigned to shards by a hash that is the same everywhere", "[cli_shard]") {
  // FNV-1a 64 reference values (the empty string and "a").
  CHECK(keel::cli::fnv1a64("") == 14695981039346656037ULL);
  CHECK(keel::cli::fnv1a64("a") == 0xaf63dc4c8601ec8cULL);
  // Every key in exactly one shard, and the shards near even over 10,000 ids.
  std::vector<int> counts(4);
  for (int i = 0; i < 10000; ++i) {
    ++counts.at(keel::cli::shard_of_key(json(i).dump(), 4));
  }
  for (int c : counts) {
    CHECK(c > 2300);
    CHECK(c < 2700);
  }
  CHECK(keel::cli::shard_of_line(7, 4) == 3);
}

TEST_CASE("keel check: one final record per input line is complete, in any file order",
          "[cli_shard]") {
  scratch dir;
  const std::string in = dir.write("in.jsonl", input_text);
  const std::string r0 = dir.write("r0.jsonl", record(4, "c") + record(1, "a"));
  const std::string r1 =
      dir.write("r1.jsonl", record(5, nullptr, "failed") + record(2, "b", "failed"));
  const std::string merged = (dir.path / "merged.jsonl").string();
  const auto rep = check_results(in, {r0, r1}, merged);
  CHECK(rep.complete());
  CHECK(rep.lines == 4);
  CHECK(rep.records == 4);
  CHECK(rep.problems.empty());
  // Merged in input-line order.
  std::ifstream m(merged);
  std::vector<std::size_t> order;
  for (std::string l; std::getline(m, l);) {
    order.push_back(json::parse(l).at("line").get<std::size_t>());
  }
  CHECK(order == std::vector<std::size_t>{1, 2, 4, 5});
}

TEST_CASE("keel check --merge never writes over a file it reads, and keeps one record per line",
          "[cli_shard]") {
  scratch dir;
  const std::string in = dir.write("in.jsonl", input_text);
  const std::string r0 = dir.write("r0.jsonl", record(4, "c") + record(1, "a"));
  const std::string r1 = dir.write("r1.jsonl", record(5, nullptr, "failed") + record(2, "b"));
  const auto read = [](const std::string& path) {
    std::ifstream f(path);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  const std::string r0_text = read(r0);
  for (const std::string& target : {in, r0, (dir.path / "." / "r1.jsonl").string()}) {
    CHECK_THROWS_WITH(check_results(in, {r0, r1}, target),
                      Catch::Contains("--merge names a file this check reads"));
  }
  CHECK(read(in) == input_text);
  CHECK(read(r0) == r0_text);
  // r0 given twice: every line of it is duplicated, and the merged file still has one each.
  const std::string merged = (dir.path / "merged.jsonl").string();
  dir.write("merged.jsonl", "an earlier merge\n");
  const auto rep = check_results(in, {r0, r0, r1}, merged);
  CHECK(rep.duplicated == 2);
  std::ifstream m(merged);
  std::vector<std::size_t> order;
  for (std::string l; std::getline(m, l);) {
    order.push_back(json::parse(l).at("line").get<std::size_t>());
  }
  CHECK(order == std::vector<std::size_t>{1, 2, 4, 5});
  // No temporary file left beside it; a symlink is written through, not replaced.
  for (const auto& f : fs::directory_iterator(dir.path)) {
    CHECK(f.path().filename().string().find(".keel-tmp-") == std::string::npos);
  }
  const std::string target = dir.write("target.jsonl", "old\n");
  fs::create_symlink(target, dir.path / "link.jsonl");
  (void)check_results(in, {r0, r1}, (dir.path / "link.jsonl").string());
  CHECK(fs::is_symlink(dir.path / "link.jsonl"));
  std::ifstream t(target);
  std::string first;
  std::getline(t, first);
  CHECK(json::parse(first).at("line") == 1);
  // A device or a pipe is written directly (no temporary file beside /dev/null).
  CHECK_NOTHROW(check_results(in, {r0, r1}, "/dev/null"));
  for (const auto& f : fs::directory_iterator("/dev")) {
    CHECK(f.path().filename().string().find("null.keel-tmp-") == std::string::npos);
  }
}

TEST_CASE("keel check names every missing, duplicated, foreign and unreadable record",
          "[cli_shard]") {
  scratch dir;
  const std::string in = dir.write("in.jsonl", input_text);
  const std::string r0 = dir.write("r0.jsonl", record(1, "a") + record(2, "b", "cancelled") +
                                                   record(9, "z") + record(4, "WRONG"));
  const std::string r1 = dir.write("r1.jsonl", record(1, "a") + "{torn");
  const auto rep = check_results(in, {r0, r1});
  CHECK_FALSE(rep.complete());
  CHECK(rep.missing == 3);  // b (only cancelled), c (its record has another id), line 5
  CHECK(rep.cancelled == 1);
  CHECK(rep.duplicated == 1);  // a
  CHECK(rep.unexpected == 2);  // line 9, id WRONG
  CHECK(rep.unreadable == 1);
  const auto has = [&](const std::string& text) {
    for (const auto& p : rep.problems) {
      if (p.find(text) != std::string::npos) {
        return true;
      }
    }
    return false;
  };
  CHECK(has("r0.jsonl:3: a record for line 9"));
  CHECK(has("r0.jsonl:4: the record for line 4 has id \"WRONG\"; the input's is \"c\""));
  CHECK(has("r1.jsonl:2: not a keel result record"));
  CHECK(has("line 1: another record in " + r1 + ":1"));
  CHECK(has("line 2 (id \"b\"): only a cancelled record"));
  CHECK(has("line 5: no record"));
}

TEST_CASE("keel check reports an unreadable file by name", "[cli_shard]") {
  scratch dir;
  const std::string in = dir.write("in.jsonl", input_text);
  CHECK_THROWS_WITH(check_results(in, {(dir.path / "nope.jsonl").string()}),
                    Catch::Contains("nope.jsonl: cannot open"));
}
