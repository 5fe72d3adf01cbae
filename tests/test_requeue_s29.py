"""Jobs handed back to a queue (a worker told to stop) or claimed from a dead worker, on the real stack: they wait in
their model's queue, still "running", for a worker of their model. Their deadline, how they are counted per model, and
what the orphan sweep sends to a queue no worker reads.

A worker of a model nobody serves is played here by its writes (`JobStore.start`, a step, `release`, the task sent
again as `workers/main.py` sends it): its model's queue is then one no live worker reads, as when its last worker was
scaled down."""

import os
import subprocess
import sys
import time
import uuid

import requests

from shared.celery_app import make_celery, send_first, task_queue
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import ErrorCode
from shared.settings import Settings
from test_ops import scrape


def handed_back(stack, store: JobStore, model: str, deadline_seconds: float | None = None, ran_for: float = 0.0) -> str:
    """A job for `model` submitted through the API, started by a worker of `model` that wrote " there" and, `ran_for`
    seconds later, handed it back (its task sent again to the head of its queue); returns its id."""
    body = {"prompt": "Once upon a time", "max_new_tokens": 8, "model": model}
    if deadline_seconds is not None:
        body["deadline_seconds"] = deadline_seconds
    job_id = requests.post(f"{stack.base_url}/v1/jobs", json=body, timeout=10).json()["id"]
    queue = task_queue("interactive", model)
    assert store.redis.rpop(queue)  # the worker takes its task
    worker = f"{model}@host/abcdef:1"
    registry = WorkerRegistry(store.redis, store.prefix)
    registry.announce(worker, {"name": worker, "model": model}, ttl_seconds=30)  # alive while it runs the job
    assert store.start(job_id, worker, model) == "running"
    assert store.record_step(worker, [(job_id, " there", 1, True)], [], step=1) == [1]
    time.sleep(ran_for)
    assert store.release(job_id, worker)
    registry.remove(worker)  # gone, as a worker that stops removes itself
    send_first(make_celery(Settings(redis_url=stack.redis_url)), job_id, queue)
    return job_id


def poll(stack, job_id: str) -> dict:
    return requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()


def test_a_job_back_in_a_queue_expires_once_it_waited_its_deadline_again(stack):
    # "a job for a model no live worker serves waits for one, its deadline or a cancel" (README): a handed-back job
    # ignored its deadline (only queued jobs had one) and stayed "running" for good where no worker of its model came.
    # It now waits at most its deadline_seconds again, from its hand-back, then ends expired with the text it has.
    store = JobStore.from_url(stack.redis_url)
    model = f"gone-{uuid.uuid4().hex[:8]}"
    job_id = handed_back(stack, store, model, deadline_seconds=2)
    handed_at = time.time()
    time.sleep(max(0.0, handed_at + 1.5 - time.time()))
    assert poll(stack, job_id)["status"] == "running"  # its new wait is not over
    job = poll(stack, job_id)
    deadline = time.monotonic() + 10
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = poll(stack, job_id)
    assert (job["status"], job["error_code"], job["finish_reason"]) == ("expired", ErrorCode.EXPIRED, "expired"), job
    assert job["text"] == " there" and "deadline" in job["error"], job
    assert time.time() - handed_at >= 2  # not before its deadline_seconds, counted from the hand-back

    # Handed back past its deadline (a rolling restart while it ran) and taken at once by the next worker of its
    # model: it goes on, as a restart promises, instead of expiring with half an answer.
    late = handed_back(stack, store, model, deadline_seconds=0.5, ran_for=0.8)
    assert poll(stack, late)["status"] == "running"
    # Announced, as a live worker is: else the stack's orphan sweep, passing meanwhile, took its job for a dead
    # worker's and sent it back to the queue, where its deadline, long past, expired it (once in a clean-clone run).
    registry, next_worker = WorkerRegistry(store.redis, store.prefix), f"{model}@host/123456:2"
    registry.announce(next_worker, {"name": next_worker, "model": model}, ttl_seconds=30)
    assert store.start(late, next_worker, model) == "resumed"
    time.sleep(0.7)  # past its new wait too: it runs, no deadline holds it any more
    assert poll(stack, late)["status"] == "running"
    registry.remove(next_worker)
    store.cancel(late)
    store.redis.delete(task_queue("interactive", model))  # the tasks of the jobs that ended (see the last test)


def test_jobs_back_in_a_queue_are_counted_per_model(stack):
    # llava_queue_requeued_jobs (and `status`) gave the total only: which model's workers were gone was not said.
    store = JobStore.from_url(stack.redis_url)
    a, b = (f"gone-{name}-{uuid.uuid4().hex[:6]}" for name in "ab")
    jobs = [handed_back(stack, store, a), handed_back(stack, store, a), handed_back(stack, store, b)]
    try:
        metrics = scrape(requests.get(f"{stack.base_url}/metrics", timeout=10).text)
        per_model = {dict(labels)["model"]: value for (name, labels), value in metrics.items()
                     if name == "llava_queue_requeued_jobs_by_model"}
        assert (per_model[a], per_model[b]) == (2, 1), per_model
        assert per_model["SmolLM2-135M-Instruct"] == 0  # a live worker's model: there from 0
        assert metrics[("llava_queue_requeued_jobs", ())] == sum(per_model.values())
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=stack.redis_url)
        status = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True,
                                text=True, timeout=30, check=True).stdout
        line = next(line for line in status.splitlines() if line.startswith("back in a queue: "))
        assert f"{a} 2" in line and f"{b} 1" in line, status
    finally:
        store.cancel_many(jobs)
        store.redis.delete(task_queue("interactive", a), task_queue("interactive", b))


def test_the_sweep_does_not_pile_up_tasks_in_a_queue_no_worker_reads(stack):
    # The orphan sweep delivered a handed-back job that no worker had started again every minute (`requeue_after`),
    # a new task message each time: in a queue no worker reads, 1,440 a day for each such job (1 KB each), left there
    # after the job ended, for the worker that came at last to take one by one. It sends one again only when a live
    # worker serves the job's model (a message lost is sent then).
    store = JobStore.from_url(stack.redis_url)
    model = f"gone-{uuid.uuid4().hex[:8]}"
    queue = task_queue("interactive", model)
    job_id = handed_back(stack, store, model)
    registry = WorkerRegistry(store.redis, store.prefix)
    try:
        assert store.redis.llen(queue) == 1
        lapsed = f"requeued@{time.time() - 120!r}"  # handed back two minutes ago, by the sweep's clock
        store.redis.hset(store.running_key, job_id, lapsed)
        time.sleep(7)  # two sweeps and more (every heartbeat interval, 3 s)
        assert store.redis.llen(queue) == 1
        assert store.redis.hget(store.running_key, job_id) == lapsed  # not claimed again
        # A worker of its model comes up: its message may have been lost, so the sweep sends one again.
        registry.announce(f"{model}@host/abcdef:2", {"name": f"{model}@host/abcdef:2", "model": model,
                                                     "ready": False}, ttl_seconds=30)
        deadline = time.monotonic() + 10
        while store.redis.llen(queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.redis.llen(queue) == 2
    finally:
        registry.remove(f"{model}@host/abcdef:2")
        store.cancel(job_id)
        store.redis.delete(queue)
