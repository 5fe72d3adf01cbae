"""`POST /v1/jobs` and `POST /v1/jobs/bulk` validate their body on the endpoint's thread, not where FastAPI does (on
the event loop: a crafted image held up every other client meanwhile; the stall itself is tested in
test_protocol_s16.py): the answers and the schema stay what FastAPI's validation gave."""

import requests

from conftest import run_stack
from shared.redis_server import RedisServer


def test_invalid_job_bodies_are_answered_as_before():
    # The body is validated by the endpoint now (on a thread), not by FastAPI: the answers to invalid bodies are the
    # ones FastAPI's validation gave, field names, statuses and the 400 for a body not sent as JSON included.
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-bad-job-") as api:
        def post(path: str, **kwargs) -> tuple[int, dict]:
            response = requests.post(f"{api.base_url}{path}", timeout=10, **kwargs)
            return response.status_code, response.json()

        for path in ("/v1/jobs", "/v1/jobs/bulk"):
            assert post(path, data=b"{", headers={"Content-Type": "application/json"})[0] == 400
            status, body = post(path, data=b"{}", headers={"Content-Type": "text/plain"})
            assert status == 400 and "Content-Type: application/json" in body["error"]["message"], body
            status, body = post(path, data=b"", headers={"Content-Type": "application/json"})
            assert status == 422 and body["error"]["message"] == "field required", body
            status, body = post(path, json=[1])
            assert status == 422 and body["error"]["message"] == "the body must be a JSON object", body
            status, body = post(path, json={}, headers={"Idempotency-Key": ""})
            assert status == 422 and body["error"]["param"] == "header.idempotency-key", body
        status, body = post("/v1/jobs", json={"prompt": 1, "temperature": "hot"})
        assert status == 422 and body["error"]["param"] == "prompt", body
        assert "prompt:" in body["error"]["message"] and "temperature:" in body["error"]["message"], body
        status, body = post("/v1/jobs/bulk", json={"jobs": [{"prompt": "a"}, {"prompt": "b", "temperature": "hot"}]})
        assert status == 422 and body["error"]["param"] == "jobs.1.temperature", body
        status, body = post("/v1/jobs", json={"prompt": "hi"}, headers={"Idempotency-Key": "same"})
        assert status == 202, body
        assert post("/v1/jobs", json={"prompt": "hi"}, headers={"Idempotency-Key": "same"}) == (202, body)
        assert post("/v1/jobs", json={"prompt": "other"}, headers={"Idempotency-Key": "same"})[0] == 422


def test_the_job_routes_keep_their_request_body_schema():
    # schemathesis (tests/test_fuzz.py) and clients read the body's schema from /openapi.json.
    from fastapi.testclient import TestClient

    from api.main import create_app

    schema = TestClient(create_app()).get("/openapi.json").json()
    for path, model in (("/v1/jobs", "JobRequest"), ("/v1/jobs/bulk", "BulkJobRequest")):
        operation = schema["paths"][path]["post"]
        assert operation["requestBody"] == {"content": {"application/json": {"schema": {
            "$ref": f"#/components/schemas/{model}"}}}, "required": True}
        assert model in schema["components"]["schemas"]
        assert [parameter["name"] for parameter in operation["parameters"]] == ["idempotency-key"]
