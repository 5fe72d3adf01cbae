"""Operations: what an operator scrapes, probes, reads in the logs and types at the shell.

The API's `/metrics` and `/readyz` and `llava-queue status` run against the real stack; the
worker's metrics run in this process on a real engine with the default model (the stack's
worker has no exporter port), on the test Redis under a key prefix of their own.
"""

import base64
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import first_answer, job_final, start_service
from shared.redis_server import RedisServer, free_port
from shared.settings import Settings

FRANCE = [{"role": "user", "text": "What is the capital of France?"}]


def scrape(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def run_job(stack, **payload) -> dict:
    return job_final(stack, requests.post(f"{stack.base_url}/v1/jobs", json=payload, timeout=10).json()["id"])


def test_api_metrics_count_jobs_from_redis(stack):
    before = scrape(requests.get(f"{stack.base_url}/metrics", timeout=10).text)
    job = run_job(stack, messages=FRANCE, temperature=0, max_new_tokens=8)
    assert job["status"] == "succeeded"
    response = requests.get(f"{stack.base_url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = scrape(response.text)
    submitted = ("llava_queue_jobs_submitted_total", (("queue", "interactive"),))
    succeeded = ("llava_queue_jobs_finished_total", (("error_code", "0"), ("status", "succeeded")))
    assert after[submitted] >= before.get(submitted, 0) + 1
    assert after[succeeded] >= before.get(succeeded, 0) + 1
    assert after[("llava_queue_redis_up", ())] == 1
    assert ("llava_queue_queue_depth", (("queue", "batch"),)) in after
    assert ("llava_queue_jobs", (("state", "running"),)) in after
    # (Other tests' models, announced on the same Redis within the last minutes, have series at 0 too.)
    workers = {labels: value for (name, labels), value in after.items()
               if name == "llava_queue_workers" and dict(labels)["model"] == "SmolLM2-135M-Instruct"}
    assert workers == {(("model", "SmolLM2-135M-Instruct"), ("ready", "true")): 1,
                       (("model", "SmolLM2-135M-Instruct"), ("ready", "false")): 0}
    assert after[("llava_queue_worker_slots", (("model", "SmolLM2-135M-Instruct"),))] == 16


def test_readyz_needs_redis_and_a_ready_worker_for_the_default_model(stack):
    ready = requests.get(f"{stack.base_url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready_workers"] == 1, ready.text
    # The same deployment with a default model no worker serves, and with Redis away (in-process apps).
    from api.main import create_app

    with TestClient(create_app(Settings(redis_url=stack.redis_url, default_model="llava-v1.5-13b"))) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "no live, ready worker serves model 'llava-v1.5-13b'" in response.json()["reasons"][0]
        assert "SmolLM2-135M-Instruct" in response.json()["reasons"][0]
        # Its worker series are there at 0: an alert on `llava_queue_workers{ready="true"} == 0` found no series
        # for a model no worker serves, and never fired.
        metrics = scrape(client.get("/metrics").text)
        model = (("model", "llava-v1.5-13b"),)
        assert metrics[("llava_queue_workers", (*model, ("ready", "true")))] == 0
        assert metrics[("llava_queue_worker_slots", model)] == 0
    with TestClient(create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0"))) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json()["redis"] is False
        assert "Redis is unreachable" in response.json()["reasons"][0]
        metrics = scrape(client.get("/metrics").text)
        assert metrics[("llava_queue_redis_up", ())] == 0


def test_api_finished_counters_are_there_at_zero_before_the_first_ending(redis_server):
    """A counter series that appears with its first event hides that event from rate() and increase(): Prometheus
    has no sample before it. The README's failure query, `rate(llava_queue_jobs_finished_total{status="failed"}[5m])`,
    missed the first failed job of a deployment (and of each error code). Every way a job ends is counted from 0."""
    from api.main import create_app

    with TestClient(create_app(Settings(redis_url=redis_server.url, key_prefix="llq-fresh-metrics"))) as client:
        metrics = scrape(client.get("/metrics").text)
    finished = {labels: value for (name, labels), value in metrics.items()
                if name == "llava_queue_jobs_finished_total"}
    assert finished == {(("error_code", code), ("status", status)): 0 for status, code in (
        ("succeeded", "0"), ("failed", "1"), ("failed", "4"), ("cancelled", "5"), ("expired", "6"))}
    submitted = {labels: value for (name, labels), value in metrics.items()
                 if name == "llava_queue_jobs_submitted_total"}
    assert submitted == {(("queue", "interactive"),): 0, (("queue", "batch"),): 0}


def test_jobs_past_their_deadline_are_not_counted_as_queued(redis_server):
    """With no worker up to sweep them, jobs queued past their deadline stayed in the queue depth of `/metrics` and
    of `llava-queue status` (what an autoscaler or an operator reads) until someone submitted or polled, while the
    API's admission ended them first and did not count them. Both now end them before they count."""
    from api.main import create_app
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest

    prefix = "llq-overdue-ops"
    store = JobStore.from_url(redis_server.url, prefix)
    for _ in range(2):
        store.create(GenerateRequest(prompt="Hi", max_new_tokens=2), "interactive", deadline_seconds=0.2)
    store.create(GenerateRequest(prompt="Hi", max_new_tokens=2), "batch")  # no deadline: it waits
    time.sleep(0.5)
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_KEY_PREFIX=prefix)
    status = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[2].split() == ["interactive", "0"] and lines[3].split() == ["batch", "1"], status.stdout
    assert "finished 2 (expired 2)" in lines[4], status.stdout

    store.create(GenerateRequest(prompt="Hi", max_new_tokens=2), "interactive", deadline_seconds=0.2)
    time.sleep(0.5)
    with TestClient(create_app(Settings(redis_url=redis_server.url, key_prefix=prefix))) as client:
        metrics = scrape(client.get("/metrics").text)
    assert metrics[("llava_queue_queue_depth", (("queue", "interactive"),))] == 0
    assert metrics[("llava_queue_queue_depth", (("queue", "batch"),))] == 1
    assert metrics[("llava_queue_jobs", (("state", "queued"),))] == 1
    assert metrics[("llava_queue_jobs_finished_total", (("error_code", "6"), ("status", "expired")))] == 3


def test_running_jobs_no_worker_runs_are_counted_apart(redis_server):
    """A job handed back, or claimed from a dead worker, is "running" with its task back in a queue: `/metrics` and
    `status` counted it as running and not in the queue depth, so an autoscaler saw no work for its model."""
    from api.main import create_app
    from shared.jobs import JobStore, WorkerRegistry
    from shared.protocol import GenerateRequest

    prefix = "llq-requeued-ops"
    store = JobStore.from_url(redis_server.url, prefix)
    for holder in ("dead-worker", "handing-back", "live-worker"):
        job_id, _ = store.create(GenerateRequest(prompt="Hi", max_new_tokens=2), "interactive")
        assert store.start(job_id, holder) == "running"
        if holder == "handing-back":
            assert store.release(job_id, holder)
    WorkerRegistry(store.redis, prefix).announce("live-worker", {"name": "live-worker"}, ttl_seconds=60)
    assert len(store.claim_orphans()) == 1  # dead-worker's
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_KEY_PREFIX=prefix)
    status = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert "running 3 (2 back in a queue, no worker running them)" in status.stdout, status.stdout
    with TestClient(create_app(Settings(redis_url=redis_server.url, key_prefix=prefix))) as client:
        metrics = scrape(client.get("/metrics").text)
    assert metrics[("llava_queue_jobs", (("state", "running"),))] == 3
    assert metrics[("llava_queue_requeued_jobs", ())] == 2


def test_task_events_are_off_until_a_monitor_turns_them_on(stack):
    """By default a worker sends worker events but no task events (those would go out through the consumer
    thread that takes every job); Flower's `enable_events` command turns them on, and they name the job."""
    from shared.celery_app import make_celery

    app = make_celery(Settings(redis_url=stack.redis_url))
    events: list[dict] = []
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        listening = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
                                     daemon=True)
        listening.start()

        def seen(job_id: str | None = None) -> set[str]:
            return {event["type"] for event in list(events) if job_id is None or event.get("uuid") == job_id}

        def wait_for(kinds: set[str], job_id: str | None = None, timeout: float = 15) -> set[str]:
            deadline = time.monotonic() + timeout
            while not kinds <= seen(job_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            return seen(job_id)

        try:
            # The worker's heartbeat shows the receiver is listening.
            assert "worker-heartbeat" in wait_for({"worker-heartbeat"})
            quiet = run_job(stack, prompt="Hi", temperature=0, max_new_tokens=2)
            assert quiet["status"] == "succeeded"
            time.sleep(1)
            assert not [event for event in events if event["type"].startswith("task-")]
            app.control.enable_events()
            try:
                watched = run_job(stack, prompt="Hi", temperature=0, max_new_tokens=2)
                assert watched["status"] == "succeeded"
                seen = wait_for({"task-received", "task-started", "task-succeeded"}, watched["id"])
                assert {"task-received", "task-started", "task-succeeded"} <= seen, seen
            finally:
                app.control.disable_events()
        finally:
            receiver.should_stop = True
            listening.join(10)


FREEZE_CHECK = """
import gc, weakref
from shared.heap import freeze_startup_heap
class Node: pass
kept = [Node() for _ in range(1000)]
a, b = Node(), Node()
a.other, b.other = b, a
garbage = weakref.ref(a)
del a, b
frozen = freeze_startup_heap()
print(frozen, garbage() is None, any(obj is kept[0] for obj in gc.get_objects()))
"""


def test_startup_objects_are_kept_out_of_full_collections(stack):
    # shared/heap.py, in a process of its own: start-up's cyclic garbage is collected, what lives on is frozen
    # (no collection walks it again); the stack's API and worker say how many objects they froze.
    out = subprocess.run([sys.executable, "-c", FREEZE_CHECK], capture_output=True, text=True, timeout=60,
                         check=True, cwd=Path(__file__).parent.parent).stdout.split()
    assert int(out[0]) >= 1000 and out[1:] == ["True", "False"], out
    for name in ("api", "worker"):
        log = (Path(stack.log_dir) / f"{name}.log").read_text()
        counts = [int(line.split(" start-up objects frozen")[0].split()[-1]) for line in log.splitlines()
                  if " start-up objects frozen out of full garbage collections" in line]
        assert counts and counts[0] > 20_000, (name, counts)


def test_status_table_and_watch(stack):
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=stack.redis_url)
    once = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert lines[1].split() == ["QUEUE", "QUEUED"] and lines[2].split()[0] == "interactive"
    header = next(line for line in lines if line.startswith("WORKER"))
    assert header.split() == ["WORKER", "MODEL", "DEVICE", "READY", "SLOTS", "WAITING", "KV", "BUDGET", "TOK/S",
                              "HEARTBEAT"]
    row = lines[lines.index(header) + 1].split()
    assert row[1] == "SmolLM2-135M-Instruct" and row[3] == "yes" and row[4].endswith("/16")
    assert lines[-1].startswith("throughput: ")
    watch = subprocess.Popen([sys.executable, "-m", "shared.cli", "status", "--watch", "0.3"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    assert out.count("\033[H\033[2J") >= 2 and out.count("SmolLM2-135M-Instruct@") >= 2
    # A reader that leaves (`llava-queue status | head`): no BrokenPipeError traceback.
    read, write = os.pipe()
    os.close(read)
    try:
        gone = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=30, check=False)
    finally:
        os.close(write)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr


def test_status_never_prints_the_redis_password():
    # redis-py takes the password from the URL's user part or from its query (`?password=`, the documented form
    # for a unix socket); `llava-queue status` prints the URL (here in its error: nothing listens on the port).
    port = free_port()
    for url in (f"redis://:hunter2@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0?password=hunter2&db=0",
                f"unix:///tmp/no-such-redis-{port}.sock?db=0&password=hunter2"):
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=url)
        done = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 1 and "does not answer" in done.stderr, done.stderr
        assert "hunter2" not in done.stdout + done.stderr, done.stderr


