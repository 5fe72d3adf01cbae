"""Offline batches next to interactive users: how fast a batch file is accepted, and what a running batch
costs an interactive job's time to first token.

    python -m bench.batch_priority            # 10,000-line files; a 1,000-question batch; about 2 minutes
    python -m bench.batch_priority --quick    # 2,000-line files; a 200-question batch

One stack (Redis, a worker serving the embedded default model, the API), two parts:

1. Accept: a 10,000-line file through `POST /v1/batches`, three ways (question file uploaded,
   question file with an image per line read from a data-root folder, OpenAI batch file by
   `input_file_id`). Lines/s = lines / the POST's wall time (streaming parse, job records and
   Celery messages written in one pipeline per 500 lines). The worker is paused (SIGSTOP) while
   the API reads, so the figure is the API's own; each batch is cancelled afterwards.
2. Priority: interactive jobs one after the other on the idle worker, then the same jobs while a
   1,000-question batch keeps every engine slot busy (the batch is cancelled at the end). TTFT
   is the job record's first_token_at − created_at (queue wait + prefill), p50 of each; the
   ratio is with-batch / idle. For contrast, the queue position a job would get in the batch
   queue, behind the backlog (FIFO, no priority).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import requests

from bench.e2e import Stack
from shared.settings import get_settings
from workers.default_model import ensure_default_model

QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello.",
             "Name an animal.", "What is water made of?", "Name a planet.", "What day comes after Monday?"]
# A 1x1 PNG: the image of every line of the image variant (read once per batch, cached).
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQ"
                         "AAAABJRU5ErkJggg==")


def question_file(count: int, image: bool = False) -> bytes:
    return "".join(json.dumps({"question_id": index, "text": QUESTIONS[index % len(QUESTIONS)],
                               **({"image": "pixel.png"} if image else {})}) + "\n"
                   for index in range(count)).encode()


def openai_file(count: int, model: str) -> bytes:
    return "".join(json.dumps({"custom_id": f"request-{index}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "max_tokens": 16, "messages": [
                                   {"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]}}) + "\n"
                   for index in range(count)).encode()


def accept(stack: Stack, name: str, lines: int, post) -> dict:
    """Time one batch creation with the worker paused; cancel the batch after."""
    worker = stack.processes["worker"]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        started = time.perf_counter()
        response = post()
        seconds = time.perf_counter() - started
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["request_counts"]["total"] == lines and batch["request_counts"]["failed"] == 0, batch
    requests.post(f"{stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=120)
    return {"name": name, "lines": lines, "seconds": seconds, "lines_per_s": lines / seconds}


def interactive_ttft(stack: Stack, count: int) -> list[dict]:
    """`count` interactive chat jobs one after the other; each one's TTFT and queue wait (seconds)."""
    timings = []
    for index in range(count):
        job = {"messages": [{"role": "user", "text": QUESTIONS[index % len(QUESTIONS)]}], "temperature": 0,
               "max_new_tokens": 8}
        job_id = requests.post(f"{stack.base_url}/v1/jobs", json=job, timeout=10).json()["id"]
        while True:
            record = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
            if record["status"] not in ("queued", "running"):
                break
            time.sleep(0.01)
        assert record["status"] == "succeeded", record
        timings.append({"ttft": record["first_token_at"] - record["created_at"],
                        "wait": record["started_at"] - record["created_at"]})
    return timings


