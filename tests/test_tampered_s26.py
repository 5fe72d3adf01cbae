"""What is in Redis but was not written by llava-queue (by hand, by another program on the same prefix) is left out
where it is read, not raised as a 500 on every request that reads it: workers' descriptions and the job counters.
A real API process and `llava-queue status` against a Redis of their own, no worker."""

import json
import os
import subprocess
import sys
import time

import pytest
import redis
import requests

from conftest import run_stack
from shared.jobs import JobStore, WorkerRegistry
from shared.redis_server import RedisServer

PREFIX = "llq"  # the settings' default key prefix, which the API reads


@pytest.fixture(scope="module")
def api():
    with RedisServer() as redis_server, run_stack(redis_server.url, {}, workers=(),
                                                   log_prefix="llava-queue-tampered-") as stack:
        yield stack


def test_worker_descriptions_and_counters_no_worker_wrote_are_left_out(api):
    client = redis.Redis.from_url(api.redis_url, decode_responses=True)
    registry = WorkerRegistry(client, PREFIX)
    store = JobStore.from_url(api.redis_url, prefix=PREFIX)
    now = time.time()
    registry.announce("good", {"name": "good", "model": "the-model", "started_at": now, "heartbeat_at": now,
                               "num_running": 1, "num_waiting": 0, "max_num_seqs": 8, "reserved_tokens": 10,
                               "max_batch_tokens": 100, "tokens_per_second": 2.5, "ready": True})
    odd = {"not-json": "{oops", "a-list": "[1, 2]", "model-null": json.dumps({"name": "x", "model": None}),
           "model-a-number": json.dumps({"model": 7, "started_at": now}),
           "start-a-list": json.dumps({"model": "m", "started_at": [1]}),
           "load-a-string": json.dumps({"model": "m", "started_at": now, "num_running": "many"}),
           "start-a-string": json.dumps({"model": "m", "started_at": "noon"})}
    registry.announce("modelless", {"name": "modelless", "ready": True})  # kept, and serves no model
    for name, value in odd.items():
        registry.announce(name, {})
        client.set(registry.key(name), value, ex=60)
    client.hset(store.submitted_key, mapping={"interactive": "3", "weird": "lots"})
    client.hset(store.finished_key, mapping={"succeeded:0": "2", "cancelled:x": "1", "failed:3": "some"})
    try:
        assert [worker["name"] for worker in registry.workers()] == ["good", "modelless"]
        totals = store.totals()
        assert totals["submitted"] == {"interactive": 3}
        assert totals["finished"] == {("succeeded", 0): 2}
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models", "/v1/models/the-model"):
            response = requests.get(f"{api.base_url}{path}", timeout=10)
            assert response.status_code == 200, (path, response.status_code, response.text[:500])
        assert [worker["name"] for worker in requests.get(f"{api.base_url}/healthz", timeout=10).json()["workers"]] \
            == ["good", "modelless"]
        assert [model["id"] for model in requests.get(f"{api.base_url}/v1/models", timeout=10).json()["data"]] \
            == ["the-model"]
        status = requests.post(f"{api.base_url}/worker_get_status", timeout=10)
        assert status.status_code == 200 and status.json()["model_names"] == ["the-model"], status.text
        metrics = requests.get(f"{api.base_url}/metrics", timeout=10).text
        assert 'llava_queue_jobs_submitted_total{queue="interactive"} 3.0' in metrics, metrics[:2000]
        run = subprocess.run([sys.executable, "-m", "shared.cli", "status"], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, LLAVA_QUEUE_REDIS_URL=api.redis_url))
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert "good" in run.stdout and "model-null" not in run.stdout, run.stdout
    finally:
        client.delete(store.submitted_key, store.finished_key)
        for name in ["good", "modelless", *odd]:
            registry.remove(name)
        client.close()
