"""A crowd of clients at once: an API started under a low soft limit on open files still serves hundreds of
streams, and connections that never send a whole request do not hold a file descriptor for ever."""

import asyncio
import http.client
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

from api.main import KEEP_ALIVE_SECONDS, REQUEST_BODY_IDLE_SECONDS, REQUEST_HEAD_TIMEOUT_SECONDS
from conftest import first_answer, stop_processes
from shared.redis_server import free_port
from test_pipeline import submit, wait_until

# How long after REQUEST_HEAD_TIMEOUT_SECONDS a test waits for the API to close a connection.
CLOSE_SLACK_SECONDS = 5.0
# A distribution's usual soft limit is 1,024; lower here, so that a few hundred clients reach it.
LOW_SOFT_LIMIT = 256
FOLLOWERS = 300
# A listening socket's state in /proc/net/tcp.
TCP_LISTEN = "0A"


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _connections_held(pid: int, port: int) -> int:
    """How many TCP connections on local `port` the process `pid` holds a descriptor for (its listening socket left
    out): the API's clients' connections. Its other descriptors come and go with what it opens lazily (the Celery
    producer's broker connection at its first submission, a Redis pool grown under concurrent requests)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(FileNotFoundError):  # closed since the listing
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    held = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)  # the column names
            for line in lines:
                fields = line.split()
                local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
                held += local_port == port and state != TCP_LISTEN and inode in inodes
    return held


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
    before = _connections_held(api_pid, port)
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
    # The API closes its end of the last connections (the submission's, the stream's) as it gets to them.
    deadline = time.monotonic() + CLOSE_SLACK_SECONDS
    while _connections_held(api_pid, port) > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _connections_held(api_pid, port) <= before, (before, _connections_held(api_pid, port))


def test_a_request_whose_body_stalls_is_closed_and_a_slow_one_is_answered(stack):
    """A submission whose head announces a body that then stops coming (to /v1/jobs, and to /v1/batches, which reads
    its body itself) is closed REQUEST_BODY_IDLE_SECONDS after its last byte, with no unhandled exception in the API's
    log, while a body that trickles in, a few bytes every few seconds for longer than that in all, is answered (before,
    a stalled body held its connection until the API shut down, where the request was logged as an unhandled
    exception; the stalled batch was logged as one as soon as its client left)."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    api_pid = stack.processes["api"].pid
    submit(stack, messages=[{"role": "user", "text": "Hi"}], max_new_tokens=1)  # the API's Redis pool as in use
    before = _open_fds(api_pid)

    def head(path: str, length: int) -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()

    stalled = []
    for path in ("/v1/jobs", "/v1/batches"):
        connection = _raw_connection(port)
        connection.sendall(head(path, 1000) + b'{"messages": [')
        stalled.append(connection)
    body = json.dumps({"messages": [{"role": "user", "text": "Hi"}], "max_new_tokens": 1, "temperature": 0}).encode()
    slow = _raw_connection(port)
    slow.sendall(head("/v1/jobs", len(body)))
    pieces = [body[i:i + 4] for i in range(0, len(body), 4)]
    pause = (REQUEST_BODY_IDLE_SECONDS + 6) / len(pieces)
    assert pause < REQUEST_BODY_IDLE_SECONDS / 2
    started = time.monotonic()
    for piece in pieces:
        time.sleep(pause)
        slow.sendall(piece)
    slow.settimeout(30)
    answer = slow.recv(65536)
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]
    assert time.monotonic() - started > REQUEST_BODY_IDLE_SECONDS
    # The trickle lasted longer than the stalled bodies' timeout: they are closed by now, or about to be.
    deadline = time.monotonic() + CLOSE_SLACK_SECONDS
    still_open = [index for index, connection in enumerate(stalled) if not _closed_by_server(connection, deadline)]
    assert not still_open, f"stalled bodies still open: {still_open}"
    for connection in [*stalled, slow]:
        connection.close()
    deadline = time.monotonic() + CLOSE_SLACK_SECONDS
    while _open_fds(api_pid) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _open_fds(api_pid) <= before + 2, (before, _open_fds(api_pid))
    stack.check_api_log()


def test_an_idle_connection_is_kept_for_its_next_request_as_a_client_pool_keeps_it(stack):
    """A connection idle for longer than uvicorn's default keep-alive (5 s) still serves its next request (a client
    pool or a load balancer reuses it within its own idle timeout, typically 60 s; the API closed it at 5 s, and the
    request sent on it as it closed failed)."""
    assert KEEP_ALIVE_SECONDS >= 60
    host, port = stack.base_url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/healthz")
    assert connection.getresponse().read() and connection.sock is not None
    socket_used = connection.sock
    time.sleep(7)
    connection.request("GET", "/healthz")  # on the same socket: http.client opens none while it has one
    response = connection.getresponse()  # RemoteDisconnected, had the API closed it
    assert response.status == 200 and response.read()
    assert connection.sock is socket_used
    connection.close()