def busy_slots(stack: Stack) -> int:
    workers = requests.get(f"{stack.base_url}/healthz", timeout=10).json()["workers"]
    return sum(worker["num_running"] for worker in workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--accept-lines", type=int, default=10_000)
    parser.add_argument("--batch-questions", type=int, default=1000)
    parser.add_argument("--batch-max-new-tokens", type=int, default=32)
    parser.add_argument("--interactive", type=int, default=10, help="interactive jobs in each phase")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--reserved-slots", type=int, default=0,
                        help="LLAVA_QUEUE_BATCH_RESERVED_SLOTS: slots the worker keeps for interactive jobs")
    parser.add_argument("--skip-accept", action="store_true", help="only the priority part")
    args = parser.parse_args()
    if args.quick:
        args.accept_lines, args.batch_questions, args.interactive = 2000, 200, 5

    data_root = Path(tempfile.mkdtemp(prefix="llava-queue-bench-data-"))
    (data_root / "images").mkdir()
    (data_root / "images" / "pixel.png").write_bytes(PIXEL)
    os.environ.update(LLAVA_QUEUE_DATA_ROOTS=str(data_root), LLAVA_QUEUE_MAX_QUEUED_JOBS="1000000",
                      LLAVA_QUEUE_BATCH_RESERVED_SLOTS=str(args.reserved_slots))
    model_dir = ensure_default_model(get_settings().cache_dir)
    with Stack(model_dir, args.max_num_seqs) as stack:
        model = requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        url, n = f"{stack.base_url}/v1/batches", args.accept_lines
        uploaded = requests.post(f"{stack.base_url}/v1/files", files={"file": ("b.jsonl", openai_file(n, model))},
                                 data={"purpose": "batch"}, timeout=60).json()["id"]
        # The OpenAI lines name the model, checked against the worker's heartbeat: first, while it is fresh.
        accepted = [] if args.skip_accept else [
            accept(stack, "OpenAI batch file (input_file_id)", n, lambda: requests.post(
                url, json={"input_file_id": uploaded, "endpoint": "/v1/chat/completions",
                           "completion_window": "24h"}, timeout=600)),
            accept(stack, "question file, uploaded", n, lambda: requests.post(
                url, files={"file": ("q.jsonl", question_file(n))}, data={"max_new_tokens": "16"}, timeout=600)),
            accept(stack, "question file + image per line (data root)", n, lambda: requests.post(
                url, files={"file": ("q.jsonl", question_file(n, image=True))},
                data={"image_folder": "images", "max_new_tokens": "16"}, timeout=600)),
        ]
        while busy_slots(stack) or sum(requests.get(f"{stack.base_url}/healthz", timeout=10).json()["queued"].values()):
            time.sleep(0.2)

        interactive_ttft(stack, 2)  # warm-up
        idle = interactive_ttft(stack, args.interactive)
        batch = requests.post(url, files={"file": ("q.jsonl", question_file(args.batch_questions))},
                              data={"temperature": "0", "max_new_tokens": str(args.batch_max_new_tokens)},
                              timeout=600).json()
        while busy_slots(stack) < args.max_num_seqs - args.reserved_slots:
            time.sleep(0.05)
        busy = interactive_ttft(stack, args.interactive)
        fifo = requests.post(f"{stack.base_url}/v1/jobs", timeout=10, json={
            "prompt": "Hello", "max_new_tokens": 1, "queue": "batch"}).json()["id"]
        fifo_position = requests.get(f"{stack.base_url}/v1/jobs/{fifo}", timeout=10).json()["queue_position"]
        requests.delete(f"{stack.base_url}/v1/jobs/{fifo}", timeout=10)
        progress = requests.get(f"{url}/{batch['id']}", timeout=10).json()
        requests.post(f"{url}/{batch['id']}/cancel", timeout=120)

    print("\n### Accepting a batch file (POST /v1/batches, worker paused)\n")
    print("| file | lines | seconds | lines/s |\n|---|---:|---:|---:|")
    for row in accepted:
        print(f"| {row['name']} | {row['lines']:,} | {row['seconds']:.2f} | {row['lines_per_s']:,.0f} |")
    p50 = {name: statistics.median(t["ttft"] for t in timings) for name, timings in (("idle", idle), ("busy", busy))}
    wait = {name: statistics.median(t["wait"] for t in timings) for name, timings in (("idle", idle), ("busy", busy))}
    print(f"\n### Interactive TTFT with a {args.batch_questions:,}-question batch running "
          f"({args.interactive} jobs each, max_num_seqs {args.max_num_seqs}, batch_reserved_slots "
          f"{args.reserved_slots}, batch max_new_tokens {args.batch_max_new_tokens})\n")
    print("| | TTFT p50 | TTFT max | queue wait p50 |\n|---|---:|---:|---:|")
    for name, label in (("idle", "idle worker"), ("busy", "batch running")):
        timings = idle if name == "idle" else busy
        print(f"| {label} | {p50[name] * 1000:.0f} ms | {max(t['ttft'] for t in timings) * 1000:.0f} ms | "
              f"{wait[name] * 1000:.0f} ms |")
    print(f"\nratio (batch running / idle), TTFT p50: {p50['busy'] / p50['idle']:.2f}x")
    print(f"the batch meanwhile: {progress['request_counts']['completed']} lines done, "
          f"{progress['tokens_per_second']} tokens/s; a job put in the batch queue instead would have had "
          f"{fifo_position} jobs ahead of it")
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
