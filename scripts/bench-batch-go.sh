#!/usr/bin/env bash
# Issue 18: the batch path's CPU cost, `keel batch` against a plain Go client on net/http
# (scripts/loadgen/batch.go: read JSONL, POST each prompt with C workers, write JSONL; no
# policy), both against `keel mock` (no faults) with the same N prompts.
#
# Usage: scripts/bench-batch-go.sh [--keel PATH] [--prompts N] [--concurrency "64 1024"]
#                                  [--rounds R] [--latency MS]
# Needs Go (apt-get install golang-go) to build the baseline, and python3 for the percentiles.
# keel uses the newcomer's one-entry config ([{"model", "base_url", "api_key"}]: its default
# policy, adaptive pacing included). The mock runs on CPU 0, the client under test on CPU 1
# (taskset). Prints one line per (client, concurrency, round): wall seconds, user and system CPU seconds of the client process (GNU
# time), CPU microseconds per item, the result lines written, and the items' latency (p50 and
# p99, from the moment a worker took the item to its answer: keel's `latency_ms`, the Go
# client's `seconds`). With --latency MS the mock answers after MS milliseconds (issue 12's
# "unthrottled server" target: keel against an unpaced client as fast as itself).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keel=""
prompts=20000
conc="64 1024"
rounds=2
latency=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keel) keel="$2"; shift ;;
    --prompts) prompts="$2"; shift ;;
    --concurrency) conc="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --latency) latency="$2"; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-batch-go.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
command -v go >/dev/null || { echo "bench-batch-go.sh: go not found (apt-get install golang-go)" >&2; exit 2; }
prog=bench-batch-go.sh
# shellcheck source=serve-common.sh
. "$here/scripts/serve-common.sh"
find_keel

tmp="$dir"
(cd "$here/scripts/loadgen" && HOME="${HOME:-$tmp}" GOCACHE="$tmp/gocache" go build -o "$tmp/gobatch" batch.go)

printf '{"seed": 7, "models": {"m": {"latency_ms": %d}}}\n' "$latency" >"$tmp/scenario.json"
taskset -c 0 "$keel" mock --port 0 --scenario "$tmp/scenario.json" >"$tmp/mock.log" 2>&1 &
pids+=($!)
url=$(url_of "$tmp/mock.log") || { echo "$prog: keel mock did not start" >&2; exit 2; }

for i in $(seq "$prompts"); do
  printf '{"id": %d, "prompt": "Summarise item %d in one line"}\n' "$i" "$i"
done >"$tmp/prompts.jsonl"
printf '[{"model": "m", "base_url": "%s", "api_key": "sk-bench-batch-0001"}]\n' "$url" >"$tmp/keel.json"


echo "mock $url (latency $latency ms); $prompts prompts; keel $("$keel" --version | head -1); $(go version)"
for c in $conc; do
  for r in $(seq "$rounds"); do
    measure "go c=$c r=$r" "$tmp/gobatch" -url "$url" -in "$tmp/prompts.jsonl" -out "$tmp/out.jsonl" -c "$c"
    measure "keel c=$c r=$r" "$keel" batch --config "$tmp/keel.json" --in "$tmp/prompts.jsonl" \
      --out "$tmp/out.jsonl" --overwrite -c "$c" --quiet
  done
done
