#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on a real local Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -p no:logging -p no:cacheprovider --durations=30 "$@"
