"""The worker's Celery layer over a job's life: slots kept for interactive jobs that stay kept (and no more) whatever
becomes of a batch job's task. Real stacks on Redis servers of their own (the queues are not under the key prefix:
on the suite's Redis the session stack's worker takes these tasks)."""

import time
import uuid
from pathlib import Path

import pytest
import redis
import requests

from conftest import job_final, run_stack
from shared.celery_app import BATCH_QUEUE, GENERATE_TASK, make_celery
from shared.redis_server import RedisServer
from shared.settings import Settings


@pytest.fixture
def one_batch_slot_stack(default_model_dir):
    """A worker with 2 slots, 1 kept for interactive jobs: it runs one batch job at a time."""
    with RedisServer() as server:
        env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2",
               "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "1"}
        with run_stack(server.url, env, log_prefix="llava-queue-worker-s41-") as stack:
            yield stack


def wait_for_log(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not logged in {timeout} s:\n{path.read_text()[-4000:]}"
        time.sleep(0.1)


def submit_batch_job(stack, prompt: str) -> str:
    response = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": prompt, "max_new_tokens": 2,
                                                                "temperature": 0, "queue": "batch"}, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_a_batch_task_discarded_before_it_runs_gives_its_slot_back(one_batch_slot_stack, how):
    """A batch task the worker received and Celery then discarded without running it (revoked, or past its expiry,
    while it waited for its countdown: `celery call --countdown`, Flower's apply) ends no task, so the worker's count
    of its batch jobs never went down: at its share of them, it stopped reading the batch queue for good, and every
    batch job after waited `queued` while the worker idled."""
    stack = one_batch_slot_stack
    app = make_celery(Settings(redis_url=stack.redis_url))
    task_id = uuid.uuid4().hex
    if how == "revoked":
        app.send_task(GENERATE_TASK, args=[task_id], task_id=task_id, queue=BATCH_QUEUE, countdown=2)
        wait_for_log(stack.log_dir / "worker.log", f"{GENERATE_TASK}[{task_id}] received")
        app.control.revoke(task_id)
    else:
        app.send_task(GENERATE_TASK, args=[task_id], task_id=task_id, queue=BATCH_QUEUE, countdown=2, expires=1)
    wait_for_log(stack.log_dir / "worker.log", f"Discarding revoked task: {GENERATE_TASK}[{task_id}]")
    jobs = [job_final(stack, submit_batch_job(stack, f"Say {n}"), timeout=30) for n in range(2)]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"], jobs


# Greedy, SmolLM2 tells this story to the token limit: a job that holds the engine's whole KV budget for seconds.
STORY = [{"role": "user", "text": "Write a long story about a dragon who learns to cook."}]


def job_worker(stack, job_id: str) -> str:
    with redis.Redis.from_url(stack.redis_url, decode_responses=True) as client:
        return client.hget(f"{Settings().key_prefix}:job:{job_id}", "worker") or ""


def submit_story(stack) -> str:
    response = requests.post(f"{stack.base_url}/v1/jobs", json={"messages": STORY, "max_new_tokens": 96,
                                                                "temperature": 0, "queue": "batch"}, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job_view(stack, job_id: str) -> dict:
    return requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()


def test_a_worker_whose_engine_is_full_leaves_the_batch_queue_to_other_workers(default_model_dir):
    """A worker took a batch job for every free task thread, though its engine runs only what its KV budget
    (MAX_BATCH_TOKENS) holds: the rest waited in its engine, behind jobs of minutes, while a worker that came up
    meanwhile (a second replica, the other half of a rolling restart) idled. A worker whose engine has a job waiting
    for room now leaves the batch queue alone until that job is admitted: a batch job submitted meanwhile starts on
    it only after its running job has ended (on the old code, at once, in a free task thread)."""
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
           "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "0", "LLAVA_QUEUE_MAX_BATCH_TOKENS": "200",
           "LLAVA_QUEUE_LOG_LEVEL": "DEBUG"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-worker-s41-") as stack:
        # Each needs its prompt's and 96 new tokens of the 200: one runs at a time, 3 task threads stay free.
        running = submit_story(stack)
        waiting = submit_story(stack)
        # The worker says when it stops reading the batch queues (the old code never did).
        wait_for_log(stack.log_dir / "worker.log", "batch jobs running, jobs waiting in the engine", timeout=60)
        left = submit_story(stack)
        submitted = job_view(stack, left)["created_at"]
        jobs = {job_id: job_final(stack, job_id, timeout=240) for job_id in (running, waiting, left)}
        assert [job["status"] for job in jobs.values()] == ["succeeded"] * 3, jobs
        # Submitted while the first two were in the engine (else this shows nothing), started only once the one
        # that ran first had ended and the other was admitted (which ran first is the task threads' race).
        first_end = min(jobs[running]["finished_at"], jobs[waiting]["finished_at"])
        assert submitted < first_end, jobs
        assert jobs[left]["started_at"] >= first_end, jobs
