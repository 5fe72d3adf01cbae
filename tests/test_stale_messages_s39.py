"""The task messages of jobs that ended (cancelled, expired) while they waited for a model no worker serves are
removed from its queue by the workers' sweep. Before, each stayed in Redis for good: a client that kept sending jobs
for a misspelt model, with a deadline or cancelling them, grew Redis without bound."""

import json
import time
import uuid

import pytest
import redis
import requests

from conftest import run_stack
from shared.celery_app import make_celery, send_many, task_queue
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings


def queued_task_ids(client: redis.Redis, name: str) -> list[str]:
    """The job ids of the task messages in a queue, the next one a worker would take first."""
    return [json.loads(raw)["headers"]["id"] for raw in reversed(client.lrange(name, 0, -1))]


def test_a_worker_removes_the_messages_of_ended_jobs_from_a_queue_no_worker_reads(default_model_dir):
    """The whole way: jobs for a misspelt model, cancelled or past their deadline, leave its queue; the queued ones
    stay, for the worker of that model that may come."""
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1",
           "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "2"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-stale-") as stack:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        queue = task_queue("interactive", "smollm2-misspelt")

        def submit(**more) -> str:
            answer = requests.post(f"{stack.base_url}/v1/jobs", timeout=10,
                                   json={"prompt": "Hello", "model": "smollm2-misspelt", "max_new_tokens": 2, **more})
            assert answer.status_code == 202, answer.text
            return answer.json()["id"]

        def wait_for_queue(job_ids: list[str]) -> None:
            deadline = time.monotonic() + 30
            while queued_task_ids(client, queue) != job_ids:
                assert time.monotonic() < deadline, (queued_task_ids(client, queue), job_ids, stack.logs())
                time.sleep(0.2)

        waiting = [submit(), submit()]
        cancelled = [submit() for _ in range(3)]
        # (A deadline of some seconds: the sweep, every second, must not find them expired before the check below.)
        expiring = [submit(deadline_seconds=4) for _ in range(2)]
        assert queued_task_ids(client, queue) == waiting + cancelled + expiring
        for job_id in cancelled:
            assert requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).status_code == 202
        wait_for_queue(waiting)
        for job_id in cancelled + expiring:
            status = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()["status"]
            assert status == ("cancelled" if job_id in cancelled else "expired"), status
        # Later sweeps read the queued ones again and keep them: one cancelled now goes, the other stays.
        requests.delete(f"{stack.base_url}/v1/jobs/{waiting[0]}", timeout=10)
        wait_for_queue(waiting[1:])
        worker_log = (stack.log_dir / "worker.log").read_text()
        assert "task messages of jobs that ended removed from queues no worker reads: 1" in worker_log


@pytest.fixture(scope="module")
def own_redis():
    """A Redis of this module's own: a sweep reads every model queue in its database (the session's holds other
    tests' queues, whose records are not under this module's prefix)."""
    with RedisServer() as server:
        yield server


def sweep_parts(redis_url: str, model_name: str, ttl_seconds: int = 60):
    """A job store under a prefix of its own (its records' TTL `ttl_seconds`), the Celery app, a Redis client, a
    model named after the prefix and a `submit(queue, cancel=False, clock=None) -> job id` that records a job for it
    and sends its task to its interactive queue."""
    prefix = f"llq-{model_name}-{uuid.uuid4().hex[:8]}"
    store = JobStore.from_url(redis_url, prefix=prefix, ttl_seconds=ttl_seconds)
    app = make_celery(Settings(redis_url=redis_url))
    model = f"model-{prefix}"

    def submit(cancel: bool = False, clock=None) -> str:
        job_id, _ = store.create(GenerateRequest(model=model, prompt="Hello", max_new_tokens=4), "interactive")
        send_many(app, [(job_id, task_queue("interactive", model))], clock or store.clock)
        if cancel:
            assert store.cancel(job_id) == "queued"
        return job_id

    return store, app, redis.Redis.from_url(redis_url, decode_responses=True), model, submit


def sweep_until_still(app, store, limit: int = 1000, rounds: int = 50) -> list[list[str]]:
    """What each call of the sweep removed, calling it (as the worker does, with one QueueScan) until a whole pass of
    the keyspace removed nothing more."""
    from shared.celery_app import QueueScan, remove_stale_messages

    scan, calls, this_pass = QueueScan(), [], []
    while True:
        calls.append(remove_stale_messages(app, store, scan, limit=limit))
        this_pass += calls[-1]
        if not scan.lists and scan.cursor == 0:  # a pass of the keyspace, and of the lists it found, has ended
            if not this_pass:
                return calls
            this_pass = []
        assert len(calls) < rounds, calls


