"""What a probe of request input found (the twenty-ninth session), each checked on the real stack: the original
worker's route reads a body as the original does (`json.loads`: a byte order mark, UTF-16 and UTF-32 too), text that
is not valid Unicode is named so on every route, chat completions take booleans only where OpenAI does, a chat
completion's id names its job on every route that takes a job id, and a missing page file's 404 names no folder of
the server."""

import asyncio
import json

import requests

from test_controller import frames_of
from test_pipeline import ws_messages
from test_protocol_compat import TEXT_MODEL

NOT_UNICODE = "prompt: holds text that is not valid Unicode (a lone surrogate such as \\ud800)"


def test_the_worker_stream_reads_a_body_in_every_encoding_the_original_reads(stack):
    # The original reads the body with `await request.json()` (json.loads on bytes): each was "malformed JSON" here.
    text = json.dumps({"prompt": "Once upon a time", "max_new_tokens": 2, "temperature": 0})
    for name, body in (("BOM", b"\xef\xbb\xbf" + text.encode()), ("UTF-16", text.encode("utf-16")),
                       ("UTF-32", text.encode("utf-32-le"))):
        response = requests.post(f"{stack.base_url}/worker_generate_stream", data=body, timeout=60)
        assert response.status_code == 200, (name, response.content)
        frames = frames_of(response.content)
        assert frames[-1]["error_code"] == 0 and frames[-1]["text"].startswith("Once upon a time"), (name, frames)
    # The original controller reads its body the same way.
    served = requests.post(f"{stack.base_url}/list_models", timeout=10).json()["models"][0]
    address = requests.post(f"{stack.base_url}/get_worker_address", timeout=10,
                            data=json.dumps({"model": served}).encode("utf-16"))
    assert address.status_code == 200 and address.json()["address"], address.text


def test_a_lone_surrogate_is_named_not_valid_unicode_on_every_route(stack):
    # The worker stream and the socket said "malformed JSON: unexpected end of hex escape" where /v1/jobs names it.
    body = b'{"prompt": "a\\ud800", "max_new_tokens": 2}'
    jobs = requests.post(f"{stack.base_url}/v1/jobs", data=body, headers={"Content-Type": "application/json"},
                         timeout=10)
    assert jobs.status_code == 422 and jobs.json()["error"]["message"] == NOT_UNICODE, jobs.text
    worker = requests.post(f"{stack.base_url}/worker_generate_stream", data=body, timeout=10)
    assert worker.status_code == 422, worker.content
    assert frames_of(worker.content) == [{"text": NOT_UNICODE, "error_code": 4}]
    [rejected] = asyncio.run(ws_messages(f"{stack.ws_url}/v1/ws", body.decode()))
    assert rejected["status"] == "rejected" and rejected["error"] == NOT_UNICODE, rejected


def test_chat_completion_booleans_take_true_or_false_only(stack):
    # pydantic took "yes", "on" and 1 for true (a streamed answer to "stream": "yes"); OpenAI refuses them. logprobs
    # took 0 for false.
    cases = (({"stream": "yes"}, "stream", "a string"), ({"stream": 1}, "stream", "a number"),
             ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "a string"),
             ({"logprobs": 0}, "logprobs", "a number"), ({"store": "no"}, "store", "a string"),
             ({"keep_on_disconnect": "1"}, "keep_on_disconnect", "a string"))
    for fields, param, kind in cases:
        response = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=30, json={
            "model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **fields})
        assert response.status_code == 400, (fields, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (fields, error)
        assert error["message"] == f"{param}: must be a boolean (true or false), got {kind}", (fields, error)
    # n is a number as the others (true was read as 1).
    response = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=30, json={
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "n": True})
    assert response.status_code == 400 and response.json()["error"]["message"] == "n: must be a number, got true"


def test_a_chat_completion_id_names_its_job_on_every_route_that_takes_a_job_id(stack):
    # GET and DELETE /v1/jobs/{id} took `chatcmpl-<job id>`; the socket said "unknown job id", and so did feedback.
    completion = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=60, json={
        "model": TEXT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
    assert completion.status_code == 200, completion.text
    completion_id = completion.json()["id"]
    job_id = completion_id.removeprefix("chatcmpl-")
    assert requests.get(f"{stack.base_url}/v1/jobs/{completion_id}", timeout=10).json()["id"] == job_id
    *_, last = asyncio.run(ws_messages(f"{stack.ws_url}/v1/jobs/{completion_id}/ws"))
    assert last["done"] and last["status"] == "succeeded" and last["id"] == job_id, last
    voted = requests.post(f"{stack.base_url}/v1/feedback", json={"type": "upvote", "job_id": completion_id},
                          timeout=10)
    assert voted.status_code == 201 and voted.json()["job_id"] == job_id, voted.text
    # Either id names the same job, so the vote by the other is the same vote, recorded once.
    again = requests.post(f"{stack.base_url}/v1/feedback", json={"type": "upvote", "job_id": job_id}, timeout=10)
    assert again.status_code == 200 and again.json() == voted.json(), again.text


def test_a_missing_page_file_is_a_404_that_names_only_its_path(stack):
    # The message named the folder the page is served from: the server's absolute path, to anyone.
    response = requests.get(f"{stack.base_url}/static/no-such-file-s29.js", timeout=10)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["message"] == "no such page file: 'no-such-file-s29.js'", response.text
