"""A job's life on the worker side, one odd interleaving at a time: a JobRunner with its engine in this process, on
the default model and the test Redis (each test a key prefix of its own), driven the way the Celery task drives it.
Workers that "died" are names that never announce themselves, as a killed worker's heartbeat lapses."""

import threading
import uuid
from contextlib import contextmanager

import pytest

from redis_proxies import CuttingProxy
from shared.jobs import CANCELLED_ERROR, Ending, JobStore
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
    # DELETE on a running job whose worker had just died, before the sweep claimed it: nobody aborts it, so the worker
    # the sweep delivers it to must end it cancelled. It was fenced off (the record named the dead worker): the job
    # stayed "running" for ever, delivered again every minute.
    store, make = worker
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
    assert store.start(job_id, "dead-worker") == "running"
    assert store.cancel(job_id) == "running"
    assert store.claim_orphans() == [job_id]
    assert make("after-dead-worker").run(job_id) == "cancel"
    record = store.get(job_id)
    assert (record["status"], record["error_code"]) == ("cancelled", ErrorCode.CANCELLED), record
    assert store.totals()["running"] == 0
    assert store.claim_orphans(requeue_after=0) == []


def test_a_job_whose_record_is_gone_is_dropped_with_a_warning(worker, caplog):
    # Redis restarted without its data (or the key was deleted) under a running job: the worker dropped it with no
    # word but Celery's "succeeded: 'cancelled'".
    import logging
    import time

    store, make = worker
    runner = make("w1")
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=200),
                             "interactive")
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(job_id)))
    with caplog.at_level(logging.WARNING, logger="llava_queue.worker"):
        thread.start()
        deadline = time.monotonic() + 60
        while not store.redis.hget(store.key(job_id), "text"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        store.redis.delete(store.key(job_id))
        thread.join(60)
    assert not thread.is_alive() and outcome
    assert any(f"job {job_id}: its record is gone" in record.getMessage() for record in caplog.records), \
        [record.getMessage() for record in caplog.records]
    assert not store.redis.exists(store.key(job_id))  # nothing written back: no record of one field


@pytest.mark.parametrize("previous", ["dead-worker", "handing-back"])
def test_a_cancel_ends_at_once_a_job_no_worker_runs(worker, previous):
    # A job claimed from a dead worker, or handed back, waits in a queue for a worker of its model, still "running":
    # a DELETE then was only a request nobody heard, and the job stayed "running" (its followers told nothing) until
    # a worker of its model came, if ever. It ends at once, as a queued job does; the delivery that comes later
    # finds it ended.
    store, make = worker
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
    assert store.start(job_id, previous) == "running"
    if previous == "handing-back":
        assert store.release(job_id, previous)
    else:
        assert store.claim_orphans() == [job_id]
    # Counted apart from the running ones a worker runs (`status`, /metrics: an autoscaler sees it waits).
    assert (store.totals()["running"], store.totals()["requeued"]) == (1, 1)
    assert store.cancel(job_id) == "queued"  # ended at once: the API answers "cancelled"
    record = store.get(job_id)
    assert (record["status"], record["error_code"]) == ("cancelled", ErrorCode.CANCELLED), record
    assert store.totals()["running"] == 0
    assert store.claim_orphans(requeue_after=0) == []
    assert make(f"after-{previous}").run(job_id) not in ("running", "resumed", "cancel")
    assert store.get(job_id)["status"] == "cancelled"


def test_a_cancel_of_a_job_a_worker_took_back_meanwhile_is_left_to_that_worker(worker):
    # The cancel reads the job's holder as a mark, then a worker starts it before the cancel's ending: the ending is
    # fenced off (it names the holder read), and the worker hears the cancel.
    store, make = worker
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
    assert store.start(job_id, "handing-back") == "running"
    assert store.release(job_id, "handing-back")
    holder = store.get(job_id)["worker"]
    assert store.start(job_id, "taker") == "resumed"
    # The ending cancel_many sends for a job it read as no worker's:
    call = store._finish_call(Ending(job_id, "cancelled", CANCELLED_ERROR, int(ErrorCode.CANCELLED), "cancelled"),
                              True, holder)
    assert store._finish(keys=call["keys"], args=call["args"]) == "fenced"
    assert store.get(job_id)["status"] == "running"


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
        # Long enough to be mid-job when killed after its third token (it then ends "succeeded" at attempt 2).
        job_id = requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": "Once upon a time", "temperature": 0,
                                                                  "max_new_tokens": 80}, timeout=10).json()["id"]
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


def test_a_handed_back_job_claimed_again_by_the_sweep_runs_once(worker):
    # A stopping worker hands a job back (its task sent again); with every worker busy it waits in the Celery queue
    # past the sweep's requeue_after (60 s), and the sweep claims it and sends it a second time: two deliveries of
    # one job. Only one of them may run it: one start, one attempt more, its text generated once.
    import threading

    from shared.jobs import WorkerRegistry

    store, make = worker
    registry = WorkerRegistry(store.redis, store.prefix)
    for name in ("stopping", "w2", "w3"):
        registry.announce(name, {"name": name}, ttl_seconds=120)
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=48),
                             "interactive")
    assert store.start(job_id, "stopping") == "running"
    assert store.record_step("stopping", [(job_id, " there", 1, True)], [], step=1) == [1]
    assert store.release(job_id, "stopping")  # handed back: delivery 1 goes to the queue
    assert store.claim_orphans() == []  # just handed back: not claimed
    assert store.claim_orphans(requeue_after=0) == [job_id]  # a minute later, still queued: delivery 2
    w2, w3 = make("w2"), make("w3")
    outcomes = {}
    first = threading.Thread(target=lambda: outcomes.__setitem__("w2", w2.run(job_id)))
    first.start()
    while store.redis.hget(store.key(job_id), "worker") != "w2" and first.is_alive():
        pass
    outcomes["w3"] = w3.run(job_id)
    first.join(120)
    assert outcomes["w2"] == "succeeded" and outcomes["w3"] in ("duplicate", "succeeded"), outcomes
    record = store.get(job_id)
    assert (record["status"], record["attempts"], record["worker"]) == ("succeeded", 2, "w2"), record
    assert record["text"].startswith(" there") and record["completion_tokens"] <= 48, record
    assert store.totals()["running"] == 0 and store.claim_orphans(requeue_after=0) == []


