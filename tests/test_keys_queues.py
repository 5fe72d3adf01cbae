"""Names that must not run together: model names and their Celery queues, a bulk submission's idempotency keys and
a single one's, API keys written in any script; and the queue places batches hold while their files are read,
counted by every submission."""

import asyncio
import json
import time
import urllib.parse

import pytest
import requests
import websockets

from api.auth import key_digest
from api.errors import ApiError
from api.submission import BULK_ITEM_MARK, Submitter
from conftest import job_final, run_stack
from shared.batches import BatchStore
from shared.celery_app import make_celery, task_queue, worker_queues
from shared.jobs import JobStore
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings

KEY = "test-key-123"
OTHER_KEY = "test-key-456"
UNICODE_KEY = "clé-ключ-鍵-🔑"  # outside Latin-1: only UTF-8 can carry it in a header
LATIN1_KEY = "clé-secrète"  # within Latin-1: what `requests` and browsers send as ISO-8859-1 bytes


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def post(stack, path: str, body, headers: dict) -> requests.Response:
    return requests.post(f"{stack.base_url}{path}", json=body, headers=headers, timeout=10)


# --- Model names and their queues -------------------------------------------------------------------------------

def test_every_model_name_has_a_queue_of_its_own():
    names = ["a b", "a_b", "a,b", "a, b", "a__b", "a%20b", "a%b", "a\tb", "a b ", "a\u3000b", "llava-v1.5-13b",
             "SmolLM2-135M-Instruct", "x.y/z:1", "é"]
    for queue in ("interactive", "batch"):
        queues = [task_queue(queue, name) for name in names]
        assert len(set(queues)) == len(names), dict(zip(names, queues))
        # The worker's -Q option splits on commas; a name with whitespace reads as two in logs.
        assert not any(character in name for name in queues for character in ", \t\u3000")
    # Ordinary names keep the queue names they had, so workers and jobs of an older release still meet.
    assert task_queue("batch", "llava-v1.5-13b") == "batch.llava-v1.5-13b"
    assert task_queue("interactive", "a_b") == "interactive.a_b"
    assert task_queue("interactive", "x.y/z:1") == "interactive.x.y/z:1"
    assert task_queue("interactive") == task_queue("interactive", "") == "interactive"
    assert worker_queues("a b") == [task_queue("interactive", "a b"), "interactive", task_queue("batch", "a b"),
                                    "batch"]


@pytest.fixture
def worker_of_a_b(default_model_dir):
    """An API and one worker serving the default model under the name "a_b", on a Redis of their own."""
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MODEL_NAME": "a_b",
           "LLAVA_QUEUE_MAX_NUM_SEQS": "2"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-names-") as stack:
        yield stack


def test_a_job_for_model_a_space_b_is_not_taken_by_a_worker_of_a_b(worker_of_a_b):
    # "a b" and "a_b" shared the queue "interactive.a_b": the worker of "a_b" ran the other model's jobs.
    stack = worker_of_a_b
    body = {"prompt": "Count to three:", "max_new_tokens": 2, "temperature": 0}
    other = post(stack, "/v1/jobs", {**body, "model": "a b"}, {}).json()["id"]
    other_batch = post(stack, "/v1/jobs", {**body, "model": "a b", "queue": "batch"}, {}).json()["id"]
    own = post(stack, "/v1/jobs", {**body, "model": "a_b"}, {}).json()["id"]
    assert job_final(stack, own, timeout=120)["status"] == "succeeded"
    time.sleep(1)
    for job_id in (other, other_batch):
        job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
        assert (job["status"], job["worker"]) == ("queued", None), job


# --- Idempotency keys, API keys and batch reservations on an API with keys (no worker: jobs stay queued) ----------

@pytest.fixture
def api_with_keys():
    """An API with four keys (two of them outside ASCII) and no limits, on a Redis of its own, with no worker."""
    hashes = [key_digest(key) for key in (KEY, OTHER_KEY, UNICODE_KEY, LATIN1_KEY)]
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps(hashes)},
                                            workers=(), log_prefix="llava-queue-keys-") as stack:
        yield stack


def test_a_single_idempotency_key_never_meets_a_bulk_submission_s_jobs(api_with_keys):
    stack = api_with_keys
    bulk = post(stack, "/v1/jobs/bulk", {"jobs": [{"prompt": "bulk 0"}, {"prompt": "bulk 1"}]},
                {**auth(KEY), "Idempotency-Key": "x"})
    assert bulk.status_code == 202, bulk.text
    single = post(stack, "/v1/jobs", {"prompt": "single"}, {**auth(KEY), "Idempotency-Key": "x:0"})
    assert single.status_code == 202, single.text
    assert single.json()["id"] not in bulk.json()["ids"]
    job = requests.get(f"{stack.base_url}/v1/jobs/{single.json()['id']}", headers=auth(KEY), timeout=10).json()
    assert job["prompt"] == "single"

    # The other way round: a single key first, then a bulk submission whose n-th key it would have been.
    first = post(stack, "/v1/jobs", {"prompt": "single"}, {**auth(KEY), "Idempotency-Key": "y:1"}).json()["id"]
    ids = post(stack, "/v1/jobs/bulk", {"jobs": [{"prompt": "bulk 0"}, {"prompt": "bulk 1"}]},
               {**auth(KEY), "Idempotency-Key": "y"}).json()["ids"]
    assert first not in ids and len(set(ids)) == 2
    prompts = [requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers=auth(KEY), timeout=10).json()["prompt"]
               for job_id in ids]
    assert prompts == ["bulk 0", "bulk 1"]

    # Retries still get their first jobs, single and bulk alike.
    again = post(stack, "/v1/jobs/bulk", {"jobs": [{"prompt": "bulk 0"}, {"prompt": "bulk 1"}]},
                 {**auth(KEY), "Idempotency-Key": "y"})
    assert again.json()["ids"] == ids
    assert post(stack, "/v1/jobs", {"prompt": "single"},
                {**auth(KEY), "Idempotency-Key": "y:1"}).json()["id"] == first


