"""Admission control, deadlines, idempotency, API keys, rate limits and a Redis outage, on a real API process.

No worker runs here, so submitted jobs stay queued: exactly the state these limits are about.
"""

import asyncio
import concurrent.futures
import json
import logging
import time

import openai
import pytest
import redis
import requests
import websockets

from api.auth import key_digest
from conftest import run_stack
from shared.jobs import Ending, JobStore, WorkerRegistry
from shared.protocol import EXHAUSTED_ERROR, ErrorCode, GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings

KEY = "test-key-123"


@pytest.fixture
def api_only():
    """An API with keys, a rate limit and a small queue limit, on a Redis of its own, with no worker."""
    redis_server = RedisServer().start()
    env = {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "3", "LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}"]',
           "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": "40", "LLAVA_QUEUE_MAX_BODY_BYTES": "20000"}
    try:
        with run_stack(redis_server.url, env, workers=(), log_prefix="llava-queue-limits-") as stack:
            stack.redis_server = redis_server
            yield stack
            redis_server = stack.redis_server  # the outage test starts a new one on the same port
    finally:
        redis_server.stop()


OTHER_KEY = "test-key-456"


@pytest.fixture
def api_with_quotas():
    """An API with two keys, each held to 2 queued jobs, and a rate limit of 6 requests a minute; no worker."""
    env = {"LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY": "2", "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": "6",
           "LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}", "{key_digest(OTHER_KEY)}"]'}
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-quotas-") as stack:
        yield stack


def post(stack, body, key=KEY, headers=None):
    headers = {"Authorization": f"Bearer {key}", **(headers or {})} if key else dict(headers or {})
    return requests.post(f"{stack.base_url}/v1/jobs", json=body, headers=headers, timeout=10)


def test_keys_limits_deadlines_idempotency(api_only):
    stack = api_only
    assert post(stack, {"prompt": "hi"}, key=None).status_code == 401
    assert post(stack, {"prompt": "hi"}, key="wrong").status_code == 401
    assert requests.get(f"{stack.base_url}/healthz", timeout=10).status_code == 200  # health needs no key

    first = post(stack, {"prompt": "hi"}, headers={"Idempotency-Key": "abc"})
    again = post(stack, {"prompt": "hi"}, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]

    expiring = post(stack, {"prompt": "hi", "deadline_seconds": 0.5}).json()["id"]
    third = post(stack, {"prompt": "hi"})
    assert third.status_code == 202
    full = post(stack, {"prompt": "hi"})
    assert full.status_code == 429, full.text
    assert int(full.headers["Retry-After"]) >= 1 and "queue is full" in full.json()["error"]["message"]
    retried = post(stack, {"prompt": "hi"}, headers={"Idempotency-Key": "abc"})  # a retry is not a new job
    assert retried.status_code == 202 and retried.json()["id"] == first.json()["id"]

    time.sleep(0.6)
    job = requests.get(f"{stack.base_url}/v1/jobs/{expiring}", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=10).json()
    assert job["status"] == "expired" and job["error_code"] == 6 and "deadline" in job["error"]
    assert post(stack, {"prompt": "hi"}).status_code == 202  # the expired job freed its place

    too_big = post(stack, {"prompt": "x" * 30000})
    assert too_big.status_code == 413

    async def ws_without_key():
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(f"{stack.ws_url}/v1/jobs/{expiring}/ws"):
                pass
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{expiring}/ws?api_key={KEY}") as socket:
            return [message async for message in socket]

    assert '"expired"' in asyncio.run(ws_without_key())[-1]


def test_a_body_over_the_limit_is_refused_in_the_endpoints_own_format(api_only):
    # The limit answered a plain-text "Content Too Large": no JSON error, and on the original worker endpoint no
    # frame, so the original web server failed to parse it and its page stayed stuck. Both ways a body comes: with
    # a Content-Length (what the original clients send) and chunked.
    too_big = json.dumps({"prompt": "x" * 30000}).encode()
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def sent(path, chunked):
        body = iter([too_big[:1000], too_big[1000:]]) if chunked else too_big
        return requests.post(f"{api_only.base_url}{path}", data=body, headers=auth, timeout=10)

    for chunked in (False, True):
        answer = sent("/v1/jobs", chunked)
        assert answer.status_code == 413, answer.text
        error = answer.json()["error"]
        assert "20000 bytes" in error["message"] and error["code"] == ErrorCode.INVALID_REQUEST, error

        answer = sent("/worker_generate_stream", chunked)
        assert answer.status_code == 413 and "content-type" not in answer.headers, answer.headers
        frames = answer.content.split(b"\0")
        assert frames[1:] == [b""], answer.content
        frame = json.loads(frames[0])
        assert "20000 bytes" in frame["text"] and frame["error_code"] == ErrorCode.INVALID_REQUEST, frame
    assert post(api_only, {"prompt": "hi"}).status_code == 202  # a body within the limit goes through


