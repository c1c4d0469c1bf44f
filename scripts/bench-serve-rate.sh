#!/usr/bin/env bash
# Issue 18: keel serve's added latency at a fixed request rate (open loop), against the mock
# directly at the same rate. scripts/loadgen/openloop.go (Go's net/http, not keel's client)
# sends request i at start + i/rate whatever came back and measures each latency from that
# intended time, so queueing behind a stall counts (wrk, closed loop, cannot hold a rate).
#
# Usage: scripts/bench-serve-rate.sh [--keel PATH] [--rates "1000 2000"] [--seconds N]
#                                    [--rounds R] [--conns N]
# Needs Go (apt-get install golang-go). The mock runs on CPU 0, keel serve (the one-entry config:
# its default policy) on CPU 1, the generator is not pinned: on a 2-core machine the three share
# the CPU. Prints one line per (target, rate, round): counts and p50/p90/p99/p99.9/max in ms.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keel=""
rates="2000"
seconds=20
rounds=2
conns=64
while [ $# -gt 0 ]; do
  case "$1" in
    --keel) keel="$2"; shift ;;
    --rates) rates="$2"; shift ;;
    --seconds) seconds="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --conns) conns="$2"; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-serve-rate.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
command -v go >/dev/null || { echo "bench-serve-rate.sh: go not found (apt-get install golang-go)" >&2; exit 2; }
prog=bench-serve-rate.sh
# shellcheck source=serve-common.sh
. "$here/scripts/serve-common.sh"
find_keel
(cd "$here/scripts/loadgen" && HOME="${HOME:-$dir}" GOCACHE="$dir/gocache" go build -o "$dir/openloop" openloop.go)

taskset -c 0 "$keel" mock --port 0 >"$dir/mock.log" 2>&1 &
pids+=($!)
mock=$(url_of "$dir/mock.log")
cat >"$dir/keel.json" <<JSON
[{"model": "gpt-4o-mini", "base_url": "$mock", "api_key": "sk-bench"}]
JSON
taskset -c 1 "$keel" serve --config "$dir/keel.json" --listen 127.0.0.1:0 >"$dir/serve.log" 2>&1 &
pids+=($!)
serve=$(url_of "$dir/serve.log")
echo '{"model": "gpt-4o-mini", "max_tokens": 32, "messages": [{"role": "user", "content": "Summarise the incident report in one line."}]}' >"$dir/body.json"

echo "keel: $keel ($("$keel" --version)); mock $mock (CPU 0), keel serve $serve (CPU 1); ${seconds}s per run, 3 s warm-up, up to $conns connections"
for rate in $rates; do
  for r in $(seq "$rounds"); do
    for target in direct serve; do
      base=$mock
      [ "$target" = serve ] && base=$serve
      "$dir/openloop" -url "$base/v1/chat/completions" -body "$dir/body.json" -rate "$rate" \
        -duration "${seconds}s" -warmup 3s -conns "$conns" -label "target=$target round=$r"
    done
  done
done
curl -s "$serve/metrics" | grep -E '^keel_(serve_(requests|errors)_total|attempts_total)' || true
