#!/usr/bin/env bash
# Install everything llava-queue needs into ./.venv (safe to run again: it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || { apt-get update -qq && apt-get install -y -qq python3-venv && "$PYTHON" -m venv .venv; }
fi
# torch first, pinned: an unpinned torch would pull the newest multi-GB CUDA build. The pin takes whichever
# 2.13.0 build pip's index has (the CPU one on the machines this project is built on; PyPI's own Linux wheel is
# the CUDA one): LLAVA_QUEUE_TORCH names another, e.g. "torch==2.13.0 --index-url .../whl/cpu" or a CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet ${LLAVA_QUEUE_TORCH:-torch==2.13.0}
fi
# Everything else at the versions the test suite passed on (constraints.txt; scripts/lock.sh pins anew): a new
# release of a dependency changes nothing here until it is pinned and tested.
.venv/bin/pip install --quiet -c constraints.txt -e ".[worker,test]"
# The engine builds its CPU kernels (decode attention, layer operations) with g++ on first use
# (workers/engine/cpu_kernels.py).
command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++)
