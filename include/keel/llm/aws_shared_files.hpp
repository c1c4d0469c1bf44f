// A small reader for the AWS shared credentials and config files (INI), for the config loader.
#pragma once

// The AWS SDKs read two INI files: the credentials file (`[name]` sections with
// `aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`) and the config file
// (`[default]` or `[profile name]` sections with `region`, `retry_mode`, `max_attempts`, ...).
// This reader covers what the keel command needs, not every detail of botocore's parser:
//
//   - lines whose first non-blank character is `#` or `;` are comments;
//   - `key = value` (or `key: value`), split at the first delimiter, both sides trimmed, keys
//     lower-cased (as Python's configparser does); values are kept verbatim otherwise (no
//     inline comments);
//   - an indented line after a key with an empty value belongs to a nested block
//     (`s3 =\n  max_concurrent_requests = 10`) and is skipped;
//   - a repeated section or key: the later one wins;
//   - a missing or unreadable file reads as empty.
//
// Example:
//
//     auto files = keel::llm::load_aws_shared_files(keel::llm::process_env());
//     if (const auto* p = files.config_profile("default")) { /* p->at("region") ... */ }
//
// Thread safety: plain values; `load_aws_shared_files` reads the environment only through the
// given lookup.

#include <keel/llm/config.hpp>

#include <map>
#include <string>
#include <string_view>

namespace keel::llm {

/// The keys of one INI section.
using ini_section = std::map<std::string, std::string>;

/// An INI file: its sections by name.
using ini_file = std::map<std::string, ini_section>;

/// Parses INI text (see the header comment for the dialect).
ini_file parse_ini(std::string_view text);

/// Reads and parses an INI file; a missing or unreadable file is empty.
ini_file read_ini_file(const std::string& path);

/// The two AWS shared files, read.
struct aws_shared_files {
  /// Where the credentials file was looked for ("" if neither the variable nor HOME is set).
  std::string credentials_path;
  /// Where the config file was looked for ("" if neither the variable nor HOME is set).
  std::string config_path;
  /// The credentials file: sections named after profiles.
  ini_file credentials;
  /// The config file: `[default]` and `[profile name]` sections.
  ini_file config;

  /// The credentials file's section for `profile`, or nullptr.
  const ini_section* credentials_profile(const std::string& profile) const;
  /// The config file's section for `profile` (`[profile name]`, or `[default]` for "default"),
  /// or nullptr.
  const ini_section* config_profile(const std::string& profile) const;
};

/// Locates and reads both files: AWS_SHARED_CREDENTIALS_FILE (default
/// $HOME/.aws/credentials) and AWS_CONFIG_FILE (default $HOME/.aws/config); a leading "~/" is
/// expanded with HOME.
aws_shared_files load_aws_shared_files(const env_lookup& env);

}  // namespace keel::llm
