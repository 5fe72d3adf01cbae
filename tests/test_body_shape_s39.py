"""A valid JSON body built to be slow to parse must not stall the API for everyone (the thirty-ninth session).

json.loads and pydantic hold the GIL for as long as they run, on a thread too: 64 MiB of `[{},{},...]` in a field
held every request and stream of the API for 1.4 s (of `[[]]`: 11 s), on every JSON route. A heavy body is now parsed
in a parser process (api.json_bodies), which refuses one holding more values than any valid request holds; the
requests at the limits (2,048 turns, a bulk of 10,000 jobs with every field, a 64 MiB image) still pass."""

import asyncio
import re
import json
import threading
import time

import pytest
import requests

from api.json_bodies import BULK_VALUES, MAX_BULK_JOBS, REQUEST_VALUES
from conftest import run_stack
from shared.protocol import MAX_IMAGES, MAX_MESSAGES, MAX_STOP_STRINGS
from shared.redis_server import RedisServer
from test_pipeline import ws_messages

MAX_BODY_BYTES = 64 << 20
# A model no worker serves: the jobs taken wait, and are cancelled or left to the stack's end. Its name holds no
# "llava", so its images are counted, not decoded (the original's text-only worker ignores them).
UNSERVED = "text-only-served-by-none-s39"
TOO_MANY = "JSON values (objects, arrays, keys, strings, numbers), the most a request may hold here"
# How long /healthz may take to answer while a crafted body is parsed: up to 7 s before, 0.2 s at most since, on a
# 2-core machine.
HEALTHZ_BOUND_SECONDS = 1.0


@pytest.fixture(scope="module")
def api():
    """An API with no worker, whose queue takes a bulk of 10,000 jobs and more."""
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "100000"}, workers=(),
                                            log_prefix="llava-queue-body-shape-") as stack:
        yield stack


