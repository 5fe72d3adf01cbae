"""Following many jobs at once, a feature of the fortieth session: `GET /v1/jobs?ids=` answers up to 100 jobs in one
request, and `llava-queue eval` polls with it. It polled each job on its own, twice a second: with API keys and
`RATE_LIMIT_PER_MINUTE` on, a run used up its key's requests per minute within seconds, then stalled on 429s."""

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
import redis
import requests

from api.auth import key_digest
from conftest import run_stack
from shared.jobs import owner_id
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_limits import KEY, OTHER_KEY

EVAL_KEY = "test-key-eval-poll"
# A key's requests a minute, and the questions of the eval run: polling each job on its own, the run sent more
# requests than the limit at its first round of polls.
RATE_LIMIT = 60
QUESTIONS = 64


@pytest.fixture(scope="module")
def keyed_stack(tiny_llava_dir):
    """Three API keys, each allowed RATE_LIMIT requests a minute, and a worker serving the tiny LLaVA."""
    # The tiny checkpoint's tower is local: no setting of the caller's may point elsewhere.
    for name in ("LLAVA_QUEUE_MODEL_BASE", "LLAVA_QUEUE_MODEL_NAME", "LLAVA_QUEUE_VISION_TOWER"):
        os.environ.pop(name, None)
    keys = (KEY, OTHER_KEY, EVAL_KEY)
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(key) for key in keys]),
           "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT), "LLAVA_QUEUE_MODEL_PATH": str(tiny_llava_dir),
           "LLAVA_QUEUE_DEVICE": "cpu", "LLAVA_QUEUE_DTYPE": "float32", "LLAVA_QUEUE_MAX_NUM_SEQS": "16",
           "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "0"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-eval-poll-") as stack:
        yield stack


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(stack, key: str, count: int) -> list[str]:
    """`count` jobs of `key`, in one bulk POST; their ids."""
    response = requests.post(f"{stack.base_url}/v1/jobs/bulk", headers=auth(key), timeout=10,
                             json={"jobs": [{"prompt": f"job {index}", "max_new_tokens": 2} for index in range(count)]})
    assert response.status_code == 202, response.text
    return response.json()["ids"]


def named(stack, key: str, ids: list[str], **params) -> requests.Response:
    return requests.get(f"{stack.base_url}/v1/jobs", params={"ids": ",".join(ids), **params}, headers=auth(key),
                        timeout=10)


def requests_counted(stack, key: str) -> dict[str, int]:
    """The key's requests counted against its rate limit, by clock minute (its counters in Redis)."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    pattern = f"{Settings().key_prefix}:rate:{owner_id(key_digest(key))}:*"
    return {counter.rsplit(":", 1)[1]: int(client.get(counter)) for counter in client.scan_iter(pattern)}


def test_jobs_are_answered_in_the_order_asked_each_key_its_own(keyed_stack):
    mine, theirs = submit(keyed_stack, KEY, 3), submit(keyed_stack, OTHER_KEY, 1)
    missing = uuid.uuid4().hex
    asked = [mine[2], theirs[0], missing, mine[0], f"chatcmpl-{mine[1]}", mine[2]]

    answer = named(keyed_stack, KEY, asked)
    assert answer.status_code == 200, answer.text
    listed = answer.json()
    # Another key's job is as unknown as one that never existed (left out, as GET /v1/jobs/{id} answers it 404); a
    # completion id names its job; a job asked twice is answered once.
    assert [job["id"] for job in listed["data"]] == [mine[2], mine[0], mine[1]]
    assert (listed["object"], listed["first_id"], listed["last_id"], listed["has_more"]) == \
        ("list", mine[2], mine[1], False)
    # Each as GET /v1/jobs/{id} answers it (what the worker changes since aside).
    single = requests.get(f"{keyed_stack.base_url}/v1/jobs/{mine[0]}", headers=auth(KEY), timeout=10).json()
    assert list(listed["data"][1]) == list(single)
    assert [listed["data"][1][name] for name in ("id", "queue", "model", "prompt", "params", "created_at")] == \
        [single[name] for name in ("id", "queue", "model", "prompt", "params", "created_at")]
    assert [job["id"] for job in named(keyed_stack, OTHER_KEY, asked).json()["data"]] == theirs
    assert requests.get(f"{keyed_stack.base_url}/v1/jobs", params={"ids": mine[0]}, timeout=10).status_code == 401


def test_a_hundred_jobs_are_one_request_against_the_rate_limit(keyed_stack):
    ids = submit(keyed_stack, OTHER_KEY, 2) + [uuid.uuid4().hex for _ in range(98)]
    before = sum(requests_counted(keyed_stack, OTHER_KEY).values())
    answer = named(keyed_stack, OTHER_KEY, ids)
    assert answer.status_code == 200, answer.text
    assert [job["id"] for job in answer.json()["data"]] == ids[:2]
    assert sum(requests_counted(keyed_stack, OTHER_KEY).values()) == before + 1


@pytest.mark.parametrize("ids, params, param, says", [
    ([uuid.uuid4().hex for _ in range(101)], {}, "ids", "at most 100 job ids at once, not 101"),
    ([""], {}, "ids", "an empty job id"),
    (["a", "", "b"], {}, "ids", "an empty job id"),
    (["abc def"], {}, "ids", "'abc def' is not a job id"),
    (["../jobs"], {}, "ids", "'../jobs' is not a job id"),
    (["x" * 201], {}, "ids", "is not a job id"),
    (["abc"], {"after": "abc"}, "after", "not with ids"),
    (["abc"], {"status": "queued"}, "status", "not with ids"),
    (["abc"], {"limit": 5}, "limit", "not with ids"),
])
def test_a_bad_ids_is_a_422_naming_it(keyed_stack, ids, params, param, says):
    answer = named(keyed_stack, KEY, ids, **params)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["param"] == f"query.{param}" and error["message"].startswith(f"{param}: ") \
        and says in error["message"], error


def test_an_eval_run_stays_within_its_keys_rate_limit(keyed_stack, tmp_path):
    # Each job in flight was polled on its own, twice a second while it ran: the 64 jobs' first polls were 64
    # requests, where the key may send 60 a minute. The run was refused within its first second of polling, and
    # waited for the next minute (Retry-After), to be refused again; now a round of polls is one request, twice a
    # second at most.
    marker = uuid.uuid4().hex[:8]
    questions = [{"question_id": index, "text": f"Say something about {index}. [{marker}]"}
                 for index in range(QUESTIONS)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(question) + "\n" for question in questions))
    answers = tmp_path / "a.jsonl"
    argv = ["eval", "--question-file", str(tmp_path / "q.jsonl"), "--answers-file", str(answers), "--api-url",
            keyed_stack.base_url, "--temperature", "0", "--max_new_tokens", "16", "--max-in-flight", str(QUESTIONS)]
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "LLAVA_QUEUE_API_KEY": EVAL_KEY})
    except subprocess.TimeoutExpired as exc:  # (its output comes as bytes, text=True or not)
        raise AssertionError(f"the run did not end: {requests_counted(keyed_stack, EVAL_KEY)} requests counted, "
                             f"by minute\n{(exc.stderr or b'').decode(errors='replace')[-2000:]}") from None
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{QUESTIONS} answered (0 before this run), 0 failed" in done.stdout
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == list(range(QUESTIONS))
    counted = requests_counted(keyed_stack, EVAL_KEY)
    assert max(counted.values()) <= RATE_LIMIT, (counted, took)
    assert "rate limit" not in done.stderr, done.stderr


class WithoutIds(http.server.BaseHTTPRequestHandler):
    """An API older than `ids`, as a client sees it: the stack's, with the parameter taken out of every request (an
    older API ignores a parameter it does not know, and answers the key's newest jobs)."""

    api_url = ""

    def forward(self) -> None:
        parts = urlsplit(self.path)
        query = urlencode([(name, value) for name, value in parse_qsl(parts.query) if name != "ids"])
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        sent = {name: value for name, value in self.headers.items()
                if name.lower() in ("authorization", "content-type", "idempotency-key")}
        answer = requests.request(self.command, f"{self.api_url}{parts.path}{'?' * bool(query)}{query}",
                                  data=body, headers=sent, timeout=30)
        self.send_response(answer.status_code)
        for name in ("Content-Type", "Retry-After"):
            if name in answer.headers:
                self.send_header(name, answer.headers[name])
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = do_DELETE = forward

    def log_message(self, *args) -> None:
        pass


