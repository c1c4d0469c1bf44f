// Shared by the memory benchmarks: the process's resident set.
#pragma once

#include <unistd.h>

#include <fstream>

namespace keel_bench {

/// The resident set of this process, in bytes (/proc/self/statm).
inline long resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  long size = 0;
  long resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

}  // namespace keel_bench
