"""A plain response (a file's content, here) to a client that reads nothing is let go after the send timeout, as a
job's stream is: it was held for as long as the client kept its connection (10 clients that never read a 32 MiB
file held 650 MB of the API, for good)."""

import socket
import time

import requests

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
