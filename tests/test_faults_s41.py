"""Job records damaged while their jobs wait in a queue (by hand, or by another program on the key prefix): the worker
fails each job with an error that says what is wrong, the job leaves its queue and expires as any ended job does, and
the jobs around it run. A real stack on a Redis of its own."""

import time

import pytest
import requests

from conftest import job_final, run_stack
from shared.celery_app import make_celery, send_many
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings

# What such a job fails with (shared.jobs.DAMAGED_STATUS_ERROR).
DAMAGED = ("the job's record is damaged: it has no status llava-queue writes (changed by hand, or by another program "
           "on the key prefix)")


@pytest.fixture(scope="module")
def damage_stack(default_model_dir):
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir)},
                                            log_prefix="llava-queue-faults-s41-") as stack:
        store = JobStore.from_url(server.url)  # the settings' default key prefix, which the stack's processes read
        yield stack, store
        store.redis.close()


def damaged_jobs(stack, store: JobStore, damages) -> list[str]:
    """A queued job for each of `damages` (a function of the record's key), its record damaged before its task is
    sent (as a job damaged while it waits in a queue)."""
    ids = []
    for damage in damages:
        job_id, _ = store.create(GenerateRequest(prompt="Hello", max_new_tokens=4), "interactive")
        damage(store.key(job_id))
        ids.append(job_id)
    send_many(make_celery(Settings(redis_url=stack.redis_url)), [(job_id, "interactive") for job_id in ids],
              store.clock)
    return ids


def ended(stack, store: JobStore, job_id: str, timeout: float = 60) -> dict[str, str]:
    """The job's record once it has a final status; AssertionError with the logs if it has not in `timeout` s."""
    deadline = time.monotonic() + timeout
    while (raw := store.redis.hgetall(store.key(job_id))).get("status") not in ("succeeded", "failed", "cancelled",
                                                                                "expired"):
        assert time.monotonic() < deadline, f"job {job_id} did not end: {raw}\n{stack.logs()}"
        time.sleep(0.2)
    return raw


def submit_one(stack) -> str:
    return requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Once upon a time", "max_new_tokens": 4},
                         timeout=10).json()["id"]


def test_a_queued_job_whose_record_lost_its_status_fails_leaves_its_queue_and_expires(damage_stack):
    # JobStore.start answered "missing" for a record with no status (and its status for one it does not know): the
    # worker skipped the job, which stayed in its queue for good, counted against MAX_QUEUED_JOBS and ahead of every
    # batch job in their queue positions, its record never ended nor expired, and its client polled a 500 for ever.
    stack, store = damage_stack
    ids = damaged_jobs(stack, store, [lambda key: store.redis.hdel(key, "status"),
                                      lambda key: store.redis.hset(key, "status", "paused")])
    after = submit_one(stack)
    for job_id in ids:
        raw = ended(stack, store, job_id)
        assert (raw["status"], raw["error"], raw["error_code"]) == ("failed", DAMAGED,
                                                                    str(int(ErrorCode.SERVER_ERROR))), raw
        assert 0 < store.redis.ttl(store.key(job_id)) <= store.ttl_seconds  # it expires as every ended job does
        assert not store.redis.hexists(store.running_key, job_id)
        view = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
        assert view.status_code == 200 and view.json()["status"] == "failed", view.text
    assert job_final(stack, after)["status"] == "succeeded"
    assert store.queue_lengths() == {"interactive": 0, "batch": 0}
    # A start sent again after its answer was lost answers as the first did.
    [again] = damaged_jobs(stack, store, [lambda key: store.redis.hdel(key, "status")])
    ended(stack, store, again)
    store.redis.hdel(store.key(again), "status")
    assert store.start(again, "w1", token="t") == "damaged"
    assert store.start(again, "w1", token="t") == "damaged"
    assert store.finish(again, "failed", error=DAMAGED, worker="w1")


def test_a_queued_job_whose_request_is_damaged_fails_saying_which_field_and_no_traceback(damage_stack):
    # A request that is no object, read with its images (the record names some), failed the job with "AttributeError:
    # 'list' object has no attribute 'get'" and a traceback in the worker's log; one of the wrong shape failed it with
    # pydantic's dump of every error (each with a web address to look it up at), which named no job.
    stack, store = damage_stack
    listed, wrong_type, not_json = damaged_jobs(stack, store, [
        lambda key: store.redis.hset(key, mapping={"request": "[1, 2]", "image_keys": store.image_key("0" * 64)}),
        lambda key: store.redis.hset(key, "request", '{"prompt": 5, "temperature": "hot"}'),
        lambda key: store.redis.hset(key, "request", "{oops"),
    ])
    after = submit_one(stack)
    errors = {job_id: ended(stack, store, job_id) for job_id in (listed, wrong_type, not_json)}
    assert all(raw["status"] == "failed" for raw in errors.values()), errors
    assert errors[listed]["error"] == (f"job {listed}: the request its record holds is not one llava-queue writes "
                                       "(the record is damaged: changed by hand, or by another program on the key "
                                       "prefix)")
    assert errors[wrong_type]["error"] == (f"job {wrong_type}: the request its record holds is not valid here "
                                           "(prompt: Input should be a valid string; temperature: Input should be a "
                                           "valid number, unable to parse string as a number)"), errors[wrong_type]
    assert errors[not_json]["error"].startswith(f"job {not_json}: the request its record holds is not valid here "
                                                "(the request: Invalid JSON"), errors[not_json]
    assert not any("errors.pydantic.dev" in raw["error"] for raw in errors.values())
    assert job_final(stack, after)["status"] == "succeeded"
    log = (stack.log_dir / "worker.log").read_text()
    assert f"job {listed} failed" not in log and "AttributeError" not in log, log[-3000:]
