"""Every stream of an API process shares one Redis pub/sub connection: two followers of one job, twenty
jobs streamed at once, that connection killed mid-stream, and Redis itself going away."""

import asyncio
import json
import socket
import time
from contextlib import suppress

import pytest
import redis.asyncio as aioredis
import requests
import websockets

from conftest import LET_GO_SLACK_SECONDS, SEND_TIMEOUT_SECONDS, run_stack
from shared.redis_server import RedisServer
from test_pipeline import poll, submit, wait_until, ws_messages

STORY = [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}]
# The API names its Redis connections so (see api/main.py).
API_CLIENT_NAME = "llava-queue-api"


async def api_subscribers(admin: aioredis.Redis) -> dict[str, int]:
    """The API's Redis connections that hold subscriptions: client id → how many channels."""
    return {client["id"]: int(client["sub"]) for client in await admin.client_list()
            if client["name"] == API_CLIENT_NAME and int(client["sub"]) > 0}


async def job_channels(admin: aioredis.Redis) -> list[str]:
    return await admin.pubsub_channels("*:chunks:*")


async def published_deltas(chunks: aioredis.client.PubSub, job_id: str) -> list[str]:
    """The text deltas published for `job_id`, in order, until its last message."""
    deltas, deadline = [], time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, f"job {job_id} did not end in 120 s"
        message = await chunks.get_message(ignore_subscribe_messages=True, timeout=1)
        if message is None or not message["channel"].endswith(job_id):
            continue
        data = json.loads(message["data"])
        if data.get("done"):
            return deltas
        if "delta" in data:
            deltas.append(data["delta"])


async def first_messages(url: str, count: int) -> list[dict]:
    """The first `count` messages of a WebSocket stream, then the client leaves."""
    async with websockets.connect(url, open_timeout=10) as socket:
        return [json.loads(await socket.recv()) for _ in range(count)]


def is_run_of(texts: list[str], expected: list[str]) -> bool:
    """Whether `texts` is a run of consecutive items of `expected`: a chunk-by-chunk stream that missed none."""
    return any(texts == expected[start:start + len(texts)] for start in range(len(expected)))


def test_two_followers_of_one_job_each_get_every_chunk(stack):
    async def follow_twice():
        admin = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
        chunks = admin.pubsub()
        await chunks.psubscribe("*:chunks:*")  # before the job exists: every chunk of it is seen here
        job_id = submit(stack, messages=STORY, temperature=0, max_new_tokens=48)
        url = f"{stack.ws_url}/v1/jobs/{job_id}/ws"
        leaver = asyncio.create_task(first_messages(url, 3))
        stayer = asyncio.create_task(ws_messages(url))
        deltas = await published_deltas(chunks, job_id)
        await chunks.aclose()
        await admin.aclose()
        return job_id, deltas, await leaver, await stayer

    job_id, deltas, leaver, stayer = asyncio.run(follow_twice())
    job = poll(stack, job_id)
    assert job["status"] == "succeeded", job
    expected = [job["prompt"] + "".join(deltas[:count]) for count in range(1, len(deltas) + 1)]
    assert expected[-1] == job["prompt"] + job["text"]
    assert is_run_of([message["text"] for message in leaver], expected), (leaver, expected)
    # The other follower went on after the first left, every chunk up to the last.
    assert expected.index(leaver[-1]["text"]) < len(expected) - 1
    assert stayer[-1]["done"] and stayer[-1]["status"] == "succeeded" and stayer[-1]["text"] == expected[-1]
    assert is_run_of([message["text"] for message in stayer[:-1]], expected) and stayer[-2]["text"] == expected[-1]


