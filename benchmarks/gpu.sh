#!/usr/bin/env bash
# The full-size GPU measurements of issue 6, for a machine with one CUDA GPU:
#   step_time  SD-2.1 width (model_channels 320), fp16: our UNet + ControlNet step against diffusers'
#   latency    the released preset (2.45 B params, random weights), fp16 and fp32, batch 1 and 4, 50 DDIM steps
# Raw logs and JSON go to $OUT when set (the device tool's folder that comes back), else benchmarks/results/.
# COMPILE=1 adds the same two runs with --compile (each configuration then compiles first: minutes).
#
# The lent GPU machines have no network: diffusers and omegaconf travel as wheels in .whl/ (see README.md);
# they are installed from there when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

run() {  # run NAME ARGS...: tee the log to $DEST/NAME.txt, JSON to $DEST/NAME.json
  local name=$1
  shift
  "$PY" "$@" --json "$DEST/$name.json" 2>&1 | tee "$DEST/$name.txt"
}

run gpu-step_time benchmarks/step_time.py --full --device cuda --dtype fp16 --warmup 5 --runs 20
run gpu-latency benchmarks/latency.py --preset released --device cuda --dtype fp16 fp32 --batch 1 4 --steps 50

if [[ ${COMPILE:-0} == 1 ]]; then
  run gpu-step_time-compile benchmarks/step_time.py --full --device cuda --dtype fp16 --warmup 3 --runs 20 --compile
  run gpu-latency-compile benchmarks/latency.py --preset released --device cuda --dtype fp16 --batch 1 4 \
    --steps 50 --warmup 2 --compile
fi
