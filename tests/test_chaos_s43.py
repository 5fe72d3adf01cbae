"""Faults while streams are relayed: what each client is told when Redis comes back without the job it follows."""

import asyncio
import json

import pytest
import websockets

from conftest import run_stack
from shared.protocol import ErrorCode
from shared.redis_server import RedisServer

STORY = [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}]


@pytest.fixture
def ephemeral_redis_stack(default_model_dir):
    """An API and a worker on a Redis of their own that keeps nothing; yields (stack, restart), where restart() stops
    that Redis and starts an empty one on its port."""
    servers = [RedisServer().start()]

    def restart() -> None:
        servers[-1].stop()
        servers.append(RedisServer(port=servers[0].port).start())

    try:
        with run_stack(servers[0].url, {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir),
                                        "LLAVA_QUEUE_MAX_NUM_SEQS": "4"},
                       log_prefix="llava-queue-chaos-") as stack:
            yield stack, restart
    finally:
        servers[-1].stop()


def test_a_stream_whose_job_redis_lost_keeps_its_text_and_says_why(ephemeral_redis_stack):
    # Redis restarted without its data mid-stream: the job's record is gone (the worker drops the job). The socket's
    # last message was the answer for an id never known, "unknown job id", with an empty text: every word the client
    # had been sent was taken back, and it was told its own job never existed.
    stack, restart = ephemeral_redis_stack

    async def stream_through_a_restart():
        messages = []
        async with websockets.connect(f"{stack.ws_url}/v1/ws") as socket:
            await socket.send(json.dumps({"messages": STORY, "temperature": 0, "max_new_tokens": 400}))
            while len(messages) < 5:
                messages.append(json.loads(await socket.recv()))
            seen = messages[-1]["text"]
            restart()
            async for raw in socket:
                messages.append(json.loads(raw))
        return seen, messages

    seen, messages = asyncio.run(asyncio.wait_for(stream_through_a_restart(), 60))
    last = messages[-1]
    assert last["done"] and last["status"] == "unknown" and last["error_code"] == ErrorCode.NOT_FOUND, last
    assert seen and last["text"].startswith(seen), (seen, last)
    assert f"job {last['id']} is gone" in last["error"] and "Redis restarted without its data" in last["error"]


def test_a_chat_completion_stream_whose_job_redis_lost_says_why(ephemeral_redis_stack):
    # The same over OpenAI's server-sent events: the error said the record "expired", a cause that cannot come
    # mid-stream.
    import requests

    stack, restart = ephemeral_redis_stack
    [model] = [entry["id"] for entry in requests.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]]
    with requests.post(f"{stack.base_url}/v1/chat/completions", stream=True, timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": STORY[0]["text"]}], "stream": True,
            "temperature": 0, "max_tokens": 400}) as answer:
        events = answer.iter_lines()
        for _ in range(5):
            assert next(line for line in events if line.startswith(b"data: "))
        restart()
        rest = [line for line in events if line.startswith(b"data: ")]
    assert rest[-1] == b"data: [DONE]", rest[-3:]
    error = json.loads(rest[-2][len(b"data: "):])["error"]
    assert error["message"].endswith("is gone (its record left Redis while it was streamed)"), error
