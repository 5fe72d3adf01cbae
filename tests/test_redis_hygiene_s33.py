"""Redis must not grow without bound (a probe of the thirty-third session). After a varied workload has ended and
every TTL has passed, each key left in Redis is one of a fixed, bounded set (counters, the worker registry, Celery's
bindings) or goes by itself within minutes; nothing per job, per idempotency key, per batch or per file stays, and a
second run of the same workload leaves no more than the first. Found: with a per-key quota
(`MAX_QUEUED_JOBS_PER_KEY`) the key's set of queued jobs kept every job the key ever sent, ended and expired ones
too, until its count came near the quota."""

import asyncio
import json
import time

import pytest
import redis
import requests
import websockets

from api.auth import key_digest
from conftest import run_stack
from shared.redis_server import RedisServer
from test_limits import KEY, OTHER_KEY

JOB_TTL_SECONDS = 2
# Long enough for the batch to end on a busy 2-core machine (two test processes) before it expires.
BATCH_TTL_SECONDS = 12
MODEL = "SmolLM2-135M-Instruct"
# Keys that may stay without a TTL: one each, or one per queue, model or worker (the registry drops a worker an hour
# after its last beat), never one per job, key or batch. Exact names, or prefixes ending with '.'.
BOUNDED = {"llq:enqueue_order", "llq:stats:submitted", "llq:stats:finished", "llq:models-seen", "llq:workers",
           "llq:files_scanned", "_kombu.binding.", "_kombu.binding_permanent.", "_kombu.binding_deadlines"}
# A key with a TTL goes by itself; one this short (a minute's counters, a reader's lease, a worker's heartbeat) is
# bounded by the rate of what makes it. The job store's own TTLs here are seconds.
SHORT_TTL_SECONDS = 180


def headers(key: str | None = KEY, **more) -> dict:
    return {**({"Authorization": f"Bearer {key}"} if key else {}), **more}


@pytest.fixture(scope="module")
def hygiene_stack(default_model_dir):
    """A worker and an API on a Redis of their own, with short TTLs, two API keys each under a quota, and the LLaVA
    protocol open to clients without a key."""
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "8",
           "LLAVA_QUEUE_JOB_TTL_SECONDS": str(JOB_TTL_SECONDS),
           "LLAVA_QUEUE_IDEMPOTENCY_TTL_SECONDS": str(JOB_TTL_SECONDS),
           "LLAVA_QUEUE_BATCH_TTL_SECONDS": str(BATCH_TTL_SECONDS),
           "LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(KEY), key_digest(OTHER_KEY)]),
           "LLAVA_QUEUE_PUBLIC_LLAVA_PROTOCOL": "true", "LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY": "1000",
           "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": "10000"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-hygiene-") as stack:
        yield stack, redis.Redis.from_url(server.url, decode_responses=True)


