# Shell helpers shared by the limiter scripts (sourced, not run).

# Writes $2 prompts to file $1: {"id": i, "prompt": "Prompt i: ..."}, i = 1..N.
write_prompts() {
  python3 - "$1" "$2" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(1, int(sys.argv[2]) + 1):
        f.write(json.dumps({"id": i, "prompt": f"Prompt {i}: summarise the incident report."}) + "\n")
PY
}

# True once something listens on 127.0.0.1:$1 (within 4 s).
wait_listen() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.02
  done
  return 1
}
