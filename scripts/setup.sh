#!/usr/bin/env bash
# Installs keel's Debian 12 dependencies, builds keel with clang++ and runs `keel demo`.
#
# Usage: scripts/setup.sh [--no-demo] [--build-dir DIR] [--sanitize] [--gcc] [--tests-only]
# Environment: KEEL_BUILD_TYPE (default RelWithDebInfo), KEEL_JOBS (default: nproc).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir="$here/build"
run_demo=1
sanitize=OFF
compiler=clang++
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-demo) run_demo=0 ;;
    --build-dir) build_dir="$2"; shift ;;
    --sanitize) sanitize=ON ;;
    --gcc) compiler=g++ ;;
    --tests-only) extra+=(-DKEEL_BUILD_EXAMPLES=OFF -DKEEL_HEADER_CHECK=OFF); run_demo=0 ;;
    *) echo "setup.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
  shift
done

packages=(clang cmake ninja-build g++ make ca-certificates libboost1.81-dev nlohmann-json3-dev
  libfmt-dev catch2 libssl-dev libcli11-dev libbenchmark-dev libhiredis-dev redis-server
  libtcmalloc-minimal4)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
  echo "setup.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi

jobs=${KEEL_JOBS:-$(nproc)}
cmake -S "$here" -B "$build_dir" -G Ninja \
  -DCMAKE_CXX_COMPILER="$compiler" \
  -DCMAKE_BUILD_TYPE="${KEEL_BUILD_TYPE:-RelWithDebInfo}" \
  -DKEEL_WERROR=ON -DKEEL_SANITIZE="$sanitize" "${extra[@]}"
cmake --build "$build_dir" -j "$jobs"

if [ "$run_demo" = 1 ]; then
  echo
  echo "setup.sh: build done; running the demo: $build_dir/tools/keel/keel demo"
  "$build_dir/tools/keel/keel" demo
fi
