"""A worker whose engine stopped itself (a BaseException out of its step hook): it fails no job, says it is not
ready, and exits with a status that says so, for its supervisor to start a new one. Before, the worker stayed
"ready" and took every job only to fail it at once with "engine stopped: ..."."""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from conftest import job_final, run_stack, start_service, wait_for_stack
from shared.jobs import JobStore
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer


@pytest.fixture(scope="module")
def loaded(default_model_dir):
    from workers.builder import load_model

    return load_model(str(default_model_dir), device="cpu", dtype="float32")


def until(condition, timeout: float = 60.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        time.sleep(0.05)
    return value


def make_runner(store: JobStore, loaded, name: str, on_step=None):
    """A JobRunner named `name` with its engine started; `on_step(runner, outputs)` replaces its publishing."""
    from workers.engine import LLMEngine
    from workers.generation import JobRunner

    runner = JobRunner(store, loaded, name)
    publish = runner.publish if on_step is None else (lambda outputs: on_step(runner, outputs))
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=4, max_model_len=loaded.context_len,
                       on_step=publish)
    runner.attach(engine)
    engine.start()
    return runner, engine


def test_jobs_of_an_engine_that_stopped_itself_are_handed_back_not_failed(redis_server, loaded):
    # The engine fails every request once it stopped: the job it ran, one delivered after, and one that started just
    # before the stop and reached the engine after it. Each was written "failed"; each is handed back now (or, not
    # started yet, sent again untouched), and a live worker runs it to its end, going on from the text it had.
    store = JobStore.from_url(redis_server.url, prefix=f"llq-exit-{uuid.uuid4().hex[:8]}")
    crash = threading.Event()

    def crashing(runner, outputs):
        if crash.is_set() and outputs:
            crash.clear()
            raise SystemExit("the step hook asked to stop")
        runner.publish(outputs)

    requeued = []
    runner, engine = make_runner(store, loaded, "w1", crashing)
    engine.on_stop = lambda error: runner.engine_stopped(error, requeued.append)
    second = None
    try:
        running, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=48),
                                  "interactive")
        outcome = []
        thread = threading.Thread(target=lambda: outcome.append(runner.run(running)))
        thread.start()
        until(lambda: store.get(running)["completion_tokens"] >= 3, what="three tokens written")
        crash.set()
        thread.join(60)
        at_stop = store.get(running)
        assert requeued == [running]
        assert (at_stop["status"], at_stop["error"], at_stop["handed_back"]) == ("running", "", 1), at_stop
        assert at_stop["text"]

        # Delivered after the stop: sent again, its record untouched.
        later, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=8),
                                "interactive")
        assert runner.run(later) == "engine_stopped"
        assert (store.get(later)["status"], store.get(later)["attempts"]) == ("queued", 0)

        # Past the check just before the stop (simulated: the stop is seen once the job has started): handed back.
        racing, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=8),
                                 "interactive")
        stopped, runner._engine_stop = runner._engine_stop, None
        request_and_queue = store.request_and_queue

        def stop_seen_after_start(job_id):
            runner._engine_stop = stopped
            return request_and_queue(job_id)

        store.request_and_queue = stop_seen_after_start
        runner.run(racing)
        store.request_and_queue = request_and_queue
        assert requeued == [running, later, racing]
        assert (store.get(racing)["status"], store.get(racing)["error"]) == ("running", "")
        assert engine._aborts == []

        second, second_engine = make_runner(store, loaded, "w2")
        for job_id in requeued:
            assert second.run(job_id) == "succeeded", store.get(job_id)
        final = store.get(running)
        assert final["text"].startswith(at_stop["text"]) and final["attempts"] == 2, final
        assert final["worker"] == "w2"
        assert store.totals()["running"] == 0
    finally:
        engine.shutdown()
        if second is not None:
            second_engine.shutdown()
        store.redis.close()


def test_a_worker_whose_engine_stopped_says_it_is_not_ready_and_stops():
    # workers/main.py's on_stop hook: not ready (heartbeat and /readyz), the runner hands the jobs back, and the
    # process is told to stop as on SIGTERM.
    from workers.generation import JobRunner
    from workers.main import _stop_worker
    from workers.metrics import METRICS

    runner = JobRunner(store=None, loaded=None, worker_name="w1")
    info, stopped, terminated = {"name": "w1", "ready": True}, threading.Event(), []
    was_ready = METRICS.is_ready
    METRICS.set_ready(True)
    try:
        _stop_worker("engine stopped: SystemExit: x", runner, store=None, info=info, engine_stopped=stopped,
                     terminate=lambda: terminated.append(True))
        assert (info["ready"], METRICS.is_ready, stopped.is_set(), terminated) == (False, False, True, [True])
        assert runner._engine_stop == "engine stopped: SystemExit: x"
    finally:
        METRICS.set_ready(was_ready)


