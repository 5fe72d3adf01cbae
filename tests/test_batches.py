"""Offline batch evaluation through the whole stack, on a worker serving a tiny (random) LLaVA checkpoint.

A question file in the original's format gives the original's answers file, in question order;
an OpenAI batch file works through the `openai` package; bad lines fail alone, with reasons;
server-side paths are read only under the data roots; batch jobs give way to interactive ones.
"""

import json
import os
import threading
import time
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from openai import OpenAI

from llava_fixtures import b64, png_bytes
from test_llava_stack import submit, wait_until
from shared.dataroot import PathRefused, resolve_data_path, resolve_in_folder
from shared.vqa import question_prompt

ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
FINAL = ("completed", "failed", "cancelled", "expired")
# A generous bound on one engine step of the tiny model on a busy 2-core machine.
ONE_STEP = 0.25


@pytest.fixture(scope="module")
def images(data_root) -> Path:
    """An image folder under the data root with three small PNGs, and one file that is not an image."""
    folder = data_root / "images"
    folder.mkdir(exist_ok=True)
    for seed, (width, height) in enumerate([(70, 40), (40, 90), (56, 56)]):
        (folder / f"img{seed}.png").write_bytes(png_bytes(width, height, seed=30 + seed))
    (folder / "not-an-image.png").write_bytes(b"Dear user,\nthis is a text file.\n")
    return folder


def questions(count: int, start: int = 0, image: bool = True) -> list[dict]:
    return [{"question_id": start + index, "text": f"What is in picture {index}? Describe it.",
             **({"image": f"img{index % 3}.png"} if image else {}), "category": "conv"}
            for index in range(count)]


