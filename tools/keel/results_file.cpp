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
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::cli {
namespace {

using nlohmann::json;

void throw_errno(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
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
  owned_ = true;
}

void record_writer::truncate() {
  if (owned_ && ::ftruncate(fd_, 0) != 0) {
    throw_errno("cannot truncate", path_);
  }
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

results_lock::results_lock(const std::string& path) : lock_path_(path + ".lock") {
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
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) < 0) {
    // The lock holds without the pid; a second run's message just cannot name us.
  }
}

results_lock::~results_lock() {
  if (fd_ >= 0) {
    ::unlink(lock_path_.c_str());  // while still holding the lock: see the constructor
    ::close(fd_);
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
  std::vector<std::string> kept;
  bool rewrite = false;
  std::string text;
  std::size_t number = 0;
  int c = 0;
  for (;;) {
    text.clear();
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
    const bool fresh = rec->about_line() ? st.done_lines.insert(rec->line).second
                                         : st.done_keys.insert(rec->key).second;
    if (!fresh) {
      ++st.dropped_duplicates;
      rewrite = true;
      continue;
    }
    kept.push_back(text);
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
  const std::string tmp = path + ".keel-tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw_errno("cannot create", tmp);
  }
  std::string out;
  for (const auto& k : kept) {
    out += k;
    out += '\n';
  }
  const char* p = out.data();
  std::size_t left = out.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      ::close(fd);
      ::unlink(tmp.c_str());
      throw_errno("cannot write", tmp);
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw_errno("cannot sync", tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw_errno("cannot replace", path);
  }
  return st;
}

}  // namespace keel::cli