def store_that_loses_redis_after_start(servers: list, prefix: str, then=lambda: None) -> JobStore:
    """A store on servers[0] whose every start stops that server just after it ran (it writes its append-only file
    and exits), then calls `then`."""

    class StoreThatLosesRedisAfterStart(JobStore):
        def start(self, *args, **kwargs):
            try:
                return super().start(*args, **kwargs)
            finally:
                servers[0].stop()
                then()

    return StoreThatLosesRedisAfterStart.from_url(servers[0].url, prefix=prefix)


def test_a_takeover_whose_ending_waits_out_a_redis_outage_still_ends_the_job(loaded, tmp_path):
    # A job whose worker died is cancelled; the worker it is delivered to again takes it over to end it, and Redis
    # goes away right then, for longer than a write waits for it. The ending must still be written once Redis is
    # back. It was not: the write gave up, the task failed (acknowledged), and the record, naming the live worker
    # as holder, stayed "running" for good (every redelivery by the sweep skipped as a duplicate of that worker).
    import time

    import redis

    from shared.redis_server import RedisServer
    from workers.generation import JobRunner

    servers = [RedisServer(data_dir=tmp_path).start()]
    port = servers[0].port
    store = store_that_loses_redis_after_start(servers, "takeover")
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
        assert JobStore.start(store, job_id, "dead-worker") == "running"
        assert store.cancel(job_id) == "running"  # before the sweep's claim (after it, the cancel ends it at once)
        assert store.claim_orphans() == [job_id]
        runner = JobRunner(store, loaded, "w2")
        runner.redis_wait_seconds = 1.0
        try:
            outcome = runner.run(job_id)
        except redis.ConnectionError as exc:
            outcome = f"raised {exc!r}"
        time.sleep(1.5)
        servers.append(RedisServer(port=port, data_dir=tmp_path).start())
        deadline = time.monotonic() + 20
        while store.redis.hget(store.key(job_id), "status") == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        record = store.get(job_id)
        assert (record["status"], record["error_code"]) == ("cancelled", ErrorCode.CANCELLED), (outcome, record)
        assert outcome == "cancel"
        assert store.totals()["running"] == 0
    finally:
        store.redis.close()
        for server in servers:
            server.stop()


def test_a_job_whose_last_write_waits_out_a_redis_outage_still_ends(loaded, tmp_path):
    # The same for a job that ran here: Redis goes away as it ends, for longer than a write waits. Its ending, given
    # up by the engine's step and again by the task, is written once Redis is back. It was lost: the job, held by a
    # live worker, stayed "running" for good.
    from shared.redis_server import RedisServer

    servers = [RedisServer(data_dir=tmp_path).start()]
    port = servers[0].port

    class StoreThatLosesRedisAtTheEnd(JobStore):
        def record_step(self, worker, chunks, endings, step=None):
            if endings and servers[0].process.poll() is None:
                servers[0].stop()
            return super().record_step(worker, chunks, endings, step)

    store = StoreThatLosesRedisAtTheEnd.from_url(servers[0].url, prefix="last-write")
    runner, engine = started_runner(store, loaded, redis_wait_seconds=1.0)
    try:
        job_id, outcome = run_four_tokens(store, runner)
        servers.append(RedisServer(port=port, data_dir=tmp_path).start())
        record = record_once_ended(store, job_id)
        assert (record["status"], record["completion_tokens"]) == ("succeeded", 4), (outcome, record)
        assert outcome == "succeeded" and store.totals()["running"] == 0
        # Its last chunk, lost with the step that ended it, is written with its ending: the text holds every token's.
        # It was kept without it, and the text stopped a token short of the count.
        assert len(loaded.tokenizer(record["text"], add_special_tokens=False).input_ids) == 4, record["text"]
    finally:
        engine.shutdown()
        store.redis.close()
        for server in servers:
            server.stop()


def run_four_tokens(store: JobStore, runner) -> tuple[str, str]:
    """A 4-token greedy job, created and run as its task runs it: its id, and how the run ended (or what it raised)."""
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=4), "interactive")
    try:
        outcome = runner.run(job_id)
    except Exception as exc:
        outcome = f"raised {exc!r}"
    return job_id, outcome


def record_once_ended(store: JobStore, job_id: str, timeout: float = 20.0) -> dict:
    """The job's record once it is no longer running (or after `timeout` seconds)."""
    import time

    deadline = time.monotonic() + timeout
    while store.redis.hget(store.key(job_id), "status") == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    return store.get(job_id)


