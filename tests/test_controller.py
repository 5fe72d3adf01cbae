"""The original LLaVA clients against llava-queue, unchanged: its controller protocol, its test script, its web server.

The clients are the files of the PyPI release `llava-torch==1.2.2.post1`, fetched once with
`pip download --no-deps` (hash-pinned) and cached beside the default model. They run as
separate processes with `llava` as a bare package over the wheel's files, because the wheel's
`llava/__init__.py` imports its training model code (torch 2.0, transformers 4.36), which the
clients never use. The web server's page needs gradio; its chat code path (`add_text`, then
`http_bot`: template choice, `/get_worker_address`, the request with the image, the streaming
parser) runs as is, with a stand-in for the three gradio names that path touches.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import redis
import requests

from api.auth import key_digest
from conftest import first_answer, run_stack
from shared.jobs import WorkerRegistry
from shared.protocol import SERVER_ERROR_MSG
from shared.redis_server import RedisServer, free_port
from shared.settings import Settings

MODEL = "SmolLM2-135M-Instruct"
LLAVA_WHEEL = "llava-torch==1.2.2.post1"
LLAVA_WHEEL_SHA256 = "94a25ba4ffd67b3f55b022e7e27c5b4175fc95e6a8c3a1f5b334dd517f128314"
KEY_PREFIX = Settings().key_prefix  # the stack runs with this environment
CACHE_DIR = Path(os.environ.get("LLAVA_QUEUE_CACHE_DIR", Path.home() / ".cache" / "llava-queue"))

# `python -c RUN_SCRIPT LLAVA_DIR SCRIPT ARGS...` runs SCRIPT as `python SCRIPT ARGS...`.
RUN_SCRIPT = """
import runpy, sys, types
llava = types.ModuleType("llava"); llava.__path__ = [sys.argv[1]]; sys.modules["llava"] = llava
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# `python -c WEB_CHAT LLAVA_DIR LOGDIR CONTROLLER_URL MAX_NEW_TOKENS TEXT MODEL...`: one chat turn with
# an image per model, as a user of the original page sends it; prints what the page showed, as JSON.
WEB_CHAT = """
import argparse, json, sys, types
from PIL import Image
llava = types.ModuleType("llava"); llava.__path__ = [sys.argv[1]]; sys.modules["llava"] = llava
gradio = types.ModuleType("gradio")
class Component:
    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
gradio.Button = gradio.Dropdown = Component
gradio.Request = types.SimpleNamespace
sys.modules["gradio"] = gradio
import llava.constants
llava.constants.LOGDIR = sys.argv[2]
from llava.serve import gradio_web_server as web
web.args = argparse.Namespace(controller_url=sys.argv[3], moderate=False)
request = types.SimpleNamespace(client=types.SimpleNamespace(host="127.0.0.1"))
max_new_tokens, text = int(sys.argv[4]), sys.argv[5]
chats = []
for model in sys.argv[6:]:
    state = web.default_conversation.copy()
    state = web.add_text(state, text, Image.new("RGB", (64, 48), (200, 30, 30)), "Default", request)[0]
    shown = []
    for outputs in web.http_bot(state, model, 0.2, 0.7, max_new_tokens, request):
        shown.append(outputs[0].messages[-1][-1])
    chats.append({"model": model, "shown": shown, "prompt": outputs[0].get_prompt()})
# The web server sends its own stdout to its log; answer on the real one.
print(json.dumps({"models": web.get_model_list(), "chats": chats}), file=sys.__stdout__)
"""


@pytest.fixture(scope="session")
def llava_dir() -> Path:
    """The `llava/` folder of the original release, downloaded once and cached."""
    target = CACHE_DIR / "llava-torch-1.2.2.post1"
    if not (target / "llava" / "serve" / "gradio_web_server.py").exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            requirement = Path(tmp) / "requirements.txt"
            requirement.write_text(f"{LLAVA_WHEEL} --hash=sha256:{LLAVA_WHEEL_SHA256}\n")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                            "-r", str(requirement), "-d", tmp], check=True, timeout=300)
            unpacked = Path(tmp) / "unpacked"
            with zipfile.ZipFile(next(Path(tmp).glob("llava_torch-*.whl"))) as wheel:
                wheel.extractall(unpacked, [name for name in wheel.namelist() if name.startswith("llava/")])
            shutil.rmtree(target, ignore_errors=True)
            os.replace(unpacked, target)
    return target / "llava"


