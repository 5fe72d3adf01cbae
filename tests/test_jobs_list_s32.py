"""`GET /v1/jobs`, a feature of the thirty-second session: a client that restarted, or an operator, lists the jobs it
has no ids of (it was a 405), newest first in OpenAI's list shape, a key's own alone, batch lines left out."""

import io
import json

import pytest
import redis
import requests

from api.auth import key_digest
from conftest import run_stack
from shared.jobs import JobStore
from shared.redis_server import RedisServer
from test_limits import KEY, OTHER_KEY


@pytest.fixture(scope="module")
def open_stack():
    """An API with keys off and no worker: every job stays queued until it is cancelled."""
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-jobs-list-") as stack:
        yield stack


@pytest.fixture(scope="module")
def keyed_stack():
    """An API with two API keys and no worker."""
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}", "{key_digest(OTHER_KEY)}"]'}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-jobs-keys-") as stack:
        yield stack


def submit(stack, count: int = 1, key: str | None = None, **headers) -> list[str]:
    """Submit `count` jobs (one POST each); their ids, oldest first."""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    ids = []
    for index in range(count):
        response = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": f"job {index}", "max_new_tokens": 2},
                                 headers=headers, timeout=10)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def page(stack, key: str | None = None, **params) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = requests.get(f"{stack.base_url}/v1/jobs", params=params, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def every_page(stack, key: str | None = None, **params) -> tuple[list[str], int]:
    """The ids of every job listed, page after page (following `last_id`), and how many pages it took."""
    ids, pages, after = [], 0, None
    while True:
        answer = page(stack, key, **params, **({"after": after} if after else {}))
        ids += [job["id"] for job in answer["data"]]
        pages += 1
        if not answer["has_more"]:
            return ids, pages
        after = answer["last_id"]


def test_jobs_are_listed_newest_first_page_by_page_each_as_polling_shows_it(open_stack):
    stack = open_stack
    single = submit(stack, 3)
    bulk = requests.post(f"{stack.base_url}/v1/jobs/bulk", json={"jobs": [{"prompt": "a"}, {"prompt": "b"}]},
                         timeout=10).json()["ids"]
    keyed = submit(stack, 1, **{"Idempotency-Key": "list-keyed"})
    created = single + bulk + keyed

    first = page(stack, limit=2)
    assert first["object"] == "list" and first["has_more"] is True
    assert [job["id"] for job in first["data"]] == created[::-1][:2]
    assert (first["first_id"], first["last_id"]) == (created[-1], created[-2])
    # Each item is the job as GET /v1/jobs/{id} answers it.
    assert first["data"][0] == requests.get(f"{stack.base_url}/v1/jobs/{created[-1]}", timeout=10).json()
    listed, pages = every_page(stack, limit=2)
    assert listed[:len(created)] == created[::-1]
    assert len(listed) == len(set(listed)) and pages >= 3


def test_a_status_filter_lists_only_jobs_in_that_state_a_bounded_scan_a_page(open_stack):
    stack = open_stack
    cancelled = submit(stack, 2)
    for job_id in cancelled:
        assert requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).status_code == 202
    queued = submit(stack, 25)

    assert [job["id"] for job in page(stack, status="queued", limit=3)["data"]] == queued[::-1][:3]
    # A page reads at most 10 x limit jobs: 25 queued ones before the first cancelled one, so the first page of one
    # ends empty, with a cursor to go on from.
    short = page(stack, status="cancelled", limit=1)
    assert short["data"] == [] and short["has_more"] is True and short["last_id"] == queued[::-1][9]
    found, _ = every_page(stack, status="cancelled", limit=1)
    assert found[:2] == cancelled[::-1]
    assert all(job["status"] == "cancelled" for job in page(stack, status="cancelled", limit=100)["data"])


def test_a_job_whose_record_expired_is_skipped_and_dropped_from_the_list(open_stack):
    stack = open_stack
    ids = submit(stack, 3)
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    store = JobStore(client)
    client.delete(store.key(ids[1]))  # as its TTL would, once it ended
    assert [job["id"] for job in page(stack, limit=2)["data"]] == [ids[2], ids[0]]
    assert client.zscore(store.list_key(None), ids[1]) is None
    assert client.zscore(store.list_key(None), ids[0]) is not None


def test_batch_lines_are_listed_by_their_batch_not_here(open_stack):
    stack = open_stack
    lines = b"".join(json.dumps({"question_id": index, "text": f"question {index}"}).encode() + b"\n"
                     for index in range(3))
    batch = requests.post(f"{stack.base_url}/v1/batches", files={"file": ("q.jsonl", io.BytesIO(lines))},
                          timeout=30)
    assert batch.status_code == 200, batch.text
    line_jobs = {line["job_id"] for line in requests.get(
        f"{stack.base_url}/v1/batches/{batch.json()['id']}/lines", timeout=10).json()["data"]}
    assert len(line_jobs) == 3 and None not in line_jobs
    after = submit(stack, 1)
    listed, _ = every_page(stack, limit=100)
    assert listed[0] == after[0] and not line_jobs & set(listed)


def test_each_key_lists_only_its_own_jobs(keyed_stack):
    stack = keyed_stack
    mine, theirs = submit(stack, 2, KEY), submit(stack, 1, OTHER_KEY)
    assert [job["id"] for job in page(stack, KEY)["data"]] == mine[::-1]
    assert [job["id"] for job in page(stack, OTHER_KEY)["data"]] == theirs
    # Another key's job as a cursor finds nothing either.
    assert page(stack, KEY, after=theirs[0])["data"] == []
    assert requests.get(f"{stack.base_url}/v1/jobs", timeout=10).status_code == 401


@pytest.mark.parametrize("params, param", [({"status": "done"}, "status"), ({"limit": 0}, "limit"),
                                           ({"limit": 101}, "limit"), ({"after": "x" * 201}, "after")])
def test_a_bad_parameter_is_a_422_naming_it(open_stack, params, param):
    response = requests.get(f"{open_stack.base_url}/v1/jobs", params=params, timeout=10)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert param in error["param"] and param in error["message"], error
    if param == "status":
        assert "queued" in error["message"] and "succeeded" in error["message"], error
