#!/usr/bin/env bash
# A stock rate limiter that keel's authors did not write: Debian's nginx with limit_req, in front
# of a fixed OpenAI-shaped chat completion (or of an upstream such as `keel mock`). It sends no
# x-ratelimit-* headers; a rejected request gets 429, an OpenAI-shaped JSON error and (unless
# --retry-after none) Retry-After: N.
#
# Usage:
#   scripts/limiter/nginx-limiter.sh start --port P --rate R --burst B [--retry-after N|none]
#                                          [--upstream http://HOST:PORT] [--dir DIR] [--cpu N]
#                                          [--access-log] [--random-429 PCT]
#   scripts/limiter/nginx-limiter.sh rate   (--port P | --dir DIR) --rate R
#   scripts/limiter/nginx-limiter.sh stop   (--port P | --dir DIR)
#   scripts/limiter/nginx-limiter.sh status (--port P | --dir DIR)
#
#   --port P          listen on 127.0.0.1:P only
#   --rate R          limit_req rate: an integer per second (200 = 200r/s), or "Nr/s", "Nr/m"
#   --burst B         limit_req burst (with nodelay): B + 1 requests pass at once from idle
#   --retry-after N   Retry-After value in seconds on the 429 (default 1); "none" omits the header
#   --upstream URL    proxy_pass to http://HOST:PORT (HTTP/1.1 keepalive) instead of answering
#                     200 itself; the upstream's status, headers and body pass through unchanged
#   --dir DIR         config, pid file and error log (default /tmp/keel-limiter-P)
#   --cpu N           pin the nginx worker to CPU N (worker_cpu_affinity); default unpinned
#   --access-log      log every request as "$msec $status" (epoch seconds with ms, HTTP status)
#                     to DIR/access.log, buffered (64k, flushed every second) so that admitted
#                     requests per 100 ms / per second can be counted afterwards. Off by default:
#                     it costs a write per 64 KiB and a little CPU per request (see README.md)
#   --random-429 PCT  also refuse PCT percent of requests (e.g. 5 or 0.5) at random, whatever the
#                     rate (nginx split_clients on $request_id): the same 429, body and
#                     Retry-After as the limit's, decided before limit_req (a refused request
#                     does not use the limit). A busy shared pool looks like this to a client
#
# `rate` rewrites the running instance's limit_req_zone rate (and the RPM stated in its 429
# body) in DIR/nginx.conf, checks the config and reloads nginx (`nginx -s reload`); everything
# else stays. limit_req's state (the zone in shared memory) survives the reload; the new rate
# applies to every request the new worker handles, within milliseconds. The old worker closes
# its keep-alive connections (clients reconnect). Prints the time from signal to new worker.
#
# ONE limit for every request (the zone's key is a constant string, not the client address).
# Rate-limited: every path except /limiter/health (200 "ok") and /limiter/status (stub_status).
# Without --upstream, POST /v1/chat/completions answers a fixed chat.completion, any other path
# an OpenAI-shaped 404. Installs nginx with apt-get when it is missing, with the system service
# kept from starting (policy-rc.d) and disabled; only this script's own instance ever runs.
set -euo pipefail

prog="nginx-limiter.sh"
die() { echo "$prog: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; }

[ $# -ge 1 ] || { usage >&2; exit 2; }
cmd="$1"
shift
case "$cmd" in
  start | stop | status | rate) ;;
  -h | --help | help) usage; exit 0 ;;
  *) die "unknown command '$cmd' (start, stop, status or rate; see --help)" ;;
esac

port="" rate="" burst="" retry_after=1 upstream="" dir="" cpu="" access_log="" random_429=""
while [ $# -gt 0 ]; do
  case "$1" in
    --access-log) access_log=1; shift; continue ;;
    --port | --rate | --burst | --retry-after | --upstream | --dir | --cpu | --random-429)
      [ $# -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --port) port="$2" ;;
        --rate) rate="$2" ;;
        --burst) burst="$2" ;;
        --retry-after) retry_after="$2" ;;
        --upstream) upstream="$2" ;;
        --dir) dir="$2" ;;
        --cpu) cpu="$2" ;;
        --random-429) random_429="$2" ;;
      esac
      shift 2
      ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
