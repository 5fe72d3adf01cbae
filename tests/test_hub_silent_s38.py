"""The API's pub/sub connection gone silent without closing (half-open: a partition, a NAT or firewall dropping the
flow, a Redis host dead without a reset): the hub finds it by a PING left unanswered and connects again.

Before, it read that connection for ever: each new stream waited out its subscription (5 s), then got its text in
lumps from the quiet tick's reads of the record (every 2.5 s), until TCP gave up (a quarter of an hour) or never.
"""

import asyncio
import json
import threading
import time

import websockets

from api.channel_hub import SUBSCRIBE_TIMEOUT_SECONDS
from conftest import run_stack
from redis_proxies import CuttingProxy
from test_stream_followers import STORY


class FreezingProxy(CuttingProxy):
    """Forwards every connection; `freeze()` stops the API's subscriber connection both ways, its sockets left open."""

    def __init__(self, upstream_port: int):
        self.links = []  # (the first bytes the client sent, set while the link forwards)
        super().__init__(upstream_port)

    def _connected(self, client, upstream):
        sent, flowing = bytearray(), threading.Event()
        flowing.set()
        self.links.append((sent, flowing))
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._relay, args=(source, target, sent if source is client else None, flowing),
                             daemon=True).start()

    def _relay(self, source, target, sent, flowing):
        while True:
            try:
                data = source.recv(65536)
                if not data:
                    break
                if sent is not None and len(sent) < 4096:
                    sent += data
                flowing.wait()
                target.sendall(data)
            except OSError:
                break
        self._close_both(source, target)

    def freeze(self) -> int:
        frozen = [flowing for sent, flowing in self.links if b"llava-queue-api" in sent and b"SUBSCRIBE" in sent]
        for flowing in frozen:
            flowing.clear()
        return len(frozen)


async def timed_stream(url: str, request: dict | None = None) -> list[tuple[float, dict]]:
    """Each message of a WebSocket stream (`request` sent first if given), with the seconds since it was opened."""
    start, frames = time.monotonic(), []
    async with websockets.connect(url, open_timeout=10) as socket:
        if request is not None:
            await socket.send(json.dumps(request))
        async for raw in socket:
            frames.append((time.monotonic() - start, json.loads(raw)))
    return frames


def test_a_silent_pubsub_connection_is_replaced_within_seconds(redis_server, default_model_dir):
    proxy = FreezingProxy(redis_server.port)
    tokens = 32
    request = {"messages": STORY, "temperature": 0, "max_new_tokens": tokens}
    with run_stack(proxy.url.rsplit("/", 1)[0] + "/7", {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir)}) as stack:
        ended = asyncio.run(timed_stream(f"{stack.ws_url}/v1/ws", dict(request, max_new_tokens=2)))[-1][1]
        assert proxy.freeze() == 1  # the API's subscriber, which has just unsubscribed the job's channel
        # Its job ended, the stream is its text and its end, as soon as the hub has subscribed to its channel.
        again = asyncio.run(timed_stream(f"{stack.ws_url}/v1/jobs/{ended['id']}/ws"))
        after = asyncio.run(timed_stream(f"{stack.ws_url}/v1/ws", request))
        log = (stack.log_dir / "api.log").read_text(errors="replace")
    proxy.close()
    # Once, after the freeze: an idle connection's PINGs are answered.
    assert log.count("lost the pub/sub connection") == 1, log[-3000:]
    assert ("lost the pub/sub connection to Redis (TimeoutError: no answer to a PING" in log
            or "lost the pub/sub connection to Redis (TimeoutError: a subscription was not acknowledged" in log), \
        log[-3000:]
    # Found 3 to 4 s after the connection's last word (the subscription's own 5 s may come first on a slow machine;
    # the job's text comes then from its record).
    assert again[-1][1]["done"] and again[-1][1]["text"] == ended["text"], again
    assert again[0][0] < SUBSCRIBE_TIMEOUT_SECONDS + 1, again
    # Then the next stream's text comes token by token, not in a lump every 2.5 s.
    assert after[-1][1]["done"] and len(after) > tokens / 2, [(round(at, 2), len(frame["text"])) for at, frame in after]
