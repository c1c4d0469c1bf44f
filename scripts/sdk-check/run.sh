#!/usr/bin/env bash
# Checks keel's mock LLM server against the official OpenAI, Anthropic and Bedrock Runtime Node
# SDKs. Usage: scripts/sdk-check/run.sh /path/to/keel
# Starts `keel mock` on a free port with scenario.json, runs check.mjs (one PASS/FAIL line per
# check), stops the mock and exits non-zero if any check failed. Needs Node >= 18.20 (checked on
# Debian 12's nodejs 18.20.4 with its npm 9.2.0, and on Node 20); runs `npm ci` the first time.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
keel="${1:?usage: $0 /path/to/keel}"
[[ -x "$keel" ]] || { echo "not an executable: $keel" >&2; exit 2; }
keel="$(cd "$(dirname "$keel")" && pwd)/$(basename "$keel")"  # the script changes directory

cd "$here"
[[ -d node_modules ]] || npm ci --no-audit --no-fund >&2

log="$(mktemp)"
"$keel" mock --port 0 --scenario "$here/scenario.json" --seed 1 >"$log" 2>&1 &
mock_pid=$!
cleanup() {
  kill "$mock_pid" 2>/dev/null || true
  wait "$mock_pid" 2>/dev/null || true
  sed -n 's/^keel mock: stopped/mock: stopped/p' "$log"
  rm -f "$log"
}
trap cleanup EXIT

url=""
for _ in $(seq 100); do
  url="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -1 || true)"
  [[ -n "$url" ]] && break
  kill -0 "$mock_pid" 2>/dev/null || { cat "$log" >&2; exit 2; }
  sleep 0.05
done
[[ -n "$url" ]] || { echo "keel mock did not print its address:" >&2; cat "$log" >&2; exit 2; }
echo "mock: $url ($("$keel" --version 2>/dev/null | head -1 || true))"

# The pinned AWS SDK declares Node >= 20 and warns below 22; it runs on 18.20 (every check passes).
AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED=true MOCK_URL="$url" node check.mjs
