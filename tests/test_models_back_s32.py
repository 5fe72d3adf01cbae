"""A model whose workers are all away for a moment (a restart, a rolling deploy, a crash) is not an unknown model: a
chat completion for it is answered 503 with Retry-After, which OpenAI's clients retry, and a batch's lines for it
wait for its workers; a model never served is still a 404."""

import json
import os
import time

import requests
from openai import OpenAI

from conftest import model_workers, run_stack
from shared.redis_server import RedisServer

MODEL = "coming-back"


def chat(stack, model: str) -> requests.Response:
    return requests.post(f"{stack.base_url}/v1/chat/completions", timeout=30, json={
        "model": model, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})


def test_a_model_whose_workers_restart_is_retried_not_unknown(default_model_dir):
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir)}
    with RedisServer() as server, run_stack(server.url, env, workers=()) as stack:
        worker_env = dict(os.environ, **env)
        with model_workers(stack, worker_env, [MODEL]):
            assert chat(stack, MODEL).status_code == 200
        # Its worker stopped (and took itself out of the registry): none serves the model now.
        assert requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"] == []

        away = chat(stack, MODEL)
        assert away.status_code == 503, away.text
        assert away.headers["Retry-After"] == "5"
        error = away.json()["error"]
        assert error["param"] == "model" and f"no worker of the model {MODEL!r} is up at the moment" in error["message"]
        assert chat(stack, "never-served").status_code == 404
        # Asked by name (the openai package's models.retrieve), it is coming back too, not unknown.
        retrieved = requests.get(f"{stack.base_url}/v1/models/{MODEL}", timeout=10)
        assert retrieved.status_code == 503 and retrieved.headers["Retry-After"] == "5", retrieved.text
        assert requests.get(f"{stack.base_url}/v1/models/never-served", timeout=10).status_code == 404

        line = {"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]}}
        batch = requests.post(f"{stack.base_url}/v1/batches", timeout=30,
                              files={"file": ("b.jsonl", (json.dumps(line) + "\n").encode())})
        assert batch.status_code == 200 and batch.json()["request_counts"]["failed"] == 0, batch.text

        client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
        with model_workers(stack, worker_env, [MODEL]):
            # The worker is back: the batch's line runs, and the client's retry is answered.
            deadline = time.monotonic() + 60
            while (found := client.batches.retrieve(batch.json()["id"])).status != "completed":
                assert time.monotonic() < deadline, found
                time.sleep(0.2)
            assert found.request_counts.completed == 1
            assert client.models.retrieve(MODEL).id == MODEL
            answer = client.chat.completions.create(model=MODEL, max_tokens=3,
                                                    messages=[{"role": "user", "content": "Hi"}])
            assert answer.choices[0].message.content