def eval_behind_an_older_api(model_dir, tmp_path, questions: int, max_num_seqs: int, max_new_tokens: int,
                             max_in_flight: int, timeout: float) -> tuple[subprocess.CompletedProcess, Path]:
    """`llava-queue eval` of `questions` short questions, run against a stack of `model_dir` behind WithoutIds (keys
    off, no rate limit); the finished run and its answers file."""
    env = {"LLAVA_QUEUE_MODEL_PATH": str(model_dir), "LLAVA_QUEUE_DEVICE": "cpu", "LLAVA_QUEUE_DTYPE": "float32",
           "LLAVA_QUEUE_MAX_NUM_SEQS": str(max_num_seqs), "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "0"}
    lines = [json.dumps({"question_id": index, "text": f"Say something about {index}."}) + "\n"
             for index in range(questions)]
    (tmp_path / "q.jsonl").write_text("".join(lines))
    answers = tmp_path / "a.jsonl"
    with RedisServer() as redis_server, run_stack(redis_server.url, env, log_prefix="llava-queue-older-api-") as stack:
        handler = type("Handler", (WithoutIds,), {"api_url": stack.base_url})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        argv = ["eval", "--question-file", str(tmp_path / "q.jsonl"), "--answers-file", str(answers), "--api-url",
                f"http://127.0.0.1:{server.server_address[1]}", "--temperature", "0", "--max_new_tokens",
                str(max_new_tokens), "--max-in-flight", str(max_in_flight)]
        try:
            done = subprocess.run([sys.executable, "-m", "shared.cli", *argv], capture_output=True, text=True,
                                  timeout=timeout)
        finally:
            server.shutdown()
            server.server_close()
    return done, answers


def test_an_api_without_ids_is_polled_a_job_at_a_time(tiny_llava_dir, tmp_path):
    # Its answer to `?ids=` is a page of the newest 20 jobs: taken for the jobs asked, each of the run's 24 left out
    # of it was unknown to the API, and asked again. (Keys off, no rate limit: polled on its own, each job is a
    # request again.)
    done, answers = eval_behind_an_older_api(tiny_llava_dir, tmp_path, 24, max_num_seqs=8, max_new_tokens=8,
                                             max_in_flight=24, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "has no GET /v1/jobs?ids= (an older llava-queue): each job is polled on its own" in done.stderr
    assert "24 answered (0 before this run), 0 failed; this run: 24 jobs submitted" in done.stdout, done.stdout
    assert [json.loads(line)["question_id"] for line in answers.read_text().splitlines()] == list(range(24))
