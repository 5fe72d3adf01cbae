"""A job record that llava-queue did not write whole (by hand, by another program on the same prefix): the worker
fails the job with a message and no traceback, polling it answers a 500 that names what is wrong, and the jobs
around it run as before. Before, the worker logged an AttributeError's traceback and polling raised a KeyError."""

import time

import redis
import requests

from shared.celery_app import make_celery, send_many
from shared.jobs import JobStore
from shared.protocol import GenerateRequest
from shared.settings import Settings
from test_pipeline import submit, wait_until

PREFIX = "llq"  # the settings' default key prefix, which the stack's processes read


def test_a_job_whose_record_lost_its_request_fails_with_a_message_and_the_worker_goes_on(stack):
    store = JobStore.from_url(stack.redis_url, prefix=PREFIX)
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    job_id, _ = store.create(GenerateRequest(prompt="Hello", max_new_tokens=4), "interactive")
    client.hdel(store.key(job_id), "request")
    before = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
    assert before.status_code == 500, before.text
    assert before.json()["error"]["message"] == f"the record of job {job_id!r} is damaged: it has no valid request"
    send_many(make_celery(Settings(redis_url=stack.redis_url)), [(job_id, "interactive")], store.clock)
    deadline = time.monotonic() + 60
    while client.hget(store.key(job_id), "status") in ("queued", "running"):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    error, code = client.hmget(store.key(job_id), ("error", "error_code"))
    assert client.hget(store.key(job_id), "status") == "failed" and error == f"job {job_id}: its record holds no " \
        "request" and code != "0", (error, code)
    log = (stack.log_dir / "worker.log").read_text()
    assert f"job {job_id} failed" not in log  # the line of its traceback (other tests' tracebacks share this log)
    assert wait_until(stack, submit(stack, prompt="Once upon a time", max_new_tokens=4))["status"] == "succeeded"


def test_polling_a_record_with_fields_missing_or_a_request_that_is_none_answers_a_500_naming_them(stack):
    store = JobStore.from_url(stack.redis_url, prefix=PREFIX)
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    cases = [
        (lambda key, job_id: (client.delete(key), client.hset(key, "id", job_id)),
         "status, queue, model, prompt, request, text, error, finish_reason"),
        (lambda key, job_id: client.hdel(key, "status", "queue"), "status, queue"),
        (lambda key, job_id: client.hset(key, "request", "[1, 2]"), "request"),
        (lambda key, job_id: client.hset(key, "request", "{oops"), "request"),
    ]
    for damage, missing in cases:
        job_id, _ = store.create(GenerateRequest(prompt="Hello", max_new_tokens=4), "interactive")
        client.zrem(store.queue_key("interactive"), job_id)  # no worker's sweep sends it
        damage(store.key(job_id), job_id)
        response = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
        assert response.status_code == 500, response.text
        assert response.json()["error"] == {"message": f"the record of job {job_id!r} is damaged: it has no valid "
                                            f"{missing}", "type": "server_error", "param": None, "code": 1}
        client.delete(store.key(job_id))
    assert wait_until(stack, submit(stack, prompt="Hello", max_new_tokens=2))["status"] == "succeeded"
