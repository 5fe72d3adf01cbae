"""How operators configure llava-queue, second pass: a Redis on a unix socket serves the whole stack; a rediss:// URL
at a Redis without TLS, DATA_ROOTS naming no folder, a MAX_NUM_SEQS past any batch, and an embedded Redis folder that
cannot be written are each refused at start in one line naming what is wrong; LOG_FORMAT and ENGINE_FORWARD are read
in any case; the no-API-keys warning names where the API listens.

Each test runs `llava-queue` as an operator does, against a real Redis (Valkey) where one is needed."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import requests
import websockets
from conftest import run_stack, wait_answers
from pydantic import ValidationError

from shared.redis_server import find_server_binary, free_port
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "S0cket-pw-s41"


def cli(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=dict(os.environ, **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


async def ws_messages(url: str) -> list[dict]:
    """Every message of one WebSocket until the server closes it."""
    async with websockets.connect(url, open_timeout=10) as socket:
        return [json.loads(raw) async for raw in socket]


def test_the_whole_stack_runs_on_a_redis_that_listens_on_a_unix_socket_only(tmp_path, default_model_dir):
    # redis-py reads unix:///path?db=N, Celery's kombu does not ("No such transport: unix"): the API answered every
    # submission 503 and the worker died with kombu's traceback, then `api`, `worker` and `up` refused the URL. Here
    # a Valkey with no TCP port, a password (in the query, redis-py's documented form for a socket) and database 3:
    # the job goes through Celery's queue there, its tokens through pub/sub, and nothing lands in database 0.
    socket_path = tmp_path / "redis.sock"
    server = subprocess.Popen([find_server_binary(), "--port", "0", "--unixsocket", str(socket_path),
                               "--unixsocketperm", "700", "--requirepass", PASSWORD, "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(unix_socket_path=str(socket_path), password=PASSWORD, db=3)
    try:
        wait_answers(admin, server)
        url = f"unix://{socket_path}?db=3&password={PASSWORD}"

        with run_stack(url, {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir),
                             "LLAVA_QUEUE_MAX_NUM_SEQS": "4"}) as stack:
            submitted = requests.post(f"{stack.base_url}/v1/jobs", timeout=30,
                                      json={"prompt": "Once upon a time", "temperature": 0, "max_new_tokens": 8})
            assert submitted.status_code in (200, 201, 202), (submitted.text, stack.logs())
            job_id = submitted.json()["id"]
            messages = asyncio.run(asyncio.wait_for(ws_messages(f"{stack.ws_url}/v1/jobs/{job_id}/ws"), 120))
            job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
            assert job["status"] == "succeeded" and job["text"], (job, stack.logs())
            # The streamed text (the prompt and the answer, LLaVA's format) went through pub/sub on the socket.
            assert len(messages) > 1 and messages[-1]["text"].endswith(job["text"]), (messages[-3:], job)
            logs = stack.logs()
        assert PASSWORD not in logs, logs  # the Celery banner prints its broker URL, masked
        assert admin.exists("_kombu.binding.interactive"), admin.keys()  # Celery's queue, in database 3
        assert redis.Redis(unix_socket_path=str(socket_path), password=PASSWORD, db=0).dbsize() == 0

        # `up --redis-url` makes the checks `api` and `worker` make before it starts anything: they pass now.
        from shared.cli import _redis_problem

        assert _redis_problem(url) is None
    finally:
        admin.close()
        server.terminate()
        server.wait(10)


def test_a_unix_url_that_names_no_socket_is_refused():
    # It was taken, and every connection failed as if Redis were not up yet (the worker waited for ever).
    with pytest.raises(ValidationError, match="names no socket: use unix:///path/to/redis.sock"):
        Settings(redis_url="unix://?db=1")


def test_a_rediss_url_at_a_redis_without_tls_is_refused_naming_tls(redis_server):
    # The TLS handshake with a plain Redis gets no answer (it reads the client's hello as the start of a command):
    # `api` and `worker` took it for a Redis not up yet and waited for ever; `up --redis-url` said "does not answer".
    url = redis_server.url.replace("redis://", "rediss://")
    said = f"the Redis at 127.0.0.1:{redis_server.port} speaks no TLS"
    for args in (["api", "--port", str(free_port())], ["worker"]):
        started = time.monotonic()
        run = cli(args, timeout=90, LLAVA_QUEUE_REDIS_URL=url)
        assert run.returncode == 2 and "Traceback" not in run.stderr, (args, run.stderr[-2000:])
        assert f"llava-queue {args[0]}: LLAVA_QUEUE_REDIS_URL='{url}': {said}" in run.stderr, run.stderr[-2000:]
        assert "use redis://" in run.stderr and time.monotonic() - started < 60, run.stderr[-2000:]
        assert "loaded" not in run.stderr, run.stderr[-2000:]
    run = cli(["up", "--port", str(free_port()), "--redis-url", url], timeout=90)
    assert run.returncode == 2 and f"llava-queue: Redis at {url}: {said}" in run.stderr, run.stderr[-2000:]
    assert "starting the worker" not in run.stdout, run.stdout


def test_the_no_api_keys_warning_names_where_the_api_listens(redis_server):
    # It named LLAVA_QUEUE_HOST ("it listens on 0.0.0.0 by default") while --host put the API on 127.0.0.1 alone.
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
                           env=dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_HOST="0.0.0.0",
                                    LLAVA_QUEUE_API_KEY_HASHES="[]"),
                           cwd=ROOT, stderr=subprocess.PIPE, text=True)
    lines = []
    watchdog = threading.Timer(90, api.kill)  # an API that neither starts nor exits ends the reading below
    watchdog.start()
    try:
        for line in api.stderr:  # the API logs on until it is stopped
            lines.append(line)
            if "Application startup complete" in line:
                break
    finally:
        watchdog.cancel()
        api.terminate()
        api.wait(30)
    warning = [line for line in lines if "no API keys configured" in line]
    assert len(warning) == 1, "".join(lines)
    assert f"it listens on 127.0.0.1, port {port}" in warning[0] and "0.0.0.0" not in warning[0], warning


def test_max_num_seqs_past_the_widest_batch_is_refused():
    # At 65536 or more kombu turned its QoS off ("prefetch_count exceeds 65535"), and the worker ran a Celery task
    # thread per slot.
    assert Settings(max_num_seqs=4096).max_num_seqs == 4096
    with pytest.raises(ValidationError, match="less than or equal to 4096"):
        Settings(max_num_seqs=4097)
    run = cli(["status"], timeout=60, LLAVA_QUEUE_MAX_NUM_SEQS="65536")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert ("bad setting: LLAVA_QUEUE_MAX_NUM_SEQS='65536': Input should be less than or equal to 4096"
            in run.stderr), run.stderr


def test_log_format_and_the_engine_choices_are_read_in_any_case(redis_server):
    # DTYPE=BF16 and LOG_LEVEL=debug were taken, LOG_FORMAT=JSON and ENGINE_FORWARD=Fused refused.
    settings = Settings(log_format=" JSON", engine_forward="Fused", decode_attention="TORCH", layer_ops="Torch")
    assert (settings.log_format, settings.engine_forward, settings.decode_attention, settings.layer_ops) == \
        ("json", "fused", "torch", "torch")
    with pytest.raises(ValidationError, match="log_format"):
        Settings(log_format="yaml")
    run = cli(["status"], timeout=60, LLAVA_QUEUE_REDIS_URL=redis_server.url, LLAVA_QUEUE_LOG_FORMAT="JSON",
              LLAVA_QUEUE_ENGINE_FORWARD="MODEL", LLAVA_QUEUE_NO_SUCH_SETTING_S41="1")
    assert run.returncode == 0, run.stderr[-2000:]
    # The line about the unknown variable is a JSON line, as every line is with LOG_FORMAT=json.
    logged = [json.loads(line)["message"] for line in run.stderr.splitlines() if line.startswith("{")]
    assert any(message.startswith("LLAVA_QUEUE_NO_SUCH_SETTING_S41 is not a setting") for message in logged), \
        run.stderr


def test_data_roots_naming_no_folder_stop_the_api_and_up_at_start(tmp_path):
    # A root that is not there (a typo, a volume not mounted) was taken: every batch naming a file there was
    # answered "not found", naming neither the setting nor the root.
    (tmp_path / "file").write_text("")
    for root, what in ((tmp_path / "missing", "does not exist"), (tmp_path / "file", "is not a folder")):
        roots = f"{tmp_path}{os.pathsep}{root}"
        said = f"LLAVA_QUEUE_DATA_ROOTS: '{root}' {what}"
        run = cli(["api", "--port", str(free_port())], timeout=60, LLAVA_QUEUE_DATA_ROOTS=roots)
        assert run.returncode == 2 and f"llava-queue api: {said}" in run.stderr, run.stderr[-2000:]
        run = cli(["up", "--port", str(free_port())], timeout=60, LLAVA_QUEUE_DATA_ROOTS=roots)
        assert run.returncode == 2 and f"llava-queue: {said}" in run.stderr, run.stderr[-2000:]
        assert "embedded Redis" not in run.stdout, run.stdout


def _read_only_mount_works(folder: Path) -> bool:
    """Whether this machine lets a command see `folder` as a read-only file system (a mount namespace of its own)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{folder}' && mkdir "
                            f"'{folder}/probe'"], capture_output=True, text=True)
    return "Read-only file system" in probe.stderr


