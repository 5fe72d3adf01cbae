"""The job store (shared/jobs.py) on a real Redis: a poll that races a job's start."""

import pytest
import redis

from shared.jobs import JobStore
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer


@pytest.fixture
def redis_url():
    with RedisServer() as server:
        yield server.url


class StartsTheJobAfterItsFirstRead(redis.Redis):
    """A client that lets a worker start the job right after the poll's first read of its record: the moment a
    poll's two reads (the record, then the place in the queue) can straddle."""

    starter: JobStore | None = None

    def hgetall(self, name):
        raw = super().hgetall(name)
        if self.starter is not None:
            starter, self.starter = self.starter, None
            starter.start(name.rsplit(":", 1)[-1], "worker-1")
        return raw


def test_a_job_started_between_a_polls_reads_is_not_answered_queued_without_a_place(redis_url):
    store = JobStore(redis.Redis.from_url(redis_url, decode_responses=True), "js")
    job_id, _ = store.create(GenerateRequest(prompt="USER: hi ASSISTANT:"), "interactive")
    polling = JobStore(StartsTheJobAfterItsFirstRead.from_url(redis_url, decode_responses=True), "js")
    polling.redis.starter = store

    record = polling.get(job_id)

    assert record["status"] == "running"
    assert record["queue_position"] is None
    assert store.get(job_id)["status"] == "running"
