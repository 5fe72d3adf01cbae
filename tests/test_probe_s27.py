"""What a probe of the running stack found (the twenty-seventh session), each checked against the real stack: a
`WS /v1/ws` client that sends no request is let go; an empty prompt is the client's error (code 4), not a server
error; an OpenAI batch refuses the question-file settings it never used; a `data:` URL is read in any case; an empty
stop string stops nothing in a list as alone."""

import asyncio
import base64
import io
import json
import time
import uuid

import pytest
import requests
import websockets
from PIL import Image

from conftest import LET_GO_SLACK_SECONDS, SEND_TIMEOUT_SECONDS
from shared.protocol import SERVER_ERROR_MSG
from test_batches import jsonl, upload_batch, wait_for_batch
from test_pipeline import submit, wait_until


def test_a_submit_and_stream_socket_that_sends_no_request_is_let_go(stack):
    async def idle() -> tuple[dict, int, float]:
        started = time.monotonic()
        async with websockets.connect(f"{stack.base_url.replace('http', 'ws')}/v1/ws", open_timeout=10) as socket:
            message = json.loads(await asyncio.wait_for(socket.recv(), SEND_TIMEOUT_SECONDS + LET_GO_SLACK_SECONDS))
            with pytest.raises(websockets.ConnectionClosedError) as closed:
                await asyncio.wait_for(socket.recv(), 10)
            return message, closed.value.rcvd.code, time.monotonic() - started

    message, code, waited = asyncio.run(idle())
    assert (message["error_code"], message["status"], code) == (4, "rejected", 1008), message
    assert message["text"] == f"no job request came in the {SEND_TIMEOUT_SECONDS:g} s after the connection opened; " \
        "send it as the first message"
    assert SEND_TIMEOUT_SECONDS <= waited < SEND_TIMEOUT_SECONDS + LET_GO_SLACK_SECONDS


def test_an_empty_prompt_is_the_clients_error_on_every_way_in(stack):
    job = wait_until(stack, submit(stack, prompt="", max_new_tokens=4))
    assert (job["status"], job["error_code"]) == ("failed", 4), job
    assert job["error"] == "the prompt is empty: it makes no token, and generation starts from at least one"
    body = requests.post(f"{stack.base_url}/worker_generate_stream", json={"prompt": "", "max_new_tokens": 4},
                         timeout=60).content
    # The original's stream answers any failure of its worker (a ValueError too) with its server error, code 1.
    frames = [json.loads(frame) for frame in body.split(b"\0") if frame]
    assert frames == [{"text": SERVER_ERROR_MSG, "error_code": 1}], frames
    # A prompt with text runs as before, beside it.
    assert wait_until(stack, submit(stack, prompt="Hello", max_new_tokens=2))["status"] == "succeeded"


def test_an_openai_batch_refuses_question_file_settings_and_shows_no_params(stack):
    line = {"custom_id": "one", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                     "temperature": 0}}
    for fields, named in [({"temperature": 0, "max_new_tokens": 1, "seed": 5}, "max_new_tokens, seed, temperature"),
                          ({"conv_mode": "vicuna_v1"}, "conv_mode"), ({"top_p": 0.5}, "top_p")]:
        response = requests.post(f"{stack.base_url}/v1/batches", files={"file": ("b.jsonl", jsonl([line]))},
                                 data={name: str(value) for name, value in fields.items()}, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == f"{named}: these apply to question files; the lines of an " \
            "OpenAI batch file carry their own (in each line's body)"
        assert response.json()["error"]["param"] == named.split(",")[0]
    batch = upload_batch(stack, jsonl(["", "not json", line]), metadata=json.dumps({"k": "v"}))
    assert batch["params"] is None and batch["format"] == "openai"
    assert wait_for_batch(stack, batch["id"])["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    # A question file keeps its settings.
    questions = upload_batch(stack, jsonl([{"question_id": 1, "text": "Hi"}]), temperature=0, max_new_tokens=2)
    assert questions["params"]["max_new_tokens"] == 2 and questions["format"] == "llava"
    wait_for_batch(stack, questions["id"])


def png_data(scheme: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return f"{scheme}:image/png;BASE64,{base64.b64encode(buffer.getvalue()).decode()}"


def test_a_data_url_is_read_in_any_case(stack):
    for scheme in ("data", "DATA", "Data"):
        content = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": png_data(scheme)}}]
        response = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=60, json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": content}]})
        assert response.status_code == 200, (scheme, response.text)
        job = wait_until(stack, submit(stack, prompt="Hi", images=[png_data(scheme)], max_new_tokens=2))
        assert job["status"] == "succeeded", job
    refused = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data("DATA").replace(";BASE64", "")}}]}]})
    assert refused.status_code == 400 and "must be base64-encoded" in refused.json()["error"]["message"]


