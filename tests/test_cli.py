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


def cli(args: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=timeout)


def test_a_bad_setting_stops_every_command_with_the_variable_named_not_a_traceback():
    # What an operator mistypes: a port that is no number, a list that is no JSON, a log level logging lacks, a
    # Redis URL without its scheme (whose password must not be printed back).
    for variable, value in (("LLAVA_QUEUE_PORT", "abc"), ("LLAVA_QUEUE_API_KEY_HASHES", "abc123"),
                            ("LLAVA_QUEUE_LOG_LEVEL", "verbose"),
                            ("LLAVA_QUEUE_REDIS_URL", "localhost:6379"),
                            ("LLAVA_QUEUE_REDIS_URL", "redis//:hunter2@localhost:6379/0")):
        run = cli(["status"], timeout=60, **{variable: value})
        assert run.returncode == 2, (variable, value, run.stderr)
        assert "Traceback" not in run.stderr and variable in run.stderr, run.stderr
        assert "hunter2" not in run.stderr, run.stderr
    # --help still works with a bad setting in the environment.
    assert cli(["--help"], timeout=60, LLAVA_QUEUE_PORT="abc").returncode == 0


def test_a_worker_with_a_bad_model_setting_says_which_and_exits_2():
    # Nothing listens on port 1: each of these must stop the worker before it needs Redis.
    for variable, value in (("LLAVA_QUEUE_MODEL_PATH", "/nonexistent/llava-v1.5-13b"), ("LLAVA_QUEUE_DTYPE", "half"),
                            ("LLAVA_QUEUE_DEVICE", "gpu")):
        run = cli(["worker"], LLAVA_QUEUE_REDIS_URL="redis://127.0.0.1:1/0", **{variable: value})
        assert run.returncode == 2, (variable, run.stderr[-2000:])
        assert "Traceback" not in run.stderr and variable in run.stderr, run.stderr[-2000:]


def test_an_embedded_redis_on_a_port_in_use_fails_instead_of_using_the_other_server():
    with RedisServer() as other:
        second = RedisServer(port=other.port)
        with pytest.raises(RuntimeError, match="in use"):
            second.start()
        assert second.process is None or second.process.poll() is not None
        assert redis.Redis(port=other.port).ping()


def test_up_on_an_api_port_in_use_says_so_and_starts_nothing():
    import socket

    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        run = cli(["up", "--port", str(port), "--ephemeral-redis"], timeout=120)
        assert run.returncode == 2, run.stdout + run.stderr[-2000:]
        assert f"127.0.0.1:{port} is in use" in run.stderr, run.stderr[-2000:]
        assert "embedded Redis" not in run.stdout and time.monotonic() - started < 30


def test_api_on_a_port_in_use_says_so_and_exits(redis_server):
    # uvicorn that cannot bind logged the error, and then the API process (Redis up) never exited, even on SIGTERM.
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        api = cli(["api", "--port", str(port)], timeout=60, LLAVA_QUEUE_REDIS_URL=redis_server.url)
        assert api.returncode == 2 and f"127.0.0.1:{port} is in use" in api.stderr, api.stderr[-2000:]


def test_a_heartbeat_that_expires_before_its_refresh_is_refused():
    # A worker beating every 15 s with a 10 s TTL looks dead 5 s of every 15: /readyz flaps, and the orphan sweep
    # delivers the jobs it is still running again.
    run = cli(["status"], timeout=60, LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS="15")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS (10) must exceed LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS (15)" \
        in run.stderr, run.stderr


def test_up_against_a_redis_that_is_down_says_so_at_once():
    # Before: the API answered /healthz with 503 and the worker's Celery retried the broker, so `up` printed
    # "starting the worker..." and waited --start-timeout (10 minutes by default) before giving up.
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    run = cli(["up", "--redis-url", url, "--port", str(free_port()), "--start-timeout", "30"], timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr[-2000:]
    assert "does not answer" in run.stderr and "hunter2" not in run.stdout + run.stderr, run.stderr[-2000:]
    assert time.monotonic() - started < 20


def test_a_worker_whose_metrics_port_is_in_use_says_so():
    # Two workers on one host with the same LLAVA_QUEUE_WORKER_METRICS_PORT: the second one died with a traceback.
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = cli(["worker"], LLAVA_QUEUE_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                  LLAVA_QUEUE_WORKER_METRICS_PORT=str(port))
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert f"LLAVA_QUEUE_WORKER_METRICS_PORT {port}" in run.stderr and "in use" in run.stderr, run.stderr[-2000:]


def test_up_with_a_redis_folder_it_cannot_create_says_so(tmp_path):
    # A --redis-dir (or LLAVA_QUEUE_CACHE_DIR) that cannot be made (here: under a file; a read-only mount alike).
    (tmp_path / "file").write_text("")
    run = cli(["up", "--port", str(free_port()), "--redis-dir", str(tmp_path / "file" / "redis")], timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "cannot start the embedded Redis" in run.stderr and str(tmp_path / "file") in run.stderr, run.stderr


def test_ctrl_c_while_up_is_starting_stops_it_at_once(default_model_dir):
    # Ctrl-C before the worker is ready (a model still downloading or loading): `up` kept waiting for it, up to
    # --start-timeout (10 minutes by default), and then even announced the stack as up.
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--port", str(free_port()), "--model-path",
                           str(default_model_dir), "--ephemeral-redis"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert "embedded Redis" in up.stdout.readline()
        time.sleep(1)
        os.killpg(up.pid, signal.SIGINT)
        interrupted = time.monotonic()
        output, _ = up.communicate(timeout=60)
        assert time.monotonic() - interrupted < 8, output
        assert "llava-queue is up" not in output and up.returncode == 0, output
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_up_that_is_not_ready_within_its_start_timeout_says_so(default_model_dir):
    run = cli(["up", "--port", str(free_port()), "--model-path", str(default_model_dir), "--ephemeral-redis",
               "--start-timeout", "1"])
    assert run.returncode == 1, run.stdout + run.stderr[-2000:]
    assert "not up after 1 s (--start-timeout)" in run.stderr and "failed to start" not in run.stderr, run.stderr
