// A minimal JSON instance of a JSON Schema, for the mock server's structured-output answers.
#pragma once

#include <string>
#include <string_view>

namespace keel::testing::detail {

/// A small JSON document (serialised) that validates against the JSON Schema `schema_json`, as
/// OpenAI's structured outputs accept them: `type` (a name or a list: the first is used)
/// `object`/`array`/`string`/`number`/`integer`/`boolean`/`null`, `properties` + `required` (every
/// required property is filled, the others left out), `enum` (the first value), `const`,
/// `items`/`prefixItems`, `anyOf`/`oneOf`/`allOf` (the first branch), `$ref` to `#/$defs/...`,
/// `#/definitions/...` or any JSON pointer into the schema, `minItems`, `minLength`, `minimum`,
/// `exclusiveMinimum` and `maximum`. Bounded: `$ref`s are followed at most 32 deep and at most
/// 10,000 values are produced; past either bound (a recursive schema) `null` is used. Other
/// keywords (`pattern`, `format`, ...) are ignored. Text that is not JSON gives "{}".
std::string minimal_json_instance(std::string_view schema_json);

}  // namespace keel::testing::detail
