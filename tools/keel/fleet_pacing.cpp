// `policy.shared` in the keel command (fleet_pacing.hpp).
#include "fleet_pacing.hpp"

#if KEEL_HAS_REDIS
#include <keel/redis/fleet.hpp>
#endif

namespace keel::cli {

std::unique_ptr<llm::fleet_pacing> make_fleet_pacing(boost::asio::any_io_executor ex,
                                                     const llm::client_config& cfg) {
  if (cfg.policy.shared.redis.empty()) {
    return nullptr;
  }
#if KEEL_HAS_REDIS
  return std::make_unique<keel::redis::fleet>(ex, cfg);
#else
  (void)ex;
  throw llm::config_error(cfg.source, "/policy/shared/redis",
                          "this keel was built without Redis support (install libhiredis-dev and "
                          "rebuild)");
#endif
}

}  // namespace keel::cli
