"""Faults on the real processes: a worker killed mid-batch loses no job."""

import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import requests
import websockets

from conftest import Stack, start_service, wait_for_stack
from shared.redis_server import RedisServer, free_port


@pytest.fixture
def two_workers(default_model_dir):
    """A Redis of its own, an API, and two workers with a fast heartbeat."""
    log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-faults-"))
    with RedisServer() as redis_server:
        port = free_port()
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_MODEL_PATH=str(default_model_dir),
                   LLAVA_QUEUE_MAX_NUM_SEQS="4", LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS="1",
                   LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS="4")
        processes = {"worker-a": start_service("worker-a", ["worker"], env, log_dir),
                     "worker-b": start_service("worker-b", ["worker"], env, log_dir),
                     "api": start_service("api", ["api", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)}
        stack = Stack(f"http://127.0.0.1:{port}", redis_server.url, log_dir, processes)
        try:
            wait_for_stack(stack, workers=2)
            yield stack
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                process.wait()


def test_a_worker_killed_mid_batch_loses_no_job(two_workers):
    stack = two_workers
    story = [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}]
    ids = [requests.post(f"{stack.base_url}/v1/jobs", json={"messages": story, "temperature": 0,
                                                           "max_new_tokens": 120}, timeout=10).json()["id"]
           for _ in range(6)]

    def jobs():
        return [requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json() for job_id in ids]

    # Wait until worker A holds running jobs that have produced text, then kill it.
    pid_a = stack.processes["worker-a"].pid
    deadline = time.monotonic() + 120
    while True:
        held = [job for job in jobs() if job["status"] == "running" and job["usage"]["completion_tokens"] > 3
                and f":{pid_a}" in (job.get("worker") or "")]
        if held:
            break
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)
    victim = held[0]["id"]

    async def follow(job_id):
        texts = []
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws") as socket:
            async for raw in socket:
                texts.append(json.loads(raw))
        return texts

    async def kill_while_streaming():
        listener = asyncio.create_task(follow(victim))
        await asyncio.sleep(0.3)
        os.kill(pid_a, signal.SIGKILL)
        return await asyncio.wait_for(listener, 180)

    messages = asyncio.run(kill_while_streaming())
    texts = [message["text"] for message in messages]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)  # the stream went on where it stopped: nothing taken back
    assert messages[-1]["status"] == "succeeded", messages[-1]

    deadline = time.monotonic() + 240
    while any(job["status"] in ("queued", "running") for job in jobs()):
        assert time.monotonic() < deadline, f"{jobs()}\n{stack.logs()}"
        time.sleep(0.5)
    final = jobs()
    assert [job["status"] for job in final] == ["succeeded"] * 6, final
    victim_job = next(job for job in final if job["id"] == victim)
    assert victim_job["attempts"] == 2 and victim_job["worker"].endswith(f":{stack.processes['worker-b'].pid}")
    assert victim_job["usage"]["completion_tokens"] <= 120
