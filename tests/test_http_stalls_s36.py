"""A client of an HTTP stream (LLaVA's `/worker_generate_stream`, OpenAI's streamed chat completion) that keeps its
connection but reads nothing is let go once a message has waited the send timeout, as a WebSocket client is
(api.stream.FollowingResponse): its subscription goes and its job is cancelled. Before, the stream waited on that
send for as long as the client kept the connection, subscribed to the job's chunks long after the job had ended.

An API with no model worker: a worker of a made-up model is announced, and the test runs its jobs through the job
store, with chunks big enough to fill the connection's buffers quickly.
"""

import json
import socket
import time

import pytest
import redis

from conftest import run_stack
from shared.jobs import Ending, JobStore, WorkerRegistry
from shared.redis_server import RedisServer
from shared.settings import Settings

MODEL = "made-up-7b"
WORKER = "made-up@test"
SEND_TIMEOUT = 2.0
PREFIX = Settings().key_prefix


@pytest.fixture(scope="module")
def api_alone():
    with RedisServer() as server, run_stack(server.url, {"LLAVA_QUEUE_STREAM_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT)},
                                            workers=(), log_prefix="llava-queue-stalls-") as stack:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        WorkerRegistry(client, PREFIX).announce(WORKER, {"name": WORKER, "model": MODEL, "started_at": time.time(),
                                                         "num_running": 0, "num_waiting": 0}, ttl_seconds=3600)
        yield stack, JobStore(client, PREFIX), client
        client.close()


def post_and_stop_reading(stack, path: str, body: dict) -> tuple[socket.socket, str]:
    """Send the request on a socket with a small receive buffer, read the answer's head (for its job id), then
    nothing more."""
    host, port = stack.base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(1024)
        assert data, head
        head += data
    headers = dict(line.split(": ", 1) for line in head.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:])
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return sock, {name.lower(): value for name, value in headers.items()}["x-job-id"]


def channels(client: redis.Redis) -> list[str]:
    return client.pubsub_channels(f"{PREFIX}:chunks:*")


@pytest.mark.parametrize("path, body, chunk", [
    # Every LLaVA frame repeats the prompt and the text so far.
    ("/worker_generate_stream", {"model": MODEL, "prompt": "=" * 200_000, "max_new_tokens": 100}, 1_000),
    # An SSE chunk holds the new text only.
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": True,
                              "max_tokens": 100}, 100_000),
])
def test_a_client_of_an_http_stream_that_stops_reading_is_let_go(api_alone, path, body, chunk):
    stack, store, client = api_alone
    sock, job_id = post_and_stop_reading(stack, path, body)
    try:
        assert store.start(job_id, WORKER, MODEL) == "running"
        assert store.set_prompt(job_id, body.get("prompt", "Hi"), 3, WORKER)
        channel = store.channel(job_id)
        # 60 chunks: 12 MB or 6 MB, more than the connection's buffers on this host hold (about 3 MB).
        for step in range(1, 61):
            assert store.record_step(WORKER, [(job_id, "x" * chunk, step, step == 1)], [], step)[0] > 0
        deadline = time.monotonic() + SEND_TIMEOUT + 10
        while channel in channels(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert channel not in channels(client), "the stream still follows the job"
        # Let go, it cancelled its job (no keep_on_disconnect): the worker is asked to stop it. (The stream leaves the
        # channel first, then writes the cancel: on a loaded machine the record was read in between.)
        while "cancel_requested" not in store.get(job_id) and time.monotonic() < deadline + 5:
            time.sleep(0.1)
        assert store.get(job_id)["cancel_requested"] in (True, "1", 1), store.get(job_id)
        log = (stack.log_dir / "api.log").read_text()
        assert f"the client of job {job_id} read nothing for {SEND_TIMEOUT} s" in log, log[-3000:]
    finally:
        store.record_step(WORKER, [], [Ending(job_id, "cancelled")], 1000)
        sock.close()
