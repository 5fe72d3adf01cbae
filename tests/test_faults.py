"""Faults on the real processes: a worker killed mid-batch loses no job; Redis away and back loses none."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
import requests
import torch
import websockets
from celery.worker.consumer.consumer import CONNECTION_ERROR

from conftest import run_stack, start_service, wait_for_stack
from shared.redis_server import RedisServer
from shared.jobs import Ending, JobStore
from shared.protocol import SERVER_ERROR_MSG, GenerateRequest
from workers.consumer import OnceInAWhile
from workers.generation import JobRunner, when_redis_answers


@pytest.fixture
def two_workers(default_model_dir):
    """A Redis of its own, an API, and two workers with a fast heartbeat."""
    with RedisServer() as redis_server:
        env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
               "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4",
               "LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS": "1"}
        with run_stack(redis_server.url, env, workers=("worker-a", "worker-b"),
                       log_prefix="llava-queue-faults-") as stack:
            yield stack


STORY = [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}]


def submit_stories(stack, count: int, max_new_tokens: int = 64) -> list[str]:
    return [requests.post(f"{stack.base_url}/v1/jobs", json={"messages": STORY, "temperature": 0,
                                                            "max_new_tokens": max_new_tokens}, timeout=10).json()["id"]
            for _ in range(count)]


def get_jobs(stack, ids: list[str]) -> list[dict]:
    return [requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json() for job_id in ids]


def running_job(stack, ids: list[str]) -> tuple[dict, str, str]:
    """Wait until some worker runs one of the jobs and it has produced text.

    Returns that job, the worker that holds it, and the other worker (Celery decides who takes what).
    """
    pids = {stack.processes[name].pid: name for name in ("worker-a", "worker-b")}
    deadline = time.monotonic() + 120
    while True:
        for job in get_jobs(stack, ids):
            holder = pids.get(int((job.get("worker") or ":0").rpartition(":")[2] or 0))
            if job["status"] == "running" and job["usage"]["completion_tokens"] > 3 and holder:
                other = "worker-b" if holder == "worker-a" else "worker-a"
                return job, holder, other
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)


def until_one_runs_with_text(stack, ids: list[str]) -> None:
    """Wait until one of the jobs runs and has produced a few tokens."""
    deadline = time.monotonic() + 120
    while not any(job["status"] == "running" and job["usage"]["completion_tokens"] > 3 for job in get_jobs(stack, ids)):
        assert time.monotonic() < deadline, stack.logs()
        time.sleep(0.1)


def wait_all_final(stack, ids: list[str]) -> list[dict]:
    deadline = time.monotonic() + 400
    while any(job["status"] in ("queued", "running") for job in get_jobs(stack, ids)):
        assert time.monotonic() < deadline, f"{get_jobs(stack, ids)}\n{stack.logs()}"
        time.sleep(0.5)
    return get_jobs(stack, ids)


def test_sigterm_hands_running_jobs_back_and_exits(two_workers):
    stack = two_workers
    # Long enough that a job running at SIGTERM cannot finish within the shutdown grace (1 s): with 64 tokens it
    # could, once the engine's decode steps got faster (2026-12-05), and then it was never handed back.
    ids = submit_stories(stack, 4, max_new_tokens=400)
    victim, holder, other = running_job(stack, ids)
    started = time.monotonic()
    stack.processes[holder].terminate()
    stack.processes[holder].wait(30)
    assert time.monotonic() - started < 25
    final = wait_all_final(stack, ids)
    assert [job["status"] for job in final] == ["succeeded"] * 4, final
    resumed = next(job for job in final if job["id"] == victim["id"])
    assert resumed["text"].startswith(victim["text"]) and resumed["attempts"] >= 2
    assert resumed["worker"].endswith(f":{stack.processes[other].pid}")


def test_a_cold_shutdown_hands_running_jobs_back(two_workers):
    # Ctrl-C twice (Celery's cold shutdown): Celery's thread pool cannot kill a task (NotImplementedError, a CRITICAL
    # traceback), and the engine's shutdown could end every job still in it failed ("engine shut down").
    stack = two_workers
    ids = submit_stories(stack, 4, max_new_tokens=400)
    victim, holder, other = running_job(stack, ids)
    stack.processes[holder].send_signal(signal.SIGINT)
    time.sleep(0.3)
    stack.processes[holder].send_signal(signal.SIGINT)
    stack.processes[holder].wait(30)
    final = wait_all_final(stack, ids)
    assert [job["status"] for job in final] == ["succeeded"] * 4, final
    resumed = next(job for job in final if job["id"] == victim["id"])
    assert resumed["text"].startswith(victim["text"]) and resumed["attempts"] >= 2
    assert resumed["worker"].endswith(f":{stack.processes[other].pid}")
    log = (stack.log_dir / f"{holder}.log").read_text()
    assert "shutting down at once: handed" in log and "Traceback" not in log, log[-3000:]


def test_a_worker_killed_mid_batch_loses_no_job(two_workers):
    stack = two_workers
    ids = submit_stories(stack, 6)
    victim_job, holder, other = running_job(stack, ids)
    victim, holder_pid = victim_job["id"], stack.processes[holder].pid

    async def follow(job_id):
        texts = []
        async with websockets.connect(f"{stack.ws_url}/v1/jobs/{job_id}/ws") as socket:
            async for raw in socket:
                texts.append(json.loads(raw))
        return texts

    async def kill_while_streaming():
        listener = asyncio.create_task(follow(victim))
        await asyncio.sleep(0.3)
        os.kill(holder_pid, signal.SIGKILL)
        return await asyncio.wait_for(listener, 180)

    messages = asyncio.run(kill_while_streaming())
    texts = [message["text"] for message in messages]
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before)  # the stream went on where it stopped: nothing taken back
    assert messages[-1]["status"] == "succeeded", messages[-1]

    final = wait_all_final(stack, ids)
    assert [job["status"] for job in final] == ["succeeded"] * 6, final
    victim_job = next(job for job in final if job["id"] == victim)
    assert victim_job["attempts"] == 2 and victim_job["worker"].endswith(f":{stack.processes[other].pid}")
    assert victim_job["usage"]["completion_tokens"] <= 64


def test_redis_stopped_and_restarted_under_load_loses_no_job(default_model_dir, tmp_path):
    """Redis with an append-only file stops mid-batch and comes back on the same port: the API answers
    503 meanwhile, the worker reconnects, and every job accepted before the outage ends."""
    redis_server = RedisServer(data_dir=tmp_path).start()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4"}
    try:
        with run_stack(redis_server.url, env, log_prefix="llava-queue-redis-outage-") as stack:
            ids = submit_stories(stack, 6)
            until_one_runs_with_text(stack, ids)
            redis_server.stop()  # SIGTERM: the server writes its file and exits
            down = requests.get(f"{stack.base_url}/v1/jobs/{ids[0]}", timeout=10)
            assert down.status_code == 503 and "unavailable" in down.json()["error"]["message"]
            time.sleep(3)  # the worker's batch runs into the outage
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path).start()
            final = wait_all_final(stack, ids)
            assert [job["status"] for job in final] == ["succeeded"] * 6, (final, stack.logs())
            again = submit_stories(stack, 1)
            assert wait_all_final(stack, again)[0]["status"] == "succeeded"
    finally:
        redis_server.stop()


def test_a_worker_with_free_slots_takes_jobs_again_after_a_redis_outage(default_model_dir, tmp_path):
    """With a slot free, the worker's Celery consumer is reading the queues when Redis goes: kombu's channel, closed
    for the reconnect, tried to give the running jobs' messages back through a client it could no longer build
    (AttributeError 'hostname', "Unrecoverable error"), and the consumer died: the running jobs ended, but the worker
    never took another job."""
    redis_server = RedisServer(data_dir=tmp_path).start()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4"}
    try:
        with run_stack(redis_server.url, env, log_prefix="llava-queue-consumer-outage-") as stack:
            ids = submit_stories(stack, 2)
            until_one_runs_with_text(stack, ids)
            redis_server.stop()
            time.sleep(3)
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path).start()
            assert [job["status"] for job in wait_all_final(stack, ids)] == ["succeeded"] * 2, stack.logs()
            again = submit_stories(stack, 1)
            deadline = time.monotonic() + 120
            while get_jobs(stack, again)[0]["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, f"the worker took no job after the outage\n{stack.logs()}"
                time.sleep(0.5)
            assert get_jobs(stack, again)[0]["status"] == "succeeded"
            assert "Unrecoverable error" not in (stack.log_dir / "worker.log").read_text()
    finally:
        redis_server.stop()


def test_slots_kept_for_interactive_jobs_stay_kept_after_a_redis_outage(default_model_dir, tmp_path):
    """With BATCH_RESERVED_SLOTS, a worker running its share of batch jobs stops reading the batch queue. Celery
    rebuilds its queue consumer when it reconnects after a Redis outage, reading every queue again: the worker
    took batch jobs into the slots kept for interactive ones, and with a batch backlog never gave them back."""
    redis_server = RedisServer(data_dir=tmp_path).start()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2",
           "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "1"}
    try:
        with run_stack(redis_server.url, env, log_prefix="llava-queue-reserved-outage-") as stack:
            ids = [requests.post(f"{stack.base_url}/v1/jobs", json={"messages": STORY, "temperature": 0,
                                                                    "max_new_tokens": 256, "queue": "batch"},
                                 timeout=10).json()["id"] for _ in range(4)]
            until_one_runs_with_text(stack, ids)
            redis_server.stop()
            time.sleep(3)
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path).start()
            peak, deadline = 0, time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    jobs = get_jobs(stack, ids)
                except (requests.RequestException, KeyError):
                    continue  # the API still reconnecting
                peak = max(peak, sum(job.get("status") == "running" for job in jobs))
                time.sleep(0.1)
            assert peak == 1, (get_jobs(stack, ids), stack.logs())
            for job_id in ids:
                requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
    finally:
        redis_server.stop()


def test_a_worker_takes_jobs_within_seconds_of_redis_coming_back_after_a_long_outage(default_model_dir, tmp_path):
    """kombu waits 2, 4, 6 ... up to 30 s between a consumer's tries to reach the broker: after an outage of 13 s
    the worker's next try came 7 s after Redis was back (after a minute's, up to 30 s), while the API took
    submissions at once. Its consumer tries every second now, as the worker's other loops do, and Celery's error
    at each failed try is logged once in 30 s (the first of the outage here), not every second."""
    redis_server = RedisServer(data_dir=tmp_path).start()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2"}

    def submit() -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Hello", "max_new_tokens": 2},
                                       timeout=10)
                if answer.status_code == 202:
                    return answer.json()["id"]
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, stack.logs()  # the API answers 503 while Redis is away
            time.sleep(0.2)

    try:
        with run_stack(redis_server.url, env, log_prefix="llava-queue-reconnect-") as stack:
            assert wait_all_final(stack, [submit()])[0]["status"] == "succeeded"
            redis_server.stop()
            time.sleep(13)
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path).start()
            back = time.time()
            job = wait_all_final(stack, [submit()])[0]
            assert job["status"] == "succeeded", stack.logs()
            assert job["started_at"] - back < 5, f"started {job['started_at'] - back:.1f} s after Redis came back"
            # 13 to 26 failed tries, one "Cannot connect" logged.
            log = (stack.log_dir / "worker.log").read_text()
            assert log.count("consumer: Cannot connect to") == 1, stack.logs()
            # The running jobs go on through an outage, said outright: Celery's six-line warning that version 6
            # will cancel them is not shown at each lost connection.
            assert "In Celery 5.1 we introduced" not in log, log
    finally:
        redis_server.stop()


# Runs `llava-queue worker` with kombu's waits between reconnection tries cut to 10 ms (2, 4, ... 30 s): only the
# clock is sped up, the number of tries is the worker's own.
FAST_RECONNECTS = """
import runpy, sys
import kombu.connection

