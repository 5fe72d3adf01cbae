"""`POST /v1/jobs/cancel`: cancelling the job of a submission by its Idempotency-Key, before or after the submission
reaches the API, on a real API process with two API keys and no worker (submitted jobs stay queued).

The web page sends it as it goes (pagehide) for a submission still unanswered: it has no job id to name then, and the
job it may have made would run for nobody. Its page test is in test_page.py.
"""

import time
import uuid

import pytest
import redis
import requests

from api.auth import key_digest
from conftest import run_stack
from shared.jobs import CANCELLED_ERROR, JobStore, owner_id
from shared.protocol import ErrorCode, GenerateRequest
from shared.redis_server import RedisServer

KEY = "cancel-key-123"
OTHER_KEY = "cancel-key-456"
# Shorter than a record's TTL (a day), so that a test tells which of the two a key was given.
IDEMPOTENCY_TTL = 3600


@pytest.fixture(scope="module")
def api():
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}", "{key_digest(OTHER_KEY)}"]',
           "LLAVA_QUEUE_IDEMPOTENCY_TTL_SECONDS": str(IDEMPOTENCY_TTL)}
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-cancel-by-key-") as stack:
        yield stack


def headers(key: str | None = KEY, idempotency_key: str | None = None) -> dict:
    return {**({"Authorization": f"Bearer {key}"} if key else {}),
            **({"Idempotency-Key": idempotency_key} if idempotency_key is not None else {})}


def submit(api, idempotency_key: str, key: str = KEY, prompt: str = "hi") -> requests.Response:
    return requests.post(f"{api.base_url}/v1/jobs", json={"prompt": prompt}, headers=headers(key, idempotency_key),
                         timeout=10)


def cancel(api, idempotency_key: str | None, key: str | None = KEY) -> requests.Response:
    return requests.post(f"{api.base_url}/v1/jobs/cancel", headers=headers(key, idempotency_key), timeout=10)


