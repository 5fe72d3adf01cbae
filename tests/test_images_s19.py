"""Images are stored once each, however many queued jobs hold them (JobStore.image_key): an evaluation asks several
questions of each image, and each question's record held its own copy of the image until the job ended."""

import uuid

from shared.jobs import Ending, JobStore, NewJob
from shared.protocol import GenerateRequest
from test_records_s18 import png_b64


def image_keys(store: JobStore) -> list[str]:
    return sorted(store.redis.scan_iter(f"{store.prefix}:image:*"))


def test_jobs_that_share_an_image_hold_one_copy_until_the_last_ends(redis_server):
    store = JobStore.from_url(redis_server.url, prefix=f"llq-images-{uuid.uuid4().hex[:8]}")
    shared, own = png_b64(0), png_b64(1)
    questions = [GenerateRequest(model="llava-v1.5-13b", prompt=f"<image>\nQuestion {i}?", images=[shared])
                 for i in range(20)]
    # The same image twice in one job, once in a turn and once as a second turn's image of another kind of request.
    chat = GenerateRequest(model="llava-v1.5-13b", messages=[
        {"role": "user", "text": "", "images": [shared]}, {"role": "assistant", "text": "A field."},
        {"role": "user", "text": "And <image>?", "images": [own]}])
    ids = store.create_jobs([NewJob(request, "batch") for request in questions])  # one transaction
    ids += store.create_many([questions[0]], "batch")  # a batch's lines: no transaction
    ids.append(store.create(chat, "interactive")[0])
    keyed, created = store.create(questions[1], "interactive", idempotency_key="k")
    again, created_again = store.create(questions[1], "interactive", idempotency_key="k")  # a retry: no new hold
    assert created and not created_again and again == keyed
    ids.append(keyed)

    shared_key, own_key = store.image_key_of(shared), store.image_key_of(own)
    assert image_keys(store) == sorted([shared_key, own_key])
    assert store.redis.hget(shared_key, "refs") == str(len(questions) + 3)
    assert store.redis.hget(own_key, "refs") == "1"
    used = store.redis.memory_usage(store.key(ids[0])) + store.redis.memory_usage(shared_key) / len(ids)
    assert used < len(shared) / 4, (used, len(shared))  # the image is no longer in each record
    # The worker reads each job's request with its images in their places.
    assert store.request_of(ids[0]) == questions[0]
    assert store.request_of(ids[-2]) == chat
    assert store.request_of(keyed) == questions[1]

    # Ended every way a job ends: cancelled while queued, by a worker, expired, cancelled before its submission.
    store.cancel(ids[0])
    store.finish_many([Ending(job_id, "succeeded", finish_reason="stop") for job_id in ids[1:-2]])
    assert store.redis.hget(shared_key, "refs") == "2"
    assert store.finish(ids[-2], "failed", error="broken", error_code=4, finish_reason="error")
    assert image_keys(store) == [shared_key]  # the chat was the only job with the second image
    assert not store.finish(ids[-2], "succeeded")  # an ended job lets go once
    assert store.redis.hget(shared_key, "refs") == "1"
    store.cancel(keyed)
    assert image_keys(store) == []
    cancelled, _ = store.create_cancelled(questions[2], "interactive", "cancelled-first")
    assert image_keys(store) == [] and store.redis.hget(store.key(cancelled), "image_keys") is None


def test_a_job_whose_image_is_gone_fails_with_a_clear_error_not_a_wrong_request(redis_server):
    store = JobStore.from_url(redis_server.url, prefix=f"llq-images-{uuid.uuid4().hex[:8]}")
    image = png_b64(2)
    job_id, _ = store.create(GenerateRequest(prompt="<image>\nWhat?", images=[image]), "batch")
    store.redis.delete(store.image_key_of(image))  # deleted by hand (FLUSH, an operator): never by the store
    try:
        store.request_of(job_id)
    except LookupError as exc:
        assert job_id in str(exc) and "no longer stored" in str(exc)
    else:
        raise AssertionError("a request whose image is gone was read")
