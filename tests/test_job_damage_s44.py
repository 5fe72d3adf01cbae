"""One job whose record key holds another type than a hash (a key SET by hand, or by another program on the prefix)
among many: the calls that touch many jobs report it damaged, or pass over it, and go on with the others. Its
WRONGTYPE failed them all: a batch's cancel, every job of a worker's step, the orphan sweep and /metrics."""

import json
import time
import uuid

import pytest
import requests

from conftest import job_final, run_stack
from shared.jobs import RECORD_DAMAGED, DamagedRecord, Ending, JobStore
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_batches import jsonl, questions, upload_batch


@pytest.fixture
def store(redis_server):
    """A job store under a prefix of its own."""
    store = JobStore.from_url(redis_server.url, prefix=f"llq-damage-{uuid.uuid4().hex[:8]}")
    yield store
    store.redis.close()


def new_jobs(store: JobStore, count: int) -> list[str]:
    return [store.create(GenerateRequest(prompt="Hello", max_new_tokens=4), "interactive")[0] for _ in range(count)]


def damage(store: JobStore, job_id: str) -> None:
    """Make the job's record a string, as a SET by hand does."""
    store.redis.delete(store.key(job_id))
    store.redis.set(store.key(job_id), "a record of another type")


def test_cancelling_many_jobs_cancels_all_but_the_one_whose_record_is_of_another_type(store):
    first, damaged, last = new_jobs(store, 3)
    damage(store, damaged)
    statuses = store.cancel_many([first, damaged, last])
    assert statuses[0] == statuses[2] == "queued" and isinstance(statuses[1], DamagedRecord), statuses
    assert [store.get(job_id)["status"] for job_id in (first, last)] == ["cancelled", "cancelled"]
    with pytest.raises(DamagedRecord, match=f"job {damaged}: the job's record is damaged: its key holds a string"):
        store.cancel(damaged)
    assert store.redis.get(store.key(damaged)) == "a record of another type"  # left as it is


def test_a_step_is_written_for_every_job_but_the_one_whose_record_is_of_another_type(store, caplog):
    # The worker took the step's error for the whole step unwritten, and failed every job it ran.
    first, damaged, last, ending = new_jobs(store, 4)
    for job_id in (first, damaged, last, ending):
        assert store.start(job_id, "worker-1") == "running"
    damage(store, damaged)
    chunks = [(job_id, "Hi", 1, True) for job_id in (first, damaged, last)]
    assert store.record_step("worker-1", chunks, [Ending(ending, "succeeded", finish_reason="stop")], 1) == [
        1, RECORD_DAMAGED, 1]
    assert store.get(ending)["status"] == "succeeded"
    # Its ending, once the worker drops it, leaves the running hash, logged; the other jobs' chunks are written.
    assert store.record_step("worker-1", [(first, " there", 2, False)],
                             [Ending(damaged, "cancelled", finish_reason="cancelled")], 2) == [2]
    assert [store.get(job_id)["text"] for job_id in (first, last)] == ["Hi there", "Hi"]
    assert not store.redis.hexists(store.running_key, damaged)
    assert f"job {damaged}: the job's record is damaged: its key holds a string" in caplog.text
    with pytest.raises(DamagedRecord):  # alone (with its own chunks at most), for the worker to log
        store.record_step("worker-1", [(damaged, "!", 2, False)], [Ending(damaged, "cancelled")], 3)


