"""A streamed chat completion whose job waits in the queue keeps its connection alive (SSE comments)."""

import json
import threading
import time

import pytest
import redis
import requests
from conftest import run_stack
from openai import APIError, OpenAI

from shared.jobs import WorkerRegistry
from shared.settings import Settings

KEY_PREFIX = Settings().key_prefix


def test_a_streamed_chat_completion_waiting_in_the_queue_sends_keepalive_comments(redis_server):
    # After its first chunk a streamed completion sent nothing while its job waited: a proxy's read timeout (nginx's
    # 60 s) or a client's cut it (the crowd probe lost 384 of 1,000 streams at a 300 s read timeout, 1,000 jobs deep
    # on two cores). An SSE comment goes out every SSE_KEEPALIVE_SECONDS; OpenAI's client skips it.
    url = redis_server.url.rsplit("/", 1)[0] + "/5"  # a database of its own: no real worker takes the job
    with run_stack(url, {"LLAVA_QUEUE_SSE_KEEPALIVE_SECONDS": "0.5"}, workers=(), log_prefix="llava-queue-sse-") as api:
        registry = WorkerRegistry(redis.Redis.from_url(url, decode_responses=True), KEY_PREFIX)
        # A live worker of a model whose queue no real worker reads: the completion is taken, and its job waits.
        registry.announce("idle@test", {"name": "idle@test", "model": "idle-7b", "started_at": time.time(),
                                        "num_running": 0, "num_waiting": 0}, ttl_seconds=60)
        body = {"model": "idle-7b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
        with requests.post(f"{api.base_url}/v1/chat/completions", json=body, stream=True, timeout=3) as response:
            assert response.status_code == 200, response.text
            job_id = response.headers["X-Job-Id"]
            started, lines = time.monotonic(), []
            for line in response.iter_lines(decode_unicode=True):
                lines.append(line)
                if time.monotonic() - started > 2.5:
                    break
        events = [line for line in lines if line]
        assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant", events
        assert len(events) >= 4 and all(event == ": keepalive" for event in events[1:]), events
        # OpenAI's client reads through the comments: the role chunk, then (comments skipped) the end of the job,
        # cancelled here after 2 s of keepalives.
        client = OpenAI(base_url=f"{api.base_url}/v1", api_key="unused", timeout=10, max_retries=0)
        with client.chat.completions.create(**body) as chunks:
            chunks = iter(chunks)
            first = next(chunks)
            assert first.choices[0].delta.role == "assistant"
            started = time.monotonic()
            cancel = threading.Timer(2, requests.delete, [f"{api.base_url}/v1/jobs/{first.id}"], {"timeout": 10})
            cancel.start()
            try:
                with pytest.raises(APIError, match="cancelled"):
                    next(chunks)
            finally:
                cancel.join()
            assert time.monotonic() - started >= 2
        deadline = time.monotonic() + 10
        while requests.get(f"{api.base_url}/v1/jobs/{job_id}", timeout=10).json()["status"] != "cancelled":
            assert time.monotonic() < deadline, "leaving the stream did not cancel the job"
            time.sleep(0.2)
