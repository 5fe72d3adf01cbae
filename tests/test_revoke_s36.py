"""Celery's revoke (Flower's Terminate button, `celery control revoke [--terminate]`) on a job's task: the job ends
cancelled, and no other job is touched (workers.pool.JobRequest, the worker's `task_revoked` handler).

Before, a revoke with terminate reached the thread pool's `terminate_job`, the cold shutdown's call, which handed
every running job of the worker back; the revoked job's new message was discarded by the worker that remembered the
revoke, and the job stayed "running" for hours. A job revoked while queued had its message discarded and stayed
"queued".
"""

import time

import redis
import requests

from shared.celery_app import make_celery
from shared.settings import Settings
from test_pipeline import FRANCE, poll, submit, wait_until

# Greedy, SmolLM2 tells this story to the token limit (it ends repeating a sentence): a job that holds its slot for
# the whole test.
STORY = [{"role": "user", "text": "Write a long story about a dragon who learns to cook."}]
SLOTS = 16  # the session stack's LLAVA_QUEUE_MAX_NUM_SEQS (conftest.py)


def record(stack, job_id: str) -> dict:
    with redis.Redis.from_url(stack.redis_url, decode_responses=True) as client:
        return client.hgetall(f"{Settings().key_prefix}:job:{job_id}")


def wait_running(stack, job_ids: list[str], tokens: int = 3, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [poll(stack, job_id) for job_id in job_ids]
        assert all(job["status"] in ("queued", "running") for job in jobs), jobs
        if all(job["status"] == "running" and job["usage"]["completion_tokens"] >= tokens for job in jobs):
            return
        time.sleep(0.1)
    raise AssertionError(f"not all running after {timeout} s: {[poll(stack, job_id) for job_id in job_ids]}")


def wait_slots_held(stack, blockers: list[str], timeout: float = 120) -> None:
    """Until the blockers that run have each generated a token, and the others wait queued (behind jobs of other tests
    that hold slots on the session's worker): every slot is held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [poll(stack, job_id) for job_id in blockers]
        assert all(job["status"] in ("queued", "running") for job in jobs), jobs
        running = [job for job in jobs if job["status"] == "running"]
        if running and all(job["usage"]["completion_tokens"] >= 1 for job in running):
            return
        time.sleep(0.1)
    raise AssertionError(f"the slots were not held after {timeout} s")


def test_revoke_with_terminate_cancels_that_job_and_leaves_its_batch_mates_running(stack):
    app = make_celery(Settings(redis_url=stack.redis_url))
    jobs = [submit(stack, messages=STORY, temperature=0, max_new_tokens=1024) for _ in range(3)]
    try:
        wait_running(stack, jobs)
        revoked, mates = jobs[0], jobs[1:]
        replies = app.control.revoke(revoked, terminate=True, reply=True, timeout=10)
        assert replies, "no worker answered the revoke"
        ended = wait_until(stack, revoked, timeout=30)
        assert ended["status"] == "cancelled" and ended["error_code"] != 0, ended
        assert ended["usage"]["completion_tokens"] < 1024
        # The others go on where they were, on the same worker: none handed back, none started again.
        before = {job_id: poll(stack, job_id)["usage"]["completion_tokens"] for job_id in mates}
        time.sleep(1.5)
        for job_id in mates:
            job, fields = poll(stack, job_id), record(stack, job_id)
            assert job["status"] == "running", job
            assert job["usage"]["completion_tokens"] > before[job_id]
            assert int(fields.get("handed_back") or 0) == 0 and int(fields.get("attempts") or 0) == 1, fields
            assert not fields["worker"].startswith("requeued@"), fields
    finally:
        for job_id in jobs:
            requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)


def test_a_job_revoked_while_queued_ends_cancelled_when_its_message_is_discarded(stack):
    # Every slot held, so the next job's message waits in Redis while the worker is told of the revoke (16 stories of
    # 42 + 600 tokens fit the KV budget, 16,384: of 1,024 tokens, the last would wait in the engine).
    app = make_celery(Settings(redis_url=stack.redis_url))
    blockers = [submit(stack, messages=STORY, temperature=0, max_new_tokens=600) for _ in range(SLOTS)]
    try:
        wait_slots_held(stack, blockers)
        queued = submit(stack, messages=FRANCE, temperature=0, max_new_tokens=8)
        assert app.control.revoke(queued, reply=True, timeout=10), "no worker answered the revoke"
        assert poll(stack, queued)["status"] == "queued"
        for job_id in blockers:
            requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
        ended = wait_until(stack, queued, timeout=30)
        assert ended["status"] == "cancelled" and ended["error_code"] != 0, ended
        assert int(record(stack, queued).get("attempts") or 0) == 0  # never started
    finally:
        for job_id in blockers:
            requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
