#!/usr/bin/env bash
# keel against the stock nginx limit_req limiter (nginx-limiter.sh), run as a newcomer would:
# a one-entry config and nothing else (every keel default), the limiter restarted before every
# run. nginx (and keel's mock, when there is one) run on CPU 0, keel on CPU 1 (taskset).
# Each run prints one JSON line on stdout; each series ends with a markdown table.
#
# Usage: scripts/limiter/keel-matrix.sh SERIES [OPTIONS]
#
#   matrix       N = 10 * R prompts for every rate x concurrency x Retry-After, limiter burst
#                --burst; ideal wall N / R
#                  [--rates 50,200,1000] [--concurrency 16,64,256,1024] [--retry-after 1,none]
#                  [--burst 20]
#   mixed        limiter 200 r/s burst 20 Retry-After 1 in front of `keel mock` (Anthropic wire
#                format, claude-3-5-haiku-latest: 5% 503, 5% 529 overloaded, 50 ms latency, no
#                limit of its own); 2,000 prompts at concurrency 64; ideal 10 s
#   change       limiter 200 r/s burst 20 Retry-After 1 (fixed reply, access log on) whose rate
#                drops to 100 r/s at t = 5 s and returns to 200 r/s at t = 15 s
#                (`nginx-limiter.sh rate` from a timer started with keel); 4,000 prompts at
#                concurrency 64; ideal 25 s. Reports admitted per second (access log), how long
#                after each change the admitted rate stays within 10% of the new limit, and
#                keel's event=pacing log lines
#   errors       no effective limit (100000 r/s, burst 100000) in front of `keel mock` with 10%
#                503 and no latency (--latency MS sets one), and with 0% errors; 2,000 prompts
#                at concurrency 64
#   unthrottled  no effective limit in front of `keel mock` with 50 ms latency: keel vs the
#                OpenAI Node SDK (sdk-baseline/openai-batch.mjs, default maxRetries) at
#                concurrency 16 and 64, 2,000 prompts
#   random       429s at random whatever the rate (`nginx-limiter.sh --random-429 5`: 5% of
#                requests refused before limit_req, the limit's 429 body), nginx's fixed reply:
#                no effective limit with Retry-After 1 and none, keel vs the OpenAI Node SDK
#                (default maxRetries), 10,000 prompts at concurrency 64; and 200 r/s burst 20
#                Retry-After 1 plus the 5%, keel only, 2,000 prompts (ideal 10 s)
#   all          every series above, in that order
#
# Options (all series):
#   --port P        limiter port (default 18190)      --mock-port Q   mock port (default 19190)
#   --keel PATH     keel binary (default build/tools/keel/keel; copied into the run directory at
#                   the start so that a rebuild during the series does not change it)
#   --dir DIR       prompts, configs, results, logs (default: a new /tmp/keel-matrix.XXXXXX; kept)
#   --runs K        repeat every run K times (default 1)
#   --max-load L    before each series wait (30 s at a time) until the 1-minute load is below L
#                   (default 0.5) ...
#   --max-wait S    ... but at most S seconds (default 1800), then run anyway and say so
#   --no-wait       do not wait for a quiet machine (the load is still recorded)
#   --prompts N     override the prompt count of mixed / change / errors / unthrottled / random
#                   (random: of its no-limit runs)
#   --latency MS    the mock's latency in the errors series (default 0)
#
# Needs nginx (nginx-limiter.sh installs it), python3, taskset; node + npm for `unthrottled` and
# `random`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
prog="keel-matrix.sh"
die() { echo "$prog: $*" >&2; exit 2; }
note() { echo "$prog: $*" >&2; }
usage() { sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

[ $# -ge 1 ] || { usage >&2; exit 2; }
series="$1"
shift
case "$series" in
  matrix | mixed | change | errors | unthrottled | random | all) ;;
  -h | --help | help) usage; exit 0 ;;
  *) die "unknown series '$series' (matrix, mixed, change, errors, unthrottled, random or all; see --help)" ;;
esac

port=18190 mock_port=19190 keel_src="$root/build/tools/keel/keel" dir="" runs=1
rates="50,200,1000" concs="16,64,256,1024" retry_afters="1,none" burst=20
max_load=0.5 max_wait=1800 no_wait="" prompts_override="" errors_latency=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-wait) no_wait=1; shift; continue ;;
    -h | --help) usage; exit 0 ;;
    --port | --mock-port | --keel | --dir | --runs | --rates | --concurrency | --retry-after | \
      --burst | --max-load | --max-wait | --prompts | --latency)
      [ $# -ge 2 ] || die "$1 needs a value" ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  case "$1" in
    --port) port="$2" ;;
    --mock-port) mock_port="$2" ;;
    --keel) keel_src="$2" ;;
    --latency) errors_latency="$2" ;;
    --dir) dir="$2" ;;
    --runs) runs="$2" ;;
    --rates) rates="$2" ;;
    --concurrency) concs="$2" ;;
    --retry-after) retry_afters="$2" ;;
    --burst) burst="$2" ;;
    --max-load) max_load="$2" ;;
    --max-wait) max_wait="$2" ;;
    --prompts) prompts_override="$2" ;;
  esac
  shift 2