def test_an_api_key_outside_ascii_is_its_own_text_however_the_header_carries_it(api_with_keys):
    stack = api_with_keys
    body = {"prompt": "hi"}
    # curl, httpx (bytes) and most clients send UTF-8; `requests` and browsers' fetch send Latin-1.
    utf8 = post(stack, "/v1/jobs", body, {"Authorization": f"Bearer {UNICODE_KEY}".encode()})
    assert utf8.status_code == 202, utf8.text
    for encoding in ("utf-8", "latin-1"):
        answer = post(stack, "/v1/jobs", body, {"Authorization": f"Bearer {LATIN1_KEY}".encode(encoding)})
        assert answer.status_code == 202, (encoding, answer.text)
    # Both ways, the key is one key: its job is its own, and no other key's.
    job_id = utf8.json()["id"]
    assert requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {UNICODE_KEY}"
                                                                       .encode()}, timeout=10).status_code == 200
    assert requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers=auth(KEY), timeout=10).status_code == 404

    # A wrong key, or bytes that are no text at all, are a 401 that says what to send, never a 500.
    for header in ("Bearer clé-fausse".encode(), "Bearer ключ".encode(), b"Bearer \xff\xfe\x80", b"Bearer \xc3"):
        refused = post(stack, "/v1/jobs", body, {"Authorization": header})
        assert refused.status_code == 401, (header, refused.text)
        assert "API key" in refused.json()["error"]["message"]

    cancelled = requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10,
                                headers={"Authorization": f"Bearer {UNICODE_KEY}".encode()})
    assert cancelled.status_code == 202, cancelled.text

    async def follow():  # a WebSocket's ?api_key= is percent-encoded UTF-8, as browsers write it
        query = urllib.parse.quote(UNICODE_KEY)
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws?api_key={query}") as socket:
            return [json.loads(message) async for message in socket]

    assert asyncio.run(follow())[-1]["status"] == "cancelled"


@pytest.fixture
def api_with_limits():
    """An API with two keys, 3 queued jobs at most, 2 per key, on a Redis of its own, with no worker."""
    env = {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "3", "LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY": "2",
           "LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(KEY), key_digest(OTHER_KEY)])}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-held-") as stack:
        yield stack


def test_places_held_by_a_batch_being_read_count_for_every_submission(api_with_limits):
    # A batch holds queue places for the lines its reader has yet to queue (BatchStore.reserve): two batches read
    # at once cannot both take the last places. Every other submission (one job, bulk, chat completion, stream: the
    # one Submitter) did not count them, took places a batch was about to fill, and the queue went past the limit.
    stack = api_with_limits
    batches = BatchStore(JobStore.from_url(stack.redis_url), 3600, owner=key_digest(KEY))
    batches.reserve("batch_being_read", 2)  # what POST /v1/batches does before it reads a 2-line file of KEY's

    quota = post(stack, "/v1/jobs", {"prompt": "hi"}, auth(KEY))
    assert quota.status_code == 429 and "this API key has 2 jobs queued" in quota.json()["error"]["message"]
    assert post(stack, "/v1/jobs", {"prompt": "hi"}, auth(OTHER_KEY)).status_code == 202  # 2 held + 1 = 3
    for path, body in (("/v1/jobs", {"prompt": "hi"}), ("/v1/jobs/bulk", {"jobs": [{"prompt": "hi"}]})):
        full = post(stack, path, body, auth(OTHER_KEY))
        assert full.status_code == 429, (path, full.text)
        assert "queue is full (3 jobs queued, limit 3)" in full.json()["error"]["message"]

    batches.release("batch_being_read")  # its file was refused, say: it holds nothing any more
    assert post(stack, "/v1/jobs", {"prompt": "hi"}, auth(KEY)).status_code == 202


def test_a_key_holding_the_bulk_item_mark_is_refused():
    # No HTTP header can hold it (headers are read as Latin-1); a caller in Python is told, not let collide.
    with RedisServer() as server:
        submitter = Submitter(JobStore.from_url(server.url), make_celery(Settings(redis_url=server.url)))
        with pytest.raises(ApiError) as refused:
            submitter.submit([(GenerateRequest(prompt="hi"), "interactive")], idempotency_key=f"x{BULK_ITEM_MARK}0")
        assert (refused.value.status, refused.value.param) == (422, "header.idempotency-key")
