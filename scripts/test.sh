#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (real Redis, real Celery worker, real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
