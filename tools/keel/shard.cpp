// Input shards and the results check (declared in shard.hpp).
#include "shard.hpp"

#include "jsonl.hpp"
#include "record.hpp"
#include "results_file.hpp"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <utility>

#include <sys/stat.h>
#include <unistd.h>

namespace keel::cli {

shard_spec parse_shard(std::string_view text) {
  const auto bad = [&](const std::string& why) {
    return std::invalid_argument("--shard \"" + std::string(text) + "\": " + why +
                                 " (expected I/N with 0 <= I < N, e.g. 0/4)");
  };
  const auto slash = text.find('/');
  if (slash == std::string_view::npos) {
    throw bad("no '/'");
  }
  const auto number = [&](std::string_view s, const char* what) {
    std::size_t n = 0;
    const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
    if (s.empty() || ec != std::errc() || p != s.data() + s.size()) {
      throw bad(std::string(what) + " is not a number");
    }
    return n;
  };
  shard_spec s;
  s.index = number(text.substr(0, slash), "I");
  s.count = number(text.substr(slash + 1), "N");
  if (s.count == 0 || s.count > 1000000) {
    throw bad("N must be 1 to 1,000,000");
  }
  if (s.index >= s.count) {
    throw bad("I must be below N");
  }
  return s;
}

std::uint64_t fnv1a64(std::string_view bytes) noexcept {
  std::uint64_t h = 14695981039346656037ULL;
  for (const char c : bytes) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ULL;
  }
  return h;
}

std::size_t shard_of_key(std::string_view key, std::size_t count) noexcept {
  return count == 0 ? 0 : static_cast<std::size_t>(fnv1a64(key) % count);
}

std::size_t shard_of_line(std::size_t line, std::size_t count) noexcept {
  return count == 0 ? 0 : line % count;
}

namespace {

// Reads `path` line by line (the last line may lack its newline).
template <class F>
void for_each_line(const std::string& path, F f) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  }
  std::string text;
  std::size_t number = 0;
  for (;;) {
    text.clear();
    bool any = false;
    int c = 0;
    while ((c = std::getc(file)) != EOF) {
      any = true;
      if (c == '\n') {
        break;
      }
      text.push_back(static_cast<char>(c));
    }
    if (!any) {
      break;
    }
    f(++number, text);
  }
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) {
    throw std::runtime_error(path + ": read error");
  }
}

struct expected_line {
  bool input = false;       // a non-blank input line
  std::string key;          // its id.dump() when it is a valid item
  std::size_t finals = 0;   // final records seen
  bool cancelled = false;   // a cancelled record seen
  std::string first_where;  // file:line of its first final record
};

}  // namespace

check_report check_results(const std::string& input, const std::vector<std::string>& results,
                           const std::string& merge_to, std::size_t max_problems) {
  if (!merge_to.empty()) {
    // The merged file replaces OUT at the end: naming a file being read would destroy it.
    namespace fs = std::filesystem;
    std::error_code ec;
    for (const std::string* read : [&] {
           std::vector<const std::string*> all{&input};
           for (const std::string& r : results) {
             all.push_back(&r);
           }
           return all;
         }()) {
      if (*read == merge_to || fs::equivalent(*read, merge_to, ec)) {
        throw std::invalid_argument("--merge names a file this check reads (" + merge_to +
                                    "); merge into another file");
      }
    }
  }
  check_report rep;
  const auto problem = [&](std::string msg) {
    if (rep.problems.size() < max_problems) {
      rep.problems.push_back(std::move(msg));
    }
  };
  std::vector<expected_line> lines(1);  // index: the 1-based input line
  {
    input_reader in(input);
    while (auto raw = in.next()) {
      lines.resize(std::max(lines.size(), raw->number + 1));
      expected_line& e = lines[raw->number];
      e.input = true;
      ++rep.lines;
      if (!raw->too_long) {
        auto parsed = parse_input_line(raw->text, raw->number, 1);
        if (auto* item = std::get_if<batch_item>(&parsed)) {
          e.key = std::move(item->key);
        }
      }
    }
  }
  std::vector<std::pair<std::size_t, std::string>> merged;
  for (const std::string& path : results) {
    for_each_line(path, [&](std::size_t n, const std::string& text) {
      const std::string where = path + ":" + std::to_string(n);
      const std::optional<stored_record> rec = read_record(text);
      if (!rec) {
        ++rep.unreadable;
        problem(where + ": not a keel result record");
        return;
      }
      if (rec->line >= lines.size() || !lines[rec->line].input) {
        ++rep.unexpected;
        problem(where + ": a record for line " + std::to_string(rec->line) +
                ", which is not a line of " + input);
        return;
      }
      expected_line& e = lines[rec->line];
      if (!rec->about_line() && !e.key.empty() && rec->key != e.key) {
        ++rep.unexpected;
        problem(where + ": the record for line " + std::to_string(rec->line) + " has id " +
                rec->key + "; the input's is " + e.key);
        return;
      }
      if (rec->status == record_status_cancelled) {
        e.cancelled = true;
        return;
      }
      ++rep.records;
      if (++e.finals == 1) {
        e.first_where = where;
      } else {
        problem("line " + std::to_string(rec->line) + ": another record in " + where +
                " (the first is in " + e.first_where + ")");
      }
      if (!merge_to.empty() && e.finals == 1) {
        merged.emplace_back(rec->line, text);  // the first only: one record per line
      }
    });
  }
  for (std::size_t l = 1; l < lines.size(); ++l) {
    const expected_line& e = lines[l];
    if (!e.input) {
      continue;
    }
    const std::string name =
        "line " + std::to_string(l) + (e.key.empty() ? std::string() : " (id " + e.key + ")");
    if (e.finals == 0) {
      ++rep.missing;
      if (e.cancelled) {
        ++rep.cancelled;
        problem(name + ": only a cancelled record (run its shard again with --resume)");
      } else {
        problem(name + ": no record");
      }
    } else if (e.finals > 1) {
      ++rep.duplicated;
    }
  }
  if (!merge_to.empty()) {
    std::stable_sort(merged.begin(), merged.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    // OUT is either what it was or the whole merge (replace_file: a new temporary file beside
    // it, with its permissions, renamed over it; a symlink written through; /dev/stdout or a
    // pipe written directly).
    std::string text;
    for (const auto& [line, record] : merged) {
      text += record;
      text += '\n';
    }
    replace_file(merge_to, text);
  }
  return rep;
}

}  // namespace keel::cli
