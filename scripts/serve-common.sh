# Sourced by scripts/bench-serve.sh and scripts/bench-serve-streams.sh: the keel binary to use, a
# run directory cleaned up with the processes started in it, and the URL a server prints.
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