done

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
for v in port mock_port runs burst max_wait; do
  is_uint "${!v}" || die "--${v//_/-}: expected an integer, got '${!v}'"
done
[ "$port" != "$mock_port" ] || die "--port and --mock-port must differ"
[ -z "$prompts_override" ] || is_uint "$prompts_override" || die "--prompts: expected an integer, got '$prompts_override'"
[[ "$max_load" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--max-load: expected a number, got '$max_load'"
IFS=, read -r -a rate_list <<<"$rates"
IFS=, read -r -a conc_list <<<"$concs"
IFS=, read -r -a ra_list <<<"$retry_afters"
for r in "${rate_list[@]}"; do is_uint "$r" && [ "$r" -ge 1 ] || die "--rates: expected integers >= 1, got '$rates'"; done
for c in "${conc_list[@]}"; do is_uint "$c" && [ "$c" -ge 1 ] || die "--concurrency: expected integers >= 1, got '$concs'"; done
for a in "${ra_list[@]}"; do [ "$a" = none ] || is_uint "$a" || die "--retry-after: expected seconds or 'none', got '$retry_afters'"; done
command -v python3 >/dev/null || die "python3 not found"
command -v taskset >/dev/null || die "taskset not found (util-linux)"
if [ "$series" = unthrottled ] || [ "$series" = random ] || [ "$series" = all ]; then
  command -v node >/dev/null || die "node not found (needed by '$series'; apt-get install nodejs npm)"
  if [ ! -d "$here/sdk-baseline/node_modules/openai" ]; then
    note "installing the OpenAI SDK (npm ci in $here/sdk-baseline)"
    (cd "$here/sdk-baseline" && npm ci --no-audit --no-fund >&2)
  fi
fi
if [ "$(nproc)" -ge 2 ]; then
  server_cpu=(--cpu 0) server_pin=(taskset -c 0) client=(taskset -c 1)
else
  server_cpu=() server_pin=() client=()
fi

dir=${dir:-$(mktemp -d /tmp/keel-matrix.XXXXXX)}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
ldir="$dir/limiter"

# ---- cleanup: whatever this script started, and nothing else --------------------------------
keel_pid="" timer_pid="" mock_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -z "$timer_pid" ] || kill -TERM "$timer_pid" 2>/dev/null || true
  if [ -n "$keel_pid" ]; then
    # keel: the first SIGTERM gives items in flight --grace (10 s), a second cancels them at once
    kill -TERM "$keel_pid" 2>/dev/null || true
    sleep 0.2
    kill -TERM "$keel_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$keel_pid" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$keel_pid" 2>/dev/null || true
  fi
  stop_mock
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null 2>&1 || true
  [ "$rc" -eq 0 ] || note "exit $rc; files are in $dir"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_mock() {
  [ -n "$mock_pid" ] || return 0
  kill -TERM "$mock_pid" 2>/dev/null || true  # it prints its counts and exits
  for _ in $(seq 100); do kill -0 "$mock_pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$mock_pid" 2>/dev/null || true
  wait "$mock_pid" 2>/dev/null || true
  mock_pid=""
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---- the keel binary: wait while it is being rebuilt, then take a private copy --------------
keel="$dir/keel"
for i in $(seq 60); do
  if [ -x "$keel_src" ] && "$keel_src" --version >/dev/null 2>&1; then break; fi
  [ "$i" -lt 60 ] || die "no working keel binary at $keel_src after 10 minutes (build it, or pass --keel PATH)"
  note "waiting for $keel_src (being rebuilt?)"
  sleep 10
done
cp "$keel_src" "$keel.tmp" && mv "$keel.tmp" "$keel"
"$keel" --version >/dev/null 2>&1 || die "the copy of $keel_src does not run (copied mid-rebuild?); try again"
keel_info="$(stat -c '%y' "$keel_src" | cut -c1-19) sha256 $(sha256sum "$keel" | cut -c1-12)"
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null | wc -l)

# ---- report helpers (python) -------------------------------------------------------------------
cat >"$dir/report.py" <<'PY'
import collections, datetime, json, re, sys

def ts(s):  # 2026-12-02T17:30:48.165Z -> epoch seconds
    return datetime.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()

def keel_line(summary, results, stderr, extra):
    s = json.load(open(summary))
    failed = collections.Counter()
    for line in open(results):
        r = json.loads(line)
        if r["status"] != "ok":
            e = r.get("error", {})
            failed[f'{e.get("class")}/{e.get("gave_up")}'] += 1
    retries = collections.Counter()   # (class, status) of every retry keel logged
    pacing = []
    t0 = extra.get("t0")
    for line in open(stderr):
        parts = line.split(" ", 3)
        if len(parts) < 4:
            continue
        if parts[1] == "WARNING" and parts[2] == "retry":
            c = re.search(r"\bclass=(\S+)", parts[3])
            st = re.search(r"\bstatus=(\d+)", parts[3])
            retries[f'{c.group(1) if c else "?"}/{st.group(1) if st else "-"}'] += 1
        elif parts[1] == "INFO" and parts[2] == "pacing":
            kv = dict(re.findall(r"(\w+)=(\S+)", parts[3]))
            kv.pop("bucket", None)
            if t0:
                kv = {"t": round(ts(parts[0]) - t0, 3), **kv}
            pacing.append(kv)
    lat = s.get("latency_seconds", {})
    n = s["items"]["total"]
    out = dict(extra)
    out.pop("t0", None)
    out.update({
        "client": "keel", "prompts": n, "ok": s["items"]["ok"], "failed": s["items"]["failed"],
        "wall_s": round(s["wall_seconds"], 3), "attempts": s["attempts"],
        "attempts_per_prompt": round(s["attempts"] / n, 3) if n else 0,
        "http_429": s.get("http_429"), "p50_s": round(lat.get("p50", 0), 3),
        "p99_s": round(lat.get("p99", 0), 3), "retries_by_cause": s.get("retries_by_cause"),
        "retries_logged": dict(sorted(retries.items())), "failed_by": dict(failed),
        "throttled_seconds": round(s.get("throttled_seconds", 0), 3), "seed": s.get("seed"),
    })
    if out.get("ideal_s"):
        out["wall_over_ideal"] = round(out["wall_s"] / out["ideal_s"], 3)
    out["pacing_events"] = len(pacing)
    out["pacing_last"] = pacing[-1] if pacing else None
    if extra.get("with_pacing"):
        out.pop("with_pacing")
        out["pacing"] = pacing
    return out

def access(path, t0, t_end=None):
    """(relative time, status) of every logged answer."""
    rows = []
    for line in open(path):
        p = line.split()
        if len(p) == 2:
            rows.append((float(p[0]) - t0, p[1]))
    return rows

def settle(ok_times, change, limit, until, tol=0.10, step=0.1, window=1.0):
    """Time after `change` from which every 1 s window [w, w + 1) up to `until` holds an admitted
    count within tol of limit (None: never), and the first such window (reached)."""
    import bisect
    ok_times = sorted(ok_times)
    def count(w):
        return bisect.bisect_left(ok_times, w + window) - bisect.bisect_left(ok_times, w)
    starts = []
    k = 0
    while change + k * step + window <= until + 1e-9:
        starts.append(change + k * step)
        k += 1
    good = [abs(count(w) - limit * window) <= tol * limit * window for w in starts]
    reached = next((round(w - change, 2) for w, g in zip(starts, good) if g), None)
    stays = None
    for i in range(len(good)):
        if all(good[i:]):
            stays = round(starts[i] - change, 2)
            break
    return reached, stays

def cmd_keel(a):
    extra = json.loads(a[3])
    print(json.dumps(keel_line(a[0], a[1], a[2], extra)))

def cmd_sdk(a):
    d = json.loads(a[0])
    extra = json.loads(a[1])
    d = {**extra, **d, "client": d.get("client")}
    n = d["prompts"]
    d["attempts_per_prompt"] = round(d["attempts"] / n, 3) if n else 0
    if d.get("ideal_s"):
        d["wall_over_ideal"] = round(d["wall_s"] / d["ideal_s"], 3)
    print(json.dumps(d))

def cmd_change(a):
    """keel JSON line + access log analysis for the rate-change run."""
    line = json.loads(open(a[0]).read())
    t0 = float(a[2])
    changes = json.loads(a[3])   # [[t_signal_rel, new_rate], ...], first entry [0, initial]
    rows = access(a[1], t0)
    ok = [t for t, st in rows if st == "200"]
    status = collections.Counter(st for _, st in rows)
    end = max(ok) if ok else 0
    per_sec = [0] * (int(end) + 1)
    for t in ok:
        if t >= 0:
            per_sec[int(t)] += 1
    per_100ms = [0] * (int(end * 10) + 1)
    for t in ok:
        if t >= 0:
            per_100ms[int(t * 10)] += 1
    # The last phase ends when fewer than `concurrency` items were left (the client can no longer
    # fill the limit); every other phase at the next change.
    conc = line["concurrency"]
    tail = sorted(ok)[max(0, len(ok) - conc - 1)] if ok else 0
    settles = []
    for i, (tc, r) in enumerate(changes):
        until = changes[i + 1][0] if i + 1 < len(changes) else tail
        reached, stays = settle(ok, tc, r, until)
        # the first 100 ms bin (from the signal on) whose count is within 10% of the new limit
        first_bin = None
        k = 0
        while tc + (k + 1) * 0.1 <= until:
            c = sum(1 for t in ok if tc + k * 0.1 <= t < tc + (k + 1) * 0.1)
            if abs(c - r * 0.1) <= 0.1 * r * 0.1 + 1e-9:
                first_bin = round(k * 0.1, 1)
                break
            k += 1
        settles.append({"change_at_s": round(tc, 3), "new_limit": r, "window_until_s": round(until, 2),
                        "within_10pct_first_s": reached, "within_10pct_from_s": stays,
                        "first_100ms_bin_within_10pct_s": first_bin})
    line.update({"access_log_status": dict(sorted(status.items())), "admitted_per_second": per_sec,
                 "admitted_per_100ms": per_100ms, "settle": settles})
    print(json.dumps(line))

def fmt(x, nd=2):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

def verdict(d, wall_max, att_max=None):
    miss = []
    if d["failed"]:
        miss.append("failed")
    if d.get("wall_over_ideal") is not None and d["wall_over_ideal"] > wall_max:
        miss.append("wall")
    if att_max is not None and d["attempts_per_prompt"] > att_max:
        miss.append("attempts")
    return "ok" if not miss else "MISS: " + ", ".join(miss)

def cmd_table(a):
    kind = a[0]
    rows = [json.loads(l) for l in open(a[1]) if l.strip()]
    if kind == "matrix":
        print("| rate r/s | concurrency | Retry-After | prompts | wall s | wall/ideal | ok | failed | attempts/prompt | 429s | p99 s | target |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for d in rows:
            print(f'| {d["rate"]} | {d["concurrency"]} | {d["retry_after"]} | {d["prompts"]} | {d["wall_s"]:.2f} | '
                  f'{d["wall_over_ideal"]:.3f} | {d["ok"]} | {d["failed"]} | {d["attempts_per_prompt"]:.3f} | '
                  f'{d["http_429"]} | {d["p99_s"]:.2f} | {verdict(d, 1.10, 1.10)} |')
    elif kind == "mixed":
        print("| run | wall s | ideal s | wall/ideal | (every request the limiter passed) / rate | wall / that | ok | failed | attempts/prompt | 429s | retries by cause | retries logged (class/status) | access log statuses | target |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for d in rows:
            print(f'| {d.get("run")} | {d["wall_s"]:.2f} | {d["ideal_s"]} | {d["wall_over_ideal"]:.3f} | {d.get("ideal_with_retries_s")} | {d.get("wall_over_ideal_with_retries")} | {d["ok"]} | {d["failed"]} | '
                  f'{d["attempts_per_prompt"]:.3f} | {d["http_429"]} | {json.dumps(d["retries_by_cause"])} | '
                  f'{json.dumps(d["retries_logged"])} | {json.dumps(d.get("access_log_status"))} | {verdict(d, 1.15)} |')
    elif kind == "change":
        print("| run | wall s | ideal s | wall/ideal | ok | failed | attempts/prompt | 429s | retries logged | change → limit: 1 s windows within 10% of the limit from (s after the reload signal); first 100 ms bin within 10% | target |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for d in rows:
            st = "; ".join(f'{s["change_at_s"]:.2f} s → {s["new_limit"]}: {fmt(s["within_10pct_from_s"])} s; {fmt(s["first_100ms_bin_within_10pct_s"], 1)} s'
                           for s in d["settle"][1:])
            ok = not d["failed"] and all(s["within_10pct_from_s"] is not None and s["within_10pct_from_s"] <= 2.0 for s in d["settle"][1:])
            print(f'| {d.get("run")} | {d["wall_s"]:.2f} | {d["ideal_s"]} | {d["wall_over_ideal"]:.3f} | {d["ok"]} | {d["failed"]} | '
                  f'{d["attempts_per_prompt"]:.3f} | {d["http_429"]} | {json.dumps(d["retries_logged"])} | {st} | {"ok" if ok else "MISS"} |')
        for d in rows:
            print()
            print(f'run {d.get("run")}: admitted per second (access log, second k = [k, k+1) after keel started): '
                  + " ".join(str(x) for x in d["admitted_per_second"]))
            print()
            print(f'run {d.get("run")}: keel event=pacing (t = s after keel started):')
            print()
            print("```")
            for p in d.get("pacing", []):
                print(" ".join(f"{k}={v}" for k, v in p.items()))
            print("```")
    elif kind == "errors":
        print("| run | mock errors | wall s | ok | failed | attempts/prompt | retries by cause | p50 s | p99 s | 429s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for d in rows:
            print(f'| {d.get("run")} | {d["errors"]} | {d["wall_s"]:.3f} | {d["ok"]} | {d["failed"]} | {d["attempts_per_prompt"]:.3f} | '
                  f'{json.dumps(d["retries_by_cause"])} | {d["p50_s"]:.3f} | {d["p99_s"]:.3f} | {d["http_429"]} |')
        by = collections.defaultdict(dict)
        for d in rows:
            by[d.get("run")][d["errors"]] = d
        print()
        for run, m in by.items():
            if "0%" in m and "10% 503" in m:
                r = m["10% 503"]["wall_s"] / m["0%"]["wall_s"]
                ok = r <= 1.10 and not m["10% 503"]["failed"] and not m["0%"]["failed"]
                print(f'run {run}: wall ratio 10% 503 / 0% = {r:.2f} (target ≤ 1.10 with 0 failed: {"ok" if ok else "MISS"})')
    elif kind == "random":
        table_random(rows)
    elif kind == "unthrottled":
        print("| run | concurrency | client | wall s | p50 s | p99 s | ok | failed | attempts | 429s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for d in rows:
            print(f'| {d.get("run")} | {d["concurrency"]} | {d["client"]} | {d["wall_s"]:.3f} | {d["p50_s"]:.3f} | {d["p99_s"]:.3f} | '
                  f'{d["ok"]} | {d["failed"]} | {d["attempts"]} | {d["http_429"]} |')
        by = collections.defaultdict(dict)
        for d in rows:
            by[(d.get("run"), d["concurrency"])]["keel" if d["client"] == "keel" else "sdk"] = d
        print()
        for (run, c), m in sorted(by.items()):
            if "keel" in m and "sdk" in m:
                w = m["keel"]["wall_s"] / m["sdk"]["wall_s"]
                p = m["keel"]["p99_s"] / m["sdk"]["p99_s"] if m["sdk"]["p99_s"] else float("nan")
                ok = w <= 1.05 and p <= 1.05 and not m["keel"]["failed"]
                print(f'run {run}, concurrency {c}: keel/SDK wall {w:.3f}, p99 {p:.3f} (target ≤ 1.05: {"ok" if ok else "MISS"})')

def table_random(rows):
    print("| run | limit | Retry-After | client | prompts | wall s | ideal s | ok | failed | attempts/prompt | 429s | p50 s | p99 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in rows:
        print(f'| {d.get("run")} | {d["limit"]} | {d["retry_after"]} | {d["client"]} | {d["prompts"]} | {d["wall_s"]:.3f} | '
              f'{d.get("ideal_s", "")} | {d["ok"]} | {d["failed"]} | {d["attempts_per_prompt"]:.3f} | {d["http_429"]} | '
              f'{d["p50_s"]:.3f} | {d["p99_s"]:.3f} |')
    by = collections.defaultdict(dict)
    for d in rows:
        by[(d.get("run"), d["limit"], d["retry_after"])]["keel" if d["client"] == "keel" else "sdk"] = d
    print()
    for (run, limit, ra), m in sorted(by.items(), key=str):
        if "keel" in m and "sdk" in m:
            print(f'run {run}, {limit}, Retry-After {ra}: keel/SDK wall {m["keel"]["wall_s"] / m["sdk"]["wall_s"]:.3f}, '
                  f'failed keel {m["keel"]["failed"]}, SDK {m["sdk"]["failed"]}')
        elif "keel" in m and m["keel"].get("ideal_s"):
            print(f'run {run}, {limit}, Retry-After {ra}: keel wall/ideal {m["keel"]["wall_s"] / m["keel"]["ideal_s"]:.3f}, failed {m["keel"]["failed"]}')

def cmd_ideal(a):
    """Time at which a limit schedule [[t, rate], ...] has admitted N requests."""
    n = float(a[0])
    sched = json.loads(a[1])
    done = 0.0
    for i, (t, r) in enumerate(sched):
        nxt = sched[i + 1][0] if i + 1 < len(sched) else float("inf")
        if done + r * (nxt - t) >= n:
            print(round(t + (n - done) / r, 3))
            return
        done += r * (nxt - t)

{"keel": cmd_keel, "sdk": cmd_sdk, "change": cmd_change, "table": cmd_table, "ideal": cmd_ideal}[sys.argv[1]](sys.argv[2:])
PY
report() { python3 "$dir/report.py" "$@"; }

make_prompts() {  # $1: count -> path
  local f="$dir/prompts-$1.jsonl"
  [ -f "$f" ] || python3 - "$f" "$1" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(1, int(sys.argv[2]) + 1):
        f.write(json.dumps({"id": i, "prompt": f"Prompt {i}: summarise the incident report in two sentences."}) + "\n")
PY
  echo "$f"
}

openai_config="$dir/keel-openai.json"
printf '[{"model":"gpt-4o-mini","base_url":"http://127.0.0.1:%s/v1","api_key":"sk-test"}]\n' "$port" >"$openai_config"
anthropic_config="$dir/keel-anthropic.json"
printf '[{"api_type":"anthropic","model":"claude-3-5-haiku-latest","base_url":"http://127.0.0.1:%s","api_key":"sk-test"}]\n' "$port" >"$anthropic_config"

load1() { cut -d' ' -f1 /proc/loadavg; }
series_load=""
wait_quiet() {  # $1: series name; sets series_load
  local waited=0 l
  l=$(load1)
  if [ -z "$no_wait" ]; then
    while awk -v l="$l" -v m="$max_load" 'BEGIN { exit !(l >= m) }'; do
      if [ "$waited" -ge "$max_wait" ]; then
        note "$1: the 1-minute load is still $l after ${waited}s; running anyway (NOT quiet)"
        break
      fi
      note "$1: 1-minute load $l >= $max_load; waiting 30 s (${waited}s so far)"
      sleep 30
      waited=$((waited + 30))
      l=$(load1)
    done
  fi
  series_load="$(cut -d' ' -f1-3 /proc/loadavg)"
  note "$1: start $(date -u +%FT%TZ), loadavg $series_load (waited ${waited}s)"
  echo "$1 $(date -u +%FT%TZ) loadavg $series_load waited ${waited}s" >>"$dir/loads.txt"
}

fresh_limiter() {  # nginx-limiter.sh start options (the limiter is restarted)
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null
  "$here/nginx-limiter.sh" start --port "$port" --dir "$ldir" "${server_cpu[@]}" "$@" >/dev/null
}

fresh_mock() {  # $1: scenario file
  stop_mock
  port_open "$mock_port" && die "something already listens on 127.0.0.1:$mock_port (--mock-port)"
  "${server_pin[@]}" "$keel" mock --port "$mock_port" --scenario "$1" >"$dir/mock.log" 2>&1 &
  mock_pid=$!
  for _ in $(seq 100); do port_open "$mock_port" && return 0; sleep 0.05; done
  die "keel mock did not come up on 127.0.0.1:$mock_port; see $dir/mock.log"
}

run_keel() {  # $1 tag, $2 config, $3 prompts file, $4 concurrency; sets keel_t0
  local rc=0
  keel_t0=$(date +%s.%N)
  # In the background and waited for, so that a signal reaches the trap at once (which stops it).
  "${client[@]}" "$keel" batch --config "$2" --in "$3" --out "$dir/$1.results.jsonl" --overwrite \
    --concurrency "$4" --progress none --log-level info --summary-json "$dir/$1.summary.json" \
    >"$dir/$1.stdout" 2>"$dir/$1.stderr" &
  keel_pid=$!
  wait "$keel_pid" || rc=$?
  keel_pid=""
  [ "$rc" -le 1 ] || die "keel batch failed (exit $rc); see $dir/$1.stderr"
}

run_sdk() {  # $1 tag, $2 prompts file, $3 concurrency (not in a pipeline: the trap stops it)
  local rc=0
  "${client[@]}" node "$here/sdk-baseline/openai-batch.mjs" --base-url "http://127.0.0.1:$port/v1" \
    --in "$2" --concurrency "$3" --out "$dir/$1.results.jsonl" >"$dir/$1.stdout" 2>"$dir/$1.stderr" &
  keel_pid=$!  # (the client's pid: the trap stops it)
  wait "$keel_pid" || rc=$?
  keel_pid=""
  [ "$rc" -le 1 ] || die "openai-batch.mjs failed (exit $rc); see $dir/$1.stderr"
}

keel_json() {  # $1 tag, $2 extra JSON -> one JSON line
  report keel "$dir/$1.summary.json" "$dir/$1.results.jsonl" "$dir/$1.stderr" "$2"
}

header() {  # $1 series
  local end_load
  end_load="$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "${1%% *} end $(date -u +%FT%TZ) loadavg $end_load" >>"$dir/loads.txt"
  echo "### $1"
  echo
  echo "$(date -u +%FT%TZ); $(nproc) CPUs; Linux $(uname -r); nginx $("$(command -v nginx || echo /usr/sbin/nginx)" -v 2>&1 | sed 's/.*nginx\///');" \
    "keel commit $commit$([ "$dirty" -eq 0 ] || echo " (+$dirty modified tracked files in the tree)"), binary $keel_info;" \
    "loadavg at start $series_load, at the end $end_load (this series' own nginx and keel add about 1); files in $dir"
  echo
}

# ---- series -------------------------------------------------------------------------------------
do_matrix() {
  wait_quiet matrix
  local out="$dir/matrix.jsonl" n tag
  : >"$out"
  for run in $(seq "$runs"); do
    for r in "${rate_list[@]}"; do
      n=$((10 * r))
      local p
      p=$(make_prompts "$n")
      for c in "${conc_list[@]}"; do
        for ra in "${ra_list[@]}"; do
          fresh_limiter --rate "$r" --burst "$burst" --retry-after "$ra"
          tag="matrix-r$r-c$c-ra$ra-run$run"
          run_keel "$tag" "$openai_config" "$p" "$c"
          keel_json "$tag" "{\"series\":\"matrix\",\"run\":$run,\"rate\":$r,\"burst\":$burst,\"retry_after\":\"$ra\",\"concurrency\":$c,\"ideal_s\":$(awk -v n="$n" -v r="$r" 'BEGIN { print n / r }')}" | tee -a "$out"
        done
      done
    done
  done
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null
  header "matrix (limiter burst $burst; N = 10·R prompts; ideal = N/R; load at start $series_load)" >"$dir/matrix.md"
  report table matrix "$out" >>"$dir/matrix.md"
  cat "$dir/matrix.md"
}

do_mixed() {
  wait_quiet mixed
  local out="$dir/mixed.jsonl" n=${prompts_override:-2000} sc="$dir/mixed-scenario.json" tag p
  p=$(make_prompts "$n")
  cat >"$sc" <<'EOF'
{"seed": 7,
 "models": {"claude-3-5-haiku-latest": {"latency_ms": 50,
                                        "errors": {"unavailable": 0.05, "overloaded": 0.05},
                                        "rate_limit_headers": false}}}
EOF
  : >"$out"
  for run in $(seq "$runs"); do
    fresh_mock "$sc"
    fresh_limiter --rate 200 --burst 20 --retry-after 1 --upstream "http://127.0.0.1:$mock_port" --access-log
    tag="mixed-run$run"
    run_keel "$tag" "$anthropic_config" "$p" 64
    "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null  # flushes the access log
    stop_mock
    cp "$dir/mock.log" "$dir/$tag.mock.log"
    cp "$ldir/access.log" "$dir/$tag.access.log"
    keel_json "$tag" "{\"series\":\"mixed\",\"run\":$run,\"rate\":200,\"burst\":20,\"retry_after\":\"1\",\"concurrency\":64,\"ideal_s\":$(awk -v n="$n" 'BEGIN { print n / 200 }')}" >"$dir/$tag.json"
    python3 - "$dir/$tag.json" "$dir/$tag.access.log" "$dir/$tag.mock.log" <<'PY' | tee -a "$out"
import collections, json, sys
d = json.load(open(sys.argv[1]))
d["access_log_status"] = dict(sorted(collections.Counter(l.split()[1] for l in open(sys.argv[2]) if l.strip()).items()))
d["mock"] = open(sys.argv[3]).read().strip().splitlines()[-1]
# The mock's 503/529 passed the limiter too and used its capacity: the wall the limit allows.
passed = sum(v for k, v in d["access_log_status"].items() if k != "429")
d["ideal_with_retries_s"] = round(passed / d["rate"], 2)
d["wall_over_ideal_with_retries"] = round(d["wall_s"] / d["ideal_with_retries_s"], 3)
print(json.dumps(d))
PY
  done
  header "mixed (limiter 200 r/s burst 20 Retry-After 1 → keel mock, Anthropic format, 5% 503 + 5% 529, 50 ms; $n prompts, concurrency 64; load at start $series_load)" >"$dir/mixed.md"
  report table mixed "$out" >>"$dir/mixed.md"
  cat "$dir/mixed.md"
}

sleep_pid=""
sleep_until() {  # $1: epoch seconds (fractional)
  local d
  d=$(awk -v t="$1" -v now="$(date +%s.%N)" 'BEGIN { d = t - now; printf "%.3f", (d > 0 ? d : 0) }')
  sleep "$d" &
  sleep_pid=$!
  wait "$sleep_pid"
  sleep_pid=""
}

do_change() {
  wait_quiet change
  local out="$dir/change.jsonl" n=${prompts_override:-4000} tag p ideal
  p=$(make_prompts "$n")
  ideal=$(report ideal "$n" '[[0,200],[5,100],[15,200]]')
  : >"$out"
  for run in $(seq "$runs"); do
    fresh_limiter --rate 200 --burst 20 --retry-after 1 --access-log
    tag="change-run$run"
    local tlog="$dir/$tag.timer.log" t0
    : >"$tlog"
    t0=$(date +%s.%N)
    (
      trap - EXIT INT
      trap '[ -z "$sleep_pid" ] || kill "$sleep_pid" 2>/dev/null; exit 143' TERM
      sleep_until "$(awk -v t="$t0" 'BEGIN { printf "%.3f", t + 5 }')"
      "$here/nginx-limiter.sh" rate --dir "$ldir" --rate 100 >>"$tlog" 2>&1
      sleep_until "$(awk -v t="$t0" 'BEGIN { printf "%.3f", t + 15 }')"
      "$here/nginx-limiter.sh" rate --dir "$ldir" --rate 200 >>"$tlog" 2>&1
    ) &
    timer_pid=$!
    run_keel "$tag" "$openai_config" "$p" 64
    local kt0="$keel_t0"
    wait "$timer_pid" || die "the rate timer failed; see $tlog"
    timer_pid=""
    "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null  # flushes the access log
    cp "$ldir/access.log" "$dir/$tag.access.log"
    # the reload signals, relative to keel's start
    local changes
    changes=$(python3 - "$tlog" "$kt0" <<'PY'
import json, re, sys
t0 = float(sys.argv[2])
ch = [[0.0, 200]]
for line in open(sys.argv[1]):
    m = re.search(r"rate (\d+)r/s in force: .*signal sent at ([0-9.]+)", line)
    if m:
        ch.append([round(float(m.group(2)) - t0, 3), int(m.group(1))])
if len(ch) != 3:
    sys.exit("expected two rate changes in " + sys.argv[1])
print(json.dumps(ch))
PY
)
    keel_json "$tag" "{\"series\":\"change\",\"run\":$run,\"rate\":\"200→100@5s→200@15s\",\"burst\":20,\"retry_after\":\"1\",\"concurrency\":64,\"ideal_s\":$ideal,\"t0\":$kt0,\"with_pacing\":true,\"changes\":$changes}" >"$dir/$tag.json"
    report change "$dir/$tag.json" "$dir/$tag.access.log" "$kt0" "$changes" | tee -a "$out"
  done
  header "change (limiter burst 20 Retry-After 1, 200 r/s → 100 r/s at 5 s → 200 r/s at 15 s via \`nginx-limiter.sh rate\`; $n prompts, concurrency 64; ideal $ideal s; load at start $series_load)" >"$dir/change.md"
  report table change "$out" >>"$dir/change.md"
  cat "$dir/change.md"
}

do_errors() {
  wait_quiet errors
  local out="$dir/errors.jsonl" n=${prompts_override:-2000} tag p
  p=$(make_prompts "$n")
  [[ "$errors_latency" =~ ^[0-9]+$ ]] || die "--latency needs whole milliseconds"
  echo "{\"seed\": 7, \"models\": {\"gpt-4o-mini\": {\"errors\": {\"unavailable\": 0.10}, \"latency_ms\": $errors_latency}}}" >"$dir/errors-10.json"
  echo "{\"seed\": 7, \"models\": {\"gpt-4o-mini\": {\"latency_ms\": $errors_latency}}}" >"$dir/errors-0.json"
  : >"$out"
  for run in $(seq "$runs"); do
    for e in 0 10; do
      fresh_mock "$dir/errors-$e.json"
      fresh_limiter --rate 100000 --burst 100000 --retry-after 1 --upstream "http://127.0.0.1:$mock_port"
      tag="errors-$e-run$run"
      run_keel "$tag" "$openai_config" "$p" 64
      stop_mock
      cp "$dir/mock.log" "$dir/$tag.mock.log"
      local label="0%"
      [ "$e" = 0 ] || label="$e% 503"
      keel_json "$tag" "{\"series\":\"errors\",\"run\":$run,\"errors\":\"$label\",\"concurrency\":64}" | tee -a "$out"
    done
  done
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null
  local lat="no latency"
  [ "$errors_latency" = 0 ] || lat="$errors_latency ms latency"
  header "errors (no effective limit: 100000 r/s burst 100000 → keel mock, $lat; $n prompts, concurrency 64; load at start $series_load)" >"$dir/errors.md"
  report table errors "$out" >>"$dir/errors.md"
  cat "$dir/errors.md"
}

do_unthrottled() {
  wait_quiet unthrottled
  local out="$dir/unthrottled.jsonl" n=${prompts_override:-2000} tag p sc="$dir/unthrottled-scenario.json"
  p=$(make_prompts "$n")
  echo '{"seed": 7, "models": {"gpt-4o-mini": {"latency_ms": 50}}}' >"$sc"
  : >"$out"
  for run in $(seq "$runs"); do
    for c in 16 64; do
      fresh_mock "$sc"
      fresh_limiter --rate 100000 --burst 100000 --retry-after 1 --upstream "http://127.0.0.1:$mock_port"
      tag="unthrottled-keel-c$c-run$run"
      run_keel "$tag" "$openai_config" "$p" "$c"
      keel_json "$tag" "{\"series\":\"unthrottled\",\"run\":$run,\"concurrency\":$c}" | tee -a "$out"

      fresh_mock "$sc"
      fresh_limiter --rate 100000 --burst 100000 --retry-after 1 --upstream "http://127.0.0.1:$mock_port"
      tag="unthrottled-sdk-c$c-run$run"
      run_sdk "$tag" "$p" "$c"
      report sdk "$(cat "$dir/$tag.stdout")" "{\"series\":\"unthrottled\",\"run\":$run,\"concurrency\":$c}" | tee -a "$out"
    done
  done
  stop_mock
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null
  header "unthrottled (no effective limit → keel mock, 50 ms latency; $n prompts; load at start $series_load)" >"$dir/unthrottled.md"
  report table unthrottled "$out" >>"$dir/unthrottled.md"
  cat "$dir/unthrottled.md"
}

do_random() {
  wait_quiet random
  local out="$dir/random.jsonl" n=${prompts_override:-10000} tag p p2 ra
  p=$(make_prompts "$n")
  p2=$(make_prompts 2000)
  : >"$out"
  for run in $(seq "$runs"); do
    for ra in 1 none; do
      fresh_limiter --rate 100000 --burst 100000 --retry-after "$ra" --random-429 5
      tag="random-nolimit-ra$ra-keel-run$run"
      run_keel "$tag" "$openai_config" "$p" 64
      keel_json "$tag" "{\"series\":\"random\",\"run\":$run,\"limit\":\"none\",\"retry_after\":\"$ra\",\"concurrency\":64}" | tee -a "$out"

      fresh_limiter --rate 100000 --burst 100000 --retry-after "$ra" --random-429 5
      tag="random-nolimit-ra$ra-sdk-run$run"
      run_sdk "$tag" "$p" 64
      report sdk "$(cat "$dir/$tag.stdout")" "{\"series\":\"random\",\"run\":$run,\"limit\":\"none\",\"retry_after\":\"$ra\",\"concurrency\":64}" | tee -a "$out"
    done
    fresh_limiter --rate 200 --burst 20 --retry-after 1 --random-429 5
    tag="random-limit200-keel-run$run"
    run_keel "$tag" "$openai_config" "$p2" 64
    keel_json "$tag" "{\"series\":\"random\",\"run\":$run,\"limit\":\"200 r/s burst 20\",\"retry_after\":\"1\",\"concurrency\":64,\"ideal_s\":10}" | tee -a "$out"
  done
  "$here/nginx-limiter.sh" stop --dir "$ldir" >/dev/null
  header "random (5% of requests refused 429 at random by nginx split_clients, before limit_req; nginx's fixed reply; concurrency 64; load at start $series_load)" >"$dir/random.md"
  report table random "$out" >>"$dir/random.md"
  cat "$dir/random.md"
}

note "$(date -u +%FT%TZ): series $series; keel $keel_src (commit $commit, $keel_info); files in $dir"
case "$series" in
  matrix) do_matrix ;;
  mixed) do_mixed ;;
  change) do_change ;;
  errors) do_errors ;;
  unthrottled) do_unthrottled ;;
  random) do_random ;;
  all) do_matrix; do_mixed; do_change; do_errors; do_unthrottled; do_random ;;
esac
note "done; files in $dir"