def run_to_its_end(store: JobStore, loaded) -> tuple[str, dict]:
    """A 4-token job run on a runner of its own whose writes wait 1 s for Redis: how the run ended (or what it
    raised), and the job's record once it is no longer running."""
    runner, engine = started_runner(store, loaded, redis_wait_seconds=1.0)
    try:
        job_id, outcome = run_four_tokens(store, runner)
        return outcome, record_once_ended(store, job_id)
    finally:
        engine.shutdown()


class AnswerCuttingProxy(CuttingProxy):
    """A TCP proxy before a real Redis server that, once armed with some bytes, forwards the next command holding them,
    then closes that connection when the server's answer comes, without passing it on: the command ran, and its
    answer was lost with the connection (a connection cut, a proxy or a server restarting at the wrong moment)."""

    def __init__(self, upstream_port: int):
        self.armed: bytes | None = None
        # How many commands holding `armed` have their answers cut before it disarms itself.
        self.times = 1
        self.cuts = 0
        super().__init__(upstream_port)

    def _connected(self, client, upstream) -> None:
        state = {"cut": False}
        threading.Thread(target=self._pump, args=(client, upstream, True, state), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False, state), daemon=True).start()

    def _pump(self, source, target, to_server: bool, state: dict | None = None) -> None:
        try:
            while data := source.recv(65536):
                if to_server and self.armed is not None and self.armed in data:
                    self.times -= 1
                    if self.times <= 0:
                        self.armed, self.times = None, 1
                    state["cut"] = True
                elif not to_server and state["cut"]:
                    self.cuts += 1
                    break  # the answer goes nowhere
                target.sendall(data)
        except OSError:
            pass
        self._close_both(source, target)


def started_runner(store: JobStore, loaded, redis_wait_seconds: float | None = None):
    """A job runner "w1" on `store`, with a started engine of `loaded` (two slots) publishing through it: returns
    (runner, engine); the caller shuts the engine down."""
    from workers.engine import LLMEngine
    from workers.generation import JobRunner

    runner = JobRunner(store, loaded, "w1")
    if redis_wait_seconds is not None:
        runner.redis_wait_seconds = redis_wait_seconds
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=2, max_model_len=loaded.context_len,
                       on_step=runner.publish)
    runner.attach(engine)
    engine.start()
    return runner, engine


@contextmanager
def runner_behind_a_proxy(loaded, prefix: str):
    """A job runner on an engine of `loaded`, whose store reaches a Redis of its own through an AnswerCuttingProxy:
    yields (proxy, store, runner)."""
    from shared.redis_server import RedisServer

    with RedisServer() as server:
        proxy = AnswerCuttingProxy(server.port)
        store = JobStore.from_url(proxy.url, prefix=prefix)
        runner, engine = started_runner(store, loaded)
        try:
            yield proxy, store, runner
        finally:
            engine.shutdown()
            store.redis.close()
            proxy.close()


def test_a_start_whose_answer_was_lost_runs_the_job(loaded):
    # Redis ran the start of a job (running, held by this worker, one attempt) but its answer was lost with the
    # connection; the start is sent again (redis-py's own retry, then when_redis_answers). The second start found the
    # job held by this very worker and answered "duplicate": the task skipped it, and the job, held by a live worker
    # that did not run it, stayed "running" for good. The same for a start that took a job over to end it.
    with runner_behind_a_proxy(loaded, "lost-answer") as (proxy, store, runner):
        store.redis.script_load(store._start.script)  # so the start's first EVALSHA runs (no NOSCRIPT first)
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=4),
                                 "interactive")
        proxy.armed = store._start.sha.encode()
        outcome = runner.run(job_id)
        assert proxy.cuts == 1
        record = store.get(job_id)
        assert (outcome, record["status"], record["attempts"], record["completion_tokens"]) == (
            "succeeded", "succeeded", 1, 4), (outcome, record)
        assert store.totals()["running"] == 0

        # A takeover: the job's worker died and it was cancelled; the start that makes this worker its ender
        # loses its answer, and its second try must still end the job.
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=4), "interactive")
        assert store.start(job_id, "dead-worker") == "running"
        assert store.cancel(job_id) == "running"  # before the sweep's claim (after it, the cancel ends it at once)
        assert store.claim_orphans() == [job_id]
        proxy.armed = store._start.sha.encode()
        outcome = runner.run(job_id)
        assert proxy.cuts == 2
        record = store.get(job_id)
        assert (outcome, record["status"]) == ("cancel", "cancelled"), (outcome, record)
        assert store.totals()["running"] == 0


def test_a_job_claimed_while_its_live_worker_lapsed_is_not_delivered_again_every_minute(redis_server):
    # A live worker's heartbeat lapses (a long pause, an outage) and the sweep claims its job and delivers it again;
    # the delivery finds the worker beating again and is skipped as a duplicate. The job is that worker's again: the
    # sweep must leave it alone. It was still marked claimed, so the sweep delivered it again every minute for as long
    # as it ran, each delivery one more chance for another worker to resume it in the next lapse (run twice).
    from shared.jobs import WorkerRegistry

    store = JobStore.from_url(redis_server.url, prefix=f"llq-lifecycle-{uuid.uuid4().hex[:8]}")
    registry = WorkerRegistry(store.redis, store.prefix)
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
    assert store.start(job_id, "w1") == "running"
    assert store.claim_orphans() == [job_id]  # w1 has not announced itself: its heartbeat lapsed
    registry.announce("w1", {"name": "w1"}, ttl_seconds=60)  # and it beats again
    registry.announce("w2", {"name": "w2"}, ttl_seconds=60)
    assert store.start(job_id, "w2") == "duplicate"
    assert store.claim_orphans(requeue_after=0) == []
    assert store.record_step("w1", [(job_id, " there", 1, True)], [], step=1) == [1]  # w1 goes on with it
    registry.remove("w1")  # and then dies for real: the sweep delivers its job again
    assert store.claim_orphans() == [job_id]
    assert store.start(job_id, "w2") == "resumed"
    store.redis.close()