def test_twenty_streams_share_one_subscriber_connection(stack):
    requests_ = [json.dumps({"messages": [{"role": "user", "text": f"Count from {start} to {start + 5}."}],
                             "temperature": 0, "max_new_tokens": 16}) for start in range(20)]

    async def stream_all():
        admin = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
        samples = []

        async def sample():
            while True:
                samples.append(await api_subscribers(admin))
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        streams = await asyncio.gather(*(ws_messages(f"{stack.ws_url}/v1/ws", first=request)
                                         for request in requests_))
        sampler.cancel()
        deadline = time.monotonic() + 5
        while await job_channels(admin) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = await job_channels(admin), await api_subscribers(admin)
        await admin.aclose()
        return streams, samples, left

    streams, samples, (channels_left, subscribers_left) = asyncio.run(stream_all())
    for messages in streams:
        assert messages[-1]["done"] and messages[-1]["status"] == "succeeded", messages[-1]
        job = poll(stack, messages[-1]["id"])
        assert messages[-1]["text"] == job["prompt"] + job["text"]
    assert all(len(sample) <= 1 for sample in samples), samples  # never a second subscriber connection
    assert max(count for sample in samples for count in sample.values()) >= 10, samples  # but many channels on it
    assert channels_left == [] and subscribers_left == {}


def test_a_stream_survives_its_pubsub_connection_being_killed(stack):
    job_id = submit(stack, messages=STORY, temperature=0, max_new_tokens=64)

    async def kill_mid_stream():
        admin = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
        messages = []
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws", open_timeout=10) as socket:
            while len(messages) < 3:
                messages.append(json.loads(await socket.recv()))
            [killed] = await api_subscribers(admin)
            # Only the API's: `CLIENT KILL TYPE pubsub` would also cut the worker's Celery broker connection.
            assert await admin.execute_command("CLIENT", "KILL", "ID", killed) == 1
            # The API connects again and subscribes to the job's channel again, while the job still runs.
            deadline = time.monotonic() + 10
            while set(await api_subscribers(admin)) in (set(), {killed}):
                assert time.monotonic() < deadline, "the API did not subscribe again"
                await asyncio.sleep(0.05)
            async for raw in socket:
                messages.append(json.loads(raw))
        await admin.aclose()
        return messages

    messages = asyncio.run(kill_mid_stream())
    job = poll(stack, job_id)
    texts = [message["text"] for message in messages]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)
    assert messages[-1]["done"] and messages[-1]["status"] == "succeeded", messages[-1]
    assert texts[-1] == job["prompt"] + job["text"]


def test_websocket_streams_are_not_compressed_by_default(stack):
    """A client offering permessage-deflate (as `websockets` does) gets plain frames: compressing every chunk,
    which repeats the whole text so far, would cost the API CPU for each token (LLAVA_QUEUE_WS_COMPRESSION=1 turns
    it on)."""
    job_id = submit(stack, messages=STORY, temperature=0, max_new_tokens=4)

    async def handshake():
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws", compression="deflate") as socket:
            offered = socket.request.headers.get("Sec-WebSocket-Extensions", "")
            accepted = socket.response.headers.get("Sec-WebSocket-Extensions")
            messages = [json.loads(message) async for message in socket]
        return offered, accepted, messages

    offered, accepted, messages = asyncio.run(handshake())
    assert "permessage-deflate" in offered
    assert accepted is None
    assert messages[-1]["done"] and messages[-1]["status"] == "succeeded"


def test_a_client_that_leaves_after_the_last_message_is_not_an_error(stack):
    """Clients hang up as soon as they have the `done` message, often before the server's own close: that is how a
    stream ends, not an "Exception in ASGI application" with a traceback in the API log for every stream (what
    uvicorn logged for most streams before the API tolerated it)."""
    api_log = stack.log_dir / "api.log"
    logged_before = api_log.stat().st_size
    job_ids = [submit(stack, messages=STORY, temperature=0, max_new_tokens=2) for _ in range(6)]

    async def take_last_message_and_leave(job_id: str) -> dict:
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws", open_timeout=10) as socket:
            while True:
                message = json.loads(await socket.recv())
                if message.get("done"):
                    return message  # leaving the block closes the socket from this side at once

    async def all_of_them():
        return await asyncio.gather(*(take_last_message_and_leave(job_id) for job_id in job_ids))

    finals = asyncio.run(all_of_them())
    assert [final["status"] for final in finals] == ["succeeded"] * len(job_ids), finals
    time.sleep(1)  # the API has closed (or found closed) every socket
    with api_log.open() as log:
        log.seek(logged_before)
        logged = log.read()
    assert logged.count("connection open") >= len(job_ids), logged[-3000:]
    assert "Exception in ASGI application" not in logged, logged[-3000:]
    assert "Traceback" not in logged, logged[-3000:]