def ended(stack, job_id: str, key: str = KEY) -> dict | None:
    """The job's view once it has ended; None once its record expired (JOB_TTL_SECONDS is 2 s here: a job that ended
    early in a workload is gone by the time a loaded machine polls it)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        answer = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers=headers(key), timeout=10)
        if answer.status_code == 404:
            return None
        assert answer.status_code == 200, answer.text
        job = answer.json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end\n{stack.logs()}")


def workload(stack, run: int) -> None:
    """What clients do: jobs with either key and without, bulk and keyed submissions, a cancel by key before its
    job, cancels, bad requests, chat completions (streamed, and one left), WebSocket streams, a batch of an uploaded
    file, polls and listings; everything has ended when it returns."""
    base, jobs = stack.base_url, []

    def post(path: str, key: str | None = KEY, extra: dict | None = None, **kwargs) -> requests.Response:
        return requests.post(base + path, headers=headers(key, **(extra or {})), timeout=60, **kwargs)

    for key in (KEY, OTHER_KEY):
        jobs += [(key, post("/v1/jobs", key, json={"prompt": f"Hi {run}", "max_new_tokens": 4}).json()["id"])]
    jobs += [(KEY, job_id) for job_id in post("/v1/jobs/bulk", json={"jobs": [
        {"prompt": "a", "max_new_tokens": 3}, {"prompt": "b", "max_new_tokens": 3, "queue": "batch"}]}).json()["ids"]]
    for _ in range(2):
        jobs += [(KEY, post("/v1/jobs", extra={"Idempotency-Key": f"again-{run}"},
                            json={"prompt": "keyed", "max_new_tokens": 3, "deadline_seconds": 30}).json()["id"])]
    assert post("/v1/jobs/cancel", extra={"Idempotency-Key": f"early-{run}"}).status_code == 202
    assert post("/v1/jobs", extra={"Idempotency-Key": f"early-{run}"}, json={"prompt": "x"}).status_code == 202
    assert post("/v1/jobs", json={"prompt": 5}).status_code == 422
    assert post("/v1/jobs", "not a key", json={"prompt": "x"}).status_code == 401
    # Greedy: 300 tokens with no EOS (sampled, it could end before the cancel came, a 409).
    long_job = post("/v1/jobs", json={"prompt": "A long story", "max_new_tokens": 300, "temperature": 0}).json()["id"]
    time.sleep(0.5)
    assert requests.delete(f"{base}/v1/jobs/{long_job}", headers=headers(), timeout=10).status_code == 202
    jobs.append((KEY, long_job))
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert post("/v1/chat/completions", OTHER_KEY, json=chat).status_code == 200
    with post("/v1/chat/completions", OTHER_KEY, json={**chat, "stream": True}, stream=True) as streamed:
        assert b"[DONE]" in streamed.content
    with post("/v1/chat/completions", OTHER_KEY, json={**chat, "max_tokens": 300, "stream": True},
              stream=True) as left:
        next(left.iter_lines())  # the client leaves: its job is cancelled
    assert requests.post(f"{base}/worker_generate_stream", json={"prompt": "Hi", "max_new_tokens": 3},
                         timeout=60).status_code == 200

    async def streams():
        async with websockets.connect(f"{stack.ws_url}/v1/ws", additional_headers=headers()) as socket:
            await socket.send(json.dumps({"prompt": "ws", "max_new_tokens": 3}))
            while not json.loads(await socket.recv()).get("done"):
                pass
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{jobs[0][1]}/ws", additional_headers=headers()) as s:
            while not json.loads(await s.recv()).get("done"):
                pass
    asyncio.run(streams())

    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {**chat, "max_tokens": 3}}) + "\n" for i in range(3)) + "not json\n"
    upload = post("/v1/files", files={"file": ("b.jsonl", lines.encode())}, data={"purpose": "batch"}).json()
    batch = post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
                                      "completion_window": f"{BATCH_TTL_SECONDS}s"}).json()
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.2)
        answer = requests.get(f"{base}/v1/batches/{batch['id']}", headers=headers(), timeout=10)
        assert answer.status_code == 200, f"the batch expired before it ended: {answer.text}\n{stack.logs()}"
        batch = answer.json()
    assert requests.get(f"{base}/v1/batches/{batch['id']}/output", headers=headers(), timeout=10).status_code == 200
    assert requests.get(f"{base}/v1/files", headers=headers(), timeout=10).status_code == 200
    for key, job_id in jobs:
        ended(stack, job_id, key)
    # (Listed or not: the jobs' 2 s TTL may have passed on a loaded machine; the listing's set is what is checked.)
    assert requests.get(f"{base}/v1/jobs", headers=headers(), timeout=10).status_code == 200
    # Every job of the workload has ended, the left chat completion's too (cancelled at its next step).
    time.sleep(1)


def left_behind(client: redis.Redis) -> dict[str, tuple[str, int, int]]:
    """Every key in Redis -> (type, TTL, entries)."""
    sizes = {"hash": client.hlen, "zset": client.zcard, "list": client.llen, "set": client.scard,
             "string": client.strlen}
    return {key: (kind, client.ttl(key), sizes[kind](key)) for key in client.scan_iter(count=1000)
            for kind in [client.type(key)]}


def unbounded(keys: dict[str, tuple[str, int, int]]) -> dict[str, tuple[str, int, int]]:
    """The keys that are neither in the bounded set nor soon gone by themselves."""
    return {key: about for key, about in keys.items()
            if not (0 <= about[1] <= SHORT_TTL_SECONDS or key in BOUNDED
                    or any(key.startswith(prefix) for prefix in BOUNDED if prefix.endswith(".")))}


def test_a_keys_quota_set_keeps_only_its_queued_jobs(hygiene_stack):
    """Each API key's set of queued jobs (read for its quota) lets a job go when it starts or ends: it kept every
    job the key sent, ended and expired ones, with no TTL, until it came near the quota (1,000 here)."""
    stack, client = hygiene_stack
    job_ids = [requests.post(f"{stack.base_url}/v1/jobs", headers=headers(), timeout=10,
                             json={"prompt": f"Hello {i}", "max_new_tokens": 2}).json()["id"] for i in range(6)]
    for job_id in job_ids:
        ended(stack, job_id)
    assert [key for key in client.scan_iter("llq:owner:*")] == []


def test_every_key_left_after_expiry_is_bounded(hygiene_stack):
    """After the workload and its TTLs, only the bounded keys stay (or ones soon gone); a second run leaves the same
    keys, none holding more entries (beyond the counters)."""
    stack, client = hygiene_stack
    after = []
    for run in range(2):
        workload(stack, run)
        time.sleep(BATCH_TTL_SECONDS + 1)  # past the jobs', idempotency keys', batches' and files' TTLs
        keys = left_behind(client)
        assert unbounded(keys) == {}, keys
        after.append({key: about for key, about in keys.items() if about[1] == -1})
    counters = {"llq:enqueue_order", "llq:stats:submitted", "llq:stats:finished"}
    assert after[1].keys() == after[0].keys()
    assert {key: size for key, (_, _, size) in after[1].items() if key not in counters} \
        == {key: size for key, (_, _, size) in after[0].items() if key not in counters}
