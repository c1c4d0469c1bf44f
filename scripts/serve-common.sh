# Sourced by the scripts/bench-*.sh scripts: the keel binary to use, a run directory cleaned up with
# the processes started in it, the URL a server prints, and `measure` for batch clients.
# Expects `here` (the repository root), `prog` (the script's name) and `keel` (may be empty).

# The keel binary: $keel if set, else the first built one (Release first).
find_keel() {
  if [ -z "$keel" ]; then
    for k in "$here/build-rel/tools/keel/keel" "$here/../build-rel/tools/keel/keel" \
             "$here/build/tools/keel/keel"; do
      [ -x "$k" ] && { keel="$k"; break; }
    done
  fi
  [ -x "$keel" ] || { echo "$prog: no keel binary (--keel PATH)" >&2; exit 2; }
}

# A fresh run directory in $dir; the pids in $pids get SIGTERM and the directory goes at exit.
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

url_of() {  # log -> the first http://127.0.0.1:PORT it prints (waits up to 10 s)
  for _ in $(seq 200); do
    local u
    u=$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$1" | head -1 || true)
    [ -n "$u" ] && { echo "$u"; return 0; }
    sleep 0.05
  done
  cat "$1" >&2
  return 1
}

# Runs a batch client (label, then the command) on CPU 1 under GNU time and prints its wall,
# user and system time, CPU per item, records written (ok) and latency percentiles. Expects $tmp
# (the client writes $tmp/out.jsonl), $prompts and $prog.
measure() {  # label, then the command
  local label="$1"; shift
  rm -f "$tmp/out.jsonl"
  /usr/bin/time -f '%e %U %S' -o "$tmp/time" taskset -c 1 "$@" >/dev/null 2>"$tmp/client.log" || {
    echo "$prog: $label failed:" >&2; tail -5 "$tmp/client.log" >&2; return 1; }
  read -r wall user sys <"$tmp/time"
  local lines ok
  lines=$(wc -l <"$tmp/out.jsonl")
  ok=$(grep -c '"status":"ok"' "$tmp/out.jsonl" || true)
  local pct
  pct=$(python3 -c '
import json, sys
v = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    v.append(r["latency_ms"] if "latency_ms" in r else r.get("seconds", 0) * 1000)
v.sort()
print("p50 %.1f ms  p99 %.1f ms" % (v[len(v) // 2], v[min(len(v) - 1, int(len(v) * 0.99))]) if v else "")' "$tmp/out.jsonl")
  awk -v l="$label" -v w="$wall" -v u="$user" -v s="$sys" -v n="$prompts" -v lines="$lines" -v ok="$ok" -v pct="$pct" \
    'BEGIN { printf "%-22s wall %6.2f s  user %6.2f s  sys %5.2f s  cpu %6.1f us/item  records %d (ok %d)  %s\n", l, w, u, s, (u + s) * 1e6 / n, lines, ok, pct }'
}
