"""With API keys on and the original LLaVA protocol left open (`PUBLIC_LLAVA_PROTOCOL`), a probe of the
twenty-eighth session: a job sent there with a valid key was anyone's, read by every other key, and out of the
key's quota and rate limit."""

import pytest
import requests

from conftest import run_stack
from shared.redis_server import RedisServer
from test_limits import KEY, OTHER_KEY
from api.auth import key_digest


@pytest.fixture
def open_llava_protocol():
    """Two keys, each held to 2 queued jobs, the LLaVA protocol open; no worker (the jobs stay queued)."""
    env = {"LLAVA_QUEUE_API_KEY_HASHES": f'["{key_digest(KEY)}", "{key_digest(OTHER_KEY)}"]',
           "LLAVA_QUEUE_PUBLIC_LLAVA_PROTOCOL": "true", "LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY": "2"}
    with RedisServer() as redis_server, run_stack(redis_server.url, env, workers=(),
                                                   log_prefix="llava-queue-open-llava-") as stack:
        yield stack


def stream_job(stack, key: str | None, prompt: str = "Secret of B") -> requests.Response:
    """POST /worker_generate_stream, its headers read (the job waits in the queue); the caller closes it (closing
    cancels the job, as the original's client leaving does)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{stack.base_url}/worker_generate_stream", json={"prompt": prompt, "max_new_tokens": 3},
                         headers=headers, stream=True, timeout=10)


def test_a_job_sent_with_a_key_on_the_open_llava_protocol_is_that_keys(open_llava_protocol):
    stack = open_llava_protocol

    def read(job_id: str, key: str) -> int:
        return requests.get(f"{stack.base_url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"},
                            timeout=10).status_code

    owned, second = stream_job(stack, OTHER_KEY), stream_job(stack, OTHER_KEY, "another")
    try:
        assert owned.status_code == second.status_code == 200, owned.text
        job_id = owned.headers["X-Job-Id"]
        assert (read(job_id, OTHER_KEY), read(job_id, KEY)) == (200, 404)  # the other key: "unknown", as elsewhere
        # Its quota (2 queued jobs) counts them: a third is refused, as a frame (the original's way), then ends.
        with stream_job(stack, OTHER_KEY, "a third") as refused:
            assert "X-Job-Id" not in refused.headers
            assert b'"error_code": 7' in next(refused.iter_content(None)), refused.headers
    finally:
        owned.close()
        second.close()
    # A wrong key is refused; none at all stays open, the job anyone's (the original clients send no key).
    with stream_job(stack, "not-a-key") as wrong:
        assert wrong.status_code == 401
    with stream_job(stack, None) as anyone:
        assert anyone.status_code == 200 and read(anyone.headers["X-Job-Id"], KEY) == 200


def test_a_vote_or_flag_is_recorded_once_a_job(open_llava_protocol):
    # Each repeat copied the job's prompt and answer into the feedback list again (20 upvotes of a job of a
    # 399,000-character prompt: 8.4 MB of Redis), a list never trimmed.
    import redis

    stack = open_llava_protocol
    headers = {"Authorization": f"Bearer {KEY}"}
    job_id = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "x" * 50_000}, headers=headers,
                           timeout=10).json()["id"]

    def vote(kind: str) -> requests.Response:
        return requests.post(f"{stack.base_url}/v1/feedback", json={"type": kind, "job_id": job_id},
                             headers=headers, timeout=10)

    first, again, third = vote("upvote"), vote("upvote"), vote("upvote")
    assert (first.status_code, again.status_code, third.status_code) == (201, 200, 200), first.text
    assert first.json() == again.json() == third.json()
    assert vote("flag").status_code == 201
    log = redis.Redis.from_url(stack.redis_url).lrange("llq:feedback", 0, -1)
    assert len(log) == 2, len(log)
