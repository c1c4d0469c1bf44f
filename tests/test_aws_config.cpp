// Tests for keel/aws/config.hpp: retry mode and max attempts precedence and validation.
#include <keel/aws/config.hpp>

#include <catch2/catch.hpp>

#include <cstdlib>
#include <string>

using keel::aws::resolve_retry_config;
using keel::aws::retry_config_input;
using keel::aws::retry_mode;
using std::nullopt;

namespace {

std::string error_of(const retry_config_input& client, std::optional<std::string> env_mode,
                     std::optional<std::string> env_max, std::optional<std::string> prof_mode,
                     std::optional<std::string> prof_max) {
  try {
    resolve_retry_config(client, env_mode, env_max, prof_mode, prof_max);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("with nothing configured the mode is legacy with 5 attempts", "[aws]") {
  auto cfg = resolve_retry_config({}, nullopt, nullopt, nullopt, nullopt);
  CHECK(cfg.mode == retry_mode::legacy);
  CHECK(cfg.total_max_attempts == 5);
}

TEST_CASE("standard and adaptive default to 3 attempts", "[aws]") {
  CHECK(resolve_retry_config({}, "standard", nullopt, nullopt, nullopt).total_max_attempts == 3);
  auto cfg = resolve_retry_config({}, nullopt, nullopt, "adaptive", nullopt);
  CHECK(cfg.mode == retry_mode::adaptive);
  CHECK(cfg.total_max_attempts == 3);
}

TEST_CASE("the mode comes from the client, then the env, then the profile", "[aws]") {
  retry_config_input client;
  client.mode = "adaptive";
  CHECK(resolve_retry_config(client, "standard", nullopt, "legacy", nullopt).mode ==
        retry_mode::adaptive);
  CHECK(resolve_retry_config({}, "standard", nullopt, "adaptive", nullopt).mode ==
        retry_mode::standard);
  CHECK(resolve_retry_config({}, nullopt, nullopt, "standard", nullopt).mode ==
        retry_mode::standard);
}

TEST_CASE("total_max_attempts wins over max_attempts, which counts retries", "[aws]") {
  retry_config_input client;
  client.max_attempts = 4;
  CHECK(resolve_retry_config(client, nullopt, "9", nullopt, "8").total_max_attempts == 5);
  client.total_max_attempts = 2;
  CHECK(resolve_retry_config(client, nullopt, "9", nullopt, "8").total_max_attempts == 2);
  retry_config_input zero_retries;
  zero_retries.max_attempts = 0;
  CHECK(resolve_retry_config(zero_retries, nullopt, nullopt, nullopt, nullopt).total_max_attempts ==
        1);
}

TEST_CASE("AWS_MAX_ATTEMPTS is already a total and beats the profile", "[aws]") {
  CHECK(resolve_retry_config({}, "standard", "7", nullopt, "2").total_max_attempts == 7);
  CHECK(resolve_retry_config({}, "standard", nullopt, nullopt, "2").total_max_attempts == 2);
  // Legacy takes a configured total as is, overriding its default of 5.
  CHECK(resolve_retry_config({}, nullopt, "1", nullopt, nullopt).total_max_attempts == 1);
  CHECK(resolve_retry_config({}, nullopt, " 4 ", nullopt, nullopt).total_max_attempts == 4);
}

TEST_CASE("invalid retry settings are rejected with the setting and the value named", "[aws]") {
  retry_config_input bad_mode;
  bad_mode.mode = "Standard";
  auto msg = error_of(bad_mode, nullopt, nullopt, nullopt, nullopt);
  CHECK(msg.find("retries.mode") != std::string::npos);
  CHECK(msg.find("'Standard'") != std::string::npos);

  msg = error_of({}, "turbo", nullopt, nullopt, nullopt);
  CHECK(msg.find("AWS_RETRY_MODE") != std::string::npos);
  CHECK(msg.find("'turbo'") != std::string::npos);

  msg = error_of({}, nullopt, "0", nullopt, nullopt);
  CHECK(msg.find("AWS_MAX_ATTEMPTS") != std::string::npos);
  CHECK(msg.find("0") != std::string::npos);

  msg = error_of({}, nullopt, "three", nullopt, nullopt);
  CHECK(msg.find("AWS_MAX_ATTEMPTS") != std::string::npos);
  CHECK(msg.find("'three'") != std::string::npos);
  CHECK_FALSE(error_of({}, nullopt, "", nullopt, nullopt).empty());
  CHECK_FALSE(error_of({}, nullopt, "2.5", nullopt, nullopt).empty());

  msg = error_of({}, nullopt, nullopt, nullopt, "x1");
  CHECK(msg.find("profile max_attempts") != std::string::npos);

  retry_config_input negative;
  negative.max_attempts = -1;
  msg = error_of(negative, nullopt, nullopt, nullopt, nullopt);
  CHECK(msg.find("retries.max_attempts") != std::string::npos);
  CHECK(msg.find("-1") != std::string::npos);

  retry_config_input zero_total;
  zero_total.total_max_attempts = 0;
  msg = error_of(zero_total, nullopt, nullopt, nullopt, nullopt);
  CHECK(msg.find("retries.total_max_attempts") != std::string::npos);
}

TEST_CASE("only the winning source is validated", "[aws]") {
  retry_config_input client;
  client.mode = "standard";
  client.total_max_attempts = 4;
  auto cfg = resolve_retry_config(client, "bogus", "bogus", "bogus", "bogus");
  CHECK(cfg.mode == retry_mode::standard);
  CHECK(cfg.total_max_attempts == 4);
}

TEST_CASE("read_retry_env reads AWS_RETRY_MODE and AWS_MAX_ATTEMPTS", "[aws]") {
  ::setenv("AWS_RETRY_MODE", "adaptive", 1);
  ::setenv("AWS_MAX_ATTEMPTS", "6", 1);
  auto env = keel::aws::read_retry_env();
  ::unsetenv("AWS_RETRY_MODE");
  ::unsetenv("AWS_MAX_ATTEMPTS");
  CHECK(env.mode == "adaptive");
  CHECK(env.max_attempts == "6");
  auto cfg = resolve_retry_config({}, env.mode, env.max_attempts, nullopt, nullopt);
  CHECK(cfg.mode == retry_mode::adaptive);
  CHECK(cfg.total_max_attempts == 6);
  auto unset = keel::aws::read_retry_env();
  CHECK_FALSE(unset.mode);
  CHECK_FALSE(unset.max_attempts);
}

TEST_CASE("AWS_NEW_RETRIES_2026=true selects 2.1 and makes standard the default mode", "[aws]") {
  using keel::aws::retry_revision;
  const auto on = resolve_retry_config({}, nullopt, nullopt, nullopt, nullopt, "true");
  CHECK(on.revision == retry_revision::v2_1);
  CHECK(on.mode == retry_mode::standard);
  CHECK(on.total_max_attempts == 3);
  // Only the default link changes: an explicit mode (client, env, profile) still wins.
  retry_config_input legacy;
  legacy.mode = "legacy";
  const auto client = resolve_retry_config(legacy, nullopt, nullopt, nullopt, nullopt, "true");
  CHECK(client.mode == retry_mode::legacy);
  CHECK(client.total_max_attempts == 5);
  CHECK(client.revision == retry_revision::v2_1);
  CHECK(resolve_retry_config({}, "adaptive", nullopt, nullopt, nullopt, "true").mode ==
        retry_mode::adaptive);
  CHECK(resolve_retry_config({}, nullopt, nullopt, "legacy", nullopt, "true").mode ==
        retry_mode::legacy);
  // Exactly "true", as the Go and PHP SDKs test it; anything else leaves 2.0 and legacy.
  for (const char* off : {"false", "TRUE", "1", "yes", ""}) {
    INFO(off);
    const auto cfg = resolve_retry_config({}, nullopt, nullopt, nullopt, nullopt, off);
    CHECK(cfg.revision == retry_revision::v2_0);
    CHECK(cfg.mode == retry_mode::legacy);
  }
  CHECK(resolve_retry_config({}, nullopt, nullopt, nullopt, nullopt).revision ==
        retry_revision::v2_0);
}

TEST_CASE("read_retry_env reads AWS_NEW_RETRIES_2026", "[aws]") {
  ::setenv("AWS_NEW_RETRIES_2026", "true", 1);
  auto env = keel::aws::read_retry_env();
  ::unsetenv("AWS_NEW_RETRIES_2026");
  CHECK(env.new_retries_2026 == "true");
  CHECK(resolve_retry_config({}, env.mode, env.max_attempts, nullopt, nullopt, env.new_retries_2026)
            .revision == keel::aws::retry_revision::v2_1);
  CHECK_FALSE(keel::aws::read_retry_env().new_retries_2026);
}
