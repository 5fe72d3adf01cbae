"""How many turns a request holds, the prompt they make, and how many images it carries, bounded before the work they
cost (a review of the thirty-eighth session: 200,000 empty turns were taken, and the worker spent 32 s rendering and
tokenizing their prompt of a million tokens; 160 images were each decoded, 20 s of the API's CPU, before the request
was refused for holding more than 16)."""

import asyncio
import base64
import json
import struct
import time
import zlib

import pytest
import requests

from shared.protocol import MAX_IMAGES, MAX_MESSAGES, MAX_RENDERED_CHARS, TURN_CHARS, check_images
from test_batches import download, jsonl, upload_batch, wait_for_batch
from test_pipeline import ws_messages

TOO_MANY = [{"role": "user", "text": "hi"}] * (MAX_MESSAGES + 1)
# Each turn within the text limit, all of them within it too, but with their template past the prompt's limit.
WORDY = [{"role": "user", "text": "a" * 150}] * MAX_MESSAGES
IMAGES = 32


def served_model(stack) -> str:
    return requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def chat(messages: list[dict]) -> list[dict]:
    return [{"role": message["role"], "content": message["text"]} for message in messages]


def png_without_end(width: int, height: int) -> str:
    """Base64 of an RGBA PNG of zeros with no IEND chunk: PIL's verify() fails on it, so the API's check decodes its
    every pixel (check_images reads what the original would), a tenth of a second or more for 3500x3500."""
    raw = zlib.compress(b"".join(b"\0" + bytes(width * 4) for _ in range(height)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
           + chunk(b"IDAT", raw))
    return base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def heavy_image() -> tuple[str, float]:
    """A crafted image the API decodes whole to check it, and how long checking one takes here."""
    image = png_without_end(3500, 3500)
    started = time.perf_counter()
    check_images([image])
    return image, time.perf_counter() - started


def test_more_turns_than_the_limit_are_refused_at_every_entry_point(stack):
    base = stack.base_url
    job = requests.post(f"{base}/v1/jobs", json={"messages": TOO_MANY}, timeout=30)
    assert job.status_code == 422 and job.json()["error"]["param"] == "messages", job.text[:300]
    assert f"at most {MAX_MESSAGES} items" in job.json()["error"]["message"]
    bulk = requests.post(f"{base}/v1/jobs/bulk", json={"jobs": [{"prompt": "hi"}, {"messages": TOO_MANY}]}, timeout=30)
    assert bulk.status_code == 422 and bulk.json()["error"]["param"] == "jobs.1.messages", bulk.text[:300]
    stream = requests.post(f"{base}/worker_generate_stream", json={"messages": TOO_MANY}, timeout=30)
    frame = json.loads(stream.content.rstrip(b"\0"))
    assert stream.status_code == 422 and frame["error_code"] == 4, stream.text[:300]
    assert f"at most {MAX_MESSAGES} items" in frame["text"]
    [message] = asyncio.run(ws_messages(f"{stack.ws_url}/v1/ws", json.dumps({"messages": TOO_MANY})))
    assert message["status"] == "rejected" and message["error_code"] == 4, message
    assert f"at most {MAX_MESSAGES} items" in message["error"]
    completion = requests.post(f"{base}/v1/chat/completions", timeout=30,
                               json={"model": served_model(stack), "max_tokens": 2, "messages": chat(TOO_MANY)})
    error = completion.json()["error"]
    assert completion.status_code == 400 and error["param"] == "messages", completion.text[:300]
    assert f"at most {MAX_MESSAGES} items" in error["message"] and error["type"] == "invalid_request_error"
    # The limit itself is taken (a model no worker serves: the job waits, and is cancelled).
    taken = requests.post(f"{base}/v1/jobs", json={"messages": TOO_MANY[:-1], "model": "served-by-no-worker-s38"},
                          timeout=30)
    assert taken.status_code == 202, taken.text[:300]
    assert requests.delete(f"{base}/v1/jobs/{taken.json()['id']}", timeout=10).status_code == 202
    # As many turns with 307,200 characters of text, under the 400,000 of a prompt: taken (the worker's limit on the
    # rendered prompt, MAX_RENDERED_CHARS, leaves room for TURN_CHARS of template a turn).
    assert 150 * MAX_MESSAGES + TURN_CHARS * MAX_MESSAGES < MAX_RENDERED_CHARS
    wordy = requests.post(f"{base}/v1/jobs", json={"messages": WORDY, "model": "served-by-no-worker-s38"}, timeout=30)
    assert wordy.status_code == 202, wordy.text[:300]
    assert requests.delete(f"{base}/v1/jobs/{wordy.json()['id']}", timeout=10).status_code == 202


def test_a_batch_line_of_too_many_messages_fails_as_the_call_does(stack):
    model = served_model(stack)
    bodies = [{"model": model, "max_tokens": 2, "messages": chat(TOO_MANY)}]
    lines = [{"custom_id": f"line-{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
             for index, body in enumerate(bodies)]
    batch = upload_batch(stack, jsonl(lines))
    assert wait_for_batch(stack, batch["id"])["request_counts"]["failed"] == 1
    errors = download(stack, batch["id"], "errors")
    assert [error["custom_id"] for error in errors] == ["line-0"]
    # Refused as the file is read (it was run, to end with the context overflow's 400).
    assert f"at most {MAX_MESSAGES} items" in errors[0]["response"]["body"]["error"]["message"], errors[0]
    for error, body in zip(errors, bodies):
        direct = requests.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)
        assert error["response"]["status_code"] == direct.status_code == 400
        assert error["response"]["body"] == direct.json()


def test_images_past_the_limit_are_counted_before_any_is_decoded(stack, heavy_image):
    image, one = heavy_image
    # The refusal decodes none: it comes before four would have been decoded (each request names 32).
    quick = max(1.0, 4 * one)
    url = f"data:image/png;base64,{image}"
    parts = [{"type": "image_url", "image_url": {"url": url}}] * (IMAGES // 4)
    sent = {
        "chat, one message": ("/v1/chat/completions", {"model": served_model(stack), "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}, *parts * 4]}]}),
        "chat, in all": ("/v1/chat/completions", {"model": served_model(stack), "messages": [
            {"role": "user", "content": parts}, {"role": "assistant", "content": "ok"}] * 3 + [
            {"role": "user", "content": parts}]}),
        "jobs": ("/v1/jobs", {"messages": [{"role": "user", "text": "hi", "images": [image] * MAX_IMAGES}] * 2}),
        "worker_generate_stream": ("/worker_generate_stream", {"messages": [
            {"role": "user", "text": "hi", "images": [image] * MAX_IMAGES}] * 2}),
    }
    answers = {}
    for name, (path, body) in sent.items():
        started = time.perf_counter()
        response = requests.post(f"{stack.base_url}{path}", json=body, timeout=300)
        answers[name] = (response.status_code, round(time.perf_counter() - started, 2), response.text[:160])
    assert {name: answer[0] for name, answer in answers.items()} == {
        "chat, one message": 400, "chat, in all": 400, "jobs": 422, "worker_generate_stream": 422}, answers
    assert all(answer[1] < quick for answer in answers.values()), (quick, answers)
    assert f"messages[0].content: {IMAGES} images; the limit is {MAX_IMAGES} per request" in answers[
        "chat, one message"][2]
    assert f"{IMAGES} images in the turns; the limit is {MAX_IMAGES} per request" in answers["chat, in all"][2]
    assert f"{IMAGES} images in the turns; the limit is {MAX_IMAGES} per request" in answers["jobs"][2]


class CountingTokenizer:
    """A tokenizer that counts the texts it tokenizes, with a chat template that adds more to each turn (602
    characters for "hi") than the API counts for it (TURN_CHARS)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0
        tokenizer.chat_template = "{% for m in messages %}{{ '<turn>' * 100 }}{{ m['content'] }}{% endfor %}"

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


def test_the_worker_refuses_a_rendered_prompt_past_the_limit_before_tokenizing_it(default_model_dir):
    import torch
    from transformers import AutoTokenizer

    from shared.protocol import GenerateRequest
    from workers.builder import LoadedModel
    from workers.generation import prepare

    tokenizer = CountingTokenizer(AutoTokenizer.from_pretrained(default_model_dir))
    loaded = LoadedModel(model=None, tokenizer=tokenizer, name="padded-template", is_multimodal=False,
                         context_len=2048, device=torch.device("cpu"), dtype=torch.float32, precision="fp32")
    request = GenerateRequest(messages=[{"role": "user", "text": "hi"}] * MAX_MESSAGES)  # within the API's limits
    with pytest.raises(ValueError, match=f"the prompt rendered from the turns is {MAX_MESSAGES * 602} characters "
                                         f"long; the limit is {MAX_RENDERED_CHARS}"):
        prepare(request, loaded, 1024)  # the task fails the job with this error, code 4 (INVALID_REQUEST)
    assert tokenizer.calls == 0
    # A prompt within the limit is tokenized as ever.
    assert prepare(GenerateRequest(messages=[{"role": "user", "text": "hi"}]), loaded, 4).params.max_new_tokens == 4
    assert tokenizer.calls == 1