def crafted(size: int, field: str = "pad", item: bytes = b"{}") -> bytes:
    """A valid JSON job of `size` bytes whose `field` is an array of `item` (empty objects; `[[]]`, the slowest
    to parse: 7 s for 64 MiB here)."""
    head, tail = b'{"prompt": "hi", "model": "' + UNSERVED.encode() + b'", "' + field.encode() + b'": [', b"]}"
    return head + b",".join([item] * ((size - len(head) - len(tail)) // (len(item) + 1))) + tail


def post(stack, path: str, body: bytes, timeout: float = 120) -> requests.Response:
    return requests.post(f"{stack.base_url}{path}", data=body, headers={"Content-Type": "application/json"},
                         timeout=timeout)


def test_a_body_with_more_values_than_any_request_is_refused_at_every_entry_point(api):
    body = crafted(8 << 20)  # 2.8 M values: over the bulk's limit too
    for path in ("/v1/jobs", "/v1/jobs/bulk", "/v1/chat/completions", "/v1/feedback", "/v1/batches",
                 "/get_worker_address"):
        refused = post(api, path, body)
        limit = BULK_VALUES if path == "/v1/jobs/bulk" else REQUEST_VALUES
        assert refused.status_code == 400, (path, refused.text[:300])
        assert refused.json()["error"]["message"].startswith(f"the body holds more than {limit} {TOO_MANY}"), path
    stream = post(api, "/worker_generate_stream", body)
    frame = json.loads(stream.content.rstrip(b"\0"))
    assert stream.status_code == 400 and frame["error_code"] == 4 and TOO_MANY in frame["text"], stream.text[:300]
    [message] = asyncio.run(ws_messages(f"{api.ws_url}/v1/ws", body.decode()))
    assert message["status"] == "rejected" and TOO_MANY in message["error"], message

    # A body of 210 KB with as many values is refused too: heavy by its count, not its size.
    light = json.dumps({"prompt": "hi", "model": UNSERVED, "stop": [0] * (REQUEST_VALUES + 1)}).encode()
    refused = post(api, "/v1/jobs", light)
    assert refused.status_code == 400 and TOO_MANY in refused.json()["error"]["message"], refused.text[:300]
    # Nested deeper than any request, in a heavy body.
    deep = b'{"prompt": "hi", "pad": ' + b"[" * 100 + b"]" * 100 + b', "fill": "' + b"x" * (2 << 20) + b'"}'
    refused = post(api, "/v1/jobs", deep)
    assert refused.status_code == 400 and "nests arrays and objects more than 64 deep" in refused.text, refused.text
    # Malformed in a heavy body: said as for a light one.
    malformed = post(api, "/v1/jobs", crafted(2 << 20)[:-1])
    assert malformed.status_code == 400, malformed.text[:300]
    assert malformed.json()["error"]["message"].startswith("malformed JSON: Expecting ',' delimiter"), malformed.text


def test_the_api_answers_while_a_crafted_64_mib_body_is_refused(api):
    latencies, done = [], threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert requests.get(f"{api.base_url}/healthz", timeout=60).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)

    body = crafted(MAX_BODY_BYTES - 64, field="messages", item=b"[[]]")
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        started = time.monotonic()
        refused = post(api, "/v1/chat/completions", body)
        took = time.monotonic() - started
    finally:
        done.set()
        prober.join()
    assert len(latencies) > 5 and max(latencies) < HEALTHZ_BOUND_SECONDS, (took, sorted(latencies)[-5:])
    assert refused.status_code == 400 and TOO_MANY in refused.json()["error"]["message"], refused.text[:300]
    assert took < 60, took  # (seconds in the parser process: 3 s here)


def test_requests_at_the_limits_are_taken(api):
    # 2,048 turns, each with the most of text a request's turns may share.
    turns = [{"role": "user" if index % 2 == 0 else "assistant", "text": "a" * 190} for index in range(MAX_MESSAGES)]
    turns[-1]["role"] = "user"
    job = requests.post(f"{api.base_url}/v1/jobs", json={"model": UNSERVED, "messages": turns}, timeout=60)
    assert job.status_code == 202, job.text[:300]
    # A prompt of CSV text, 300,000 commas: heavy by its count of `,`, three values in fact.
    csv = requests.post(f"{api.base_url}/v1/jobs", json={"model": UNSERVED, "prompt": "1," * 150_000}, timeout=60)
    assert csv.status_code == 202, csv.text[:300]
    # 10,000 jobs with every field, their stop strings and images (counted, not decoded, for this model).
    every_field = {"model": UNSERVED, "prompt": "hi", "temperature": 0.5, "top_p": 0.9, "max_new_tokens": 8,
                   "stop": [f"s{index}" for index in range(MAX_STOP_STRINGS)], "seed": 1, "top_k": 4,
                   "image_process_mode": "Pad", "queue": "batch", "deadline_seconds": 60,
                   "images": ["AAAA"] * MAX_IMAGES}
    bulk = requests.post(f"{api.base_url}/v1/jobs/bulk", json={"jobs": [every_field] * MAX_BULK_JOBS}, timeout=300)
    assert bulk.status_code == 202 and len(bulk.json()["ids"]) == MAX_BULK_JOBS, bulk.text[:300]
    # 10,000 jobs of 8 chat turns each (a limit of every field alone refused bulks of chats).
    chat = [{"role": "user" if index % 2 == 0 else "assistant", "text": "hi"} for index in range(7)] + [
        {"role": "user", "text": "and?"}]
    chats = requests.post(f"{api.base_url}/v1/jobs/bulk", timeout=300,
                          json={"jobs": [{**every_field, "prompt": None, "images": [], "messages": chat}]
                                * MAX_BULK_JOBS})
    assert chats.status_code == 202 and len(chats.json()["ids"]) == MAX_BULK_JOBS, chats.text[:300]
    # An image as large as a body may be.
    head, tail = b'{"model": "' + UNSERVED.encode() + b'", "prompt": "<image>", "images": ["', b'"]}'
    image = post(api, "/v1/jobs", head + b"A" * ((MAX_BODY_BYTES - len(head) - len(tail)) // 4 * 4) + tail)
    assert image.status_code == 202, image.text[:300]
    for taken in (job, csv, image):
        assert requests.delete(f"{api.base_url}/v1/jobs/{taken.json()['id']}", timeout=10).status_code == 202


def test_the_parser_processes_die_with_the_api():
    """However the API ends (SIGKILL here), its parser processes go with it: started through forkserver, they outlived
    every API killed, and held its standard output open (a caller reading it to its end waited for good)."""
    import os
    import signal
    import subprocess

    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-parsers-") as stack:
        api_process = stack.processes["api"]
        children = subprocess.run(["pgrep", "-P", str(api_process.pid)], capture_output=True, text=True).stdout.split()
        parsers = [pid for pid in children if "json_bodies" in open(f"/proc/{pid}/cmdline").read()
                   or "multiprocessing" in open(f"/proc/{pid}/cmdline").read()]
        assert len(parsers) >= 2, children
        os.kill(api_process.pid, signal.SIGKILL)
        api_process.wait(10)
        deadline = time.monotonic() + 10

        def alive() -> list[str]:
            return [pid for pid in parsers if os.path.exists(f"/proc/{pid}")
                    and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]

        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(), alive()


def test_a_batch_files_heavy_line_is_parsed_off_the_event_loop(api):
    """A batch file's lines were parsed on a thread of the API (twice: to tell the file's format, then to read it),
    holding it for as long: a line of 64 MiB of `[[]]` 11 s each. A heavy line goes to a parser process as a heavy
    body does, and one of more values than a request may hold fails alone."""
    line = json.dumps({"custom_id": "fine", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": UNSERVED, "messages": [{"role": "user", "content": "hi"}]}}).encode()
    heavy = b'{"custom_id": "crafted", "method": "POST", "url": "/v1/chat/completions", "body": {"pad": [' + \
        b",".join([b"[]"] * (4 << 20)) + b"]}}"
    answer = requests.post(f"{api.base_url}/v1/batches", files={"file": ("b.jsonl", heavy + b"\n" + line + b"\n")},
                           data={"endpoint": "/v1/chat/completions", "completion_window": "24h"}, timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    # (The good line fails too, as a model no worker serves: it was read.)
    errors = {error["line"]: error["message"] for error in answer.json()["errors"]["data"]}
    assert sorted(errors) == [1, 2] and "is not served here" in errors[2], errors
    assert errors[1].startswith("line 1: the line holds more than") and TOO_MANY in errors[1], errors
    requests.post(f"{api.base_url}/v1/batches/{answer.json()['id']}/cancel", timeout=10)


def test_without_parser_processes_bodies_are_parsed_and_refused_here():
    """Where the parser processes cannot start (no /dev/shm for their locks), the API parses heavy bodies itself, with
    the same refusals: it started no more (ProcessPoolExecutor raised in the lifespan)."""
    from api.json_bodies import JsonParsers
    from shared.protocol import InvalidRequest

    unstarted = JsonParsers()
    assert asyncio.run(unstarted.parse(b'{"prompt": "hi"}', REQUEST_VALUES)) == {"prompt": "hi"}
    with pytest.raises(InvalidRequest, match=re.escape(TOO_MANY)):
        asyncio.run(unstarted.parse(crafted(1 << 20), REQUEST_VALUES))
    with pytest.raises(InvalidRequest, match="malformed JSON"):
        unstarted.parse_blocking(crafted(2 << 20)[:-1])
