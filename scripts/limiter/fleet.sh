#!/usr/bin/env bash
# A fleet of `keel batch` processes sharing one provider key (issue 16) against the stock nginx
# limit_req limiter (nginx-limiter.sh: 200 r/s, burst 20, 429 + Retry-After 1, no rate-limit
# headers), with Debian's redis-server as the shared state. One input of N prompts is split with
# `keel batch --shard I/P` across P processes at concurrency C each; `keel check` proves every id
# has exactly one record. nginx and redis-server run on CPU 0 (taskset), the keel processes are
# not pinned.
#
# Usage: scripts/limiter/fleet.sh SERIES [OPTIONS]
#
#   configured   the limit configured (requests_per_minute 12000, burst 20) and shared through
#                Redis (policy.shared); compared with the same config and no Redis (each process
#                alone at the whole limit: the fleet sends P x the limit) and with Redis unreachable
#                and fleet_size P (each process at its share)
#   learned      nothing configured but policy.shared: the processes share what they learn
#                (keel/redis/shared_rate.hpp: the fleet's limit from their measured shares, an
#                equal share each, one leader's probes followed by all); compared with the same
#                config and no Redis (each process learns the limit on its own), and with Redis
#                killed at t = 5 s and started again, empty, at t = 10 s (each learns alone
#                meanwhile)
#   kill         configured and shared; Redis killed (SIGKILL) at t = 5 s and started again, empty,
#                at t = 10 s; with fleet_size unset (the last granted share) and with fleet_size P
#   breaker      an outage, not a limit: `keel mock` (50 ms answers) answers 503 from 5 s to 10 s
#                after it starts; the fleet paced at 200 r/s in all, breaker break 1 s growing to
#                4 s. Each process's breaker shared through Redis (with the pacing), against each
#                process alone (its own breaker, a quarter of the rate). Reports the requests
#                that reached the provider during the outage (the mock's non-200 answers)
#   all          every series above except breaker
#
# Options:
#   --port P       limiter port (default 18290)   --redis-port R   redis port (default 16390)
#   --procs P      processes (default 4)          --concurrency C  per process (default 64)
#   --prompts N    prompts in all (default 4000)  --runs K         repeat each run (default 1)
#   --keel PATH    keel binary (default build/tools/keel/keel, copied into the run directory)
#   --dir DIR      everything a run writes (default: a new /tmp/keel-fleet.XXXXXX; kept)
#
# Each run prints one JSON line: fleet wall (first start to last end), ok/failed, attempts,
# per-process attempts, requests that reached nginx per second (all statuses, from its access
# log), the seconds in which they exceeded 1.5 x the limit, the 429s, and keel check's verdict.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
prog="fleet.sh"
die() { echo "$prog: $*" >&2; exit 2; }
# shellcheck source=common.sh
. "$here/common.sh"
usage() { sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

[ $# -ge 1 ] || { usage >&2; exit 2; }
series="$1"
shift
case "$series" in
  configured | learned | kill | breaker | all) ;;
  -h | --help | help) usage; exit 0 ;;
  *) die "unknown series '$series' (configured, learned, kill, breaker or all; see --help)" ;;
esac
port=18290 redis_port=16390 procs=4 conc=64 prompts=4000 runs=1
keel_src="$root/build/tools/keel/keel" dir=""
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || die "$1 needs a value"
  case "$1" in
    --port) port="$2" ;;
    --redis-port) redis_port="$2" ;;
    --procs) procs="$2" ;;
    --concurrency) conc="$2" ;;
    --prompts) prompts="$2" ;;
    --runs) runs="$2" ;;
    --keel) keel_src="$2" ;;
    --dir) dir="$2" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift 2
done
command -v redis-server >/dev/null || die "redis-server not found (Debian: apt-get install redis-server)"
command -v python3 >/dev/null || die "python3 not found"
[ -x "$keel_src" ] || die "no keel binary at $keel_src (build first)"
[ -n "$dir" ] || dir=$(mktemp -d /tmp/keel-fleet.XXXXXX)
mkdir -p "$dir"
cp "$keel_src" "$dir/keel"
keel="$dir/keel"
ldir="$dir/limiter"
echo "$prog: results in $dir" >&2

write_prompts "$dir/prompts.jsonl" "$prompts"

# Starts the P processes of run $1, each on its shard; their pids go to fleet_pids.
fleet_pids=()
fleet_start() {
  local tag="$1" i
  fleet_pids=()
  for i in $(seq 0 $((procs - 1))); do
    "$keel" batch --config "$dir/$tag.config.json" --in "$dir/prompts.jsonl" --shard "$i/$procs" \
      --out "$dir/$tag.r$i.jsonl" --overwrite --concurrency "$conc" --progress none \
      --log-format json --log-level info --summary-json "$dir/$tag.s$i.json" 2>"$dir/$tag.err$i.log" >/dev/null &
    fleet_pids+=($!)
  done
}

