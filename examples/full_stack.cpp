// Placeholder demo; replaced by the full-stack example below once the combinators land.
#include <keel/error.hpp>
#include <cstdio>
int main() { std::puts(make_error_code(keel::error::retries_exhausted).message().c_str()); }
