#!/usr/bin/env bash
# Issue 18: N concurrent streams through `keel serve` (in front of `keel mock`, each stream
# ~20 chunks, 100 ms apart) and keel serve's peak RSS (VmHWM) while they run.
#
# Usage: scripts/bench-serve-streams.sh [--keel PATH] [--streams N]
# Needs node >= 18 (fetch). Prints the streams that completed with [DONE], the reassembled text
# check, wall time and keel serve's VmHWM before and after.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keel=""
streams=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --keel) keel="$2"; shift ;;
    --streams) streams="$2"; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-serve-streams.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
prog=bench-serve-streams.sh
# shellcheck source=serve-common.sh
. "$here/scripts/serve-common.sh"
find_keel
ulimit -n 65536 2>/dev/null || true
cat >"$dir/scenario.json" <<'JSON'
{"seed": 1, "models": {"streamed": {"stream": {"chunk_latency_ms": 100, "chunk_bytes": 4}}}}
JSON
"$keel" mock --port 0 --scenario "$dir/scenario.json" >"$dir/mock.log" 2>&1 &
pids+=($!)
mock=$(url_of "$dir/mock.log")
cat >"$dir/keel.json" <<JSON
{"config_list": [{"model": "streamed", "base_url": "$mock", "api_key": "sk-bench"}],
 "policy": {"concurrency": 100000}}
JSON
"$keel" serve --config "$dir/keel.json" --listen 127.0.0.1:0 >"$dir/serve.log" 2>&1 &
serve_pid=$!
pids+=($serve_pid)
serve=$(url_of "$dir/serve.log")
hwm() { grep VmHWM "/proc/$serve_pid/status" | awk '{print $2}'; }
echo "keel serve $serve in front of keel mock $mock; $streams streams; VmHWM before: $(hwm) kB"

cat >"$dir/streams.mjs" <<'JS'
const [url, n] = [process.argv[2], Number(process.argv[3])];
const prompt = 'stream me a reply of some length please';
const expected = 'mock answer to: ' + prompt.slice(0, 40);
async function one() {
  const res = await fetch(url + '/v1/chat/completions', {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'streamed', stream: true,
      messages: [{ role: 'user', content: prompt }] }),
  });
  if (res.status !== 200) return { ok: false, why: 'status ' + res.status };
  const body = await res.text();
  let text = '';
  let done = false;
  for (const line of body.split('\n')) {
    if (!line.startsWith('data: ')) continue;
    const d = line.slice(6);
    if (d === '[DONE]') { done = true; continue; }
    const j = JSON.parse(d);
    text += j.choices?.[0]?.delta?.content ?? '';
  }
  return { ok: done && text === expected, why: done ? 'text ' + text : 'no [DONE]' };
}
const t0 = performance.now();
const results = await Promise.all(Array.from({ length: n }, one));
const ok = results.filter((r) => r.ok).length;
const bad = results.find((r) => !r.ok);
console.log(`streams=${n} completed_ok=${ok} wall_s=${((performance.now() - t0) / 1000).toFixed(2)}` +
  (bad ? ` first_failure="${bad.why}"` : ''));
JS
# Sample the RSS while the streams run.
( peak=0; while kill -0 "$serve_pid" 2>/dev/null; do
    r=$(grep VmRSS "/proc/$serve_pid/status" 2>/dev/null | awk '{print $2}'); [ -n "$r" ] && [ "$r" -gt "$peak" ] && peak=$r
    echo "$peak" >"$dir/peak"; sleep 0.05; done ) &
sampler=$!
node "$dir/streams.mjs" "$serve" "$streams"
kill "$sampler" 2>/dev/null || true
echo "keel serve: VmRSS peak while streaming $(cat "$dir/peak") kB, VmHWM after $(hwm) kB"