def wait_for_a_fresh_minute(seconds_needed: float = 15) -> None:
    """The rate limit counts per clock minute: start where the run cannot straddle a minute's end."""
    if time.time() % 60 > 60 - seconds_needed:
        time.sleep(60 - time.time() % 60 + 0.1)


def test_rate_limit_per_key(api_only):
    wait_for_a_fresh_minute()
    statuses = [requests.get(f"{api_only.base_url}/v1/jobs/none", headers={"Authorization": f"Bearer {KEY}"},
                             timeout=10).status_code for _ in range(45)]
    assert statuses[:40] == [404] * 40
    assert statuses[-1] == 429


def test_redis_outage_answers_503_and_recovers(api_only):
    stack = api_only
    port = stack.redis_server.port
    stack.redis_server.stop()
    down = requests.get(f"{stack.base_url}/v1/jobs/x", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert down.status_code == 503 and "unavailable" in down.json()["error"]["message"]
    assert requests.get(f"{stack.base_url}/healthz", timeout=10).status_code == 503
    # A WebSocket's key is counted against the rate limit in Redis too: its handshake is refused (503), with no
    # unhandled exception in the API's log.

    async def stream_while_down():
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/x/ws?api_key={KEY}", open_timeout=10):
            pass

    with pytest.raises(websockets.InvalidStatus):
        asyncio.run(stream_while_down())
    stack.check_api_log()
    stack.redis_server = RedisServer(port=port).start()
    deadline = time.monotonic() + 20
    while requests.get(f"{stack.base_url}/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert post(stack, {"prompt": "hi"}).status_code == 202


def test_queued_job_quota_per_key(api_with_quotas):
    stack = api_with_quotas
    wait_for_a_fresh_minute()
    first, second = (post(stack, {"prompt": "hi"}) for _ in range(2))
    assert first.status_code == second.status_code == 202
    over = post(stack, {"prompt": "hi"})
    assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1
    assert "quota is 2" in over.json()["error"]["message"]

    # The other key has its own quota: a bulk of 3 never fits it (a 400, not a 429 whose Retry-After would be a
    # promise never kept), a bulk of 2 does, and then waits (429) for room.
    bulk = {"jobs": [{"prompt": "hi"}] * 3}
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    too_many = requests.post(f"{stack.base_url}/v1/jobs/bulk", json=bulk, headers=other, timeout=10)
    assert too_many.status_code == 400 and "Retry-After" not in too_many.headers, too_many.text
    assert "this request holds 3 jobs and an API key may have at most 2" in too_many.json()["error"]["message"]
    bulk["jobs"] = bulk["jobs"][:2]
    assert requests.post(f"{stack.base_url}/v1/jobs/bulk", json=bulk, headers=other, timeout=10).status_code == 202
    later = requests.post(f"{stack.base_url}/v1/jobs/bulk", json=bulk, headers=other, timeout=10)
    assert later.status_code == 429 and "this request holds 2" in later.json()["error"]["message"], later.text

    async def submit_on_socket():
        async with websockets.connect(f"{stack.ws_url}/v1/ws?api_key={KEY}") as socket:
            await socket.send('{"prompt": "hi"}')
            return json.loads(await socket.recv())

    refused = asyncio.run(submit_on_socket())  # the same quota holds on the WebSocket, as an error chunk
    assert refused["error_code"] == 7 and refused["status"] == "rejected" and refused["retry_after"] >= 1

    # A job that leaves the queue frees its place. Each request counts once against the key's rate
    # limit (6 a minute): 3 posts, the socket, this cancel and the next post make 6; the 7th is refused.
    cancelled = requests.delete(f"{stack.base_url}/v1/jobs/{first.json()['id']}",
                                headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert cancelled.status_code == 202
    assert post(stack, {"prompt": "hi"}).status_code == 202
    limited = post(stack, {"prompt": "hi"})
    assert limited.status_code == 429 and "rate limit" in limited.json()["error"]["message"]


def test_the_original_worker_endpoint_counts_against_the_key_quota(api_with_quotas):
    # Behind keys, /worker_generate_stream submits as the caller's key, as every other endpoint does.
    stack = api_with_quotas
    assert [post(stack, {"prompt": "hi"}).status_code for _ in range(2)] == [202, 202]
    over = requests.post(f"{stack.base_url}/worker_generate_stream", json={"prompt": "hi"}, timeout=10,
                         headers={"Authorization": f"Bearer {KEY}"})
    assert over.status_code == 429, over.content
    assert json.loads(over.content.rstrip(b"\0"))["error_code"] == 7 and "quota is 2" in over.text


@pytest.fixture
def api_two_keys():
    """An API with two keys and no other limit, on a Redis of its own, with no worker."""
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}", "{key_digest(OTHER_KEY)}"]'}
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-two-keys-") as stack:
        yield stack


def test_batches_and_files_belong_to_the_key_that_made_them(api_two_keys):
    base = api_two_keys.base_url
    mine, theirs = ({"Authorization": f"Bearer {key}"} for key in (KEY, OTHER_KEY))
    questions = "".join(json.dumps({"question_id": i, "text": f"Question {i}?"}) + "\n" for i in range(3))
    uploaded = requests.post(f"{base}/v1/files", files={"file": ("q.jsonl", questions)}, data={"purpose": "batch"},
                             headers=mine, timeout=10)
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    assert requests.get(f"{base}/v1/files/{file_id}", headers=theirs, timeout=10).status_code == 404
    assert requests.get(f"{base}/v1/files/{file_id}/content", headers=theirs, timeout=10).status_code == 404
    stolen = requests.post(f"{base}/v1/batches", json={"input_file_id": file_id}, headers=theirs, timeout=10)
    assert stolen.status_code == 404

    created = requests.post(f"{base}/v1/batches", json={"input_file_id": file_id}, headers=mine, timeout=10)
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    assert created.json()["status"] == "in_progress" and created.json()["request_counts"]["total"] == 3
    for path in ("", "/output", "/errors", "/lines"):
        assert requests.get(f"{base}/v1/batches/{batch_id}{path}", headers=theirs, timeout=10).status_code == 404
    assert requests.post(f"{base}/v1/batches/{batch_id}/cancel", headers=theirs, timeout=10).status_code == 404
    assert requests.delete(f"{base}/v1/files/{file_id}", headers=theirs, timeout=10).status_code == 404
    listed = {key: [batch["id"] for batch in requests.get(f"{base}/v1/batches", headers=headers,
                                                          timeout=10).json()["data"]]
              for key, headers in (("mine", mine), ("theirs", theirs))}
    assert listed == {"mine": [batch_id], "theirs": []}

    cancelled = requests.post(f"{base}/v1/batches/{batch_id}/cancel", headers=mine, timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
    assert requests.delete(f"{base}/v1/files/{file_id}", headers=mine, timeout=10).status_code == 200


def test_an_idempotency_key_belongs_to_the_api_key_that_used_it(api_two_keys):
    # Two clients that happen to pick the same Idempotency-Key (a counter, a request number) each get their own
    # job: the second must not be handed the first's job id (and through it, the first's prompt and answer).
    mine = post(api_two_keys, {"prompt": "mine"}, headers={"Idempotency-Key": "request-1"})
    theirs = post(api_two_keys, {"prompt": "theirs"}, key=OTHER_KEY, headers={"Idempotency-Key": "request-1"})
    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]
    job = requests.get(f"{api_two_keys.base_url}/v1/jobs/{theirs.json()['id']}",
                       headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=10).json()
    assert job["prompt"] == "theirs"
    # Each key's retry still finds its own first job, alone and in a bulk.
    assert post(api_two_keys, {"prompt": "mine"}, headers={"Idempotency-Key": "request-1"}).json() == mine.json()
    bulk = {"jobs": [{"prompt": "a"}, {"prompt": "b"}]}
    ids = [requests.post(f"{api_two_keys.base_url}/v1/jobs/bulk", json=bulk, timeout=10,
                         headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "bulk-1"}).json()["ids"]
           for key in (KEY, OTHER_KEY, KEY)]
    assert ids[0] == ids[2] and not set(ids[0]) & set(ids[1])
    # A blank key would be one key for every client that sends the header empty: refused, naming the header.
    blank = post(api_two_keys, {"prompt": "x"}, headers={"Idempotency-Key": ""})
    assert blank.status_code == 422 and "idempotency" in blank.text.lower(), blank.text


def test_api_keys_sent_on_a_websocket_stay_out_of_the_logs(api_two_keys):
    # Browsers send the key as ?api_key= on a WebSocket; uvicorn logs every WebSocket's path with its query.
    stack = api_two_keys
    job_id = post(stack, {"prompt": "hi"}).json()["id"]

    async def connect(key, name="api_key"):
        try:
            async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws?{name}={key}&x=1"):
                pass
        except websockets.InvalidStatus:
            pass

    asyncio.run(connect(KEY))
    asyncio.run(connect("mistyped-secret-789"))
    # The name percent-encoded, which the API reads as api_key too: the key was taken, and logged in clear.
    asyncio.run(connect(OTHER_KEY, "api%5Fkey"))
    asyncio.run(connect("mistyped-secret-790", "%61pi_key"))
    time.sleep(0.5)
    log = (stack.log_dir / "api.log").read_text()
    assert f"/v1/jobs/{job_id}/ws?" in log and "api%5Fkey=***" in log  # the connections were logged ...
    for secret in (KEY, OTHER_KEY, "mistyped-secret-789", "mistyped-secret-790"):
        assert secret not in log, secret  # ... without the keys


def test_a_lone_surrogate_in_the_json_is_a_422_not_a_500(api_two_keys):
    # "\ud800" is valid JSON but not Unicode: the prompt cannot be written to Redis.
    base, headers = api_two_keys.base_url, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    one = requests.post(f"{base}/v1/jobs", data=b'{"prompt": "hi \\ud800"}', headers=headers, timeout=10)
    assert one.status_code == 422 and one.json()["error"]["param"] == "prompt", one.text
    bulk = requests.post(f"{base}/v1/jobs/bulk", headers=headers, timeout=10,
                         data=b'{"jobs": [{"prompt": "a"}, {"prompt": "b", "stop": "\\udfff"}]}')
    assert bulk.status_code == 422 and bulk.json()["error"]["param"] == "jobs.1.stop", bulk.text


def test_a_chat_completion_id_is_cancelled_as_it_is_polled(api_two_keys):
    # GET /v1/jobs/chatcmpl-<id> polls the job; DELETE on the same path answered "unknown job id" (404).
    base, headers = api_two_keys.base_url, {"Authorization": f"Bearer {KEY}"}
    job_id = post(api_two_keys, {"prompt": "hi"}).json()["id"]
    assert requests.get(f"{base}/v1/jobs/chatcmpl-{job_id}", headers=headers, timeout=10).json()["id"] == job_id
    cancelled = requests.delete(f"{base}/v1/jobs/chatcmpl-{job_id}", headers=headers, timeout=10)
    assert cancelled.status_code == 202 and cancelled.json() == {"id": job_id, "status": "cancelled"}, cancelled.text
    again = requests.delete(f"{base}/v1/jobs/chatcmpl-{job_id}", headers=headers, timeout=10)
    assert again.status_code == 409


def test_a_job_belongs_to_the_api_key_that_submitted_it(api_two_keys):
    # Another key polling, following or cancelling a job by its id gets "unknown job id", as for batches and files;
    # the job is untouched.
    base = api_two_keys.base_url
    mine, theirs = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}
    job_id = post(api_two_keys, {"prompt": "my secret question"}).json()["id"]
    for path in (job_id, f"chatcmpl-{job_id}"):
        assert requests.get(f"{base}/v1/jobs/{path}", headers=theirs, timeout=10).status_code == 404
        assert requests.delete(f"{base}/v1/jobs/{path}", headers=theirs, timeout=10).status_code == 404

    async def follow(key):
        async with websockets.connect(f"{api_two_keys.ws_url}/v1/jobs/{job_id}/ws?api_key={key}") as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    refused = asyncio.run(follow(OTHER_KEY))
    assert refused["error_code"] != 0 and refused["done"] and "my secret" not in json.dumps(refused), refused
    job = requests.get(f"{base}/v1/jobs/{job_id}", headers=mine, timeout=10)
    assert job.status_code == 200 and job.json()["status"] == "queued" and job.json()["prompt"] == "my secret question"
    assert requests.delete(f"{base}/v1/jobs/{job_id}", headers=mine, timeout=10).json()["status"] == "cancelled"


