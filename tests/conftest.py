"""The real stack for the tests: a Redis server process, a Celery worker process with the real
default model, and the API process, started once per session on free ports."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from shared.redis_server import RedisServer, free_port

CACHE_DIR = Path(os.environ.get("LLAVA_QUEUE_CACHE_DIR", Path.home() / ".cache" / "llava-queue"))


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


class Stack:
    """The running API and worker, and where their logs go."""

    def __init__(self, base_url: str, redis_url: str, log_dir: Path, processes: dict[str, subprocess.Popen]):
        self.base_url = base_url
        self.ws_url = base_url.replace("http://", "ws://")
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.processes = processes

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-4000:]}" for path in sorted(self.log_dir.glob("*.log")))


def start_service(name: str, args: list[str], env: dict, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


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
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stack did not come up in time\n{stack.logs()}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def stack(redis_server, default_model_dir):
    """Worker and API processes against the test Redis, serving the default model."""
    log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-test-logs-"))
    port = free_port()
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_MODEL_PATH=str(default_model_dir),
               LLAVA_QUEUE_MAX_NUM_SEQS="16", LLAVA_QUEUE_PORT=str(port))
    processes = {"worker": start_service("worker", ["worker"], env, log_dir),
                 "api": start_service("api", ["api", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)}
    running = Stack(f"http://127.0.0.1:{port}", redis_server.url, log_dir, processes)
    try:
        wait_for_stack(running)
        yield running
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def tiny_llava_family(tmp_path_factory):
    """Tiny random-weight LLaVA checkpoints in every layout the loader reads (see tests/llava_fixtures.py), built once."""
    from llava_fixtures import build_family

    return build_family(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_llava_family) -> Path:
    """A tiny LLaVA-1.5 checkpoint in the original layout (mlp2x_gelu projector, 'pad' images, 16 tokens per image)."""
    return tiny_llava_family.original


@pytest.fixture(scope="session")
def tiny_llava_stack(tiny_llava_dir):
    """Its own Redis, a worker serving the tiny LLaVA checkpoint (fp32, so batching cannot change a greedy answer),
    and an API."""
    log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-tiny-llava-logs-"))
    with RedisServer() as server:
        port = free_port()
        env = {key: value for key, value in os.environ.items()
               if key not in ("LLAVA_QUEUE_MODEL_BASE", "LLAVA_QUEUE_MODEL_NAME", "LLAVA_QUEUE_VISION_TOWER")}
        env.update(LLAVA_QUEUE_REDIS_URL=server.url, LLAVA_QUEUE_MODEL_PATH=str(tiny_llava_dir),
                   LLAVA_QUEUE_DEVICE="cpu", LLAVA_QUEUE_DTYPE="float32", LLAVA_QUEUE_MAX_NUM_SEQS="8",
                   LLAVA_QUEUE_PORT=str(port))
        processes = {"worker": start_service("worker", ["worker"], env, log_dir),
                     "api": start_service("api", ["api", "--host", "127.0.0.1", "--port", str(port)], env, log_dir)}
        running = Stack(f"http://127.0.0.1:{port}", server.url, log_dir, processes)
        try:
            wait_for_stack(running)
            yield running
        finally:
            for process in processes.values():
                process.terminate()
            for process in processes.values():
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