@pytest.mark.parametrize("stop", ["", [""], ["", ""]])
def test_an_empty_stop_string_stops_nothing_alone_or_in_a_list(stack, stop):
    job = wait_until(stack, submit(stack, prompt="Once upon a time", temperature=0, max_new_tokens=6, stop=stop))
    # "" is kept as sent (the original's string), a list without a stop string is none.
    assert (job["status"], job["finish_reason"], job["params"]["stop"]) == (
        "succeeded", "length", "" if stop == "" else None), job
    mixed = wait_until(stack, submit(stack, prompt="Once upon a time", temperature=0, max_new_tokens=6,
                                     stop=["", "zzz-never"]))
    assert mixed["params"]["stop"] == "zzz-never", mixed


def sse_events(response: requests.Response):
    """The JSON of each `data:` line of a server-sent event stream, until `[DONE]`."""
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data: "):
            if line == "data: [DONE]":
                return
            yield json.loads(line.removeprefix("data: "))


def test_a_chat_completion_with_an_idempotency_key_is_that_keys_job(stack):
    # The key was ignored: each retry made a job of its own, and a cancel by the key made a job cancelled from the
    # start while the completion ran on to its end.
    url = f"{stack.base_url}/v1/chat/completions"
    body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell me a story."}],
            "temperature": 0, "max_tokens": 8}
    key = {"Idempotency-Key": f"chat-{uuid.uuid4().hex}"}
    first, again = (requests.post(url, json=body, headers=key, timeout=60) for _ in range(2))
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert first.headers["X-Job-Id"] == again.headers["X-Job-Id"] and first.json()["id"] == again.json()["id"]
    assert first.json()["choices"] == again.json()["choices"]
    other = requests.post(url, json={**body, "max_tokens": 9}, headers=key, timeout=60)
    assert other.status_code == 422 and "already used with a different request" in other.json()["error"]["message"]

    # Streamed, left after its first words: the job goes on for the retry, which gets the text so far first.
    key = {"Idempotency-Key": f"chat-{uuid.uuid4().hex}"}
    story = {**body, "max_tokens": 400, "stream": True}
    with requests.post(url, json=story, headers=key, stream=True, timeout=60) as left:
        job_id = left.headers["X-Job-Id"]
        heard = next(event for event in sse_events(left) if event["choices"][0]["delta"].get("content"))
    time.sleep(1)
    job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "running" and job["usage"]["completion_tokens"] > 1, job
    with requests.post(url, json=story, headers=key, stream=True, timeout=60) as retry:
        assert retry.headers["X-Job-Id"] == job_id
        events = sse_events(retry)
        first_text = next(event for event in events if event["choices"][0]["delta"].get("content"))
        assert first_text["choices"][0]["delta"]["content"].startswith(heard["choices"][0]["delta"]["content"])
        cancel = requests.post(f"{stack.base_url}/v1/jobs/cancel", headers=key, timeout=10)
        assert cancel.status_code == 202 and cancel.json() == {"id": job_id, "status": "cancelling"}, cancel.text
        last = list(events)[-1]
    assert last["error"]["code"] == 5, last
    assert wait_until(stack, job_id)["status"] == "cancelled"


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_a_chat_completions_sampling_value_that_is_no_finite_number_is_named_so(stack, field):
    # It was "Input should be less than or equal to 2" for NaN; /v1/jobs says "finite number" too.
    for raw in ("NaN", "Infinity", "1e309"):
        body = ('{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}], '
                f'"{field}": {raw}}}')
        response = requests.post(f"{stack.base_url}/v1/chat/completions", data=body, timeout=10,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == f"{field}: Input should be a finite number"


def test_an_openai_message_with_two_images_and_no_image_token_is_served(tiny_llava_stack):
    # Each image part gets its <image> (one was appended for them all: "2 images, 1 <image>", a 400).
    content = [{"type": "text", "text": "Which is brighter?"},
               {"type": "image_url", "image_url": {"url": png_data("data")}},
               {"type": "image_url", "image_url": {"url": png_data("data")}}]
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/chat/completions", timeout=120, json={
        "model": "llava-v1.5-tiny", "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "user", "content": content}]})
    assert response.status_code == 200, response.text
    job = requests.get(f"{tiny_llava_stack.base_url}/v1/jobs/{response.headers['X-Job-Id']}", timeout=10).json()
    assert job["prompt"].count("<image>") == 2, job["prompt"]
