// The deciding kind, status and record of a failed call (keel::llm::error_class and friends).
#include <keel/llm/error.hpp>

#include <keel/classify.hpp>
#include <keel/http/error.hpp>

namespace keel::llm {

namespace {

std::string class_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const keel::llm::provider_error& pe) {
    return std::string(keel::llm::to_string(pe.llm_code()));
  } catch (const boost::system::system_error& se) {
    const auto& ec = se.code();
    if (ec.category() == keel::http::error_category()) {
      // All permanent (keel::http's table): named so that a record says what to fix.
      switch (static_cast<keel::http::error>(ec.value())) {
        case keel::http::error::tls_verification_failed:
        case keel::http::error::tls_error:
          return "tls";
        case keel::http::error::body_too_large:
        case keel::http::error::header_too_large:
        case keel::http::error::too_many_headers:
          return "response_too_large";
        case keel::http::error::bad_url:
          return "bad_url";
        case keel::http::error::bad_header:
          return "bad_header";
        default:
          break;  // timeouts and closed connections: by condition below
      }
    }
    if (ec.category() == keel::error_category()) {
      return std::string(keel::to_string(static_cast<keel::error>(ec.value())));
    }
    switch (keel::condition_of(ec)) {
      case keel::condition::cancelled:
        return "cancelled";
      case keel::condition::timeout:
        return "timeout";
      case keel::condition::transient:
        return "connection";
      case keel::condition::throttled:
        return "throttled";
      case keel::condition::permanent:
        break;
    }
  } catch (...) {
  }
  return "error";
}

}  // namespace

std::string error_class(const std::exception_ptr& e) {
  return e ? class_of(keel::root_cause(e)) : "ok";
}

int error_status(const std::exception_ptr& e) {
  if (!e) {
    return 0;
  }
  try {
    std::rethrow_exception(keel::root_cause(e));
  } catch (const keel::llm::provider_error& pe) {
    return pe.status();
  } catch (...) {
  }
  return 0;
}

nlohmann::json error_json(const std::exception_ptr& e) {
  nlohmann::json j = nlohmann::json::object();
  if (!e) {
    return j;
  }
  const keel::decided_by decided = keel::deciding_cause(e);
  const std::exception_ptr& d = decided.error;
  j["class"] = class_of(d);
  const keel::condition c = keel::classify(d).condition;
  const std::string_view condition = keel::to_string(c);  // "unknown": classify found none
  j["condition"] = condition == "unknown" ? "permanent" : condition;
  try {
    std::rethrow_exception(d);
  } catch (const keel::llm::provider_error& pe) {
    j["status"] = pe.status();
    j["provider"] = pe.provider();
    if (!pe.provider_code().empty()) {
      j["code"] = pe.provider_code();
    }
    j["message"] = pe.message();
    if (!pe.request_id().empty()) {
      j["request_id"] = pe.request_id();
    }
  } catch (...) {
    j["message"] = keel::llm::redact(keel::describe(d));
  }
  if (decided.gave_up) {
    j["gave_up"] = keel::to_string(*decided.gave_up);
  }
  return j;
}

}  // namespace keel::llm
