#!/usr/bin/env bash
# Install what is needed, then run the whole stack: embedded Redis, one worker, the API on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/llava-queue up "$@"
