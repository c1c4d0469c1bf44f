// The keel command line: `keel batch`, `keel demo`, `keel mock`, `keel config check`.
#include <keel/llm/config.hpp>
#include "batch.hpp"
#include "bench.hpp"
#include "demo.hpp"
#include "log.hpp"
#include "serve.hpp"
#include "shard.hpp"

#include <keel/testing/mock_llm_server.hpp>

#include <CLI/CLI.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>

#include <unistd.h>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>

namespace {

using namespace keel::cli;
namespace llm = keel::llm;

// Shell-quotes one argument for the printed resume command.
std::string quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                        "0123456789-_./=:,@") == std::string::npos) {
    return s;
  }
  std::string out = "'";
  for (char c : s) {
    out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  }
  return out + "'";
}

std::string resume_command(int argc, char** argv) {
  std::string cmd;
  bool has_resume = false;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--overwrite") {
      continue;  // resuming must not wipe what was done
    }
    has_resume = has_resume || a == "--resume";
    cmd += (cmd.empty() ? "" : " ") + quote(a);
  }
  return has_resume ? cmd : cmd + " --resume";
}

struct common_flags {
  std::string log_level = "warning";
  std::string log_format = "text";
  std::string progress = "auto";
  bool quiet = false;
  double progress_interval = 5;
  std::string summary_json;
  std::optional<unsigned short> metrics_port;
  std::optional<int> concurrency;
  double grace = 10;
  std::optional<std::uint64_t> seed;  // none: draw one per process
  bool fsync = false;
};

void add_common(CLI::App* app, common_flags& f) {
  app->add_option("--concurrency,-c", f.concurrency,
                  "Items in flight (default: policy.concurrency)")
      ->check(CLI::Range(1, 100000));
  app->add_option("--log-level", f.log_level, "debug, info, warning (retries), error or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"debug", "info", "warning", "warn", "error", "off"}));
  app->add_option("--log-format", f.log_format, "text or json (one object per line)")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));
  app->add_option("--progress", f.progress,
                  "auto (bar on a terminal, else lines), bar, lines or none")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "bar", "lines", "none"}));
  app->add_flag("--quiet,-q", f.quiet, "No progress and no log lines below error");
  app->add_option("--progress-interval", f.progress_interval, "Seconds between progress lines")
      ->capture_default_str()
      ->check(CLI::Range(0.001, 86400.0).description("a number of seconds in [0.001, 86400]"));
  app->add_option("--summary-json", f.summary_json, "Also write the summary as JSON to this file");
  app->add_option("--metrics-port", f.metrics_port,
                  "Serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port)");
  app->add_option("--grace", f.grace, "Seconds in-flight items get to finish after SIGINT/SIGTERM")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 86400.0).description("a number of seconds in [0, 86400]"));
  app->add_option("--seed", f.seed,
                  "Seed of the retry jitter (and of the mock when its scenario names none); "
                  "default: drawn at random per run and shown in the summary, so that processes "
                  "do not jitter alike and a run can be repeated with --seed");
  app->add_flag("--fsync", f.fsync, "fdatasync the results file after every record");
}

logger make_logger(const common_flags& f) {
  log_level level = parse_log_level(f.log_level).value_or(log_level::warning);
  if (f.quiet && level < log_level::error) {
    level = log_level::error;
  }
  return logger(level, f.log_format == "json" ? log_format::json : log_format::text, stderr);
}

batch_options make_batch_options(const common_flags& f) {
  batch_options o;
  o.concurrency = f.concurrency;
  o.grace = f.grace;
  o.progress_interval = f.progress_interval;
  o.summary_json = f.summary_json;
  o.metrics_port = f.metrics_port;
  // A fixed default seed would give every run, and every process of a fleet, the same jitter:
  // retries that collide once collide again. Draw one unless asked; the summary names it.
  o.seed = f.seed ? *f.seed : random_seed();
  o.seed_is_random = !f.seed;
  o.fsync = f.fsync;
  if (f.quiet || f.progress == "none") {
    o.progress = progress_mode::quiet;
  } else if (f.progress == "bar" || (f.progress == "auto" && ::isatty(STDERR_FILENO))) {
    o.progress = progress_mode::bar;
  } else {
    o.progress = progress_mode::lines;
  }
  return o;
}