if [ -n "$port" ]; then
  if ! is_uint "$port" || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    die "--port: expected 1..65535, got '$port'"
  fi
fi
if [ -z "$dir" ]; then
  [ -n "$port" ] || die "$cmd needs --port P or --dir DIR"
  dir="/tmp/keel-limiter-$port"
fi

find_nginx() {
  if command -v nginx >/dev/null 2>&1; then command -v nginx
  elif [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx
  else return 1
  fi
}

running_pid() {  # the pid of this dir's nginx master, if it is alive
  local pid
  [ -f "$dir/nginx.pid" ] || return 1
  pid=$(cat "$dir/nginx.pid" 2>/dev/null) || return 1
  is_uint "$pid" && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

parse_rate() {  # $rate -> rate_n, rate_unit, rpm
  if [[ "$rate" =~ ^([0-9]+)$ ]]; then
    rate_n="${BASH_REMATCH[1]}" rate_unit="r/s"
  elif [[ "$rate" =~ ^([0-9]+)(r/s|r/m)$ ]]; then
    rate_n="${BASH_REMATCH[1]}" rate_unit="${BASH_REMATCH[2]}"
  else
    die "--rate: expected an integer per second (200) or Nr/s or Nr/m, got '$rate'"
  fi
  [ "$rate_n" -ge 1 ] || die "--rate must be at least 1"
  rpm=$([ "$rate_unit" = "r/s" ] && echo $((rate_n * 60)) || echo "$rate_n")
}

worker_pids() {  # the master's children (its workers), sorted
  pgrep -P "$1" 2>/dev/null | sort -n | tr '\n' ' ' || true
}

# ---- stop / status ------------------------------------------------------------------------------
if [ "$cmd" = stop ]; then
  if ! pid=$(running_pid); then
    echo "$prog: no limiter running in $dir"
    exit 0
  fi
  kill -TERM "$pid"  # nginx: fast shutdown of master and workers
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$prog: nginx (pid $pid) did not exit within 5 s" >&2
    exit 1
  fi
  echo "$prog: stopped nginx (pid $pid) of $dir"
  exit 0
fi
if [ "$cmd" = status ]; then
  if ! pid=$(running_pid); then
    echo "$prog: no limiter running in $dir"
    exit 1
  fi
  echo "nginx pid $pid, dir $dir"
  [ -f "$dir/limiter.env" ] && cat "$dir/limiter.env"
  sp=$(sed -n 's/^LIMITER_PORT=//p' "$dir/limiter.env" 2>/dev/null || true)
  [ -n "$sp" ] && command -v curl >/dev/null && curl -s "http://127.0.0.1:$sp/limiter/status"
  exit 0
fi

if [ "$cmd" = rate ]; then
  [ -n "$rate" ] || die "rate needs --rate R (requests per second, e.g. 100)"
  for o in burst upstream cpu access_log; do
    [ -z "${!o}" ] || die "rate changes only the rate; restart the limiter to change --${o//_/-}"
  done
  parse_rate
  pid=$(running_pid) || die "no limiter running in $dir"
  conf="$dir/nginx.conf"
  grep -Eq '^ *limit_req_zone .* rate=[0-9]+r/[sm];$' "$conf" ||
    die "$conf has no limit_req_zone line written by this script"
  nginx_bin=$(find_nginx) || die "nginx not found"
  # The zone's rate, the RPM the 429 body states, the header comment and limiter.env; the
  # zone's name, size and key stay, so nginx reuses its shared memory (and limit_req's state).
  sed -E -e "s|^( *limit_req_zone .* rate=)[0-9]+r/[sm];\$|\1${rate_n}${rate_unit};|" \
    -e "s|(on requests per min \(RPM\): Limit )[0-9]+,|\1${rpm},|" \
    -e "1s|--rate [^ ]+ |--rate ${rate_n}${rate_unit} |" "$conf" >"$conf.new"
  "$nginx_bin" -t -q -p "$dir" -c "$conf.new" -e "$dir/error.log" || {
    rm -f "$conf.new"
    die "nginx rejected the rewritten config (left $conf as it was)"
  }
  mv "$conf.new" "$conf"
  if [ -f "$dir/limiter.env" ]; then
    sed -i -E "s|^LIMITER_RATE=.*|LIMITER_RATE=${rate_n}${rate_unit}|" "$dir/limiter.env"
  fi
  before=$(worker_pids "$pid")
  t0=$(date +%s%N)
  "$nginx_bin" -s reload -p "$dir" -c "$conf" -e "$dir/error.log" 2>/dev/null || kill -HUP "$pid"
  # Wait for a worker that was not there before: it runs with the new config.
  new=""
  for _ in $(seq 500); do
    for w in $(worker_pids "$pid"); do
      case " $before " in *" $w "*) ;; *) new="$w" ;; esac
    done
    [ -z "$new" ] || break
    sleep 0.01
  done
  [ -n "$new" ] || die "no new nginx worker within 5 s of the reload; see $dir/error.log"
  t1=$(date +%s%N)
  echo "$prog: rate ${rate_n}${rate_unit} in force: nginx (pid $pid) reloaded, new worker $new" \
    "after $(((t1 - t0) / 1000000)) ms (signal sent at $(awk -v t="$t0" 'BEGIN { printf "%.3f", t / 1e9 }'))"
  exit 0