def test_a_batch_larger_than_the_queue_limit_is_told_to_split(api_only):
    # MAX_QUEUED_JOBS is 3: a 4-line batch could never be queued, however long its client waited.
    headers = {"Authorization": f"Bearer {KEY}"}
    questions = "".join(json.dumps({"question_id": i, "text": f"Question {i}?"}) + "\n" for i in range(4))
    uploaded = requests.post(f"{api_only.base_url}/v1/files", files={"file": ("q.jsonl", questions)},
                             data={"purpose": "batch"}, headers=headers, timeout=10)
    assert uploaded.status_code == 200, uploaded.text
    refused = requests.post(f"{api_only.base_url}/v1/batches", json={"input_file_id": uploaded.json()["id"]},
                            headers=headers, timeout=10)
    assert refused.status_code == 400 and "Retry-After" not in refused.headers, refused.text
    assert "this request holds 4 jobs and the queues hold at most 3" in refused.json()["error"]["message"]


def test_a_job_whose_workers_died_is_not_sent_again_by_the_openai_package(api_two_keys):
    # The package resends a 5xx (twice by default): a job failed for having been started MAX_ATTEMPTS times, its
    # workers dying each time, would go to three more workers each time. This API has no worker process: the store
    # plays the worker's part, as a worker's start and ending do (the start answers "exhausted").
    client = redis.Redis.from_url(api_two_keys.redis_url, decode_responses=True)
    prefix = Settings().key_prefix
    WorkerRegistry(client, prefix).announce("poisoned@test/000000:1", {"model": "m", "ready": True}, ttl_seconds=60)
    store = JobStore(client, prefix)
    package = openai.OpenAI(base_url=f"{api_two_keys.base_url}/v1", api_key=KEY, timeout=60)  # default retries

    def fail_every_job(seen: set[str], until: float) -> None:
        while time.monotonic() < until:
            for key in client.scan_iter(f"{prefix}:job:*", count=1000):
                job_id = key.rsplit(":", 1)[1]
                if job_id not in seen and client.type(key) == "hash" and client.hget(key, "status") == "queued":
                    seen.add(job_id)
                    assert store.start(job_id, "poisoned@test/000000:1", "m", max_attempts=0) == "exhausted"
                    store.record_step("poisoned@test/000000:1", [], [Ending(job_id, "failed", EXHAUSTED_ERROR,
                                                                            ErrorCode.SERVER_ERROR, "error")])
            time.sleep(0.05)

    seen: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        worker = pool.submit(fail_every_job, seen, time.monotonic() + 6)
        with pytest.raises(openai.InternalServerError) as caught:
            package.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        worker.result()
    assert EXHAUSTED_ERROR in caught.value.message
    assert len(seen) == 1, f"the package sent the request {len(seen)} times"


