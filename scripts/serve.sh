#!/usr/bin/env bash
# Set up (on first run) and start the HTTP service on 127.0.0.1:8000.
#   bash scripts/serve.sh                       # tiny DEMO model (random weights; outputs are noise, labelled)
#   bash scripts/serve.sh weights.safetensors   # real weights: a .safetensors/.ckpt file or an http(s) URL
# Extra arguments go to `anydoor serve` (see `anydoor serve --help`), e.g. --host 0.0.0.0 --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/anydoor ] || bash scripts/setup.sh
weights="${ANYDOOR_WEIGHTS:-}"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a first argument that is not an option is the weights
  weights="$1"
  shift
fi
if [ -n "$weights" ]; then
  exec .venv/bin/anydoor serve --weights "$weights" "$@"
fi
echo "No weights given: serving the tiny DEMO model (random weights, outputs are noise)." >&2
exec .venv/bin/anydoor serve --demo "$@"
