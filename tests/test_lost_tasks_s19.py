"""A queued job whose task message is nowhere (an API that died between recording the job and sending its task, a
worker SIGKILLed between taking the message and recording it among the unacked) has its task sent again by the
workers' sweep. Before, the job stayed `queued` for good."""

import json
import time
import uuid

import redis
import requests
from celery import Celery

from conftest import job_final, run_stack
from shared.celery_app import make_celery, resend_lost_tasks, send_many, task_queue
from shared.jobs import JobStore
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings


def queued_task_ids(client: redis.Redis, name: str) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(name, 0, -1)]


def sweep_parts(redis_url: str, name: str) -> tuple[JobStore, Celery, redis.Redis, str]:
    """A job store under a prefix of its own, the Celery app, a Redis client, and a model named after the prefix (so
    that its queues are this test's alone)."""
    prefix = f"llq-{name}-{uuid.uuid4().hex[:8]}"
    return (JobStore.from_url(redis_url, prefix=prefix), make_celery(Settings(redis_url=redis_url)),
            redis.Redis.from_url(redis_url, decode_responses=True), f"model-{prefix}")


def test_only_jobs_whose_message_is_nowhere_are_sent_again(redis_server):
    store, app, client, model = sweep_parts(redis_server.url, "lost")
    interactive, batch = task_queue("interactive", model), task_queue("batch", model)
    request = GenerateRequest(model=model, prompt="Hello", max_new_tokens=4)
    lost, lost_batch = store.create(request, "interactive")[0], store.create(request, "batch")[0]
    taken, _ = store.create(request, "interactive")
    ended, _ = store.create(request, "interactive")
    store.cancel(ended)
    # The taken job's message is held by a worker (kombu's unacked hash), not started yet. The holder's registry key
    # says it lives: else a worker of another test on this Redis puts the message back (restore_messages_of_gone_
    # workers), and the queue's oldest message is then the taken job's (a failure of one run in the whole suite).
    holder = f"{store.prefix}:worker:w"
    client.set(holder, "{}")
    send_many(app, [(taken, interactive)], store.clock)
    connection = app.connection_for_write(transport_options={"message_holder": holder})
    try:
        held = connection.SimpleQueue(interactive).get(timeout=5)
        assert held.headers["id"] == taken and client.llen(interactive) == 0

        assert resend_lost_tasks(app, store, older_than=60) == []  # too young to say
        assert sorted(resend_lost_tasks(app, store, older_than=0)) == sorted([lost, lost_batch])
        assert queued_task_ids(client, interactive) == [lost] and queued_task_ids(client, batch) == [lost_batch]
        # Its queue holds a message now: nothing is sent twice, however many sweeps look.
        assert resend_lost_tasks(app, store, older_than=0) == []
        assert queued_task_ids(client, interactive) == [lost]
        # A job recorded after the oldest message of its queue came is not judged while that message is there.
        late, _ = store.create(request, "interactive")
        assert resend_lost_tasks(app, store, older_than=0) == []
        client.delete(interactive)
        assert sorted(resend_lost_tasks(app, store, older_than=0)) == sorted([lost, late])
        # One recorded long before the oldest message of its queue came (`older_than` before) has no message there:
        # it is sent again at once, not after every job queued since (it was judged only once its queue was empty).
        client.delete(interactive)
        deep, _ = store.create(request, "interactive")
        time.sleep(0.6)
        send_many(app, [(f"later-{index}", interactive) for index in range(3)], store.clock)
        assert resend_lost_tasks(app, store, older_than=2) == []  # too young to say
        assert sorted(resend_lost_tasks(app, store, older_than=0.5)) == sorted([lost, late, deep])
        # At the head of the queue (the end workers take from), the oldest job first; nothing sent twice after.
        assert queued_task_ids(client, interactive) == ["later-2", "later-1", "later-0", deep, late, lost]
        assert resend_lost_tasks(app, store, older_than=0.5) == []
        # A message without the header (another sender) says nothing of when it came: the queue is not judged.
        client.delete(interactive)
        app.send_task("llava_queue.generate", args=["other"], task_id="other", queue=interactive)
        assert resend_lost_tasks(app, store, older_than=0.5) == []
    finally:
        connection.release()
        client.delete(interactive, batch, holder)
        client.close()


