#!/usr/bin/env bash
# Builds keel's libFuzzer targets (fuzz/) and runs each one for a while on a copy of its corpus.
#
# Usage: scripts/fuzz.sh [--seconds N] [--build-dir DIR] [--jobs J] [--target NAME]... [--opt O]
#   --seconds N      how long each target runs (default 20)
#   --build-dir DIR  the fuzz build (default build-fuzz); configured here with clang++ and
#                    -DKEEL_FUZZ=ON, reused if it exists
#   --jobs J         targets run at once, and build jobs (default: nproc)
#   --target NAME    run only this target (fuzz_NAME; repeatable), e.g. --target hints
#   --opt O          optimisation level of the fuzz build (default 0): 0 builds about twice as
#                    fast as 1, 1 runs about four times as many inputs per second (use it for
#                    long sessions: scripts/fuzz.sh --opt 1 --seconds 600)
# Environment: ASAN_OPTIONS / UBSAN_OPTIONS are passed through (defaults set below).
#
# Exit status: 0 if every target ran clean; 1 if a target crashed, leaked, hung or broke an
# invariant (the reproducer's path is printed); 2 for usage or build errors.
# New inputs go to DIR/fuzz-run/<target>/corpus, never into fuzz/corpus. See docs/FUZZING.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
seconds=20
build_dir="$here/build-fuzz"
jobs=$(nproc)
opt=0
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift ;;
    --build-dir) build_dir="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    --target) only+=("${2#fuzz_}"); shift ;;
    --opt) opt="$2"; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$seconds" in ''|*[!0-9]*) echo "fuzz.sh: --seconds needs a number" >&2; exit 2 ;; esac
case "$jobs" in ''|*[!0-9]*|0) echo "fuzz.sh: --jobs needs a number >= 1" >&2; exit 2 ;; esac
case "$opt" in 0|1|2|3) ;; *) echo "fuzz.sh: --opt is 0, 1, 2 or 3" >&2; exit 2 ;; esac
case "$build_dir" in /*) ;; *) build_dir="$PWD/$build_dir" ;; esac

# target:max_len. max_len is a little above what each parser meaningfully reads: http_client
# must be able to exceed the 64 KiB body limit; header values are short.
targets=(http_client:81920 hints:4096 llm_response:16384 cli_config:16384 cli_jsonl:16384
  cli_resume:16384 mock_scenario:8192 stream_openai:16384 stream_anthropic:16384
  stream_bedrock:16384 gateway_request:16384 traceparent:1024)
if [ ${#only[@]} -gt 0 ]; then
  selected=()
  for t in "${targets[@]}"; do
    for o in "${only[@]}"; do
      if [ "${t%%:*}" = "$o" ]; then selected+=("$t"); fi
    done
  done
  if [ ${#selected[@]} -ne ${#only[@]} ]; then
    echo "fuzz.sh: unknown target in '${only[*]}'; targets: ${targets[*]%%:*}" >&2
    exit 2
  fi
  targets=("${selected[@]}")
fi

cxx=${CXX_FUZZ:-clang++}
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz.sh: $cxx not found; libFuzzer needs clang (apt-get install clang)" >&2
  exit 2
fi
runtime="$("$cxx" -print-resource-dir)/lib/linux/libclang_rt.fuzzer-x86_64.a"
if [ ! -f "$runtime" ]; then
  echo "fuzz.sh: libFuzzer is missing ($runtime); apt-get install libclang-rt-14-dev" >&2
  exit 2
fi

start=$(date +%s)
echo "fuzz.sh: building in $build_dir (-O$opt, ASan + UBSan + libFuzzer)"
mkdir -p "$build_dir"
cmake -S "$here" -B "$build_dir" -G Ninja -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE= \
  -DCMAKE_CXX_FLAGS="-O$opt -gline-tables-only" -DKEEL_FUZZ=ON -DKEEL_WERROR=ON \
  -DKEEL_BUILD_TESTS=OFF -DKEEL_BUILD_EXAMPLES=OFF -DKEEL_HEADER_CHECK=OFF \
  -DKEEL_BUILD_TOOLS=ON >"$build_dir/fuzz-configure.log" 2>&1 || {
  cat "$build_dir/fuzz-configure.log" >&2
  exit 2
}
names=()
for t in "${targets[@]}"; do names+=("fuzz_${t%%:*}"); done
if ! cmake --build "$build_dir" -j "$jobs" --target "${names[@]}"; then
  echo "fuzz.sh: build failed" >&2
  exit 2
fi
built=$(date +%s)
echo "fuzz.sh: build took $((built - start)) s"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
run_dir="$build_dir/fuzz-run"

run_one() {  # name max_len
  local name=$1 max_len=$2
  local work="$run_dir/$name"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp "$here/fuzz/corpus/$name/"* "$work/corpus/"
  local dict=()
  if [ -f "$here/fuzz/dict/$name.dict" ]; then dict=(-dict="$here/fuzz/dict/$name.dict"); fi
  local rc=0
  # The outer timeout only guards against libFuzzer itself wedging; -timeout handles slow inputs.
  timeout $((seconds + 120)) "$build_dir/fuzz/fuzz_$name" -max_total_time="$seconds" \
    -max_len="$max_len" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "${dict[@]}" \
    -artifact_prefix="$work/artifacts/" "$work/corpus" >"$work/log" 2>&1 || rc=$?
  echo "$rc" >"$work/rc"
}

echo "fuzz.sh: running ${#targets[@]} targets for $seconds s each, $jobs at a time"
running=0
for t in "${targets[@]}"; do
  run_one "${t%%:*}" "${t##*:}" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true
finished=$(date +%s)

failed=0
printf '%-16s %10s %8s %7s %8s %7s  %s\n' target execs exec/s cov features corpus result
for t in "${targets[@]}"; do
  name=${t%%:*}
  work="$run_dir/$name"
  rc=$(cat "$work/rc" 2>/dev/null || echo 99)
  stat_of() { sed -n "s/^stat::$1: *//p" "$work/log" | tail -1; }
  last=$(grep -E '^#[0-9]+' "$work/log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  crashes=$(find "$work/artifacts" -type f | sort)
  result=ok
  if [ "$rc" != 0 ] || [ -n "$crashes" ]; then
    result="FAILED (exit $rc)"
    failed=1
  fi
  printf '%-16s %10s %8s %7s %8s %7s  %s\n' "fuzz_$name" "$(stat_of number_of_executed_units)" \
    "$(stat_of average_exec_per_sec)" "${cov:--}" "${ft:--}" "${corp:--}" "$result"
  if [ "$result" != ok ]; then
    grep -E 'ERROR|SUMMARY|invariant|undocumented|runtime error' "$work/log" | head -5 | sed 's/^/    /'
    for c in $crashes; do
      echo "    reproducer: $c"
      echo "    rerun:      $build_dir/fuzz/fuzz_$name $c"
    done
    echo "    log:        $work/log"
  fi
done
echo "fuzz.sh: build $((built - start)) s, fuzzing $((finished - built)) s, total $((finished - start)) s"
exit "$failed"
