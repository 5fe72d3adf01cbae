"""`llava-queue up` stopped the hard way: its children must still stop in order, and none is left behind."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis
import requests
import yaml

from shared.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]


def test_up_killed_by_sigkill_lets_the_worker_hand_back_then_stops_redis(default_model_dir, tmp_path):
    """A SIGKILL of `up` (the OOM killer, `kill -9`) sent SIGTERM to every child at once: Redis stopped there and
    then, and the worker, which hands its running jobs back through Redis, waited minutes for it, left behind. Now
    the embedded Redis outlives the worker, holding its folder: the job is handed back, then nothing is left."""
    port = free_port()
    env = dict(os.environ, LLAVA_QUEUE_MAX_NUM_SEQS="2", LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS="1")
    log = tmp_path / "up.log"  # a file, not a pipe: nobody would read the children's last lines once `up` is gone
    with open(log, "w") as output:
        up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--port", str(port), "--model-path",
                               str(default_model_dir), "--redis-dir", str(tmp_path / "redis")], env=env,
                              stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while "llava-queue is up" not in log.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        children = psutil.Process(up.pid).children(recursive=True)
        story = {"messages": [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}],
                 "temperature": 0, "max_new_tokens": 512}
        job_id = requests.post(f"{base}/v1/jobs", json=story, timeout=10).json()["id"]
        while True:
            record = requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
            if record["status"] == "running" and record["usage"]["completion_tokens"] > 3:
                break
            assert record["status"] in ("queued", "running") and time.monotonic() < deadline, record
            time.sleep(0.1)
        up.kill()
        up.wait()
        # Its Redis runs on for the worker: the folder stays locked, or a new `up` would start a second server on
        # the same append-only file meanwhile.
        second = RedisServer(data_dir=tmp_path / "redis")
        try:
            with pytest.raises(RuntimeError, match="in use by another embedded Redis"):
                second.start()
        finally:
            second.stop()
        # The worker's grace (1 s) and its hand-back, then Redis: well within 20 s. Before, the worker ran on.
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, ([child.cmdline() for child in alive], log.read_text()[-3000:])
        with RedisServer(data_dir=tmp_path / "redis") as server:  # the running job was handed back, not lost
            held_by = redis.Redis.from_url(server.url).hget(f"llq:job:{job_id}", "worker").decode()
            assert held_by.startswith("requeued@"), held_by
    finally:
        for child in children:
            if child.is_running():
                child.kill()
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_with_a_redis_folder_that_is_a_file_says_so(tmp_path):
    (tmp_path / "redis").write_text("")
    run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--port", str(free_port()), "--redis-dir",
                          str(tmp_path / "redis")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"{tmp_path / 'redis'} is a file, not a folder" in run.stderr, run.stderr


def test_a_keeper_stops_redis_after_the_processes_it_outlives(tmp_path):
    """The keeper alone: the death of the process that started the server (its stdin closes) stops the server only
    once the processes it was named have exited."""
    starter = subprocess.Popen([sys.executable, "-c", """
import sys, time
from shared.redis_server import RedisServer
server = RedisServer().start(keep_for=30)
print(server.process.pid, flush=True)
other = int(sys.stdin.readline())
server.outlived_by(other)
print("ready", flush=True)
time.sleep(600)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        server = psutil.Process(int(starter.stdout.readline()))
        starter.stdin.write(f"{other.pid}\n")
        starter.stdin.flush()
        assert starter.stdout.readline().strip() == "ready"
        starter.kill()
        starter.wait()
        time.sleep(1)
        assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE  # the other one still runs
        other.terminate()
        other.wait()
        server.wait(10)  # then it stops
    finally:
        for process in (starter, other):
            if process.poll() is None:
                process.kill()
        starter.stdin.close()
        starter.stdout.close()


def test_flower_in_compose_listens_on_the_hosts_loopback_only():
    # Flower has no login, and its buttons shut workers down and terminate jobs: published on every interface
    # ("5555:5555"), anyone who reached the host could, past the API's keys.
    flower = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["flower"]
    assert flower["ports"] and all(str(port).startswith("127.0.0.1:") for port in flower["ports"]), flower["ports"]


def test_up_sh_reads_relative_paths_from_the_callers_folder(tmp_path):
    """scripts/up.sh ran `llava-queue up` from the checkout's root: `--redis-dir data` or `--model-path ./model`
    named a folder there, not the caller's. Here install.sh and llava-queue are stand-ins that say where they ran."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "up.sh", checkout / "scripts" / "up.sh")
    (checkout / "scripts" / "install.sh").write_text("true\n")
    stand_in = checkout / ".venv" / "bin" / "llava-queue"
    stand_in.write_text('#!/bin/sh\necho "$(pwd) $*"\n')
    stand_in.chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    run = subprocess.run(["bash", str(checkout / "scripts" / "up.sh"), "--redis-dir", "data"], cwd=caller,
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == f"{caller} up --redis-dir data", run.stdout + run.stderr


def test_up_whose_append_only_file_is_damaged_says_what_redis_said(tmp_path):
    # Redis wrote its log to /dev/null: `up` said "valkey-server exited with code 1", and nothing said why.
    with RedisServer(data_dir=tmp_path) as server:
        redis.Redis.from_url(server.url).set("a", "b")
    [incremental] = (tmp_path / "appendonlydir").glob("*.incr.aof")
    with open(incremental, "ab") as aof:
        aof.write(b"not a command\r\n*1\r\n$4\r\nPING\r\n")
    run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--port", str(free_port()), "--redis-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "exited with code 1: Bad file format reading the append only file" in run.stderr, run.stderr
    assert f"(its log: {tmp_path / 'redis.log'})" in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
