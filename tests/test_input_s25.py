"""Bad input at entry points that answered 5xx, closed a socket without an error chunk, or said what was not so
(found by probing a running stack with odd requests, the twenty-fifth session)."""

import asyncio
import json
import math
import time

import pytest
import requests
from pydantic import ValidationError

from shared.protocol import MAX_PROMPT_CHARS, JobRequest
from shared.vqa import Question
from test_batches import jsonl, questions, upload_batch, wait_for_batch
from test_pipeline import submit, wait_until, ws_messages


def test_batch_metadata_nested_too_deep_is_a_400(tiny_llava_stack):
    # The multipart field is JSON read by the endpoint: a RecursionError, not a ValueError, escaped it (500).
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/batches", timeout=30,
                             files={"file": ("q.jsonl", jsonl(questions(1, image=False)))},
                             data={"metadata": "[" * 3000 + "]" * 3000})
    assert response.status_code == 400 and response.json()["error"]["param"] == "metadata", response.text
    tiny_llava_stack.check_api_log()


def test_names_no_file_system_takes_are_no_page_file(stack):
    # A NUL (ValueError) or a name too long (OSError) in a path under /static, which needs no key: 500 before.
    for name in ("%00", "a" * 300, "x/" + "b" * 300 + "/c.js"):
        response = requests.get(f"{stack.base_url}/static/{name}", timeout=10)
        assert response.status_code == 404 and response.json()["error"]["type"] == "not_found", (name, response.text)
    stack.check_api_log()


def test_a_batch_key_that_is_no_batch_id_and_an_offset_past_any_batch_are_4xx(tiny_llava_stack):
    # "<batch id>:lines" names the batch's list of lines in Redis: reading it as the batch's record failed with
    # WRONGTYPE, answered 503 "the job store is unavailable" with a Retry-After, as if Redis were away. So did an
    # offset past Redis' 64-bit list indexes.
    base = tiny_llava_stack.base_url
    batch = upload_batch(tiny_llava_stack, jsonl(questions(1, image=False)), temperature=0, max_new_tokens=2)
    wait_for_batch(tiny_llava_stack, batch["id"])
    for path in (f"{batch['id']}:lines", f"{batch['id']}:lines/lines", f"{batch['id']}:results/output"):
        response = requests.get(f"{base}/v1/batches/{path}", timeout=10)
        assert response.status_code == 404, (path, response.text)
    cancel = requests.post(f"{base}/v1/batches/{batch['id']}:lines/cancel", timeout=10)
    assert cancel.status_code == 404, cancel.text
    past = requests.get(f"{base}/v1/batches/{batch['id']}/lines", params={"offset": 2**63 - 10}, timeout=10)
    assert past.status_code == 400 and past.json()["error"]["param"] == "query.offset", past.text
    assert requests.get(f"{base}/v1/batches/{batch['id']}/lines", params={"offset": 5}, timeout=10).json() == {
        "object": "list", "data": []}
    tiny_llava_stack.check_api_log()


def test_a_first_websocket_message_larger_than_uvicorns_default_gets_an_error_chunk(stack):
    # uvicorn closed a message over 16 MiB with 1009 and nothing else, whatever the body limit (64 MiB): a request a
    # POST takes could not be sent on the socket, and a bad one got no error chunk. Now the limit is the body's.
    request = json.dumps({"prompt": "a" * (17 << 20), "max_new_tokens": 4})
    [message] = asyncio.run(ws_messages(f"{stack.ws_url}/v1/ws", request))
    assert message["error_code"] == 4 and message["status"] == "rejected", message["text"][:300]
    assert f"the limit is {MAX_PROMPT_CHARS}" in message["error"], message["error"][:300]


