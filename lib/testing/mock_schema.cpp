// The mock LLM server's structured outputs: the smallest JSON instance of a JSON Schema.
#include "mock_detail.hpp"

#include <keel/llm/json_depth.hpp>
#include <keel/testing/detail/json_schema_instance.hpp>

#include <cmath>

namespace keel::testing::detail {

namespace {

// Builds the smallest value a schema accepts. Recursive schemas ($ref cycles) and wide ones are
// cut off by the two budgets: the answer is then still JSON, just not a valid instance.
struct schema_instance_builder {
  static constexpr int max_ref_depth = 32;
  static constexpr std::size_t max_values = 10'000;
  static constexpr std::size_t max_repeat = 1'000;  // minItems / minLength honoured up to this

  const json& root;
  std::size_t values = 0;

  const json* resolve(const std::string& ref) const {
    if (ref == "#") {
      return &root;
    }
    if (!ref.starts_with("#/")) {
      return nullptr;
    }
    try {
      const json::json_pointer ptr(ref.substr(1));
      return root.contains(ptr) ? &root.at(ptr) : nullptr;
    } catch (const json::exception&) {
      return nullptr;
    }
  }

  static const json* first_branch(const json& s) {
    for (const char* key : {"anyOf", "oneOf", "allOf"}) {
      auto it = s.find(key);
      if (it != s.end() && it->is_array() && !it->empty()) {
        return &it->front();
      }
    }
    return nullptr;
  }

  static std::size_t count_of(const json& s, const char* key) {
    auto it = s.find(key);
    if (it == s.end() || !it->is_number()) {
      return 0;
    }
    const double v = it->get<double>();
    return v > 0 ? static_cast<std::size_t>(std::min(std::ceil(v), double{max_repeat})) : 0;
  }

  static double number_in_range(const json& s, bool integral) {
    double v = 0;
    auto num = [&](const char* key) -> std::optional<double> {
      auto it = s.find(key);
      return it != s.end() && it->is_number() ? std::optional(it->get<double>()) : std::nullopt;
    };
    if (auto lo = num("minimum"); lo && *lo > v) {
      v = integral ? std::ceil(*lo) : *lo;
    }
    if (auto lo = num("exclusiveMinimum"); lo && *lo >= v) {
      v = integral ? std::floor(*lo) + 1 : *lo + 1;
    }
    if (auto hi = num("maximum"); hi && *hi < v) {
      v = integral ? std::floor(*hi) : *hi;
    }
    return v;
  }

  json build(const json& s, int ref_depth) {
    if (++values > max_values || !s.is_object()) {
      return nullptr;  // `true` / `{}` accept anything, null included
    }
    if (auto it = s.find("const"); it != s.end()) {
      return *it;
    }
    if (auto it = s.find("enum"); it != s.end() && it->is_array() && !it->empty()) {
      return it->front();
    }
    if (auto it = s.find("$ref"); it != s.end() && it->is_string()) {
      const json* target = ref_depth < max_ref_depth ? resolve(it->get<std::string>()) : nullptr;
      return target ? build(*target, ref_depth + 1) : json(nullptr);
    }
    if (const json* branch = first_branch(s)) {
      return build(*branch, ref_depth);
    }
    std::string type;
    if (auto it = s.find("type"); it != s.end()) {
      if (it->is_string()) {
        type = it->get<std::string>();
      } else if (it->is_array() && !it->empty() && it->front().is_string()) {
        type = it->front().get<std::string>();
      }
    } else if (s.contains("properties") || s.contains("required")) {
      type = "object";
    } else if (s.contains("items") || s.contains("prefixItems")) {
      type = "array";
    }
    if (type == "object") {
      json out = json::object();
      const auto props = s.find("properties");
      const auto req = s.find("required");
      if (req != s.end() && req->is_array()) {
        for (const auto& name : *req) {
          if (!name.is_string()) {
            continue;
          }
          const std::string key = name.get<std::string>();
          const bool has = props != s.end() && props->is_object() && props->contains(key);
          out[key] = has ? build((*props)[key], ref_depth) : json(nullptr);
        }
      }
      return out;
    }
    if (type == "array") {
      json out = json::array();
      const std::size_t n = count_of(s, "minItems");
      const auto prefix = s.find("prefixItems");
      const auto items = s.find("items");
      for (std::size_t i = 0; i < n && values <= max_values; ++i) {
        if (prefix != s.end() && prefix->is_array() && i < prefix->size()) {
          out.push_back(build((*prefix)[i], ref_depth));
        } else if (items != s.end() && items->is_array()) {  // draft-04 tuple form
          out.push_back(i < items->size() ? build((*items)[i], ref_depth) : json(nullptr));
        } else {
          out.push_back(items != s.end() ? build(*items, ref_depth) : json(nullptr));
        }
      }
      return out;
    }
    if (type == "string") {
      return std::string(count_of(s, "minLength"), 'a');
    }
    if (type == "integer") {
      return static_cast<std::int64_t>(number_in_range(s, true));
    }
    if (type == "number") {
      return number_in_range(s, false);
    }
    if (type == "boolean") {
      return false;
    }
    return nullptr;
  }
};

}  // namespace

std::string minimal_json_instance(std::string_view schema_json) {
  const json schema = keel::llm::json_too_deep_at(schema_json) == std::string_view::npos
                          ? json::parse(schema_json, nullptr, /*allow_exceptions=*/false)
                          : json(json::value_t::discarded);
  if (schema.is_discarded()) {
    return "{}";
  }
  schema_instance_builder b{schema};
  return dump(b.build(schema, 0));
}

}  // namespace keel::testing::detail