fi

# ---- start: validate ----------------------------------------------------------------------------
[ -n "$port" ] || die "start needs --port P"
[ -n "$rate" ] || die "start needs --rate R (requests per second, e.g. 200)"
[ -n "$burst" ] || die "start needs --burst B (e.g. 20)"
parse_rate
is_uint "$burst" || die "--burst: expected an integer >= 0, got '$burst'"
if [ "$retry_after" != none ]; then
  is_uint "$retry_after" || die "--retry-after: expected whole seconds or 'none', got '$retry_after'"
fi
if [ -n "$random_429" ]; then
  [[ "$random_429" =~ ^[0-9]{1,2}(\.[0-9]{1,2})?$ ]] ||
    die "--random-429: expected a percentage below 100 such as 5 or 0.5, got '$random_429'"
fi
if [ -n "$cpu" ]; then
  if ! is_uint "$cpu" || [ "$cpu" -ge "$(nproc)" ]; then
    die "--cpu: expected 0..$(($(nproc) - 1)), got '$cpu'"
  fi
fi
up_hostport=""
if [ -n "$upstream" ]; then
  [[ "$upstream" =~ ^http://([A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\]):([0-9]+)/?$ ]] ||
    die "--upstream: expected http://HOST:PORT (no path, no https), got '$upstream'"
  up_hostport="${BASH_REMATCH[1]}:${BASH_REMATCH[2]}"
fi
if pid=$(running_pid); then
  die "a limiter is already running in $dir (pid $pid); run: $0 stop --dir $dir"
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  die "something already listens on 127.0.0.1:$port"
fi

# ---- start: nginx -------------------------------------------------------------------------------
install_nginx() {
  local sudo="" pkg="" made_policy=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "nginx is missing and I am not root (apt-get install nginx)"
    sudo="sudo"
  fi
  echo "$prog: nginx not found; installing it with apt-get (the system service is not started)" >&2
  $sudo apt-get update -qq >&2
  for p in nginx nginx-light; do  # Debian 12: nginx is the real package, nginx-light a transition
    if apt-cache policy "$p" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then pkg="$p"; break; fi
  done
  [ -n "$pkg" ] || die "apt has neither nginx nor nginx-light"
  # Keep the package's postinst from starting the system nginx on port 80 (Debian's policy-rc.d
  # mechanism); only when no policy is in place already.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  local rc=0
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$pkg" >&2 || rc=$?
  [ -z "$made_policy" ] || $sudo rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] || die "apt-get install $pkg failed"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    $sudo systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
}
nginx_bin=$(find_nginx) || { install_nginx; nginx_bin=$(find_nginx) || die "nginx still not found after install"; }

mkdir -p "$dir/tmp"
: >"$dir/error.log"
chmod 755 "$dir" "$dir/tmp"  # the worker (user nobody when started as root) may need temp files

# ---- start: config ------------------------------------------------------------------------------
if [ "$retry_after" = none ]; then
  retry_header=""
  try_again="Please retry later."
else
  retry_header="            add_header Retry-After $retry_after always;"
  try_again="Please try again in ${retry_after}s."
fi
limited_body="{\"error\":{\"message\":\"Rate limit reached for requests in organization org-keel-limiter on requests per min (RPM): Limit $rpm, Requested 1. $try_again\",\"type\":\"requests\",\"param\":null,\"code\":\"rate_limit_exceeded\"}}"
ok_body='{"id":"chatcmpl-keel-limiter","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","system_fingerprint":null,"choices":[{"index":0,"message":{"role":"assistant","content":"This is a fixed reply from the nginx limiter.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":10,"total_tokens":22}}'
notfound_body='{"error":{"message":"Unknown request URL. Only POST /v1/chat/completions is served here.","type":"invalid_request_error","param":null,"code":"unknown_url"}}'

# As many descriptors as the hard limit allows (65536 at most): setrlimit above it fails.
nofile=$(ulimit -Hn)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 65536 ]; then nofile=65536; fi
affinity=""
if [ -n "$cpu" ]; then
  mask="1"
  for _ in $(seq "$cpu"); do mask="${mask}0"; done
  affinity="worker_cpu_affinity $mask;"
