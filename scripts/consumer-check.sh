#!/usr/bin/env bash
# Checks keel as an installed package, the way a project outside keel uses it: installs an
# existing build directory into a temporary prefix (cmake --install), then configures, builds and
# runs examples/consumer against it (find_package(keel) with -DCMAKE_PREFIX_PATH=<prefix>):
#   1. COMPONENTS core, with OpenSSL and nlohmann_json hidden from find_package
#      (CMAKE_DISABLE_FIND_PACKAGE_*): a core-only consumer must need neither;
#   2. COMPONENTS core llm: both programs (skipped if the build has no keel::llm).
# Exits non-zero on any failure. Takes about a minute (two small compiles).
#
# Usage: scripts/consumer-check.sh [BUILD_DIR]   (default build/; a non-sanitizer build)
# Environment: KEEL_JOBS (default 2); CXX (default: BUILD_DIR's compiler, else clang++-14).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir=$(cd "${1:-$here/build}" && pwd)
jobs=${KEEL_JOBS:-2}
cache="$build_dir/CMakeCache.txt"
[ -f "$cache" ] || { echo "consumer-check: $build_dir is not a CMake build directory" >&2; exit 2; }
cache_value() { sed -n "s/^$1:[A-Z]*=//p" "$cache"; }
cxx=${CXX:-$(cache_value CMAKE_CXX_COMPILER)}
cxx=${cxx:-clang++-14}
build_type=$(cache_value CMAKE_BUILD_TYPE)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/keel-consumer.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix="$tmp/prefix"

echo "consumer-check: installing $build_dir into $prefix"
if ! cmake --install "$build_dir" --prefix "$prefix" >"$tmp/install.log" 2>&1; then
  cat "$tmp/install.log" >&2
  echo "consumer-check: FAILED: cmake --install" >&2
  exit 1
fi

# configure_build_run <name> <programs...> -- <extra cmake arguments...>
configure_build_run() {
  local name=$1 dir="$tmp/$1" programs=() p
  shift
  while [ "$1" != "--" ]; do programs+=("$1"); shift; done
  shift
  echo "consumer-check: [$name] configure, build, run ${programs[*]}"
  if ! cmake -S "$here/examples/consumer" -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" \
      -DCMAKE_BUILD_TYPE="${build_type:-RelWithDebInfo}" -DCMAKE_PREFIX_PATH="$prefix" \
      -DCMAKE_CXX_FLAGS="-Wall -Wextra -Wpedantic -Wshadow -Werror" "$@" >"$tmp/$name.log" 2>&1 ||
    ! cmake --build "$dir" -j "$jobs" >>"$tmp/$name.log" 2>&1; then
    cat "$tmp/$name.log" >&2
    echo "consumer-check: FAILED: [$name] configure or build" >&2
    exit 1
  fi
  for p in "${programs[@]}"; do
    "$dir/$p" || { echo "consumer-check: FAILED: [$name] $p exited with $?" >&2; exit 1; }
  done
}

configure_build_run core-only consumer_core -- -DCONSUMER_CORE_ONLY=ON \
  -DCMAKE_DISABLE_FIND_PACKAGE_OpenSSL=ON -DCMAKE_DISABLE_FIND_PACKAGE_nlohmann_json=ON
if [ -n "$(find "$prefix" -name keel-llm-targets.cmake)" ]; then
  configure_build_run core-llm consumer_core consumer_llm --
else
  echo "consumer-check: [core-llm] SKIPPED: $build_dir was built without keel::llm"
fi
echo "consumer-check: OK"