def test_a_retried_submission_answers_its_jobs_status(stack):
    # The retry of a keyed submission gets the job first sent with the key: its status was always "queued", here
    # for a job cancelled since.
    key = {"Idempotency-Key": "s25-retry-status"}
    body = {"prompt": "Once upon a time", "max_new_tokens": 4, "model": "served-by-no-worker-s25"}
    first = requests.post(f"{stack.base_url}/v1/jobs", json=body, headers=key, timeout=10).json()
    assert first["status"] == "queued", first
    assert requests.delete(f"{stack.base_url}/v1/jobs/{first['id']}", timeout=10).status_code == 202
    again = requests.post(f"{stack.base_url}/v1/jobs", json=body, headers=key, timeout=10)
    assert again.status_code == 202 and again.json() == {"id": first["id"], "status": "cancelled"}, again.text
    unkeyed = submit(stack, **body)  # queued, as before
    assert requests.delete(f"{stack.base_url}/v1/jobs/{unkeyed}", timeout=10).status_code == 202


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_deadline_that_is_no_number_says_so(stack, value):
    response = requests.post(f"{stack.base_url}/v1/jobs", timeout=10, headers={"Content-Type": "application/json"},
                             data=f'{{"prompt": "hi", "deadline_seconds": {value}}}')
    error = response.json()["error"]
    assert response.status_code == 422 and error["param"] == "deadline_seconds", response.text
    assert "finite" in error["message"] and "less than" not in error["message"], error


def test_a_bad_file_purpose_is_not_echoed_whole(stack):
    response = requests.post(f"{stack.base_url}/v1/files", files={"file": ("q.jsonl", b"{}\n")},
                             data={"purpose": "p" * 100_000}, timeout=30)
    assert response.status_code == 400 and len(response.text) < 1000, response.text[:300]
    assert "only 'batch' is supported" in response.json()["error"]["message"]


@pytest.mark.parametrize("response_format", ["json", "text", ["text"], {"type": "json_object"}])
def test_a_response_format_other_than_text_is_refused(stack, response_format):
    # A string (OpenAI wants an object) was taken as text without a word.
    response = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=10, json={
        "model": "any", "messages": [{"role": "user", "content": "hi"}], "response_format": response_format})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format", response.text


def test_a_text_response_format_is_taken(stack):
    response = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=60, json={
        "model": stack_model(stack), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "response_format": {"type": "text"}})
    assert response.status_code == 200, response.text


def stack_model(stack) -> str:
    return requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


@pytest.mark.parametrize("question_id", [math.nan, math.inf, -math.inf])
def test_a_question_id_that_is_no_json_number_is_refused(question_id):
    # Python's json reads NaN and Infinity; echoed in the answers file, the line was no JSON.
    with pytest.raises(ValidationError, match="must be a JSON number"):
        Question(question_id=question_id, text="What is it?")
    assert Question(question_id=1.5, text="What is it?").question_id == 1.5


def test_the_text_of_all_turns_is_held_to_the_prompt_limit():
    # Each turn's text was bounded alone: five turns of the limit each passed, for the worker to tokenize 2 M
    # characters only to answer "Exceeds max token length".
    turn = {"role": "user", "text": "a" * MAX_PROMPT_CHARS}
    with pytest.raises(ValidationError, match=f"the limit is {MAX_PROMPT_CHARS} per request"):
        JobRequest(messages=[turn, {"role": "assistant", "text": "b"}, turn])
    JobRequest(messages=[{"role": "user", "text": "a" * (MAX_PROMPT_CHARS - 1)}, {"role": "assistant", "text": "b"}])