def test_an_authorization_header_with_extra_spaces_is_read_as_its_key(api_two_keys):
    # RFC 9110 §11.4: credentials = auth-scheme [ 1*SP token68 ], and the scheme is case-insensitive. A client that
    # formats "Bearer  %s" (or a key pasted with a space around it) got 401 for a valid key.
    for header in (f"Bearer  {KEY}", f"bearer {KEY}", f"BEARER   {KEY}"):
        answer = post(api_two_keys, {"prompt": "hi"}, key=None, headers={"Authorization": header})
        assert answer.status_code == 202, (header, answer.text)
    for header in ("Bearer", "Bearer   ", f"Basic {KEY}", f"Bearer {KEY}x"):
        assert post(api_two_keys, {"prompt": "hi"}, key=None, headers={"Authorization": header}).status_code == 401


def test_jobs_past_their_deadline_free_the_key_quota_with_no_worker_up(api_with_quotas):
    # A job still queued past its deadline is expired, "whether or not a worker is up": with none up (or none for its
    # model), only a poll of that very job expired it, so a key whose jobs were left unpolled stayed at 429 ("2 jobs
    # queued") for jobs that had ended, until a worker came.
    stack = api_with_quotas
    # (A deadline long enough for the third submission to come while both wait, on a loaded machine too: at 0.3 s
    # the first had expired before it, once in a suite run.)
    ids = [post(stack, {"prompt": "hi", "deadline_seconds": 1.5}).json()["id"] for _ in range(2)]
    assert post(stack, {"prompt": "hi"}).status_code == 429
    time.sleep(1.7)
    again = post(stack, {"prompt": "hi"})
    assert again.status_code == 202, again.text
    for job_id in ids:
        job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"},
                           timeout=10).json()
        assert (job["status"], job["error_code"]) == ("expired", ErrorCode.EXPIRED)


