"""A plain response (a file's content, here) to a client that reads nothing is let go after the send timeout, as a
job's stream is: it was held for as long as the client kept its connection (10 clients that never read a 32 MiB
file held 650 MB of the API, for good)."""

import asyncio
import socket
import time

import pytest
import requests
import uvloop

from conftest import run_stack
from shared.redis_server import RedisServer

SEND_TIMEOUT = 2.0


def test_a_client_that_reads_nothing_of_a_file_is_let_go():
    env = {"LLAVA_QUEUE_STREAM_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT)}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-deadline-") as stack:
        content = b'{"custom_id": "a"}\n' * (8 * 2**20 // 19)
        meta = requests.post(f"{stack.base_url}/v1/files", files={"file": ("f.jsonl", content)},
                             data={"purpose": "batch"}, timeout=60).json()
        host, port = stack.base_url.removeprefix("http://").split(":")
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect((host, int(port)))
            client.sendall(f"GET /v1/files/{meta['id']}/content HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            log = stack.log_dir / "api.log"
            deadline = time.monotonic() + 6 * SEND_TIMEOUT
            while "read nothing for" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert f"the client of GET /v1/files/{meta['id']}/content read nothing for {SEND_TIMEOUT} s" \
                in log.read_text(), log.read_text()[-2000:]
            # The connection is closed: what the client reads now is what was on its way, then the end.
            received, client_deadline = 0, time.monotonic() + 10
            client.settimeout(10)
            while (piece := client.recv(1 << 16)) and time.monotonic() < client_deadline:
                received += len(piece)
            assert received < len(content) / 2, received
        # The API goes on serving.
        assert requests.get(f"{stack.base_url}/v1/files/{meta['id']}", timeout=10).status_code == 200


async def _respond(timeout: float, send) -> list[str]:
    """A plain response with a background task, sent through SendDeadline to `send`; what happened, in order."""
    from starlette.background import BackgroundTask
    from starlette.responses import Response

    from api.stream import SendDeadline

    events: list[str] = []
    app = Response(b"y" * 10, background=BackgroundTask(lambda: events.append("background ran")))
    scope = {"type": "http", "method": "GET", "path": "/x", "asgi": {"spec_version": "2.3"}, "headers": []}

    async def receive():
        await asyncio.Event().wait()

    async def recording(message):
        await send(message, events)
        events.append(message["type"])

    await SendDeadline(app, timeout)(scope, receive, recording)
    return events


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_send_whose_wait_ended_as_its_deadline_came_goes_on(loop):
    # The transport drains at 0.25 s, before the 0.3 s deadline, but the event loop is busy from 0.2 to 0.4 s: both
    # are due in the same pass. A timer that cancelled the request at once cut the response there (its body never
    # written, its background task never run).
    async def draining_late(message, events):
        if message["type"] == "http.response.body":
            running = asyncio.get_running_loop()
            drained = running.create_future()
            running.call_later(0.25, drained.set_result, None)
            running.call_later(0.2, time.sleep, 0.2)
            await drained

    run = uvloop.run if loop == "uvloop" else asyncio.run
    assert run(_respond(0.3, draining_late)) == ["http.response.start", "http.response.body", "background ran"]


def test_a_response_head_and_body_go_out_in_one_pass_of_the_loop():
    # A task a send put a pass of the loop between them, where the next request's bytes could come and find the
    # response not complete (uvicorn's head timeout then never started for it).
    async def marking(message, events):
        if message["type"] == "http.response.start":
            asyncio.get_running_loop().call_soon(events.append, "the loop's next pass")

    events = asyncio.run(_respond(20.0, marking))
    assert events.index("http.response.body") < events.index("the loop's next pass"), events