# A worker whose step hook raises SystemExit once the file LLQ_TEST_STOP_FLAG names exists (the first worker to see
# it takes it away), as `python -m shared.cli worker` otherwise.
CRASHING_WORKER = """
import os, sys
from workers.generation import JobRunner

publish = JobRunner.publish

def crashing_publish(self, outputs):
    if outputs:
        try:
            os.remove(os.environ["LLQ_TEST_STOP_FLAG"])
        except FileNotFoundError:
            pass
        else:
            raise SystemExit("injected by the test")
    publish(self, outputs)

JobRunner.publish = crashing_publish
from shared.cli import main
sys.exit(main(["worker"]))
"""


def test_a_worker_whose_engine_stopped_exits_non_zero_and_loses_no_job(default_model_dir, tmp_path):
    flag = tmp_path / "stop-now"
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
           "LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4",
           "LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS": "1", "LLQ_TEST_STOP_FLAG": str(flag)}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-exit-") as stack:
        worker_env = dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=server.url)
        with open(stack.log_dir / "crashing-worker.log", "w") as log:
            crashing = subprocess.Popen([sys.executable, "-c", CRASHING_WORKER], env=worker_env, stdout=log,
                                        stderr=subprocess.STDOUT)
        stack.processes["crashing-worker"] = crashing
        wait_for_stack(stack, workers=1)
        ids = [requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Once upon a time", "temperature": 0,
                                                                 "max_new_tokens": 64}, timeout=10).json()["id"]
               for _ in range(3)]

        def jobs():
            return [requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json() for job_id in ids]

        until(lambda: any(job["usage"]["completion_tokens"] >= 3 for job in jobs()), 120, "a job with text")
        before = {job["id"]: job["text"] for job in jobs()}
        flag.touch()
        assert crashing.wait(60) == 70, stack.logs()
        assert not flag.exists()
        assert requests.get(f"{stack.base_url}/healthz", timeout=10).json()["workers"] == []  # it left the registry
        assert all(job["status"] in ("queued", "running") for job in jobs()), jobs()  # none failed
        assert "handing its jobs back and exiting" in (stack.log_dir / "crashing-worker.log").read_text()

        # Its supervisor starts a worker again: every job ends well, the ones that had text going on from it.
        stack.processes["worker"] = start_service("worker", ["worker"], dict(worker_env), stack.log_dir)
        for job_id in ids:
            job = job_final(stack, job_id, timeout=300)
            assert job["status"] == "succeeded" and job["text"].startswith(before[job_id]), (job, stack.logs())


def test_a_worker_of_a_model_named_with_a_percent_starts_under_its_own_name_and_its_hand_back_bound(
        default_model_dir):
    # Celery expands `%` codes in the node name (-n): a worker serving the model "a%b" stopped at start with
    # "ValueError: Unknown format %b". And the worker built its job store without the hand-back bound of its settings
    # (LLAVA_QUEUE_MAX_HAND_BACKS): a job past that bound ran on, failed only past the default 10. Now the worker
    # starts, its Celery node is named as its registry entry, and a job handed back twice fails at once under a bound
    # of 1, saying so.
    from shared.celery_app import GENERATE_TASK, make_celery, task_queue
    from shared.jobs import WorkerRegistry, handed_back_error
    from shared.settings import Settings

    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MODEL_NAME": "a%b",
           "LLAVA_QUEUE_MAX_NUM_SEQS": "2", "LLAVA_QUEUE_MAX_HAND_BACKS": "1"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-percent-") as stack:
        store = JobStore.from_url(server.url)
        app = make_celery(Settings(redis_url=server.url))
        try:
            [entry] = WorkerRegistry(store.redis).workers()
            assert entry["name"].startswith("a%b@") and entry["model"] == "a%b", entry
            replies = until(lambda: app.control.ping(timeout=2.0), timeout=30, what="a ping's answer")
            assert [name for reply in replies for name in reply] == [entry["name"]], replies

            job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=4), "interactive")
            for n in range(2):
                assert store.start(job_id, f"stopping-{n}", "a%b") in ("running", "resumed")
                assert store.release(job_id, f"stopping-{n}")
            app.send_task(GENERATE_TASK, args=[job_id], queue=task_queue("interactive", "a%b"))
            record = until(lambda: (r := store.get(job_id))["status"] not in ("queued", "running") and r,
                           what=f"job {job_id} ended\n{stack.logs()}")
            assert (record["status"], record["error"]) == ("failed", handed_back_error(1)), record
        finally:
            store.redis.close()