def test_an_idempotency_key_sent_again_with_another_request_is_refused(api_two_keys):
    first = post(api_two_keys, {"prompt": "first"}, headers={"Idempotency-Key": "request-7"})
    assert first.status_code == 202
    other = post(api_two_keys, {"prompt": "second"}, headers={"Idempotency-Key": "request-7"})
    assert other.status_code == 422, other.text  # it was 202 with the first prompt's job
    assert other.json()["error"]["param"] == "header.idempotency-key" and "different request" in other.text
    # The same key with the same request is still a retry; another API key's same key is its own.
    assert post(api_two_keys, {"prompt": "first"}, headers={"Idempotency-Key": "request-7"}).json() == first.json()
    theirs = post(api_two_keys, {"prompt": "second"}, key=OTHER_KEY, headers={"Idempotency-Key": "request-7"})
    assert theirs.status_code == 202


def test_without_a_quota_no_key_keeps_a_set_of_its_jobs(api_two_keys):
    # Only the per-key quota reads a key's set of queued jobs (and prunes it): without a quota every job of the key
    # was added to it, and nothing ever took one out; a Redis key with no expiry that grew for ever.
    for _ in range(3):
        assert post(api_two_keys, {"prompt": "hi"}).status_code == 202
    client = redis.Redis.from_url(api_two_keys.redis_url, decode_responses=True)
    assert not list(client.scan_iter(match="*:owner:*"))


