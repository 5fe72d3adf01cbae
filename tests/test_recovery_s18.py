"""A message a worker had taken but whose job it had not started when it was SIGKILLed: another worker runs the job
within seconds. Before, the message sat in kombu's "unacked" hash, the job "queued", until kombu restored it past
the visibility timeout (4 h); the orphan sweep, which saw the worker die, recovered only the jobs it had started."""

import os
import signal
import subprocess
import sys
import time
import uuid

import redis
import requests

from conftest import job_final, run_stack, wait_for_stack
from shared.celery_app import MESSAGE_HOLDERS_KEY, make_celery, restore_messages_of_gone_workers
from shared.redis_server import RedisServer
from shared.settings import Settings

# A worker whose first task to receive a job takes the file LLQ_TEST_HOLD_FLAG names away (renamed with its pid) and
# holds the job there, not started, until the worker is killed: the moment between a message taken from the queue and
# its job's start (short, unless Redis is slow to answer the start), made long. Other tasks run as usual.
HOLDING_WORKER = """
import os, sys, time
from workers.generation import JobRunner

run = JobRunner.run

def holding_run(self, job_id):
    flag = os.environ["LLQ_TEST_HOLD_FLAG"]
    try:
        os.rename(flag, f"{flag}.{os.getpid()}")
    except FileNotFoundError:
        return run(self, job_id)
    time.sleep(3600)

JobRunner.run = holding_run
from shared.cli import main
sys.exit(main(["worker"]))
"""


def test_a_job_taken_but_not_started_by_a_killed_worker_runs_on_another_within_seconds(default_model_dir, tmp_path):
    flag = tmp_path / "hold"
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4",
           "LLQ_TEST_HOLD_FLAG": str(flag)}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-taken-") as stack:
        worker_env = dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=server.url)
        for name in ("worker-a", "worker-b"):
            with open(stack.log_dir / f"{name}.log", "w") as log:
                stack.processes[name] = subprocess.Popen([sys.executable, "-c", HOLDING_WORKER], env=worker_env,
                                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for_stack(stack, workers=2)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        flag.touch()
        job_id = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Once upon a time", "temperature": 0,
                                                                   "max_new_tokens": 8}, timeout=10).json()["id"]
        deadline = time.monotonic() + 60
        while not (held := list(tmp_path.glob("hold.*"))):
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.05)
        holder_pid = int(held[0].suffix[1:])
        [holder] = [name for name, process in stack.processes.items() if process.pid == holder_pid]
        other = "worker-b" if holder == "worker-a" else "worker-a"
        # Taken (in kombu's unacked hash, recorded as the holder's), not started.
        assert requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "queued"
        assert client.hlen("unacked") == 1

        killed_at = time.monotonic()
        os.kill(holder_pid, signal.SIGKILL)
        stack.processes[holder].wait(10)
        job = job_final(stack, job_id, timeout=30)
        waited = time.monotonic() - killed_at
        assert job["status"] == "succeeded", (job, stack.logs())
        assert job["worker"].endswith(f":{stack.processes[other].pid}") and job["attempts"] == 1, job
        print(f"job {job_id} ran on {other} {waited:.1f} s after {holder} was killed")
        # Nothing of the dead worker's is left for kombu to deliver again hours later.
        deadline = time.monotonic() + 10
        while client.hlen("unacked") or client.hlen(MESSAGE_HOLDERS_KEY):
            assert time.monotonic() < deadline, (client.hgetall("unacked"), client.hgetall(MESSAGE_HOLDERS_KEY))
            time.sleep(0.1)
        client.close()


def test_only_the_messages_of_gone_workers_are_restored_each_once(redis_server):
    # Messages taken on channels of two workers, one alive (its registry key is there), one gone: the gone one's
    # message goes back to its queue, at its head, once, however many sweeps restore; the live one's stays taken.
    prefix = f"llq-taken-{uuid.uuid4().hex[:8]}"
    queue = f"{prefix}-queue"
    alive, gone = f"{prefix}:worker:alive", f"{prefix}:worker:gone"
    app = make_celery(Settings(redis_url=redis_server.url))
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.set(alive, "{}")
    with app.connection_for_write() as producer:
        for n in range(3):
            producer.SimpleQueue(queue).put({"n": n})
    taken = []
    for holder in (alive, gone):
        connection = app.connection_for_write(transport_options={"message_holder": holder})
        message = connection.SimpleQueue(queue).get(timeout=5)
        taken.append((connection, message))
    try:
        by_holder = {holder: tag for tag, holder in client.hgetall(MESSAGE_HOLDERS_KEY).items()}
        assert set(by_holder) == {alive, gone}
        assert client.hlen("unacked") >= 2 and set(by_holder.values()) <= set(client.hkeys("unacked"))

        assert restore_messages_of_gone_workers(app) == [by_holder[gone]]
        assert restore_messages_of_gone_workers(app) == []
        assert client.hkeys(MESSAGE_HOLDERS_KEY) == [by_holder[alive]]
        assert by_holder[gone] not in client.hkeys("unacked")
        with app.connection_for_write() as consumer:
            again = consumer.SimpleQueue(queue)
            # The restored message first (it had been taken first), then the one nobody took; no second copy.
            assert [again.get(timeout=5).payload["n"] for _ in range(2)] == [1, 2]
            assert client.llen(queue) == 0
    finally:
        for connection, _ in taken:
            connection.release()
        client.delete(alive)
        client.close()
