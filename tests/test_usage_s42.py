"""vLLM's `stream_options.continuous_usage_stats`: every streamed chunk carries the usage so far. It was ignored: a
client of vLLM's counting tokens as they come got `usage: null` in every chunk but the last (or no usage at all)."""

import asyncio
import json

import openai
import pytest
import redis.asyncio as aioredis
import requests

from test_openai import MODEL, STORY
from test_openai_s40 import STORY as STORY_PROMPT


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def streamed_chunks(stack, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed completion, as sent (before `data: [DONE]`)."""
    response = requests.post(f"{stack.base_url}{path}", timeout=60, json={"model": MODEL, "stream": True, **body})
    assert response.status_code == 200, response.text
    events = response.content.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


def assert_counts_so_far(chunks: list, final) -> None:
    """Every chunk (objects or dicts) carries the usage so far: the prompt's count, a generated count that never
    falls and ends at the final usage's."""
    usages = [chunk["usage"] if isinstance(chunk, dict) else chunk.usage.model_dump() for chunk in chunks]
    assert all(usage is not None for usage in usages), usages
    assert all(usage["prompt_tokens"] == final["prompt_tokens"] > 0 for usage in usages), usages
    assert all(usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] for usage in usages)
    generated = [usage["completion_tokens"] for usage in usages]
    assert generated == sorted(generated) and generated[-1] == final["completion_tokens"], generated
    # Counted as the job went (each chunk's message says its count), not read once and then the end's count.
    assert len(set(generated) - {0}) > 2, generated


def test_the_openai_package_gets_the_usage_so_far_in_every_chat_chunk(stack, client):
    stream = client.chat.completions.create(
        model=MODEL, messages=STORY, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True})
    *chunks, final = list(stream)
    assert final.choices == [] and final.usage.completion_tokens == 12
    assert_counts_so_far(chunks, final.usage.model_dump())
    # The role chunk comes first, as vLLM's, with the prompt's count and nothing generated yet.
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage.completion_tokens == 0
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_legacy_stream_gets_the_usage_so_far_and_other_options_are_as_they_were(stack):
    # continuous_usage_stats alone asks for usage, as vLLM (whose include_usage is true unless said otherwise).
    *chunks, final = streamed_chunks(stack, "/v1/completions", {
        "prompt": STORY_PROMPT, "temperature": 0, "max_tokens": 12, "stream_options": {"continuous_usage_stats": True}})
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 12
    assert_counts_so_far(chunks, final["usage"])
    # include_usage alone: usage null in every chunk but the last, as OpenAI; include_usage false: none anywhere,
    # continuous or not, as vLLM.
    *chunks, final = streamed_chunks(stack, "/v1/chat/completions", {
        "messages": STORY, "max_tokens": 4, "stream_options": {"include_usage": True}})
    assert all(chunk["usage"] is None for chunk in chunks) and final["usage"]["completion_tokens"] == 4
    chunks = streamed_chunks(stack, "/v1/chat/completions", {
        "messages": STORY, "max_tokens": 4, "stream_options": {"include_usage": False, "continuous_usage_stats": True}})
    assert chunks[-1]["choices"] and all("usage" not in chunk for chunk in chunks)
    answer = requests.post(f"{stack.base_url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": STORY, "stream": True, "stream_options": {"continuous_usage_stats": "yes"}})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream_options.continuous_usage_stats"


def test_a_follower_that_reads_the_record_has_its_token_count(redis_server):
    # A follower that comes late, or missed messages (a lagging client's backlog dropped), reads the record: its
    # events carried a count of 0, and a stream's usage stayed at the count of before the text it caught up with.
    from api.channel_hub import ChannelHub
    from api.stream import follow_job
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest

    store = JobStore.from_url(redis_server.url, "usage-s42")
    job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
    assert store.start(job_id, "w1") == "running"
    store.record_step("w1", [(job_id, "Hello", 3, True)], [], step=1)
    store.record_step("w1", [(job_id, " there", 5, False)], [], step=2)

    async def first_event():
        aredis = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        hub = ChannelHub(aredis)
        hub.start()
        try:
            events = follow_job(store, hub, job_id)
            event = await anext(events)
            await events.aclose()
            return event
        finally:
            await hub.aclose()
            await aredis.aclose()

    event = asyncio.run(first_event())
    assert event.text.endswith("Hello there") and event.tokens == 5