def test_a_record_with_a_field_that_is_no_number_is_read_and_run_as_without_it(caplog):
    # A job record written by another version, or by hand, with a deadline, a time or a count that is no number:
    # JobStore.get raised ValueError (GET /v1/jobs/{id} answered 500, a resumed job failed), and the worker's start
    # was a Lua error ("attempt to compare nil with number") that failed the job. The field now counts as absent,
    # and the read logs which field of which job it was.
    with RedisServer() as server:
        store = JobStore.from_url(server.url, "odd")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        store.redis.hset(store.key(job_id), mapping={"deadline": "tomorrow", "started_at": "soon", "attempts": "x",
                                                     "handed_back": "", "prompt_tokens": "1.5", "error_code": "none"})
        with caplog.at_level(logging.WARNING, logger="llava_queue"):
            record = store.get(job_id)
        assert (record["status"], record["started_at"], record["attempts"], record["prompt_tokens"]) == (
            "queued", None, 0, 0)
        assert record["queue_position"] == 0 and isinstance(record["created_at"], float)
        logged = " ".join(entry.getMessage() for entry in caplog.records)
        assert all(name in logged for name in ("deadline", "started_at", "attempts", "prompt_tokens")), logged
        assert job_id in logged
        followed = store.snapshot(job_id)  # what a WebSocket follower reads first
        assert (followed.status, followed.error_code) == ("queued", 0)
        assert store.start(job_id, "w1") == "running"
        assert store.get(job_id)["attempts"] == 1
        store.redis.close()


def test_polling_a_record_with_a_field_that_is_no_number_answers_it(api_two_keys):
    # GET /v1/jobs/{id} of a record whose deadline or created_at is no number (another version's, or edited by
    # hand) answered 500; now the job as it is, the bad field absent.
    job_id = post(api_two_keys, {"prompt": "hi", "deadline_seconds": 60}).json()["id"]
    client = redis.Redis.from_url(api_two_keys.redis_url, decode_responses=True)
    key = next(iter(client.scan_iter(match=f"*:job:{job_id}")))
    client.hset(key, mapping={"deadline": "in a minute", "created_at": "now"})
    job = requests.get(f"{api_two_keys.base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=10)
    assert job.status_code == 200, job.text
    assert (job.json()["status"], job.json()["created_at"], job.json()["prompt"]) == ("queued", None, "hi")
