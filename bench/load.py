"""A bounded load test of the whole stack: N jobs as fast as the API accepts them, then every one accounted for.

Mixed interactive and batch jobs, some cancelled right after submission, some carrying an image
that is not an image (refused with 422 at the door). The run ends when every accepted job has a
final state (or after --timeout), and prints the counts and rates as a markdown table.

    .venv/bin/python bench/load.py --jobs 2000
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.jobs import FINAL_STATES, JobStore  # noqa: E402
from shared.redis_server import RedisServer, free_port  # noqa: E402
from shared.settings import get_settings  # noqa: E402
from workers.default_model import ensure_default_model  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?", "Say hello.",
             "Name an animal.", "What is water made of?", "Name a planet.", "What day comes after Monday?"]


def start(args: list[str], env: dict, log_dir: Path, name: str) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, interpolated linearly as numpy's (and vLLM's benchmarks'); NaN for none.

    The index int(q * n) it took before made p99 of 100 values their maximum.
    """
    return float(np.quantile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--clients", type=int, default=16, help="concurrent submitting threads")
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--bad-fraction", type=float, default=0.05)
    parser.add_argument("--batch-fraction", type=float, default=0.3)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    model_dir = ensure_default_model(get_settings().cache_dir)
    log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-load-"))
    rng = random.Random(0)
    with RedisServer() as redis_server:
        port = free_port()
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_MODEL_PATH=str(model_dir),
                   LLAVA_QUEUE_MAX_NUM_SEQS=str(args.max_num_seqs), LLAVA_QUEUE_MAX_QUEUED_JOBS="100000")
        processes = [start(["worker"], env, log_dir, "worker"),
                     start(["api", "--host", "127.0.0.1", "--port", str(port)], env, log_dir, "api")]
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base)
            store = JobStore.from_url(redis_server.url)
            plan = []
            for index in range(args.jobs):
                roll = rng.random()
                kind = "bad" if roll < args.bad_fraction else \
                    "cancel" if roll < args.bad_fraction + args.cancel_fraction else "ok"
                queue = "batch" if rng.random() < args.batch_fraction else "interactive"
                plan.append((index, kind, queue))
            session = requests.Session()

            def submit(item):
                index, kind, queue = item
                body = {"messages": [{"role": "user", "text": QUESTIONS[index % len(QUESTIONS)]}],
                        "temperature": 0, "max_new_tokens": args.max_new_tokens, "queue": queue}
                if kind == "bad":
                    body["messages"][0]["images"] = ["bm90IGFuIGltYWdl"]  # base64 of "not an image"
                response = session.post(f"{base}/v1/jobs", json=body, timeout=30)
                job_id = response.json().get("id") if response.status_code == 202 else None
                if job_id and kind == "cancel":
                    session.delete(f"{base}/v1/jobs/{job_id}", timeout=30)
                return kind, response.status_code, job_id

            started = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(submit, plan))
            submit_seconds = time.monotonic() - started
            accepted = [job_id for _, status, job_id in results if status == 202]
            refused = [status for _, status, _ in results if status != 202]
            deadline = time.monotonic() + args.timeout
            while True:
                records = [store.get(job_id) for job_id in accepted]
                pending = [record for record in records if record is None or record["status"] not in FINAL_STATES]
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            wall = time.monotonic() - started
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)

    states = {state: sum(1 for r in records if r and r["status"] == state) for state in FINAL_STATES}
    succeeded = [r for r in records if r and r["status"] == "succeeded"]
    latencies = [r["finished_at"] - r["created_at"] for r in succeeded]
    first_created = min(r["created_at"] for r in records if r)
    last_finished = max(r["finished_at"] for r in records if r and r["finished_at"])
    tokens = sum(r["completion_tokens"] for r in succeeded)
    print(f"# bench/load.py: {args.jobs} jobs, {args.clients} submitting clients, max_new_tokens "
          f"{args.max_new_tokens}, max_num_seqs {args.max_num_seqs}, {os.cpu_count()} CPU cores\n")
    print("| figure | value |\n|---|---|")
    print(f"| submitted | {len(results)} |")
    print(f"| accepted (202) | {len(accepted)} |")
    print(f"| refused at the door (4xx: bad image) | {len(refused)} (statuses {sorted(set(refused))}) |")
    for state in FINAL_STATES:
        print(f"| ended {state} | {states[state]} |")
    print(f"| lost (no final state after {args.timeout:.0f} s) | {len(pending)} |")
    print(f"| accepted/s (submission rate the API held) | {len(accepted) / submit_seconds:.1f} |")
    print(f"| completed/s (first submit → last finish) | {len(succeeded) / (last_finished - first_created):.1f} |")
    print(f"| generated tokens/s over the run | {tokens / (last_finished - first_created):.1f} |")
    print(f"| latency submit → finished p50 / p99 (s) | {statistics.median(latencies):.2f} / "
          f"{percentile(latencies, 0.99):.2f} |")
    print(f"| wall time (s) | {wall:.1f} |")
    return 0 if not pending else 1


def wait_ready(base: str, timeout: float = 300) -> None:
    """Wait until the API answers and a worker has announced itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=2).json().get("workers"):
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the stack did not come up")


if __name__ == "__main__":
    sys.exit(main())