ensure_connection = kombu.connection.Connection._ensure_connection


def fast(self, *args, **kwargs):
    kwargs.update(interval_start=0.01, interval_step=0, interval_max=0.01)
    return ensure_connection(self, *args, **kwargs)


kombu.connection.Connection._ensure_connection = fast
sys.argv = ["llava-queue", "worker"]
runpy.run_module("shared.cli", run_name="__main__")
"""


def test_a_worker_outlasts_a_redis_outage_longer_than_celerys_reconnection_tries(default_model_dir, tmp_path):
    """Celery gives up reconnecting to the broker after broker_connection_max_retries tries (100 by default: about 46
    minutes of its waits) and the worker exited, with status 0 (so a supervisor restarting on failure left it down),
    and never took a job again; its other loops, and the API, wait for Redis as long as it takes."""
    redis_server = RedisServer(data_dir=tmp_path).start()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2"}

    def one_job_succeeds(stack, worker) -> None:
        job = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Hello", "max_new_tokens": 2}, timeout=10)
        deadline = time.monotonic() + 120
        while get_jobs(stack, [job.json()["id"]])[0]["status"] in ("queued", "running"):
            assert time.monotonic() < deadline and worker.poll() is None, stack.logs()
            time.sleep(0.5)
        assert get_jobs(stack, [job.json()["id"]])[0]["status"] == "succeeded"

    try:
        with run_stack(redis_server.url, env, workers=(), log_prefix="llava-queue-long-outage-") as stack:
            with open(stack.log_dir / "worker.log", "w") as log:
                worker = subprocess.Popen([sys.executable, "-c", FAST_RECONNECTS], stdout=log, stderr=subprocess.STDOUT,
                                          env=dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=redis_server.url))
            stack.processes["worker"] = worker
            wait_for_stack(stack, workers=1)
            one_job_succeeds(stack, worker)  # its Celery consumer reads the queues
            redis_server.stop()
            time.sleep(5)  # past 100 tries at 10 ms
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path).start()
            assert worker.poll() is None, f"the worker exited ({worker.returncode})\n{stack.logs()}"
            wait_for_stack(stack, workers=1)  # the API answers again, and the worker has announced itself
            one_job_succeeds(stack, worker)
    finally:
        redis_server.stop()


def test_sigterm_during_a_redis_outage_loses_no_job(default_model_dir, tmp_path):
    """A worker told to stop while Redis is away cannot hand its jobs back: they run on and end once Redis is back,
    then it exits; no worker's jobs are delivered again for the heartbeats that lapsed during the outage."""
    redis_server = RedisServer(data_dir=tmp_path).start()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4",
           "LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS": "1"}
    try:
        with run_stack(redis_server.url, env, workers=("worker-a", "worker-b"),
                       log_prefix="llava-queue-sigterm-outage-") as stack:
            ids = submit_stories(stack, 4)
            _, holder, _ = running_job(stack, ids)
            redis_server.stop()
            stack.processes[holder].terminate()
            time.sleep(4)  # past the grace period: the hand-back finds Redis away
            assert stack.processes[holder].poll() is None  # its jobs still run, waiting for Redis
            redis_server = RedisServer(port=redis_server.port, data_dir=tmp_path).start()
            final = wait_all_final(stack, ids)
            assert [job["status"] for job in final] == ["succeeded"] * 4, (final, stack.logs())
            assert all(job["usage"]["completion_tokens"] <= 64 for job in final)
            # No job was delivered again: a heartbeat that lapsed while Redis was away does not make a worker dead.
            assert [job["attempts"] for job in final] == [1] * 4, final
            stack.processes[holder].wait(60)
            logs = {name: (stack.log_dir / f"{name}.log").read_text() for name in ("worker-a", "worker-b")}
            assert "not handed back" in logs[holder], logs[holder][-3000:]
            assert not any("stopped beating" in log for log in logs.values())
    finally:
        redis_server.stop()