def post(stack, path: str, body: dict | None = None) -> requests.Response:
    response = requests.post(f"{stack.base_url}{path}", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response


def find_job(stack, marker: str) -> dict:
    """The job whose request holds `marker` (the original clients never see a job id)."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    for key in client.scan_iter(f"{KEY_PREFIX}:job:*", count=1000):
        if marker in (client.hget(key, "request") or ""):
            return requests.get(f"{stack.base_url}/v1/jobs/{key.rsplit(':', 1)[1]}", timeout=10).json()
    raise AssertionError(f"no job holds {marker!r}")


def test_controller_endpoints_answer_like_the_original(stack):
    assert post(stack, "/refresh_all_workers").json() is None
    assert post(stack, "/list_models").json() == {"models": [MODEL]}
    assert post(stack, "/get_worker_address", {"model": MODEL}).json() == {"address": stack.base_url}
    assert post(stack, "/get_worker_address", {"model": "llava-v1.5-13b"}).json() == {"address": ""}
    status = post(stack, "/worker_get_status").json()
    assert list(status) == ["model_names", "speed", "queue_length"]
    # The stack is the session's: other files' jobs may be running in it.
    assert status["model_names"] == [MODEL] and status["speed"] == 1 and isinstance(status["queue_length"], int)
    # An original model worker registering or beating is harmless: told it is unknown, it changes nothing.
    assert post(stack, "/register_worker", {"worker_name": "http://localhost:40000", "check_heart_beat": True,
                                            "worker_status": None}).json() is None
    assert post(stack, "/receive_heart_beat", {"worker_name": "http://localhost:40000",
                                               "queue_length": 0}).json() == {"exist": False}
    assert post(stack, "/list_models").json() == {"models": [MODEL]}
    missing = requests.post(f"{stack.base_url}/get_worker_address", json={}, timeout=10)
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "model"
    malformed = requests.post(f"{stack.base_url}/get_worker_address", data=b'{"model": ', timeout=10)
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]["message"], malformed.text


def test_a_worker_that_stops_beating_drops_out(stack):
    registry = WorkerRegistry(redis.Redis.from_url(stack.redis_url, decode_responses=True), KEY_PREFIX)
    before = post(stack, "/worker_get_status").json()["queue_length"]
    registry.announce("ghost@test", {"name": "ghost@test", "model": "ghost-7b", "started_at": time.time(),
                                     "num_running": 2, "num_waiting": 1}, ttl_seconds=2)
    assert post(stack, "/list_models").json() == {"models": sorted([MODEL, "ghost-7b"])}
    assert post(stack, "/get_worker_address", {"model": "ghost-7b"}).json() == {"address": stack.base_url}
    status = post(stack, "/worker_get_status").json()
    assert status["model_names"] == sorted([MODEL, "ghost-7b"])
    assert status["queue_length"] >= before + 3
    deadline = time.monotonic() + 10
    while post(stack, "/list_models").json() != {"models": [MODEL]}:
        assert time.monotonic() < deadline, "the silent worker never dropped out"
        time.sleep(0.2)
    assert post(stack, "/get_worker_address", {"model": "ghost-7b"}).json() == {"address": ""}


def test_the_original_test_message_script_streams_an_answer(stack, llava_dir):
    marker = uuid.uuid4().hex[:8]
    result = subprocess.run(
        [sys.executable, "-c", RUN_SCRIPT, str(llava_dir), str(llava_dir / "serve" / "test_message.py"),
         "--controller-address", stack.base_url, "--model-name", MODEL, "--max-new-tokens", "12",
         "--message", f"Say hello to {marker}."],
        capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    models, address, printed = result.stdout.decode().split("\n", 2)
    assert models == f"Models: ['{MODEL}']"
    assert address == f"worker_addr: {stack.base_url}"
    job = find_job(stack, marker)
    # Its exact request: no top_p, no images, temperature 0.7, stop = the template's separator " ".
    assert job["status"] == "succeeded", job
    assert job["params"] == {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 12, "stop": " ", "seed": None,
                             "top_k": None}
    assert job["prompt"].endswith(f"USER: Say hello to {marker}. ")
    # That stop ends the answer at its first space, as in the original: a word at most (sampled).
    assert " " not in job["text"]
    # It prints the prompt (separators as newlines), then after each frame the frame's last
    # separator-split piece and "\r", then a newline: the last piece shown is the answer.
    prompt, _, shown = printed.partition(job["prompt"].replace(" ", "\n"))
    assert prompt == "" and shown.endswith("\r\n")
    assert shown.split("\r")[-2] == job["text"]


def test_the_original_web_server_chats_with_an_image(stack, llava_dir, tmp_path):
    marker = uuid.uuid4().hex[:8]
    result = subprocess.run(
        [sys.executable, "-c", WEB_CHAT, str(llava_dir), str(tmp_path), stack.base_url, "16",
         f"What is in this picture, {marker}?", MODEL, "llava-v1.5-13b"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    assert page["models"] == [MODEL]
    served, missing = page["chats"]
    shown = served["shown"]
    assert shown[0] == "▌" and all(text.endswith("▌") for text in shown[:-1]), shown
    answer = shown[-1]
    assert answer and not answer.endswith("▌") and "error_code" not in answer and answer != SERVER_ERROR_MSG
    job = find_job(stack, marker)
    assert job["status"] == "succeeded"
    # vicuna_v1 for a non-LLaVA name, the image in the first turn as "<image>\n" (a text-only model ignores it).
    assert job["prompt"].endswith(f"USER: <image>\nWhat is in this picture, {marker}? ASSISTANT:")
    assert served["prompt"] == job["prompt"] + " " + answer + "</s>"
    assert answer == job["text"].strip()
    # The web server's own request: its sliders' values and the template's stop.
    assert job["params"] == {"temperature": 0.2, "top_p": 0.7, "max_new_tokens": 16, "stop": "</s>", "seed": None,
                             "top_k": None}
    # A model no worker serves: the original's "no worker" answer, with no request sent.
    assert missing["shown"] == [SERVER_ERROR_MSG]
    log = [json.loads(line) for line in next(tmp_path.glob("*-conv.json")).read_text().splitlines()]
    assert [entry["type"] for entry in log] == ["chat"] and log[0]["model"] == MODEL


def test_a_model_no_worker_serves_gets_the_controller_no_worker_frame(stack):
    response = requests.post(f"{stack.base_url}/worker_generate_stream", timeout=10,
                             json={"model": "llava-v1.5-13b", "prompt": "USER: hi ASSISTANT:", "max_new_tokens": 4})
    assert response.status_code == 200 and "content-type" not in response.headers
    assert response.content == b'{"text": "' + SERVER_ERROR_MSG.encode() + b'", "error_code": 2}\0'


def test_a_failed_job_streams_the_original_server_error(stack):
    # An empty prompt reaches the worker (the original accepts it too) and fails there.
    response = requests.post(f"{stack.base_url}/worker_generate_stream", json={"prompt": "", "max_new_tokens": 4},
                             timeout=60)
    assert response.status_code == 200
    assert response.content == b'{"text": "' + SERVER_ERROR_MSG.encode() + b'", "error_code": 1}\0'
    job = requests.get(f"{stack.base_url}/v1/jobs/{response.headers['X-Job-Id']}", timeout=10).json()
    assert job["status"] == "failed" and job["error"]  # the reason is in the record


def test_a_job_waiting_in_the_queue_keeps_the_original_clients_read_timeout_at_bay(redis_server):
    # The original web server reads the stream with a 10 s timeout: a job that waits longer in the queue (the very
    # load llava-queue takes instead of dropping) would end in its "NETWORK ERROR" and a cancelled job. An empty
    # frame every LLAVA_KEEPALIVE_SECONDS keeps it reading; its loop (and test_message.py's) skips empty frames.
    env = {"LLAVA_QUEUE_LLAVA_KEEPALIVE_SECONDS": "0.5"}
    url = redis_server.url.rsplit("/", 1)[0] + "/3"  # a database of its own: no worker takes the job
    with run_stack(url, env, workers=(), log_prefix="llava-queue-keepalive-") as api:
        with requests.post(f"{api.base_url}/worker_generate_stream", stream=True, timeout=2,  # the original's 10
                           json={"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 4}) as response:
            job_id = response.headers["X-Job-Id"]
            started, frames = time.monotonic(), []
            for chunk in response.iter_lines(decode_unicode=False, delimiter=b"\0"):
                frames.append(chunk)
                if time.monotonic() - started > 4:
                    break
        assert len(frames) >= 5 and not any(frames), frames  # only empty frames while it waits
        deadline = time.monotonic() + 10
        while requests.get(f"{api.base_url}/v1/jobs/{job_id}", timeout=10).json()["status"] != "cancelled":
            assert time.monotonic() < deadline, "leaving the stream did not cancel the job"
            time.sleep(0.2)


def frames_of(content: bytes) -> list[dict]:
    """The original clients' parse of a NUL stream: every non-empty piece is one JSON frame."""
    return [json.loads(piece) for piece in content.split(b"\0") if piece]


def test_a_job_waiting_behind_the_original_controllers_proxy_is_kept_alive(stack, llava_dir, tmp_path):
    # A hierarchical setup: llava-queue registered as a worker with the original controller, whose
    # /worker_generate_stream proxies to it reading with a 5 s timeout, and sends on non-empty frames only. At the
    # former 5 s keepalive its timeout came first: a job waiting in the queue ended in its error frame, code 3.
    port = free_port()
    controller = subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, str(llava_dir), str(llava_dir / "serve" / "controller.py"),
         "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,  # (its logs go to the working folder)
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    controller_url = f"http://127.0.0.1:{port}"
    registry = WorkerRegistry(redis.Redis.from_url(stack.redis_url, decode_responses=True), KEY_PREFIX)
    # A live worker of a model whose queue no real worker reads: the job waits there while the test reads.
    registry.announce("busy@test", {"name": "busy@test", "model": "busy-7b", "started_at": time.time(),
                                    "num_running": 1, "num_waiting": 0}, ttl_seconds=60)
    marker = uuid.uuid4().hex[:8]
    frames = []
    try:
        first_answer(controller, "POST", f"{controller_url}/list_models", timeout=60,
                     logs=lambda: "the original controller did not start")
        requests.post(f"{controller_url}/register_worker", timeout=10, json={
            "worker_name": stack.base_url, "check_heart_beat": False,
            "worker_status": {"model_names": ["busy-7b"], "speed": 1, "queue_length": 0}})
        try:
            # Nothing for 12 s (the read timeout) is what a waiting job should get through the proxy.
            with requests.post(f"{controller_url}/worker_generate_stream", stream=True, timeout=12, json={
                    "model": "busy-7b", "prompt": f"USER: {marker} ASSISTANT:", "max_new_tokens": 4}) as response:
                frames = [json.loads(chunk) for chunk in response.iter_lines(delimiter=b"\0") if chunk]
        except requests.ConnectionError:  # (a read timeout while streaming)
            pass
        assert frames == [], f"the proxy ended the waiting job's stream: {frames}"
        job = find_job(stack, marker)
        assert job["status"] == "queued", job
        requests.delete(f"{stack.base_url}/v1/jobs/{job['id']}", timeout=10)
    finally:
        controller.kill()
        controller.wait()
        registry.remove("busy@test")


def test_a_bad_field_on_the_worker_stream_is_a_422_frame_and_malformed_json_a_400(stack):
    # The README's rule for every endpoint (422 for a bad field, 400 for malformed JSON); the body stays one
    # frame, which is all the original clients read (they never look at the status).
    bad = requests.post(f"{stack.base_url}/worker_generate_stream", data=b'{"prompt": "hi", "top_p": -1}',
                        timeout=10)
    assert bad.status_code == 422 and "content-type" not in bad.headers
    assert bad.content == (b'{"text": "top_p: must be between 0 and 1 when sampling (temperature > 0.001), got -1.0", '
                           b'"error_code": 4}\0')
    malformed = requests.post(f"{stack.base_url}/worker_generate_stream", data=b'{"prompt": ', timeout=10)
    assert malformed.status_code == 400
    [frame] = frames_of(malformed.content)
    assert frame["error_code"] == 4 and frame["text"].startswith("malformed JSON"), frame


def test_the_worker_stream_answers_a_frame_while_redis_is_away():
    # A JSON error body here made the original clients fail on data["error_code"] / data["text"] (KeyError).
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-redis-away-") as api:
        server.stop()
        for body in ({"prompt": "USER: hi ASSISTANT:"}, {"model": MODEL, "prompt": "USER: hi ASSISTANT:"}):
            response = requests.post(f"{api.base_url}/worker_generate_stream", json=body, timeout=30)
            assert response.status_code == 503 and "content-type" not in response.headers, response.content
            [frame] = frames_of(response.content)
            assert frame["error_code"] == 1 and "unavailable" in frame["text"], frame


def test_redis_going_away_mid_stream_ends_it_with_the_original_error_frame():
    # It ended with an unhandled exception in the API and a stream cut short (ChunkedEncodingError).
    env = {"LLAVA_QUEUE_LLAVA_KEEPALIVE_SECONDS": "0.5"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-redis-gone-") as api:
        with requests.post(f"{api.base_url}/worker_generate_stream", stream=True, timeout=20,
                           json={"prompt": "USER: hi ASSISTANT:", "max_new_tokens": 4}) as response:
            pieces = response.iter_lines(decode_unicode=False, delimiter=b"\0")
            assert next(pieces) == b""  # a keepalive: the job waits (no worker)
            server.stop()
            rest = [piece for piece in pieces if piece]
        assert [json.loads(piece) for piece in rest] == [{"text": SERVER_ERROR_MSG, "error_code": 1}], rest


def test_the_worker_stream_refuses_with_a_frame_behind_api_keys():
    # With keys on, a missing key (401) and the key's rate limit (429) were JSON error bodies, unreadable as frames.
    key = "controller-test-key"
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(key)]), "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE": "1"}
    body = {"model": "llava-v1.5-13b", "prompt": "USER: hi ASSISTANT:"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-keys-") as api:
        url, headers = f"{api.base_url}/worker_generate_stream", {"Authorization": f"Bearer {key}"}
        no_key = requests.post(url, json=body, timeout=10)
        assert no_key.status_code == 401 and no_key.headers["WWW-Authenticate"] == "Bearer", no_key.content
        [frame] = frames_of(no_key.content)
        assert frame["error_code"] == 4 and "API key" in frame["text"], frame
        # A limit of 1 a minute: of three requests in a row, only the first of each minute gets through.
        answers = [requests.post(url, json=body, headers=headers, timeout=10) for _ in range(3)]
        assert frames_of(answers[0].content) == [{"text": SERVER_ERROR_MSG, "error_code": 2}]
        limited = next((answer for answer in answers[1:] if answer.status_code == 429), answers[-1])
        assert limited.status_code == 429 and "content-type" not in limited.headers, limited.content
        [frame] = frames_of(limited.content)
        assert frame["error_code"] == 7 and "rate limit" in frame["text"], frame


@pytest.mark.parametrize("path", ["/worker_generate_stream", "/get_worker_address"])
def test_a_client_that_leaves_mid_body_is_no_unhandled_exception(stack, path):
    # Both read the body themselves (as the originals do, whatever the Content-Type); a client gone before its
    # body came raised ClientDisconnect out of the endpoint ("Exception in ASGI application").
    host, port = stack.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\n"
                       '{"model": '.encode())
        time.sleep(0.3)  # the endpoint is waiting for the rest of the body
    time.sleep(0.5)
    stack.check_api_log()
    assert post(stack, "/list_models").json() == {"models": [MODEL]}


def test_a_client_that_leaves_mid_stream_cancels_its_job(stack):
    # The job leaves its batch instead of writing up to 1024 tokens for nobody.
    prompt = ("<|im_start|>user\nWrite a long story about a lighthouse keeper, in many chapters.<|im_end|>\n"
              "<|im_start|>assistant\n")
    with requests.post(f"{stack.base_url}/worker_generate_stream", stream=True, timeout=60,
                       json={"model": MODEL, "prompt": prompt, "temperature": 0.7, "max_new_tokens": 1024}) as response:
        job_id = response.headers["X-Job-Id"]
        first = next(piece for piece in response.iter_lines(delimiter=b"\0") if piece)
        assert json.loads(first)["error_code"] == 0
    deadline = time.monotonic() + 10
    while (job := requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json())["status"] != "cancelled":
        assert time.monotonic() < deadline, f"leaving the stream did not cancel the job: {job}"
        time.sleep(0.1)
    assert job["finish_reason"] == "cancelled" and job["usage"]["completion_tokens"] < 1024, job
