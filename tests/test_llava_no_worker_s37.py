"""A /worker_generate_stream job whose model's only worker died ends with the original's error frame.

The original web server posts with a 10 s read timeout and shows its "NETWORK ERROR" on any failure; a dead original
worker refused the connection at once. Here the keepalive NULs kept that timeout from ever firing: the page spun for
as long as no worker came back, the model gone from /list_models meanwhile.
"""

import json
import os
import signal
import time

import redis
import requests

from conftest import run_stack
from shared.jobs import WorkerRegistry
from shared.protocol import SERVER_ERROR_MSG, ErrorCode
from shared.redis_server import RedisServer
from shared.settings import Settings

KEY_PREFIX = Settings().key_prefix
HEARTBEAT_TTL_SECONDS = 4
# A fast heartbeat and keepalive, so a dead worker is seen in seconds (the API's grace is one heartbeat TTL).
ENV = {"LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": str(HEARTBEAT_TTL_SECONDS),
       "LLAVA_QUEUE_LLAVA_KEEPALIVE_SECONDS": "0.5"}
# The original controller's proxy frame for a worker request that failed.
WORKER_FAILED_FRAME = {"text": SERVER_ERROR_MSG, "error_code": int(ErrorCode.WORKER_FAILED)}


def post_like_the_web_server(base_url: str, model: str, max_new_tokens: int = 8) -> requests.Response:
    """The original web server's request (llava/serve/gradio_web_server.py's http_bot)."""
    return requests.post(f"{base_url}/worker_generate_stream", headers={"User-Agent": "LLaVA Client"}, stream=True,
                         timeout=10, json={"model": model, "prompt": "USER: Say hi. ASSISTANT:", "temperature": 0.2,
                                           "top_p": 0.7, "max_new_tokens": max_new_tokens, "stop": "</s>",
                                           "images": []})


def pieces_of(response: requests.Response):
    """The stream as the original web server reads it (one iterator per response: a second loses what the first
    had read ahead)."""
    return response.iter_lines(decode_unicode=False, delimiter=b"\0")


def read_frames(pieces, until: float = float("inf")) -> tuple[list[dict], int]:
    """The frames the original web server reads of `pieces` (it skips empty ones) and the number of those empty
    ones, read until the stream ends or `until` (time.monotonic()) has passed."""
    frames, keepalives = [], 0
    for chunk in pieces:
        if chunk:
            frames.append(json.loads(chunk.decode()))
        else:
            keepalives += 1
        if time.monotonic() > until:
            break
    return frames, keepalives


def job_view(base_url: str, job_id: str) -> dict:
    return requests.get(f"{base_url}/v1/jobs/{job_id}", timeout=10).json()


def test_a_request_whose_models_only_worker_was_killed_ends_with_the_original_error_frame(default_model_dir):
    with RedisServer() as server, run_stack(server.url, {**ENV, "LLAVA_QUEUE_MODEL_PATH": str(default_model_dir)},
                                            log_prefix="llava-queue-no-worker-") as stack:
        [model] = requests.post(f"{stack.base_url}/list_models", timeout=10).json()["models"]
        # A live worker streams as ever: cumulative frames of code 0, no error frame.
        with post_like_the_web_server(stack.base_url, model) as response:
            frames, _ = read_frames(pieces_of(response))
        assert frames and all(frame["error_code"] == 0 for frame in frames), frames
        assert frames[-1]["text"].startswith("USER: Say hi. ASSISTANT:"), frames

        worker = stack.processes["worker"]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        # Still listed (its heartbeat has not lapsed yet): the request is taken, and its job waits in the queue.
        assert requests.post(f"{stack.base_url}/list_models", timeout=10).json()["models"] == [model]
        started = time.monotonic()
        with post_like_the_web_server(stack.base_url, model) as response:
            assert response.status_code == 200
            job_id = response.headers["X-Job-Id"]
            # Before, only NULs came, for ever (the read timeout never fired); the bound is the heartbeat's lapse,
            # the API's grace (a TTL each) and a keepalive tick or two, with room for a loaded host.
            frames, keepalives = read_frames(pieces_of(response), until=started + 30)
        elapsed = time.monotonic() - started
        assert frames == [WORKER_FAILED_FRAME], (frames, keepalives, elapsed, stack.logs())
        # Not at the first keepalive: a worker gets a heartbeat TTL to come back.
        assert HEARTBEAT_TTL_SECONDS <= elapsed < 20, elapsed
        assert keepalives >= 2, keepalives  # the client was kept reading while the job waited
        job = job_view(stack.base_url, job_id)
        assert job["status"] == "cancelled" and job["error_code"] == ErrorCode.CANCELLED, job
        assert requests.post(f"{stack.base_url}/list_models", timeout=10).json()["models"] == []


def test_a_request_waiting_for_a_busy_live_worker_is_kept_until_that_worker_is_gone():
    with RedisServer() as server, run_stack(server.url, ENV, workers=(), log_prefix="llava-queue-busy-worker-") as api:
        registry = WorkerRegistry(redis.Redis.from_url(server.url, decode_responses=True), KEY_PREFIX)
        # A live worker of a model whose queue no real worker reads: the job waits there, as behind a busy worker.
        busy = {"name": "busy@test", "model": "busy-7b", "started_at": time.time(), "num_running": 1,
                "num_waiting": 0}
        registry.announce("busy@test", busy, ttl_seconds=60)
        with post_like_the_web_server(api.base_url, "busy-7b") as response:
            job_id, pieces = response.headers["X-Job-Id"], pieces_of(response)
            # Then draining (a rolling restart): it takes no new job, yet it is alive, and may hold this one.
            registry.announce("busy@test", {**busy, "ready": False}, ttl_seconds=60)
            # Past the API's grace (a heartbeat TTL) and a few ticks: only keepalives, and the job still waits.
            frames, keepalives = read_frames(pieces, until=time.monotonic() + HEARTBEAT_TTL_SECONDS + 2)
            assert frames == [] and keepalives >= 10, (frames, keepalives)
            assert job_view(api.base_url, job_id)["status"] == "queued"
            registry.remove("busy@test")
            gone = time.monotonic()
            frames, _ = read_frames(pieces, until=gone + 20)
        assert frames == [WORKER_FAILED_FRAME], frames
        assert HEARTBEAT_TTL_SECONDS <= time.monotonic() - gone < 15
        assert job_view(api.base_url, job_id)["status"] == "cancelled"