# Waits for every process of the run; fails with the last failing exit status.
fleet_wait() {
  local rc=0 p
  for p in "${fleet_pids[@]}"; do wait "$p" || rc=$?; done
  return "$rc"
}

redis_pid=""
redis_start() {
  taskset -c 0 redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no --loglevel warning >"$dir/redis.log" 2>&1 &
  redis_pid=$!
  wait_listen "$redis_port" || die "redis-server did not listen on $redis_port"
}
redis_kill() {
  if [ -n "$redis_pid" ]; then
    kill -9 "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    redis_pid=""
  fi
}
cleanup() {
  redis_kill
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# $1 tag; $2 "configured" or "learned"; $3 "redis", "unreachable" or "none"; $4 fleet_size;
# $5 "kill" to kill Redis at 5 s and start it at 10 s
run() {
  local tag="$1" limit="$2" shared="$3" fleet_size="$4" fault="${5:-}"
  local rl="" sh=""
  [ "$limit" = configured ] && rl='"rate_limits": {"requests_per_minute": 12000, "burst": 20},'
  case "$shared" in
    redis) sh="\"shared\": {\"redis\": \"redis://127.0.0.1:$redis_port/0\", \"key_prefix\": \"fleet-$tag\", \"fleet_size\": $fleet_size}" ;;
    unreachable) sh="\"shared\": {\"redis\": \"redis://127.0.0.1:1/0\", \"fleet_size\": $fleet_size}" ;;
    none) sh='"shared": {}' ;;
  esac
  cat >"$dir/$tag.config.json" <<EOF
{"config_list": [{"model": "gpt-4o-mini", "base_url": "http://127.0.0.1:$port", "api_key": "sk-fleet-bench"}],
 "policy": {$rl $sh}}
EOF
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null 2>&1 || true
  "$here/nginx-limiter.sh" start --port "$port" --rate 200 --burst 20 --retry-after 1 --cpu 0 \
    --access-log --dir "$ldir" >/dev/null
  redis_kill
  [ "$shared" = redis ] && redis_start
  local t0
  t0=$(date +%s.%N)
  fleet_start "$tag"
  local events=""
  if [ "$fault" = kill ]; then
    sleep 5
    redis_kill
    events="killed $(date +%s.%N)"
    sleep 5
    redis_start
    events="$events started $(date +%s.%N)"
  fi
  local rc=0
  fleet_wait || rc=$?
  local t1
  t1=$(date +%s.%N)
  redis_kill
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null  # flushes the access log
  cp "$ldir/access.log" "$dir/$tag.access.log"
  local check=0
  "$keel" check --in "$dir/prompts.jsonl" "$dir/$tag".r*.jsonl >"$dir/$tag.check.txt" 2>&1 || check=$?
  python3 - "$dir" "$tag" "$procs" "$t0" "$t1" "$rc" "$check" "$events" <<'PY'
import collections, glob, json, sys
d, tag, procs, t0, t1, rc, check, events = sys.argv[1:9]
procs, t0, t1 = int(procs), float(t0), float(t1)
s = [json.load(open(f"{d}/{tag}.s{i}.json")) for i in range(procs)]
arrivals, admitted = collections.Counter(), collections.Counter()
for line in open(f"{d}/{tag}.access.log"):
    parts = line.split()
    if len(parts) != 2:
        continue
    sec = int(float(parts[0]) - t0)
    arrivals[sec] += 1
    admitted[sec] += parts[1] == "200"
secs = range(0, max(arrivals) + 1) if arrivals else []
warnings = collections.Counter()
for i in range(procs):
    for l in open(f"{d}/{tag}.err{i}.log"):
        try:
            e = json.loads(l).get("event")
        except ValueError:
            continue
        if e in ("fleet_pacing_unavailable", "fleet_pacing_restored"):
            warnings[e] += 1
ok = sum(x["items"]["ok"] for x in s)
items = sum(x["items"]["total"] or x["items"]["done"] for x in s)
attempts = sum(x["attempts"] for x in s)
print(json.dumps({
    "run": tag, "exit": int(rc), "check_exit": int(check),
    "wall_s": round(t1 - t0, 2), "items": sum(x["items"]["done"] for x in s), "ok": ok,
    "failed": sum(x["items"]["failed"] for x in s), "attempts": attempts,
    "attempts_per_process": [x["attempts"] for x in s],
    "http_429": sum(x["http_429"] for x in s),
    "nginx_arrivals_per_s": [arrivals[k] for k in secs],
    "nginx_200_per_s": [admitted[k] for k in secs],
    "seconds_above_1.5x": sum(1 for k in secs if arrivals[k] > 300),
    "max_arrivals_per_s": max(arrivals.values()) if arrivals else 0,
    "events": events, "warnings": dict(warnings),
}))
PY
}

