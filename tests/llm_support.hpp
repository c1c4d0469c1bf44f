// Shared helpers for the provider tests: canned HTTP replies and "expect a provider_error".
#pragma once

#include <keel/http/message.hpp>
#include <keel/llm/error.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <stdexcept>
#include <string>
#include <utility>

namespace keel_test::llm {

/// A fixed wall-clock instant for hint parsing (Fri, 06 Nov 1994 08:49:37 GMT).
inline const auto t0 = std::chrono::system_clock::time_point(
    std::chrono::duration_cast<std::chrono::system_clock::duration>(
        std::chrono::seconds(784111777)));

/// A response with a status, a body and headers.
inline keel::http::response reply(int status, std::string body, keel::http::header_list h = {}) {
  keel::http::response r;
  r.status = status;
  r.headers = std::move(h);
  r.body = std::move(body);
  return r;
}

/// Runs `parse(r, t0, keep_raw)` expecting a provider_error; returns it (or fails the test).
template <class Parse>
keel::llm::provider_error error_of(Parse parse, const keel::http::response& r,
                                   bool keep_raw = true) {
  try {
    parse(r, t0, keep_raw);
  } catch (const keel::llm::provider_error& e) {
    return e;
  }
  FAIL("parse_response did not throw");
  throw std::logic_error("unreachable");
}

}  // namespace keel_test::llm