fi

limit="            limit_req zone=keel_limiter burst=$burst nodelay;"
random_block=""
if [ -n "$random_429" ]; then
  # `return` runs in the rewrite phase, before limit_req (preaccess): a random refusal does not
  # use the limit. error_page 429 gives it the limit's body and Retry-After.
  random_block="    split_clients \"\${request_id}\" \$keel_random_429 {
        ${random_429}% 1;
        * \"\";
    }"
  limit="            if (\$keel_random_429) {
                return 429;
            }
$limit"
fi
if [ -n "$upstream" ]; then
  upstream_block="    upstream keel_upstream {
        server $up_hostport max_fails=0;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }"
  # nginx's own 502/504 (upstream refused, reset or timed out) in the OpenAI error shape too;
  # the upstream's own 5xx pass through untouched (proxy_intercept_errors off).
  content="        error_page 502 = @bad_gateway;
        error_page 504 = @gateway_timeout;
        location @bad_gateway {
            default_type application/json;
            return 502 '{\"error\":{\"message\":\"Bad gateway: the limiter could not reach its upstream.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}';
        }
        location @gateway_timeout {
            default_type application/json;
            return 504 '{\"error\":{\"message\":\"Gateway timeout: the upstream did not answer in time.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}';
        }
        location / {
$limit
            proxy_pass http://keel_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $up_hostport;
            proxy_next_upstream off;
            proxy_intercept_errors off;
            proxy_connect_timeout 5s;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            proxy_buffers 16 16k;
            proxy_buffer_size 16k;
        }"
else
  upstream_block=""
  # limit_req runs in nginx's preaccess phase, `return` in the earlier rewrite phase: a `return`
  # in the limited location would answer before limit_req ever ran (every request a 200). So
  # the limited location passes on (try_files runs after preaccess) to a named one that returns.
  content="        location = /v1/chat/completions {