def test_a_worker_runs_on_its_other_jobs_when_one_jobs_record_is_made_of_another_type(stack):
    # The step's WRONGTYPE was taken for the whole step unwritten: every job the worker ran failed with "the worker
    # could not write the job's text to Redis".
    story = {"messages": [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}],
             "temperature": 0, "max_new_tokens": 60}
    job_ids = [requests.post(f"{stack.base_url}/v1/jobs", json=story, timeout=10).json()["id"] for _ in range(3)]
    store = JobStore.from_url(stack.redis_url, prefix=Settings().key_prefix)
    deadline = time.monotonic() + 60
    while not all(store.redis.hget(store.key(job_id), "text") for job_id in job_ids):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.05)
    damage(store, job_ids[1])
    assert [store.redis.hget(store.key(job_id), "status") for job_id in (job_ids[0], job_ids[2])] == ["running"] * 2
    for job_id in (job_ids[0], job_ids[2]):
        job = job_final(stack, job_id)
        assert (job["status"], job["finish_reason"]) == ("succeeded", "length"), job
    deadline = time.monotonic() + 10
    while store.redis.hexists(store.running_key, job_ids[1]):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.05)
    assert f"job {job_ids[1]}: the job's record is damaged" in (stack.log_dir / "worker.log").read_text()
    store.redis.delete(store.key(job_ids[1]))
    store.redis.close()


def test_the_sweep_and_the_counts_pass_over_a_requeued_job_whose_record_is_of_another_type(store, caplog):
    # Handed back, then damaged: reading its model raised in /metrics, `status` and every round of the orphan sweep;
    # claimed, its record's WRONGTYPE failed the sweep's round too, the claims of other dead workers' jobs with it.
    handed_back, orphan, damaged_orphan = new_jobs(store, 3)
    assert store.start(handed_back, "worker-1", "model-a") == "running"
    assert store.release(handed_back, "worker-1")
    for job_id in (orphan, damaged_orphan):
        assert store.start(job_id, "dead-worker", "model-a") == "running"
    damage(store, handed_back)
    damage(store, damaged_orphan)
    store.redis.set(f"{store.prefix}:worker:live", json.dumps({"model": "model-a"}))  # a live worker of its model
    store.redis.zadd(f"{store.prefix}:workers", {"live": store.clock() + 60})
    totals = store.totals()
    assert (totals["running"], totals["requeued"], totals["requeued_per_model"]) == (3, 1, {}), totals
    claims = {claim.job_id: claim for claim in store.orphans(requeue_after=0)}
    assert set(claims) == {handed_back, orphan, damaged_orphan}
    assert [store.claim(claims[job_id]) for job_id in (handed_back, orphan, damaged_orphan)] == [False, True, False]
    assert set(store.redis.hkeys(store.running_key)) == {orphan}
    lines = [record.getMessage() for record in caplog.records if "no longer counted as running" in record.getMessage()]
    assert len(lines) == 2 and all("its key holds a string" in line for line in lines), lines


@pytest.fixture(scope="module")
def api_only():
    """An API on a Redis of its own, with no worker; and a job store on that Redis."""
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-damage-") as stack:
        store = JobStore.from_url(server.url, prefix=Settings().key_prefix)
        yield stack, store
        store.redis.close()


def test_a_batch_with_a_line_whose_record_is_of_another_type_is_cancelled_all_the_same(api_only):
    # POST /v1/batches/{id}/cancel answered 503 "the job store is unavailable", the batch left `cancelling` with its
    # other lines queued.
    stack, store = api_only
    batch = upload_batch(stack, jsonl(questions(3, image=False)))
    job_ids = store.redis.zrange(store.queue_key("batch"), 0, -1)
    assert len(job_ids) == 3, batch
    damage(store, job_ids[1])
    cancel = requests.post(f"{stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=60)
    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelling", cancel.text
    assert [store.get(job_id)["status"] for job_id in (job_ids[0], job_ids[2])] == ["cancelled", "cancelled"]


def test_a_submission_sent_again_whose_job_has_a_record_of_another_type_answers_500_saying_so(api_only):
    # Its key names the job, whose status the retry reads: its WRONGTYPE was a 503 "the job store is unavailable, try
    # again shortly", logged as an outage, and the client retried it for good.
    stack, store = api_only

    def submit() -> requests.Response:
        return requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Hello"},
                             headers={"Idempotency-Key": "damaged-retry"}, timeout=10)

    job_id = submit().json()["id"]
    damage(store, job_id)
    again = submit()
    error = again.json()["error"]
    assert (again.status_code, error["type"]) == (500, "server_error"), again.text
    assert error["message"].startswith(f"job {job_id}: the job's record is damaged: its key holds a string"), error
