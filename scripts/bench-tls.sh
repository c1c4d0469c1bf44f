#!/usr/bin/env bash
# keel batch over TLS against a server this project did not write: Debian's nginx terminating TLS
# (TLS 1.3, a P-256 certificate from a throwaway CA) and answering a fixed OpenAI chat completion
# itself, so that the client's TLS is what is measured. Side by side with the plain Go client
# (scripts/loadgen/batch.go, crypto/tls, HTTP/1.1) and, with --keel-before, a second keel binary
# (alternated, to compare two builds). The server on CPU 0, the client under test on CPU 1; CPU
# is the client's user + system time (GNU time).
#
# Usage:
#   scripts/bench-tls.sh [--keel PATH] [--keel-before PATH] [--prompts N] [--concurrency "64 1024"]
#                        [--rounds R] [--no-go]
#
# Every client gets the one-entry config (plus --ca-file for the throwaway CA). Prints one line
# per run: wall, user, system, CPU per item, records written (ok) and latency p50/p99.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keel=""
before=""
prompts=20000
conc="64 1024"
rounds=2
go=1
while [ $# -gt 0 ]; do
  case "$1" in
    --keel) keel="$2"; shift ;;
    --keel-before) before="$2"; shift ;;
    --prompts) prompts="$2"; shift ;;
    --concurrency) conc="$2"; shift ;;
    --rounds) rounds="$2"; shift ;;
    --no-go) go="" ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-tls.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
prog=bench-tls.sh
command -v nginx >/dev/null || { echo "$prog: nginx not found (apt-get install nginx-light)" >&2; exit 2; }
. "$here/scripts/serve-common.sh"
find_keel
tmp="$dir"

# The throwaway CA and the server's certificate (localhost and 127.0.0.1).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/ca.key" \
  -out "$tmp/ca.pem" -days 2 -subj /CN=keel-bench-ca 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$tmp/server.key" \
  -out "$tmp/server.csr" -subj /CN=localhost 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$tmp/ext.cnf"
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -out "$tmp/server.pem" -days 2 -extfile "$tmp/ext.cnf" 2>/dev/null

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
answer='{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"A one-line summary."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}'
cat >"$tmp/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity 01;
pid $tmp/nginx.pid;
error_log $tmp/error.log;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $tmp/body;
  proxy_temp_path $tmp/proxy;
  fastcgi_temp_path $tmp/fastcgi;
  uwsgi_temp_path $tmp/uwsgi;
  scgi_temp_path $tmp/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$port ssl;
    ssl_certificate $tmp/server.pem;
    ssl_certificate_key $tmp/server.key;
    ssl_protocols TLSv1.3;
    location = /v1/chat/completions {
      default_type application/json;
      return 200 '$answer';
    }
  }
}
EOF
nginx -c "$tmp/nginx.conf" -g 'daemon off;' &
pids+=($!)
for _ in $(seq 100); do
  curl -s --cacert "$tmp/ca.pem" -o /dev/null -X POST "https://127.0.0.1:$port/v1/chat/completions" && break
  sleep 0.05
done
url="https://127.0.0.1:$port"

if [ -n "$go" ]; then
  command -v go >/dev/null || { echo "$prog: go not found (apt-get install golang-go), or --no-go" >&2; exit 2; }
  (cd "$here/scripts/loadgen" && HOME="${HOME:-$tmp}" GOCACHE="$tmp/gocache" go build -o "$tmp/gobatch" batch.go)
fi

for i in $(seq "$prompts"); do
  printf '{"id": %d, "prompt": "Summarise item %d in one line"}\n' "$i" "$i"
done >"$tmp/prompts.jsonl"
printf '[{"model": "m", "base_url": "%s", "api_key": "sk-bench-tls-0001"}]\n' "$url" >"$tmp/keel.json"

run_keel() {  # label, binary, concurrency
  measure "$1" "$2" batch --config "$tmp/keel.json" --ca-file "$tmp/ca.pem" \
    --in "$tmp/prompts.jsonl" --out "$tmp/out.jsonl" --overwrite -c "$3" --quiet
}

echo "nginx $(nginx -v 2>&1 | sed 's/.*\///') TLS 1.3 at $url; $prompts prompts; keel $("$keel" --version | head -1)"
for c in $conc; do
  for r in $(seq "$rounds"); do
    [ -n "$go" ] && measure "go c=$c r=$r" "$tmp/gobatch" -url "$url" -ca "$tmp/ca.pem" \
      -in "$tmp/prompts.jsonl" -out "$tmp/out.jsonl" -c "$c"
    if [ -n "$before" ]; then
      if [ $((r % 2)) -eq 1 ]; then
        run_keel "keel-before c=$c r=$r" "$before" "$c"
        run_keel "keel c=$c r=$r" "$keel" "$c"
      else
        run_keel "keel c=$c r=$r" "$keel" "$c"
        run_keel "keel-before c=$c r=$r" "$before" "$c"
      fi
    else
      run_keel "keel c=$c r=$r" "$keel" "$c"
    fi
  done
done