def jsonl(lines: list) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def upload_batch(stack, content: bytes, **fields) -> dict:
    response = requests.post(f"{stack.base_url}/v1/batches", files={"file": ("questions.jsonl", content)},
                             data={name: str(value) for name, value in fields.items()}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for_batch(stack, batch_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = requests.get(f"{stack.base_url}/v1/batches/{batch_id}", timeout=10).json()
        if batch["status"] in FINAL:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} still {batch['status']} after {timeout} s\n{stack.logs()}")


def download(stack, batch_id: str, kind: str) -> list[dict]:
    response = requests.get(f"{stack.base_url}/v1/batches/{batch_id}/{kind}", timeout=30)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def run_interactive(stack, job: dict) -> dict:
    return wait_until(stack, submit(stack, **job), timeout=60)


def test_a_question_file_gives_the_original_answers_file(tiny_llava_stack, images):
    lines = questions(50)
    batch = upload_batch(tiny_llava_stack, jsonl(lines), image_folder="images", temperature=0, max_new_tokens=8)
    assert batch["object"] == "batch" and batch["format"] == "llava"
    assert batch["request_counts"] == {"total": 50, "completed": batch["request_counts"]["completed"], "failed": 0}
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 50, "completed": 50, "failed": 0}
    assert done["started_at"] <= done["ended_at"] and done["tokens_per_second"] > 0
    assert done["estimated_seconds_left"] == 0 and done["error_file_id"] is None

    answers = download(tiny_llava_stack, batch["id"], "output")
    assert len(answers) == 50
    assert all(list(answer) == ANSWER_KEYS for answer in answers)
    assert [answer["question_id"] for answer in answers] == list(range(50))
    assert [answer["prompt"] for answer in answers] == [line["text"] for line in lines]
    assert {answer["model_id"] for answer in answers} == {"llava-v1.5-tiny"}
    assert all(len(answer["answer_id"]) == 22 and answer["metadata"] == {} for answer in answers)
    # Stable: the same file every time it is read, as the original's json.dumps lines.
    again = requests.get(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/output", timeout=30).text
    assert again == "".join(json.dumps(answer) + "\n" for answer in answers)

    # Greedy answers are those of single interactive jobs with the same prompt and image.
    for line in lines[:3]:
        alone = run_interactive(tiny_llava_stack, {
            "prompt": question_prompt(line["text"], "llava_v1"), "temperature": 0, "max_new_tokens": 8,
            "images": [b64((images / line["image"]).read_bytes())]})
        assert alone["status"] == "succeeded", alone
        assert answers[line["question_id"]]["text"] == alone["text"].strip()


def test_bad_lines_fail_alone_with_their_reasons(tiny_llava_stack, images, data_root, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(20, 20, seed=1))
    link = images / "escape.png"
    if not link.exists():
        link.symlink_to(outside)
    good = questions(2, start=100)
    lines = [
        good[0],
        '{"question_id": 1, "text": "unterminated',
        {"question_id": 2, "image": "img0.png"},
        {"question_id": 3, "text": "Where?", "image": "missing.png"},
        {"question_id": 4, "text": "Where?", "image": "../../outside.png"},
        {"question_id": 5, "text": "Where?", "image": str(outside)},
        {"question_id": 6, "text": "Where?", "image": "escape.png"},
        {"question_id": 7, "text": "Where?", "image": "not-an-image.png"},
        "[1, 2, 3]",
        {"question_id": 9, "text": "Where?", "image": "x" * 300 + ".png"},
        # JSON's "\ud800": it raised out of the path's resolve, and the whole batch failed with a 500.
        {"question_id": 10, "text": "Where?", "image": "\ud800.png"},
        good[1],
    ]
    (data_root / "bad-lines.jsonl").write_bytes(jsonl(lines))
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/batches", timeout=30, json={
        "input_path": "bad-lines.jsonl", "image_folder": "images", "temperature": 0, "max_new_tokens": 4})
    assert response.status_code == 200, response.text
    batch = response.json()
    assert batch["errors"]["data"][0]["line"] == 2
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 12, "completed": 2, "failed": 10}
    assert [answer["question_id"] for answer in download(tiny_llava_stack, batch["id"], "output")] == [100, 101]
    errors = download(tiny_llava_stack, batch["id"], "errors")
    reasons = {error["line"]: error["error"] for error in errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "not valid JSON" in reasons[2]
    assert "text: field required" in reasons[3]
    assert "no such file" in reasons[4]
    assert "'..'" in reasons[5]
    assert "absolute path" in reasons[6]
    assert "outside the data roots" in reasons[7]
    assert "not an image file" in reasons[8]
    assert "not a JSON object" in reasons[9]
    assert "cannot be read (File name too long)" in reasons[10]
    assert "lone surrogate" in reasons[11]
    assert [error["question_id"] for error in errors[1:7]] == [2, 3, 4, 5, 6, 7]


def test_an_openai_batch_through_the_openai_package(tiny_llava_stack, images):
    client = OpenAI(base_url=f"{tiny_llava_stack.base_url}/v1", api_key="unused")
    picture = f"data:image/png;base64,{b64((images / 'img1.png').read_bytes())}"
    body = {"model": "llava-v1.5-tiny", "temperature": 0, "max_tokens": 6, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": picture}}]}]}
    lines = [{"custom_id": f"request-{index}", "method": "POST", "url": "/v1/chat/completions",
              "body": {**body, "max_tokens": 4 + index}} for index in range(4)]
    lines.insert(2, {"custom_id": "two-choices", "method": "POST", "url": "/v1/chat/completions",
                     "body": {**body, "n": 2}})
    lines.append({"custom_id": "unknown-model", "method": "POST", "url": "/v1/chat/completions",
                  "body": {**body, "model": "gpt-4o"}})
    uploaded = client.files.create(file=("batch.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.bytes == len(jsonl(lines))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == 6
    deadline = time.monotonic() + 60
    while batch.status not in FINAL and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 4 and batch.request_counts.failed == 2
    assert batch.metadata == {"run": "test"}
    assert batch.id in [listed.id for listed in client.batches.list(limit=100)]

    output = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in output] == [f"request-{index}" for index in range(4)]
    for index, line in enumerate(output):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        completion = line["response"]["body"]
        assert completion["object"] == "chat.completion" and completion["model"] == "llava-v1.5-tiny"
        assert completion["usage"]["completion_tokens"] <= 4 + index
    # The batch's usage in OpenAI's shape, as the package reads it: the lines' tokens summed.
    usages = [line["response"]["body"]["usage"] for line in output]
    assert batch.usage.input_tokens == sum(usage["prompt_tokens"] for usage in usages) > 0, batch.usage
    assert batch.usage.output_tokens == sum(usage["completion_tokens"] for usage in usages) > 0, batch.usage
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    # A line runs exactly as the same chat completion does.
    direct = client.chat.completions.create(**lines[0]["body"])
    assert output[0]["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content

    errors = {line["custom_id"]: line for line in
              (json.loads(text) for text in client.files.content(batch.error_file_id).text.splitlines())}
    assert errors["two-choices"]["response"]["status_code"] == 400
    assert "only n=1" in errors["two-choices"]["response"]["body"]["error"]["message"]
    assert errors["unknown-model"]["response"]["status_code"] == 404


def test_cancel_a_batch(tiny_llava_stack, images):
    client = OpenAI(base_url=f"{tiny_llava_stack.base_url}/v1", api_key="unused")
    batch = upload_batch(tiny_llava_stack, jsonl(questions(40)), image_folder="images", temperature=0,
                         max_new_tokens=64)
    cancelled = client.batches.cancel(batch["id"])
    assert cancelled.status in ("cancelling", "cancelled")
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None
    counts = done["request_counts"]
    assert counts["total"] == 40 and counts["completed"] + counts["failed"] == 40 and counts["failed"] > 20
    errors = download(tiny_llava_stack, batch["id"], "errors")
    assert len(errors) == counts["failed"] and {error["status"] for error in errors} == {"cancelled"}
    assert len(download(tiny_llava_stack, batch["id"], "output")) == counts["completed"]
    again = requests.post(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=10)
    assert again.status_code == 409, again.text


def test_two_batches_of_one_key_read_at_once_keep_within_its_quota():
    # The same race for an API key's quota (MAX_QUEUED_JOBS_PER_KEY): 4000 places, two 3000-line batches of the key.
    from api.auth import key_digest
    from conftest import run_stack
    from shared.redis_server import RedisServer

    key = "batch-key-1"
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(key)]), "LLAVA_QUEUE_MAX_QUEUED_JOBS": "0",
           "LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY": "4000"}
    content = jsonl(questions(3000, image=False))
    with (RedisServer() as server,
          run_stack(server.url, env, workers=(), log_prefix="llava-queue-batch-quota-") as stack):
        responses = []
        posts = [threading.Thread(target=lambda: responses.append(requests.post(
            f"{stack.base_url}/v1/batches", files={"file": ("q.jsonl", content)},
            headers={"Authorization": f"Bearer {key}"}, timeout=120))) for _ in range(2)]
        for post in posts:
            post.start()
        for post in posts:
            post.join(120)
        assert sorted(response.status_code for response in responses) == [200, 429], [r.text for r in responses]
        refused = next(r for r in responses if r.status_code == 429).json()["error"]["message"]
        assert "its quota is 4000" in refused, refused


def validating_batch(stack, since: float, timeout: float = 60) -> dict:
    """The first batch created after `since` seen while its file is still being read (`validating`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for batch in requests.get(f"{stack.base_url}/v1/batches?limit=10", timeout=10).json()["data"]:
            if batch["status"] == "validating" and batch["created_at"] >= int(since):
                return batch
        time.sleep(0.01)
    raise AssertionError(f"no batch was seen validating\n{stack.logs()}")


def test_a_batch_can_be_cancelled_while_its_file_is_read(tiny_llava_stack):
    # As OpenAI's Batch API does: a batch still `validating` can be cancelled (it was a 409 until the whole file
    # was queued). Reading stops at the next chunk; the lines read so far end cancelled (or answered).
    since = time.time()
    created = {}
    upload = threading.Thread(target=lambda: created.update(response=requests.post(
        f"{tiny_llava_stack.base_url}/v1/batches", files={"file": ("q.jsonl", jsonl(questions(4000, image=False)))},
        data={"temperature": "0", "max_new_tokens": "2"}, timeout=120)))
    upload.start()
    try:
        batch = validating_batch(tiny_llava_stack, since)
        cancel = requests.post(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=30)
    finally:
        upload.join(120)
    assert cancel.status_code == 200, cancel.text
    # "cancelled" already when every line read by then ended within the cancel itself.
    assert cancel.json()["status"] in ("cancelling", "cancelled"), cancel.text
    assert created["response"].status_code == 200, created["response"].text
    assert created["response"].json()["status"] in ("cancelling", "cancelled")
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["status"] == "cancelled" and done["cancelled_at"] is not None, done
    counts = done["request_counts"]
    assert 0 < counts["total"] < 4000 and counts["completed"] + counts["failed"] == counts["total"], counts
    lines = requests.get(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/lines?limit=1000",
                         timeout=10).json()["data"]
    assert not [line for line in lines if line["status"] in ("queued", "running")]
    errors = download(tiny_llava_stack, batch["id"], "errors")
    assert len(errors) == counts["failed"] and {error["status"] for error in errors} == {"cancelled"}


def test_two_batches_read_at_once_keep_within_the_queue_limit():
    # Room for 4000 queued jobs and no worker: two 3000-line batches posted together must not both be admitted (each
    # was checked against the queue before the other had queued its lines: 6000 jobs queued).
    from conftest import run_stack
    from shared.redis_server import RedisServer

    content = jsonl(questions(3000, image=False))
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_MAX_QUEUED_JOBS": "4000"}, workers=(),
                                            log_prefix="llava-queue-batch-limit-") as stack:
        responses = []
        posts = [threading.Thread(target=lambda: responses.append(requests.post(
            f"{stack.base_url}/v1/batches", files={"file": ("q.jsonl", content)}, timeout=120))) for _ in range(2)]
        for post in posts:
            post.start()
        for post in posts:
            post.join(120)
        assert sorted(response.status_code for response in responses) == [200, 429], [r.text for r in responses]
        assert "the queue is full" in next(r for r in responses if r.status_code == 429).json()["error"]["message"]
        queued = requests.get(f"{stack.base_url}/metrics", timeout=10).text
        assert 'llava_queue_jobs{state="queued"} 3000.0' in queued, queued
        # Once the first batch's lines are gone, the second one fits.
        [accepted] = [response.json() for response in responses if response.status_code == 200]
        requests.post(f"{stack.base_url}/v1/batches/{accepted['id']}/cancel", timeout=60)
        assert wait_for_batch(stack, accepted["id"])["status"] == "cancelled"
        again = requests.post(f"{stack.base_url}/v1/batches", files={"file": ("q.jsonl", content)}, timeout=120)
        assert again.status_code == 200, again.text


def peak_memory_kib(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_a_line_longer_than_a_request_fails_alone_without_being_read_whole(tmp_path):
    # A server file can hold a line no request could (LLaVA's training set is one JSON array on one line, beside the
    # images under a data root): it was read into the API's memory whole, twice (counted, then parsed). A line
    # longer than MAX_BODY_BYTES fails alone, read no further than that.
    from conftest import run_stack
    from shared.redis_server import RedisServer

    good = questions(2, image=False)
    huge = json.dumps({"question_id": 1, "text": "x" * (48 << 20)})
    (tmp_path / "huge.jsonl").write_text(json.dumps(good[0]) + "\n" + huge + "\n" + json.dumps(good[1]) + "\n")
    env = {"LLAVA_QUEUE_MAX_BODY_BYTES": str(1 << 20), "LLAVA_QUEUE_DATA_ROOTS": str(tmp_path)}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-batch-huge-") as stack:
        before = peak_memory_kib(stack.processes["api"].pid)
        response = requests.post(f"{stack.base_url}/v1/batches", json={"input_path": "huge.jsonl"}, timeout=120)
        grown_mib = (peak_memory_kib(stack.processes["api"].pid) - before) / 1024
        assert response.status_code == 200, response.text
        assert grown_mib < 24, grown_mib
        batch = response.json()
        assert batch["request_counts"]["total"] == 3, batch
        [error] = batch["errors"]["data"]
        assert error["line"] == 2 and "longer than 1048576 bytes" in error["message"], error
        requests.post(f"{stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=30)


def test_lines_past_the_completion_window_expire(tiny_llava_stack, images):
    batch = upload_batch(tiny_llava_stack, jsonl(questions(200, image=False)), temperature=0, max_new_tokens=64,
                         completion_window="1s")
    time.sleep(1.2)
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["status"] == "expired" and done["expired_at"] is not None
    listed = requests.get(f"{tiny_llava_stack.base_url}/v1/batches?limit=100", timeout=10).json()["data"]
    assert [batch["status"] for batch in listed if batch["id"] == done["id"]] == ["expired"]
    errors = download(tiny_llava_stack, batch["id"], "errors")
    assert errors and {error["status"] for error in errors} == {"expired"}
    assert len(errors) + len(download(tiny_llava_stack, batch["id"], "output")) == 200


@pytest.mark.parametrize(("field", "value", "status"), [
    ("input_path", "../questions.jsonl", 403),
    ("input_path", "/etc/passwd", 403),
    ("input_path", "link-to-outside.jsonl", 403),
    ("input_path", "no-such-file.jsonl", 404),
    ("input_path", "x" * 300, 403),
    ("input_path", "/" + "x" * 300, 403),
    ("image_folder", "/tmp", 403),
    ("image_folder", "images/../..", 403),
])
def test_server_paths_outside_the_data_roots_are_refused(tiny_llava_stack, data_root, tmp_path, field, value,
                                                         status):
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(jsonl(questions(1)))
    if not (data_root / "link-to-outside.jsonl").exists():
        (data_root / "link-to-outside.jsonl").symlink_to(outside)
    (data_root / "ok.jsonl").write_bytes(jsonl(questions(1)))
    body = {"input_path": "ok.jsonl", field: value}
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/batches", json=body, timeout=10)
    assert response.status_code == status, response.text
    assert field in response.json()["error"]["message"]


def test_without_data_roots_paths_are_refused_and_uploads_work(tiny_llava_stack):
    from api.main import create_app
    from shared.settings import Settings

    settings = Settings(redis_url=tiny_llava_stack.redis_url, data_roots=[])
    with TestClient(create_app(settings)) as client:
        refused = client.post("/v1/batches", json={"input_path": "questions.jsonl"})
        assert refused.status_code == 403
        assert "no LLAVA_QUEUE_DATA_ROOTS configured" in refused.json()["error"]["message"]
        accepted = client.post("/v1/batches", files={"file": ("q.jsonl", jsonl(questions(2, image=False)))},
                               data={"temperature": "0", "max_new_tokens": "2"})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["request_counts"]["total"] == 2
        empty = client.post("/v1/batches", files={"file": ("q.jsonl", b"\n\n")})
        assert empty.status_code == 200 and empty.json()["status"] == "failed"
        assert empty.json()["errors"]["data"][0]["code"] == "empty_file"
        refused = client.post("/v1/batches", files={"file": ("q.jsonl", jsonl(questions(1)))},
                              data={"num_beams": "4"})
        assert refused.status_code == 400 and "num_beams=4 is not supported" in refused.text


def test_the_data_root_rules(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jsonl").write_text("{}\n")
    (tmp_path / "secret").write_text("no")
    os.symlink(tmp_path / "secret", root / "sub" / "link")
    assert resolve_data_path("sub/a.jsonl", [root]) == (root / "sub" / "a.jsonl").resolve()
    assert resolve_data_path(str(root / "sub" / "a.jsonl"), [root]) == (root / "sub" / "a.jsonl").resolve()
    assert resolve_in_folder(root / "sub", "a.jsonl", [root]) == (root / "sub" / "a.jsonl").resolve()
    for path in ("../secret", "sub/../../secret", str(tmp_path / "secret"), "sub/link"):
        with pytest.raises(PathRefused):
            resolve_data_path(path, [root])
    for name in ("link", "../a.jsonl", "/etc/passwd"):
        with pytest.raises(PathRefused):
            resolve_in_folder(root / "sub", name, [root])
    with pytest.raises(PathRefused, match="no LLAVA_QUEUE_DATA_ROOTS"):
        resolve_data_path("sub/a.jsonl", [])
    os.symlink("loop", root / "sub" / "loop")  # pathlib raises RuntimeError on a loop, not OSError
    with pytest.raises(PathRefused, match="a loop of symbolic links"):
        resolve_data_path("sub/loop", [root])
    with pytest.raises(PathRefused, match="a loop of symbolic links"):
        resolve_in_folder(root / "sub", "loop", [root])


def test_interactive_jobs_start_before_a_queued_batch_backlog(tiny_llava_stack):
    batch = upload_batch(tiny_llava_stack, jsonl(questions(40, image=False)), temperature=0, max_new_tokens=48)
    lines_url = f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/lines"
    # Every engine slot (8; the shared stack keeps none for interactive jobs) holds a batch job, the
    # rest of the batch waits in the queue.
    deadline = time.monotonic() + 60
    while sum(line["status"] == "running" for line in requests.get(lines_url, timeout=10).json()["data"]) < 8:
        assert time.monotonic() < deadline, "the batch never filled the engine's 8 slots"
        time.sleep(0.01)
    submitted = time.time()
    interactive = run_interactive(tiny_llava_stack, {"prompt": "USER: Hello? ASSISTANT:", "temperature": 0,
                                                     "max_new_tokens": 4})
    assert interactive["status"] == "succeeded"
    requests.post(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/cancel", timeout=10)
    wait_for_batch(tiny_llava_stack, batch["id"])
    lines = requests.get(lines_url, timeout=10).json()["data"]
    started = [line["started_at"] for line in lines if line["started_at"]]
    # The batch jobs still queued when the interactive one came start after it: at the latest in the
    # same engine step (the task threads that a finished step frees start their jobs in any order).
    overtaking = [at - interactive["started_at"] for at in started
                  if submitted < at < interactive["started_at"] - ONE_STEP]
    assert not overtaking, (overtaking, interactive)
    # And there was a backlog to overtake: lines that had not started when the interactive job did.
    assert sum(1 for line in lines if not line["started_at"] or line["started_at"] > interactive["started_at"]) >= 10


@pytest.fixture(scope="module")
def reserved_stack(tiny_llava_dir):
    """A tiny LLaVA worker with 4 slots that keeps 2 of them for interactive jobs."""
    from conftest import run_stack
    from shared.redis_server import RedisServer

    with RedisServer() as server:
        env = {"LLAVA_QUEUE_MODEL_PATH": str(tiny_llava_dir), "LLAVA_QUEUE_DEVICE": "cpu",
               "LLAVA_QUEUE_DTYPE": "float32", "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
               "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "2"}
        with run_stack(server.url, env, log_prefix="llava-queue-reserved-logs-") as running:
            yield running


def test_reserved_slots_keep_room_for_interactive_jobs(reserved_stack):
    batch = upload_batch(reserved_stack, jsonl(questions(16, image=False)), temperature=0, max_new_tokens=24)
    lines_url = f"{reserved_stack.base_url}/v1/batches/{batch['id']}/lines"
    peak, interactive, queued_then = 0, None, 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = requests.get(lines_url, timeout=10).json()["data"]
        running = sum(line["status"] == "running" for line in lines)
        peak = max(peak, running)
        if interactive is None and running == 2:
            queued_then = sum(line["status"] == "queued" for line in lines)
            interactive = submit(reserved_stack, prompt="USER: Hello? ASSISTANT:", temperature=0, max_new_tokens=4)
        if all(line["status"] not in ("queued", "running") for line in lines):
            break
        time.sleep(0.02)
    # Two batch jobs at a time; the other two slots stay free, so the interactive job starts at once.
    assert peak == 2, peak
    assert interactive is not None and queued_then >= 8
    job = wait_until(reserved_stack, interactive, timeout=60)
    assert job["status"] == "succeeded" and job["started_at"] - job["created_at"] < ONE_STEP, job
    # And the batch queue is read again as batch jobs end: the whole batch runs.
    done = wait_for_batch(reserved_stack, batch["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 16


def test_a_batch_whose_reader_died_fails(tiny_llava_stack):
    from shared.batches import BatchStore, new_batch_id
    from shared.jobs import JobStore

    batches = BatchStore(JobStore.from_url(tiny_llava_stack.redis_url), 3600)
    batch_id = new_batch_id()
    batches.create(batch_id, {"params": {}})
    # As an API process that died two minutes ago in the middle of the file leaves it: no lease renewed.
    batches.redis.hset(batches.key(batch_id), "created_at", repr(time.time() - 120))
    batches.redis.delete(batches.reader_key(batch_id))
    # The list shows it as GET /v1/batches/{id} does (it showed `validating` for ever).
    listed = requests.get(f"{tiny_llava_stack.base_url}/v1/batches?limit=100", timeout=10).json()["data"]
    [batch] = [batch for batch in listed if batch["id"] == batch_id]
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "abandoned", batch
    batch = requests.get(f"{tiny_llava_stack.base_url}/v1/batches/{batch_id}", timeout=10).json()
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "abandoned", batch


def test_a_batch_fails_only_while_it_is_read_and_then_its_queued_lines_are_cancelled(tiny_llava_stack):
    # A reader that fails part-way (the queue away) or is thought dead leaves jobs queued for lines read so far: they
    # do not make the batch (its caller submits the file again), so they go. A batch a slow reader has activated
    # meanwhile is not failed (its jobs were cancelled under it).
    from shared.batches import BatchStore, new_batch_id
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest

    store = JobStore.from_url(tiny_llava_stack.redis_url)
    batches = BatchStore(store, 3600)
    error = {"code": "unavailable", "message": "test", "param": None, "line": 3}
    for activate_first in (False, True):
        batch_id = new_batch_id()
        batches.create(batch_id, {"params": {}})
        # Records only, never sent to a worker: they stay queued until cancelled.
        ids = store.create_many([GenerateRequest(prompt="hi")] * 2, "batch",
                                extra=[{"batch": batch_id, "batch_line": line} for line in range(2)])
        batches.add_lines(batch_id, [{"line": line + 1, "job": job_id} for line, job_id in enumerate(ids)])
        if activate_first:
            batches.activate(batch_id, 2, 0)
        assert batches.fail(batch_id, error) is not activate_first
        assert batches.get(batch_id)["status"] == ("in_progress" if activate_first else "failed")
        assert [store.get(job_id)["status"] for job_id in ids] == ["queued" if activate_first else "cancelled"] * 2
        for job_id in ids:
            store.cancel(job_id)


def test_a_line_whose_text_is_not_unicode_fails_alone(tiny_llava_stack):
    # JSON's "\ud800" escape parses into a lone surrogate, which no job record can hold (it was a 500 for the file).
    body = {"model": "llava-v1.5-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    good = json.dumps({"custom_id": "good", "method": "POST", "url": "/v1/chat/completions", "body": body})
    bad = good.replace('"good"', '"bad"').replace('"max_tokens"', '"stop": "\\ud800", "max_tokens"')
    batch = upload_batch(tiny_llava_stack, f"{good}\n{bad}\n".encode())
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}, done
    [error] = download(tiny_llava_stack, batch["id"], "errors")
    assert error["custom_id"] == "bad" and "not valid Unicode" in error["response"]["body"]["error"]["message"], error


def test_a_completion_window_longer_than_a_batch_is_kept_is_refused(tiny_llava_stack):
    # A batch is kept BATCH_TTL_SECONDS (30 days here): with a longer window it would vanish while its lines wait.
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/batches", timeout=30,
                             data={"completion_window": "31d", "max_new_tokens": "2"},
                             files={"file": ("q.jsonl", jsonl(questions(1, image=False)))})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "completion_window"
    assert "BATCH_TTL_SECONDS" in response.json()["error"]["message"]


def test_metadata_is_held_to_openais_limits(tiny_llava_stack):
    for metadata in ({str(key): "v" for key in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        response = requests.post(f"{tiny_llava_stack.base_url}/v1/batches", timeout=10,
                                 json={"input_file_id": "file-none", "metadata": metadata})
        assert response.status_code == 400 and response.json()["error"]["param"].startswith("metadata"), response.text


def test_a_line_nested_too_deep_fails_alone(tiny_llava_stack):
    deep = '{"question_id": 1, "text": "Where?", "category": ' + "[" * 5000 + "]" * 5000 + "}"
    batch = upload_batch(tiny_llava_stack, jsonl([questions(1, image=False)[0], deep]), temperature=0,
                         max_new_tokens=2)
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["status"] == "completed" and done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    [error] = download(tiny_llava_stack, batch["id"], "errors")
    assert error["line"] == 2 and "not valid JSON" in error["error"], error


def test_errors_name_the_file_line_blank_lines_included(tiny_llava_stack):
    good = questions(2, image=False)
    content = b"\n" + jsonl([good[0]]) + b"\n\n" + jsonl(['{"question_id": 7, "text": ', good[1], "[1]"])
    batch = upload_batch(tiny_llava_stack, content, temperature=0, max_new_tokens=2)
    assert [error["line"] for error in batch["errors"]["data"]] == [5, 7]
    assert "line 5 is not valid JSON" in batch["errors"]["data"][0]["message"]
    wait_for_batch(tiny_llava_stack, batch["id"])
    assert [error["line"] for error in download(tiny_llava_stack, batch["id"], "errors")] == [5, 7]
    lines = requests.get(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}/lines", timeout=10).json()["data"]
    assert [line["line"] for line in lines] == [2, 5, 6, 7]

    openai_line = {"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "llava-v1.5-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}}
    batch = upload_batch(tiny_llava_stack, jsonl([openai_line]) + b"\n" + jsonl(["{"]))
    wait_for_batch(tiny_llava_stack, batch["id"])
    [error] = download(tiny_llava_stack, batch["id"], "errors")
    assert error["error"]["code"] == "invalid_line" and error["error"]["line"] == 3, error


def test_an_openai_file_whose_first_line_lacks_its_custom_id_is_still_read_as_openai(tiny_llava_stack):
    # The format was told by `custom_id` in the first line alone: a first line missing it (a typo) made the whole
    # OpenAI file a question file, every line failing with "question_id: field required".
    body = {"model": "llava-v1.5-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    lines = [{"customid": "first", "method": "POST", "url": "/v1/chat/completions", "body": body},
             {"custom_id": "second", "method": "POST", "url": "/v1/chat/completions", "body": body}]
    batch = upload_batch(tiny_llava_stack, jsonl(lines), endpoint="/v1/chat/completions")
    assert batch["format"] == "openai", batch
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}, done
    assert [line["custom_id"] for line in download(tiny_llava_stack, batch["id"], "output")] == ["second"]
    [error] = download(tiny_llava_stack, batch["id"], "errors")
    assert error["custom_id"] is None and error["error"]["code"] == "invalid_line", error
    assert "custom_id" in error["error"]["message"], error


def test_a_refused_openai_line_has_the_error_body_of_the_call(tiny_llava_stack):
    body = {"model": "llava-v1.5-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    refused = [{**body, "model": "gpt-4o"}, {**body, "n": 2}]
    lines = [{"custom_id": f"line-{index}", "method": "POST", "url": "/v1/chat/completions", "body": line_body}
             for index, line_body in enumerate([body, *refused])]
    batch = upload_batch(tiny_llava_stack, jsonl(lines))
    wait_for_batch(tiny_llava_stack, batch["id"])
    errors = download(tiny_llava_stack, batch["id"], "errors")
    assert [error["custom_id"] for error in errors] == ["line-1", "line-2"]
    for error, line_body in zip(errors, refused):
        direct = requests.post(f"{tiny_llava_stack.base_url}/v1/chat/completions", json=line_body, timeout=30)
        assert error["response"]["status_code"] == direct.status_code
        assert error["response"]["body"] == direct.json()


def test_a_symbolic_link_loop_is_refused_not_a_crash(tiny_llava_stack, data_root):
    loops = data_root / "loops"
    loops.mkdir(exist_ok=True)
    for name in ("loop.png", "loop.jsonl"):
        if not (loops / name).is_symlink():
            (loops / name).symlink_to(name)
    response = requests.post(f"{tiny_llava_stack.base_url}/v1/batches", timeout=10,
                             json={"input_path": "loops/loop.jsonl"})
    assert response.status_code == 403, response.text
    assert response.json()["error"]["message"].startswith("input_path: 'loops/loop.jsonl' cannot be used as a path (a "
                                                          "loop of symbolic links)"), response.text
    lines = [{"question_id": 0, "text": "Where?", "image": "loop.png"}, *questions(1, start=1, image=False)]
    batch = upload_batch(tiny_llava_stack, jsonl(lines), image_folder="loops", temperature=0, max_new_tokens=2)
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}, done
    [error] = download(tiny_llava_stack, batch["id"], "errors")
    assert error["question_id"] == 0 and "'loop.png' cannot be used as a path (a loop" in error["error"], error


def test_a_line_too_long_for_the_context_counts_as_failed(tiny_llava_stack):
    # The worker ends such a job `succeeded` with the original's overflow text (what /worker_generate_stream sends);
    # in a batch it is a failed line, in the errors file, as `llava-queue eval` and the chat call take it.
    body = {"model": "llava-v1.5-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    too_long = {**body, "messages": [{"role": "user", "content": "hello " * 1000}]}
    direct = requests.post(f"{tiny_llava_stack.base_url}/v1/chat/completions", json=too_long, timeout=60)
    assert direct.status_code == 400, direct.text
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/chat/completions", "body": line_body}
             for name, line_body in (("short", body), ("long", too_long))]
    batch = upload_batch(tiny_llava_stack, jsonl(lines))
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    errors = download(tiny_llava_stack, batch["id"], "errors")
    assert [error["custom_id"] for error in errors] == ["long"]
    assert [line["custom_id"] for line in download(tiny_llava_stack, batch["id"], "output")] == ["short"]
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}, done
    assert done["error_file_id"] is not None
    # A question file's line too: an error line, not the overflow text as an answer.
    batch = upload_batch(tiny_llava_stack, jsonl([{"question_id": 0, "text": "Where?"},
                                                 {"question_id": 1, "text": "hello " * 1000}]))
    done = wait_for_batch(tiny_llava_stack, batch["id"])
    assert [answer["question_id"] for answer in download(tiny_llava_stack, batch["id"], "output")] == [0]
    [error] = download(tiny_llava_stack, batch["id"], "errors")
    assert error["question_id"] == 1 and error["status"] == "failed" and "context" in error["error"], error
    assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}, done


def test_files_are_listed_as_openai_lists_them_each_key_its_own():
    # GET /v1/files: OpenAI's list (`data`, `first_id`, `last_id`, `has_more`), newest first unless order=asc, paged
    # with limit/after, filtered by purpose; the openai package's files.list pages through it.
    from api.auth import key_digest
    from conftest import run_stack
    from shared.redis_server import RedisServer

    keys = ["files-key-1", "files-key-2"]
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(key) for key in keys])}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-files-") as stack:
        client, other = (OpenAI(base_url=f"{stack.base_url}/v1", api_key=key) for key in keys)
        uploaded = []
        for index in range(3):
            uploaded.append(client.files.create(file=(f"f{index}.jsonl", jsonl(questions(1))), purpose="batch").id)
            time.sleep(0.01)
        theirs = other.files.create(file=("theirs.jsonl", jsonl(questions(1))), purpose="batch").id
        page = requests.get(f"{stack.base_url}/v1/files?limit=2", headers={"Authorization": f"Bearer {keys[0]}"},
                            timeout=10).json()
        assert page["object"] == "list" and page["has_more"] is True, page
        assert [file["id"] for file in page["data"]] == uploaded[::-1][:2] and page["last_id"] == uploaded[1]
        assert page["data"][0]["purpose"] == "batch" and page["data"][0]["filename"] == "f2.jsonl"
        assert [file.id for file in client.files.list(limit=1)] == uploaded[::-1]  # every page, one file each
        assert [file.id for file in client.files.list(order="asc", after=uploaded[0])] == uploaded[1:]
        assert [file.id for file in client.files.list(purpose="batch_output")] == []
        assert [file.id for file in other.files.list()] == [theirs]
        client.files.delete(uploaded[1])
        assert [file.id for file in client.files.list()] == [uploaded[2], uploaded[0]]
        bad = requests.get(f"{stack.base_url}/v1/files?order=sideways", headers={"Authorization": f"Bearer {keys[0]}"},
                           timeout=10)
        assert bad.status_code == 400, bad.text


def test_a_batchs_output_and_error_files_can_be_listed_and_deleted(tiny_llava_stack, images):
    # As OpenAI's: a finished batch's files are listed (purpose "batch_output") and can be deleted; the batch still
    # names them, and they are gone (404), their answers with them.
    client = OpenAI(base_url=f"{tiny_llava_stack.base_url}/v1", api_key="unused")
    batch = wait_for_batch(tiny_llava_stack, upload_batch(tiny_llava_stack, jsonl(questions(2) + ["not json"]),
                                                          image_folder="images", temperature=0,
                                                          max_new_tokens=2)["id"])
    output_id, error_id = batch["output_file_id"], batch["error_file_id"]
    assert output_id and error_id, batch
    listed = {file.id: file for file in client.files.list(purpose="batch_output")}
    assert {output_id, error_id} <= listed.keys()
    assert listed[output_id].bytes == len(client.files.content(output_id).content) > 0
    deleted = client.files.delete(output_id)
    assert deleted.deleted is True and deleted.id == output_id
    for path in (f"files/{output_id}", f"files/{output_id}/content", f"batches/{batch['id']}/output"):
        response = requests.get(f"{tiny_llava_stack.base_url}/v1/{path}", timeout=10)
        assert response.status_code == 404, (path, response.text)
    assert requests.delete(f"{tiny_llava_stack.base_url}/v1/files/{output_id}", timeout=10).status_code == 404
    after = requests.get(f"{tiny_llava_stack.base_url}/v1/batches/{batch['id']}", timeout=10).json()
    assert after["output_file_id"] == output_id and after["request_counts"] == batch["request_counts"]
    assert len(client.files.content(error_id).text.splitlines()) == 1  # the other file is untouched
    client.files.delete(error_id)
    assert requests.get(f"{tiny_llava_stack.base_url}/v1/files/{error_id}/content", timeout=10).status_code == 404
    assert not {output_id, error_id} & {file.id for file in client.files.list(purpose="batch_output")}


def test_cancelling_a_batch_takes_a_bounded_number_of_round_trips():
    # Cancelling a batch of thousands of lines took one or two round trips per line (seconds for 50,000); in chunks
    # it takes a few per thousand lines, with the same outcome: queued lines cancelled, running ones asked to stop.
    import redis as redis_lib

    from shared.batches import BatchStore, new_batch_id
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest
    from shared.redis_server import RedisServer

    class Counting(redis_lib.Connection):
        """Counts the requests the client sends (a pipeline is one): Redis round trips."""

        sent = 0

        def send_packed_command(self, *args, **kwargs):
            Counting.sent += 1
            return super().send_packed_command(*args, **kwargs)

    lines = 3000
    with RedisServer() as server:
        pool = redis_lib.ConnectionPool.from_url(server.url, decode_responses=True, connection_class=Counting)
        store = JobStore(redis_lib.Redis(connection_pool=pool))
        batches = BatchStore(store, 3600)
        batch_id = new_batch_id()
        batches.create(batch_id, {"params": {}})
        ids = store.create_many([GenerateRequest(prompt="hi")] * lines, "batch",
                                extra=[{"batch": batch_id, "batch_line": line} for line in range(lines)])
        batches.add_lines(batch_id, [{"line": line + 1, "job": job_id} for line, job_id in enumerate(ids)])
        batches.activate(batch_id, lines, 0)
        assert store.start(ids[0], "worker-1") == "running"
        assert batches.request_cancel(batch_id) == "cancelling"
        before = Counting.sent
        batches.cancel_jobs(batch_id)
        round_trips = Counting.sent - before
        assert round_trips <= 4 * (lines // 1000 + 1), round_trips
        running = store.get(ids[0])
        assert running["status"] == "running" and running["cancel_requested"] == "1", running
        assert {store.get(job_id)["status"] for job_id in ids[1:]} == {"cancelled"}
        record = batches.get(batch_id)
        assert (record["status"], record["cancelled"], record["ended"]) == ("cancelling", lines - 1, lines - 1)
        store.finish(ids[0], "cancelled", error="cancelled", finish_reason="cancelled")
        assert batches.get(batch_id)["status"] == "cancelled"


def test_lines_queued_before_redis_went_away_while_the_file_was_read_do_not_run(tiny_llava_dir, tmp_path):
    # Redis away in the middle of POST /v1/batches: the batch cannot be read to its end (503), and the lines read
    # before are not a batch the user has; they used to be sent to the workers at once, and ran once Redis was back.
    import redis as redis_lib

    from conftest import run_stack
    from shared.redis_server import RedisServer

    servers = [RedisServer(data_dir=tmp_path).start()]
    port = servers[0].port
    env = {"LLAVA_QUEUE_MODEL_PATH": str(tiny_llava_dir), "LLAVA_QUEUE_DEVICE": "cpu", "LLAVA_QUEUE_DTYPE": "float32",
           "LLAVA_QUEUE_MAX_NUM_SEQS": "8", "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "0", "LLAVA_QUEUE_MAX_QUEUED_JOBS": "0"}
    try:
        with run_stack(servers[0].url, env, log_prefix="llava-queue-batch-outage-") as stack:
            client = redis_lib.Redis.from_url(stack.redis_url, decode_responses=True)
            created = {}
            post = threading.Thread(target=lambda: created.update(response=requests.post(
                f"{stack.base_url}/v1/batches", files={"file": ("q.jsonl", jsonl(questions(50_000, image=False)))},
                data={"temperature": "0", "max_new_tokens": "1"}, timeout=120)))
            post.start()
            deadline = time.monotonic() + 60
            lines_key = None
            while lines_key is None and time.monotonic() < deadline:
                lines_key = next((key for key in client.scan_iter("llq:batch:*:lines") if client.llen(key)), None)
                time.sleep(0.005)
            assert lines_key, (created.get("response") is not None and created["response"].text, stack.logs())
            client.close()
            servers[0].stop()
            post.join(120)
            assert created["response"].status_code == 503, created["response"].text
            servers.append(RedisServer(port=port, data_dir=tmp_path).start())
            client = redis_lib.Redis.from_url(stack.redis_url, decode_responses=True)
            time.sleep(10)  # time for the worker to be back and run what it was sent
            jobs = [json.loads(entry).get("job") for entry in client.lrange(lines_key, 0, -1)]
            statuses = {client.hget(f"llq:job:{job_id}", "status") for job_id in jobs if job_id}
            assert jobs and not statuses & {"running", "succeeded"}, statuses
            client.close()
    finally:
        for server in servers:
            server.stop()


def upload_file(client, name: str, headers: dict | None = None) -> str:
    response = client.post("/v1/files", files={"file": (name, jsonl(questions(1)))}, data={"purpose": "batch"},
                           headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def listed_files(client, query: str = "", headers: dict | None = None) -> list[str]:
    response = client.get(f"/v1/files?{query}", headers=headers or {})
    assert response.status_code == 200, response.text
    return [file["id"] for file in response.json()["data"]]


def test_files_uploaded_before_the_file_list_existed_are_listed():
    # Uploads kept by a version without GET /v1/files have no entry in the index the list reads: none was listed.
    import redis as redis_lib

    from api.auth import key_digest
    from api.main import create_app
    from shared.redis_server import RedisServer
    from shared.settings import Settings

    keys = ["old-files-key-1", "old-files-key-2"]
    mine, theirs = ({"Authorization": f"Bearer {key}"} for key in keys)
    with RedisServer() as server, TestClient(create_app(Settings(
            redis_url=server.url, api_key_hashes=[key_digest(key) for key in keys]))) as client:
        ids = [upload_file(client, f"f{index}.jsonl", mine) for index in range(2)]
        other = upload_file(client, "theirs.jsonl", theirs)
        raw = redis_lib.Redis.from_url(server.url)
        raw.delete(*raw.keys("llq:files*"))  # as the earlier version left its uploads: in no index
        assert listed_files(client, headers=mine) == ids[::-1]
        assert listed_files(client, headers=theirs) == [other]


def test_the_file_list_goes_on_after_a_file_deleted_or_expired_since_it_was_listed():
    # A page's `after` naming a file that has gone since started the list again from its first file: a client paging
    # through saw files twice (and could loop).
    import redis as redis_lib

    from api.main import create_app
    from shared.redis_server import RedisServer
    from shared.settings import Settings

    with RedisServer() as server, TestClient(create_app(Settings(redis_url=server.url,
                                                                 batch_ttl_seconds=5))) as client:
        ids = [upload_file(client, f"f{index}.jsonl") for index in range(4)]
        assert listed_files(client, "limit=2") == [ids[3], ids[2]]
        assert client.delete(f"/v1/files/{ids[2]}").status_code == 200
        assert listed_files(client, f"after={ids[2]}") == [ids[1], ids[0]]
        redis_lib.Redis.from_url(server.url).delete(f"llq:file:{ids[1]}")  # as its TTL makes it
        assert listed_files(client, f"after={ids[1]}") == [ids[0]]
        assert listed_files(client, f"order=asc&after={ids[1]}") == [ids[3]]
        # Past the TTL the files have left the index as well: one it no longer holds is older than every file listed.
        time.sleep(5.2)
        new = upload_file(client, "new.jsonl")
        assert listed_files(client, f"after={ids[3]}") == []
        assert listed_files(client, f"order=asc&after={ids[3]}") == [new]


def test_deleting_a_batch_file_deletes_its_lines_job_records(tiny_llava_stack):
    # The answers of a deleted output file stayed readable at GET /v1/jobs/{id} of the batch's jobs (for
    # JOB_TTL_SECONDS); as on OpenAI, deleting the file deletes its content. The same for the errors file.
    base = tiny_llava_stack.base_url
    content = jsonl([*questions(1, image=False), {"question_id": 1, "text": "hello " * 1000}])
    batch = wait_for_batch(tiny_llava_stack, upload_batch(tiny_llava_stack, content, temperature=0,
                                                          max_new_tokens=2)["id"])
    answered, overflowed = [line["job_id"] for line in
                            requests.get(f"{base}/v1/batches/{batch['id']}/lines", timeout=10).json()["data"]]
    assert requests.get(f"{base}/v1/jobs/{answered}", timeout=10).json()["text"]
    assert requests.delete(f"{base}/v1/files/{batch['output_file_id']}", timeout=10).status_code == 200
    assert requests.get(f"{base}/v1/jobs/{answered}", timeout=10).status_code == 404
    assert requests.get(f"{base}/v1/jobs/{overflowed}", timeout=10).status_code == 200
    assert requests.delete(f"{base}/v1/files/{batch['error_file_id']}", timeout=10).status_code == 200
    assert requests.get(f"{base}/v1/jobs/{overflowed}", timeout=10).status_code == 404


def test_the_batch_list_goes_on_after_a_batch_expired_since_it_was_listed():
    # A page's `after` naming a batch that had expired since (and left the index) started the list again from the
    # newest batch: a client paging through saw batches twice.
    import redis as redis_lib

    from api.main import create_app
    from shared.redis_server import RedisServer
    from shared.settings import Settings

    with RedisServer() as server, TestClient(create_app(Settings(redis_url=server.url))) as client:
        ids = [client.post("/v1/batches", files={"file": ("q.jsonl", jsonl(questions(1, image=False)))}).json()["id"]
               for _ in range(3)]
        page = client.get("/v1/batches?limit=2").json()
        assert [batch["id"] for batch in page["data"]] == [ids[2], ids[1]] and page["has_more"], page
        redis_lib.Redis.from_url(server.url).delete(*[f"llq:batch:{batch_id}" for batch_id in ids[:2]])  # their TTL
        assert [batch["id"] for batch in client.get("/v1/batches").json()["data"]] == [ids[2]]
        rest = client.get(f"/v1/batches?after={ids[1]}").json()
        assert rest["data"] == [] and rest["has_more"] is False, rest


def test_a_batch_list_page_reads_on_past_expired_batches():
    # Batches past their TTL stay in the index until a listing finds them gone: a page came short while live batches
    # followed, and said more followed when only expired ones did.
    import redis as redis_lib

    from api.main import create_app
    from shared.redis_server import RedisServer
    from shared.settings import Settings

    with RedisServer() as server, TestClient(create_app(Settings(redis_url=server.url))) as client:
        ids = [client.post("/v1/batches", files={"file": ("q.jsonl", jsonl(questions(1, image=False)))}).json()["id"]
               for _ in range(5)]
        redis = redis_lib.Redis.from_url(server.url)
        redis.delete(f"llq:batch:{ids[3]}", f"llq:batch:{ids[1]}", f"llq:batch:{ids[0]}")  # their TTL
        page = client.get("/v1/batches?limit=2").json()
        assert [batch["id"] for batch in page["data"]] == [ids[4], ids[2]] and page["has_more"] is False, page
        assert page["last_id"] == ids[2]
        redis.delete(f"llq:batch:{ids[2]}")
        page = client.get("/v1/batches?limit=1").json()
        assert [batch["id"] for batch in page["data"]] == [ids[4]] and page["has_more"] is False, page
        # An entry whose record is there but no batch of this owner's (or one that expired between the index's read
        # and the record's): a page of one came empty, saying more followed, with no last id to page on.
        stray = "batch_" + "0" * 32
        redis.hset(f"llq:batch:{stray}", "owner", "someone else")
        redis.zadd("llq:batches", {stray: redis.zscore("llq:batches", ids[4]) + 1})
        page = client.get("/v1/batches?limit=1").json()
        assert [batch["id"] for batch in page["data"]] == [ids[4]] and page["has_more"] is False, page
        assert redis.zscore("llq:batches", stray) is None  # out of the index


def test_a_batch_cancelled_and_then_failed_as_abandoned_while_read_leaves_no_job_queued():
    # Cancelled while its file was read, then failed as abandoned (its reader's lease had lapsed) while the reader went
    # on: the batch ended `cancelled` at once, and the jobs of the chunk its reader was writing stayed queued for good
    # (never sent to a worker, never ended: places in the queue and in the key's quota taken for ever).
    import io

    from api.routes.batches import BatchCreate, create, settled
    from shared.batches import BatchStore
    from shared.jobs import JobStore, WorkerRegistry
    from shared.redis_server import RedisServer
    from shared.settings import Settings

    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)

        class ReadSlowly(io.BytesIO):
            """A file whose reading is overtaken, at its 600th line (the first 500 are queued), by a cancel and then
            by a read of the batch that finds its reader's lease lapsed."""

            counted, read = False, 0

            def seek(self, *args):
                self.counted = True  # count_lines is done: the batch reads it now
                return super().seek(*args)

            def readline(self, *args):
                self.read += self.counted
                if self.read == 600:
                    [batch_id] = batches.redis.zrange(batches.index_key, 0, -1)
                    assert batches.request_cancel(batch_id) == "cancelling"
                    batches.cancel_jobs(batch_id)
                    batches.redis.delete(batches.reader_key(batch_id))
                    batches.redis.hset(batches.key(batch_id), "created_at", repr(time.time() - 120))
                    assert settled(batches, batches.get(batch_id))["status"] == "cancelled"
                return super().readline(*args)

        batch = create(BatchCreate(temperature=0, max_new_tokens=2), ReadSlowly(jsonl(questions(2000, image=False))),
                       store, batches, None, WorkerRegistry(store.redis, store.prefix), Settings(redis_url=server.url),
                       None)
        assert batch["status"] == "cancelled", batch
        assert batches.get(batch["id"])["total"] == 500
        statuses = [store.get(job_id)["status"] for job_id in batches.job_ids(batch["id"])]
        assert len(statuses) == 500 and "queued" not in statuses, {status: statuses.count(status)
                                                                     for status in set(statuses)}


def test_an_openai_batch_whose_reader_died_keeps_openai_error_lines():
    # The batch's format was written once its whole file was read: an OpenAI batch whose reader died part-way had none,
    # and its errors file (the lines read, cancelled) came in the question file's shape, without their custom_id.
    import io

    from api.routes.batches import BatchCreate, create, output_lines, settled
    from shared.batches import BatchStore
    from shared.jobs import JobStore, WorkerRegistry
    from shared.redis_server import RedisServer
    from shared.settings import Settings

    class ReaderDies(io.BytesIO):
        """A file whose reader stops at its 600th line (the first 500 are recorded), as when its API process dies."""

        counted, read = False, 0

        def seek(self, *args):
            self.counted = True
            return super().seek(*args)

        def readline(self, *args):
            self.read += self.counted
            if self.read == 600:
                raise SystemExit("the API process stops")
            return super().readline(*args)

    body = {"model": "llava-v1.5-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    lines = [{"custom_id": f"request-{index}", "method": "POST", "url": "/v1/chat/completions", "body": body}
             for index in range(1000)]
    with RedisServer() as server:
        batches = BatchStore(JobStore.from_url(server.url), 3600)
        registry = WorkerRegistry(batches.store.redis, batches.store.prefix)
        registry.announce("worker-1", {"model": "llava-v1.5-tiny"})
        with pytest.raises(SystemExit):
            create(BatchCreate(), ReaderDies(jsonl(lines)), batches.store, batches, None, registry,
                   Settings(redis_url=server.url), None)
        [batch_id] = batches.redis.zrange(batches.index_key, 0, -1)
        batches.redis.delete(batches.reader_key(batch_id))
        batches.redis.hset(batches.key(batch_id), "created_at", repr(time.time() - 120))
        record = settled(batches, batches.get(batch_id))
        assert record["status"] == "failed", record
        errors = [json.loads(line) for line in output_lines(batches, record, errors=True)]
        assert [error["custom_id"] for error in errors] == [f"request-{index}" for index in range(500)]
        assert {error["error"]["code"] for error in errors} == {"batch_cancelled"}, errors[0]


def test_a_batch_file_deletion_cut_short_by_redis_can_be_made_again():
    # The file was marked deleted before its answers were: a DELETE cut short in between (Redis away) left the answers
    # in the results and job records, and the DELETE made again was a 404 ("was deleted").
    import redis as redis_lib

    from api.routes.batches import delete_output
    from shared.redis_server import RedisServer

    with RedisServer() as server:
        store, batches, batch_id, job_id = one_line_batch(server.url)
        store.finish(job_id, "succeeded")
        record = batches.get(batch_id)
        assert record["status"] == "completed", record

        def redis_away(*args, **kwargs):
            raise redis_lib.ConnectionError("Redis went away")

        batches.redis.pipeline = redis_away
        with pytest.raises(redis_lib.ConnectionError):
            delete_output(batches, record, errors=False)
        del batches.redis.pipeline
        assert delete_output(batches, batches.get(batch_id), errors=False) is True
        assert store.get(job_id) is None and not batches.redis.exists(batches.results_key(batch_id))


def test_a_batch_failed_or_cancelled_as_abandoned_counts_every_line_it_read():
    # A batch failed as abandoned (its reader died) never had its lines counted: its request_counts showed total 0
    # while `failed` counted the lines read so far and cancelled (and the lines refused as read were in neither, though
    # the errors file holds them). As OpenAI's, total = completed + failed + the lines still to end.
    from api.routes.batches import batch_view, output_lines, settled
    from shared.batches import BatchStore, new_batch_id
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest
    from shared.redis_server import RedisServer

    refused = {"line": 3, "question_id": 2, "error": {"message": "line 3 is not valid JSON", "param": None,
                                                      "status_code": 400, "code": 400}}
    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        for cancelled_first in (False, True):
            batch_id = new_batch_id()
            batches.create(batch_id, {"params": {}})
            ids = store.create_many([GenerateRequest(prompt="hi")] * 2, "batch",
                                    extra=[{"batch": batch_id, "batch_line": line} for line in range(2)])
            batches.add_lines(batch_id, [*[{"line": line + 1, "job": job_id, "question_id": line, "prompt": "hi"}
                                           for line, job_id in enumerate(ids)], refused])
            if cancelled_first:  # cancelled while it was read, then its reader died
                assert batches.request_cancel(batch_id) == "cancelling"
                batches.cancel_jobs(batch_id)
                assert batch_view(batches, batches.get(batch_id))["request_counts"]["total"] == 3
            batches.redis.delete(batches.reader_key(batch_id))
            batches.redis.hset(batches.key(batch_id), "created_at", repr(time.time() - 120))
            record = settled(batches, batches.get(batch_id))
            view = batch_view(batches, record)
            assert view["status"] == ("cancelled" if cancelled_first else "failed"), view
            assert view["request_counts"] == {"total": 3, "completed": 0, "failed": 3}, view
            assert len(list(output_lines(batches, record, errors=True))) == 3


def test_a_batch_file_is_not_described_before_the_batch_names_it():
    # GET /v1/files/{id} described (and /content served) a batch's output and errors files while the batch object
    # named neither (output_file_id, error_file_id null): the files list and DELETE did not know them yet either. As on
    # OpenAI, a batch file exists once its batch names it; the answers so far are at GET /v1/batches/{id}/output.
    from api.main import create_app
    from shared.jobs import JobStore
    from shared.redis_server import RedisServer
    from shared.settings import Settings

    with RedisServer() as server, TestClient(create_app(Settings(redis_url=server.url))) as client:
        batch = client.post("/v1/batches", files={"file": ("q.jsonl", jsonl(questions(2, image=False)))}).json()
        batch_id = batch["id"]
        output_id, error_id = f"file-{batch_id}-output", f"file-{batch_id}-errors"
        store = JobStore.from_url(server.url)
        first = client.get(f"/v1/batches/{batch_id}/lines").json()["data"][0]["job_id"]
        store.finish(first, "succeeded")
        batch = client.get(f"/v1/batches/{batch_id}").json()
        assert batch["status"] == "in_progress" and batch["output_file_id"] is None, batch
        assert client.get(f"/v1/batches/{batch_id}/output").status_code == 200  # the answers so far
        for file_id in (output_id, error_id):
            for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
                assert client.get(path).status_code == 404, (path, client.get(path).text)
        batch = client.post(f"/v1/batches/{batch_id}/cancel").json()
        assert batch["status"] == "cancelled" and (batch["output_file_id"], batch["error_file_id"]) == (output_id,
                                                                                                       error_id)
        for file_id in (output_id, error_id):
            described = client.get(f"/v1/files/{file_id}")
            assert described.status_code == 200 and described.json()["bytes"] == len(
                client.get(f"/v1/files/{file_id}/content").content) > 0, described.text


def test_uploads_kept_before_the_files_index_are_looked_for_in_bounded_steps_once():
    # The keys were scanned for uploads missing from the files index by the list call that found the last scan over an
    # hour old, in one go: with millions of keys (jobs, batches), that call waited for the whole keyspace, every hour.
    # Such uploads can only predate the index: the scan is done once per database, a bounded step per list call.
    import redis as redis_lib

    from shared.batches import BatchStore
    from shared.jobs import JobStore
    from shared.redis_server import RedisServer

    class Counting(redis_lib.Connection):
        """Counts the SCAN commands the client sends."""

        scans = 0

        def send_command(self, *args, **kwargs):
            Counting.scans += str(args[0]).upper() == "SCAN"
            return super().send_command(*args, **kwargs)

    with RedisServer() as server:
        raw = redis_lib.Redis.from_url(server.url)
        for start in range(0, 30_000, 1000):  # other keys: jobs
            raw.mset({f"llq:job:{index}": "x" for index in range(start, start + 1000)})
        pool = redis_lib.ConnectionPool.from_url(server.url, decode_responses=True, connection_class=Counting)
        batches = BatchStore(JobStore(redis_lib.Redis(connection_pool=pool)), 3600)
        legacy = batches.save_file(b"{}\n", "old.jsonl", "batch")["id"]
        raw.delete(*raw.keys("llq:files*"))  # as an earlier version left its uploads: in no index
        calls, scans = 0, None
        while scans != 0 and calls < 100:  # list calls until one scans no more
            calls += 1
            before = Counting.scans
            listed = [file_id for file_id, _ in batches.uploaded_files()]
            scans = Counting.scans - before
            assert scans <= 10, scans  # a bounded step, not the 30,000 keys
        assert listed == [legacy] and 2 < calls < 100, (listed, calls)
        # Done once for the database: no list call scans again, however long after (no key of it expires).
        assert all(raw.ttl(key) == -1 for key in raw.keys("llq:files_*")), {key: raw.ttl(key)
                                                                             for key in raw.keys("llq:files_*")}


def test_the_batch_index_drops_batches_past_the_ttl():
    # The index of a key's batches (GET /v1/batches, and the output files GET /v1/files lists) kept every batch ever
    # created: only a batch list that paged as far as an expired batch dropped it. It grew for good, and every
    # GET /v1/files read each batch it named (a round trip each, for batches long gone). As the files index does, it
    # drops batches past the TTL, and expires with its newest.
    from shared.batches import BatchStore, new_batch_id
    from shared.jobs import JobStore
    from shared.redis_server import RedisServer

    with RedisServer() as server:
        batches = BatchStore(JobStore.from_url(server.url), 3600)
        old = new_batch_id()
        batches.create(old, {"params": {}})
        # As a batch created two hours ago leaves the index: its record expired (past the TTL), its entry kept.
        batches.redis.zadd(batches.index_key, {old: time.time() - 7200})
        batches.redis.delete(batches.key(old))
        assert [batch_id for batch_id, _ in batches.batch_index()] == []
        new = new_batch_id()
        batches.create(new, {"params": {}})
        batches.redis.zadd(batches.index_key, {old: time.time() - 7200})  # an index left by an earlier version
        assert [batch_id for batch_id, _ in batches.batch_index()] == [new]
        batches.create(new_batch_id(), {"params": {}})
        assert old not in batches.redis.zrange(batches.index_key, 0, -1)
        assert 0 < batches.redis.ttl(batches.index_key) <= 3600


def test_a_batch_file_described_as_its_batch_expires_leaves_no_record_behind():
    # A finished batch's file size is counted once and kept in its record: an HSET on a batch that expired between its
    # read and that write made a new record (no owner, no status, no TTL): kept for good, and a 500 for its id.
    from api.routes.files import _batch_file_object
    from shared.redis_server import RedisServer

    with RedisServer() as server:
        store, batches, batch_id, job_id = one_line_batch(server.url)
        store.finish(job_id, "failed", error="out of memory")
        record = batches.get(batch_id)
        assert record["status"] == "completed", record  # as OpenAI's: its one line failed
        assert _batch_file_object(batches, record, errors=True).bytes > 0
        assert batches.redis.hget(batches.key(batch_id), "errors_bytes")
        batches.redis.delete(batches.key(batch_id))  # as its TTL makes it, just after the read
        assert _batch_file_object(batches, record, errors=True).bytes > 0
        assert not batches.redis.exists(batches.key(batch_id))


def one_line_batch(redis_url: str):
    """(job store, batch store, batch id, job id) of an active batch of one line, its job still queued."""
    from shared.batches import BatchStore, new_batch_id
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest

    store = JobStore.from_url(redis_url)
    batches = BatchStore(store, 3600)
    batch_id = new_batch_id()
    batches.create(batch_id, {"params": {}})
    [job_id] = store.create_many([GenerateRequest(prompt="hi")], "batch", extra=[{"batch": batch_id, "batch_line": 0}])
    batches.add_lines(batch_id, [{"line": 1, "job": job_id, "question_id": 0, "prompt": "hi"}])
    batches.activate(batch_id, 1, 0)
    return store, batches, batch_id, job_id
