"""A bare WebSocket client (RFC 6455) over asyncio streams, for the benchmarks' own followers.

The benchmark's client runs on the same cores as the stack it measures, so what it costs is taken from
the engine: following a 64-token job cost it 3.1 ms of CPU with the `websockets` library, 2.3 with this
client and 2.0 with this client on uvloop (bench/README.md). It does only what a follower of a job needs:
the opening handshake, a text message sent (a job request to `/v1/ws`), unmasked text frames from the
server (fragmented or not), pings answered, and a close. No extensions are offered, as the API compresses
nothing unless told to (`LLAVA_QUEUE_WS_COMPRESSION`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import AsyncIterator
from typing import Self

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeError(RuntimeError):
    """The server did not switch protocols; `status` is what it answered, `body` the start of its answer."""

    def __init__(self, status: int, body: bytes):
        super().__init__(f"WebSocket handshake answered {status}: {body[:300]!r}")
        self.status = status


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A final frame as a client must send it: masked, with a fresh key (RFC 6455, 5.3)."""
    length = len(payload)
    if opcode >= CLOSE and length > 125:
        raise ValueError("a control frame holds at most 125 bytes")
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", length)
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", length)
    key = os.urandom(4)
    mask = (key * (length // 4 + 1))[:length]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(length, "big")
    return header + key + body


class BareWebSocket:
    """One client connection: `async with BareWebSocket.connect(host, port, path) as ws: async for text in ws`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._closed = False

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> Self:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            key = base64.b64encode(os.urandom(16))
            writer.write(b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                         % (path.encode(), host.encode(), port, key))
            status_line = await reader.readline()
            status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if status != 101:
                length = int(headers.get(b"content-length", b"0"))
                raise HandshakeError(status, await reader.read(length) if length else b"")
            expected = base64.b64encode(hashlib.sha1(key + GUID).digest())
            if headers.get(b"sec-websocket-accept") != expected:
                raise HandshakeError(status, b"Sec-WebSocket-Accept does not match the key sent")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def __aiter__(self) -> AsyncIterator[str]:
        """Each text message until the server closes the connection (its close frame, or the end of the stream)."""
        parts: list[bytes] = []
        read = self._reader.readexactly
        while True:
            try:
                first, second = await read(2)
            except asyncio.IncompleteReadError:
                return
            opcode, length = first & 0x0F, second & 0x7F
            if second & 0x80:
                raise RuntimeError("the server masked a frame (RFC 6455, 5.1)")
            if length == 126:
                (length,) = struct.unpack("!H", await read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await read(8))
            payload = await read(length) if length else b""
            if opcode == PING:
                self._writer.write(_masked_frame(PONG, payload))
            elif opcode == CLOSE:
                await self.close(payload[:2])
                return
            elif opcode in (TEXT, BINARY, CONTINUATION):
                parts.append(payload)
                if first & 0x80:  # FIN: the message is whole
                    yield b"".join(parts).decode()
                    parts.clear()

    async def send_text(self, text: str) -> None:
        """One text message, in one frame (what `/v1/ws` takes first: the job request)."""
        self._writer.write(_masked_frame(TEXT, text.encode()))
        await self._writer.drain()

    async def close(self, code: bytes = struct.pack("!H", 1000)) -> None:
        """Send a close frame (once) and drop the connection without waiting for the server's reply."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.write(_masked_frame(CLOSE, code))
            await self._writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writer.close()