def test_a_job_recorded_without_its_task_runs(default_model_dir):
    """The whole way: a job recorded as the API records it, its task never sent (the API killed in between), is run
    by the worker once it has waited RESEND_AFTER_SECONDS."""
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "3",
           "LLAVA_QUEUE_RESEND_AFTER_SECONDS": "2"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-lost-") as stack:
        store = JobStore.from_url(server.url)
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=6),
                                 "interactive")
        recorded = time.monotonic()
        job = job_final(stack, job_id, timeout=60)
        assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] == 6, (job, stack.logs())
        waited = time.monotonic() - recorded
        assert waited >= 2
        print(f"job {job_id}, recorded with no task, ended {waited:.1f} s after")
        worker_log = (stack.log_dir / "worker.log").read_text()
        assert f"job {job_id}: queued 2 s or more with its task message nowhere; sent again" in worker_log
        # A job submitted as usual is not sent twice.
        again = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Hi", "max_new_tokens": 2},
                              timeout=10).json()["id"]
        assert job_final(stack, again, timeout=60)["status"] == "succeeded"
        assert f"job {again}: queued" not in (stack.log_dir / "worker.log").read_text()


def test_a_started_job_sent_again_goes_to_the_head_of_its_queue(redis_server):
    """A job handed back (a worker told to stop) or whose worker died goes on before the jobs queued since: its
    clients are mid-stream. Sent again with send_task, it went to the tail, behind every job queued meanwhile."""
    from shared.celery_app import send_first

    app = make_celery(Settings(redis_url=redis_server.url))
    queue = f"llq-first-{uuid.uuid4().hex[:8]}"
    send_many(app, [("queued-1", queue), ("queued-2", queue)], time.time)
    send_first(app, "handed-back", queue)
    send_many(app, [("queued-3", queue)], time.time)
    with app.connection_for_write() as connection:
        taken = connection.SimpleQueue(queue)
        messages = [taken.get(timeout=5) for _ in range(4)]
        # Each a Celery task message for the job, as send_many sends it (the worker runs it as any other).
        assert [(m.headers["id"], m.headers["task"], m.decode()[0]) for m in messages] == [
            (job, "llava_queue.generate", [job]) for job in ("handed-back", "queued-1", "queued-2", "queued-3")]
        for message in messages:
            message.ack()


def test_a_job_record_of_another_type_does_not_stop_the_sweep_for_the_others(redis_server, caplog):
    # A key of the job's name that is no hash (written by hand) answered WRONGTYPE inside the sweep's pipeline: the
    # whole sweep failed, logged as an outage, every round, and no lost job of any queue was sent again.
    store, app, client, model = sweep_parts(redis_server.url, "lost")
    request = GenerateRequest(model=model, prompt="Hello", max_new_tokens=4)
    lost = store.create(request, "interactive")[0]
    broken = [store.create(request, "interactive")[0] for _ in range(3)]
    client.delete(*(store.key(job) for job in broken))
    client.set(store.key(broken[0]), "not a hash")
    client.rpush(store.key(broken[1]), "not", "a", "hash")
    client.hset(store.key(broken[2]), mapping={"status": "queued", "created_at": "yesterday"})
    try:
        assert resend_lost_tasks(app, store, older_than=0) == [lost]
        assert queued_task_ids(client, task_queue("interactive", model)) == [lost]
        unreadable = [record.getMessage() for record in caplog.records if "unreadable" in record.getMessage()]
        assert [job for job in broken if any(job in message for message in unreadable)] == broken, unreadable
    finally:
        client.delete(task_queue("interactive", model), *(store.key(job) for job in broken))
        client.close()


def test_the_lines_of_a_batch_being_read_are_not_sent_before_its_file_is_read(redis_server):
    # api/batch_intake.py records a batch's lines as it reads its file and sends their tasks once the whole file is
    # read: a file that cannot be read to its end runs none of them. The sweep took the lines of a file read for
    # longer than its wait for lost messages for lost, sent them, and they ran while the rest was read.
    from shared.batches import BatchStore, new_batch_id

    store, app, client, model = sweep_parts(redis_server.url, "reading")
    batches = BatchStore(store, 3600)
    batch_id = new_batch_id()
    batches.create(batch_id, {"params": None})
    request = GenerateRequest(model=model, prompt="Hello", max_new_tokens=4)
    lines = store.create_many([request] * 2, "batch", extra=[{"batch": batch_id, "batch_line": i} for i in range(2)])
    lost = store.create(request, "batch")[0]  # no batch's: its message is lost
    try:
        assert resend_lost_tasks(app, store, older_than=0) == [lost]
        # Read to its end, the batch is under way: a line whose message is nowhere now is lost. (The queue emptied:
        # the lost job's new message, with no time of its own, would leave the queue unjudged this time.)
        client.delete(task_queue("batch", model))
        client.hset(batches.key(batch_id), "status", "in_progress")
        assert sorted(resend_lost_tasks(app, store, older_than=0)) == sorted([*lines, lost])
    finally:
        client.delete(task_queue("batch", model))