def test_only_the_messages_of_ended_jobs_and_of_long_gone_records_go(own_redis):
    store, app, client, model, submit = sweep_parts(own_redis.url, "stale")
    queue = task_queue("interactive", model)
    waiting = submit()
    cancelled = submit(cancel=True)
    expired = store.create(GenerateRequest(model=model, prompt="Hello"), "interactive", deadline_seconds=0.01)[0]
    send_many(app, [(expired, queue)], store.clock)
    deadline = time.monotonic() + 10
    while expired not in store.expire_overdue():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    handed_back = submit()  # started by a worker that handed it back: `running`, waiting for a worker again
    assert store.start(handed_back, "a-worker") == "running" and store.release(handed_back, "a-worker")
    # Records gone (expired, or deleted by hand): the message of one sent over the records' TTL ago goes; one sent
    # since may be the job of another key prefix on this database, and stays.
    long_gone = submit(cancel=True, clock=lambda: store.clock() - store.ttl_seconds - 5)
    recently_gone = submit(cancel=True)
    client.delete(store.key(long_gone), store.key(recently_gone))
    client.lpush(queue, "a message that is no task")
    assert len(client.lrange(queue, 0, -1)) == 7

    removed = sweep_until_still(app, store)
    assert sorted(sum(removed, [])) == sorted([cancelled, expired, long_gone])
    assert client.lrange(queue, 0, 0) == ["a message that is no task"]
    client.lpop(queue)
    assert queued_task_ids(client, queue) == [waiting, handed_back, recently_gone]
    # Each job's record is as it was: only messages were touched.
    assert [store.get(job)["status"] for job in (waiting, cancelled, handed_back)] == ["queued", "cancelled", "running"]
    client.delete(queue)


def test_a_queue_a_live_worker_reads_is_left_to_it(own_redis):
    store, app, client, model, submit = sweep_parts(own_redis.url, "served")
    queue = task_queue("interactive", model)
    cancelled = [submit(cancel=True) for _ in range(3)]
    registry = WorkerRegistry(store.redis, store.prefix)
    worker = f"{model}@host/abcdef:1"
    registry.announce(worker, {"name": worker, "model": model}, ttl_seconds=60)
    assert sum(sweep_until_still(app, store), []) == []
    assert queued_task_ids(client, queue) == cancelled
    # Its worker gone, no worker reads the queue: the messages go.
    registry.remove(worker)
    assert sorted(sum(sweep_until_still(app, store), [])) == sorted(cancelled)
    assert client.exists(queue) == 0


def test_a_deep_queue_is_swept_a_bounded_part_at_a_time(own_redis):
    # Queued jobs at the head of a queue, ended ones behind them: each call reads `limit` messages at most and goes on
    # past those it keeps, so the ended jobs behind any number of queued ones go, and no queued one does.
    store, app, client, model, submit = sweep_parts(own_redis.url, "deep")
    queue = task_queue("interactive", model)
    waiting = [submit() for _ in range(25)]
    cancelled = [submit(cancel=True) for _ in range(30)]
    waiting += [submit() for _ in range(5)]
    removed = sweep_until_still(app, store, limit=10)
    assert max(len(call) for call in removed) <= 10 and sorted(sum(removed, [])) == sorted(cancelled)
    assert queued_task_ids(client, queue) == waiting
    client.delete(queue)


def test_a_message_is_looked_for_only_where_it_was_read(own_redis):
    """The sweep removes a message it read by looking among the messages at the head of its list, as far as it read:
    LREM of a message gone meanwhile (taken by a worker of the model that came, removed by another sweep) walked the
    whole list, 13 ms for 200,000 messages, up to a thousand times a round."""
    from shared.celery_app import _REMOVE_READ

    client = redis.Redis.from_url(own_redis.url)
    name = f"interactive.deep-{uuid.uuid4().hex[:8]}"
    client.lpush(name, *[f"message {i}" for i in range(50_000)])  # "message 0" at the head: the next to be taken
    near, far = b"message 5", b"message 40000"
    assert client.eval(_REMOVE_READ, 1, name, 100, 1, near, b"gone", far) == [1, 0, 0]
    # Read from the 1,000th message on: what is nearer the head is not looked among (nor copied) either.
    assert client.eval(_REMOVE_READ, 1, name, 1100, 1000, b"message 6", b"message 1050") == [0, 1]
    assert client.llen(name) == 49_998 and far in client.lrange(name, 0, -1)
    client.delete(name)
