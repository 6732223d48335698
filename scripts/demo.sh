#!/usr/bin/env bash
# Set up (if needed) and run the whole flow on a local embedded Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python ray_job.py demo "$@"