def test_a_worker_stopped_while_redis_is_away_exits_cleanly(default_model_dir, tmp_path):
    """The cancellation listener logs an outage once (not a traceback a second) and its end; a worker told to
    stop while Redis is away exits 0, saying its registry entry will expire, instead of dying on a traceback."""
    server = RedisServer(data_dir=tmp_path).start()
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=server.url, LLAVA_QUEUE_MODEL_PATH=str(default_model_dir),
               LLAVA_QUEUE_MAX_NUM_SEQS="2")
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(server.url)

    def wait_for(condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert worker.poll() is None and time.monotonic() < deadline, f"{what}\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)

    try:
        wait_for(lambda: list(client.scan_iter("llq:worker:*")), "the worker never announced itself")
        server.stop()
        time.sleep(3.5)  # the listener tries again every second
        assert log_path.read_text().count("cancellation listener lost Redis") == 1
        server = RedisServer(port=server.port, data_dir=tmp_path).start()
        wait_for(lambda: "cancellation listener: Redis is back" in log_path.read_text(), "no 'Redis is back'", 30)
        server.stop()
        worker.terminate()
        assert worker.wait(30) == 0
        text = log_path.read_text()
        assert "not removed from the registry" in text and "expires within" in text
        assert "Traceback" not in text, text[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
        client.close()
        server.stop()


def test_the_consumers_connection_errors_are_logged_once_in_a_while():
    """The first "Cannot connect" of an outage, then one in each interval; every other record passes."""
    keep = OnceInAWhile(seconds=0.3)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("celery.worker.consumer.consumer", logging.ERROR, __file__, 1, msg, (), None)

    assert keep.filter(record(CONNECTION_ERROR))
    assert not keep.filter(record(CONNECTION_ERROR))
    assert keep.filter(record("consumer: Connection to broker lost."))
    time.sleep(0.35)
    assert keep.filter(record(CONNECTION_ERROR))
    assert not keep.filter(record(CONNECTION_ERROR))


def test_a_worker_write_waits_for_redis_to_come_back(tmp_path):
    # workers/generation.py: a write that finds Redis away is tried again until Redis answers, within its wait.
    servers = [RedisServer(data_dir=tmp_path).start()]
    port = servers[0].port
    client = redis.Redis.from_url(servers[0].url)
    try:
        client.set("kept", "1")
        servers[0].stop()
        with pytest.raises(redis.exceptions.ConnectionError):
            when_redis_answers(client.ping, "a ping", wait_seconds=0.5)
        restart = threading.Timer(1.0, lambda: servers.append(RedisServer(port=port, data_dir=tmp_path).start()))
        restart.start()
        started = time.monotonic()
        assert when_redis_answers(lambda: client.get("kept"), "a read", wait_seconds=30) == b"1"
        assert time.monotonic() - started >= 1.0
        restart.join()
    finally:
        client.close()
        for server in servers:
            server.stop()


def test_a_step_written_again_is_appended_once():
    # A try again of a step whose first try ran in Redis (its answer lost with the connection) carries the same
    # step number: the record and the stream get each chunk once. A new holder of the job starts its count afresh.
    with RedisServer() as server:
        store = JobStore.from_url(server.url, "steps")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"
        pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(store.channel(job_id))
        try:
            assert store.record_step("w1", [(job_id, "Hel", 1, True)], [], step=7) == [1]
            assert store.record_step("w1", [(job_id, "Hel", 1, True)], [], step=7) == [1]  # the same step again
            assert store.record_step("w1", [(job_id, "lo", 2, False)], [], step=8) == [2]
            assert store.record_step("w1", [(job_id, "Hel", 1, True)], [], step=7) == [2]  # an older one
            assert store.get(job_id)["text"] == "Hello"
            # w1 died (it announces nothing): w2 resumes the job, its steps numbered from 1.
            assert store.start(job_id, "w2") == "resumed"
            assert store.record_step("w2", [(job_id, " world", 3, False)], [], step=1) == [3]
            assert store.record_step("w1", [(job_id, "!", 3, False)], [], step=9) == [-1]  # fenced off
            record = store.get(job_id)
            assert (record["text"], record["completion_tokens"]) == ("Hello world", 3)
            messages = []
            deadline = time.monotonic() + 5
            while len(messages) < 3 and time.monotonic() < deadline:
                message = pubsub.get_message(timeout=0.5)
                if message:
                    messages.append(json.loads(message["data"]))
            assert [(m["seq"], m["delta"]) for m in messages] == [(1, "Hel"), (2, "lo"), (3, " world")]
            assert pubsub.get_message(timeout=0.3) is None
        finally:
            pubsub.close()
            store.redis.close()


def test_a_step_is_one_round_trip_and_survives_a_flushed_script_cache():
    # JobStore._run_scripts: a step sends EVALSHA straight away (no SCRIPT EXISTS before each step, which
    # redis-py's scripted pipelines send); after Redis lost its scripts (a restart, SCRIPT FLUSH) the step loads
    # them and still writes every chunk once, then ends the job.
    with RedisServer() as server:
        store = JobStore.from_url(server.url, "oneway")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"

        def calls(command: str) -> int:
            return int(store.redis.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

        assert store.record_step("w1", [(job_id, "Hel", 1, True)], [], step=1) == [1]
        before = (calls("script|exists"), calls("evalsha"))
        assert store.record_step("w1", [(job_id, "lo", 2, False)], [], step=2) == [2]
        assert (calls("script|exists"), calls("evalsha")) == (before[0], before[1] + 1)
        store.redis.script_flush()
        ending = Ending(job_id, "succeeded", finish_reason="stop", completion_tokens=3)
        assert store.record_step("w1", [(job_id, " world", 3, False)], [ending], step=3) == [3]
        record = store.get(job_id)
        assert (record["status"], record["text"], record["completion_tokens"]) == ("succeeded", "Hello world", 3)
        # Only the ending's script missing (loaded again by someone else's plain call first): the chunks ran once.
        second, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(second, "w1") == "running"
        store.redis.script_flush()
        store._append.sha = store.redis.script_load(store._append.script)
        assert store.record_step("w1", [(second, "Hi", 1, True)], [Ending(second, "succeeded", finish_reason="stop",
                                                                          completion_tokens=1)]) == [1]
        record = store.get(second)
        assert (record["status"], record["text"]) == ("succeeded", "Hi")
        # Only the ending's script loaded (the API cancelling a job ran it first): the chunk still goes before the
        # ending. It met NOSCRIPT, the ending ran, and the chunk, run again, found its job ended: dropped.
        third, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(third, "w1") == "running"
        pubsub = store.redis.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(store.channel(third))
        store.redis.script_flush()
        store._finish.sha = store.redis.script_load(store._finish.script)
        assert store.record_step("w1", [(third, "Bye", 1, True)], [Ending(third, "succeeded", finish_reason="stop",
                                                                          completion_tokens=1)]) == [1]
        record = store.get(third)
        assert (record["status"], record["text"]) == ("succeeded", "Bye")
        published, deadline = [], time.monotonic() + 5
        while len(published) < 2 and time.monotonic() < deadline:
            if (message := pubsub.get_message(timeout=0.5)) is not None:
                published.append(json.loads(message["data"]))
        assert [(m["seq"], m.get("delta"), m.get("done")) for m in published] == [(1, "Bye", None), (2, None, True)]
        pubsub.close()
        store.redis.close()


def test_a_stream_interval_writes_every_nth_token_and_the_first_and_last_at_once():
    # Settings.stream_interval (the original worker's --stream-interval): a job's text goes out every 3 tokens here,
    # its first token and its end at once, and the record's text always matches its token count (a job resumed
    # elsewhere goes on from both).
    from workers.engine import SeqOutput

    with RedisServer() as server:
        store = JobStore.from_url(server.url, "interval")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"
        runner = JobRunner(store, loaded=None, worker_name="w1", stream_interval=3)
        channel = store.redis.pubsub()
        channel.subscribe(store.channel(job_id))
        channel.get_message(timeout=1)  # the subscription's own message
        # One token a step; the third step's token is half a character (no text yet), the eighth ends the job.
        deltas = ["A", "b", "", "cd", "e", "f", "g", "h"]
        seen = []
        for count, delta in enumerate(deltas, start=1):
            finished = count == len(deltas)
            runner.publish([SeqOutput(job_id, delta, "", 1, count, finished=finished,
                                      finish_reason="length" if finished else None, first_token=count == 1)])
            runner.flush()  # a step that ends no job is written while the engine goes on
            record = store.get(job_id)
            seen.append((record["text"], record["completion_tokens"]))
        assert seen == [("A", 1), ("A", 1), ("A", 1), ("Abcd", 4), ("Abcd", 4), ("Abcd", 4), ("Abcdefg", 7),
                        ("Abcdefgh", 8)]
        published = []
        while (message := channel.get_message(timeout=1)) is not None:
            published.append(json.loads(message["data"]))
        assert [message.get("delta") for message in published] == ["A", "bcd", "efg", "h", None]
        assert published[-1]["done"] and store.get(job_id)["status"] == "succeeded"
        assert runner._held == {}
        with pytest.raises(ValueError, match="stream_interval"):
            JobRunner(store, loaded=None, worker_name="w1", stream_interval=0)
        channel.close()
        store.redis.close()


def test_a_step_is_written_while_the_engine_goes_on_one_step_in_flight_and_an_ending_before_it_returns():
    # workers/step_writer.py: the engine waited for Redis's answer to each step's write (about 1.2 ms of a 50 ms
    # step on 2 cores). Where the engine leaves CPUs to the rest (`writes_behind`), a step that ends no job is now
    # written while the engine computes the next: with Redis paused, `publish` of one returns at once, the next waits
    # for it (one step in flight, so a Redis away still stops the engine, a step later), and a step that ends a job
    # is written, after the others, before `publish` returns (its task then writes the ending again, a no-op only
    # once this one is in).
    from workers.engine import SeqOutput

    with RedisServer() as server:
        store = JobStore.from_url(server.url, "inflight")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"
        runner = JobRunner(store, loaded=None, worker_name="w1", write_behind=True)
        resume = threading.Timer(1.0, lambda: os.kill(server.process.pid, signal.SIGCONT))
        try:
            os.kill(server.process.pid, signal.SIGSTOP)
            resume.start()
            started = time.monotonic()
            runner.publish([SeqOutput(job_id, "A", "", 1, 1, first_token=True)])
            handed_over = time.monotonic() - started
            runner.publish([SeqOutput(job_id, "b", "", 1, 2)])
            second = time.monotonic() - started
            runner.publish([SeqOutput(job_id, "c", "", 1, 3, finished=True, finish_reason="stop")])
        finally:
            resume.cancel()
            os.kill(server.process.pid, signal.SIGCONT)
        assert handed_over < 0.5 <= second, (handed_over, second)
        # Nothing left in flight: the ending's write waited for the step before it.
        record = store.get(job_id)
        assert (record["status"], record["text"], record["completion_tokens"]) == ("succeeded", "Abc", 3), record
        store.redis.close()


def test_steps_are_written_behind_the_engine_only_where_it_leaves_cpus_to_the_rest(monkeypatch):
    # On 2 cores with the engine on both, writing behind it gained nothing (the stack at a median 0.93x of (c) over
    # 12 rounds, 0.955x with the engine writing; bench/README.md): the wait it hides is Redis's and the API's work on
    # those same cores. A GPU, or a CPU engine on cores of its own, leaves CPUs to that work.
    from workers.engine import SeqOutput
    from workers.generation import writes_behind

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not writes_behind(cpu, frozenset(), frozenset())
    assert writes_behind(cpu, frozenset({1}), frozenset({0}))
    assert writes_behind(cuda, frozenset(), frozenset())
    with RedisServer() as server:
        store = JobStore.from_url(server.url, "inline")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"
        runner = JobRunner(store, loaded=None, worker_name="w1", write_behind=False)
        record_step = store.record_step
        threads = []
        monkeypatch.setattr(store, "record_step", lambda *args: threads.append(threading.current_thread())
                            or record_step(*args))
        runner.publish([SeqOutput(job_id, "A", "", 1, 1, first_token=True)])
        assert threads == [threading.current_thread()] and store.get(job_id)["text"] == "A"
        store.redis.close()


def test_a_job_ended_without_a_step_gets_its_held_text_and_its_ending_in_one_round_trip():
    # JobRunner._finish, for a job the engine ended without publishing it (at shutdown): the text held back by the
    # stream interval and the ending were two writes, and a worker that died between them left the text written and
    # the job "running", to be run again elsewhere. They go in one round trip now, the text before the ending.
    from workers.engine import SeqOutput

    with RedisServer() as server:
        store = JobStore.from_url(server.url, "lastwrite")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"
        runner = JobRunner(store, loaded=None, worker_name="w1", stream_interval=3)
        runner.publish([SeqOutput(job_id, "A", "", 1, 1, first_token=True)])
        runner.publish([SeqOutput(job_id, "b", "", 1, 2)])  # held for the next chunk
        runner.flush()
        assert store.get(job_id)["text"] == "A"
        writes = []
        record_step = store.record_step
        store.record_step = lambda *args, **kwargs: writes.append(args) or record_step(*args, **kwargs)
        runner._finish(SeqOutput(job_id, "", "Ab", 1, 2, finished=True, finish_reason="error",
                                 error="engine shut down"))
        assert len(writes) == 1, writes
        assert writes[0][1] == [(job_id, "b", 2, False)] and [ending.job_id for ending in writes[0][2]] == [job_id]
        record = store.get(job_id)
        assert (record["status"], record["text"], record["completion_tokens"]) == ("failed", "Ab", 2), record
        assert runner._held == {}
        store.redis.close()


def test_hand_back_with_redis_away_leaves_the_job_running_and_raises_nothing(caplog):
    # workers/generation.py: at shutdown a job that cannot be released stays as it is (not aborted, not requeued):
    # the orphan sweep of a live worker delivers it again once this worker's heartbeat has expired.
    with RedisServer() as server:
        store = JobStore.from_url(server.url, "handback")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"
        runner = JobRunner(store, loaded=None, worker_name="w1")
        runner._active.add(job_id)
        server.stop()
        requeued = []
        with caplog.at_level(logging.WARNING, logger="llava_queue.worker"):
            assert runner.hand_back(requeued.append) == []
        assert requeued == [] and job_id not in runner._handed_back
        assert any(f"job {job_id} not handed back" in record.getMessage() for record in caplog.records)
        store.redis.close()


def test_an_api_stopped_mid_stream_ends_its_streams_at_once_and_every_job_goes_on(default_model_dir):
    """SIGTERM on the API: its WebSocket streams close with 1012 (Service Restart) and a reason that names the job,
    the original's NUL stream ends with the original's server error frame, an OpenAI stream with an error event,
    within seconds (uvicorn would wait for every stream's job to end), and no job is cancelled: each goes on,
    and the next API streams it to its end."""
    story = [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}]
    rendered = "<|im_start|>user\nTell me a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    with RedisServer() as redis_server:
        env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "5"}
        with run_stack(redis_server.url, env, log_prefix="llava-queue-api-stop-") as stack:
            ws_url = stack.base_url.replace("http://", "ws://")
            ids, closes, frames = {}, {}, {}

            async def follow(name: str, url: str, first: dict | None = None) -> None:
                async with websockets.connect(url) as ws:
                    if first:
                        await ws.send(json.dumps(first))
                    with pytest.raises(websockets.ConnectionClosedError):  # not a normal closure
                        async for raw in ws:
                            ids[name] = json.loads(raw)["id"]
                    closes[name] = (ws.close_code, ws.close_reason)

            def plain(name: str, body: dict) -> None:
                response = requests.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=120)
                ids[name] = response.headers["X-Job-Id"]
                frames[name] = response

            def stream(name: str, path: str, body: dict) -> None:
                with requests.post(stack.base_url + path, json=body, stream=True, timeout=120) as response:
                    ids[name] = response.headers["X-Job-Id"]
                    frames[name] = [part for part in response.iter_lines(delimiter=b"\0" if "worker" in path
                                                                          else b"\n\n") if part]

            posted = requests.post(f"{stack.base_url}/v1/jobs", json={"messages": story, "temperature": 0,
                                                                      "max_new_tokens": 400}, timeout=10).json()["id"]
            generate = {"prompt": rendered, "temperature": 0, "max_new_tokens": 400}
            chat = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": story[0]["text"]}],
                    "temperature": 0, "max_tokens": 400, "stream": True}
            threads = [threading.Thread(target=stream, args=("llava", "/worker_generate_stream", generate)),
                       threading.Thread(target=stream, args=("openai", "/v1/chat/completions", chat)),
                       threading.Thread(target=plain, args=("openai-plain", {**chat, "stream": False}))]
            for thread in threads:
                thread.start()

            async def scenario() -> None:
                followers = [asyncio.create_task(follow("ws", f"{ws_url}/v1/ws", {"messages": story, "temperature": 0,
                                                                                   "max_new_tokens": 400})),
                             asyncio.create_task(follow("job-ws", f"{ws_url}/v1/jobs/{posted}/ws"))]
                deadline = time.monotonic() + 60
                # Every stream has its job id, and the plain request's job runs too.
                while len(ids) < 4 or requests.get(f"{stack.base_url}/healthz", timeout=10).json()["workers"][0][
                        "num_running"] < 5 or requests.get(f"{stack.base_url}/v1/jobs/{posted}", timeout=10).json()[
                        "usage"]["completion_tokens"] < 3:
                    assert time.monotonic() < deadline, (ids, stack.logs())
                    await asyncio.sleep(0.2)
                stopped_at = time.monotonic()
                stack.processes["api"].terminate()
                await asyncio.wait_for(asyncio.gather(*followers), 10)
                stack.processes["api"].wait(10)  # uvicorn ends by the signal it was stopped with
                assert time.monotonic() - stopped_at < 5, time.monotonic() - stopped_at

            asyncio.run(scenario())
            for thread in threads:
                thread.join(10)
            for name in ("ws", "job-ws"):
                code, reason = closes[name]
                assert code == 1012 and ids[name] in reason, closes
            assert json.loads(frames["llava"][-1]) == {"text": SERVER_ERROR_MSG, "error_code": 1}, frames["llava"][-2:]
            assert frames["openai"][-1] == b"data: [DONE]"
            last = json.loads(frames["openai"][-2].removeprefix(b"data: "))
            assert last["error"]["type"] == "server_error" and ids["openai"] in last["error"]["message"], last
            plain_answer = frames["openai-plain"]  # a 503 the openai package retries, after Retry-After
            assert plain_answer.status_code == 503 and plain_answer.headers["Retry-After"] == "1", plain_answer.text
            assert ids["openai-plain"] in plain_answer.json()["error"]["message"], plain_answer.text
            store = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True))
            assert {name: store.get(job_id)["status"] for name, job_id in ids.items()} == dict.fromkeys(ids, "running")

            # The next API streams each of them to its end.
            port = stack.base_url.rsplit(":", 1)[1]
            api_env = dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_PORT=port)
            stack.processes["api"] = start_service("api-2", ["api", "--host", "127.0.0.1", "--port", port], api_env,
                                                   stack.log_dir)
            wait_for_stack(stack)

            async def follow_to_the_end(job_id: str) -> dict:
                async with websockets.connect(f"{ws_url}/v1/jobs/{job_id}/ws") as ws:
                    async for raw in ws:
                        message = json.loads(raw)
                        if message.get("done"):
                            return message

            async def all_to_the_end() -> list[dict]:
                return await asyncio.gather(*(follow_to_the_end(job_id) for job_id in ids.values()))

            ends = asyncio.run(all_to_the_end())
            assert [end["status"] for end in ends] == ["succeeded"] * 5, ends