int run_mock(const std::string& address, unsigned short port, const std::string& scenario_file,
             std::uint64_t seed) {
  boost::asio::io_context ctx;
  keel::testing::mock_options mo;
  mo.address = address;
  mo.port = port;
  mo.seed = seed;
  keel::testing::mock_llm_server server(ctx, mo);
  if (!scenario_file.empty()) {
    server.set_scenario(keel::testing::load_scenario(scenario_file));
  }
  try {
    server.start();
  } catch (const boost::system::system_error& e) {
    // e.what() would add Asio's source location; the address and the reason are what helps.
    throw std::runtime_error("mock server: cannot listen on " + address + ":" +
                             std::to_string(port) + ": " + e.code().message());
  }
  std::printf(
      "keel mock: listening on %s (OpenAI /v1/chat/completions, Anthropic /v1/messages, "
      "Bedrock /model/{id}/converse and /converse-stream; streams on request); Ctrl-C to stop\n",
      server.base_url().c_str());
  std::fflush(stdout);
  boost::asio::signal_set signals(ctx, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code&, int) {
    server.stop();
    ctx.stop();
  });
  ctx.run();
  const auto s = server.stats();
  std::printf("keel mock: stopped after %llu requests (%llu answered 200)\n",
              static_cast<unsigned long long>(s.total.requests),
              static_cast<unsigned long long>(s.status_count(200)));
  return 0;
}