def test_entries_on_a_queue_that_are_no_task_message_are_set_aside_and_the_worker_goes_on(stack):
    # Each of these, pushed on a queue the worker reads, raised out of its consumer: Celery took it for an
    # unrecoverable error, and the worker exited (status 0) and took no job again.
    import base64

    import redis

    from shared.celery_app import DEAD_LETTERS_KEY, make_celery, send_many
    from shared.settings import Settings

    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    client.delete(DEAD_LETTERS_KEY)
    send_many(make_celery(Settings(redis_url=stack.redis_url)), [("0" * 32, "s25-template")], time.time)
    template = json.loads(client.rpop("s25-template"))  # a task message as the API sends one

    def changed(**parts) -> str:
        message = json.loads(json.dumps(template))
        for path, value in parts.items():
            *outer, name = path.split("__")
            holder = message
            for key in outer:
                holder = holder[key]
            if value is None and name == "content_type":
                del holder["content-type"]
            else:
                holder[name] = value
        return json.dumps(message)

    two_parts = base64.b64encode(json.dumps([["0" * 32], {}]).encode()).decode()
    entries = ["garbage", "null", "[1, 2, 3]", '"hello"', "{}", changed(headers="x"), changed(body="!!not base64!!"),
               changed(body=two_parts), changed(headers__timelimit="x"), changed(properties__delivery_tag=None),
               changed(content_type=None)]
    for entry in entries:
        client.lpush("interactive", entry)
    deadline = time.monotonic() + 60
    while client.llen(DEAD_LETTERS_KEY) < len(entries):
        assert time.monotonic() < deadline and stack.processes["worker"].poll() is None, (
            client.lrange(DEAD_LETTERS_KEY, 0, -1), stack.logs())
        time.sleep(0.2)
    assert sorted(client.lrange(DEAD_LETTERS_KEY, 0, -1)) == sorted(entries)
    assert wait_until(stack, submit(stack, prompt="Once upon a time", max_new_tokens=4))["status"] == "succeeded"
    assert stack.processes["worker"].poll() is None
    assert "set aside in llava_queue.dead_letters" in (stack.log_dir / "worker.log").read_text()
    # None of them left among the unacked, to be restored in 4 hours. The job's own message is acked once its task
    # returns, which may come a moment after its record says succeeded (a clean-clone run saw it still there).
    deadline = time.monotonic() + 10
    while client.hlen("unacked") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not client.hgetall("unacked")
    client.delete(DEAD_LETTERS_KEY)


def test_settings_and_flags_that_could_not_work_are_refused_at_once():
    # A database that is no number: redis-py left it out (database 0) where kombu refused it, so the worker loaded its
    # model and exited 0 while the API answered 503. A time to live past what Redis takes failed every job's ending.
    import argparse

    from shared.cli import _seconds
    from shared.settings import MAX_TTL_SECONDS, Settings
    from shared.vqa import EvalParams

    with pytest.raises(ValidationError, match="'abc' is not a number"):
        Settings(redis_url="redis://127.0.0.1:6379/abc")
    assert Settings(redis_url="redis://127.0.0.1:6379/3").redis_url.endswith("/3")
    with pytest.raises(ValidationError, match="job_ttl_seconds"):
        Settings(job_ttl_seconds=9223372036854775)
    assert Settings(job_ttl_seconds=MAX_TTL_SECONDS).job_ttl_seconds == MAX_TTL_SECONDS
    for text in ("inf", "nan", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            _seconds(text)  # `status --watch inf` ended in an OverflowError's traceback
    with pytest.raises(ValidationError, match="temperature"):
        EvalParams(temperature=math.inf)  # accepted, then every question failed


def test_an_eval_question_whose_image_name_holds_a_nul_fails_alone(tiny_llava_stack, tmp_path):
    # Reading it raised ValueError, which stopped the whole run with a traceback.
    from llava_fixtures import png_bytes
    from test_eval_cli import eval_args, eval_in_process, read_lines

    (tmp_path / "cat.png").write_bytes(png_bytes(40, 30, seed=1))
    lines = [{"question_id": 1, "image": "cat\x00.png", "text": "Question 1?"},
             {"question_id": 2, "image": "cat.png", "text": "Question 2?"}]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = tmp_path / "answers.jsonl"
    assert eval_in_process(eval_args(tiny_llava_stack, tmp_path / "questions.jsonl", tmp_path, answers)) == 1
    assert [line["question_id"] for line in read_lines(answers)] == [2]
    [error] = read_lines(tmp_path / "answers.jsonl.errors")
    assert error["question_id"] == 1 and "cannot read image" in error["error"], error