def _load_scripts(store: JobStore) -> None:
    """Load every script of `store`, so its first EVALSHA runs (a NOSCRIPT answer cut would prove nothing)."""
    from redis.commands.core import Script

    for script in vars(store).values():
        if isinstance(script, Script):
            store.redis.script_load(script.script)


def test_a_hand_back_whose_answer_was_lost_still_hands_the_job_back(loaded):
    # A stopping worker releases its running job (marked handed back in Redis, the worker's later writes fenced off),
    # aborts it and sends it again. Redis ran the release but its answer was lost with the connection: the release
    # raised (the store's client does not send a command again), and a release sent again found the job marked handed
    # back, no longer this worker's: "not held". Either way the worker neither aborted nor requeued the job: it was not
    # handed back, the shutdown waited for it past its grace period (a stop timeout killed it there), and the sweep,
    # finding it marked handed back, delivered it again a minute later.
    import threading

    with runner_behind_a_proxy(loaded, "lost-release") as (proxy, store, runner):
        _load_scripts(store)
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=400),
                                 "interactive")
        outcome = []
        running = threading.Thread(target=lambda: outcome.append(runner.run(job_id)))
        running.start()
        while int(store.redis.hget(store.key(job_id), "completion_tokens") or 0) < 2:
            assert running.is_alive(), outcome
        proxy.armed = b"requeued@"
        requeued = []
        assert runner.hand_back(requeued.append) == [job_id]
        assert proxy.cuts == 1 and requeued == [job_id]
        running.join(60)
        assert outcome == ["handed_back"]  # Celery's log of the task: it read "cancelled"
        record = store.get(job_id)
        assert (record["status"], record["worker"]) == ("running", "requeued@w1"), record
        assert record["completion_tokens"] < 400


@contextmanager
def started_behind_a_proxy(redis_server, worker: str):
    """A store reaching the test Redis through an AnswerCuttingProxy, and a job started by `worker`: yields
    (proxy, store, job id)."""
    proxy = AnswerCuttingProxy(redis_server.port)
    store = JobStore.from_url(proxy.url, prefix=f"llq-lifecycle-{uuid.uuid4().hex[:8]}")
    try:
        _load_scripts(store)
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
        assert store.start(job_id, worker) == "running"
        yield proxy, store, job_id
    finally:
        store.redis.close()
        proxy.close()


def test_a_sweep_claim_whose_answer_was_lost_still_delivers_the_job(redis_server):
    # The sweep claims a dead worker's job (marked claimed, then delivered again). Redis ran the claim but its answer
    # was lost: the sweep failed, and a claim sent again found the job marked claimed already: not claimed, so not
    # delivered. The job waited, held by nobody, for the next claim a minute later.
    with started_behind_a_proxy(redis_server, "dead-worker") as (proxy, store, job_id):
        proxy.armed = b"requeued@"
        assert store.claim_orphans() == [job_id]
        assert proxy.cuts == 1
        assert store.claim_orphans() == []  # claimed once: not again at the next sweep


def test_a_prompt_whose_answer_was_lost_is_published_once(redis_server):
    # The worker records the job's rendered prompt (and publishes it on the job's channel). Redis wrote it but the
    # answer was lost: the job failed (the write raised), and a write sent again was written and published a second
    # time, with a seq of its own (listeners got the prompt twice).
    from workers.generation import when_redis_answers

    with started_behind_a_proxy(redis_server, "w1") as (proxy, store, job_id):
        proxy.armed = b"a prompt whose answer is lost"
        # Sent again as the runner sends it (JobRunner._generate).
        assert when_redis_answers(lambda: store.set_prompt(job_id, "a prompt whose answer is lost", 5, "w1"),
                                  "writing the prompt", 10)
        assert proxy.cuts == 1
        assert store.get(job_id)["seq"] == 1


def test_a_start_waits_for_redis_as_long_as_it_takes(loaded, tmp_path):
    # A worker took a job's task while Redis was away, for longer than a write waits (5 minutes; 1 s here). Its start
    # gave up: the task failed and was acknowledged, and the job stayed "queued" with no task to run it (or, when the
    # start had run and only its answer was lost, "running" under a live worker that did not run it), for good.
    import threading
    import time

    import redis

    from shared.redis_server import RedisServer

    servers = [RedisServer(data_dir=tmp_path).start()]
    port = servers[0].port
    store = JobStore.from_url(servers[0].url, prefix="start-waits")
    runner, engine = started_runner(store, loaded, redis_wait_seconds=1.0)
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=4),
                                 "interactive")
        servers[0].stop()
        outcome = []

        def run():
            try:
                outcome.append(runner.run(job_id))
            except redis.RedisError as exc:
                outcome.append(f"raised {exc!r}")

        task = threading.Thread(target=run)
        task.start()
        time.sleep(3)
        servers.append(RedisServer(port=port, data_dir=tmp_path).start())
        task.join(60)
        record = store.get(job_id)
        assert (outcome, record["status"], record["attempts"]) == (["succeeded"], "succeeded", 1), record
    finally:
        engine.shutdown()
        store.redis.close()
        for server in servers:
            server.stop()


