#!/usr/bin/env bash
# Pin llava-queue's dependencies anew: resolve them afresh (the newest releases pip's index has) in a scratch
# virtual environment and write what it installed to constraints.txt (or the file named), which
# scripts/install.sh and the Dockerfile install with. Run the whole test suite on the result before committing it.
# torch stays out of the pins: install.sh pins it itself, and a CUDA host names its own (LLAVA_QUEUE_TORCH).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-constraints.txt}
PYTHON=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m venv "$scratch/venv"
# shellcheck disable=SC2086
"$scratch/venv/bin/pip" install --quiet ${LLAVA_QUEUE_TORCH:-torch==2.13.0}
"$scratch/venv/bin/pip" install --quiet ".[worker,test]"
{
  echo "# What scripts/install.sh and the Dockerfile install (pip -c): every dependency of llava-queue and its"
  echo "# worker and test extras, pinned to the versions the test suite passed on. Made by scripts/lock.sh."
  "$scratch/venv/bin/pip" freeze --exclude torch --exclude llava-queue
} > "$OUT"
echo "wrote $OUT ($(grep -c '==' "$OUT") pins)"