def test_json_logs_carry_the_job_id(stack):
    """An API replica with JSON logs: its lines about a job (uvicorn's access lines too) name the job."""
    port = free_port()
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=stack.redis_url, LLAVA_QUEUE_LOG_FORMAT="json")
    log_dir = Path(stack.log_dir)
    api = start_service("api-json", ["api", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
    try:
        url = f"http://127.0.0.1:{port}"
        first_answer(api, "GET", f"{url}/healthz", logs=(log_dir / "api-json.log").read_text)
        job_id = requests.post(f"{url}/v1/jobs", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=10).json()["id"]
        requests.get(f"{url}/v1/jobs/{job_id}", timeout=10)
    finally:
        api.terminate()
        api.wait(15)
    lines = [json.loads(line) for line in (log_dir / "api-json.log").read_text().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    about_job = [line for line in lines if job_id in line["message"]]
    assert any(line["logger"] == "uvicorn.access" for line in about_job)
    assert all(line["job_id"] == job_id for line in about_job)


def test_job_context_tags_every_line_of_a_celery_task():
    from celery import signals

    from shared.logs import JsonFormatter, TextFormatter, bind_job_ids_to_celery_tasks

    bind_job_ids_to_celery_tasks()
    record = lambda message: logging.LogRecord("llava_queue.worker", logging.INFO, __file__, 1, message, (), None)
    job_id = "0123456789abcdef0123456789abcdef"
    signals.task_prerun.send(sender=None, task_id="t1", task=None, args=[job_id], kwargs={})
    tagged = json.loads(JsonFormatter().format(record("prompt rendered")))
    assert tagged["job_id"] == job_id and tagged["message"] == "prompt rendered"
    assert TextFormatter().format(record("prompt rendered")).endswith(f"prompt rendered [job {job_id}]")
    signals.task_postrun.send(sender=None, task_id="t1", task=None, args=[job_id], kwargs={})
    assert "job_id" not in json.loads(JsonFormatter().format(record("idle")))


def test_a_worker_with_json_logs_writes_nothing_else(default_model_dir, tmp_path):
    """With JSON logs every line a worker writes is a JSON object a log collector can read: Celery's banner (20 lines
    of ASCII art on stdout), its "worker: Warm shutdown" notice, Python warnings (Celery's superuser warning, several
    lines) and the model loader's progress bars were plain text among them; so was the line that names a variable
    that is no setting (MAX_NUM_SEQ)."""
    with RedisServer() as server:
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=server.url, LLAVA_QUEUE_LOG_FORMAT="json",
                   LLAVA_QUEUE_MODEL_PATH=str(default_model_dir), LLAVA_QUEUE_MAX_NUM_SEQ="2")
        env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        worker = start_service("worker-json", ["worker"], env, tmp_path)
        log = tmp_path / "worker-json.log"
        try:
            deadline = time.monotonic() + 180
            while " ready." not in log.read_text():
                assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0, log.read_text()[-3000:]
        finally:
            if worker.poll() is None:
                worker.kill()
    text = log.read_text()
    not_json = [line for line in text.splitlines() if not line.startswith("{")]
    assert not not_json, not_json
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(line["message"] == "worker: Warm shutdown (MainProcess)" for line in lines), text
    assert any("LLAVA_QUEUE_MAX_NUM_SEQ is not a setting" in line["message"] for line in lines), text
    if os.geteuid() == 0:  # Celery warns a worker run as root
        assert any(line["logger"] == "py.warnings" and "superuser" in line["message"] for line in lines), text


@pytest.fixture(scope="module")
def in_process_worker(redis_server, default_model_dir, tmp_path_factory):
    """A JobRunner and engine in this process, on the default model and the test Redis (a key prefix of its own)."""
    from shared.jobs import JobStore
    from workers.builder import load_model
    from workers.engine import LLMEngine
    from workers.generation import JobRunner
    from workers.main import _warm_up
    from workers.metrics import METRICS, serve

    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    store = JobStore.from_url(redis_server.url, prefix="llq-ops-test")
    runner = JobRunner(store, loaded, "ops-test-worker")
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=4, max_model_len=loaded.context_len,
                       on_step=runner.publish)
    runner.attach(engine)
    server = serve(METRICS, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}"
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 503  # still loading
    _warm_up(engine, loaded)
    METRICS.observe_load(loaded.name, 1.5, 0.25)
    METRICS.bind(loaded.name, engine)
    conversation_log = tmp_path_factory.mktemp("conversations") / "conv.jsonl"
    METRICS.start_observer(store, runner.worker_name, str(conversation_log))
    engine.start()
    METRICS.set_ready(True)
    assert requests.get(f"{url}/readyz", timeout=5).status_code == 503  # no heartbeat has reached Redis yet
    METRICS.set_reaching_redis(True)  # as the worker's first heartbeat does
    try:
        yield store, runner, url, conversation_log
    finally:
        engine.shutdown()
        server.shutdown()


def test_worker_metrics_and_conversation_log(in_process_worker):
    from shared.protocol import GenerateRequest

    store, runner, url, conversation_log = in_process_worker
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    requests_ = [GenerateRequest(messages=[{"role": "user", "text": "Hello", "images": [image]}], temperature=0,
                                 max_new_tokens=6),
                 GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=6, stop="\n\n\n")]
    job_ids = [store.create(request, "interactive")[0] for request in requests_]
    threads = [threading.Thread(target=runner.run, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [store.get(job_id)["status"] for job_id in job_ids] == ["succeeded", "succeeded"]

    model = (("model", "SmolLM2-135M-Instruct"),)
    deadline = time.monotonic() + 10
    while True:
        metrics = scrape(requests.get(f"{url}/metrics", timeout=5).text)
        if metrics.get(("llava_queue_e2e_request_latency_seconds_count", model), 0) >= 2:
            break
        assert time.monotonic() < deadline, "the finished jobs' latencies were not observed"
        time.sleep(0.1)
    for name in ("time_in_queue_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds"):
        assert metrics[(f"llava_queue_{name}_count", model)] == 2, name
    assert metrics[("llava_queue_batch_size_count", model)] >= 6
    # Both jobs were in the batch together for at least one step.
    assert metrics[("llava_queue_batch_size_bucket", (("le", "1.0"),) + model)] < \
        metrics[("llava_queue_batch_size_count", model)]
    completion_tokens = sum(store.get(job_id)["completion_tokens"] for job_id in job_ids)
    assert metrics[("llava_queue_generated_tokens_total", model)] >= completion_tokens
    assert metrics[("llava_queue_worker_jobs_total", model + (("status", "succeeded"),))] == 2
    assert metrics[("llava_queue_model_load_seconds", model)] == 1.5
    assert metrics[("llava_queue_kv_budget_tokens", model)] == 16384
    assert metrics[("llava_queue_worker_ready", ())] == 1
    assert requests.get(f"{url}/readyz", timeout=5).json() == {"ready": True, "model": "SmolLM2-135M-Instruct"}

    lines = {line["job_id"]: line for line in map(json.loads, conversation_log.read_text().splitlines())}
    chat = lines[job_ids[0]]
    assert chat["type"] == "chat" and chat["model"] == "SmolLM2-135M-Instruct" and chat["status"] == "succeeded"
    assert chat["start"] <= chat["finish"] == chat["tstamp"]
    assert chat["parameters"] == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 6, "stop": None, "seed": None}
    assert chat["messages"] == [{"role": "user", "text": "Hello"}]
    # Hashed as the job started: its record has lost its images since it ended (tests/test_records_s18.py).
    assert chat["images"] == [hashlib.md5(buffer.getvalue()).hexdigest()]
    assert image not in store.redis.hget(store.key(job_ids[0]), "request")
    assert image not in conversation_log.read_text()
    assert lines[job_ids[1]]["prompt"] == "Once upon a time" and lines[job_ids[1]]["images"] == []


def test_the_worker_exporter_listens_on_an_ipv6_address():
    """LLAVA_QUEUE_WORKER_METRICS_HOST=:: (every address, IPv6 and IPv4) or ::1: the exporter's server was always
    IPv4, so the worker refused to start ("Address family for hostname not supported; give each worker on this host
    a port of its own", a hint about ports for what was no port problem)."""
    import socket

    from workers.metrics import WorkerMetrics, serve

    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    for host, reached_at in (("::1", "[::1]"), ("::", "[::1]"), ("::", "127.0.0.1")):
        server = serve(WorkerMetrics(), host, 0)
        try:
            url = f"http://{reached_at}:{server.server_port}"
            assert requests.get(f"{url}/readyz", timeout=5).json() == {"ready": False, "model": None}
            metrics = scrape(requests.get(f"{url}/metrics", timeout=5).text)
            assert metrics[("llava_queue_worker_ready", ())] == 0
        finally:
            server.shutdown()
            server.server_close()


def test_worker_series_are_there_at_zero_from_the_start(in_process_worker):
    """After a worker (re)starts, its first failed job created the series `llava_queue_worker_jobs_total{status=
    "failed"}` at 1, and `increase(...[5m])` saw no increase (no sample before it): an alert on it missed the first
    failure after every restart. Every status's counter and every latency histogram is there at 0 from the start."""
    _, _, url, _ = in_process_worker
    metrics = scrape(requests.get(f"{url}/metrics", timeout=5).text)
    model = (("model", "SmolLM2-135M-Instruct"),)
    for status in ("succeeded", "failed", "cancelled", "expired"):
        assert ("llava_queue_worker_jobs_total", model + (("status", status),)) in metrics, status
    assert metrics[("llava_queue_worker_jobs_total", model + (("status", "failed"),))] == 0
    assert metrics[("llava_queue_worker_jobs_total", model + (("status", "expired"),))] == 0
    assert ("llava_queue_prompt_tokens_total", model) in metrics
    for name in ("batch_size", "time_in_queue_seconds", "time_to_first_token_seconds",
                 "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert (f"llava_queue_{name}_count", model) in metrics, name
        assert (f"llava_queue_{name}_bucket", (("le", "+Inf"),) + model) in metrics, name


def test_a_cancellation_before_the_job_reaches_the_engine_still_stops_it(in_process_worker):
    # A DELETE that lands after the worker started the job but before its engine has it: the broadcast finds
    # nothing to abort (this worker does not even listen to it here). The job's first chunk is kept, its write
    # answers -2, and the worker stops the job: it ends cancelled instead of running to max_new_tokens.
    from shared.jobs import JobStore
    from shared.protocol import GenerateRequest

    store, runner, _, _ = in_process_worker
    api = JobStore(store.redis, store.prefix)

    class CancelledOnTheWay(JobStore):
        def set_prompt(self, job_id: str, prompt: str, prompt_tokens: int, worker: str) -> bool:
            written = super().set_prompt(job_id, prompt, prompt_tokens, worker)
            assert api.cancel(job_id) == "running"
            return written

    runner.store = CancelledOnTheWay(store.redis, store.prefix, store.ttl_seconds)
    try:
        story = [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}]
        job_id, _ = store.create(GenerateRequest(messages=story, temperature=0, max_new_tokens=200), "interactive")
        assert runner.run(job_id) == "cancelled"
    finally:
        runner.store = store
    record = store.get(job_id)
    assert record["status"] == "cancelled" and record["error_code"] != 0
    assert 1 <= record["completion_tokens"] < 10 and record["text"], record


def test_the_app_under_plain_uvicorn_on_a_port_in_use_exits(redis_server):
    """`uvicorn api.main:app` (the app run without `llava-queue api`) binds its port after the app's lifespan has
    started. On a port in use, the lifespan's end waited for ever for the pub/sub reader, which had lost its
    cancellation: the process hung, deaf to SIGTERM, instead of exiting with uvicorn's error."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)],
                             env=dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url), capture_output=True,
                             text=True, timeout=30, cwd=Path(__file__).parent.parent)
    assert run.returncode == 3 and "address already in use" in run.stderr, run.stderr[-2000:]


def test_status_reads_a_read_only_replica():
    # `status` ends overdue jobs before it counts the queues, a write: against a replica (read-only, as an operator
    # points a dashboard at one) it said "does not answer" and exited 1 as soon as one job was past its deadline.
    from shared.jobs import JobStore, WorkerRegistry
    from shared.protocol import GenerateRequest

    with RedisServer() as primary, RedisServer() as replica:
        replica_client = redis.Redis.from_url(replica.url, decode_responses=True)
        replica_client.replicaof("127.0.0.1", primary.port)
        store = JobStore.from_url(primary.url)
        WorkerRegistry(store.redis).announce("m@host", {"name": "m@host", "model": "m", "heartbeat_at": time.time()})
        store.create(GenerateRequest(prompt="hi"), "interactive", deadline_seconds=0.01)
        deadline = time.monotonic() + 10
        while replica_client.zcard("llq:workers") == 0 or replica_client.zcard("llq:deadlines") == 0:
            assert time.monotonic() < deadline, "the replica never caught up"
            time.sleep(0.1)
        time.sleep(0.05)  # the job is past its deadline
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=replica.url)
        done = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[2].split() == ["interactive", "1"] and any(line.startswith("m@host") for line in lines), lines
        # So does /metrics: it said `llava_queue_redis_up 0`, and nothing else.
        from api.main import create_app

        with TestClient(create_app(Settings(redis_url=replica.url))) as client:
            metrics = scrape(client.get("/metrics").text)
        assert metrics[("llava_queue_redis_up", ())] == 1
        assert metrics[("llava_queue_queue_depth", (("queue", "interactive"),))] == 1
        assert metrics[("llava_queue_workers", (("model", "m"), ("ready", "true")))] == 1