def test_a_hand_back_is_not_counted_against_the_jobs_attempts(redis_server):
    # MAX_ATTEMPTS stops a job that kills its workers ("started too many times: its workers died"). A job handed back
    # by a worker told to stop (a deploy, a scale-down) had not killed anybody, but its next start counted: a long
    # job handed back through a few rolling restarts failed with that error. A crash still counts.
    store = JobStore.from_url(redis_server.url, prefix=f"llq-lifecycle-{uuid.uuid4().hex[:8]}")
    job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
    assert store.start(job_id, "stopping-1", max_attempts=1) == "running"
    assert store.release(job_id, "stopping-1")
    assert store.start(job_id, "stopping-2", max_attempts=1) == "resumed"
    assert store.release(job_id, "stopping-2")
    assert store.release(job_id, "stopping-2")  # the same release sent again: counted once
    assert store.start(job_id, "dies", max_attempts=1) == "resumed"
    assert store.get(job_id)["attempts"] == 3
    assert store.claim_orphans() == [job_id]  # "dies" died: that start counts
    assert store.start(job_id, "w4", max_attempts=1) == "exhausted"
    store.redis.close()


def test_a_job_whose_record_vanished_is_not_delivered_again_nor_brought_back(redis_server):
    # A running job's record deleted (by hand, or evicted by a Redis out of memory) while the running hash still
    # names it. The sweep claimed it and delivered it again every minute, for ever (each start answered "missing"),
    # and a worker handing it back wrote its holder into a new record: a job of one field, no status, no TTL.
    store = JobStore.from_url(redis_server.url, prefix=f"llq-lifecycle-{uuid.uuid4().hex[:8]}")
    for holder in ("dead-worker", "stopping"):
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
        assert store.start(job_id, holder) == "running"
        store.redis.delete(store.key(job_id))
        if holder == "stopping":
            assert not store.release(job_id, holder)
            assert not store.redis.exists(store.key(job_id))
        assert store.claim_orphans(requeue_after=0) == []
        assert store.totals()["running"] == 0
    store.redis.close()


def test_a_job_started_just_before_a_redis_outage_runs_once_redis_is_back(loaded, tmp_path):
    # Redis goes away right after a job's start, for a few seconds. The reads and the prompt's write that follow the
    # start did not wait for Redis as the other writes do: the first raised, and the job failed for an outage of a few
    # seconds ("ConnectionError: ...", written once Redis was back).
    import threading

    from shared.redis_server import RedisServer

    servers = [RedisServer(data_dir=tmp_path).start()]
    port = servers[0].port
    restart = lambda: servers.append(RedisServer(port=port, data_dir=tmp_path).start())  # noqa: E731
    store = store_that_loses_redis_after_start(servers, "after-start", lambda: threading.Timer(1.5, restart).start())
    runner, engine = started_runner(store, loaded, redis_wait_seconds=30)
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=4),
                                 "interactive")
        outcome = runner.run(job_id)
        record = store.get(job_id)
        assert (outcome, record["status"], record["completion_tokens"], record["error"]) == (
            "succeeded", "succeeded", 4, ""), record
    finally:
        engine.shutdown()
        store.redis.close()
        for server in servers:
            server.stop()


@contextmanager
def celery_on(url: str):
    """The worker's Celery app (shared.celery_app.celery_app, which the sweep and the hand-back send with) publishing
    to the Redis at `url` for the time of the block."""
    from shared.celery_app import celery_app

    def fresh_pools() -> None:
        celery_app._pool = None
        celery_app.amqp._producer_pool = None

    before = celery_app.conf.broker_url
    celery_app.conf.broker_url = url
    fresh_pools()
    try:
        yield celery_app
    finally:
        celery_app.conf.broker_url = before
        fresh_pools()


def test_a_sweep_claim_or_delivery_that_fails_is_delivered_again_soon_and_once(caplog):
    # The sweep claims a dead worker's job, then sends its task. A claim whose answer was lost twice (it ran: the job
    # marked claimed) or a delivery that failed (Redis away) raised, and the job stayed claimed, delivered by nobody,
    # until the claim lapsed a minute later. It must be delivered once Redis answers again, once.
    import threading
    import time

    from shared.redis_server import RedisServer
    from shared.settings import Settings
    from workers.main import _sweep_orphans

    settings = Settings(heartbeat_interval_seconds=0.2, heartbeat_ttl_seconds=1, key_prefix="sweep")
    with RedisServer() as server, celery_on(server.url):
        proxy = AnswerCuttingProxy(server.port)
        store = JobStore.from_url(proxy.url, prefix="sweep")
        direct = JobStore.from_url(server.url, prefix="sweep")
        stop = threading.Event()
        sweep = threading.Thread(target=_sweep_orphans, args=(store, settings, stop), daemon=True)
        try:
            _load_scripts(store)
            for cut in (b"requeued@", b"HMGET"):  # the claim's answers, then the delivery's first read
                caplog.clear()
                job_id, _ = direct.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
                assert direct.start(job_id, "dead-worker") == "running"
                proxy.times, proxy.armed = 1000, cut
                if not sweep.is_alive():
                    sweep.start()
                deadline = time.monotonic() + 60
                while "the orphan sweep lost Redis" not in caplog.text:  # the claim, or the delivery, raised
                    assert time.monotonic() < deadline, (cut, caplog.text)
                    time.sleep(0.05)
                proxy.armed = None  # Redis answers again
                assert direct.redis.hget(direct.running_key, job_id).startswith("requeued@"), cut  # claimed
                deadline = time.monotonic() + 10
                while direct.redis.llen("interactive") == 0:
                    assert time.monotonic() < deadline, (cut, "not delivered", caplog.text)
                    time.sleep(0.1)
                time.sleep(2)  # ten more sweeps
                assert direct.redis.llen("interactive") == 1, cut  # delivered once
                direct.redis.delete("interactive")
                direct.finish(job_id, "cancelled")
        finally:
            stop.set()
            sweep.join(10)
            store.redis.close()
            direct.redis.close()
            proxy.close()


