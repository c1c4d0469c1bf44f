// The per-thread default random source.
#include <keel/random.hpp>

#include <random>

namespace keel {

random_source& random_source::thread_default() {
  thread_local random_source source{[] {
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  }()};
  return source;
}

}  // namespace keel
