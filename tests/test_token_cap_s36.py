"""LLAVA_QUEUE_MAX_NEW_TOKENS_CAP in the API: a job's `max_new_tokens` is clamped to it, and OpenAI's `max_tokens`
bounded by it. The API used the constant 1024 whatever the setting said: raised, the setting changed nothing (the
API cut every job to 1024 first); lowered, a chat completion asking more than it was answered cut short with
`length`, not refused, and a job showed the `max_new_tokens` sent while it ran fewer."""

from fastapi.testclient import TestClient

from api.main import create_app
from shared.protocol import MAX_NEW_TOKENS_CAP, set_max_new_tokens_cap
from shared.settings import Settings

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_api_clamps_and_bounds_new_tokens_to_the_setting(redis_server):
    try:
        for cap in (8, 2048):
            settings = Settings(redis_url=redis_server.url, key_prefix=f"cap{cap}", max_new_tokens_cap=cap)
            with TestClient(create_app(settings)) as client:
                for asked, kept in ((cap + 500, cap), (cap - 1, cap - 1)):
                    job = client.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": asked})
                    assert job.status_code == 202, job.text
                    view = client.get(f"/v1/jobs/{job.json()['id']}").json()
                    assert view["params"]["max_new_tokens"] == kept, view
                for field in ("max_tokens", "max_completion_tokens"):
                    over = client.post("/v1/chat/completions",
                                       json={"model": "m", "messages": FRANCE, field: cap + 1})
                    assert over.status_code == 400, over.text
                    error = over.json()["error"]
                    assert error["param"] == field
                    assert error["message"] == f"{field}: Input should be less than or equal to {cap}"
                    # At the cap, the request passes validation (and finds no worker of model "m").
                    at = client.post("/v1/chat/completions", json={"model": "m", "messages": FRANCE, field: cap})
                    assert at.status_code == 404 and at.json()["error"]["param"] == "model", at.text
    finally:
        set_max_new_tokens_cap(MAX_NEW_TOKENS_CAP)