def test_a_client_that_asks_for_an_unknown_job_and_leaves_is_not_an_error(stack):
    """The "unknown job id" answer may find the client gone (it asked and hung up at once): no traceback."""
    api_log = stack.log_dir / "api.log"
    logged_before = api_log.stat().st_size

    async def ask_and_leave(index: int) -> None:
        socket = await websockets.connect(f"{stack.ws_url}/v1/jobs/{index:032x}/ws", open_timeout=10)
        socket.transport.abort()  # gone without a close frame, before the answer

    async def all_of_them():
        await asyncio.gather(*(ask_and_leave(index) for index in range(20)))

    asyncio.run(all_of_them())
    time.sleep(1)
    with api_log.open() as log:
        log.seek(logged_before)
        logged = log.read()
    assert logged.count("connection open") >= 20, logged[-3000:]
    assert "Exception in ASGI application" not in logged, logged[-3000:]


@pytest.fixture(scope="module")
def outage_stack(default_model_dir, tmp_path_factory):
    """A worker and an API on a Redis of their own, kept in an append-only file: a test stops that Redis
    (`stack.redis_server.stop()`) and starts it again on its port and folder (restart_redis), the jobs intact."""
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis-outage")).start()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4"}
    try:
        with run_stack(server.url, env, log_prefix="llava-queue-stream-outage-") as running:
            running.redis_server = server
            # A job that ended before any outage: joining its stream afterwards shows the API recovered.
            running.ended_job = submit(running, messages=STORY, temperature=0, max_new_tokens=4)
            assert wait_until(running, running.ended_job)["status"] == "succeeded"
            yield running
            server = running.redis_server
    finally:
        server.stop()


def restart_redis(stack) -> None:
    stopped = stack.redis_server
    stopped.stop()
    stack.redis_server = RedisServer(port=stopped.port, data_dir=stopped.data_dir).start()


async def until_closed(socket, first: str | None = None) -> tuple[list[dict], int, str]:
    """Every message of `socket` (after sending `first`) until the server closes it, and its close code and reason."""
    messages = []
    async with asyncio.timeout(60):
        if first is not None:
            await socket.send(first)
        with suppress(websockets.ConnectionClosed):
            async for raw in socket:
                messages.append(json.loads(raw))
    return messages, socket.close_code, socket.close_reason


async def connect_until_closed(url: str, first: str | None = None) -> tuple[list[dict], int, str]:
    async with websockets.connect(url, open_timeout=10) as socket:
        return await until_closed(socket, first)


def api_log(stack) -> str:
    return (stack.log_dir / "api.log").read_text(errors="replace")


LONG_REQUEST = json.dumps({"messages": STORY, "temperature": 0, "max_new_tokens": 200})
SHORT_REQUEST = json.dumps({"messages": STORY, "temperature": 0, "max_new_tokens": 4})


def assert_went_on(stack, job_id: str) -> None:
    """The job was neither cancelled nor failed for the stream's ending: it runs on at its worker, or has ended."""
    job = poll(stack, job_id)
    assert job["status"] in ("running", "succeeded") and job["error_code"] == 0, job


def assert_recovered(stack) -> None:
    """Streams work again once Redis is back, without restarting the API: the whole text and end of a job."""
    messages, code, _ = asyncio.run(connect_until_closed(f"{stack.ws_url}/v1/jobs/{stack.ended_job}/ws"))
    assert messages[-1]["done"] and messages[-1]["status"] == "succeeded" and code == 1000, messages


def assert_ends_unavailable(messages: list[dict], code: int, reason: str, job_id: str) -> None:
    """A stream that lost Redis: a last chunk that says so, with a non-zero error_code, then 1013 (Try Again Later)
    and a reason that names the job, which goes on."""
    last = messages[-1]
    assert last["error_code"] == 1 and last["done"] and last["id"] == job_id, messages[-3:]
    assert "unavailable" in last["error"] and last["text"] == last["error"], last
    assert code == 1013 and job_id in reason, (code, reason)


