"""The real stack for the tests: a Redis server process, a Celery worker process with the real
default model, and the API process, started once per session on free ports."""

import os
import signal
import subprocess
from collections.abc import Callable
from contextlib import contextmanager
import sys
import tempfile
import time
from pathlib import Path

import pytest
import redis
import requests

from shared.redis_server import RedisServer, free_port

CACHE_DIR = Path(os.environ.get("LLAVA_QUEUE_CACHE_DIR", Path.home() / ".cache" / "llava-queue"))

# A suite started in the background by a shell without job control (`(bash .ci/run &)`, nohup) has SIGINT ignored,
# and every process it starts inherits that: the tests that press Ctrl-C on `llava-queue up`, `status --watch` or
# `eval` waited out their timeouts. The processes the tests start get Ctrl-C as a terminal gives it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct) in Hugging Face format, built once and cached."""
    from workers.default_model import ensure_default_model

    return ensure_default_model(CACHE_DIR)


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis (or Valkey) server process on a free port."""
    with RedisServer() as server:
        yield server


# What uvicorn logs when a request or WebSocket handler raises instead of answering (or closing).
UNHANDLED = "Exception in ASGI application"
# The stacks' WebSocket send timeout (LLAVA_QUEUE_STREAM_SEND_TIMEOUT_SECONDS; 20 s by default): a client that reads
# nothing is let go after it. Short, for the tests that wait for that; a test that waits for less than the default
# shows the setting is read.
SEND_TIMEOUT_SECONDS = 6.0
# How long after the send timeout a test waits for the client to be let go (the API's watch looks every quarter
# of the timeout).
LET_GO_SLACK_SECONDS = 8.0


class Stack:
    """The running API and worker, and where their logs go."""

    def __init__(self, base_url: str, redis_url: str, log_dir: Path, processes: dict[str, subprocess.Popen]):
        self.base_url = base_url
        self.ws_url = base_url.replace("http://", "ws://")
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.processes = processes
        self._api_log_checked = 0

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-4000:]}" for path in sorted(self.log_dir.glob("*.log")))

    def check_api_log(self) -> None:
        """Fail if the API logged an unhandled exception since the last check: whatever a client sends or does
        (leaving mid-stream included), the API answers it or closes the connection itself."""
        path = self.log_dir / "api.log"
        if not path.exists():
            return
        with path.open(errors="replace") as log:
            log.seek(self._api_log_checked)
            written = log.read()
            self._api_log_checked = log.tell()
        if UNHANDLED in written:
            start = written.index(UNHANDLED)
            raise AssertionError(f"the API logged an unhandled exception:\n{written[start:start + 4000]}")


# The stacks run_stack has up: each test ends by checking their API logs (see check_api_logs).
RUNNING_STACKS: list[Stack] = []


@pytest.fixture(autouse=True)
def check_api_logs():
    """After every test, no running API process has logged an unhandled exception during it."""
    yield
    for running in list(RUNNING_STACKS):
        running.check_api_log()


def start_service(name: str, args: list[str], env: dict, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def first_answer(process: subprocess.Popen, method: str, url: str, timeout: float = 30.0,
                 logs: Callable[[], str] = lambda: "") -> requests.Response:
    """The first answer (any status) of `method url` from the server `process` starts, asked every 0.2 s; an
    AssertionError with `logs()` if `timeout` seconds pass or the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.request(method, url, timeout=5)
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or slow to answer on a loaded machine
            assert time.monotonic() < deadline and process.poll() is None, logs() or url
            time.sleep(0.2)


