// Tests for the keel command's traces (tools/keel/tracing.hpp): the OTLP header variable, and a
// trace sink writing to a file and flushing at the end of a run.
#include "tracing.hpp"

#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

TEST_CASE("OTEL_EXPORTER_OTLP_HEADERS is read as name=value pairs, percent-decoded",
          "[cli_tracing]") {
  const auto h =
      keel::cli::parse_otlp_headers(" api-key = abc%3D%3D , x-team=a%20b,,", "OTEL_HEADERS");
  REQUIRE(h.size() == 2);
  CHECK(h[0] == std::pair<std::string, std::string>{"api-key", "abc=="});
  CHECK(h[1] == std::pair<std::string, std::string>{"x-team", "a b"});
  CHECK(keel::cli::parse_otlp_headers("", "V").empty());
  // A malformed entry names the variable and the entry, never the value.
  try {
    keel::cli::parse_otlp_headers("a=1,secret-token-value", "OTEL_HEADERS");
    FAIL("parsed");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    CHECK(what.find("OTEL_HEADERS") != std::string::npos);
    CHECK(what.find("header 2") != std::string::npos);
    CHECK(what.find("secret-token") == std::string::npos);
  }
}

TEST_CASE("a trace sink writes OTLP/JSON lines to --trace FILE and flushes at the end",
          "[cli_tracing]") {
  const auto file = std::filesystem::temp_directory_path() /
                    ("keel_cli_tracing_" + std::to_string(::getpid()) + ".jsonl");
  std::filesystem::remove(file);  // the sink appends
  keel::cli::logger log(keel::cli::log_level::off);
  boost::asio::io_context ctx;
  keel::llm::trace_config cfg;
  cfg.service_name = "svc";
  {
    keel::cli::trace_sink off(ctx.get_executor(), cfg, "", log, keel::llm::process_env());
    CHECK(off.tracer() == nullptr);  // no file, no endpoint: no tracing
  }
  {
    keel::cli::trace_sink sink(ctx.get_executor(), cfg, file.string(), log,
                               keel::llm::process_env());
    REQUIRE(sink.tracer() != nullptr);
    for (int i = 0; i < 3; ++i) {
      sink.tracer()->start("s" + std::to_string(i), keel::trace::span_kind::internal).end();
    }
    CHECK(std::filesystem::file_size(file) == 0);  // queued, not yet exported
    sink.finish(ctx);
    CHECK(sink.tracer()->stats().exported == 3);
  }
  std::ifstream in(file);
  std::string line;
  REQUIRE(std::getline(in, line));
  const auto j = nlohmann::json::parse(line);
  CHECK(j["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"] == "svc");
  CHECK(j["resourceSpans"][0]["scopeSpans"][0]["spans"].size() == 3);
  CHECK_FALSE(std::getline(in, line));
  std::filesystem::remove(file);

  // An unwritable file fails at start, naming it.
  CHECK_THROWS_WITH(keel::cli::trace_sink(ctx.get_executor(), cfg, "/nonexistent-dir/t.jsonl", log,
                                          keel::llm::process_env()),
                    Catch::Contains("/nonexistent-dir/t.jsonl"));
}
