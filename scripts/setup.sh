#!/usr/bin/env bash
# Create .venv and install AnyDoor Serve into it. `--test` adds the test tools.
# torch is pinned first: a bare `torch` requirement would pull the CUDA build (several GB) on a machine
# without a GPU; set TORCH_SPEC (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124")
# to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
python -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
python -m pip install --quiet -e ".${extras}"
python -c "import torch, model, service; print('installed: torch', torch.__version__)"
