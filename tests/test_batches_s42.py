"""The Batch API as the `openai` package uses it: a file that says nothing of its format but was sent with OpenAI's
`endpoint` gets OpenAI's error lines; a batch's output given as a batch's input is refused for its purpose; files say
when they expire."""

import json

import openai
import pytest
from openai import OpenAI

from conftest import run_stack
from shared.redis_server import RedisServer
from test_batches import jsonl

# Two days: a batch and an upload are kept this long (the 24 h completion window fits).
TTL_SECONDS = 2 * 86400
LINE = {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}}


@pytest.fixture(scope="module")
def client():
    """The openai package's client of an API (no worker: no line here runs) that keeps batches and files two days."""
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_BATCH_TTL_SECONDS": str(TTL_SECONDS)},
                                            workers=(), log_prefix="llava-queue-batches-s42-") as stack:
        yield OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def failed_batch(client: OpenAI):
    """A batch of a pretty-printed OpenAI line (a JSON file, not JSONL: no line of it is a JSON object), failed."""
    uploaded = client.files.create(file=("batch.jsonl", json.dumps(LINE, indent=2).encode()), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_file_sent_with_openais_endpoint_that_tells_no_format_gets_openais_error_lines(client):
    # Such a file was taken for a question file: the batch said endpoint null, and its errors file had question-file
    # lines ({"line", "question_id", "status", "error", "error_code"}), where the caller reads custom_id and error.
    batch = failed_batch(client)
    assert batch.status == "failed" and batch.endpoint == "/v1/chat/completions", batch
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert len(errors) == batch.request_counts.total == len(json.dumps(LINE, indent=2).splitlines()), errors
    for number, error in enumerate(errors, 1):
        assert list(error) == ["id", "custom_id", "response", "error"] and error["response"] is None, error
        assert error["error"]["code"] == "invalid_line" and error["error"]["line"] == number, error


def test_a_batchs_output_given_as_a_batchs_input_is_refused_for_its_purpose(client):
    # It was a 404 "unknown file id", for a file GET /v1/files/{id} describes.
    error_file = client.files.retrieve(failed_batch(client).error_file_id)
    assert error_file.purpose == "batch_output"
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=error_file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.body["param"] == "input_file_id", refused.value.body
    assert "purpose 'batch'" in refused.value.body["message"], refused.value.body


def test_files_say_when_they_expire(client):
    # Uploads go BATCH_TTL_SECONDS after they came, a batch's output files that long after they were made (as their
    # batch ended); every file said expires_at null, which is OpenAI's "never".
    uploaded = client.files.create(file=("batch.jsonl", jsonl([LINE])), purpose="batch")
    expires_at = uploaded.created_at + TTL_SECONDS
    assert uploaded.expires_at == expires_at, uploaded
    assert client.files.retrieve(uploaded.id).expires_at == expires_at
    assert {file.id: file.expires_at for file in client.files.list(purpose="batch")}[uploaded.id] == expires_at
    batch = failed_batch(client)
    made = client.files.retrieve(batch.error_file_id)
    assert made.expires_at == made.created_at + TTL_SECONDS
    listed = {file.id: file.expires_at for file in client.files.list(purpose="batch_output")}
    assert listed[batch.error_file_id] == made.created_at + TTL_SECONDS
