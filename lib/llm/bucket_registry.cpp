// The resources clients share: rate-limit buckets with their controllers, and HTTP transports
// per CA file (declared in keel/llm/client.hpp).
#include <keel/llm/client.hpp>

#include <random>

namespace keel::llm {
namespace asio = boost::asio;

// ---- bucket_registry ---------------------------------------------------------------------------

bucket_registry::bucket_registry(asio::any_io_executor ex, std::uint64_t seed)
    : ex_(std::move(ex)), random_(seed != 0 ? seed : std::random_device{}()) {}

keel::throttler& bucket_registry::get(const entry_config& e, bool adaptive) {
  const std::string secret = e.api_key.empty() && e.aws ? e.aws->access_key : e.api_key;
  // The key is identified by a hash: the map key is printable without leaking it.
  const std::string key = std::string(keel::llm::to_string(e.api_type)) + "|" + e.base_url + "|" +
                          e.model + "|" + std::to_string(std::hash<std::string>{}(secret));
  auto it = buckets_.find(key);
  if (it == buckets_.end()) {
    keel::throttler_options o;
    o.requests_per_second = e.rate_limits.requests_per_minute / 60.0;
    // Without a configured burst: one second's worth for a plain bucket; 50 ms' worth under a
    // controller, whose first burst must not exceed what the server lets through at once (a
    // second's worth against nginx's burst=20 drew 64 429s at the start and a 1.8x slower run).
    const double default_burst = adaptive ? o.requests_per_second / 20 : o.requests_per_second;
    o.burst = e.rate_limits.burst > 0 ? e.rate_limits.burst : std::max(1.0, default_burst);
    o.tokens_per_minute = e.rate_limits.tokens_per_minute;
    entry b;
    b.name = e.name();
    b.bucket = std::make_unique<keel::throttler>(ex_, o);
    if (adaptive) {
      keel::rate_controller_options po;
      po.max_requests_per_second = o.requests_per_second;
      po.max_tokens_per_minute = o.tokens_per_minute;
      po.random = &random_;
      if (on_pacing) {
        po.on_change = [this, name = b.name](const keel::pacing_state& r,
                                             const keel::pacing_state& t) {
          on_pacing(name, r, t);
        };
      }
      b.pacing = std::make_unique<keel::rate_controller>(*b.bucket, std::move(po));
    }
    it = buckets_.emplace(key, std::move(b)).first;
  }
  return *it->second.bucket;
}

keel::rate_controller* bucket_registry::pacing(const keel::throttler& bucket) const {
  for (const auto& [k, v] : buckets_) {
    if (v.bucket.get() == &bucket) {
      return v.pacing.get();
    }
  }
  return nullptr;
}

std::vector<std::pair<std::string, keel::throttler*>> bucket_registry::all() const {
  std::vector<std::pair<std::string, keel::throttler*>> out;
  for (const auto& [k, v] : buckets_) {
    out.emplace_back(v.name, v.bucket.get());
  }
  return out;
}

http_clients::http_clients(asio::any_io_executor ex, keel::http::client_options base)
    : ex_(std::move(ex)), base_(std::move(base)) {}

keel::http::client& http_clients::get(const std::string& ca_file) {
  auto it = clients_.find(ca_file);
  if (it == clients_.end()) {
    keel::http::client_options o = base_;
    if (!ca_file.empty()) {
      o.tls.ca_file = ca_file;
    }
    try {
      it = clients_.emplace(ca_file, std::make_unique<keel::http::client>(ex_, o)).first;
    } catch (const boost::system::system_error& e) {
      throw std::runtime_error("cannot load the CA file \"" + ca_file +
                               "\" (PEM certificates expected): " + e.code().message());
    }
  }
  return *it->second;
}

}  // namespace keel::llm