# $1 tag; $2 "redis" (pacing and breaker shared) or "alone" (each process its own, at 1/P of
# the rate)
run_breaker() {
  local tag="$1" shared="$2" rpm sh
  if [ "$shared" = redis ]; then
    rpm=12000
    sh="\"shared\": {\"redis\": \"redis://127.0.0.1:$redis_port/0\", \"key_prefix\": \"fleet-$tag\"}"
  else
    rpm=$((12000 / procs))
    sh='"shared": {}'
  fi
  cat >"$dir/$tag.config.json" <<EOF
{"config_list": [{"model": "gpt-4o-mini", "base_url": "http://127.0.0.1:$port", "api_key": "sk-fleet-bench"}],
 "policy": {"rate_limits": {"requests_per_minute": $rpm, "burst": 20},
            "breaker": {"break": 1, "max_break": 4}, $sh}}
EOF
  cat >"$dir/$tag.scenario.json" <<EOF
{"seed": 1, "models": {"gpt-4o-mini": {"latency_ms": 50, "outages": [{"from_ms": 5000, "to_ms": 10000}]}}}
EOF
  redis_kill
  [ "$shared" = redis ] && redis_start
  taskset -c 0 "$keel" mock --port "$port" --scenario "$dir/$tag.scenario.json" >"$dir/$tag.mock.txt" 2>&1 &
  local mock_pid=$!
  wait_listen "$port" || die "keel mock did not listen on $port"
  local t0
  t0=$(date +%s.%N)
  fleet_start "$tag"
  local rc=0
  fleet_wait || rc=$?
  local t1
  t1=$(date +%s.%N)
  kill -INT "$mock_pid" 2>/dev/null || true
  wait "$mock_pid" 2>/dev/null || true
  redis_kill
  local check=0
  "$keel" check --in "$dir/prompts.jsonl" "$dir/$tag".r*.jsonl >"$dir/$tag.check.txt" 2>&1 || check=$?
  python3 - "$dir" "$tag" "$procs" "$t0" "$t1" "$rc" "$check" <<'PY'
import json, re, sys
d, tag, procs, t0, t1, rc, check = sys.argv[1:8]
procs, t0, t1 = int(procs), float(t0), float(t1)
s = [json.load(open(f"{d}/{tag}.s{i}.json")) for i in range(procs)]
m = re.search(r"stopped after (\d+) requests \((\d+) answered 200\)", open(f"{d}/{tag}.mock.txt").read())
total, ok200 = (int(m.group(1)), int(m.group(2))) if m else (None, None)
print(json.dumps({
    "run": tag, "exit": int(rc), "check_exit": int(check),
    "wall_s": round(t1 - t0, 2), "items": sum(x["items"]["done"] for x in s),
    "ok": sum(x["items"]["ok"] for x in s), "failed": sum(x["items"]["failed"] for x in s),
    "failed_by_class": [x["failed_by_class"] for x in s],
    "attempts": sum(x["attempts"] for x in s),
    "provider_requests": total, "provider_non_200": None if total is None else total - ok200,
    "breaker_opens": [x["breaker_opens"] for x in s],
    "breaker_holds": [x["breaker_holds"] for x in s],
}))
PY
}

series_configured() {
  for k in $(seq "$runs"); do
    run "configured-redis-$k" configured redis 0
    run "configured-alone-$k" configured none 0
    run "configured-unreachable-size$procs-$k" configured unreachable "$procs"
  done
}
series_learned() {
  for k in $(seq "$runs"); do
    run "learned-redis-$k" learned redis 0
    run "learned-alone-$k" learned none 0
    run "learned-kill-$k" learned redis 0 kill
  done
}
series_breaker() {
  for k in $(seq "$runs"); do
    run_breaker "breaker-redis-$k" redis
    run_breaker "breaker-alone-$k" alone
  done
}
series_kill() {
  for k in $(seq "$runs"); do
    run "kill-share-$k" configured redis 0 kill
    [ -n "${KEEL_FLEET_ONLY_SHARE:-}" ] || run "kill-size$procs-$k" configured redis "$procs" kill
  done
}
case "$series" in
  configured) series_configured ;;
  learned) series_learned ;;
  kill) series_kill ;;
  breaker) series_breaker ;;
  all) series_configured; series_learned; series_kill ;;
esac | tee -a "$dir/results.jsonl"