def test_the_orphan_sweep_delivers_a_dead_workers_job_when_redis_refuses_info(caplog):
    # Redis users are often made with "+@all -@dangerous", and INFO is in @dangerous. The sweep read Redis's uptime
    # with INFO at every round: refused (NOPERM), it took that for an outage, and no dead worker's job was ever
    # delivered again: it stayed "running" for good.
    import threading
    import time

    import redis

    from shared.redis_server import RedisServer
    from shared.settings import Settings
    from workers.main import _sweep_orphans

    settings = Settings(heartbeat_interval_seconds=0.2, heartbeat_ttl_seconds=1, key_prefix="sweep-acl")
    with RedisServer() as server, celery_on(server.url):
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("app", enabled=True, passwords=["+secret"], keys=["~*"], channels=["*"],
                          commands=["+@all", "-@dangerous"])
        store = JobStore.from_url(f"redis://app:secret@127.0.0.1:{server.port}/0", prefix="sweep-acl")
        with pytest.raises(redis.exceptions.NoPermissionError):
            store.redis.info("server")
        stop = threading.Event()
        sweep = threading.Thread(target=_sweep_orphans, args=(store, settings, stop), daemon=True)
        try:
            job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
            assert store.start(job_id, "dead-worker") == "running"
            sweep.start()
            deadline = time.monotonic() + 20
            while admin.llen("interactive") == 0:
                assert time.monotonic() < deadline, ("not delivered", caplog.text)
                time.sleep(0.1)
            assert store.redis.hget(store.running_key, job_id).startswith("requeued@")
            assert "the orphan sweep lost Redis" not in caplog.text
        finally:
            stop.set()
            sweep.join(10)
            store.redis.close()
            admin.close()


def test_a_job_handed_back_too_often_fails_with_a_reason(worker, caplog):
    # Hand-backs (a worker told to stop) do not count against max_attempts, so that rolling restarts do not fail a
    # long job. They had no bound at all: a job whose worker was stopped at every start (an eviction, a liveness
    # probe it set off) was handed back and started again for ever. Past a bound of their own, the start fails it.
    from shared.jobs import HANDED_BACK_ERROR, MAX_HAND_BACKS

    store, make = worker

    def handed_back(times: int) -> str:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=8), "interactive")
        for n in range(times):
            assert store.start(job_id, f"stopping-{n}") in ("running", "resumed")
            assert store.release(job_id, f"stopping-{n}")
        return job_id

    job_id = handed_back(MAX_HAND_BACKS + 1)
    assert make("w-last").run(job_id) == "handed_back"
    record = store.get(job_id)
    assert (record["status"], record["error_code"], record["error"]) == (
        "failed", ErrorCode.SERVER_ERROR, HANDED_BACK_ERROR), record
    assert "handed back more than 10 times" in record["error"]
    # The worker's log says so (Celery's own line read "succeeded ...: 'handed_back'").
    assert f"job {job_id} failed: {HANDED_BACK_ERROR}" in caplog.text
    assert record["attempts"] == record["handed_back"] == MAX_HAND_BACKS + 1, record
    assert store.totals()["running"] == 0 and store.claim_orphans(requeue_after=0) == []

    # Up to the bound, the job goes on: handed back MAX_HAND_BACKS times, it runs to its end.
    assert make("w-ok").run(handed_back(MAX_HAND_BACKS)) == "succeeded"


def test_a_hand_back_whose_requeue_fails_is_requeued_once_redis_answers(loaded):
    # A stopping worker releases its job, then sends its task again. A send that failed (Redis away for a moment)
    # was given up at once: the job, released, waited held by nobody until the sweep claimed it a minute later.
    import threading

    from shared.celery_app import task_queue
    from workers.main import _deliver_again

    with runner_behind_a_proxy(loaded, "requeue") as (proxy, store, runner), celery_on(
            f"redis://127.0.0.1:{proxy.upstream_port}/0"):
        _load_scripts(store)
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=400),
                                 "interactive")
        running = threading.Thread(target=runner.run, args=(job_id,))
        running.start()
        while int(store.redis.hget(store.key(job_id), "completion_tokens") or 0) < 2:
            assert running.is_alive()
        proxy.times, proxy.armed = 1000, b"HMGET"  # the requeue's first read
        threading.Timer(1.0, lambda: setattr(proxy, "armed", None)).start()
        assert runner.hand_back(lambda job_id: _deliver_again(store, job_id)) == [job_id]
        running.join(60)
        assert proxy.cuts >= 1
        assert store.redis.llen(task_queue("interactive", loaded.name)) == 1  # sent again, to its model's queue


