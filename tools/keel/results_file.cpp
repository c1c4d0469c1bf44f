// The keel command's results file: one whole record per write, the lock, the resume scan.
#include "results_file.hpp"
#include "record.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::cli {
namespace {

using nlohmann::json;

void throw_errno(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

std::string another_name(const std::string& path) {
  return "another keel run is writing " + path +
         " under another name (a hard link); wait for it to end or stop it";
}

}  // namespace

// ---- record_writer ---------------------------------------------------------------------------

record_writer::record_writer(const std::string& path, bool sync) : sync_(sync), path_(path) {
  if (path == "-") {
    fd_ = STDOUT_FILENO;
    // Standard output redirected with `>` or `1<>` is not O_APPEND: each record is then placed
    // at the end by hand, as an owned file's O_APPEND does.
    const int flags = ::fcntl(fd_, F_GETFL);
    append_ = flags >= 0 && (flags & O_APPEND) != 0;
    return;
  }
  fd_ = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw_errno("cannot open output", path);
  }
  // A regular file is locked while it is written, so that a run through another name for it (a
  // hard link, which has its own lock file) is refused: see results_lock. Not a device or a
  // pipe: two runs may well both write to /dev/null.
  struct stat st {};
  if (::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode) && ::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    if (err != EWOULDBLOCK) {
      errno = err;
      throw_errno("cannot lock output", path);
    }
    throw std::runtime_error(another_name(path));
  }
  owned_ = true;
}

void record_writer::truncate() {
  if (owned_ && ::ftruncate(fd_, 0) != 0) {
    throw_errno("cannot truncate", path_);
  }
}

bool record_writer::removed() const noexcept {
  struct stat st {};
  return owned_ && ::fstat(fd_, &st) == 0 && st.st_nlink == 0;
}

record_writer::~record_writer() {
  if (owned_ && fd_ >= 0) {
    ::close(fd_);
  }
}

void record_writer::write(const nlohmann::json& record) {
  write_line(record_text(record));
}

