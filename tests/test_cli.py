"""`llava-queue up`: the whole stack from one command, and Ctrl-C leaves no process behind."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redis
import requests

from shared.cpus import format_cpu_list, parse_cpu_list
from shared.redis_server import RedisServer, free_port


def test_up_serves_and_ctrl_c_stops_every_child(default_model_dir, tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: `up` alone must act on it, stopping the
    worker (which hands its running job back) while Redis is still there, then Redis."""
    port = free_port()
    env = dict(os.environ, LLAVA_QUEUE_MAX_NUM_SEQS="4", LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS="1")
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--port", str(port), "--model-path",
                           str(default_model_dir), "--redis-dir", str(tmp_path / "redis")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            assert line, "llava-queue up exited:\n" + "".join(lines)
            lines.append(line)
            if "llava-queue is up" in line:
                break
        assert base in lines[-1]
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        assert "worker" in names and "api" in names and ("valkey-server" in names or "redis-server" in names)
        story = {"messages": [{"role": "user", "text": "Tell me a long story about a lighthouse keeper."}],
                 "temperature": 0, "max_new_tokens": 512}
        job = requests.post(f"{base}/v1/jobs", json=story, timeout=10)
        assert job.status_code == 202
        job_id = job.json()["id"]
        while True:
            record = requests.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
            if record["status"] == "running" and record["usage"]["completion_tokens"] > 3:
                break
            assert record["status"] == "queued" or record["status"] == "running", record
            assert time.monotonic() < deadline, record
            time.sleep(0.1)
        os.killpg(up.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        output, _ = up.communicate(timeout=40)
        assert up.returncode == 0, output
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [child.cmdline() for child in alive]
        assert "handed 1 running jobs back" in output, output[-3000:]
        assert (tmp_path / "redis" / "appendonlydir").is_dir()  # the jobs outlive the stack
        with RedisServer(data_dir=tmp_path / "redis") as server:  # and the running one was handed back
            held_by = redis.Redis.from_url(server.url).hget(f"llq:job:{job_id}", "worker").decode()
            assert held_by.startswith("requeued@"), held_by
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_two_embedded_redis_servers_cannot_share_a_data_folder(tmp_path):
    with RedisServer(data_dir=tmp_path):
        with pytest.raises(RuntimeError, match="in use by another embedded Redis"):
            RedisServer(data_dir=tmp_path).start()
        up = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--redis-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
        assert up.returncode == 2 and "--ephemeral-redis" in up.stderr
    with RedisServer(data_dir=tmp_path):  # free again once the first one stopped
        pass


def thread_cpus(pid: int) -> list[str]:
    """Each thread's Cpus_allowed_list, as /proc shows it ("0", "1-3")."""
    lists = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                lists += [line.split(":", 1)[1].strip() for line in status if line.startswith("Cpus_allowed_list:")]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return lists


def test_up_gives_the_engine_its_own_cores_and_keeps_the_rest_off_them(default_model_dir):
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        pytest.skip("needs two CPUs: one for the engine, one for the rest")
    engine_cpu, rest = str(available[-1]), format_cpu_list(frozenset(available[:-1]))
    port = free_port()
    env = dict(os.environ, LLAVA_QUEUE_MAX_NUM_SEQS="4", LLAVA_QUEUE_ENGINE_CPUS=engine_cpu)
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--port", str(port), "--model-path",
                           str(default_model_dir), "--ephemeral-redis"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (lines and "llava-queue is up" in lines[-1]):
            line = up.stdout.readline()
            assert line, "llava-queue up exited:\n" + "".join(lines)
            lines.append(line)
        started = next(line for line in lines if "torch threads" in line)
        assert f"1 torch threads (engine on CPU {engine_cpu}, the rest on {rest})" in started
        job = requests.post(f"http://127.0.0.1:{port}/v1/jobs", json={"prompt": "Hello", "max_new_tokens": 8},
                            timeout=10).json()
        while (record := requests.get(f"http://127.0.0.1:{port}/v1/jobs/{job['id']}", timeout=10).json())[
                "status"] in ("queued", "running"):
            time.sleep(0.1)
        assert record["status"] == "succeeded" and record["usage"]["completion_tokens"] > 0
        children = {" ".join(child.cmdline()): child.pid for child in psutil.Process(up.pid).children(recursive=True)}
        [worker] = [pid for cmdline, pid in children.items() if cmdline.endswith("worker")]
        others = [pid for cmdline, pid in children.items() if " api " in cmdline or "-server" in cmdline]
        assert len(others) == 2, children  # the API and the embedded Redis
        for pid in others:
            assert set(thread_cpus(pid)) == {rest}, pid
        # One engine CPU: the engine thread alone computes there (a team of one thread); every other thread of
        # the worker (Celery's consumer and task threads, the heartbeat, the cancellation follower) keeps off it.
        worker_threads = thread_cpus(worker)
        assert worker_threads.count(engine_cpu) == 1, worker_threads
        assert set(worker_threads) == {engine_cpu, rest}, worker_threads
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()


def test_engine_cpus_the_machine_lacks_stop_the_start_with_the_reason():
    missing = str(max(os.sched_getaffinity(0)) + 1)
    env = dict(os.environ, LLAVA_QUEUE_ENGINE_CPUS=missing)
    for command in (["up", "--ephemeral-redis"], ["worker"]):
        run = subprocess.run([sys.executable, "-m", "shared.cli", *command], env=env, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 2, run.stderr
        assert f"LLAVA_QUEUE_ENGINE_CPUS names CPU {missing}, which this process cannot run on" in run.stderr
    malformed = subprocess.run([sys.executable, "-m", "shared.cli", "worker"], capture_output=True, text=True,
                               env=dict(os.environ, LLAVA_QUEUE_ENGINE_CPUS="1-"), timeout=60)
    assert malformed.returncode != 0 and "bad CPU list '1-'" in malformed.stderr


def test_cpu_lists_read_and_write_as_linux_writes_them():
    assert parse_cpu_list("1") == {1}
    assert parse_cpu_list("0,2,4-6") == {0, 2, 4, 5, 6}
    assert format_cpu_list(frozenset({0, 1, 2, 3, 6, 8, 9})) == "0-3,6,8-9"
    for bad in ("", "a", "1-", "3-1", "1,,2", "-1"):
        with pytest.raises(ValueError, match="bad CPU list"):
            parse_cpu_list(bad)
