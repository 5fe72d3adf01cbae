#!/usr/bin/env bash
# Install everything llava-queue needs into ./.venv (safe to run again: it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || { apt-get update -qq && apt-get install -y -qq python3-venv && "$PYTHON" -m venv .venv; }
fi
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build. On a GPU machine set
# LLAVA_QUEUE_TORCH to the CUDA build you want (for example "torch==2.13.0 --index-url ...").
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet ${LLAVA_QUEUE_TORCH:-torch==2.13.0}
fi
.venv/bin/pip install --quiet -e ".[worker,test]"
# The engine builds its CPU kernels (decode attention, layer operations) with g++ on first use
# (workers/engine/cpu_kernels.py).
command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++)
