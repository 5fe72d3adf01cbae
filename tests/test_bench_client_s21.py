"""The benchmarks' bare WebSocket client (bench/ws.py): it must see what a full client sees, or bench.e2e measures
something else than what users get."""

import asyncio
import base64
import hashlib
import json
import struct

import pytest
import websockets

from bench.e2e import post_json
from bench.ws import GUID, BareWebSocket, HandshakeError


async def _follow_bare(port: int, path: str) -> list[dict]:
    async with await BareWebSocket.connect("127.0.0.1", port, path) as ws:
        return [json.loads(text) async for text in ws]


async def _follow_library(url: str) -> list[dict]:
    async with websockets.connect(url, max_size=None) as ws:
        return [json.loads(text) async for text in ws]


def test_bare_client_sees_what_the_websockets_library_sees(stack):
    prompt = "USER: Count from one to twenty. ASSISTANT:"
    port = int(stack.base_url.rsplit(":", 1)[1])
    ws_base = stack.base_url.replace("http://", "ws://")

    async def both() -> tuple[dict, list[dict], list[dict]]:
        status, job = await post_json(stack.base_url, "/v1/jobs",
                                      {"prompt": prompt, "temperature": 0, "max_new_tokens": 24})
        assert status == 202, job
        path = f"/v1/jobs/{job['id']}/ws"
        bare, library = await asyncio.gather(_follow_bare(port, path), _follow_library(ws_base + path))
        return job, bare, library

    job, bare, library = asyncio.run(both())
    # Each follower may join after some chunks went out; the end is the same for both, and every text grows.
    assert bare[-1] == library[-1]
    assert bare[-1]["done"] and bare[-1]["status"] == "succeeded" and bare[-1]["id"] == job["id"]
    assert len(bare[-1]["text"]) > len(prompt)
    texts = [message["text"] for message in bare]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert all(not message.get("done") for message in bare[:-1])


def test_bare_client_unknown_job_and_refused_handshake(stack):
    port = int(stack.base_url.rsplit(":", 1)[1])
    ws_base = stack.base_url.replace("http://", "ws://")

    async def run() -> tuple[list[dict], list[dict]]:
        path = "/v1/jobs/no-such-job/ws"
        return await asyncio.gather(_follow_bare(port, path), _follow_library(ws_base + path))

    bare, library = asyncio.run(run())
    assert bare == library
    assert bare[0]["status"] == "unknown" and bare[0]["error_code"] != 0
    with pytest.raises(HandshakeError) as refused:
        asyncio.run(_follow_bare(port, "/v1/no-such-route/ws"))
    assert refused.value.status in (403, 404)


def _unmask(frame: bytes) -> tuple[int, bytes]:
    """The opcode and payload of one masked client frame of at most 125 bytes."""
    assert frame[1] & 0x80, "a client frame must be masked"
    length, key = frame[1] & 0x7F, frame[2:6]
    return frame[0] & 0x0F, bytes(byte ^ key[i % 4] for i, byte in enumerate(frame[6 : 6 + length]))


def test_bare_client_follows_rfc_6455():
    """Against a minimal server: a ping is answered with a masked pong of the same payload, a message split over
    three frames (one of 300 bytes, a 16-bit length) arrives whole, and the server's close is echoed with its code."""
    received: list[tuple[int, bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        key = b""
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        long_part = b"x" * 300
        writer.write(bytes((0x89, 4)) + b"ping")  # a ping
        writer.write(bytes((0x01, 5)) + b"first")  # text, not final
        writer.write(bytes((0x00, 126)) + struct.pack("!H", 300) + long_part)  # continuation
        writer.write(bytes((0x80, 4)) + b"last")  # final continuation
        writer.write(bytes((0x81, 5)) + b"again")
        writer.write(bytes((0x88, 2)) + struct.pack("!H", 1001))  # close: going away
        await writer.drain()
        for _ in range(2):  # the pong, then the close
            head = await reader.readexactly(6)
            received.append(_unmask(head + await reader.readexactly(head[1] & 0x7F)))
        writer.close()

    async def run() -> list[str]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            async with await BareWebSocket.connect("127.0.0.1", port, "/") as ws:
                messages = [text async for text in ws]
            await asyncio.sleep(0.1)
        return messages

    messages = asyncio.run(run())
    assert messages == ["first" + "x" * 300 + "last", "again"]
    assert received == [(0xA, b"ping"), (0x8, struct.pack("!H", 1001))]


def test_bare_client_sends_text_messages_a_full_server_takes():
    """Its text messages (a job request to /v1/ws) of every length form: 7-bit, 16-bit and 64-bit, masked, as the
    websockets library's server reads them."""
    texts = ["hello", "é" * 150 + "x" * 200, "y" * 70_000]

    async def run() -> tuple[list[str], list[str]]:
        got: list[str] = []

        async def echo_length(ws) -> None:
            async for message in ws:
                got.append(message)
                await ws.send(str(len(message)))

        async with websockets.serve(echo_length, "127.0.0.1", 0, max_size=None) as server:
            port = server.sockets[0].getsockname()[1]
            async with await BareWebSocket.connect("127.0.0.1", port, "/") as ws:
                for text in texts:
                    await ws.send_text(text)
                answers = []
                async for answer in ws:
                    answers.append(answer)
                    if len(answers) == len(texts):
                        break
        return got, answers

    got, answers = asyncio.run(run())
    assert got == texts
    assert answers == [str(len(text)) for text in texts]


def test_bare_client_submits_on_v1_ws_as_the_websockets_library_does(stack):
    """bench.e2e --ws-rounds: the job request as the first message of /v1/ws, the job's stream back on the socket."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    request = json.dumps({"prompt": "USER: Count from one to ten. ASSISTANT:", "temperature": 0,
                          "max_new_tokens": 12})

    async def until_done(send, stream) -> list[dict]:
        await send(request)
        messages = []
        async for text in stream:
            messages.append(json.loads(text))
            if messages[-1].get("done"):
                break
        return messages

    async def bare() -> list[dict]:
        async with await BareWebSocket.connect("127.0.0.1", port, "/v1/ws") as ws:
            return await until_done(ws.send_text, ws)

    async def library() -> list[dict]:
        async with websockets.connect(stack.base_url.replace("http://", "ws://") + "/v1/ws", max_size=None) as ws:
            return await until_done(ws.send, ws)

    ours, theirs = asyncio.run(bare()), asyncio.run(library())
    assert ours[-1]["status"] == theirs[-1]["status"] == "succeeded", (ours[-1], theirs[-1])
    assert ours[-1]["text"] == theirs[-1]["text"] and ours[-1]["id"] != theirs[-1]["id"]
