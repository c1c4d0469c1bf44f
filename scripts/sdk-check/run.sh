#!/usr/bin/env bash
# Checks keel's mock LLM server against the official OpenAI, Anthropic and Bedrock Runtime Node
# SDKs, and `keel serve` with the OpenAI SDK as its client (gateway.mjs). Usage:
# scripts/sdk-check/run.sh /path/to/keel
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
rc=0
AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED=true MOCK_URL="$url" node check.mjs || rc=$?

# keel serve with the OpenAI SDK as its client (gateway.mjs): two gateways in front of the mock.
tmp="$(mktemp -d)"
serve_pids=()
cat >"$tmp/gw.json" <<EOF
{"config_list": [{"model": "gw-primary", "base_url": "$url", "api_key": "sk-gateway-check-1"},
                 {"model": "gw-backup", "base_url": "$url", "api_key": "sk-gateway-check-2"}],
 "policy": {"retry": {"max_attempts": 3, "backoff": {"kind": "constant", "base": 0.01}}}}
EOF
cat >"$tmp/claude.json" <<EOF
{"config_list": [{"api_type": "anthropic", "model": "gw-claude", "base_url": "$url", "api_key": "sk-gateway-check-4"}]}
EOF
cat >"$tmp/bedrock.json" <<EOF
{"config_list": [{"api_type": "bedrock", "model": "anthropic.gw-bedrock", "base_url": "$url", "aws_region": "us-east-1"}]}
EOF
cat >"$tmp/limited.json" <<EOF
{"config_list": [{"model": "gw-limited", "base_url": "$url", "api_key": "sk-gateway-check-3"}],
 "policy": {"retry": {"max_attempts": 1}}}
EOF
cat >"$tmp/filtered.json" <<EOF
{"config_list": [{"model": "gw-filtered", "base_url": "$url", "api_key": "sk-gateway-check-5"}],
 "policy": {"retry": {"max_attempts": 1}}}
EOF
# Starts a gateway on a free port (in this shell, so that its pid is kept); `served` is its URL.
start_serve() {  # config log [more configs...]
  local config="$1" log="$2" extra=()
  shift 2
  for c in "$@"; do extra+=(--config "$c"); done
  "$keel" serve --config "$config" "${extra[@]}" --listen 127.0.0.1:0 >"$log" 2>&1 &
  serve_pids+=($!)
  served=""
  for _ in $(seq 100); do
    served="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -1 || true)"
    [[ -n "$served" ]] && return 0
    sleep 0.05
  done
  echo "keel serve did not print its address:" >&2
  cat "$log" >&2
  return 1
}
start_serve "$tmp/gw.json" "$tmp/gw.log" "$tmp/claude.json" "$tmp/bedrock.json"
gw="$served"
start_serve "$tmp/limited.json" "$tmp/limited.log" "$tmp/filtered.json"
lim="$served"
echo "serve: $gw (gw-primary -> gw-backup; gw-claude; anthropic.gw-bedrock), $lim (gw-limited; gw-filtered)"
SERVE_URL="$gw" LIMITED_URL="$lim" node gateway.mjs || rc=$?
for p in "${serve_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${serve_pids[@]}"; do wait "$p" 2>/dev/null || true; done
sed -n 's/^keel serve: stopped/serve: stopped/p' "$tmp/gw.log" "$tmp/limited.log"
grep -h 'WARNING' "$tmp/gw.log" "$tmp/limited.log" | grep -v draining | head -5 || true
if grep -q 'sk-gateway-check' "$tmp/gw.log" "$tmp/limited.log"; then
  echo "FAIL keel serve logged a provider key" >&2
  rc=1
fi
rm -rf "$tmp"
exit "$rc"
