"""A batch message the worker counted and Celery then dropped gives its slot back at once; the job store's ending
writes all or nothing; a record key of another type leaves its queue set."""

import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import redis

from conftest import job_final
from shared.celery_app import BATCH_QUEUE, GENERATE_TASK, make_celery
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest
from shared.settings import Settings
from test_records_s18 import png_b64
from test_worker_s41 import one_batch_slot_stack, submit_batch_job, wait_for_log  # noqa: F401 (a fixture)


def test_a_batch_message_celery_rejects_after_its_receipt_gives_its_slot_back(one_batch_slot_stack):  # noqa: F811
    """An ETA that parses but does not convert to a timestamp (a foreign client's, 14 hours before year 1) is
    rejected by Celery after the worker counted the message as a batch job; nothing ends it. At a batch limit of 1
    the worker stopped reading the batch queue until some interactive job came, and the batch job after it waited."""
    stack = one_batch_slot_stack
    app = make_celery(Settings(redis_url=stack.redis_url))
    task_id = uuid.uuid4().hex
    app.send_task(GENERATE_TASK, args=[task_id], task_id=task_id, queue=BATCH_QUEUE,
                  eta=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))))
    wait_for_log(stack.log_dir / "worker.log", "Couldn't convert ETA")
    job = job_final(stack, submit_batch_job(stack, "Say 1"), timeout=30)
    assert job["status"] == "succeeded", job


def two_image_job(store: JobStore, batch: str | None = None) -> tuple[str, list[str]]:
    """A job holding two stored images, running on worker "w" (a line of `batch` if given); its image keys."""
    images = [png_b64(seed) for seed in (20, 21)]
    extra = [{"batch": batch, "batch_line": 0}] if batch else None
    [job_id] = store.create_many([GenerateRequest(prompt="<image>\n<image>\nWhat?", images=images)], "batch",
                                 extra=extra)
    assert store.start(job_id, "w") == "running"
    return job_id, [store.image_key_of(image) for image in images]


@pytest.mark.parametrize("damage", ["image key", "refs", "batch results", "batch count"])
def test_an_ending_that_meets_damage_of_the_jobs_own_writes_a_whole_failed_ending(redis_server, damage):
    """An ending stopped half-way by a key it could not write (an image key of another type, a count of its holders
    or of its batch that is no number) had ended the job in its record, which stayed in the running hash, its
    ending unpublished, its other image held for good and its record never expiring. Now nothing is written before
    every key is checked: the job fails saying what is damaged, and lets go of all the rest."""
    store = JobStore.from_url(redis_server.url, prefix=f"llq-s42-{uuid.uuid4().hex[:8]}")
    batch = uuid.uuid4().hex[:8]
    bkey = f"{store.batch_prefix}{batch}"
    store.redis.hset(bkey, mapping={"status": "in_progress", "total": 2})
    job_id, (first, second) = two_image_job(store, batch)
    broken = {"image key": second, "refs": second, "batch results": f"{bkey}:results", "batch count": bkey}[damage]
    if damage == "image key":
        store.redis.delete(second)
        store.redis.set(second, "an image of another type")
    elif damage == "refs":
        store.redis.hset(second, "refs", "many")
    elif damage == "batch results":
        store.redis.set(f"{bkey}:results", "results of another type")
    else:
        store.redis.hset(bkey, "completed", "a few")
    kept = store.redis.dump(broken)
    with store.redis.pubsub() as listener:
        listener.subscribe(store.channel(job_id))
        assert listener.get_message(timeout=5)["type"] == "subscribe"
        assert not store.finish(job_id, "succeeded", finish_reason="stop", worker="w")
        done = json.loads(listener.get_message(timeout=5)["data"])
    record = store.get(job_id)
    assert (record["status"], record["error_code"], done["status"]) == ("failed", ErrorCode.SERVER_ERROR, "failed")
    assert record["error"] == done["error"] and "damaged" in record["error"] and broken in record["error"], record
    assert store.redis.dump(broken) == kept  # the damaged key is left as it was
    assert store.redis.hget(store.running_key, job_id) is None and store.redis.ttl(store.key(job_id)) > 0
    assert "image_keys" not in record
    if damage.startswith("batch"):
        assert store.redis.exists(first, second) == 0  # both images let go of
        assert store.redis.hget(bkey, "ended") is None  # a damaged batch is not written to
    else:
        assert store.redis.exists(first) == 0  # the image it could let go of, let go of
        assert store.redis.hget(bkey, "failed") == "1" and store.redis.hget(bkey, "ended") == "1"


def test_an_ending_that_meets_a_store_key_of_another_type_writes_nothing_and_says_which(redis_server):
    """The running hash of another type: the ending had written the job's final status, let go of its images, then
    stopped on the running hash with a bare WRONGTYPE. Now it writes nothing, and its error names the key."""
    store = JobStore.from_url(redis_server.url, prefix=f"llq-s42-{uuid.uuid4().hex[:8]}")
    job_id, images = two_image_job(store)
    store.redis.delete(store.running_key)
    store.redis.set(store.running_key, "a running hash of another type")
    before = [store.redis.dump(key) for key in (store.key(job_id), *images)]
    with pytest.raises(redis.ResponseError, match=f"WRONGTYPE job {job_id}: .*{store.running_key} holds a string"):
        store.finish(job_id, "succeeded", finish_reason="stop", worker="w")
    assert [store.redis.dump(key) for key in (store.key(job_id), *images)] == before


def test_a_job_whose_record_is_of_another_type_leaves_its_queue(redis_server, caplog):
    """A record key SET by hand to a string: the worker's start, and then the failed ending it writes, met WRONGTYPE,
    and the job stayed in its queue for good, counted as queued (and in the deadline set, and in its owner's quota,
    which then failed every submission of that key). Now its ending takes it out of them and says why; the key is
    left as it is."""
    store = JobStore.from_url(redis_server.url, prefix=f"llq-s42-{uuid.uuid4().hex[:8]}", max_queued_per_owner=5)
    job_id, _ = store.create(GenerateRequest(prompt="Hello", max_new_tokens=2), "interactive", deadline_seconds=600,
                             owner="o")
    store.redis.delete(store.key(job_id))
    store.redis.set(store.key(job_id), "a record of another type")
    assert store.owner_queued("o", at_least=1) == 0  # it no longer raises WRONGTYPE, and it leaves the quota
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.start(job_id, "w")
    # What the worker writes then (JobRunner.run): a failed ending, which Redis refuses, saying why.
    with pytest.raises(redis.ResponseError, match=f"job {job_id}: the job's record is damaged: its key holds a string"):
        store.finish(job_id, "failed", error="could not start", error_code=ErrorCode.SERVER_ERROR,
                     finish_reason="error", worker="w")
    assert store.queue_lengths() == {"interactive": 0, "batch": 0}
    assert store.redis.zscore(store.deadlines_key, job_id) is None
    assert store.redis.get(store.key(job_id)) == "a record of another type"
