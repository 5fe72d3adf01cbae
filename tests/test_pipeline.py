"""One request the whole way: HTTP → job record → Celery on Redis → worker → model → pub/sub → WebSocket/polling.

Everything here is real: a Redis server process, a Celery worker process with SmolLM2-135M-Instruct,
and the API process. The tests do what a user does and check what the user would see.
"""

import asyncio
import base64
import io
import json
import pickle
import time

import pytest
import requests
import websockets
from PIL import Image

FRANCE = [{"role": "user", "text": "What is the capital of France?"}]


def submit(stack, **payload) -> str:
    response = requests.post(f"{stack.base_url}/v1/jobs", json=payload, timeout=10)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return response.json()["id"]


def poll(stack, job_id: str) -> dict:
    response = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_until(stack, job_id: str, states=("succeeded", "failed", "cancelled", "expired"), timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = poll(stack, job_id)
        if job["status"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s\n{stack.logs()}")


async def ws_messages(url: str, first: str | None = None) -> list[dict]:
    """Every message of one WebSocket until the server closes it."""
    messages = []
    async with websockets.connect(url, open_timeout=10) as socket:
        if first is not None:
            await socket.send(first)
        try:
            async for raw in socket:
                messages.append(json.loads(raw))
        except websockets.ConnectionClosedError as closed:
            # A rejected request closes with 1008 (policy violation) after its error message.
            assert closed.rcvd.code == 1008, closed
    return messages


def test_submit_and_poll_answers_paris(stack):
    job_id = submit(stack, messages=FRANCE, temperature=0, max_new_tokens=32)
    job = wait_until(stack, job_id)
    assert job["status"] == "succeeded", job
    assert "Paris" in job["text"]
    assert job["prompt"].endswith("<|im_start|>assistant\n")
    assert job["error_code"] == 0 and job["error"] is None
    assert job["model"] == "SmolLM2-135M-Instruct"
    assert job["usage"]["prompt_tokens"] > 5 and 0 < job["usage"]["completion_tokens"] <= 32
    assert job["created_at"] <= job["started_at"] <= job["first_token_at"] <= job["finished_at"]
    assert job["queue_position"] is None


def test_eight_jobs_stream_over_websocket(stack):
    questions = ["Name a primary colour.", "What is 2 + 2?", "Say hello in French.", "Name a planet.",
                 "What is the opposite of hot?", "Name a fruit.", "What colour is the sky?", "Count to three."]
    ids = [submit(stack, messages=[{"role": "user", "text": q}], temperature=0, max_new_tokens=24) for q in questions]

    async def stream_all():
        return await asyncio.gather(*(ws_messages(f"{stack.ws_url}/v1/jobs/{i}/ws") for i in ids))

    streams = asyncio.run(stream_all())
    for job_id, messages in zip(ids, streams):
        assert messages[-1]["done"] is True and messages[-1]["status"] == "succeeded", messages[-1]
        texts = [m["text"] for m in messages]
        for before, after in zip(texts, texts[1:]):
            assert after.startswith(before)
        assert all(m["error_code"] == 0 for m in messages)
        job = poll(stack, job_id)
        assert texts[-1] == job["prompt"] + job["text"]
        assert len(messages) >= 2  # at least one chunk and the last message


def test_late_websocket_subscriber_gets_the_full_text(stack):
    job_id = submit(stack, messages=FRANCE, temperature=0, max_new_tokens=32)

    async def mid_stream():
        # Join after the first chunks went out: the first message already holds them.
        while not poll(stack, job_id)["text"]:
            await asyncio.sleep(0.02)
        return await ws_messages(f"{stack.ws_url}/v1/jobs/{job_id}/ws")

    during = asyncio.run(mid_stream())
    job = wait_until(stack, job_id)
    assert during[0]["text"].startswith(job["prompt"]) and len(during[0]["text"]) > len(job["prompt"])
    assert during[-1]["text"] == job["prompt"] + job["text"]
    after = asyncio.run(ws_messages(f"{stack.ws_url}/v1/jobs/{job_id}/ws"))
    assert [m["text"] for m in after] == [job["prompt"] + job["text"]] * 2
    assert after[-1]["done"] and after[-1]["status"] == "succeeded"


def test_submit_and_stream_in_one_socket(stack):
    request = json.dumps({"messages": FRANCE, "temperature": 0, "max_new_tokens": 32})
    messages = asyncio.run(ws_messages(f"{stack.ws_url}/v1/ws", first=request))
    assert messages[-1]["status"] == "succeeded"
    assert "Paris" in messages[-1]["text"]
    job = poll(stack, messages[-1]["id"])
    assert messages[-1]["text"] == job["prompt"] + job["text"]
    rejected = asyncio.run(ws_messages(f"{stack.ws_url}/v1/ws", first='{"prompt": "x", "top_p": -1}'))
    assert rejected == [{"text": rejected[0]["text"], "error_code": 4, "done": True, "status": "rejected",
                         "error": rejected[0]["text"]}]
    assert "top_p" in rejected[0]["text"]


def test_worker_generate_stream_with_the_original_client_logic(stack):
    # The original web server's parsing, unchanged (llava/serve/gradio_web_server.py).
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    pload = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "temperature": 0.0, "top_p": 0.7,
             "max_new_tokens": 32, "stop": "<|im_end|>", "images": []}
    response = requests.post(f"{stack.base_url}/worker_generate_stream", headers={"User-Agent": "LLaVA Client"},
                             json=pload, stream=True, timeout=10)
    assert response.status_code == 200
    assert "content-type" not in response.headers
    outputs = []
    for chunk in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
        if chunk:
            data = json.loads(chunk.decode())
            assert data["error_code"] == 0, data
            assert list(data) == ["text", "error_code"]
            outputs.append(data["text"][len(prompt):].strip())
    assert outputs and "Paris" in outputs[-1]
    for before, after in zip(outputs, outputs[1:]):
        assert after.startswith(before)


def test_worker_generate_stream_frames_are_byte_exact(stack):
    pload = {"prompt": "Héllo, ", "temperature": 0, "max_new_tokens": 4}
    body = requests.post(f"{stack.base_url}/worker_generate_stream", json=pload, timeout=60).content
    frames = body.split(b"\0")
    assert frames[-1] == b"" and len(frames) >= 2
    first = frames[0]
    assert first.startswith(b'{"text": "H\\u00e9llo, ') and first.endswith(b'", "error_code": 0}')
    bad = requests.post(f"{stack.base_url}/worker_generate_stream", data=b'{"temperature": 0}', timeout=10)
    assert bad.status_code == 422
    frame = json.loads(bad.content.rstrip(b"\0"))
    assert frame["error_code"] != 0 and "prompt" in frame["text"]


def test_cancel_a_running_job_leaves_its_batch_mates_alone(stack):
    story = [{"role": "user", "text": "Write a long story about a dragon who learns to cook."}]
    long_id = submit(stack, messages=story, temperature=0, max_new_tokens=400)
    # Prefilled in one group with the longer story, their rows left-padded, the mates answered "L'Étoile, la
    # Marseillaise, ..." in bf16 (a clean-clone run): tests/test_batch_invariance_s35.py.
    mates = [submit(stack, messages=FRANCE, temperature=0, max_new_tokens=32) for _ in range(3)]
    wait_until(stack, long_id, states=("running",), timeout=60)
    while poll(stack, long_id)["usage"]["completion_tokens"] < 5:
        time.sleep(0.05)
    response = requests.delete(f"{stack.base_url}/v1/jobs/{long_id}", timeout=10)
    assert response.status_code == 202 and response.json()["status"] == "cancelling"
    cancelled = wait_until(stack, long_id, timeout=30)
    assert cancelled["status"] == "cancelled" and cancelled["error_code"] != 0
    assert cancelled["usage"]["completion_tokens"] < 400
    for mate in mates:
        job = wait_until(stack, mate)
        assert job["status"] == "succeeded" and "Paris" in job["text"]
    again = requests.delete(f"{stack.base_url}/v1/jobs/{long_id}", timeout=10)
    assert again.status_code == 409


def test_cancel_a_queued_job(stack):
    blockers = [submit(stack, messages=FRANCE, temperature=0, max_new_tokens=64) for _ in range(20)]
    queued = submit(stack, messages=FRANCE, temperature=0, max_new_tokens=64)
    job = poll(stack, queued)  # 20 jobs of 64 tokens ahead of it on 16 slots: it has not started
    assert job["status"] == "queued" and isinstance(job["queue_position"], int) and job["queue_position"] >= 0
    response = requests.delete(f"{stack.base_url}/v1/jobs/{queued}", timeout=10)
    assert response.status_code == 202 and response.json()["status"] == "cancelled", response.text
    assert poll(stack, queued)["status"] == "cancelled"  # ended at once, not when a worker would have reached it
    for blocker in blockers:
        requests.delete(f"{stack.base_url}/v1/jobs/{blocker}", timeout=10)


def test_bulk_submission(stack):
    jobs = [{"messages": FRANCE, "temperature": 0, "max_new_tokens": 16, "queue": "batch"} for _ in range(4)]
    response = requests.post(f"{stack.base_url}/v1/jobs/bulk", json={"jobs": jobs}, timeout=10)
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert len(ids) == 4 and len(set(ids)) == 4
    for job_id in ids:
        job = wait_until(stack, job_id)
        assert job["status"] == "succeeded" and job["queue"] == "batch"


def test_prompt_longer_than_the_context_gets_the_original_answer(stack):
    prompt = "word " * 9000  # SmolLM2's context is 8192 tokens
    pload = {"prompt": prompt, "temperature": 0, "max_new_tokens": 16}
    body = requests.post(f"{stack.base_url}/worker_generate_stream", json=pload, timeout=60).content
    frames = [json.loads(frame) for frame in body.split(b"\0") if frame]
    assert frames == [{"text": prompt + "Exceeds max token length. Please start a new conversation, thanks.",
                       "error_code": 0}]


def test_max_new_tokens_above_the_cap_is_clamped(stack):
    job_id = submit(stack, prompt="Hello", temperature=0, max_new_tokens=5000)
    assert poll(stack, job_id)["params"]["max_new_tokens"] == 1024
    requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)


