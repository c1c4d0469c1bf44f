#!/usr/bin/env bash
# Runs the reference clients against a fresh nginx limit_req limiter (nginx-limiter.sh), one
# JSON line per run on stdout, the limiter's state reset (restarted) before each run. nginx is
# pinned to CPU 0 and the client to CPU 1 (taskset), as in scripts/bench-http.sh.
#
# Usage: scripts/limiter/run-baseline.sh [--port P] [--rate R] [--burst B] [--prompts N]
#            [--concurrency C] [--runs K] [--retry-after "1 none"] [--max-retries "default 5"]
#            [--with-keel] [--keel PATH] [--dir DIR]
#
#   defaults: port 18080, rate 200, burst 20, 2000 prompts, concurrency 64, 1 run per case,
#   Retry-After cases "1 none", SDK maxRetries cases "default 5" (default = the SDK's own, 2)
#   --with-keel   also run `keel batch` (default config: one entry, no client-side limits) per
#                 Retry-After case; --keel PATH picks the binary (default build/tools/keel/keel)
#   --dir DIR     where prompts, configs, results and logs go (default: a new /tmp/keel-baseline.*)
#
# Needs node + npm (the SDK is installed from sdk-baseline/package-lock.json with `npm ci` when
# sdk-baseline/node_modules is missing), nginx (nginx-limiter.sh installs it), python3, taskset.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
prog="run-baseline.sh"
die() { echo "$prog: $*" >&2; exit 2; }

port=18080 rate=200 burst=20 prompts=2000 concurrency=64 runs=1
retry_afters="1 none" max_retries="default 5" with_keel="" keel="$root/build/tools/keel/keel" dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --with-keel) with_keel=1; shift; continue ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --port | --rate | --burst | --prompts | --concurrency | --runs | --retry-after | --max-retries | --keel | --dir)
      [ $# -ge 2 ] || die "$1 needs a value" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  case "$1" in
    --port) port="$2" ;;
    --rate) rate="$2" ;;
    --burst) burst="$2" ;;
    --prompts) prompts="$2" ;;
    --concurrency) concurrency="$2" ;;
    --runs) runs="$2" ;;
    --retry-after) retry_afters="$2" ;;
    --max-retries) max_retries="$2" ;;
    --keel) keel="$2"; with_keel=1 ;;
    --dir) dir="$2" ;;
  esac
  shift 2
done
for v in port prompts concurrency runs burst; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "--$v: expected an integer, got '${!v}'"
done
for m in $max_retries; do
  [[ "$m" = default || "$m" =~ ^[0-9]+$ ]] || die "--max-retries: expected 'default' or integers, got '$m'"
done
command -v node >/dev/null || die "node not found (apt-get install nodejs npm)"
command -v python3 >/dev/null || die "python3 not found"
if [ -n "$with_keel" ]; then
  [ -x "$keel" ] || die "keel binary not found at $keel (build it, or pass --keel PATH)"
fi
if [ "$(nproc)" -ge 2 ]; then
  server_cpu=(--cpu 0) client=(taskset -c 1)
else
  server_cpu=() client=()
fi

if [ ! -d "$here/sdk-baseline/node_modules/openai" ]; then
  echo "$prog: installing the OpenAI SDK (npm ci in $here/sdk-baseline)" >&2
  (cd "$here/sdk-baseline" && npm ci --no-audit --no-fund >&2)
fi

dir=${dir:-$(mktemp -d /tmp/keel-baseline.XXXXXX)}
mkdir -p "$dir"
limiter_dir="$dir/limiter"
trap '"$here/nginx-limiter.sh" stop --dir "$limiter_dir" >/dev/null 2>&1 || true' EXIT

python3 - "$dir/prompts.jsonl" "$prompts" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(1, int(sys.argv[2]) + 1):
        f.write(json.dumps({"id": i, "prompt": f"Prompt {i}: summarise the incident report in two sentences."}) + "\n")
PY
printf '[{"model":"gpt-4o-mini","base_url":"http://127.0.0.1:%s","api_key":"sk-test"}]\n' "$port" \
  >"$dir/keel-limiter.json"

echo "$prog: $(date -u +%FT%TZ), $(nproc) CPUs, Linux $(uname -r), node $(node --version)," \
  "rate $rate burst $burst, $prompts prompts, concurrency $concurrency; files in $dir" >&2

fresh_limiter() {  # $1: Retry-After
  "$here/nginx-limiter.sh" stop --dir "$limiter_dir" >/dev/null
  "$here/nginx-limiter.sh" start --port "$port" --rate "$rate" --burst "$burst" \
    --retry-after "$1" --dir "$limiter_dir" "${server_cpu[@]}" >/dev/null
}

for run in $(seq "$runs"); do
  for ra in $retry_afters; do
    for mr in $max_retries; do
      fresh_limiter "$ra"
      extra=()
      [ "$mr" = default ] || extra=(--max-retries "$mr")
      rc=0
      out=$("${client[@]}" node "$here/sdk-baseline/openai-batch.mjs" \
        --base-url "http://127.0.0.1:$port/v1" --in "$dir/prompts.jsonl" \
        --concurrency "$concurrency" "${extra[@]}") || rc=$?
      [ "$rc" -le 1 ] || die "openai-batch.mjs failed (exit $rc)"
      python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(json.dumps({"run": int(sys.argv[2]), "retry_after": sys.argv[3], **d}))' \
        "$out" "$run" "$ra"
    done
    if [ -n "$with_keel" ]; then
      fresh_limiter "$ra"
      tag="keel-ra$ra-run$run"
      rc=0
      "${client[@]}" "$keel" batch --config "$dir/keel-limiter.json" --in "$dir/prompts.jsonl" \
        --out "$dir/$tag.results.jsonl" --overwrite --concurrency "$concurrency" \
        --progress none --log-level error --summary-json "$dir/$tag.summary.json" \
        >"$dir/$tag.stdout" 2>"$dir/$tag.stderr" || rc=$?
      [ "$rc" -le 1 ] || die "keel batch failed (exit $rc); see $dir/$tag.stderr"
      python3 - "$dir/$tag.summary.json" "$dir/$tag.results.jsonl" "$run" "$ra" "$keel" "$concurrency" <<'PY'
import collections, json, sys
s = json.load(open(sys.argv[1]))
gave_up = collections.Counter()
for line in open(sys.argv[2]):
    r = json.loads(line)
    if r["status"] == "failed":
        gave_up[r.get("error", {}).get("gave_up") or r.get("error", {}).get("class")] += 1
lat = s.get("latency_seconds", {})
print(json.dumps({
    "run": int(sys.argv[3]), "retry_after": sys.argv[4], "client": "keel batch (" + sys.argv[5] + ")",
    "concurrency": int(sys.argv[6]), "prompts": s["items"]["total"], "ok": s["items"]["ok"],
    "failed": s["items"]["failed"], "wall_s": round(s["wall_seconds"], 3), "attempts": s["attempts"],
    "http_429": s.get("http_429"), "p50_s": round(lat.get("p50", 0), 3), "p99_s": round(lat.get("p99", 0), 3),
    "failed_by_class": s.get("failed_by_class"), "failed_gave_up": dict(gave_up)}))
PY
    fi
  done
done
