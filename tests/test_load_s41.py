"""Many submissions at once, as services and evaluation pipelines send them: every 202 names a job that runs to an end,
every refusal says why (and when to retry). A real stack on a Redis of its own (its queue limit is low, and its queue
is counted), serving the default model."""

import asyncio
import time

import httpx
import pytest
import requests

from conftest import run_stack
from shared.jobs import JobStore
from shared.redis_server import RedisServer

MAX_QUEUED = 40


@pytest.fixture(scope="module")
def load_stack(default_model_dir):
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_QUEUED_JOBS": str(MAX_QUEUED),
           "LLAVA_QUEUE_MAX_NUM_SEQS": "16"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-load-s41-logs-") as stack:
        yield stack, JobStore.from_url(server.url)


def submitted(store: JobStore) -> int:
    """How many jobs the stack has made so far."""
    return sum(int(count) for count in store.redis.hgetall(store.submitted_key).values())


def jobs_with_prompt(stack, prompt: str) -> list[dict]:
    """Every job (of the latest 100) submitted with `prompt`."""
    page = requests.get(f"{stack.base_url}/v1/jobs", params={"limit": 100}, timeout=10).json()
    return [job for job in page["data"] if job["prompt"] == prompt]


def wait_for_ends(stack, ids: list[str], timeout: float = 45) -> dict[str, str]:
    """{job id: final status} once every job of `ids` has ended; AssertionError naming those that have not."""
    ended: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(ids) and time.monotonic() < deadline:
        pending = [job_id for job_id in ids if job_id not in ended]
        for start in range(0, len(pending), 100):
            page = requests.get(f"{stack.base_url}/v1/jobs", params={"ids": ",".join(pending[start:start + 100])},
                                timeout=10).json()
            ended.update({job["id"]: job["status"] for job in page["data"]
                          if job["status"] not in ("queued", "running")})
        time.sleep(0.2)
    assert len(ended) == len(ids), f"{len(ids) - len(ended)} accepted jobs did not end\n{stack.logs()}"
    return ended


async def submit_all(base_url: str, count: int) -> list[httpx.Response]:
    """`count` single-job POSTs at once, each on a connection of its own."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:
        return await asyncio.gather(*[client.post("/v1/jobs", json={"prompt": f"Count to {n}:", "max_new_tokens": 1,
                                                                   "temperature": 0})
                                      for n in range(count)])


def test_a_burst_past_the_queue_limit_is_accepted_or_refused_and_every_accepted_job_ends(load_stack):
    """500 submissions at once into a queue of 40: each is a 202 whose job ends, or a 429 saying the queue is full
    with a Retry-After; as many jobs were made as 202s were answered, each once."""
    stack, store = load_stack
    before = submitted(store)
    answers = asyncio.run(submit_all(stack.base_url, 500))
    statuses = [answer.status_code for answer in answers]
    assert set(statuses) <= {202, 429}, statuses
    ids = [answer.json()["id"] for answer in answers if answer.status_code == 202]
    assert MAX_QUEUED <= len(ids) < 500 and len(set(ids)) == len(ids)
    assert submitted(store) - before == len(ids)
    for refusal in (answer for answer in answers if answer.status_code == 429):
        assert int(refusal.headers["Retry-After"]) >= 1
        assert "the queue is full" in refusal.json()["error"]["message"]
    assert set(wait_for_ends(stack, ids).values()) == {"succeeded"}