def png_base64(size=(8, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(("body", "status", "field"), [
    (b'{"prompt": "hi", ', 400, "JSON"),
    (b'{"temperature": 0.5}', 422, "prompt"),
    (b'{"prompt": "hi", "top_p": -1}', 422, "top_p"),  # while sampling (the default temperature, 1)
    (b'{"prompt": "hi", "max_new_tokens": "abc"}', 422, "max_new_tokens"),
    (b'{"prompt": "<image> hi", "images": ["not base64!"]}', 422, "images"),
    (b'{"prompt": "<image> hi", "images": ["aGVsbG8="]}', 422, "images"),
    (b'{"messages": [{"role": "robot", "text": "hi"}]}', 422, "role"),
    (b'{"prompt": "hi", "queue": "vip"}', 422, "queue"),
])
def test_bad_input_gets_a_4xx_that_names_the_field(stack, body, status, field):
    response = requests.post(f"{stack.base_url}/v1/jobs", data=body, headers={"Content-Type": "application/json"},
                             timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert field in error["message"], error
    assert error["code"] != 0


def test_a_stop_that_is_not_strings_gets_one_error_naming_stop(stack):
    # The field is a string or a list of strings: pydantic named each member of that union ("stop.str: ...;
    # stop.list[str].1: ..."), param "stop.str".
    for stop in (["Paris", None], 5, {"a": 1}):
        response = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "hi", "stop": stop}, timeout=10)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "stop" and error["message"] == "stop: must be a string or a list of up to 4 strings"


def test_a_valid_image_is_accepted(stack):
    response = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "<image>\nhi", "images": [png_base64()],
                                                               "max_new_tokens": 1}, timeout=10)
    assert response.status_code == 202, response.text


