#!/usr/bin/env bash
# Install what is needed, then run the whole stack: embedded Redis, one worker, the API on 127.0.0.1:8000 (or
# LLAVA_QUEUE_HOST and LLAVA_QUEUE_PORT; options go to `llava-queue up`: --port, --model-path, --redis-url, ...).
# It stays in the caller's folder: a relative path in its options (--model-path ./my-model, --redis-dir data)
# is the caller's, as it is for `llava-queue up` itself (it was read from the checkout's root).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/install.sh"
exec "$root/.venv/bin/llava-queue" up "$@"
