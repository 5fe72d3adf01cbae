"""A crowd of clients at once: an API started under a low soft limit on open files still serves hundreds of
streams, and connections that never send a whole request do not hold a file descriptor for ever."""

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import websockets

from api.main import REQUEST_HEAD_TIMEOUT_SECONDS
from conftest import first_answer, stop_processes
from shared.redis_server import free_port
from test_pipeline import submit, wait_until

# How long after REQUEST_HEAD_TIMEOUT_SECONDS a test waits for the API to close a connection.
CLOSE_SLACK_SECONDS = 5.0
# A distribution's usual soft limit is 1,024; lower here, so that a few hundred clients reach it.
LOW_SOFT_LIMIT = 256
FOLLOWERS = 300


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _follow(url: str) -> tuple[list[dict], int | None]:
    """Every message of one WebSocket until the server closes it, and its close code."""
    async with websockets.connect(url, open_timeout=30) as ws:
        messages = [json.loads(raw) async for raw in ws]
    return messages, ws.close_code


def test_an_api_started_under_a_low_open_files_limit_serves_every_follower(stack):
    """300 followers of one job on an API whose soft limit was 256: each gets the job's whole text and a clean close
    (before, the API kept the limit: the clients past it were dropped without an answer at the handshake, and streams
    already accepted ended "unavailable", their reads of Redis failing with "Too many open files")."""
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-crowd-"))
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=stack.redis_url, LLAVA_QUEUE_PORT=str(port))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open(log_dir / "api.log", "w") as log:
        api = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, hard)))
    base = f"http://127.0.0.1:{port}"
    try:
        first_answer(api, "GET", f"{base}/healthz", logs=lambda: (log_dir / "api.log").read_text())
        job_id = submit(stack, messages=[{"role": "user", "text": "Count from one to ten."}], temperature=0,
                        max_new_tokens=16)
        url = f"ws://127.0.0.1:{port}/v1/jobs/{job_id}/ws"

        async def crowd():
            return await asyncio.gather(*[_follow(url) for _ in range(FOLLOWERS)], return_exceptions=True)

        results = asyncio.run(crowd())
        job = wait_until(stack, job_id)
        failed = [result for result in results if isinstance(result, BaseException)
                  or result[1] != 1000 or not result[0] or result[0][-1].get("status") != "succeeded"
                  or not result[0][-1]["text"].endswith(job["text"])]
        assert not failed, (f"{len(failed)} of {FOLLOWERS} followers did not get the whole stream, e.g. {failed[:3]}\n"
                            + (log_dir / "api.log").read_text()[-3000:])
    finally:
        stop_processes([api])


def _raw_connection(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=REQUEST_HEAD_TIMEOUT_SECONDS * 3)


def _closed_by_server(connection: socket.socket, deadline: float) -> bool:
    """Whether the server closed `connection` (EOF or reset) before `deadline`; whatever it sent first is read."""
    while time.monotonic() < deadline:
        connection.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if not connection.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def test_connections_that_send_no_whole_request_head_are_closed(stack):
    """A connection that sends nothing, one that sends a request's head a line at a time (slowloris), and one that
    starts a second request and stops are closed after REQUEST_HEAD_TIMEOUT_SECONDS, and the API's file descriptors
    come back down; a WebSocket stream that lasts longer is not cut (before, uvicorn held such connections for as long
    as the client kept them, each with its descriptor, until the API ran out)."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    api_pid = stack.processes["api"].pid
    before = _open_fds(api_pid)
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    silent = [_raw_connection(port) for _ in range(20)]
    slow = [_raw_connection(port) for _ in range(20)]
    for connection in slow:
        connection.sendall(head)
    second = _raw_connection(port)
    second.sendall(head + b"\r\n")
    assert second.recv(65536).startswith(b"HTTP/1.1 200")
    second.sendall(b"GET /healthz HTTP/1.1\r\n")
    job_id = submit(stack, messages=[{"role": "user", "text": "Count from one to ten."}], temperature=0,
                    max_new_tokens=16)

    async def follow_slowly():
        # Opened with the raw connections, read once they have been closed: longer than the head timeout.
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws", open_timeout=10) as ws:
            await asyncio.sleep(REQUEST_HEAD_TIMEOUT_SECONDS + 2)
            messages = [json.loads(raw) async for raw in ws]
        return messages, ws.close_code

    async def meanwhile():
        follower = asyncio.create_task(follow_slowly())
        for _ in range(int(REQUEST_HEAD_TIMEOUT_SECONDS / 2)):
            await asyncio.sleep(2)
            for connection in slow:
                with suppress(OSError):  # closed by the API already
                    connection.sendall(b"X-Slow: 1\r\n")
        return await follower

    messages, close_code = asyncio.run(meanwhile())
    deadline = time.monotonic() + CLOSE_SLACK_SECONDS
    still_open = [name for name, group in (("silent", silent), ("slow", slow), ("second request", [second]))
                  for connection in group if not _closed_by_server(connection, deadline)]
    assert not still_open, f"{len(still_open)} connections still open: {sorted(set(still_open))}"
    assert close_code == 1000 and messages[-1]["done"] and messages[-1]["status"] == "succeeded", messages[-1:]
    for connection in [*silent, *slow, second]:
        connection.close()
    assert _open_fds(api_pid) <= before + 2, (before, _open_fds(api_pid))
