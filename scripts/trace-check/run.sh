#!/usr/bin/env bash
# Checks keel's OTLP traces with the OpenTelemetry JS protobuf schema (check.mjs). Usage:
# scripts/trace-check/run.sh /path/to/keel
# Needs Node >= 18.19 (Debian 12's nodejs 18.20 works); runs `npm ci` the first time.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
keel="${1:?usage: $0 /path/to/keel}"
[[ -x "$keel" ]] || { echo "not an executable: $keel" >&2; exit 2; }
keel="$(cd "$(dirname "$keel")" && pwd)/$(basename "$keel")"
cd "$here"
[[ -d node_modules ]] || npm ci --no-audit --no-fund >&2
exec node check.mjs "$keel"
