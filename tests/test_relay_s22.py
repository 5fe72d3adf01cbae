"""The API's relay without a timer per message: the hub's quiet tick has followers of a quiet channel read the record,
and a stream whose client reads nothing is let go by a watch of its own (tests/test_stream_followers.py has the
client that reads nothing)."""

import asyncio

import redis.asyncio as aioredis

from api.channel_hub import QUIET_TICK_SECONDS, ChannelHub


def test_followers_of_a_quiet_channel_are_told_to_read_the_record_and_others_are_not(redis_server):
    async def follow_two():
        aredis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        hub = ChannelHub(aredis)
        hub.start()
        loop = asyncio.get_running_loop()

        async def keep_busy():
            while True:
                await aredis.publish("busy", "chunk")
                await asyncio.sleep(0.3)

        try:
            async with hub.subscribe("quiet") as quiet, hub.subscribe("busy") as busy:
                start = loop.time()
                publishing = asyncio.create_task(keep_busy())
                first = await asyncio.wait_for(quiet.get(), 3 * QUIET_TICK_SECONDS)
                waited = loop.time() - start
                second = await asyncio.wait_for(quiet.get(), 3 * QUIET_TICK_SECONDS)
                between = loop.time() - start - waited
                publishing.cancel()
                busy_payloads = [busy.get_nowait() for _ in range(busy.qsize())]
        finally:
            await hub.aclose()
            await aredis.aclose()
        return first, waited, second, between, busy_payloads

    first, waited, second, between, busy_payloads = asyncio.run(follow_two())
    # Not at the first tick (the channel was new), but at the second: 1 to 2 ticks of quiet; then every tick.
    assert first is None and QUIET_TICK_SECONDS * 0.9 <= waited <= 2 * QUIET_TICK_SECONDS + 1, waited
    assert second is None and abs(between - QUIET_TICK_SECONDS) < 1, between
    assert len(busy_payloads) >= 10 and set(busy_payloads) == {"chunk"}  # a channel with messages gets no None
