#!/usr/bin/env bash
# Issue 4, target 8: keel::http::client against wrk, on the same plain local server and with the
# same number of connections. The server runs on CPU 0; wrk (one thread) and keel's client (one
# thread) take turns on CPU 1, so each has a core to itself.
#
# Usage: scripts/bench-http.sh [--build-dir DIR] [--seconds N] [--connections "16 64 256"]
#                              [--rounds R]
# Needs wrk (apt-get install wrk) and builds bench_http in DIR (default build-bench, Release).
# Prints one line per (connections, round), then per connection count the median of the
# per-round ratios and the ratio of the median requests/s (rounds are not paired: the VM's noise
# hits wrk's and keel's turns independently, so both are shown).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_dir="$here/build-bench"
seconds=10
conns="16 64 256"
rounds=3
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir="$2"; shift ;;
    --seconds) seconds="$2"; shift ;;
    --connections) conns="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-http.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
command -v wrk >/dev/null || { echo "bench-http.sh: wrk not found (apt-get install wrk)" >&2; exit 2; }
if [ "$(nproc)" -lt 2 ]; then
  echo "bench-http.sh: needs 2 CPUs (server on one, client on the other)" >&2
  exit 2
fi

if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S "$here" -B "$build_dir" -G Ninja -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_BENCH=ON -DKEEL_BUILD_TESTS=OFF \
    -DKEEL_BUILD_EXAMPLES=OFF -DKEEL_HEADER_CHECK=OFF >/dev/null
fi
cmake --build "$build_dir" --target bench_http >/dev/null
bench="$build_dir/bench/bench_http"

log=$(mktemp)
taskset -c 0 "$bench" --serve 0 >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 50); do
  grep -q "serving on" "$log" && break
  sleep 0.1
done
url=$(sed -n 's/^serving on //p' "$log")
[ -n "$url" ] || { echo "bench-http.sh: the server did not start" >&2; cat "$log" >&2; exit 1; }
echo "server: $url (CPU 0); clients on CPU 1; $seconds s per run; $(date -u +%FT%TZ)"

printf '%-11s %5s %12s %12s %7s\n' connections round "wrk req/s" "keel req/s" ratio
for c in $conns; do
  ratios=()
  ws=()
  ks=()
  for r in $(seq "$rounds"); do
    # wrk has no warm-up; give it the same one second the keel client takes.
    taskset -c 1 wrk -t1 -c"$c" -d1s "$url" >/dev/null
    w=$(taskset -c 1 wrk -t1 -c"$c" -d"${seconds}s" "$url" | sed -n 's/^Requests\/sec: *//p')
    k=$(taskset -c 1 "$bench" --url "$url" --connections "$c" --seconds "$seconds" |
      sed -n 's/.*"requests_per_second":\([0-9.]*\).*/\1/p')
    ratio=$(awk -v k="$k" -v w="$w" 'BEGIN { printf "%.3f", k / w }')
    ratios+=("$ratio")
    ws+=("$w")
    ks+=("$k")
    printf '%-11s %5s %12.0f %12.0f %7s\n' "$c" "$r" "$w" "$k" "$ratio"
  done
  med() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
  median=$(med "${ratios[@]}")
  mw=$(med "${ws[@]}")
  mk=$(med "${ks[@]}")
  of_medians=$(awk -v k="$mk" -v w="$mw" 'BEGIN { printf "%.3f", k / w }')
  echo "connections $c: median of round ratios $median; medians wrk $mw, keel $mk: ratio $of_medians"
done