def test_a_job_whose_ending_meets_a_redis_out_of_memory_still_ends(loaded):
    # Redis refuses writes while out of memory (maxmemory with the noeviction policy) and takes them again once memory
    # is freed (records expire, an operator raises the limit). A job that ended meanwhile: its step and its ending
    # raised OutOfMemoryError, which no write waited out (only a Redis away or silent), so the task failed and the
    # job, held by this live worker, stayed "running" for good. It must end, with its text whole, once Redis takes
    # writes again.
    import threading

    from shared.redis_server import RedisServer

    with RedisServer() as server:

        class StoreThatFillsRedisAtTheEnd(JobStore):
            def record_step(self, worker, chunks, endings, step=None):
                if endings and self.redis.config_get("maxmemory")["maxmemory"] == "0" and not filled:
                    filled.append(True)
                    self.redis.config_set("maxmemory", 1)
                    threading.Timer(3.0, lambda: self.redis.config_set("maxmemory", 0)).start()
                return super().record_step(worker, chunks, endings, step)

        filled = []
        store = StoreThatFillsRedisAtTheEnd.from_url(server.url, prefix="oom")
        try:
            outcome, record = run_to_its_end(store, loaded)
            assert filled and (record["status"], record["completion_tokens"]) == ("succeeded", 4), (outcome, record)
            assert outcome == "succeeded" and store.totals()["running"] == 0
        finally:
            store.redis.close()


@contextmanager
def redis_refusing(client, refusal: str, seconds: float):
    """Make the Redis server of `client` refuse commands as it does for a while in production, and take them again
    `seconds` later (on a timer): "READONLY" (a replica: a failover demoted it, its new master not reachable),
    "MASTERDOWN" (a replica cut off from its master, with replica-serve-stale-data off: reads refused too),
    "NOREPLICAS" (fewer replicas than min-replicas-to-write), "BUSY" (a script running past busy-reply-threshold).
    Yields once Redis refuses; the block ends after Redis takes commands again."""
    import threading
    import time

    import redis

    from shared.redis_server import free_port

    if refusal in ("READONLY", "MASTERDOWN"):
        client.config_set("replica-serve-stale-data", "yes" if refusal == "READONLY" else "no")
        client.replicaof("127.0.0.1", free_port())  # a master that never answers: the replica keeps its data
        undo = lambda: client.replicaof("NO", "ONE")  # noqa: E731
    elif refusal == "NOREPLICAS":
        client.config_set("min-replicas-to-write", 1)
        undo = lambda: client.config_set("min-replicas-to-write", 0)  # noqa: E731
    elif refusal == "BUSY":
        client.config_set("busy-reply-threshold", 100)
        where = client.connection_pool.connection_kwargs
        busy = redis.Redis(host=where["host"], port=where["port"])
        script = "local s = redis.call('TIME') while (redis.call('TIME')[1] - s[1]) * 1000000 " \
                 f"+ redis.call('TIME')[2] - s[2] < {int(seconds * 1e6)} do end"
        runner = threading.Thread(target=busy.eval, args=(script, 0))
        runner.start()
        time.sleep(0.3)
        undo = runner.join
    else:
        raise ValueError(refusal)
    timer = threading.Timer(seconds, undo) if refusal != "BUSY" else None
    if timer:
        timer.start()
    try:
        yield
    finally:
        (timer or runner).join()
        if refusal == "BUSY":
            busy.close()
        client.config_set("replica-serve-stale-data", "yes")


def test_a_worker_write_waits_out_redis_refusing_writes_as_it_waits_out_an_outage():
    # A failover makes the node a worker writes to a read-only replica for a few seconds (READONLY, or MASTERDOWN
    # while it has no master), a Redis with min-replicas-to-write refuses writes while its replicas catch up
    # (NOREPLICAS), a slow script holds Redis (BUSY): each passes, as an outage does. A worker's write raised at the
    # first of them: the step's text was lost, or the job's ending, and the job stayed "running". An error that
    # would come again (a wrong key type) is raised at once.
    import time

    import pytest
    import redis

    from shared.redis_server import RedisServer
    from workers.generation import when_redis_answers

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            for refusal in ("READONLY", "MASTERDOWN", "NOREPLICAS", "BUSY"):
                with redis_refusing(client, refusal, 1.0):
                    started = time.monotonic()
                    assert when_redis_answers(lambda: client.set("written", refusal), refusal, wait_seconds=30)
                assert client.get("written") == refusal
                assert time.monotonic() - started > 0.5, refusal
            started = time.monotonic()
            with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
                when_redis_answers(lambda: client.hset("written", "field", "1"), "a wrong write", wait_seconds=30)
            assert time.monotonic() - started < 1
        finally:
            client.close()


def test_a_job_whose_ending_meets_a_failover_still_ends(loaded):
    # A failover as a job ends: its Redis is a read-only replica for longer than a write waits (READONLY). Its step
    # and its ending raised ReadOnlyError, which no write waited out: the task failed and the job, held by this live
    # worker, stayed "running" for good; and an ending kept for the background writer (Redis away, then back as a
    # replica) was dropped at the first READONLY. It must end, with its text whole, once Redis takes writes again.
    from shared.redis_server import RedisServer

    with RedisServer() as server:
        refusals = []

        class StoreThatFailsOverAtTheEnd(JobStore):
            def record_step(self, worker, chunks, endings, step=None):
                if endings and not refusals:
                    refusals.append(redis_refusing(self.redis, "READONLY", 5.0))
                    refusals[0].__enter__()
                return super().record_step(worker, chunks, endings, step)

        store = StoreThatFailsOverAtTheEnd.from_url(server.url, prefix="failover")
        try:
            outcome, record = run_to_its_end(store, loaded)
            assert refusals and (record["status"], record["completion_tokens"]) == ("succeeded", 4), (outcome, record)
            assert outcome == "succeeded" and store.totals()["running"] == 0
        finally:
            if refusals:
                refusals[0].__exit__(None, None, None)
            store.redis.close()


