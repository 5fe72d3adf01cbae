"""A worker writes the steps that end no job on a thread of its own (workers/step_writer.py): whatever happens
meanwhile (many jobs streaming, some cancelled, Redis paused, the worker stopped and its jobs handed back), every
job's published chunks are its record's text, in order, each once, and its token count is what it generated."""

import json
import os
import signal
import sys
import threading
import time

import pytest
import redis
import requests

from conftest import job_final, run_stack, start_service
from shared.redis_server import RedisServer
from shared.settings import Settings

KEY_PREFIX = Settings().key_prefix


class Chunks:
    """Every message published on the jobs' channels, by job id, read on a thread from the test's start."""

    def __init__(self, url: str):
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe(f"{KEY_PREFIX}:chunks:*")
        self.messages: dict[str, list[dict]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message is not None:
                job_id = message["channel"].rsplit(":", 1)[1]
                self.messages.setdefault(job_id, []).append(json.loads(message["data"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()

    def mismatches(self, job_ids: list[str]) -> list[tuple]:
        """The jobs whose published messages are not their record: seq numbers 1, 2, 3... then one last message,
        and the deltas, joined, the record's text (a chunk lost, repeated or out of order shows here)."""
        wrong = []
        for job_id in job_ids:
            record = self.client.hgetall(f"{KEY_PREFIX}:job:{job_id}")
            messages = self.messages.get(job_id, [])
            seqs = [message["seq"] for message in messages if not message.get("done")]
            text = "".join(message["delta"] for message in messages if "delta" in message)
            last = [message for message in messages if message.get("done")]
            if (seqs != list(range(1, len(seqs) + 1)) or text != record.get("text") or len(last) != 1
                    or last[0]["status"] != record.get("status")):
                wrong.append((job_id, seqs, text, record.get("text"), last))
        return wrong


def submit(base_url: str, text: str, max_new_tokens: int) -> str:
    response = requests.post(f"{base_url}/v1/jobs", json={"messages": [{"role": "user", "text": text}],
                                                          "temperature": 0, "max_new_tokens": max_new_tokens},
                             timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def until_every_job_has(client: redis.Redis, job_ids: list[str], tokens: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while min(int(client.hget(f"{KEY_PREFIX}:job:{job_id}", "completion_tokens") or 0) for job_id in job_ids) < tokens:
        assert time.monotonic() < deadline, f"the jobs did not reach {tokens} tokens in {timeout} s"
        time.sleep(0.02)


def behind_env() -> dict[str, str]:
    """A worker that writes its steps behind its engine (`writes_behind`): a CPU engine on a core of its own."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one for the engine, one for the rest")
    return {"LLAVA_QUEUE_ENGINE_CPUS": str(cpus[-1])}


@pytest.mark.parametrize("stream_interval, behind", [("1", True), ("3", True), ("3", False)],
                         ids=["behind-1", "behind-3", "inline-3"])
def test_jobs_streamed_together_some_cancelled_and_redis_paused_keep_every_chunk(default_model_dir,
                                                                               stream_interval, behind):
    # 24 greedy jobs in one batch; a third of them cancelled mid-stream (the writer may be writing their step as the
    # engine drops them), then Redis paused for 2 s (the engine waits one step later, with a write in flight).
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "32",
           "LLAVA_QUEUE_STREAM_INTERVAL": stream_interval, **(behind_env() if behind else {})}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-step-writer-") as stack:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        chunks = Chunks(server.url)
        try:
            job_ids = [submit(stack.base_url, f"Tell me story number {n} about a cat.", 100) for n in range(24)]
            until_every_job_has(client, job_ids, 5)
            cancelled = job_ids[::3]
            for job_id in cancelled:
                assert requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).status_code == 202
            until_every_job_has(client, [job_id for job_id in job_ids if job_id not in cancelled], 20)
            server.process.send_signal(signal.SIGSTOP)
            time.sleep(2)
            server.process.send_signal(signal.SIGCONT)
            jobs = {job_id: job_final(stack, job_id, timeout=120) for job_id in job_ids}
            time.sleep(0.5)  # the last messages reach the reader
            assert chunks.mismatches(job_ids) == []
        finally:
            chunks.close()
            client.close()
    assert {job_id for job_id, job in jobs.items() if job["status"] == "cancelled"} == set(cancelled), jobs
    # Each of the others ran to its limit, or to an end of sequence before it.
    assert all(job["status"] == "succeeded" and (job["usage"]["completion_tokens"] == 100) == (job["finish_reason"]
               == "length") for job_id, job in jobs.items() if job_id not in cancelled), jobs


def test_jobs_handed_back_at_shutdown_keep_their_text_and_token_count(default_model_dir):
    # A worker told to stop (no grace) hands its 16 jobs back mid-stream, with a step in flight; its Celery consumer,
    # still running, takes one of them again, and another worker resumes the rest. The job taken again ran while the
    # task of its first attempt was still ending: that task's `finally` cleared the new run's `_done_before` (and its
    # held text, and its place in `_active`), and the job ended "succeeded" with 98 of its 120 tokens counted.
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "32",
           "LLAVA_QUEUE_STREAM_INTERVAL": "3", "LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS": "0",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4", **behind_env()}
    with RedisServer() as server, run_stack(server.url, env, workers=("first",),
                                            log_prefix="llava-queue-step-writer-") as stack:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        chunks = Chunks(server.url)
        try:
            job_ids = [submit(stack.base_url, f"Tell me story number {n} about a fox.", 120) for n in range(16)]
            until_every_job_has(client, job_ids, 20)
            first = stack.processes["first"]
            first.send_signal(signal.SIGTERM)
            first.wait(60)
            stack.processes["second"] = start_service("second", ["worker"],
                                                      dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=server.url),
                                                      stack.log_dir)
            jobs = {job_id: job_final(stack, job_id, timeout=180) for job_id in job_ids}
            time.sleep(0.5)
            assert chunks.mismatches(job_ids) == []
        finally:
            chunks.close()
            client.close()
    assert any(job["attempts"] == 2 for job in jobs.values()), jobs  # the jobs were handed back, not finished
    # A job that ran to its limit counts all 120 tokens (an end of sequence before it is no fault).
    wrong = {job_id: (job["status"], job["attempts"], job["usage"]["completion_tokens"], job["finish_reason"])
             for job_id, job in jobs.items()
             if job["status"] != "succeeded" or (job["usage"]["completion_tokens"] == 120) != (job["finish_reason"]
                                                                                           == "length")}
    assert wrong == {}, stack.logs()
    # The job id tagging the two tasks' log lines (shared/logs.py) was reset in the wrong context as the first ended.
    assert "was created in a different Context" not in stack.logs()


def test_the_writer_keeps_order_goes_on_after_any_error_and_waits_only_for_writes_before():
    # In order, one at a time; a write that raises even what is not an Exception leaves the thread going (the
    # engine's next step would wait on a dead one for good); `wait` returns once the writes submitted before it are
    # done, while an engine goes on submitting.
    from workers.step_writer import StepWriter

    writer, order = StepWriter(), []
    for n in range(50):
        writer.submit(lambda n=n: (time.sleep(0.0005), order.append(n)))
    writer.submit(lambda: sys.exit("a write that asks the process to exit"))
    waiting = threading.Thread(target=writer.wait, daemon=True)
    waiting.start()
    waiting.join(10)
    assert not waiting.is_alive(), "the writer's thread died with its write"
    assert order == list(range(50))
    stop, steps = threading.Event(), []

    def engine():
        while not stop.is_set():
            writer.submit(lambda: (time.sleep(0.01), steps.append(1)))

    thread = threading.Thread(target=engine, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not steps:
            assert time.monotonic() < deadline, "no write ran after the one that raised"
            time.sleep(0.005)
        started = time.monotonic()
        writer.wait()
        assert time.monotonic() - started < 1.0
    finally:
        stop.set()
        thread.join(5)
    writer.submit(lambda: order.append("after"))
    writer.wait()
    assert order[-1] == "after"


def test_a_job_delivered_again_waits_for_its_handed_back_run_and_a_stale_mark_is_cleared(redis_server,
                                                                                          default_model_dir):
    # workers/generation.py, JobRunner.run: a job handed back as its worker stops, delivered to the same worker again
    # while its first run is still ending, waits for that run's end before it starts (its `finally` cleared the new
    # run's state). A hand-back mark that no live run holds (its answer came after the run had ended) does not make
    # the new run wait, and is cleared: it kept the run's ending from ever being written.
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest
    from workers.builder import load_model
    from workers.generation import JobRunner

    store = JobStore.from_url(redis_server.url, prefix="rerun")
    # No engine attached: a run that starts fails its job at `add_request`, which shows it started.
    runner = JobRunner(store, load_model(str(default_model_dir), device="cpu", dtype="float32"), "w1")
    waiting, _ = store.create(GenerateRequest(prompt="p"), "interactive")
    runner._active.add(waiting)
    runner._handed_back.add(waiting)
    outcome = []
    second = threading.Thread(target=lambda: outcome.append(runner.run(waiting)), daemon=True)
    second.start()
    time.sleep(0.5)
    assert second.is_alive() and store.get(waiting)["status"] == "queued"  # not started while the first run lives
    with runner._runs_changed:  # the first run's `finally`
        runner._active.discard(waiting)
        runner._handed_back.discard(waiting)
        runner._runs_changed.notify_all()
    second.join(10)
    # It started (and failed, this runner having no engine).
    assert outcome == ["failed"] and store.get(waiting)["attempts"] == 1, (outcome, store.get(waiting))

    stale, _ = store.create(GenerateRequest(prompt="p"), "interactive")
    runner._handed_back.add(stale)
    outcome = []
    third = threading.Thread(target=lambda: outcome.append(runner.run(stale)), daemon=True)
    third.start()
    third.join(10)
    assert outcome == ["failed"] and store.get(stale)["status"] == "failed", "a stale mark held the run"
    assert stale not in runner._handed_back
    store.redis.close()