def wait_for_stack(stack: Stack, workers: int = 1, timeout: float = 180) -> None:
    """Wait until the API answers and `workers` workers announced themselves; raise with the logs if not."""
    deadline = time.monotonic() + timeout
    while True:
        dead = [name for name, process in stack.processes.items() if process.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited during start-up\n{stack.logs()}")
        try:
            health = requests.get(f"{stack.base_url}/healthz", timeout=2).json()
            if len(health.get("workers", [])) >= workers:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not up yet: refused, or slow to answer while the processes start on a loaded machine
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not come up in time\n{stack.logs()}")
        time.sleep(0.3)


def wait_answers(client, process: subprocess.Popen) -> None:
    """Wait (10 s at most) until the Redis server `process` started answers `client` (a redis.Redis) its PING."""
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            assert time.monotonic() < deadline and process.poll() is None, "the Redis server did not start"
            time.sleep(0.05)


def job_final(stack: Stack, job_id: str, timeout: float = 60) -> dict:
    """The job's view (`GET /v1/jobs/{id}`) once it has ended; AssertionError with the logs if it has not in
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end\n{stack.logs()}")


def stop_processes(processes) -> None:
    """SIGTERM every process, then SIGKILL whatever is still there after 15 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def model_workers(stack: Stack, env: dict[str, str], models):
    """A worker per model name in `models` on `stack`'s Redis, with `env` (the whole environment), announced before
    it yields them (name -> process); stopped, and taken out of the stack's processes, after."""
    workers = {model: start_service(f"worker-{model.replace('/', '_')}", ["worker"],
                                    {**env, "LLAVA_QUEUE_REDIS_URL": stack.redis_url, "LLAVA_QUEUE_MODEL_NAME": model},
                                    stack.log_dir) for model in models}
    stack.processes.update(workers)
    try:
        wait_for_stack(stack, workers=len(workers))
        yield workers
    finally:
        stop_processes(workers.values())
        for name in workers:
            stack.processes.pop(name)


@contextmanager
def run_stack(redis_url: str, env: dict[str, str], *, workers: tuple[str, ...] = ("worker",),
              log_prefix: str = "llava-queue-test-logs-"):
    """Worker processes (one per name) and an API process against `redis_url`, with `env` on top of
    this process's environment; yields the Stack once the API answers and every worker announced itself."""
    log_dir = Path(tempfile.mkdtemp(prefix=log_prefix))
    port = free_port()
    env = dict(os.environ, **env, LLAVA_QUEUE_REDIS_URL=redis_url, LLAVA_QUEUE_PORT=str(port))
    processes = {name: start_service(name, ["worker"], env, log_dir) for name in workers}
    processes["api"] = start_service("api", ["api", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)
    running = Stack(f"http://127.0.0.1:{port}", redis_url, log_dir, processes)
    RUNNING_STACKS.append(running)
    try:
        wait_for_stack(running, workers=len(workers))
        yield running
    finally:
        RUNNING_STACKS.remove(running)
        stop_processes(processes.values())
    running.check_api_log()  # a stack that lived within one test: checked once it is down


@pytest.fixture(scope="session")
def stack(redis_server, default_model_dir):
    """Worker and API processes against the test Redis, serving the default model."""
    with run_stack(redis_server.url, {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir),
                                      "LLAVA_QUEUE_MAX_NUM_SEQS": "16",
                                      "LLAVA_QUEUE_STREAM_SEND_TIMEOUT_SECONDS": str(SEND_TIMEOUT_SECONDS)}) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_llava_family(tmp_path_factory):
    """Tiny random-weight LLaVA checkpoints in every layout the loader reads (see tests/llava_fixtures.py), built
    once."""
    from llava_fixtures import build_family

    return build_family(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_llava_family) -> Path:
    """A tiny LLaVA-1.5 checkpoint in the original layout (mlp2x_gelu projector, 'pad' images, 16 tokens per image)."""
    return tiny_llava_family.original


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The tiny LLaVA stack's data root (LLAVA_QUEUE_DATA_ROOTS): batch files and image folders tests write there."""
    return tmp_path_factory.mktemp("data-root")


@pytest.fixture(scope="session")
def tiny_llava_stack(tiny_llava_dir, data_root):
    """Its own Redis, a worker serving the tiny LLaVA checkpoint (fp32, so batching cannot change a greedy answer;
    8 slots, none kept for interactive jobs), and an API whose data root is `data_root`."""
    with RedisServer() as server:
        # The tiny checkpoint's tower is local: no setting of the caller's may point elsewhere.
        for name in ("LLAVA_QUEUE_MODEL_BASE", "LLAVA_QUEUE_MODEL_NAME", "LLAVA_QUEUE_VISION_TOWER"):
            os.environ.pop(name, None)
        env = {"LLAVA_QUEUE_MODEL_PATH": str(tiny_llava_dir), "LLAVA_QUEUE_DEVICE": "cpu",
               "LLAVA_QUEUE_DTYPE": "float32", "LLAVA_QUEUE_MAX_NUM_SEQS": "8",
               "LLAVA_QUEUE_BATCH_RESERVED_SLOTS": "0", "LLAVA_QUEUE_DATA_ROOTS": str(data_root)}
        with run_stack(server.url, env, log_prefix="llava-queue-tiny-llava-logs-") as running:
            yield running


@pytest.fixture
def load_anew(monkeypatch):
    """load_anew(loader, **env): call a cached loader (a functools.cache function, such as a CPU kernel's `load`)
    afresh, with `env` set and the settings read again; the loaders' caches and the settings' are cleared again
    after the test, so the rest of the session loads as it would have."""
    from shared.settings import get_settings

    called = []

    def load(loader, **env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        loader.cache_clear()
        get_settings.cache_clear()
        called.append(loader)
        return loader()

    yield load
    monkeypatch.undo()
    for loader in called:
        loader.cache_clear()
    get_settings.cache_clear()