// `keel check`: prints what check_results found; 0 if complete, 1 if not.
int run_check(const std::string& in, const std::vector<std::string>& results,
              const std::string& merge_to) {
  const check_report r = check_results(in, results, merge_to);
  for (const std::string& p : r.problems) {
    std::cerr << "keel check: " << p << "\n";
  }
  const std::size_t shown = r.problems.size();
  const std::size_t total = r.missing + r.duplicated + r.unexpected + r.unreadable;
  if (total > shown) {
    std::cerr << "keel check: ... and " << (total - shown) << " more\n";
  }
  std::cout << in << ": " << r.lines << " input lines, " << r.records << " final records in "
            << results.size() << " file" << (results.size() == 1 ? "" : "s") << "; missing "
            << r.missing << " (cancelled " << r.cancelled << "), duplicated " << r.duplicated
            << ", unexpected " << r.unexpected << ", unreadable " << r.unreadable << ": "
            << (r.complete() ? "complete" : "INCOMPLETE") << "\n";
  return r.complete() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  // A closed stderr or stdout (`keel batch ... 2>&1 | head`) must not end a batch silently: with
  // SIGPIPE ignored a write there fails with EPIPE, which logging and progress ignore, and which
  // the results writer reports (results to a closed stdout cannot be written: exit status 2).
  std::signal(SIGPIPE, SIG_IGN);
  // Likewise a file size limit (`ulimit -f`): the write fails with EFBIG, which the results
  // writer reports and cuts back (exit status 2), instead of a signal killing the run with a
  // torn record and no summary.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"keel: resilient LLM batch calls (retries, fallbacks, breakers, rate limits)",
               "keel"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "keel 0.1.0");

  // ---- batch ----
  auto* batch = app.add_subcommand("batch",
                                   "Run a JSONL file of prompts through a configured "
                                   "policy, one result record per input line");
  common_flags bf;
  std::string config_file, in_file, out_file, mock_scenario;
  bool resume = false, overwrite = false, print_config = false, stream = false;
  batch->add_option("--config", config_file, "Config file (AG2 config_list + policy)");
  batch->add_option("--in,-i", in_file, "Input JSONL ('-': stdin)");
  batch->add_option("--out,-o", out_file, "Results JSONL, appended ('-': stdout)");
  batch->add_flag("--resume", resume, "Skip items already in --out (and redo cancelled ones)");
  batch->add_flag("--overwrite", overwrite, "Replace an existing --out");
  batch->add_flag("--stream", stream,
                  "Stream each reply and record its time to first token (ttft_ms; the summary "
                  "gives its p50/p90/p99)");
  batch->add_flag("--print-config", print_config,
                  "Print the resolved config (secrets redacted) and exit");
  batch->add_option("--mock", mock_scenario,
                    "Run against an in-process mock server: 'demo' or a scenario file; every "
                    "entry's base_url is pointed at it");
  std::string shard_text;
  batch->add_option("--shard", shard_text,
                    "Run only part I of N of the input (I/N, 0-based), chosen by id, so that N "
                    "runs with their own --out split one file; `keel check` verifies them");
  std::string batch_trace;
  batch->add_option("--trace", batch_trace,
                    "Write a span per item, call and attempt to this file (OTLP/JSON, one export "
                    "request per line; docs/tracing.md), besides the config's trace.otlp_endpoint");
  std::string ca_file;
  batch->add_option("--ca-file", ca_file,
                    "PEM file of CA certificates to trust (besides the system store) for every "
                    "entry without its own ca_file");
  add_common(batch, bf);

  // ---- demo ----
  auto* demo = app.add_subcommand(
      "demo", "Run a generated batch against the in-process mock with a realistic fault mix");
  common_flags df;
  df.log_level = "error";
  df.concurrency = 64;
  demo_options dopts;
  demo->add_option("--prompts,-n", dopts.prompts, "How many prompts")
      ->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  demo->add_option("--out,-o", dopts.out, "Results file (default: a temporary file)");
  demo->add_flag("--overwrite", dopts.overwrite, "Replace the results --out already holds");
  demo->add_option("--scenario", dopts.scenario, "Mock scenario file instead of the built-in one");
  demo->add_option("--config", dopts.config, "Config file instead of the built-in one");
  add_common(demo, df);

  // ---- mock ----
  auto* mock = app.add_subcommand("mock", "Run the fault-injecting mock LLM server");
  std::string mock_address = "127.0.0.1", mock_file;
  unsigned short mock_port = 8080;
  std::uint64_t mock_seed = 0;
  mock->add_option("--port,-p", mock_port, "Port (0: any free port)")->capture_default_str();
  mock->add_option("--address", mock_address, "Address to bind")->capture_default_str();
  mock->add_option("--scenario", mock_file, "Scenario file (docs/mock_llm_server.md)");
  mock->add_option("--seed", mock_seed, "Seed of the fault generators");

  // ---- serve ----
  auto* serve = app.add_subcommand(
      "serve",
      "Serve a config as an OpenAI-compatible API (POST /v1/chat/completions): point any "
      "OpenAI SDK's base_url at it and its calls get the config's policy");
  std::vector<std::string> serve_configs;
  keel::cli::serve_options serve_opts;
  common_flags sf;
  serve
      ->add_option("--config", serve_configs,
                   "Config file (AG2 config_list + policy + serve); repeat it to serve several "
                   "models, one route per config named by its first entry's model")
      ->required();
  serve->add_option("--listen", serve_opts.listen, "ADDR:PORT to listen on (port 0: any free)")
      ->capture_default_str();
  serve
      ->add_option("--grace", serve_opts.grace,
                   "Seconds calls in flight may finish after SIGINT/SIGTERM (a second signal "
                   "stops at once)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 86400.0));
  serve->add_option("--trace", serve_opts.trace_file,
                    "Write a span per request, call and attempt to this file (OTLP/JSON lines; "
                    "docs/tracing.md), besides the config's trace.otlp_endpoint");
  serve->add_option("--log-level", sf.log_level, "debug, info, warning, error or off")
      ->capture_default_str()
      ->check(CLI::IsMember({"debug", "info", "warning", "warn", "error", "off"}));
  serve->add_option("--log-format", sf.log_format, "text or json")
      ->capture_default_str()
      ->check(CLI::IsMember({"text", "json"}));

  // ---- bench ----
  auto* bench = app.add_subcommand(
      "bench",
      "Scenario benchmark: retry policies x fault mixes x concurrency against the in-process "
      "mock (or --url); prints a table, writes results.json, table.md and SVG plots");
  bench_options bench_opts;
  std::size_t bench_prompts = 0;
  bool bench_no_fork = false;
  bench->add_flag("--quick", bench_opts.quick, "A small matrix (about half a minute)");
  bench->add_option("--out-dir", bench_opts.out_dir, "Directory for results.json, table.md, SVGs")
      ->capture_default_str();
  bench->add_option("--url", bench_opts.url,
                    "Benchmark this endpoint instead of the mock (key: $KEEL_BENCH_API_KEY)");
  bench->add_option("--api-type", bench_opts.api_type, "Wire format of --url")
      ->capture_default_str()
      ->check(CLI::IsMember({"openai", "anthropic"}));
  bench->add_option("--model", bench_opts.model, "Model sent to --url");
  bench->add_option("--prompts,-n", bench_prompts, "Prompts per run (default 2000; --quick 200)")
      ->check(CLI::Range(1, 10000000));
  bench
      ->add_option("--concurrency,-c", bench_opts.concurrency,
                   "Comma-separated concurrency levels (replaces the default matrix)")
      ->delimiter(',')
      ->check(CLI::Range(1, 100000));
  bench
      ->add_option("--faults", bench_opts.faults,
                   "Comma-separated fault mixes: clean, rate_limited, flaky, outage, slow, "
                   "limited, limited_no_retry_after, limit_change, token_limited, mixed")
      ->delimiter(',')
      ->check(CLI::IsMember(keel::cli::bench_faults()));
  bench
      ->add_option("--policies", bench_opts.policies,
                   "Comma-separated policies: none, naive, exponential, full_jitter, keel, "
                   "newcomer, keel_limit, aws_adaptive")
      ->delimiter(',')
      ->check(CLI::IsMember(keel::cli::bench_policies()));
  bench
      ->add_option("--rate", bench_opts.rates,
                   "Comma-separated server limits R (requests/s) of the limited mixes (default "
                   "200; each run sends 10*R prompts unless --prompts)")
      ->delimiter(',')
      ->check(CLI::Range(0.001, 1000000.0));
  bench
      ->add_option("--seed", bench_opts.seed,
                   "Seed of the mock's faults and the jitter (fixed by default, unlike batch and "
                   "demo: a benchmark must repeat)")
      ->capture_default_str();
  bench->add_flag("--no-fork", bench_no_fork,
                  "Run every scenario in this process (peak RSS is then cumulative)");

  // ---- config check ----
  auto* cfg_cmd = app.add_subcommand("config", "Inspect configuration");
  cfg_cmd->require_subcommand(1);
  auto* check = cfg_cmd->add_subcommand("check",
                                        "Validate a config and print it resolved "
                                        "(secrets redacted)");
  std::string check_file;
  check->add_option("file", check_file, "Config file")->required();

  // ---- check ----
  auto* results_check = app.add_subcommand(
      "check",
      "Check that results files hold exactly one final record per input line (e.g. the shards "
      "of one input); exit status 0 if so, 1 if not");
  std::string check_in, merge_out;
  std::vector<std::string> check_results_files;
  results_check->add_option("--in,-i", check_in, "The input JSONL the results are for")->required();
  results_check->add_option("results", check_results_files, "Results files")->required();
  results_check->add_option("--merge", merge_out,
                            "Also write every final record, in input order, to this file");

  // CLI11 answers an unknown first word with "A subcommand is required", which does not say what
  // was wrong.
  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    std::string names;
    for (const auto* sub : app.get_subcommands([](CLI::App*) { return true; })) {
      known = known || sub->get_name() == argv[1];
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      std::cerr << "keel: unknown command '" << argv[1] << "'; the commands are " << names
                << " (keel --help)\n";
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11 prints the message (or the help); its own exit codes (104-114) are not keel's: every
    // usage error is status 2, as documented.
    return app.exit(e) == 0 ? 0 : 2;
  }

  try {
    if (*check) {
      const llm::client_config c = llm::load_config(check_file, llm::process_env());
      std::cout << to_json(c, true).dump(2) << "\n";
      std::cerr << "keel: " << check_file << " is valid (" << c.entries.size() << " entr"
                << (c.entries.size() == 1 ? "y" : "ies") << ")\n";
      return 0;
    }
    if (*mock) {
      return run_mock(mock_address, mock_port, mock_file, mock_seed);
    }
    if (*serve) {
      logger log = make_logger(sf);
      std::vector<llm::client_config> cs;
      for (const std::string& f : serve_configs) {
        cs.push_back(llm::load_config(f, llm::process_env()));
      }
      return run_serve(cs, serve_opts, log);
    }
    if (*results_check) {
      return run_check(check_in, check_results_files, merge_out);
    }
    if (*bench) {
      if (bench_prompts > 0) {
        bench_opts.prompts = bench_prompts;
      }
      bench_opts.fork = !bench_no_fork;
      return run_bench(bench_opts);
    }
    if (*demo) {
      logger log = make_logger(df);
      batch_options o = make_batch_options(df);
      o.resume_command = resume_command(argc, argv);
      return run_demo(dopts, o, log);
    }
    // batch
    logger log = make_logger(bf);
    llm::client_config c;
    if (!config_file.empty()) {
      c = llm::load_config(config_file, llm::process_env());
    } else if (!mock_scenario.empty()) {
      c = demo_config();
    } else {
      std::cerr << "keel batch: --config is required (or --mock to run against the mock)\n";
      return 2;
    }
    if (!ca_file.empty()) {
      if (const std::string why = llm::unreadable_file(ca_file); !why.empty()) {
        std::cerr << "keel batch: --ca-file " << ca_file << ": " << why << "\n";
        return 2;
      }
      for (auto& e : c.entries) {
        if (e.ca_file.empty()) {
          e.ca_file = ca_file;  // an entry's own ca_file wins
        }
      }
    }
    if (print_config) {
      if (bf.concurrency) {
        c.policy.concurrency = *bf.concurrency;  // what the run would use
      }
      std::cout << to_json(c, true).dump(2) << "\n";
      return 0;
    }
    if (in_file.empty() || out_file.empty()) {
      std::cerr << "keel batch: --in and --out are required\n";
      return 2;
    }
    batch_options o = make_batch_options(bf);
    o.in = in_file;
    o.out = out_file;
    o.resume = resume;
    o.overwrite = overwrite;
    o.stream = stream;
    o.trace_file = batch_trace;
    o.resume_command = resume_command(argc, argv);
    o.print_summary = out_file != "-";
    if (!shard_text.empty()) {
      o.shard = parse_shard(shard_text);
      o.title += " (shard " + shard_text + ")";
    }
    if (!mock_scenario.empty()) {
      return run_with_mock(mock_scenario, std::move(c), o, log);
    }
    return run_batch(c, o, log);
  } catch (const llm::config_error& e) {
    std::cerr << "keel: config error: " << e.what() << "\n";
    return 2;
  } catch (const keel::testing::scenario_error& e) {
    std::cerr << "keel: scenario error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "keel: " << e.what() << "\n";
    return 2;
  }
}
