"""Workers of one model with different KV budgets (MAX_BATCH_TOKENS: GPUs of different sizes): a job past the budget
of the worker that takes it runs on a live worker whose budget holds it, and fails, the client's error, only where
none does. It failed at once, whichever worker lived. Real workers on a Redis server of their own."""

import json
import os
import time
import uuid

import redis
import requests

from conftest import job_final, run_stack, start_service, stop_processes, wait_for_stack
from shared.celery_app import task_queue
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import ErrorCode, GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings

PREFIX = Settings().key_prefix
# Greedy, SmolLM2 tells this story to the token limit: each takes a worker's only slot for seconds. Its prompt and
# 300 new tokens fit the small budget.
STORY = {"messages": [{"role": "user", "text": "Write a long story about a dragon who learns to cook."}],
         "max_new_tokens": 300, "temperature": 0}


def submit(stack, body: dict) -> str:
    response = requests.post(f"{stack.base_url}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def record(client: redis.Redis, job_id: str) -> dict:
    return client.hgetall(f"{PREFIX}:job:{job_id}")


def wait_until(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.1)
    return found


def test_a_job_past_a_workers_kv_budget_runs_on_a_worker_whose_budget_holds_it(default_model_dir, tmp_path):
    # No hand-back allowed: a hand-over is none (counted as one, the job failed "handed back more than 0 times").
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MODEL_NAME": "smol",
           "LLAVA_QUEUE_MAX_NUM_SEQS": "1", "LLAVA_QUEUE_MAX_HAND_BACKS": "0"}
    with RedisServer() as server, redis.Redis.from_url(server.url, decode_responses=True) as client:
        small = start_service("worker-small", ["worker"], dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=server.url,
                                                               LLAVA_QUEUE_MAX_BATCH_TOKENS="400"), tmp_path)
        try:
            with run_stack(server.url, {**env, "LLAVA_QUEUE_MAX_BATCH_TOKENS": "1024"},
                           log_prefix="llava-queue-worker-s45-") as stack:
                stack.processes["worker-small"] = small
                wait_for_stack(stack, workers=2)
                budgets = {worker["name"]: worker["max_batch_tokens"]
                           for worker in WorkerRegistry(client, PREFIX).workers()}
                # Each worker's only slot taken by a story.
                stories = [submit(stack, STORY) for _ in range(2)]
                runs = wait_until(lambda: {budgets.get(record(client, job_id).get("worker")): job_id
                                           for job_id in stories} if all(
                    record(client, job_id).get("worker") in budgets for job_id in stories) else None,
                                  "both stories running")
                assert set(runs) == {400, 1024}, runs
                # About 530 tokens of KV cache: past the small worker's 400, within the other's 1024. The small
                # worker's slot is freed first: it takes the job.
                large = submit(stack, {"prompt": "Say hello.", "max_new_tokens": 500, "temperature": 0})
                requests.delete(f"{stack.base_url}/v1/jobs/{runs[400]}", timeout=10)
                wait_until(lambda: record(client, large).get("handed_over") or record(client, large).get("status")
                           not in ("queued", "running"), "the large job taken by the small worker")
                requests.delete(f"{stack.base_url}/v1/jobs/{runs[1024]}", timeout=10)
                job = job_final(stack, large)
                assert job["status"] == "succeeded", (job, (tmp_path / "worker-small.log").read_text())
                assert budgets[record(client, large)["worker"]] == 1024
                assert (record(client, large)["handed_over"], record(client, large).get("handed_back")) == ("1", None)
                assert "handed over to the workers of its model with a budget of 1024" in (
                    tmp_path / "worker-small.log").read_text()
                # Past every live worker's budget: refused, the client's error, whichever worker took it.
                too_large = job_final(stack, submit(stack, {"prompt": "word " * 1100, "max_new_tokens": 10}))
                assert (too_large["status"], too_large["error_code"]) == ("failed", ErrorCode.INVALID_REQUEST), \
                    too_large
                assert "more than this engine's max_batch_tokens" in too_large["error"], too_large
        finally:
            stop_processes([small])


def test_the_sweep_delivers_its_claims_past_one_whose_record_was_damaged_after_its_claim(redis_server, caplog):
    # A claim made again (its delivery had failed) answers as it did, whatever its record holds since: the record,
    # SET by hand meanwhile, raised WRONGTYPE out of the delivery, which the sweep took for Redis away at each round
    # for half a minute: the claims after it undelivered, and no other part of the sweep run.
    from test_lifecycle import celery_on
    from workers.main import _deliver_claimed

    store = JobStore.from_url(redis_server.url, prefix=f"llq-s45-{uuid.uuid4().hex[:8]}")
    damaged, other = (store.create(GenerateRequest(prompt="p", model="a-model-s45"), "interactive")[0]
                      for _ in range(2))
    for job_id in (damaged, other):
        assert store.start(job_id, "dead-worker") == "running"  # a worker that never beats: dead
    claims = {claim.job_id: claim for claim in store.orphans(0)}
    assert store.claim(claims[damaged])
    store.redis.delete(store.key(damaged))
    store.redis.set(store.key(damaged), "a record of another type")
    with celery_on(redis_server.url):
        _deliver_claimed(store, {damaged: claims[damaged], other: claims[other]}, 60)
    queue = task_queue("interactive", "a-model-s45")
    assert [json.loads(message)["headers"]["id"] for message in store.redis.lrange(queue, 0, -1)] == [other]
    assert f"job {damaged}: the job's record is damaged: its key holds a string, not a hash" in caplog.text
    store.redis.delete(queue)