$limit
            try_files /.keel-limiter-no-such-file @completion;
        }
        location @completion {
            default_type application/json;
            return 200 '$ok_body';
        }
        location / {
$limit
            try_files /.keel-limiter-no-such-file @not_found;
        }
        location @not_found {
            default_type application/json;
            return 404 '$notfound_body';
        }"
fi

if [ -n "$access_log" ]; then
  : >"$dir/access.log"
  chmod 644 "$dir/access.log"
  # $msec: epoch seconds with millisecond resolution, when the answer was logged.
  log_config="    log_format keel_limiter '\$msec \$status';
    access_log $dir/access.log keel_limiter buffer=64k flush=1s;"
else
  log_config="    access_log off;"
fi

cat >"$dir/nginx.conf" <<EOF
# Generated by scripts/limiter/nginx-limiter.sh $(printf '%q ' start --port "$port" --rate "$rate" --burst "$burst" --retry-after "$retry_after" ${upstream:+--upstream "$upstream"} --dir "$dir" ${cpu:+--cpu "$cpu"} ${access_log:+--access-log} ${random_429:+--random-429 "$random_429"})
daemon on;
master_process on;
worker_processes 1;
$affinity
worker_rlimit_nofile $nofile;
pid $dir/nginx.pid;
error_log $dir/error.log warn;

events {
    worker_connections 20000;
    multi_accept on;
}

http {
$log_config
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;

    # One shared limit: the key is a constant, so every client address counts against it.
    limit_req_zone "keel-limiter" zone=keel_limiter:1m rate=${rate_n}${rate_unit};
    limit_req_status 429;
    limit_req_log_level info;  # below error_log's level: rejections are not logged
$random_block
$upstream_block

    server {
        listen 127.0.0.1:$port backlog=4096;  # no reuseport: a second instance on P must fail
        server_name keel-limiter;

        error_page 429 = @limited;
        location @limited {
            default_type application/json;
$retry_header
            return 429 '$limited_body';
        }

        location = /limiter/health {
            default_type text/plain;
            return 200 "ok\n";
        }
        location = /limiter/status {
            stub_status;
        }

$content
    }
}
EOF

"$nginx_bin" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" ||
  die "nginx rejected the generated config $dir/nginx.conf"
"$nginx_bin" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" || {
  echo "$prog: nginx failed to start; $dir/error.log:" >&2
  tail -n 5 "$dir/error.log" >&2 || true
  exit 1
}

ready=""
for _ in $(seq 100); do
  if pid=$(running_pid) && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ready=1; break; fi
  sleep 0.05
done
[ -n "$ready" ] || { echo "$prog: nginx did not come up on 127.0.0.1:$port; see $dir/error.log" >&2; exit 1; }

cat >"$dir/limiter.env" <<EOF
LIMITER_PORT=$port
LIMITER_RATE=${rate_n}${rate_unit}
LIMITER_BURST=$burst
LIMITER_RETRY_AFTER=$retry_after
LIMITER_UPSTREAM=$upstream
LIMITER_RANDOM_429=$random_429
LIMITER_ACCESS_LOG=$([ -n "$access_log" ] && echo "$dir/access.log" || true)
LIMITER_OPENAI_BASE_URL=http://127.0.0.1:$port/v1
LIMITER_KEEL_BASE_URL=http://127.0.0.1:$port
EOF
echo "$prog: nginx $("$nginx_bin" -v 2>&1 | sed 's/.*nginx\///') (pid $pid) on http://127.0.0.1:$port:" \
  "rate ${rate_n}${rate_unit} burst $burst nodelay, Retry-After $retry_after," \
  "$([ -n "$upstream" ] && echo "upstream $upstream" || echo "fixed 200 reply")," \
  "access log $([ -n "$access_log" ] && echo "$dir/access.log" || echo off); dir $dir"
echo "  OpenAI SDK baseURL: http://127.0.0.1:$port/v1    keel base_url: http://127.0.0.1:$port"
