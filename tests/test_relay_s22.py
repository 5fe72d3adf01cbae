"""The API's relay without a timer per message: the hub's quiet tick has followers of a quiet channel read the record,
and a stream whose client reads nothing is let go by a watch of its own (tests/test_stream_followers.py has the
client that reads nothing)."""

import asyncio
import json

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


def test_a_step_of_several_jobs_is_one_script_call_with_each_jobs_answer(redis_server):
    # JobStore.record_step: every chunk of a step in one call of the append script. Each job keeps its own answer:
    # its new seq, -1 for a job another worker holds, -2 for one whose cancellation was asked for (its chunk kept);
    # a chunk with no text yet (a first token held back) counts its tokens and publishes nothing.
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest

    store = JobStore.from_url(redis_server.url, "steps-s22")
    jobs = []
    for holder in ("w1", "w1", "w2", "w1"):
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, holder) == "running"
        jobs.append(job_id)
    mine, cancelled, elsewhere, held_back = jobs
    assert store.cancel(cancelled) == "running"

    def evalsha_calls() -> int:
        return int(store.redis.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    pubsub = store.redis.pubsub()
    pubsub.subscribe(*(store.channel(job_id) for job_id in jobs))
    for _ in jobs:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    store._append.sha = store.redis.script_load(store._append.script)  # else the first call loads it, and runs again
    before = evalsha_calls()
    seqs = store.record_step("w1", [(mine, "Hel", 1, True), (cancelled, "x", 1, True), (elsewhere, "y", 1, True),
                                    (held_back, "", 1, True)], [], step=1)
    assert evalsha_calls() == before + 1
    assert seqs == [1, -2, -1, 0]
    assert store.record_step("w1", [(mine, "lo", 2, False), (held_back, "Hi", 2, False)], [], step=2) == [2, 1]
    # The same step again (its answer lost with a connection) appends nothing twice.
    assert store.record_step("w1", [(mine, "lo", 2, False)], [], step=2) == [2]
    records = {job_id: store.get(job_id) for job_id in jobs}
    assert (records[mine]["text"], records[mine]["completion_tokens"], records[mine]["seq"]) == ("Hello", 2, 2)
    assert records[cancelled]["text"] == "x" and records[elsewhere]["text"] == ""
    assert (records[held_back]["text"], records[held_back]["completion_tokens"]) == ("Hi", 2)
    assert records[mine]["first_token_at"] and records[held_back]["first_token_at"]
    published = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        data = json.loads(message["data"])
        published.append((message["channel"].rsplit(":", 1)[-1], data["seq"], data["delta"], data["tokens"]))
    pubsub.close()
    assert sorted(published) == sorted([(mine, 1, "Hel", 1), (cancelled, 1, "x", 1), (mine, 2, "lo", 2),
                                        (held_back, 1, "Hi", 2)])
