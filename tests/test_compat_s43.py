"""Drop-in compatibility: a URL under /v1 that the API does not serve, or a method its path does not take, is answered
as OpenAI answers it; a cancel tells the truth about a job whose record is damaged, and one that comes during a job's
last decode step leaves the finished answer standing, as the README says."""

import uuid

import openai
import pytest
from fastapi.testclient import TestClient

from shared.jobs import JobStore
from shared.settings import Settings
from test_records_s18 import png_b64


@pytest.fixture(scope="module")
def api(redis_server):
    """The API in this process on the session's Redis, with no worker; its store."""
    from api.main import create_app

    settings = Settings(redis_url=redis_server.url, key_prefix=f"llq-s43-{uuid.uuid4().hex[:8]}")
    with TestClient(create_app(settings)) as client:
        yield client, JobStore.from_url(redis_server.url, settings.key_prefix)


def test_a_wrong_url_or_method_under_v1_is_answered_as_openai_answers_it():
    # Starlette's "Not Found" / "Method Not Allowed", typed http_error: an OpenAI client with a wrong base URL or path
    # got neither OpenAI's message nor its type.
    from api.main import create_app

    client = TestClient(create_app())
    for method, path, status in (("POST", "/v1/foo", 404), ("GET", "/v1/chat/completion", 404),
                                 ("GET", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405)):
        answer = client.request(method, path)
        assert answer.status_code == status, (path, answer.text)
        what = "Invalid URL" if status == 404 else "Invalid method for URL"
        assert answer.json()["error"] == {"message": f"{what} ({method} {path})", "type": "invalid_request_error",
                                          "param": None, "code": 4}, answer.text
    assert client.get("/v1/chat/completions").headers["Allow"] == "POST"
    # The openai package, given a base URL with /v1 twice, hears OpenAI's own words.
    sdk = openai.OpenAI(base_url="http://testserver/v1/v1", api_key="unused", max_retries=0, http_client=client)
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.type == "invalid_request_error" and "Invalid URL (POST /v1/v1/chat/completions)" in str(
        refused.value)
    # A WebSocket route asked without the upgrade says what it wants.
    for path in ("/v1/ws", f"/v1/jobs/{uuid.uuid4().hex}/ws"):
        answer = client.get(path)
        wanted = f"Invalid URL (GET {path}): {path} takes a WebSocket (ws:// or wss://), not a plain HTTP request"
        assert answer.status_code == 404 and answer.json()["error"]["message"] == wanted, answer.text
    # Outside /v1 (the LLaVA protocol's paths, the page) the answer is as it was; a route's own 404 keeps its type.
    assert client.post("/worker_generate").json()["error"]["type"] == "http_error"


def test_a_cancel_that_a_damaged_record_fails_or_cannot_end_answers_500_saying_so(api):
    client, store = api
    # A queued job whose stored image key was SET by hand: the cancel's ending failed it (its record damaged), and the
    # DELETE answered 202 "cancelled".
    job_id = client.post("/v1/jobs", json={"prompt": "<image>\nWhat?", "images": [png_b64(43)]}).json()["id"]
    [image_key] = store.redis.hget(store.key(job_id), "image_keys").split()
    store.redis.delete(image_key)
    store.redis.set(image_key, "an image of another type")
    answer = client.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", 1), answer.text
    assert error["message"].startswith(f"job {job_id}: the job's record is damaged: its image key {image_key}")
    assert error["message"].endswith("it ended failed, not cancelled")
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "failed"
    # A job whose status is none llava-queue writes: no cancel ends it, and the DELETE answered 202 "cancelling".
    job_id = client.post("/v1/jobs", json={"prompt": "Hi"}).json()["id"]
    store.redis.hset(store.key(job_id), "status", "edited")
    answer = client.delete(f"/v1/jobs/{job_id}")
    assert answer.status_code == 500 and "its status, 'edited', is none llava-queue writes" in answer.text, answer.text


def test_a_cancel_during_the_last_decode_step_leaves_the_finished_answer(api, default_model_dir):
    # The README's promise: "cancelling" is asked, not done; a job whose last step was under way ends succeeded, its
    # whole answer kept (as vLLM's abort of a finished request does nothing), and a cancel after that is a 409.
    from shared.protocol import GenerateRequest
    from workers import generation
    from workers.builder import load_model, serving_engine

    client, store = api
    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    runner = generation.JobRunner(store, loaded, "w1")
    answers = []

    def publish_after_a_cancel(outputs):
        # The step has finished the job and is not written yet: the client's DELETE, and the worker hearing it.
        for out in outputs:
            if out.finished and not answers:
                answers.append(client.delete(f"/v1/jobs/{out.request_id}"))
                runner.cancel(out.request_id)
        runner.publish(outputs)

    engine = serving_engine(loaded, Settings(), on_step=publish_after_a_cancel)
    runner.attach(engine)
    engine.start()
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Hi", temperature=0, max_new_tokens=4), "interactive")
        assert runner.run(job_id) == "succeeded"
    finally:
        engine.shutdown()
    assert (answers[0].status_code, answers[0].json()["status"]) == (202, "cancelling"), answers[0].text
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["text"] and job["usage"]["completion_tokens"] >= 1, job
    again = client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 409 and "already ended (succeeded)" in again.text, again.text
