"""Two API processes on one Redis, as replicas behind a load balancer: a client sees one deployment whichever API it
reaches. No worker runs here, so every job accepted stays queued and counts against the limits."""

import hashlib
import json
import threading
import time
from functools import partial

import pytest
import requests

from conftest import run_stack
from shared.redis_server import RedisServer

QUOTA = 4
KEYS = ("replica-key-1", "replica-key-2", "replica-key-3")


@pytest.fixture(scope="module")
def replicas():
    """API processes A and B (no worker) on one Redis, with API keys and a per-key quota of QUOTA queued jobs."""
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([hashlib.sha256(key.encode()).hexdigest() for key in KEYS]),
           "LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY": str(QUOTA)}
    with RedisServer() as server, run_stack(server.url, env, workers=()) as a, \
            run_stack(server.url, env, workers=()) as b:
        yield a, b


def at_once(calls: list) -> list[requests.Response]:
    """The answers of `calls` (each a function of a requests.Session), made at the same moment from threads."""
    answers: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def call(index: int) -> None:
        with requests.Session() as session:
            start.wait()
            answers[index] = calls[index](session)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def cancel_all(base_url: str, key: str, job_ids) -> None:
    """Cancel the (queued) jobs `job_ids` of `key` at `base_url`, so that they leave its quota."""
    for job_id in job_ids:
        assert requests.delete(f"{base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"},
                               timeout=10).status_code == 202


def test_a_keys_quota_is_one_quota_across_api_processes(replicas):
    """Submissions with one key that reach A and B at the same moment are admitted up to the key's quota, not past
    it: each process counted the queued jobs without those the other was recording (5 admitted for a quota of 4)."""
    a, b = replicas
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    job = {"prompt": "Hi", "max_new_tokens": 4}
    for _ in range(6):
        answers = at_once([lambda session, url=stack.base_url: session.post(f"{url}/v1/jobs", json=job,
                                                                            headers=headers, timeout=30)
                           for stack in (a, b) * QUOTA])
        assert sorted(answer.status_code for answer in answers) == [202] * QUOTA + [429] * QUOTA, \
            [answer.text for answer in answers]
        cancel_all(b.base_url, KEYS[0], [answer.json()["id"] for answer in answers if answer.status_code == 202])


def test_one_idempotency_key_sent_to_both_api_processes_gets_its_job_at_each(replicas):
    """The same keyed submission sent to A and to B at once, with room for one more job in the key's quota: both get
    the one job it makes. One of them got a 429 (the quota full with its twin's job) while the other got the job."""
    a, b = replicas
    headers = {"Authorization": f"Bearer {KEYS[1]}"}
    job = {"prompt": "Hi", "max_new_tokens": 4}
    filled = [requests.post(f"{a.base_url}/v1/jobs", json=job, headers=headers, timeout=10) for _ in range(QUOTA - 1)]
    assert [answer.status_code for answer in filled] == [202] * (QUOTA - 1)
    for attempt in range(8):
        keyed = {**headers, "Idempotency-Key": f"at-both-{attempt}"}
        answers = at_once([lambda session, url=stack.base_url: session.post(f"{url}/v1/jobs", json=job,
                                                                            headers=keyed, timeout=30)
                           for stack in (a, b, a, b)])
        assert [answer.status_code for answer in answers] == [202] * 4, [answer.text for answer in answers]
        assert len({answer.json()["id"] for answer in answers}) == 1
        cancel_all(a.base_url, KEYS[1], [answers[0].json()["id"]])
    cancel_all(b.base_url, KEYS[1], [answer.json()["id"] for answer in filled])


def test_a_batch_and_jobs_sent_to_two_api_processes_at_once_share_the_keys_quota(replicas):
    """A batch of two questions created on A while three jobs are submitted on B, with the same key (quota 4): what
    is admitted fits the quota. The batch held its places in one step, but a submission that had counted the queues
    before and was recording its jobs did not see them, nor the batch its jobs."""
    a, b = replicas
    headers = {"Authorization": f"Bearer {KEYS[2]}"}
    questions = b'{"question_id": 1, "text": "Hi"}\n{"question_id": 2, "text": "Yo"}\n'
    job = {"prompt": "Hi", "max_new_tokens": 4}

    def create_batch(session, delay: float):
        time.sleep(delay)  # the jobs' admission and the batch's meet at a different point each round
        return session.post(f"{a.base_url}/v1/batches", headers=headers, files={"file": ("q.jsonl", questions)},
                            data={"completion_window": "24h", "max_new_tokens": "4"}, timeout=30)

    for attempt in range(300):
        batch, *answers = at_once([partial(create_batch, delay=attempt % 30 / 2000)] + [lambda session: session.post(
            f"{b.base_url}/v1/jobs", json=job, headers=headers, timeout=30)] * 3)
        jobs = [answer.json()["id"] for answer in answers if answer.status_code == 202]
        assert batch.status_code in (200, 429) and all(answer.status_code in (202, 429) for answer in answers)
        lines = batch.json()["request_counts"]["total"] if batch.status_code == 200 else 0
        assert lines + len(jobs) <= QUOTA, (batch.text, [answer.text for answer in answers])
        if lines:
            assert requests.post(f"{b.base_url}/v1/batches/{batch.json()['id']}/cancel", headers=headers,
                                 timeout=10).status_code == 200
        cancel_all(a.base_url, KEYS[2], jobs)
