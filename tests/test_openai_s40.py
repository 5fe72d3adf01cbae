"""OpenAI's legacy completions, `POST /v1/completions`, as vLLM serves them: a prompt the client rendered, completed as
a job like any other. It was a 404 "Not Found": `vllm bench serve` (whose default backends ask this endpoint),
evaluation harnesses' completion models and `client.completions.create` had nothing to talk to."""

import json
import time

import openai
import pytest
import requests

from test_openai import MODEL

# The default model's chat template, rendered by hand: what a legacy completion's client sends.
FRANCE = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
STORY = "<|im_start|>user\nWrite a long story about a dragon who learns to cook.<|im_end|>\n<|im_start|>assistant\n"


def job_ended(stack, completion_id: str, timeout: float = 60) -> dict:
    """The job of a legacy completion, by the completion's id (`cmpl-<job id>`, taken where a job id is), once ended."""
    deadline = time.monotonic() + timeout
    while (job := requests.get(f"{stack.base_url}/v1/jobs/{completion_id}", timeout=10).json())["status"] in (
            "queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    return job


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_a_legacy_completion_is_answered_in_the_text_completion_shape(stack, client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=FRANCE, temperature=0)
    completion = raw.parse()
    assert completion.object == "text_completion" and completion.model == MODEL
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason == "stop"
    assert "Paris" in choice.text
    usage = completion.usage
    assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # A job like any other, pollable by the id in the completion's (also in X-Job-Id); the prompt is used as sent, and
    # a request without max_tokens gets OpenAI's (and vLLM's) default of 16.
    job = job_ended(stack, completion.id)
    assert raw.headers["x-job-id"] == job["id"] == completion.id.removeprefix("cmpl-")
    assert job["text"] == choice.text and job["prompt"] == FRANCE and job["params"]["max_new_tokens"] == 16
    # A list of one prompt (what a batch of one is) and stop strings, as a chat completion takes them.
    stopped = client.completions.create(model=MODEL, prompt=[FRANCE], temperature=0, max_tokens=40, stop=["Paris"])
    assert stopped.choices[0].text == "The capital of France is " and stopped.choices[0].finish_reason == "stop"


def test_a_streamed_legacy_completion_is_sent_as_text_completion_chunks(stack):
    response = requests.post(f"{stack.base_url}/v1/completions", stream=True, timeout=60, json={
        "model": MODEL, "prompt": STORY, "temperature": 0, "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = response.content.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(event.startswith("data: ") for event in events[:-2])
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    *texts, last, usage = chunks
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    # No role chunk: every chunk before the last carries text.
    assert texts and all(chunk["choices"][0]["text"] and chunk["choices"][0]["finish_reason"] is None
                         for chunk in texts)
    assert last["choices"] == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    job = job_ended(stack, chunks[0]["id"])
    assert "".join(chunk["choices"][0]["text"] for chunk in texts) == job["text"]


def test_the_openai_package_streams_a_legacy_completion(client):
    chunks = list(client.completions.create(model=MODEL, prompt=FRANCE, temperature=0, max_tokens=16, stream=True))
    assert "Paris" in "".join(chunk.choices[0].text for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("change, param, words", [
    ({"prompt": [FRANCE, FRANCE]}, "prompt", "one prompt per request, got 2"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids are not supported"),
    ({"logprobs": 0}, "logprobs", "not supported"),
    ({"echo": True}, "echo", "not supported"),
    ({"suffix": "</s>"}, "suffix", "not supported"),
    ({"best_of": 2}, "best_of", "not supported"),
    ({"n": 2}, "n", "only n=1"),
    ({"max_tokens": 1025}, "max_tokens", "less than or equal to 1024"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only be defined when `stream=True`"),
])
def test_legacy_completion_options_that_would_change_the_answer_are_refused(stack, change, param, words):
    answer = requests.post(f"{stack.base_url}/v1/completions", timeout=30,
                           json={"model": MODEL, "prompt": FRANCE, "max_tokens": 4, **change})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"], error


def test_a_legacy_completion_of_an_unknown_model_is_a_404(stack):
    answer = requests.post(f"{stack.base_url}/v1/completions", timeout=30,
                           json={"model": "gpt-3.5-turbo-instruct", "prompt": "Hi"})
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "model", answer.text


def test_closing_a_legacy_stream_cancels_its_job(stack, client):
    stream = client.completions.create(model=MODEL, prompt=STORY, temperature=0, max_tokens=300, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    next(chunks)  # some text was generated
    stream.close()
    job = job_ended(stack, first.id)
    assert job["status"] == "cancelled" and job["usage"]["completion_tokens"] < 300
