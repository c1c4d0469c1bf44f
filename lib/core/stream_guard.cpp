// The commit point's outcome and the timeouts' messages (declared in keel/stream_guard.hpp).
#include <keel/classify.hpp>
#include <keel/stream_guard.hpp>

#include <cstdio>

namespace keel {

namespace detail {
std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g s", s);
  return buf;
}
}  // namespace detail

std::exception_ptr stream_commit::outcome(std::exception_ptr error, int attempts,
                                          std::string_view why) const {
  if (!error || !committed_ || consumer_failed_ ||
      classify(error).condition == condition::cancelled) {
    return error;
  }
  // Past the commit point: the caller has part of a reply that could not be finished.
  std::string what = "stream interrupted after " + std::to_string(bytes_) + " bytes in " +
                     std::to_string(deltas_) + " deltas";
  if (!why.empty()) {
    what += " (";
    what += why;
    what += ")";
  }
  failure f(make_error_code(error::stream_interrupted), what, {std::move(error)});
  f.set_attempts(attempts);
  return std::make_exception_ptr(std::move(f));
}

}  // namespace keel
