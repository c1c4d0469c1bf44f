#!/usr/bin/env bash
# Issue 18: `keel serve` in front of `keel mock`, against the mock directly, both driven by wrk
# with the same OpenAI chat completion body (non-streaming, no faults).
#
# Usage: scripts/bench-serve.sh [--keel PATH] [--seconds N] [--connections "8 64"] [--rounds R]
#                              [--portkey DIR]
# Needs wrk (apt-get install wrk). With --portkey DIR (an npm install of @portkey-ai/gateway:
# `npm install @portkey-ai/gateway@1.15.2` in DIR), Portkey's gateway (Node, port 18787, on CPU 1
# like keel serve, headless, NODE_ENV=production) is a third target, in the same run, pointed at
# the same mock with x-portkey-provider: openai and x-portkey-custom-host. PATH defaults to build-rel/tools/keel/keel, then
# build/tools/keel/keel. The mock runs on CPU 0, keel serve on CPU 1, wrk (one thread) is not
# pinned: on a 2-core machine the three share the CPU, so "through keel" measures the gateway
# and its client together with the contention they cause.
# Prints one line per (target, connections, round): requests/s and wrk's p50/p90/p99 latency.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keel=""
seconds=10
conns="8 64"
rounds=2
portkey=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keel) keel="$2"; shift ;;
    --seconds) seconds="$2"; shift ;;
    --connections) conns="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --portkey) portkey="$2"; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-serve.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
command -v wrk >/dev/null || { echo "bench-serve.sh: wrk not found (apt-get install wrk)" >&2; exit 2; }
prog=bench-serve.sh
# shellcheck source=serve-common.sh
. "$here/scripts/serve-common.sh"
find_keel

taskset -c 0 "$keel" mock --port 0 >"$dir/mock.log" 2>&1 &
pids+=($!)
mock=$(url_of "$dir/mock.log")
cat >"$dir/keel.json" <<JSON
{"config_list": [{"model": "gpt-4o-mini", "base_url": "$mock", "api_key": "sk-bench"}]}
JSON
taskset -c 1 "$keel" serve --config "$dir/keel.json" --listen 127.0.0.1:0 >"$dir/serve.log" 2>&1 &
pids+=($!)
serve=$(url_of "$dir/serve.log")

cat >"$dir/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "gpt-4o-mini", "max_tokens": 32, "messages": [{"role": "user", "content": "Summarise the incident report in one line."}]}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT rps=%.0f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
LUA

targets="direct serve"
if [ -n "$portkey" ]; then
  start="$portkey/node_modules/@portkey-ai/gateway/build/start-server.js"
  [ -f "$start" ] || { echo "bench-serve.sh: no $start (npm install @portkey-ai/gateway in $portkey)" >&2; exit 2; }
  (cd "$portkey" && NODE_ENV=production exec taskset -c 1 node "$start" --port=18787 --headless) \
    >"$dir/portkey.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    curl -s -o /dev/null http://127.0.0.1:18787/ && break
    sleep 0.1
  done
  sed "s|^wrk.headers\[\"Content-Type\"\] = \"application/json\"|&\nwrk.headers[\"x-portkey-provider\"] = \"openai\"\nwrk.headers[\"x-portkey-custom-host\"] = \"$mock/v1\"\nwrk.headers[\"Authorization\"] = \"Bearer sk-bench\"|" \
    "$dir/post.lua" >"$dir/portkey.lua"
  targets="direct serve portkey"
  wrk -t1 -c64 -d2s -s "$dir/portkey.lua" "http://127.0.0.1:18787/v1/chat/completions" >/dev/null
fi
echo "keel: $keel ($("$keel" --version)); mock $mock (CPU 0), keel serve $serve (CPU 1); ${seconds}s per run"
# Warm-up (connections, the client's pool, the pacing ramp).
wrk -t1 -c64 -d2s -s "$dir/post.lua" "$serve/v1/chat/completions" >/dev/null
for c in $conns; do
  for r in $(seq "$rounds"); do
    for target in $targets; do
      base=$mock
      script="$dir/post.lua"
      [ "$target" = serve ] && base=$serve
      [ "$target" = portkey ] && { base=http://127.0.0.1:18787; script="$dir/portkey.lua"; }
      line=$(wrk -t1 -c"$c" -d"${seconds}s" -s "$script" "$base/v1/chat/completions" |
        grep '^RESULT' | sed 's/^RESULT //')
      echo "target=$target connections=$c round=$r $line"
    done
  done
done
curl -s "$serve/metrics" | grep -E '^keel_(serve_(requests|errors)_total|attempts_total)' || true
