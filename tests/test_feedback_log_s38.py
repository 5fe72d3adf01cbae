"""The feedback log (POST /v1/feedback) is a Redis list kept for good: bounded in lines, it was not in bytes. Each
line copies a job's prompt and answer, JSON-escaped (an "é" in 6 bytes): 3 jobs of 400,000-character prompts voted
up, down and flagged, then cancelled, left 21.6 MB that never expired, and 100,000 such lines would be 240 GB."""

import json

import redis
import requests

from conftest import run_stack
from shared.redis_server import RedisServer

LOG_BYTES = 300_000


def test_the_feedback_log_keeps_its_newest_lines_within_its_bytes():
    env = {"LLAVA_QUEUE_FEEDBACK_LOG_BYTES": str(LOG_BYTES), "LLAVA_QUEUE_DEFAULT_MODEL": "nobody-serves-this"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-feedback-") as stack:
        client = redis.Redis.from_url(server.url)
        voted = []
        for index in range(4):
            prompt = f"{index} " + "é" * 40_000  # 80 KB in UTF-8, 240 KB escaped
            job_id = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": prompt}, timeout=10).json()["id"]
            for kind in ("upvote", "flag"):
                vote = requests.post(f"{stack.base_url}/v1/feedback", json={"type": kind, "job_id": job_id},
                                     timeout=10)
                assert vote.status_code == 201, vote.text
                voted.append((job_id, kind))
            assert requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).status_code == 202
        lines = [json.loads(line) for line in client.lrange("llq:feedback", 0, -1)]
        size = sum(len(line) for line in client.lrange("llq:feedback", 0, -1))
        # The newest lines, as many as fit: 3 of about 80 KB each (UTF-8, not escaped); the byte count is exact.
        assert [(line["job_id"], line["type"]) for line in lines] == voted[-len(lines):]
        assert len(lines) == 3 and size <= LOG_BYTES and int(client.get("llq:feedback:bytes")) == size
        assert lines[-1]["prompt"].endswith("é" * 40_000)


def test_the_logs_byte_count_is_made_again_where_it_cannot_be_right():
    from api.routes.page import _APPEND_FEEDBACK

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)

        def append(line: bytes, max_bytes: int = 1000) -> int:
            return client.eval(_APPEND_FEEDBACK, 2, "log", "log:bytes", line, 100, max_bytes)

        # A log written before its bytes were counted: the count was short by its lines, and went below zero as
        # they were dropped (their bytes taken from a count that never had them): the log held them past the limit.
        client.rpush("log", *[b"x" * 100] * 9)
        assert append(b"y" * 100) == 10 and int(client.get("log:bytes")) == 1000
        assert append(b"z" * 300) == 8 and int(client.get("log:bytes")) == 1000
        # The list deleted (an operator clearing it), its count left: the log kept one line for good.
        client.delete("log")
        assert [append(b"a" * 100) for _ in range(3)] == [1, 2, 3] and int(client.get("log:bytes")) == 300
        # A count gone wrong below zero is made again too.
        client.set("log:bytes", -5000)
        assert append(b"b" * 100) == 4 and int(client.get("log:bytes")) == 400
