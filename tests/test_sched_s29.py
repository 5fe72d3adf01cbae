"""Scheduling under mixed load (the twenty-ninth session's probe): what a worker keeping slots for interactive jobs
costs the batch between one batch job and the next."""

import statistics

import pytest
import requests

from conftest import job_final, run_stack
from shared.redis_server import RedisServer


@pytest.fixture
def reserved_stack(default_model_dir):
    """Its own Redis, and a worker with 2 slots, 1 kept for interactive jobs: it runs one batch job at a time."""
    with RedisServer() as server:
        env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2",
               "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "1"}
        with run_stack(server.url, env, log_prefix="llava-queue-sched-s29-") as stack:
            yield stack


def test_a_batch_job_takes_the_slot_of_the_one_that_ended_at_once(reserved_stack):
    """A worker at its share of batch jobs stops reading the batch queue and reads it again when one ends. The poll
    of the interactive queues waiting then (kombu's BRPOP, 1 s) went on with the queues it was sent for: the next
    batch job was taken only once it timed out, its slot empty meanwhile (0.4 to 0.8 s median between a batch job's
    end and the next one's start, against 0.02 s with no slot kept). The polls are short while the queue is paused."""
    stack = reserved_stack
    model = requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    # Every other job names the model (its own queue, batch.<model>): after each pause a poll of every queue at once
    # (BRPOP) took the next job naming the model before an older one naming none; now a job ahead starts first.
    ids = [requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": f"Say {i}", "max_new_tokens": 1,
                                                              "temperature": 0, "queue": "batch",
                                                              **({"model": model} if i % 2 else {})},
                         timeout=10).json()["id"] for i in range(9)]
    jobs = sorted((job_final(stack, job_id, timeout=120) for job_id in ids), key=lambda job: job["started_at"])
    assert all(job["status"] == "succeeded" for job in jobs), jobs
    assert [job["id"] for job in jobs] == ids, "started out of order"
    # One batch job at a time: each starts once the one before it has ended, in the slot it freed.
    gaps = [after["started_at"] - before["finished_at"] for before, after in zip(jobs, jobs[1:])]
    assert min(gaps) > -0.05, gaps
    assert statistics.median(gaps) < 0.25, (gaps, stack.logs())
