#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (real Redis, real Celery worker, real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The web page's tests drive Debian's Chromium through Playwright (no browser download).
command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
exec .venv/bin/python -m pytest "$@"
