#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (real Redis, real Celery worker, real model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The web page's tests drive Debian's Chromium through Playwright (no browser download).
command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
# The test files run in LLAVA_QUEUE_TEST_PROCESSES processes at once (2 by default; 0 runs them in this one), a
# file's tests together in one of them: most of a test's time is spent waiting on the stack it started.
exec .venv/bin/python -m pytest -n "${LLAVA_QUEUE_TEST_PROCESSES:-2}" --dist loadfile "$@"
