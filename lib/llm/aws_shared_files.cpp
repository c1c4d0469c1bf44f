// Reading the AWS shared credentials and config files (a small INI dialect).
#include <keel/llm/aws_shared_files.hpp>

#include "wire_common.hpp"

#include <cctype>
#include <fstream>
#include <sstream>

namespace keel::llm {

namespace {

using detail::trim_blanks;

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return out;
}

// The file named by `variable`, else $HOME/<fallback>; "" when neither is available.
std::string shared_file_path(const env_lookup& env, std::string_view variable,
                             std::string_view fallback) {
  const auto home = env("HOME");
  if (auto v = env(variable); v && !v->empty()) {
    if (v->starts_with("~/") && home && !home->empty()) {
      return *home + v->substr(1);
    }
    return *v;
  }
  if (home && !home->empty()) {
    return *home + "/" + std::string(fallback);
  }
  return {};
}

}  // namespace

ini_file parse_ini(std::string_view text) {
  ini_file out;
  ini_section* section = nullptr;
  // True after `key =` with nothing after it: indented lines that follow are a nested block.
  bool in_nested_block = false;
  while (!text.empty()) {
    const auto eol = text.find('\n');
    std::string_view raw = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view{} : text.substr(eol + 1);

    const bool indented = !raw.empty() && (raw.front() == ' ' || raw.front() == '\t');
    const std::string_view line = trim_blanks(raw);
    if (line.empty() || line.front() == '#' || line.front() == ';') {
      continue;
    }
    if (indented && in_nested_block) {
      continue;
    }
    in_nested_block = false;
    if (line.front() == '[') {
      const auto close = line.find(']');
      if (close == std::string_view::npos) {
        section = nullptr;  // malformed header: ignore its keys rather than misfile them
        continue;
      }
      section = &out[std::string(trim_blanks(line.substr(1, close - 1)))];
      continue;
    }
    const auto delim = line.find_first_of("=:");
    if (section == nullptr || delim == std::string_view::npos) {
      continue;
    }
    const std::string key = lower(trim_blanks(line.substr(0, delim)));
    const std::string_view value = trim_blanks(line.substr(delim + 1));
    if (key.empty()) {
      continue;
    }
    (*section)[key] = std::string(value);
    in_nested_block = value.empty();
  }
  return out;
}

ini_file read_ini_file(const std::string& path) {
  if (path.empty()) {
    return {};
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return {};
  }
  std::ostringstream os;
  os << in.rdbuf();
  return parse_ini(os.str());
}

const ini_section* aws_shared_files::credentials_profile(const std::string& profile) const {
  const auto it = credentials.find(profile);
  return it == credentials.end() ? nullptr : &it->second;
}

const ini_section* aws_shared_files::config_profile(const std::string& profile) const {
  // "[profile  name]" is as valid as "[profile name]": compare the part after the word.
  for (const auto& [name, section] : config) {
    const std::string_view n = name;
    if (n.size() > 7 && n.starts_with("profile") && (n[7] == ' ' || n[7] == '\t') &&
        trim_blanks(n.substr(7)) == profile) {
      return &section;
    }
  }
  if (profile == "default") {
    if (const auto it = config.find("default"); it != config.end()) {
      return &it->second;
    }
  }
  return nullptr;
}

aws_shared_files load_aws_shared_files(const env_lookup& env) {
  aws_shared_files files;
  files.credentials_path = shared_file_path(env, "AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
  files.config_path = shared_file_path(env, "AWS_CONFIG_FILE", ".aws/config");
  files.credentials = read_ini_file(files.credentials_path);
  files.config = read_ini_file(files.config_path);
  return files;
}

}  // namespace keel::llm
