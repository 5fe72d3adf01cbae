"""Fuzz the API from its own OpenAPI schema (schemathesis): no input gives a 5xx or hangs.

The API runs against a Redis of its own with no worker, so fuzzed jobs stay queued and cost no
decode steps; a bounded number of cases per operation keeps the run short.
"""


import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import run_stack
from shared.redis_server import RedisServer


@pytest.fixture(scope="module")
def fuzz_api():
    with RedisServer() as redis_server:
        with run_stack(redis_server.url, {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "100000"}, workers=(),
                       log_prefix="llava-queue-fuzz-") as stack:
            yield stack


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
