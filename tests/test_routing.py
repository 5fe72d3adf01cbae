"""Two models on one Redis: a job that names a model runs on a worker serving that model, a job that names none
on any worker (shared/celery_app.py `task_queue`)."""

import os

import pytest
import requests

from conftest import job_final, model_workers, run_stack
from shared.celery_app import task_queue
from shared.redis_server import RedisServer

MODELS = ("alpha", "beta")


@pytest.fixture
def two_models(default_model_dir):
    """An API and two workers on a Redis of their own: the default model's weights served as "alpha" by one
    worker and as "beta" by the other."""
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir),
                                                         "LLAVA_QUEUE_MAX_NUM_SEQS": "4"},
                                            workers=(), log_prefix="llava-queue-routing-") as stack:
        env = {**os.environ, "LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4"}
        with model_workers(stack, env, MODELS):
            yield stack


def test_a_job_that_names_a_model_runs_on_a_worker_of_that_model(two_models):
    stack = two_models
    served = requests.get(f"{stack.base_url}/v1/models", timeout=10).json()
    assert sorted(model["id"] for model in served["data"]) == list(MODELS)
    body = {"prompt": "Count to three:", "max_new_tokens": 4, "temperature": 0}
    named = [(model, requests.post(f"{stack.base_url}/v1/jobs", json={**body, "model": model}, timeout=10).json()["id"])
             for _ in range(6) for model in MODELS]
    bulk = requests.post(f"{stack.base_url}/v1/jobs/bulk", timeout=10,
                         json={"jobs": [{**body, "model": model} for model in MODELS * 3]}).json()["ids"]
    named += list(zip(MODELS * 3, bulk))
    anonymous = [requests.post(f"{stack.base_url}/v1/jobs", json=body, timeout=10).json()["id"] for _ in range(4)]

    for model, job_id in named:
        job = job_final(stack, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        assert (job["model"], job["worker"].split("@")[0]) == (model, model), job
    for job_id in anonymous:
        job = job_final(stack, job_id, timeout=120)
        assert job["status"] == "succeeded" and job["model"] in MODELS and job["worker"].startswith(job["model"] + "@")


def test_task_queue_names():
    assert task_queue("interactive") == task_queue("interactive", "") == "interactive"
    assert task_queue("batch", "llava-v1.5-13b") == "batch.llava-v1.5-13b"
    assert task_queue("interactive", "a, b") == "interactive.a%2C%20b"  # commas and spaces percent-encoded
