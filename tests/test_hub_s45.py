"""A follower that came just before the hub found its pub/sub connection silent waits for the reconnection to its
end: Redis slow to take the new connection is not Redis away.

Before, it had what was left of its own 5 s for the reconnection (a second or less: the silence is found 3 to 4 s
after the connection's last word), and its stream ended "the job store is unavailable" with Redis up (a CI run's
flake of test_hub_silent_s38, under load).
"""

import asyncio
import threading

import redis.asyncio as aioredis

from api.channel_hub import QUIET_TICK_SECONDS, SUBSCRIBE_TIMEOUT_SECONDS, ChannelHub
from test_hub_silent_s38 import FreezingProxy


class SlowToConnectProxy(FreezingProxy):
    """A FreezingProxy that can cut the links it froze, and whose connections made after `slow_from_now(seconds)`
    forward nothing for that long."""

    delay = 0.0

    def __init__(self, upstream_port: int):
        self.sockets = []  # (client, upstream), one pair a link
        super().__init__(upstream_port)

    def slow_from_now(self, seconds: float) -> None:
        self.delay = seconds

    def _connected(self, client, upstream):
        self.sockets.append((client, upstream))
        super()._connected(client, upstream)
        if self.delay:
            flowing = self.links[-1][1]
            flowing.clear()
            threading.Timer(self.delay, flowing.set).start()

    def cut_frozen(self) -> None:
        for (_, flowing), (client, upstream) in zip(self.links, self.sockets):
            if not flowing.is_set():
                self._close_both(client, upstream)


async def follow_across_a_slow_reconnection(proxy: SlowToConnectProxy, redis_url: str) -> tuple[str, list]:
    client = aioredis.Redis.from_url(proxy.url, decode_responses=True, client_name="llava-queue-api")
    publisher = aioredis.Redis.from_url(redis_url, decode_responses=True)
    hub = ChannelHub(client)
    hub.start()
    got = []
    try:
        async with hub.subscribe("first"):
            assert proxy.freeze() == 1
            proxy.slow_from_now(SUBSCRIBE_TIMEOUT_SECONDS * 0.7)
            # The frozen connection lost 3.5 s into the next follower's 5 (if its silence was not found earlier): the
            # next connection then answers after what is left of them.
            asyncio.get_running_loop().call_later(SUBSCRIBE_TIMEOUT_SECONDS * 0.7, proxy.cut_frozen)
            try:
                async with hub.subscribe("second") as queue:
                    while "after" not in got:  # published again after a None: it may have come before the SUBSCRIBE
                        await publisher.publish("second", "after")
                        got.append(await asyncio.wait_for(queue.get(), 2 * QUIET_TICK_SECONDS + 1))
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}", got
        return "followed", got
    finally:
        await hub.aclose()
        await client.aclose()
        await publisher.aclose()


def test_a_follower_waits_for_a_slow_reconnection_to_its_end(redis_server):
    proxy = SlowToConnectProxy(redis_server.port)
    try:
        outcome, got = asyncio.run(follow_across_a_slow_reconnection(proxy, redis_server.url))
    finally:
        proxy.close()
    assert outcome == "followed", outcome
    assert got[-1] == "after", got
