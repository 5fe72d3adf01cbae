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
