"""A batch's lines that its process was killed before cancelling are cancelled by the lost-task sweep, not sent; a
batch that goes from Redis while its file is read is a clear 500, leaving no key behind; the ids of refused lines are
unique per request; a batch's output files were made when it ended."""

import json

import pytest
from openai import OpenAI

from api.errors import ApiError
from api.routes.batches import BatchCreate, create
from conftest import run_stack
from shared.batches import BatchStore, new_batch_id
from shared.celery_app import make_celery, resend_lost_tasks, task_queue
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_batches import jsonl, questions
from test_batches2_s42 import ReadSlowly
from test_lost_tasks_s19 import queued_task_ids, sweep_parts


def test_the_lines_of_a_batch_that_ended_before_they_were_cancelled_are_cancelled_by_the_sweep(redis_server):
    # The process that fails a batch (or has a chunk refused by one) cancels its jobs just after; killed in between,
    # it left them queued, their tasks never sent: the sweep sent them as lost, and they ran for nobody.
    store, app, client, model = sweep_parts(redis_server.url, "ended-batch")
    batches = BatchStore(store, 3600)
    request = GenerateRequest(model=model, prompt="Hello", max_new_tokens=4)

    def lines_of(batch_id: str, count: int) -> list[str]:
        ids = store.create_many([request] * count, "batch",
                                extra=[{"batch": batch_id, "batch_line": line} for line in range(count)])
        batches.add_lines(batch_id, [{"line": line + 1, "job": job_id, "custom_id": f"request-{line}",
                                      "model": model} for line, job_id in enumerate(ids)])
        return ids

    def batch_read(count: int) -> tuple[str, list[str]]:
        batch_id = new_batch_id()
        batches.create(batch_id, {"params": None, "format": "openai"})
        return batch_id, lines_of(batch_id, count)

    def fail(batch_id: str) -> None:
        assert batches._fail(keys=[batches.key(batch_id)], args=[repr(store.clock()), "[]"]) == 1

    failed, failed_lines = batch_read(2)
    fail(failed)  # killed here: its lines still name it
    ended, ended_lines = batch_read(2)
    fail(ended)
    batches.end_lines(ended)  # killed here: its lines no longer name it
    refused, _ = batch_read(1)
    batches.fail(refused, {"code": "abandoned", "message": "gone", "param": None, "line": None})
    refused_lines = lines_of(refused, 2)  # a slow reader's chunk the failed batch refused; killed before cancelling
    gone, gone_lines = batch_read(1)
    client.delete(batches.key(gone))  # deleted, or evicted
    running, running_lines = batch_read(1)
    client.hset(batches.key(running), "status", "in_progress")
    try:
        assert resend_lost_tasks(app, store, older_than=0) == running_lines
        assert queued_task_ids(client, task_queue("batch", model)) == running_lines
        for job_id in failed_lines + ended_lines + refused_lines + gone_lines:
            assert store.get(job_id)["status"] == "cancelled", job_id
        assert store.redis.zrange(store.queue_key("batch"), 0, -1) == running_lines
    finally:
        client.delete(task_queue("batch", model))


@pytest.mark.parametrize("gone", ["while read", "once read"])
def test_a_batch_gone_while_its_file_is_read_is_a_server_error_that_leaves_no_key_behind(gone):
    # Deleted (or evicted) while its file was read, the batch was made again by the format written after the read: a
    # hash without owner, status or TTL, kept for good; and the answer was a 500 of a KeyError.
    class ReadGone(ReadSlowly):
        """Its batch goes at its 600th line, or once it is read and its jobs sent (as the file is closed)."""

        def overtake(self) -> None:
            if gone == "while read":
                delete_batch()

        def close(self) -> None:
            if gone == "once read" and self.counted and not self.closed:
                delete_batch()
            super().close()

    def delete_batch() -> None:
        [batch_id] = batches.redis.zrange(batches.index_key, 0, -1)
        batches.redis.delete(batches.key(batch_id))

    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        settings = Settings(redis_url=server.url)
        with pytest.raises(ApiError) as lost:
            create(BatchCreate(temperature=0, max_new_tokens=2), ReadGone(jsonl(questions(1000, image=False))), store,
                   batches, make_celery(settings), WorkerRegistry(store.redis, store.prefix), settings, None)
        assert (lost.value.status, lost.value.type) == (500, "server_error"), lost.value
        assert "submit the batch again" in lost.value.message, lost.value.message
        [batch_id] = batches.redis.zrange(batches.index_key, 0, -1)
        assert batches.get(batch_id) is None
        kept = {key: store.redis.ttl(key) for key in store.redis.scan_iter(f"{batches.key(batch_id)}*")}
        assert kept and all(ttl > 0 for ttl in kept.values()), kept  # its lines and reader's lease, which expire
        # None of its lines is left to run (a worker that takes a message sent skips its cancelled job).
        assert store.redis.zcard(store.queue_key("batch")) == 0


LINE = {"method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "llava-v1.5-tiny", "messages": [{"role": "user", "content": "Hello"}]}}


@pytest.fixture(scope="module")
def openai_client():
    """The openai package's client of an API with no worker (every line is refused: its model is not served), and a
    client of its Redis."""
    with RedisServer() as server, run_stack(server.url, {}, workers=(),
                                            log_prefix="llava-queue-batches-s43-") as stack:
        yield OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0), JobStore.from_url(server.url)


def refused_batch(client: OpenAI):
    uploaded = client.files.create(file=("batch.jsonl", jsonl([{"custom_id": f"request-{line}", **LINE}
                                                                for line in range(2)])), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.error_file_id, batch
    return batch


def test_refused_lines_have_ids_unique_per_request_and_stable(openai_client):
    # A refused line's id was batch_req_<its line number>: the same in every batch.
    client, _ = openai_client
    ids = []
    for batch in (refused_batch(client), refused_batch(client)):
        read = [[json.loads(line)["id"] for line in client.files.content(batch.error_file_id).text.splitlines()]
                for _ in range(2)]
        assert read[0] == read[1], read  # the same at every read
        ids += read[0]
    assert len(set(ids)) == 4 and all(id_.startswith("batch_req_") for id_ in ids), ids


def test_a_batchs_file_was_created_when_the_batch_ended(openai_client):
    # Its created_at was the batch's; OpenAI's output file is made as the batch ends.
    client, store = openai_client
    batch = refused_batch(client)
    store.redis.hset(f"{store.batch_prefix}{batch.id}", "created_at", repr(batch.created_at - 600.0))
    assert client.batches.retrieve(batch.id).created_at == batch.created_at - 600
    assert client.files.retrieve(batch.error_file_id).created_at == batch.failed_at
    listed = {file.id: file.created_at for file in client.files.list(purpose="batch_output")}
    assert listed[batch.error_file_id] == batch.failed_at