void record_writer::write_line(std::string line) {
  if (broken_) {
    throw std::runtime_error("cannot write output " + path_ +
                             ": an earlier write failed and its part could not be removed");
  }
  line.push_back('\n');
  if (!append_) {
    (void)::lseek(fd_, 0, SEEK_END);  // fails harmlessly on a pipe or terminal
  }
  const char* p = line.data();
  std::size_t left = line.size();
  while (left > 0) {
    const ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      const int err = errno;
      // A short write (a full disk, a file size limit) left part of the record: cut the file
      // back to the record boundary, so a later record is not glued to the fragment and
      // --resume can read the file. If that fails, write nothing more. Where the record
      // started is found only now (the end, less what was written: O_APPEND put it there),
      // not asked of the kernel before every record of an O_APPEND file: a syscall per item
      // saved. (Standard output without O_APPEND was placed at the end just above.)
      if (left != line.size()) {
        const off_t end = ::lseek(fd_, 0, SEEK_END);  // -1 for a pipe or terminal
        const off_t start = end < 0 ? -1 : end - static_cast<off_t>(line.size() - left);
        if (start < 0 || ::ftruncate(fd_, start) != 0) {
          broken_ = true;
        }
      }
      errno = err;
      throw_errno("cannot write output", path_);
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (sync_ && ::fdatasync(fd_) != 0 && errno != EINVAL) {
    throw_errno("cannot sync output", path_);
  }
  ++written_;
}

// ---- results_lock ----------------------------------------------------------------------------

namespace {

// `<path>.lock` beside the file `path` resolves to: a symlink and its target share one lock.
std::string lock_path_for(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path resolved = fs::weakly_canonical(fs::absolute(path, ec), ec);
  return (ec || resolved.empty() ? path : resolved.string()) + ".lock";
}

}  // namespace

results_lock::results_lock(const std::string& path) : lock_path_(lock_path_for(path)) {
  for (;;) {
    fd_ = ::open(lock_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      throw_errno("cannot create the lock file", lock_path_);
    }
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      std::string holder;
      char buf[32] = {};
      const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
      for (ssize_t i = 0; i < n && buf[i] >= '0' && buf[i] <= '9'; ++i) {
        holder.push_back(buf[i]);
      }
      ::close(fd_);
      fd_ = -1;
      if (err != EWOULDBLOCK) {
        errno = err;
        throw_errno("cannot lock", lock_path_);
      }
      throw std::runtime_error(
          "another keel run" + (holder.empty() ? std::string() : " (pid " + holder + ")") +
          " is writing " + path + "; wait for it to end or stop it (lock file " + lock_path_ + ")");
    }
    // The holder before us may have removed the file between our open and our lock: the lock
    // is ours only if the path still names the locked file.
    struct stat held {
    }, named{};
    if (::fstat(fd_, &held) == 0 && ::stat(lock_path_.c_str(), &named) == 0 &&
        held.st_dev == named.st_dev && held.st_ino == named.st_ino) {
      break;
    }
    ::close(fd_);
    fd_ = -1;
  }
  // A hard link is another name with another lock file, but the same file, which a run's
  // record_writer holds locked: probed here, before --resume reads (and may rewrite) it. (Opened
  // without blocking: the caller locks only regular files, but the path may have changed.)
  const int probe = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (probe >= 0) {
    const bool held = ::flock(probe, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
    ::close(probe);  // releases the probe's lock: the writer takes its own
    if (held) {
      release();
      throw std::runtime_error(another_name(path));
    }
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
    // The lock holds without the pid; a second run's message just cannot name us.
  }
}

void results_lock::release() noexcept {
  if (fd_ >= 0) {
    ::unlink(lock_path_.c_str());  // while still holding the lock: see the constructor
    ::close(fd_);
    fd_ = -1;
  }
}

results_lock::~results_lock() {
  release();
}

// ---- replace_file ----------------------------------------------------------------------------

void replace_file(const std::string& path, std::string_view text) {
  replace_file(path, [&](const byte_sink& out) { out(text); });
}

void replace_file(const std::string& path, const std::function<void(const byte_sink&)>& produce) {
  namespace fs = std::filesystem;
  std::error_code ec;
  // A symlink is written through: its target is replaced, not the link.
  const std::string dest =
      fs::is_symlink(path, ec) ? fs::weakly_canonical(path, ec).string() : path;
  const fs::file_status st = fs::status(dest, ec);
  const bool replace = st.type() == fs::file_type::regular || st.type() == fs::file_type::not_found;
  auto fail = [&](const char* what, const std::string& temp) {
    const int err = errno;
    if (!temp.empty()) {
      ::unlink(temp.c_str());
    }
    throw std::runtime_error(path + ": " + what + ": " + std::strerror(err));
  };
  std::string temp;
  int fd = -1;
  if (replace) {
    temp = dest + ".keel-tmp-XXXXXX";
    fd = ::mkstemp(temp.data());  // a new file: never one that is already there
    if (fd < 0) {
      fail("cannot create a temporary file beside it", {});
    }
    if (st.type() == fs::file_type::regular) {
      ::fchmod(fd, static_cast<mode_t>(st.permissions()));
    } else {
      const mode_t mask = ::umask(0);  // a new file gets what open(2) would have given it
      ::umask(mask);
      ::fchmod(fd, 0666 & ~mask);
    }
  } else {
    fd = ::open(dest.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
      fail("cannot open for writing", {});
    }
  }
  // Written through a 64 KiB buffer: a resumed file of a million records is not a million
  // write(2)s, nor held whole in memory.
  std::string pending;
  bool closed = false;  // by a failed write, which also removed the temporary file
  auto flush = [&] {
    const char* p = pending.data();
    std::size_t left = pending.size();
    while (left > 0) {
      const ssize_t n = ::write(fd, p, left);
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n < 0) {
        const int err = errno;
        ::close(fd);
        closed = true;
        errno = err;
        fail("cannot write", temp);
      }
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    pending.clear();
  };
  try {
    produce([&](std::string_view bytes) {
      pending.append(bytes);
      if (pending.size() >= 65536) {
        flush();
      }
    });
    flush();
  } catch (...) {
    if (!closed) {  // `produce` itself failed (e.g. reading what it copies)
      ::close(fd);
      if (!temp.empty()) {
        ::unlink(temp.c_str());
      }
    }
    throw;
  }
  if (!replace) {
    ::close(fd);
    return;
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    errno = err;
    fail("cannot sync", temp);
  }
  if (::close(fd) != 0) {
    fail("cannot write", temp);
  }
  if (std::rename(temp.c_str(), dest.c_str()) != 0) {
    fail("cannot replace", temp);
  }
  // The rename itself survives a crash only once the directory is synced.
  const fs::path dir = fs::path(dest).parent_path();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

// ---- prepare_resume --------------------------------------------------------------------------

resume_state prepare_resume(const std::string& path) {
  resume_state st;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) {
    if (errno == ENOENT) {
      return st;
    }
    throw_errno("cannot open output for --resume", path);
  }
  // Where each kept record is (offset, length), not its text: a file of millions of records is
  // copied from itself on a rewrite, never held in memory.
  std::vector<std::pair<long, std::size_t>> kept;
  bool rewrite = false;
  std::string text;
  std::size_t number = 0;
  int c = 0;
  for (;;) {
    text.clear();
    const long start = std::ftell(f);
    bool any = false, newline = false;
    while ((c = std::getc(f)) != EOF) {
      any = true;
      if (c == '\n') {
        newline = true;
        break;
      }
      text.push_back(static_cast<char>(c));
    }
    if (!any) {
      break;
    }
    ++number;
    const std::optional<stored_record> rec = read_record(text);
    if (!rec) {
      const bool last = !newline || std::getc(f) == EOF;
      if (last) {
        st.dropped_torn_tail = true;
        rewrite = true;
        break;
      }
      std::fclose(f);
      throw std::runtime_error(path + ":" + std::to_string(number) +
                               ": not a keel result record; fix or move the file before --resume");
    }
    if (rec->status == record_status_cancelled) {
      ++st.dropped_cancelled;
      rewrite = true;
      continue;
    }
    if (rec->about_line()) {
      // Read again by the resumed run: the line may have been fixed since.
      ++st.dropped_line_records;
      rewrite = true;
      continue;
    }
    if (!st.done_keys.insert(rec->key).second) {
      ++st.dropped_duplicates;
      rewrite = true;
      continue;
    }
    kept.emplace_back(start, text.size());
    ++st.kept;
    st.kept_failed += rec->status == record_status_failed ? 1 : 0;
    if (!newline) {
      rewrite = true;  // appending after it would join two records on one line
    }
  }
  std::fclose(f);
  if (!rewrite) {
    return st;
  }
  const int in = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) {
    throw_errno("cannot open output for --resume", path);
  }
  try {
    replace_file(path, [&](const byte_sink& out) {
      std::string record;
      for (const auto& [at, size] : kept) {
        record.resize(size);
        std::size_t got = 0;
        while (got < size) {
          const ssize_t n =
              ::pread(in, record.data() + got, size - got, at + static_cast<long>(got));
          if (n < 0 && errno == EINTR) {
            continue;
          }
          if (n <= 0) {
            if (n == 0) {
              errno = EIO;  // the file shrank under us
            }
            throw_errno("cannot read back", path);
          }
          got += static_cast<std::size_t>(n);
        }
        out(record);
        out("\n");
      }
    });
  } catch (...) {
    ::close(in);
    throw;
  }
  ::close(in);
  return st;
}

}  // namespace keel::cli
