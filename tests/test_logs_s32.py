"""What an operator reads in the API's log: a Redis that refuses is said there, and LLAVA_QUEUE_LOG_LEVEL holds for
every line (uvicorn's included)."""

import re

import redis
import requests

from conftest import run_stack
from shared.redis_server import RedisServer


def test_a_redis_that_refuses_every_submission_is_logged_once_as_an_error():
    """Redis out of memory: every submission gets its 503, and the API's log says why in one ERROR line (it had only
    INFO access lines '503'), not one line per request."""
    with RedisServer() as server, run_stack(server.url, {}, workers=()) as stack:
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
        try:
            answers = [requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "hi", "max_new_tokens": 2},
                                     timeout=10) for _ in range(3)]
        finally:
            client.config_set("maxmemory", "0")
        assert [answer.status_code for answer in answers] == [503] * 3
        log = (stack.log_dir / "api.log").read_text()
        errors = [line for line in log.splitlines() if " | ERROR | " in line]
        assert len(errors) == 1, log
        assert "job store (Redis) is unavailable" in errors[0] and "maxmemory" in errors[0], errors
        assert "LLAVA_QUEUE_REDIS_URL" in errors[0]  # what to look at


def test_the_log_level_setting_holds_for_the_apis_access_lines():
    """LLAVA_QUEUE_LOG_LEVEL=WARNING: no INFO line from the API, uvicorn's access lines included (they came on
    every request whatever the setting said)."""
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_LOG_LEVEL": "WARNING"}, workers=()) as stack:
        for _ in range(3):
            assert requests.get(f"{stack.base_url}/v1/jobs/0123456789abcdef0123456789abcdef", timeout=10).status_code \
                == 404
        log = (stack.log_dir / "api.log").read_text()
    assert not re.search(r" \| (INFO|DEBUG) \| ", log), log