def test_a_start_that_meets_a_redis_error_leaves_no_job_queued(loaded):
    # A start refused by Redis for a while (a failover: READONLY) failed its task, acknowledged, and left the job
    # "queued" with no task to run it, for good; it must wait, as for an outage, and run the job. A start refused for
    # good (here the start's script answers an error every time, as for a permission it lacks) must end the job
    # failed, saying why.
    from shared.redis_server import RedisServer

    with RedisServer() as server:
        store = JobStore.from_url(server.url, prefix="start-refused")
        runner, engine = started_runner(store, loaded, redis_wait_seconds=1.0)
        try:
            job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=4),
                                     "interactive")
            with redis_refusing(store.redis, "READONLY", 2.0):
                try:
                    outcome = runner.run(job_id)
                except Exception as exc:
                    outcome = f"raised {exc!r}"
            record = store.get(job_id)
            assert (outcome, record["status"], record["attempts"], record["completion_tokens"]) == (
                "succeeded", "succeeded", 1, 4), (outcome, record)

            job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=4), "interactive")
            store._start = store.redis.register_script("return redis.error_reply('ERR the start is refused for good')")
            try:
                outcome = runner.run(job_id)
            except Exception as exc:
                outcome = f"raised {exc!r}"
            record = store.get(job_id)
            assert (outcome, record["status"], record["error_code"]) == ("failed", "failed", ErrorCode.SERVER_ERROR), (
                outcome, record)
            assert record["error"].startswith("the worker could not start the job: ResponseError"), record
            assert store.totals()["queued"] == {queue: 0 for queue in store.totals()["queued"]}
            assert store.totals()["running"] == 0
        finally:
            engine.shutdown()
            store.redis.close()


def test_the_hand_back_bound_of_the_store_fails_a_job_with_its_own_number(redis_server, loaded):
    # The bound is a setting (LLAVA_QUEUE_MAX_HAND_BACKS, the store's max_hand_backs); the runner failed a job past it
    # with the default bound's message ("more than 10 times") whatever the bound was.
    from shared.jobs import handed_back_error

    store = JobStore.from_url(redis_server.url, prefix=f"llq-bound-{uuid.uuid4().hex[:8]}", max_hand_backs=1)
    runner, engine = started_runner(store, loaded)
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=4), "interactive")
        for n in range(2):
            assert store.start(job_id, f"stopping-{n}") in ("running", "resumed")
            assert store.release(job_id, f"stopping-{n}")
        assert runner.run(job_id) == "handed_back"  # its second hand-back's start: past the bound of 1
        record = store.get(job_id)
        assert (record["status"], record["error_code"], record["error"]) == (
            "failed", ErrorCode.SERVER_ERROR, handed_back_error(1)), record
        assert "more than 1 times" in record["error"]
    finally:
        engine.shutdown()
        store.redis.close()


def test_an_ending_redis_refuses_for_good_is_logged_not_raised_out_of_the_task(redis_server, loaded, caplog):
    # An ending that Redis refuses for good (not an outage nor a passing refusal: here the job's record turned into a
    # key of another type, WRONGTYPE; an ACL's NOPERM alike) was raised out of run(): the Celery task failed with it,
    # acknowledged. It is logged now, saying the ending cannot be written, and run() returns: a record of another type
    # as one WARNING naming the damage (as the API logs one), no traceback.
    import logging

    import redis

    class StoreThatBreaksTheRecordAtTheEnd(JobStore):
        def record_step(self, worker, chunks, endings, step=None):
            if endings:
                self.redis.delete(self.key(endings[0].job_id))
                self.redis.set(self.key(endings[0].job_id), "a record of another type")
            return super().record_step(worker, chunks, endings, step)

    store = StoreThatBreaksTheRecordAtTheEnd.from_url(redis_server.url, prefix=f"llq-refused-{uuid.uuid4().hex[:8]}")
    runner, engine = started_runner(store, loaded, redis_wait_seconds=1.0)
    try:
        with caplog.at_level(logging.WARNING, logger="llava_queue.worker"):
            job_id, outcome = run_four_tokens(store, runner)
        assert not outcome.startswith("raised"), outcome
        said = [record for record in caplog.records if record.name == "llava_queue.worker" and job_id in record.message]
        assert [(record.levelname, "record is damaged" in record.message and "is not written" in record.message,
                 record.exc_info) for record in said] == [("WARNING", True, None)], caplog.text

        # A start Redis refuses for good: the failed ending the runner writes then is refused too.
        broken, _ = store.create(GenerateRequest(prompt="Once upon a time", max_new_tokens=4), "interactive")
        store.redis.delete(store.key(broken))
        store.redis.set(store.key(broken), "a record of another type")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llava_queue.worker"):
            try:
                outcome = runner.run(broken)
            except redis.RedisError as exc:
                outcome = f"raised {exc!r}"
        assert outcome == "failed" and broken in caplog.text and "is not written" in caplog.text, caplog.text
    finally:
        engine.shutdown()
        store.redis.close()
