"""Turns that a LLaVA worker's template refuses are refused when the job is submitted, not after a 202 (the job then
failed at the worker, and a bulk or batch client learned it only by polling)."""

import requests

from conftest import run_stack
from llava_fixtures import png_b64
from shared.redis_server import RedisServer

LLAVA = "llava-v1.5-13b"


def test_turns_a_llava_template_refuses_are_refused_at_submission():
    image = png_b64(8, 8)
    user, assistant = {"role": "user", "text": "What is it?"}, {"role": "assistant", "text": "A square."}
    refused = {
        "an assistant message cannot carry images": [user, {**assistant, "images": [image]}, user],
        "a system message cannot carry images": [{"role": "system", "text": "Be brief.", "images": [image]}, user],
        "the last message must come from the user": [user, assistant],
    }
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-turns-") as api:
        def post(path: str, body: dict) -> tuple[int, dict]:
            response = requests.post(f"{api.base_url}{path}", json=body, timeout=10)
            return response.status_code, response.json()

        for words, messages in refused.items():
            status, body = post("/v1/jobs", {"model": LLAVA, "messages": messages})
            assert status == 422 and words in body["error"]["message"], (words, status, body)
            status, body = post("/v1/jobs/bulk", {"jobs": [{"model": LLAVA, "messages": [user]},
                                                           {"model": LLAVA, "messages": messages}]})
            assert status == 422 and words in body["error"]["message"], (words, status, body)
        # What the template takes is accepted, images on the user's turns included.
        accepted = [{"role": "system", "text": "Be brief."}, {**user, "images": [image]}, assistant, user]
        assert post("/v1/jobs", {"model": LLAVA, "messages": accepted})[0] == 202
        # Two turns of one role in a row are joined into one, as OpenAI and vLLM take them (tests/test_turns_s40.py).
        assert post("/v1/jobs", {"model": LLAVA, "messages": [user, user]})[0] == 202
        # A model without "llava" in its name (or none named) may render with its tokenizer's chat template, which
        # takes turns in any order: those jobs are the worker's to judge, as before.
        for model in ("SmolLM2-135M-Instruct", None):
            assert post("/v1/jobs", {"model": model, "messages": [user, user]})[0] == 202