@pytest.mark.parametrize("where", ["read-only", "under a file"])
def test_up_names_the_setting_behind_an_embedded_redis_folder_it_cannot_create(tmp_path, where):
    # A read-only LLAVA_QUEUE_CACHE_DIR: "cannot start the embedded Redis: [Errno 30] Read-only file system:
    # '.../redis'", naming neither CACHE_DIR (the default folder's parent) nor --redis-dir.
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "shared.cli", "up", "--port", str(free_port())]
    if where == "read-only":
        cache.mkdir()
        if not _read_only_mount_works(cache):
            pytest.skip("no mount namespace here to make a read-only file system in")
        quoted = " ".join(f"'{arg}'" for arg in args)
        args = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs '{cache}' && exec {quoted}"]
        reason = "Read-only file system"
    else:
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
        reason = "Not a directory"
    run = subprocess.run(args, env=dict(os.environ, LLAVA_QUEUE_CACHE_DIR=str(cache)), cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert (f"llava-queue: cannot start the embedded Redis: its append-only file cannot be kept in {cache}/redis: "
            f"{reason} (the default --redis-dir, redis/ under LLAVA_QUEUE_CACHE_DIR='{cache}'); name another folder "
            "(--redis-dir, or LLAVA_QUEUE_CACHE_DIR), or none (--ephemeral-redis)") in run.stderr, run.stderr


def test_up_names_its_redis_dir_option_behind_a_folder_it_cannot_create(tmp_path):
    (tmp_path / "file").write_text("")
    run = cli(["up", "--port", str(free_port()), "--redis-dir", str(tmp_path / "file" / "redis")], timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert (f"cannot be kept in {tmp_path}/file/redis: Not a directory (--redis-dir); name another folder "
            "(--redis-dir), or none (--ephemeral-redis)") in run.stderr, run.stderr
