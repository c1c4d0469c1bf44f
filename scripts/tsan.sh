#!/usr/bin/env bash
# ThreadSanitizer job: builds the tests that share keel objects between threads (tagged
# [threads]: throttler, breaker, bulkhead, retry budget, AWS retry quota, metrics registry,
# deadline queue, the batch input's line feed) with
# -fsanitize=thread and runs them. Usage: scripts/tsan.sh [--build-dir DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="$here/build-tsan"
if [ "${1:-}" = "--build-dir" ]; then build_dir="$2"; fi
files="test_throttler.cpp;test_circuit_breaker.cpp;test_bulkhead.cpp;test_retry_budget.cpp"
files="$files;test_aws_retry_quota.cpp;test_cli_metrics.cpp;test_deadline.cpp;test_cli_jsonl.cpp"
files="$files;test_rate_controller.cpp"
cmake -S "$here" -B "$build_dir" -G Ninja -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKEEL_WERROR=ON -DKEEL_TSAN=ON \
  -DKEEL_BUILD_EXAMPLES=OFF -DKEEL_HEADER_CHECK=OFF "-DKEEL_TEST_FILES=$files" >/dev/null
cmake --build "$build_dir" --target keel_tests -j "${KEEL_JOBS:-$(nproc)}"
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" \
  "$build_dir/tests/keel_tests" "[threads]"