def test_redis_going_away_mid_stream_ends_websocket_streams_with_an_error_chunk(outage_stack):
    """Both WebSockets end with an error chunk and a 1013 close naming the job; their jobs go on at the worker (not
    cancelled; whether they end depends on the worker's Celery consumer surviving the outage, which it did not in
    this test's runs: "Unrecoverable error: AttributeError ... 'hostname'" in the worker log). Before, the
    follower's read of the job record raised out of the endpoint: "Exception in ASGI application" in the API log,
    the socket closed with 1011 and no last chunk. A client that left during the outage was cancelled with Redis
    away: a second unhandled exception (now: a warning, and its job goes on)."""
    stack = outage_stack
    joined_id = submit(stack, messages=STORY, temperature=0, max_new_tokens=200)

    async def across_an_outage():
        async with (websockets.connect(f"{stack.ws_url}/v1/jobs/{joined_id}/ws", open_timeout=10) as joined,
                    websockets.connect(f"{stack.ws_url}/v1/ws", open_timeout=10) as submitted,
                    websockets.connect(f"{stack.ws_url}/v1/ws", open_timeout=10) as leaver):
            await submitted.send(LONG_REQUEST)
            await leaver.send(LONG_REQUEST)
            firsts = [json.loads(await socket.recv()) for socket in (joined, submitted, leaver)]
            await asyncio.to_thread(stack.redis_server.stop)
            await leaver.close()
            return firsts, await asyncio.gather(until_closed(joined), until_closed(submitted))

    try:
        firsts, endings = asyncio.run(across_an_outage())
        leaver_id = firsts[2]["id"]
        deadline = time.monotonic() + 15
        while f"could not cancel job {leaver_id}" not in api_log(stack):
            assert time.monotonic() < deadline, api_log(stack)[-3000:]
            time.sleep(0.2)
    finally:
        restart_redis(stack)
    assert all(not first.get("done") for first in firsts), firsts  # the jobs were still running
    for (messages, code, reason), job_id in zip(endings, (joined_id, firsts[1]["id"])):
        assert_ends_unavailable(messages, code, reason, job_id)
    for job_id in (joined_id, firsts[1]["id"], leaver_id):
        assert_went_on(stack, job_id)
    assert_recovered(stack)


def test_redis_away_when_a_stream_is_asked_for_ends_it_with_an_error_chunk(outage_stack):
    """Asking for a stream while Redis is away: an error chunk and 1013, not an unhandled exception (a WebSocket
    has no exception handler to answer the app's 503); a submission on /v1/ws says when to try again, as its 429
    does. Polling and cancelling answer 503 with Retry-After. Once Redis is back, both streams work again."""
    stack = outage_stack
    job_id = stack.ended_job
    stack.redis_server.stop()
    try:
        joined = asyncio.run(connect_until_closed(f"{stack.ws_url}/v1/jobs/{job_id}/ws"))
        submitted = asyncio.run(connect_until_closed(f"{stack.ws_url}/v1/ws", SHORT_REQUEST))
        polled = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=30)
        cancelled = requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=30)
    finally:
        restart_redis(stack)
    assert_ends_unavailable(*joined, job_id)
    [refused], code, _ = submitted
    assert refused["error_code"] == 1 and refused["done"] and refused["retry_after"] == 5, refused
    assert "unavailable" in refused["error"] and code == 1013, (refused, code)
    for answer in (polled, cancelled):
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5", answer.text
        assert answer.json()["error"]["type"] == "unavailable", answer.text
    assert_recovered(stack)
    assert requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).status_code == 200


