"""Workers of two models on one Redis, one of them named as hub ids are ('/', ':', a space, CJK), and the worker of
the other killed mid-batch: what `llava-queue status` shows, what the original controller's endpoints answer, and
that jobs started on the killed worker's model wait for a worker of that model instead of being finished by another
model."""

import os
import signal
import subprocess
import sys
import time
import unicodedata

import pytest
import requests

from conftest import model_workers, run_stack
from shared.redis_server import RedisServer

KILLED = "alpha"
HUB = "liuhaotian/模型 v1.5:13b"  # no "llava" in it: the default model's weights load under it


@pytest.fixture(scope="module")
def two_models(default_model_dir):
    """An API and two workers on a Redis of their own, the default model's weights served as KILLED by one and as HUB
    by the other; short heartbeats, so the orphan sweep finds a killed worker within seconds."""
    settings = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
                "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4"}
    with RedisServer() as server, run_stack(server.url, settings, workers=(),
                                            log_prefix="llava-queue-routing-s30-") as stack:
        with model_workers(stack, {**os.environ, **settings}, (KILLED, HUB)) as workers:
            stack.workers = workers
            yield stack


def status_table(stack) -> list[str]:
    run = subprocess.run([sys.executable, "-m", "shared.cli", "status"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "LLAVA_QUEUE_REDIS_URL": stack.redis_url})
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def columns(text: str) -> int:
    """Terminal columns: two for a wide (CJK) character."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def test_status_lines_up_the_columns_of_a_model_named_in_cjk(two_models):
    lines = status_table(two_models)
    header = next(line for line in lines if line.startswith("WORKER"))
    rows = [line for line in lines if line.startswith((KILLED + "@", HUB + "@"))]
    assert len(rows) == 2, lines
    # Each row's DEVICE cell starts in the terminal column where the header's does.
    device_at = header.index("DEVICE")
    for row in rows:
        assert columns(row[:row.index(" cpu ") + 1]) == device_at, "\n".join([header, *rows])


def test_jobs_of_a_killed_model_wait_for_it_and_are_counted(two_models):
    stack = two_models
    url = stack.base_url
    body = {"prompt": "Tell me a long story", "max_new_tokens": 96, "temperature": 0}
    ids = [requests.post(f"{url}/v1/jobs", json=body, timeout=10).json()["id"] for _ in range(8)]
    deadline = time.monotonic() + 60
    while True:  # jobs naming no model: some start on each worker; kill KILLED's once its jobs have text
        jobs = {job_id: requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json() for job_id in ids}
        if any(job["status"] == "running" and job["model"] == KILLED and job["text"] for job in jobs.values()):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.1)
    stack.workers[KILLED].send_signal(signal.SIGKILL)
    stack.workers[KILLED].wait()

    # Within the heartbeat TTL and a sweep, KILLED is no longer served and the jobs started on it are back in a queue;
    # HUB's worker, idle once its own jobs end, takes none of them: the text they have came from KILLED.
    deadline = time.monotonic() + 60
    while True:
        jobs = [requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json() for job_id in ids]
        workers = requests.get(f"{url}/healthz", timeout=10).json()["workers"]
        if [worker["model"] for worker in workers] == [HUB] and workers[0]["num_running"] == 0 \
                and all(job["status"] == "succeeded" for job in jobs if job["model"] != KILLED):
            break
        assert time.monotonic() < deadline, jobs
        time.sleep(0.2)
    time.sleep(3)  # time for HUB's idle worker to take what it would
    on_killed = [job_id for job_id, job in zip(ids, jobs) if job["model"] == KILLED]
    for job_id in on_killed:
        job = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        assert (job["status"], job["model"]) == ("running", KILLED), job
        assert not (job["worker"] or "").startswith(HUB + "@"), job

    assert requests.post(f"{url}/list_models", timeout=10).json() == {"models": [HUB]}
    assert [model["id"] for model in requests.get(f"{url}/v1/models", timeout=10).json()["data"]] == [HUB]
    assert requests.post(f"{url}/get_worker_address", json={"model": KILLED}, timeout=10).json() == {"address": ""}
    status = requests.post(f"{url}/worker_get_status", timeout=10).json()
    assert status["model_names"] == [HUB] and status["queue_length"] == len(on_killed), status
    assert f"back in a queue: {KILLED} {len(on_killed)}" in status_table(stack)

    for job_id in on_killed:  # a job back in a queue is cancelled at once
        assert requests.delete(f"{url}/v1/jobs/{job_id}", timeout=10).status_code == 202
        assert requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "cancelled"
