#!/usr/bin/env bash
# A provider outage against one process: `keel batch` with the one-entry config a newcomer
# writes, and the official OpenAI Node SDK as a plain retry loop, against `keel mock` answering
# 503 for a while. One JSON line per run on stdout (also appended to DIR/results.jsonl).
#
# Usage: scripts/limiter/outage.sh [--concurrency "16 64 256"] [--prompts N] [--latency-ms L]
#            [--outage "FROM_MS TO_MS"] [--runs K] [--sdk-retries "default 5"] [--no-sdk]
#            [--keel PATH] [--port P] [--dir DIR]
#
#   defaults: concurrency 16 64 256, 2000 prompts, 200 ms answers, 503 from 1000 ms to 6000 ms
#   after the mock starts (the client starts right after it), 1 run per case, the SDK with its
#   own maxRetries (2) and with 5.
#   keel's config is [{"model", "base_url", "api_key"}] and nothing else; only --concurrency is
#   passed on the command line (the SDK gets the same concurrency).
#
# Each line: client, concurrency, wall_s, ok, failed, failed_by (gave_up or HTTP status),
# requests (what the mock received), into_outage (its non-200 answers), p99_s.
# Needs python3; node + npm for the SDK runs (installed from sdk-baseline/package-lock.json).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
prog="outage.sh"
die() { echo "$prog: $*" >&2; exit 2; }
# shellcheck source=common.sh
. "$here/common.sh"

concs="16 64 256" prompts=2000 latency=200 outage="1000 6000" runs=1 sdk_retries="default 5"
sdk=1 keel_src="$root/build/tools/keel/keel" port=18390 dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --no-sdk) sdk=""; shift; continue ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --concurrency | --prompts | --latency-ms | --outage | --runs | --sdk-retries | --keel | --port | --dir)
      [ $# -ge 2 ] || die "$1 needs a value" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  case "$1" in
    --concurrency) concs="$2" ;;
    --prompts) prompts="$2" ;;
    --latency-ms) latency="$2" ;;
    --outage) outage="$2" ;;
    --runs) runs="$2" ;;
    --sdk-retries) sdk_retries="$2" ;;
    --keel) keel_src="$2" ;;
    --port) port="$2" ;;
    --dir) dir="$2" ;;
  esac
  shift 2
done
for v in prompts latency runs port; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--${v/latency/latency-ms}: expected an integer, got '${!v}'"
done
read -r out_from out_to <<<"$outage"
[[ "$out_from" =~ ^[0-9]+$ && "$out_to" =~ ^[0-9]+$ ]] || die "--outage: expected 'FROM_MS TO_MS', got '$outage'"
command -v python3 >/dev/null || die "python3 not found"
[ -x "$keel_src" ] || die "no keel binary at $keel_src (build first, or pass --keel PATH)"
if [ -n "$sdk" ]; then
  command -v node >/dev/null || die "node not found (apt-get install nodejs npm), or pass --no-sdk"
  if [ ! -d "$here/sdk-baseline/node_modules/openai" ]; then
    (cd "$here/sdk-baseline" && npm ci --silent) || die "npm ci failed in $here/sdk-baseline"
  fi
fi
[ -n "$dir" ] || dir=$(mktemp -d /tmp/keel-outage.XXXXXX)
mkdir -p "$dir"
cp "$keel_src" "$dir/keel"
keel="$dir/keel"
echo "$prog: results in $dir" >&2

write_prompts "$dir/prompts.jsonl" "$prompts"
cat >"$dir/scenario.json" <<EOF
{"seed": 1, "models": {"gpt-4o-mini": {"latency_ms": $latency, "outages": [{"from_ms": $out_from, "to_ms": $out_to}]}}}
EOF
cat >"$dir/config.json" <<EOF
[{"model": "gpt-4o-mini", "base_url": "http://127.0.0.1:$port/v1", "api_key": "sk-outage-bench"}]
EOF

mock_pid=""
mock_start() {
  taskset -c 0 "$keel" mock --port "$port" --scenario "$dir/scenario.json" >"$dir/$1.mock.txt" 2>&1 &
  mock_pid=$!
  wait_listen "$port" || die "keel mock did not listen on $port"
}
mock_stop() {
  kill -INT "$mock_pid" 2>/dev/null || true
  wait "$mock_pid" 2>/dev/null || true
}

# One run: $1 tag, $2 client ("keel" or "sdk-<retries>"), $3 concurrency.
run_one() {
  local tag="$1" client="$2" c="$3" rc=0
  mock_start "$tag"
  if [ "$client" = keel ]; then
    taskset -c 1 "$keel" batch --config "$dir/config.json" --in "$dir/prompts.jsonl" \
      --out "$dir/$tag.r.jsonl" --overwrite --concurrency "$c" --progress none \
      --summary-json "$dir/$tag.s.json" >/dev/null 2>"$dir/$tag.err.log" || rc=$?
  else
    local r="${client#sdk-}" extra=()
    [ "$r" = default ] || extra=(--max-retries "$r")
    taskset -c 1 node "$here/sdk-baseline/openai-batch.mjs" --base-url "http://127.0.0.1:$port/v1" \
      --in "$dir/prompts.jsonl" --concurrency "$c" "${extra[@]}" --out "$dir/$tag.r.jsonl" \
      >"$dir/$tag.s.json" 2>"$dir/$tag.err.log" || rc=$?
  fi
  mock_stop
  python3 - "$dir" "$tag" "$client" "$c" "$rc" <<'PY' | tee -a "$dir/results.jsonl"
import collections, json, re, sys
d, tag, client, c, rc = sys.argv[1:]
m = re.search(r"stopped after (\d+) requests \((\d+) answered 200\)", open(f"{d}/{tag}.mock.txt").read())
requests, ok200 = (int(m.group(1)), int(m.group(2))) if m else (None, None)
s = json.load(open(f"{d}/{tag}.s.json"))
failed_by = collections.Counter()
for line in open(f"{d}/{tag}.r.jsonl"):
    r = json.loads(line)
    if r.get("status") not in ("ok", 200):
        if client == "keel":
            failed_by[(r.get("error") or {}).get("gave_up") or (r.get("error") or {}).get("class")] += 1
        else:
            failed_by[str(r.get("http_status"))] += 1
if client == "keel":
    wall, ok, failed, p99 = s["wall_seconds"], s["items"]["ok"], s["items"]["failed"], s["latency_seconds"]["p99"]
else:
    wall, ok, failed, p99 = s["wall_s"], s["ok"], s["failed"], s["p99_s"]
print(json.dumps({"run": tag, "client": client, "concurrency": int(c), "exit": int(rc),
                  "wall_s": round(wall, 2), "ok": ok, "failed": failed, "failed_by": dict(failed_by),
                  "requests": requests, "into_outage": None if requests is None else requests - ok200,
                  "p99_s": round(p99, 2)}))
PY
}

clients="keel"
if [ -n "$sdk" ]; then
  for r in $sdk_retries; do clients="$clients sdk-$r"; done
fi
for k in $(seq 1 "$runs"); do
  for c in $concs; do
    for cl in $clients; do
      run_one "$cl-c$c-$k" "$cl" "$c"
    done
  done
done
