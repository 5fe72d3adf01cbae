"""A job's life on the worker side, one odd interleaving at a time: a JobRunner with its engine in this process, on
the default model and the test Redis (each test a key prefix of its own), driven the way the Celery task drives it.
Workers that "died" are names that never announce themselves, as a killed worker's heartbeat lapses."""

import uuid

import pytest

from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest


@pytest.fixture(scope="module")
def loaded(default_model_dir):
    from workers.builder import load_model

    return load_model(str(default_model_dir), device="cpu", dtype="float32")


@pytest.fixture
def worker(redis_server, loaded):
    """make(name): a JobRunner named `name` with a running engine, on a store with a key prefix of this test's own."""
    from workers.engine import LLMEngine
    from workers.generation import JobRunner

    store = JobStore.from_url(redis_server.url, prefix=f"llq-lifecycle-{uuid.uuid4().hex[:8]}")
    engines = []

    def make(name: str, max_attempts: int = 3) -> JobRunner:
        runner = JobRunner(store, loaded, name, max_attempts=max_attempts)
        engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=4, max_model_len=loaded.context_len,
                           on_step=runner.publish)
        runner.attach(engine)
        engine.start()
        engines.append(engine)
        return runner

    try:
        yield store, make
    finally:
        for engine in engines:
            engine.shutdown()
        store.redis.close()


def test_a_job_whose_workers_died_too_often_fails_and_leaves_running(worker):
    # The orphan sweep delivers a job again when its worker dies; the start past max_attempts must end it (failed,
    # with a reason). It was fenced off: the record still named the dead worker, so the job stayed "running",
    # and the sweep delivered it again every minute, for ever.
    store, make = worker
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
    assert store.start(job_id, "dead-worker", max_attempts=1) == "running"
    assert store.claim_orphans() == [job_id]  # it never announced itself: dead
    assert make("w2", max_attempts=1).run(job_id) == "exhausted"
    record = store.get(job_id)
    assert (record["status"], record["error_code"]) == ("failed", ErrorCode.SERVER_ERROR), record
    assert "too many times" in record["error"]
    assert store.totals()["running"] == 0
    assert store.claim_orphans(requeue_after=0) == []


def test_a_job_cancelled_while_its_worker_was_dead_ends_cancelled(worker):
    # DELETE on a running job whose worker had just died (or was handing it back at shutdown): nobody aborts it,
    # so the worker the sweep delivers it to must end it cancelled. It was fenced off (the record named the dead
    # worker): the job stayed "running" for ever, delivered again every minute.
    store, make = worker
    for previous in ("dead-worker", "handing-back"):
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
        assert store.start(job_id, previous) == "running"
        if previous == "handing-back":
            assert store.release(job_id, previous)
        else:
            assert store.claim_orphans() == [job_id]
        assert store.cancel(job_id) == "running"
        assert make(f"after-{previous}").run(job_id) == "cancel"
        record = store.get(job_id)
        assert (record["status"], record["error_code"]) == ("cancelled", ErrorCode.CANCELLED), (previous, record)
        assert store.totals()["running"] == 0
        assert store.claim_orphans(requeue_after=0) == []


def test_a_worker_restarted_under_the_same_pid_and_host_loses_no_job(default_model_dir):
    """A worker in a container is pid 1 on a fixed hostname, and its restart policy starts it again the same way
    after a crash (OOM, a GPU fault). Here it runs as pid 1 of a pid namespace of its own, is SIGKILLed mid-job and
    started again: the job is resumed. Its name, made of the model, the host and the pid, was the same again, so the
    new process passed for the dead one: the orphan sweep saw its heartbeat and left the job alone, and a
    redelivery to it was skipped as a duplicate of its own: the job stayed "running" for ever."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import redis
    import requests

    from conftest import run_stack
    from shared.redis_server import RedisServer

    try:
        subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "true"], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no pid namespace here (unshare needs CAP_SYS_ADMIN)")
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "2",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-restart-") as stack:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        worker_env = dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=server.url)

        def start_worker(n: int) -> tuple[subprocess.Popen, str]:
            log = open(stack.log_dir / f"worker-{n}.log", "w")
            # --kill-child: killing unshare kills the worker (pid 1 of its namespace) with it.
            process = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable,
                                        "-m", "shared.cli", "worker"], env=worker_env, stdout=log,
                                       stderr=subprocess.STDOUT)
            stack.processes[f"worker-{n}"] = process
            deadline = time.monotonic() + 180
            while not (names := [key.removeprefix("llq:worker:") for key in client.scan_iter("llq:worker:*")]):
                assert process.poll() is None and time.monotonic() < deadline, stack.logs()
                time.sleep(0.2)
            return process, names[0]

        first, first_name = start_worker(1)
        assert first_name.endswith(":1")  # pid 1, as in a container
        job_id = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Once upon a time", "temperature": 0,
                                                                  "max_new_tokens": 200}, timeout=10).json()["id"]
        deadline = time.monotonic() + 120
        while (job := requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json())["usage"][
                "completion_tokens"] < 3:
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, (job, stack.logs())
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        while client.exists(f"llq:worker:{first_name}"):  # its heartbeat lapses
            time.sleep(0.2)
        _, second_name = start_worker(2)
        assert second_name != first_name
        deadline = time.monotonic() + 120
        while (job := requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json())["status"] in (
                "queued", "running"):
            assert time.monotonic() < deadline, (job, stack.logs())
            time.sleep(0.3)
        assert (job["status"], job["attempts"], job["worker"]) == ("succeeded", 2, second_name), job
        client.close()


def test_a_worker_thought_dead_cannot_write_the_prompt_of_a_job_resumed_elsewhere(redis_server):
    # Every write of a worker is fenced by the job's holder, the prompt too: a worker whose heartbeat lapsed (a long
    # pause) but that goes on must not rewrite a job another worker resumed (nor publish a prompt message on it).
    store = JobStore.from_url(redis_server.url, prefix=f"llq-lifecycle-{uuid.uuid4().hex[:8]}")
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
    assert store.start(job_id, "paused-worker") == "running"
    assert store.claim_orphans() == [job_id]  # its heartbeat lapsed
    assert store.start(job_id, "w2") == "resumed"
    assert store.set_prompt(job_id, "Once upon a time", 5, "w2")
    seq = store.get(job_id)["seq"]
    assert not store.set_prompt(job_id, "Once upon a time", 5, "paused-worker")
    assert store.get(job_id)["seq"] == seq
    store.redis.close()
