// The Catch2 main translation unit, compiled once for every keel test.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