def status(api, job_id: str, key: str = KEY) -> str:
    response = requests.get(f"{api.base_url}/v1/jobs/{job_id}", headers=headers(key), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["status"]


def fresh_key() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def store(api):
    """The store the API writes to, read straight from its Redis."""
    return JobStore.from_url(api.redis_url)


def tallies(store: JobStore) -> dict:
    """What a job entering a queue moves: queue lengths, the enqueue order, the deadline set, the submitted count,
    and the finished count of this minute and the next that a 429's Retry-After is measured from."""
    totals = store.totals()
    minute = int(time.time() // 60)
    drained = store.redis.mget([f"{store.prefix}:finished:{m}" for m in (minute, minute + 1)])
    return {"queued": totals["queued"], "submitted": totals["submitted"], "order": store.redis.get(store.order_key),
            "deadlines": store.redis.zcard(store.deadlines_key), "drained": [int(n or 0) for n in drained],
            "cancelled": totals["finished"].get(("cancelled", ErrorCode.CANCELLED), 0)}


def test_a_submitted_job_is_cancelled_by_its_idempotency_key(api):
    key = fresh_key()
    job = submit(api, key).json()["id"]
    assert status(api, job) == "queued"
    cancelled = cancel(api, key)
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json() == {"id": job, "status": "cancelled"}
    assert status(api, job) == "cancelled"
    again = cancel(api, key)  # as DELETE /v1/jobs/{id} for a job that ended
    assert again.status_code == 409 and again.json()["error"]["param"] == "header.idempotency-key", again.text
    # The submission sent again with its key still gets its (cancelled) job: no new one.
    assert submit(api, key).json()["id"] == job


def test_a_cancel_that_comes_before_its_submission_leaves_the_submission_no_job(api):
    # The page's cancel (a keepalive request of its own) can reach the API before the submission it names does.
    key = fresh_key()
    cancelled = cancel(api, key)
    assert cancelled.status_code == 202, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    placeholder = cancelled.json()["id"]
    assert status(api, placeholder) == "cancelled"
    submitted = submit(api, key)
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["id"] == placeholder, "the submission made a job after its cancel"
    assert status(api, placeholder) == "cancelled"


def test_a_cancel_by_a_key_whose_job_is_gone_leaves_its_next_submission_no_job(api, store):
    # The job's record expired before its key (JOB_TTL_SECONDS shorter than IDEMPOTENCY_TTL_SECONDS): a submission
    # with the key is a new one (the key went with its job), so the cancel that comes first must take the key as if
    # it were unused. It answered 404 and left the key, and the submission after it ran its job.
    key = fresh_key()
    gone = submit(api, key, prompt="first").json()["id"]
    store.redis.delete(store.key(gone))  # its TTL
    cancelled = cancel(api, key)
    assert cancelled.status_code == 202, cancelled.text
    placeholder = cancelled.json()["id"]
    assert placeholder != gone and cancelled.json()["status"] == "cancelled"
    submitted = submit(api, key, prompt="another body, as the key's old one went with its job")
    assert submitted.status_code == 202, submitted.text
    assert submitted.json()["id"] == placeholder, "the submission made a job after its cancel"
    assert status(api, placeholder) == "cancelled"


def test_a_cancel_that_comes_first_never_queues_a_job(api, store):
    # It was a queued job, then a cancel: counted as submitted, given a queue position, and left queued with no task
    # for good by an API that died between the two.
    before = tallies(store)
    cancelled = cancel(api, fresh_key())
    assert cancelled.status_code == 202, cancelled.text
    after = tallies(store)
    moved = {name: (before[name], after[name]) for name in before
             if name != "cancelled" and before[name] != after[name]}
    assert not moved, f"a cancel that came first moved what a queued job moves (before, after): {moved}"
    assert after["cancelled"] == before["cancelled"] + 1  # it is a job that ended cancelled all the same


def test_a_cancel_that_comes_first_records_what_a_cancelled_queued_job_records(api, store):
    key = fresh_key()
    early = cancel(api, key).json()["id"]
    late_key = fresh_key()
    queued = submit(api, late_key).json()["id"]
    assert cancel(api, late_key).json() == {"id": queued, "status": "cancelled"}
    first, then = store.redis.hgetall(store.key(early)), store.redis.hgetall(store.key(queued))
    assert first.keys() == then.keys()
    for field in ("status", "queue", "seq", "error", "error_code", "finish_reason", "cancel_requested", "owner"):
        assert first[field] == then[field], field
    record = store.get(early)
    assert (record["status"], record["error"], record["error_code"]) == ("cancelled", CANCELLED_ERROR,
                                                                         ErrorCode.CANCELLED)
    assert record["owner"] == owner_id(key_digest(KEY)) and record["queue_position"] is None
    assert record["created_at"] <= record["finished_at"]
    assert IDEMPOTENCY_TTL < store.redis.ttl(store.key(early)) <= store.ttl_seconds
    assert 0 < store.redis.ttl(store.idempotency_key(f"{owner_id(key_digest(KEY))}:{key}")) <= IDEMPOTENCY_TTL


def test_a_cancel_first_whose_answer_was_lost_still_answers_that_it_cancelled(store):
    # Sent again after its connection was cut (it ran): "already ended" would make the route answer 409.
    script, cut = store._create_cancelled, []

    def cut_once(**call):
        answer = script(**call)
        if not cut:
            cut.append(answer)
            raise redis.ConnectionError("the connection was cut after the script ran")
        return answer

    store._create_cancelled = cut_once
    job, created = store.create_cancelled(GenerateRequest(prompt="", max_new_tokens=0), "interactive", fresh_key())
    assert created and job == cut[0][0] and store.get(job)["status"] == "cancelled"


def test_another_api_key_cannot_cancel_a_job_by_the_same_idempotency_key(api):
    key = fresh_key()
    mine = submit(api, key).json()["id"]
    theirs = cancel(api, key, key=OTHER_KEY)
    assert theirs.status_code == 202 and theirs.json()["id"] != mine, theirs.text
    assert status(api, mine) == "queued"
    # Nor take a key ahead of this API key's submission: that still makes its job.
    later = fresh_key()
    assert cancel(api, later, key=OTHER_KEY).status_code == 202
    fresh = submit(api, later).json()["id"]
    assert status(api, fresh) == "queued"
    for job in (mine, fresh):
        requests.delete(f"{api.base_url}/v1/jobs/{job}", headers=headers(), timeout=10)


def test_a_cancel_by_the_key_of_a_bulk_submission_is_refused_and_cancels_nothing(api, store):
    # A bulk submission's jobs are kept under the key and each one's index: the key alone named none of them, so a
    # cancel made a job cancelled from the start under it and answered 202 "cancelled" while the jobs stayed queued.
    key = fresh_key()
    bulk = requests.post(f"{api.base_url}/v1/jobs/bulk", json={"jobs": [{"prompt": "a"}, {"prompt": "b"}]},
                         headers=headers(KEY, key), timeout=10)
    assert bulk.status_code == 202, bulk.text
    ids = bulk.json()["ids"]
    before = tallies(store)
    refused = cancel(api, key)
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["param"] == "header.idempotency-key" and ids[0] in error["message"], error
    assert "by their ids" in error["message"]
    assert tallies(store) == before, "the refused cancel made a job"
    assert [status(api, job) for job in ids] == ["queued", "queued"]
    # Another API key's cancel by the same key is its own: it cancels (makes) a job of its own, as before.
    assert cancel(api, key, key=OTHER_KEY).status_code == 202
    again = requests.post(f"{api.base_url}/v1/jobs/bulk", json={"jobs": [{"prompt": "a"}, {"prompt": "b"}]},
                          headers=headers(KEY, key), timeout=10)
    assert again.json()["ids"] == ids
    for job in ids:
        requests.delete(f"{api.base_url}/v1/jobs/{job}", headers=headers(), timeout=10)


def test_a_cancel_by_key_names_its_key_and_its_api_key(api):
    missing = cancel(api, None)
    assert missing.status_code == 422, missing.text
    assert cancel(api, "").status_code == 422
    assert cancel(api, fresh_key(), key=None).status_code == 401
