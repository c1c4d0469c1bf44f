// `policy.shared` in the keel command: keel::redis::fleet when this keel has Redis support.
#pragma once

#include <keel/llm/client.hpp>
#include <keel/llm/config.hpp>

#include <boost/asio/any_io_executor.hpp>

#include <memory>

namespace keel::cli {

/// The fleet state `cfg.policy.shared` asks for (keel/redis/fleet.hpp), or null when it names
/// no Redis. Close it when the batch ends (its Redis connection would keep the run going).
/// @throws llm::config_error if this keel was built without Redis support, or the URL or CA file
///   is bad.
std::unique_ptr<llm::fleet_pacing> make_fleet_pacing(boost::asio::any_io_executor ex,
                                                     const llm::client_config& cfg);

}  // namespace keel::cli