def test_unknown_job_id_is_404(stack):
    for method in (requests.get, requests.delete):
        response = method(f"{stack.base_url}/v1/jobs/no-such-job", timeout=10)
        assert response.status_code == 404
        assert "no-such-job" in response.json()["error"]["message"]
    messages = asyncio.run(ws_messages(f"{stack.ws_url}/v1/jobs/no-such-job/ws"))
    assert messages[-1]["error_code"] != 0 and messages[-1]["done"]


def test_health_lists_the_worker(stack):
    health = requests.get(f"{stack.base_url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["redis"] is True
    assert health["workers"][0]["model"] == "SmolLM2-135M-Instruct"


def test_models_lists_the_served_model(stack):
    models = requests.get(f"{stack.base_url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [model["id"] for model in models["data"]] == ["SmolLM2-135M-Instruct"]


def test_messages_that_are_not_jobs_never_run_and_never_hurt_the_worker(stack):
    from kombu import Connection

    from shared.celery_app import GENERATE_TASK, make_celery
    from shared.settings import Settings

    app = make_celery(Settings(redis_url=stack.redis_url))
    for args in ([{"evil": True}], ["../../etc/passwd"], ["0" * 32], [1, 2, 3]):
        app.send_task(GENERATE_TASK, args=args, queue="interactive")
    # A message in Python's serialization format is refused by the worker's JSON-only consumer.
    untrusted = pickle.dumps(([], {}, {}))
    with Connection(stack.redis_url) as connection:
        connection.Producer().publish(untrusted, routing_key="interactive",
                                      content_type="application/x-python-serialize", content_encoding="binary",
                                      headers={"task": GENERATE_TASK, "id": "untrusted"})
    job_id = submit(stack, messages=FRANCE, temperature=0, max_new_tokens=16)
    assert wait_until(stack, job_id)["status"] == "succeeded"
    assert stack.processes["worker"].poll() is None
    log = (stack.log_dir / "worker.log").read_text()
    assert "dropped a task message that is not a job id" in log
    assert "Refusing to deserialize untrusted content" in log


def test_the_worker_start_up_log_names_the_dtype_it_runs_in(stack):
    """The worker's start-up line says what the model runs in: the dtype `auto` picks here (bf16 on a CPU that has
    it, else fp32), written as a name ("bfloat16"), as the registry and /metrics write it."""
    import re

    import torch

    from workers.builder import resolve_dtype

    expected = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
    log = (stack.log_dir / "worker.log").read_text()
    assert re.search(rf"worker \S+: model \S+, device cpu, dtype {expected}, \d+ torch threads", log), log[-2000:]


def test_every_celery_serializer_is_json():
    """Only JSON crosses the queue: tasks, results and events are written as JSON, and only JSON is read back."""
    from shared.celery_app import make_celery
    from shared.settings import Settings

    conf = make_celery(Settings(redis_url="redis://127.0.0.1:6379/0")).conf
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    assert conf.accept_content == conf.result_accept_content == ["json"]


def test_the_broker_channel_builds_no_redis_client_per_message(redis_server, monkeypatch):
    # kombu built a redis.Redis for every publish, every message taken and every ack (redis-py spends ~120 µs
    # on each, on the worker's one consumer thread and in the API's submissions); the app's channel keeps one.
    import redis

    from shared.celery_app import make_celery
    from shared.settings import Settings

    built = []
    original = redis.Redis.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    app = make_celery(Settings(redis_url=redis_server.url))
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue("client-count-test")
        for n in range(20):
            queue.put({"n": n})
        taken = []
        for _ in range(20):
            message = queue.get(timeout=5)
            taken.append(message.payload["n"])
            message.ack()
        queue.close()
    assert taken == list(range(20))
    assert len(built) <= 3, built
    # TLS and a socket, which the job store reads too, run on the project's transport (tests/test_transport_s41.py);
    # the schemes only kombu reads (kombu's redis+socket://, Sentinel), which `api` and `worker` refuse, keep kombu's.
    for url, transport in (("rediss://127.0.0.1:6380/0", "shared.celery_app:RedisTransport"),
                           ("unix:///tmp/redis.sock?db=1", "shared.celery_app:RedisSocketTransport"),
                           ("redis+socket:///tmp/redis.sock", "redis"), ("sentinel://127.0.0.1:26379", "sentinel")):
        assert make_celery(Settings(redis_url=url)).connection_for_write().transport_cls == transport, url
