#!/usr/bin/env bash
# Creates .venv with everything the project needs. torch is pinned to the CPU build first:
# an unpinned torch would pull a multi-GB CUDA build onto a CPU machine. On GPU machines,
# install the CUDA torch you want first (or set TORCH_SPEC), then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
