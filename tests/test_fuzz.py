"""Fuzz the API from its own OpenAPI schema (schemathesis): no input gives a 5xx or hangs.

The API runs against a Redis of its own with no worker, so fuzzed jobs stay queued and cost no
decode steps; a bounded number of cases per operation keeps the run short.
"""

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import Stack, start_service, wait_for_stack
from shared.redis_server import RedisServer, free_port


@pytest.fixture(scope="module")
def fuzz_api():
    log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-fuzz-"))
    with RedisServer() as redis_server:
        port = free_port()
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_MAX_QUEUED_JOBS="100000")
        process = start_service("api", ["api", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
        stack = Stack(f"http://127.0.0.1:{port}", redis_server.url, log_dir, {"api": process})
        try:
            wait_for_stack(stack, workers=0)
            yield stack
        finally:
            process.kill()
            process.wait()


def test_no_input_gives_a_server_error(fuzz_api):
    schema = schemathesis.openapi.from_url(f"{fuzz_api.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    calls = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def call(case):
            response = case.call(timeout=15)
            calls.append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                                 response.text)

        call()
    assert len(calls) >= 10 * len(operations)
