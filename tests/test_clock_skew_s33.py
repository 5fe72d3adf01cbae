"""Hosts whose clocks disagree: the API and the workers run on different hosts, and an NTP-less VM drifts minutes off.
A process of the stack is given a clock minutes off (a sitecustomize that offsets time.time, first on its
PYTHONPATH); the times written to a job's record and compared with it are Redis's (shared.jobs.RedisClock)."""

import os
import time
from pathlib import Path

import pytest
import requests

from conftest import job_final, model_workers, run_stack
from shared.jobs import JobStore, RedisClock
from shared.redis_server import RedisServer

SKEWED_CLOCK = '''
import os
import time

_skew = float(os.environ["LLQ_TEST_CLOCK_SKEW_SECONDS"])
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + _skew
time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
'''


def skewed(env: dict[str, str], folder: Path, seconds: float) -> dict[str, str]:
    """`env` for a process whose clock is `seconds` off (ahead if positive)."""
    (folder / "sitecustomize.py").write_text(SKEWED_CLOCK)
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")])),
            "LLQ_TEST_CLOCK_SKEW_SECONDS": str(seconds)}


@pytest.mark.parametrize("api_skew, worker_skew", [(0, 300), (-300, 0)], ids=["worker-ahead", "api-behind"])
def test_a_job_with_a_deadline_runs_when_the_worker_clock_is_minutes_ahead_of_the_api(
        default_model_dir, tmp_path, api_skew, worker_skew):
    # The API wrote the deadline by its clock (submission + 60 s) and the worker compared it with its own, at its
    # start and in its sweep: a worker 5 minutes ahead (or an API 5 minutes behind) expired every job with a
    # deadline under 5 minutes before it ran ("the job waited in the queue past its deadline").
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4"}
    api_env = skewed(env, tmp_path, api_skew) if api_skew else env
    with RedisServer() as server, run_stack(server.url, api_env, workers=(), log_prefix="llava-queue-skew-") as stack:
        worker_env = dict(os.environ, **env)
        worker_env = skewed(worker_env, tmp_path, worker_skew) if worker_skew else worker_env
        with model_workers(stack, worker_env, ["default"]):
            time.sleep(3)  # a few sweeps of the skewed worker
            job_id = requests.post(f"{stack.base_url}/v1/jobs", json={
                "prompt": "Once upon a time", "temperature": 0, "max_new_tokens": 8, "deadline_seconds": 60},
                timeout=10).json()["id"]
            job = job_final(stack, job_id, timeout=60)
            assert job["status"] == "succeeded", (job, stack.logs())
            assert job["attempts"] == 1, job
            assert job["text"], job


def test_the_store_clock_is_redis_clock_whatever_the_host_clock(redis_server, monkeypatch):
    store = JobStore.from_url(redis_server.url)
    seconds, microseconds = store.redis.time()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 300)
    assert abs(RedisClock(store.redis)() - (seconds + microseconds / 1e6)) < 2



def test_a_clock_on_redis_host_is_the_host_clock_exactly(redis_server):
    # Redis here shares this host's clock: the offset is 0, not the middle of the round trip's window, whose noise
    # put a job's started_at (the worker's clock) before its created_at (the API's) on one host, by a millisecond.
    clocks = [RedisClock(JobStore.from_url(redis_server.url).redis) for _ in range(20)]
    for clock in clocks:
        clock()
    assert [clock.offset for clock in clocks] == [0.0] * 20

def test_a_model_seen_by_a_worker_minutes_ahead_is_timed_by_redis(redis_server, monkeypatch):
    # The API answers 503 "coming back" for a model a worker announced in the last 10 minutes (RETURNING_SECONDS),
    # comparing the worker's announcement with its own clock: a worker 5 minutes behind shortened that window to 5.
    from api.routes.models import returning_models
    from shared.jobs import WorkerRegistry

    client = JobStore.from_url(redis_server.url).redis
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 300)
    WorkerRegistry(client, "skew-models").announce("w@host", {"name": "w@host", "model": "behind"})
    monkeypatch.setattr(time, "time", real)
    seconds, microseconds = client.time()
    registry = WorkerRegistry(client, "skew-models")
    assert abs(registry.models_seen()["behind"] - (seconds + microseconds / 1e6)) < 2
    assert returning_models(registry, served=[])["behind"] < 2


def test_a_job_sent_by_an_api_minutes_ahead_is_not_taken_for_lost(redis_server, monkeypatch):
    # The lost-task sweep (a worker's) judges a queued job lost when the oldest message of its queue came more than
    # `older_than` after the job was recorded: the message's `enqueued_at` was the API's own clock, the record's
    # `created_at` Redis's, and with the API 5 minutes ahead every job queued over a minute was sent again.
    import uuid

    from shared.celery_app import make_celery, resend_lost_tasks, send_many, task_queue
    from shared.protocol import GenerateRequest
    from shared.settings import Settings

    prefix = f"llq-skew-{uuid.uuid4().hex[:8]}"
    app = make_celery(Settings(redis_url=redis_server.url))
    queue = task_queue("interactive", f"model-{prefix}")
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 300)
    api_store = JobStore.from_url(redis_server.url, prefix=prefix)
    job_id, _ = api_store.create(GenerateRequest(model=f"model-{prefix}", prompt="Hello", max_new_tokens=4),
                                 "interactive")
    send_many(app, [(job_id, queue)], api_store.clock)
    monkeypatch.setattr(time, "time", real)
    try:
        time.sleep(1.2)  # queued over `older_than` (1 s here, 60 by default): judged, its message at the head
        assert resend_lost_tasks(app, JobStore.from_url(redis_server.url, prefix=prefix), older_than=1) == []
        assert api_store.redis.llen(queue) == 1
    finally:
        api_store.redis.delete(queue)


def test_an_api_minutes_behind_counts_rate_limit_minutes_and_stamps_files_on_redis_clock(tmp_path):
    # The rate limit counted each API host's own minute: APIs minutes apart each counted a key's requests in a
    # minute of their own, and files and batches carried their API host's times, beside the workers' (Redis's) times
    # in the same batch record (its duration and `estimated_seconds_left` off by the skew).
    from api.auth import key_digest, rate_counter

    key = "skew-key-1"
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(key)}"]', "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": "50"}
    with RedisServer() as server, run_stack(server.url, skewed(env, tmp_path, -300), workers=(),
                                            log_prefix="llava-queue-skew-") as stack:
        client = JobStore.from_url(server.url).redis
        headers = {"Authorization": f"Bearer {key}"}
        uploaded = requests.post(f"{stack.base_url}/v1/files", headers=headers, timeout=10,
                                 files={"file": ("q.jsonl", b'{"question_id": 1, "text": "hi"}\n')},
                                 data={"purpose": "batch"})
        assert uploaded.status_code == 200, uploaded.text
        seconds, _ = client.time()
        assert abs(uploaded.json()["created_at"] - seconds) < 5, (uploaded.json(), seconds)
        # This minute's counter holds the upload (a request at the turn of a minute may be in the one before).
        minutes = {int(seconds // 60), int(seconds // 60) - 1}
        counted = sum(int(client.get(rate_counter("llq", key_digest(key), minute * 60)) or 0) for minute in minutes)
        assert counted == 1, client.keys("llq:rate:*")
        client.close()