def test_a_worker_with_a_stream_interval_sends_the_same_text_in_fewer_chunks(stack, redis_server, default_model_dir):
    # LLAVA_QUEUE_STREAM_INTERVAL=4: the first token at once, then a chunk every 4 tokens, and the same text as a
    # worker that sends every token (greedy, the same model), in the record, the chunks and the WebSocket's frames.
    request = {"messages": STORY, "temperature": 0, "max_new_tokens": 30}
    every_token = wait_until(stack, submit(stack, **request))
    url = redis_server.url.rsplit("/", 1)[0] + "/5"  # a database of its own: only this stack's worker runs its jobs
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_STREAM_INTERVAL": "4"}
    with run_stack(url, env, log_prefix="llava-queue-interval-") as spaced:
        async def follow():
            admin = aioredis.Redis.from_url(url, decode_responses=True)
            chunks = admin.pubsub()
            await chunks.psubscribe("*:chunks:*")
            job_id = submit(spaced, **request)
            frames = asyncio.create_task(ws_messages(f"{spaced.ws_url}/v1/jobs/{job_id}/ws"))
            deltas = await published_deltas(chunks, job_id)
            await chunks.aclose()
            await admin.aclose()
            return job_id, deltas, await frames

        job_id, deltas, frames = asyncio.run(follow())
        job = wait_until(spaced, job_id)
    tokens = job["usage"]["completion_tokens"]
    assert job["status"] == every_token["status"] == "succeeded"
    assert (job["text"], tokens) == (every_token["text"], every_token["usage"]["completion_tokens"])
    assert tokens > 9, job
    assert "".join(deltas) == job["text"]
    assert len(deltas) <= 1 + -(-(tokens - 1) // 4), (tokens, deltas)  # the first token, then one chunk per 4 tokens
    assert frames[-1]["done"] and frames[-1]["text"] == job["prompt"] + job["text"]
    assert all(frame["text"].startswith(job["prompt"]) for frame in frames)


# A model no worker of the test stack serves: a job that names it waits queued until it is cancelled.
UNSERVED_MODEL = "llava-served-by-no-worker"


async def until_subscribed(admin: aioredis.Redis, present: bool, job_id: str = "", timeout: float = 10) -> list[str]:
    """Wait until the API holds a subscription to a job's channel (`job_id`'s, or any job's when it is "") or, with
    `present` False, no longer holds it; the channels then subscribed. AssertionError when it does not in time."""
    deadline = time.monotonic() + timeout
    while True:
        channels = [channel for channel in await job_channels(admin) if channel.endswith(job_id)]
        if bool(channels) == present:
            return channels
        assert time.monotonic() < deadline, f"still {'un' if present else ''}subscribed after {timeout} s: {channels}"
        await asyncio.sleep(0.05)


def test_a_client_that_leaves_a_queued_job_is_let_go_at_once(stack):
    """Nothing is sent while a job waits queued, so the API learned that its client had left only at the job's first
    chunk: a follower of a queued job kept its subscription, and a job submitted on /v1/ws was not cancelled, for as
    long as it waited (here, for ever: no worker serves its model)."""
    queued = submit(stack, messages=STORY, model=UNSERVED_MODEL, max_new_tokens=4)

    async def join_and_leave():
        admin = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{queued}/ws", open_timeout=10):
            await until_subscribed(admin, True, queued)
        await until_subscribed(admin, False, queued, timeout=3)
        async with websockets.connect(f"{stack.ws_url}/v1/ws", open_timeout=10) as submitting:
            await submitting.send(json.dumps({"messages": STORY, "model": UNSERVED_MODEL, "max_new_tokens": 4}))
            [channel] = await until_subscribed(admin, True)
        await until_subscribed(admin, False, timeout=3)
        await admin.aclose()
        return channel.rsplit(":", 1)[1]

    try:
        submitted = asyncio.run(join_and_leave())
        assert poll(stack, queued)["status"] == "queued"  # following it and leaving did not cancel it
        assert wait_until(stack, submitted, states=("cancelled",), timeout=5)["error_code"] == 5
    finally:
        requests.delete(f"{stack.base_url}/v1/jobs/{queued}", timeout=10)


def test_a_binary_first_message_on_v1_ws_is_read_as_the_request(stack):
    """A binary frame is read as the request's JSON (as a POST body is): bad, it is refused with an error chunk and
    1008; good, its job streams. Before, the first message was taken as text: a binary one raised KeyError in the
    endpoint ("Exception in ASGI application"), and the client saw the connection drop with no message (1006)."""
    refused, code, _ = asyncio.run(connect_until_closed(f"{stack.ws_url}/v1/ws", b"\xff not json"))
    assert len(refused) == 1 and refused[0]["error_code"] == 4 and refused[0]["done"], refused
    assert refused[0]["status"] == "rejected" and code == 1008, (refused, code)
    request = json.dumps({"messages": STORY, "temperature": 0, "max_new_tokens": 2}).encode()
    messages, code, _ = asyncio.run(connect_until_closed(f"{stack.ws_url}/v1/ws", request))
    assert messages[-1]["done"] and messages[-1]["status"] == "succeeded" and code == 1000, (messages, code)


def test_a_follower_that_falls_behind_holds_a_bounded_backlog_then_reads_the_record(redis_server):
    """A follower whose client reads slowly falls behind its job's chunks. Its queue keeps MAX_BACKLOG messages at
    most: past that they are replaced by None, which has the follower read the job record, the latest text, instead
    of every chunk it missed. Before, the queue grew by every chunk for as long as the client was behind."""
    from api.channel_hub import MAX_BACKLOG, ChannelHub

    async def publish_to_one_that_reads_nothing():
        aredis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        hub = ChannelHub(aredis)
        hub.start()
        async with hub.subscribe("behind") as behind, hub.subscribe("marker") as marker:
            for seq in range(1, 4 * MAX_BACKLOG + 1):
                await aredis.publish("behind", json.dumps({"seq": seq, "delta": "x"}))
            await aredis.publish("marker", "after")  # one connection: once it is here, so is everything before it
            assert await asyncio.wait_for(next_message(marker), 10) == "after"
            held = [behind.get_nowait() for _ in range(behind.qsize())]
            await aredis.publish("behind", json.dumps({"seq": 4 * MAX_BACKLOG + 1, "delta": "x"}))
            after = await asyncio.wait_for(next_message(behind), 10)
        await hub.aclose()
        await aredis.aclose()
        return held, after

    async def next_message(queue):
        """The next payload, past the None of a quiet tick (a slow machine may take one between two publishes)."""
        while (payload := await queue.get()) is None:
            pass
        return payload

    held, after = asyncio.run(publish_to_one_that_reads_nothing())
    assert len(held) <= MAX_BACKLOG, len(held)
    assert held[0] is None, held[:2]
    assert [json.loads(payload)["seq"] for payload in held[1:]] == list(range(4 * MAX_BACKLOG - len(held) + 2,
                                                                              4 * MAX_BACKLOG + 1))
    assert json.loads(after)["seq"] == 4 * MAX_BACKLOG + 1  # a follower that reads again gets every message again


def test_a_client_that_stops_reading_is_let_go(stack):
    """A client that keeps its connection but reads nothing: once a message has waited the send timeout to be
    sent, the stream ends and its subscription goes. Before, the follower waited on that send for as long as the
    client held the connection, still subscribed, its queue taking every chunk, long after the job had ended:
    uvicorn's keepalive timeout (40 s) closes such a connection only once its unread data are sent."""
    # Every message repeats the prompt, 200 kB in about 3,000 tokens: 15 of them are more than the socket buffers of
    # a connection on this host hold (about 3 MB). The client joins while the job has no text (nothing is sent to it
    # until the first token, so it answers uvicorn's pings meanwhile): it is sent every one of the 60 tokens' messages,
    # however slowly or fast the job runs. Joined once the job streamed, it was sent what was left, too little to fill
    # the buffers where the test was late to join (a loaded machine): the stream ended with the job, not let go.
    job_id = submit(stack, prompt="=" * 200_000, temperature=0, max_new_tokens=60)

    async def stop_reading():
        admin = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
        host, port = stack.base_url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, so the server's sends stall
        sock.connect((host, int(port)))
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws", sock=sock, max_queue=1,
                                      ping_interval=None, open_timeout=10) as unread:
            await until_subscribed(admin, True, job_id)
            # Subscribed before the first token: every chunk of the job reaches this follower.
            joined = await asyncio.to_thread(poll, stack, job_id)
            assert not joined["text"], f"the job streamed before its client joined: {joined['usage']}"
            # Its prompt read (seconds, minutes on a loaded machine), then its 60 tokens.
            job = await asyncio.to_thread(wait_until, stack, job_id, timeout=240)
            await until_subscribed(admin, False, job_id, timeout=SEND_TIMEOUT_SECONDS + LET_GO_SLACK_SECONDS)
            # The API logs why it let the client go just after it unsubscribes; the client stays until then (gone
            # sooner, it would have left, not been let go).
            deadline = time.monotonic() + LET_GO_SLACK_SECONDS
            while f"the client of job {job_id} read nothing for" not in api_log(stack):
                assert time.monotonic() < deadline, api_log(stack)[-3000:]
                await asyncio.sleep(0.2)
            unread.transport.abort()
        await admin.aclose()
        return job

    job = asyncio.run(stop_reading())
    assert job["status"] == "succeeded" and job["usage"]["completion_tokens"] >= 40, job
