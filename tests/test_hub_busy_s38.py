"""A Redis running a long script answers BUSY: the hub's PING gets it, and so does a new connection's CLIENT SETNAME.
An error reply is an answer (Redis is there), and a connection Redis refuses is tried again: the refusal ended the
hub's reader for good, and no message reached any follower until the API restarted."""

import asyncio
import threading
import time

import redis
import redis.asyncio as aioredis

from api.channel_hub import ChannelHub
from shared.redis_server import RedisServer

BUSY = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > tonumber(ARGV[1]) then break end
end
return 1
"""


async def follow_through_a_busy_script(url: str) -> list:
    admin = redis.Redis.from_url(url)
    admin.config_set("busy-reply-threshold", 300)
    client = aioredis.Redis.from_url(url, decode_responses=True, client_name="llava-queue-api")
    hub = ChannelHub(client)
    hub.start()
    try:
        async with hub.subscribe("channel") as queue:
            await asyncio.sleep(0.2)
            admin.publish("channel", "before")
            assert await asyncio.wait_for(queue.get(), 5) == "before"
            # 4 s of script: the hub PINGs after 1 s of quiet and may take the connection as lost; either way it
            # must come back.
            script = threading.Thread(target=lambda: redis.Redis.from_url(url).eval(BUSY, 0, 4_000_000))
            script.start()
            await asyncio.to_thread(script.join)
            assert not hub._reader.done(), hub._reader.exception()
            got, deadline = [], time.monotonic() + 10
            while "after" not in got and time.monotonic() < deadline:
                admin.publish("channel", "after")
                try:
                    got.append(await asyncio.wait_for(queue.get(), 1))
                except TimeoutError:
                    pass
            return got
    finally:
        await hub.aclose()
        await client.aclose()


def test_the_hub_goes_on_after_a_script_that_kept_redis_busy():
    with RedisServer() as server:
        got = asyncio.run(follow_through_a_busy_script(server.url))
    assert "after" in got, got


async def connect_to_a_listener_that_never_answers(port: int, seconds: float) -> bool:
    client = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True, client_name="llava-queue-api")
    hub = ChannelHub(client)
    hub.start()
    await asyncio.sleep(seconds)
    alive = not hub._reader.done()
    await hub.aclose()
    await client.aclose()
    return alive


def test_a_connection_that_is_taken_and_never_answered_is_given_up_and_tried_again(caplog):
    # A Redis that takes the connection and says nothing (a stopped process, SIGSTOP): the reader waited in connect()
    # for good, and no attempt of it was ever said.
    import logging
    import socket

    from api.channel_hub import SUBSCRIBE_TIMEOUT_SECONDS

    with socket.socket() as listener, caplog.at_level(logging.WARNING, logger="llava_queue.api"):
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # connections are taken by the kernel, and never read
        alive = asyncio.run(connect_to_a_listener_that_never_answers(listener.getsockname()[1],
                                                                     SUBSCRIBE_TIMEOUT_SECONDS + 1.5))
    assert alive
    assert f"could not connect to Redis for pub/sub (no answer in {SUBSCRIBE_TIMEOUT_SECONDS} s)" in caplog.text, \
        caplog.text
