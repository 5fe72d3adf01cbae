"""Many followers of one job through the API's pub/sub hub (`api.channel_hub`, `api.stream.follow_job`): each one's
text grows chunk by chunk from where it joined, never repeats or goes back, and ends on the job's whole text, while
the hub's connection is cut again and again and some followers read slowly.

A worker's writes are the job store's own (`JobStore.record_step`, the script that appends and publishes a chunk),
on a real Redis; the followers are the API's. No model: a job of hundreds of chunks streams in about a second.
"""

import asyncio
import random
import threading
import time

import redis
import redis.asyncio as aioredis

from api.channel_hub import ChannelHub
from api.stream import follow_job
from shared.jobs import Ending, JobStore
from shared.protocol import GenerateRequest

PROMPT = "P:"
# The hub's connection under a name of its own: CLIENT KILL cuts it, never a stack's API sharing this Redis.
HUB_CLIENT_NAME = "gateway-s40-hub"


def chunk(index: int) -> str:
    return f"{index},"


def run_job(store: JobStore, job_id: str, chunks: int, pause: float) -> None:
    """What a worker writes for a job: its prompt, `chunks` chunks (a pause after some), then its end."""
    rng = random.Random(job_id)
    store.set_prompt(job_id, PROMPT, 2, "w")
    for index in range(chunks):
        store.record_step("w", [(job_id, chunk(index), index + 1, index == 0)], [], step=index)
        if rng.random() < 0.1:
            time.sleep(pause)
    store.record_step("w", [], [Ending(job_id, "succeeded", "", 0, "length")])


def cut_the_hub(admin: redis.Redis, stop: threading.Event, every: tuple[float, float]) -> None:
    """Kill the hub's pub/sub connection at random moments until `stop`: it connects again and subscribes anew."""
    rng = random.Random(7)
    while not stop.wait(rng.uniform(*every)):
        for client in admin.client_list():
            if client["name"] == HUB_CLIENT_NAME and int(client["sub"]) > 0:
                admin.execute_command("CLIENT", "KILL", "ID", client["id"])


async def follow_many(url: str, prefix: str, chunks: int, pause: float, followers: int, slow: tuple[float, ...],
                      cuts: tuple[float, float] | None) -> list[list]:
    """Stream one job of `chunks` chunks (`pause` after one in ten) to `followers` followers that join in its first
    half second, each reading every event after a pause drawn from `slow`; the hub cut every `cuts` seconds if given.
    Each follower's events."""
    store = JobStore.from_url(url, prefix)
    admin = redis.Redis.from_url(url, decode_responses=True)
    aredis = aioredis.Redis.from_url(url, decode_responses=True, client_name=HUB_CLIENT_NAME)
    hub = ChannelHub(aredis)
    hub.start()
    job_id, _ = store.create(GenerateRequest(prompt=PROMPT, max_new_tokens=chunks), "interactive")
    assert store.start(job_id, "w") == "running"
    rng = random.Random(prefix)

    async def follower(delay: float, pause: float) -> list:
        await asyncio.sleep(delay)
        events = []
        async for event in follow_job(store, hub, job_id):
            events.append(event)
            if pause:
                await asyncio.sleep(pause)
        return events

    stop = threading.Event()
    cutter = threading.Thread(target=cut_the_hub, args=(admin, stop, cuts)) if cuts else None
    worker = threading.Thread(target=run_job, args=(store, job_id, chunks, pause))
    try:
        tasks = [asyncio.create_task(follower(rng.uniform(0, 0.5), rng.choice(slow))) for _ in range(followers)]
        if cutter:
            cutter.start()
        worker.start()
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        stop.set()
        for thread in (cutter, worker):
            if thread is not None and thread.is_alive():
                await asyncio.to_thread(thread.join)
        await hub.aclose()
        await aredis.aclose()
        admin.close()
        store.redis.close()


def assert_followed(events: list, whole: str) -> None:
    """A follower's events: texts that only grow, none twice, the last chunk's text equal to the whole, then the end."""
    texts = [event.text for event in events]
    assert events[-1].done and events[-1].status == "succeeded" and texts[-1] == whole, texts[-1][-40:]
    assert not any(event.done for event in events[:-1])
    running = texts[:-1]
    assert running and running[-1] == whole, "the text's last chunk was never sent before the end"
    for before, after in zip(running, running[1:]):
        assert after.startswith(before) and after != before, (before[-40:], after[-40:])


def test_followers_joining_mid_stream_get_the_text_so_far_then_every_chunk(redis_server):
    # 200 chunks: fewer than a follower's backlog holds, so no follower is ever sent a lump instead of chunks.
    chunks = 200
    streams = asyncio.run(follow_many(redis_server.url, "s40-join", chunks, 0.05, followers=20, slow=(0,),
                                      cuts=None))
    whole = PROMPT + "".join(chunk(index) for index in range(chunks))
    # The job runs for a second or more (its pauses): most followers join while it streams.
    assert sum(events[0].text != whole for events in streams) >= len(streams) // 2, [len(e) for e in streams]
    for events in streams:
        assert_followed(events, whole)
        texts = [event.text for event in events[:-1]]
        # After the text it joined on, each event is exactly one more chunk: none missed, none twice.
        for before, after in zip(texts, texts[1:]):
            assert after[len(before):].count(",") == 1, (before[-20:], after[len(before):][:40])


def test_followers_across_cuts_of_the_pubsub_connection_never_repeat_or_lose_text(redis_server):
    # The hub loses its connection every 0.1 to 0.4 s: a follower resyncs from the record, in one event when the text
    # grew meanwhile. Slow followers fall behind and catch up the same way.
    chunks = 600
    streams = asyncio.run(follow_many(redis_server.url, "s40-cuts", chunks, 0.02, followers=30,
                                      slow=(0, 0, 0.002, 0.02), cuts=(0.1, 0.4)))
    whole = PROMPT + "".join(chunk(index) for index in range(chunks))
    for events in streams:
        assert_followed(events, whole)