def test_a_worker_write_waits_out_redis_timeouts_as_it_waits_out_an_outage(tmp_path):
    # A Redis that stops answering (paused, swapping, a network that drops packets) gives a client with a socket
    # timeout a TimeoutError, not a ConnectionError: when_redis_answers gave up at the first one, so the engine's step
    # raised (its chunks lost) and an ending was dropped, where a Redis away would have been waited for. The writer of
    # unwritten endings already retried both. Here redis-py's own retries are off, so each timeout reaches the runner.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=0.2,
                                      retry=Retry(NoBackoff(), 0))
        store = JobStore(client, "timeouts")
        job_id, _ = store.create(GenerateRequest(prompt="p"), "interactive")
        assert store.start(job_id, "w1") == "running"
        client.set("kept", "1")
        runner = JobRunner(store, loaded=None, worker_name="w1")
        runner.redis_wait_seconds = 0.5
        resumes = [threading.Timer(1.5, lambda: os.kill(server.process.pid, signal.SIGCONT)) for _ in range(2)]
        try:
            os.kill(server.process.pid, signal.SIGSTOP)
            resumes[0].start()
            assert when_redis_answers(lambda: client.get("kept"), "a read", wait_seconds=30) == "1"
            os.kill(server.process.pid, signal.SIGSTOP)
            resumes[1].start()
            # Past its 0.5 s wait, the ending is kept and written in the background once Redis answers.
            runner._end(Ending(job_id, "succeeded", finish_reason="stop"), f"ending job {job_id}")
            resumes[1].join()
            deadline = time.monotonic() + 20
            while client.hget(store.key(job_id), "status") == "running" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.hget(store.key(job_id), "status") == "succeeded"
        finally:
            for resume in resumes:
                resume.cancel()
            os.kill(server.process.pid, signal.SIGCONT)
            client.close()
