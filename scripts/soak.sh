#!/usr/bin/env bash
# Soak test: 20,000 prompts through the mock with ~30% faults (429, 500, 503, 529, resets,
# stalls, truncated bodies) and two 6 s outages of the primary, retry budget and breaker on.
# Checks: exactly one record per prompt; retries within what the budget allows; RSS flat after
# the first minute; the breaker opened during the outages and closed again.
# Usage: scripts/soak.sh [--prompts N] [--keel PATH] [--dir DIR]   (needs python3)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prompts=20000
keel="$here/build/tools/keel/keel"
dir="$(mktemp -d /tmp/keel-soak.XXXXXX)"
while [ $# -gt 0 ]; do
  case "$1" in
    --prompts) prompts="$2"; shift ;;
    --keel) keel="$2"; shift ;;
    --dir) dir="$2"; mkdir -p "$dir"; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
python3 - "$dir/in.jsonl" "$prompts" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(1, int(sys.argv[2]) + 1):
        f.write(json.dumps({"id": i, "prompt": f"Soak prompt {i}: summarise the incident"}) + "\n")
PY
"$keel" batch --config "$here/docs/soak/config.json" --mock "$here/docs/soak/scenario.json" \
  --in "$dir/in.jsonl" --out "$dir/out.jsonl" --overwrite --progress lines \
  --progress-interval 10 --log-level info --log-format json --summary-json "$dir/summary.json" \
  >"$dir/stdout.txt" 2>"$dir/stderr.jsonl" &
pid=$!
: >"$dir/rss.txt"
t=0
while kill -0 "$pid" 2>/dev/null; do
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  [ -n "$rss" ] && echo "$t $rss" >>"$dir/rss.txt"
  sleep 1
  t=$((t + 1))
done
wait "$pid" || true
python3 - "$dir" "$prompts" <<'PY'
import json, sys
d, n = sys.argv[1], int(sys.argv[2])
ids = {}
for line in open(f"{d}/out.jsonl"):
    r = json.loads(line)
    ids[r["id"]] = ids.get(r["id"], 0) + 1
summary = json.load(open(f"{d}/summary.json"))
events = [json.loads(l) for l in open(f"{d}/stderr.jsonl") if l.startswith("{")]
breaker = [(e["from"], e["to"]) for e in events if e.get("event") == "breaker"]
rss = [tuple(map(int, l.split())) for l in open(f"{d}/rss.txt")]
after = [kb for t, kb in rss if t >= 60]
ok = summary["items"]["ok"]
# gRFC A6 (400 tokens, 0.5 per success): a retry needs more than 200 tokens, each failure
# takes 1, so retries <= 200 + 0.5 * successes (+ the 64 in flight when the line is crossed).
# Throttled failures (429s, an open breaker, a queue timeout) do not draw on the budget.
allowed = 400 / 2 + 0.5 * ok + 64
throttled_classes = ("rate_limited", "circuit_open", "queue_timeout")
charged = summary["retries"] - sum(summary["retries_by_cause"].get(c, 0) for c in throttled_classes)
checks = {
    "one record per prompt": len(ids) == n and all(c == 1 for c in ids.values()),
    "retries within the budget": charged <= allowed,
    "breaker opened": any(t == "open" for _, t in breaker),
    "breaker closed again": bool(breaker) and breaker[-1][1] == "closed",
    "rss flat after the first minute (<10% growth)":
        len(after) < 2 or max(after) <= 1.10 * after[0],
}
print(json.dumps({"prompts": n, "ok": ok, "failed": summary["items"]["failed"],
                  "attempts": summary["attempts"], "retries": summary["retries"],
                  "breaker_transitions": len(breaker), "wall_seconds": summary["wall_seconds"],
                  "rss_kb_first_minute_end": after[0] if after else None,
                  "rss_kb_max_after": max(after) if after else None,
                  "checks": checks}, indent=2))
sys.exit(0 if all(checks.values()) else 1)
PY
echo "files in $dir"
