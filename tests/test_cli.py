"""`llava-queue up`: the whole stack from one command, and Ctrl-C leaves no process behind."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import redis
import requests

from conftest import first_answer
from shared.cpus import format_cpu_list, parse_cpu_list
from shared.redis_server import RedisServer, free_port
from shared.settings import Settings


def wait_healthy(api: subprocess.Popen, base_url: str, timeout: float = 30.0) -> None:
    """Until the API process `api` answers /healthz at `base_url` with Redis reachable (it must not exit meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert requests.get(f"{base_url}/healthz", timeout=5).json()["redis"] is True
            return
        except requests.ConnectionError:
            assert time.monotonic() < deadline and api.poll() is None, base_url
            time.sleep(0.2)


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
    # What an operator mistypes: a port that is no number, a list that is no JSON, a log level logging lacks (or
    # Celery: NOTSET, taken, stopped a worker once its model had loaded), a Redis URL without its scheme (whose
    # password must not be printed back) or with a query option redis-py does not take (rediss://'s on a redis://
    # URL: taken, every command failed with a traceback), a data root holding NUL (a batch read there was a 500).
    for variable, value in (("LLAVA_QUEUE_PORT", "abc"), ("LLAVA_QUEUE_API_KEY_HASHES", "abc123"),
                            ("LLAVA_QUEUE_LOG_LEVEL", "verbose"), ("LLAVA_QUEUE_LOG_LEVEL", "NOTSET"),
                            ("LLAVA_QUEUE_REDIS_URL", "localhost:6379"),
                            ("LLAVA_QUEUE_REDIS_URL", "redis//:hunter2@localhost:6379/0"),
                            ("LLAVA_QUEUE_REDIS_URL", "redis://:hunter2@localhost:6379/0?ssl_cert_reqs=none"),
                            ("LLAVA_QUEUE_REDIS_URL", "redis://:hunter2@localhost:6379/0?protocol=4"),
                            ("LLAVA_QUEUE_DATA_ROOTS", '["/tmp/a\\u0000b"]')):
        run = cli(["status"], timeout=60, **{variable: value})
        assert run.returncode == 2, (variable, value, run.stderr)
        assert "Traceback" not in run.stderr and variable in run.stderr, run.stderr
        assert "hunter2" not in run.stderr, run.stderr
    # --help still works with a bad setting in the environment.
    assert cli(["--help"], timeout=60, LLAVA_QUEUE_PORT="abc").returncode == 0


def test_a_worker_with_a_bad_model_setting_says_which_and_exits_2(tmp_path, default_model_dir):
    # Nothing listens on port 1: each of these must stop the worker before it needs Redis. A model path that is a
    # file, a checkpoint whose config.json is no JSON, a device the machine lacks, a cache folder that is a file and
    # a checkpoint whose weights file was cut short (a copy interrupted) ended in a traceback and status 1.
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import torch

    (tmp_path / "model.bin").write_bytes(b"not a checkpoint folder")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    shutil.copytree(default_model_dir, tmp_path / "truncated", ignore=shutil.ignore_patterns("*.safetensors"))
    with open(default_model_dir / "model.safetensors", "rb") as weights:
        (tmp_path / "truncated" / "model.safetensors").write_bytes(weights.read(1_000_000))
    cases = [("LLAVA_QUEUE_MODEL_PATH", "/nonexistent/llava-v1.5-13b"), ("LLAVA_QUEUE_DTYPE", "half"),
             ("LLAVA_QUEUE_DEVICE", "gpu"), ("LLAVA_QUEUE_DEVICE", "meta"),
             ("LLAVA_QUEUE_MODEL_PATH", str(tmp_path / "model.bin")),
             ("LLAVA_QUEUE_MODEL_PATH", str(tmp_path / "broken")),
             ("LLAVA_QUEUE_MODEL_PATH", str(tmp_path / "truncated")),
             ("LLAVA_QUEUE_CACHE_DIR", str(tmp_path / "model.bin"))]
    if not torch.cuda.is_available():
        cases.append(("LLAVA_QUEUE_DEVICE", "cuda"))

    def worker(variable: str, value: str) -> subprocess.CompletedProcess:
        return cli(["worker"], LLAVA_QUEUE_REDIS_URL="redis://127.0.0.1:1/0", **{variable: value})

    with ThreadPoolExecutor(4) as pool:  # each start imports torch: seconds of CPU, waiting on the disk too
        runs = list(pool.map(worker, *zip(*cases)))
    for (variable, _), run in zip(cases, runs):
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


def test_a_redis_database_the_server_does_not_have_stops_every_command_at_once(redis_server):
    # redis://host:port/99 on a Redis with the default 16 databases: the API started and answered 503 to everything,
    # the worker's Celery and its sweep tried again for ever, and `status` said Redis "does not answer".
    url = redis_server.url.rsplit("/", 1)[0] + "/99"
    for command in (["worker"], ["api", "--port", "0"], ["status"]):
        started = time.monotonic()
        run = cli(command, timeout=60, LLAVA_QUEUE_REDIS_URL=url)
        assert run.returncode == 2 and "Traceback" not in run.stderr, (command, run.stderr[-2000:])
        assert "refuses its database" in run.stderr and "/99" in run.stderr, (command, run.stderr[-2000:])
        assert time.monotonic() - started < 20, command


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


# A zero or negative count, size or time that makes no sense, and ports past 65535, per variable: each was accepted and
# failed later, away from its cause (LLAVA_QUEUE_PORT=65536: an OverflowError traceback from the port check).
OUT_OF_RANGE = (("LLAVA_QUEUE_PORT", "-1"), ("LLAVA_QUEUE_PORT", "65536"), ("LLAVA_QUEUE_WORKER_METRICS_PORT", "70000"),
                ("LLAVA_QUEUE_MAX_NUM_SEQS", "0"), ("LLAVA_QUEUE_MAX_BATCH_TOKENS", "-5"),
                ("LLAVA_QUEUE_MAX_NEW_TOKENS_CAP", "0"), ("LLAVA_QUEUE_MAX_IMAGE_BYTES", "0"),
                ("LLAVA_QUEUE_MAX_IMAGE_PIXELS", "-1"), ("LLAVA_QUEUE_JOB_TTL_SECONDS", "0"),
                ("LLAVA_QUEUE_VISIBILITY_TIMEOUT", "0"), ("LLAVA_QUEUE_MAX_ATTEMPTS", "0"),
                ("LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS", "-1"), ("LLAVA_QUEUE_MAX_QUEUED_JOBS", "-1"),
                ("LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY", "-1"), ("LLAVA_QUEUE_MAX_BODY_BYTES", "0"),
                ("LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE", "-1"), ("LLAVA_QUEUE_IDEMPOTENCY_TTL_SECONDS", "0"),
                ("LLAVA_QUEUE_BATCH_MAX_LINES", "0"), ("LLAVA_QUEUE_BATCH_TTL_SECONDS", "-1"),
                ("LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS", "0"), ("LLAVA_QUEUE_MAX_PREFILL_TOKENS", "0"))


def test_a_number_setting_out_of_its_range_is_refused_at_start_up(monkeypatch, capsys):
    from shared.cli import main
    from shared.settings import get_settings

    try:
        for variable, value in OUT_OF_RANGE:
            with monkeypatch.context() as env:
                env.setenv(variable, value)
                get_settings.cache_clear()
                assert main(["status"]) == 2, (variable, value)
                err = capsys.readouterr().err
                assert err.startswith(f"llava-queue: bad setting: {variable}={value!r}: "), err
                assert err.count("\n") == 1 and "Traceback" not in err, err
    finally:
        get_settings.cache_clear()
    # The limits that mean "none" at 0 still take it, and so does the API's port (a free one).
    for variable in ("LLAVA_QUEUE_PORT", "LLAVA_QUEUE_WORKER_METRICS_PORT", "LLAVA_QUEUE_MAX_QUEUED_JOBS",
                     "LLAVA_QUEUE_MAX_QUEUED_JOBS_PER_KEY", "LLAVA_QUEUE_RATE_LIMIT_PER_MINUTE",
                     "LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS"):
        monkeypatch.setenv(variable, "0")
    Settings()
    # And a real process exits 2 on one, before it needs Redis or a model.
    run = cli(["worker"], LLAVA_QUEUE_REDIS_URL="redis://127.0.0.1:1/0", LLAVA_QUEUE_MAX_NUM_SEQS="0")
    assert run.returncode == 2 and "LLAVA_QUEUE_MAX_NUM_SEQS='0'" in run.stderr, run.stderr[-2000:]


def test_a_bad_port_or_timeout_option_is_a_usage_error(capsys):
    from shared.cli import main

    for argv, told in ((["api", "--port", "70000"], "70000 is not a port (0 to 65535)"),
                       (["up", "--redis-port", "-1"], "-1 is not a port"),
                       (["up", "--port", "0"], "needs a fixed one"),
                       (["up", "--start-timeout", "0"], "must be more than 0 seconds"),
                       (["status", "--watch", "-2"], "must be more than 0 seconds"),
                       # `up` waited out its start timeout for an API that put itself on LLAVA_QUEUE_HOST instead.
                       (["up", "--host", ""], "empty: name an address"),
                       (["api", "--host", " "], "empty: name an address")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and told in err and "Traceback" not in err, (argv, err)


class Output:
    """A process's output lines, read by a thread of their own: a process that goes on without printing what a test
    waits for fails the test instead of blocking it."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines, self.seen = process, queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, text: str, timeout: float = 30) -> list[str]:
        """The lines up to the first one containing `text`; AssertionError with them if none did in `timeout` s."""
        deadline = time.monotonic() + timeout
        while not (self.seen and self.seen[-1] is not None and text in self.seen[-1]):
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no {text!r} in {timeout:g} s:\n" + "".join(self.seen)) from None
            self.seen.append(line)
        return self.seen

    def rest(self, timeout: float) -> str:
        """All the output, once the process has exited (TimeoutExpired if it has not in `timeout` s)."""
        self.process.wait(timeout)
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return "".join(self.seen)


def test_api_on_port_0_listens_on_a_free_port_and_logs_it(redis_server):
    # `--port 0` was taken as "unset" (LLAVA_QUEUE_PORT, 8000 by default); LLAVA_QUEUE_PORT=0 listened on a port no
    # line named. The address logged is a URL (an IPv6 host in brackets).
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url)
    for args, extra, host in ((["--port", "0"], {}, "127.0.0.1"), ([], {"LLAVA_QUEUE_PORT": "0"}, "127.0.0.1"),
                              (["--host", "::1", "--port", "0"], {}, "[::1]")):
        api = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", *args], env=dict(env, **extra),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            port = int(Output(api).until(f"listening on http://{host}:")[-1].rsplit(":", 1)[1])
            assert port not in (0, 8000)
            wait_healthy(api, f"http://{host}:{port}")
        finally:
            api.terminate()
            api.wait(15)


def test_an_api_holds_its_port_before_it_starts_the_app(redis_server):
    """uvicorn bound the port after the app's lifespan had started, behind a check that only probed it: a port taken
    in between (another API starting on it) failed there, and the process hung in the lifespan's end, deaf to
    SIGTERM. Here the port is taken right after the API's start-up log line, as a rival would."""
    import socket

    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--port", str(port)],
                           env=dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    rival = socket.socket()
    try:
        lines = Output(api).until("start-up objects frozen")
        rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError, match="in use"):
            rival.bind(("127.0.0.1", port))
            rival.listen()
        assert first_answer(api, "GET", f"http://127.0.0.1:{port}/healthz", logs=lambda: "".join(lines)
                            ).status_code == 200
        api.terminate()
        api.wait(15)
    finally:
        rival.close()
        if api.poll() is None:
            api.kill()
            api.wait()


def test_a_redis_url_only_celery_reads_is_refused_by_every_command():
    # The settings take kombu's sentinel:// and redis+socket:// (Celery reads them), but the job records go through
    # redis-py, which cannot: `status` and the worker (after loading its model) died with a traceback, the API's
    # lifespan failed after it had started.
    for command in (["status"], ["api", "--port", str(free_port())], ["worker"]):
        run = cli(command, timeout=60, LLAVA_QUEUE_REDIS_URL="sentinel://:hunter2@127.0.0.1:26379/0")
        assert run.returncode == 2 and "Traceback" not in run.stderr, (command, run.stderr[-2000:])
        assert "LLAVA_QUEUE_REDIS_URL='sentinel://***@127.0.0.1:26379/0'" in run.stderr, run.stderr[-2000:]
        assert "hunter2" not in run.stderr


def test_up_whose_embedded_redis_dies_says_so_and_stops(default_model_dir):
    # `up` watched the API and the worker only: with its Redis gone it ran on, silent, both failing every request.
    # And a child that died was not named.
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--port", str(free_port()), "--model-path",
                           str(default_model_dir), "--ephemeral-redis"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = Output(up)
        out.until("llava-queue is up", timeout=180)
        [server] = [child for child in psutil.Process(up.pid).children() if "-server" in " ".join(child.cmdline())]
        server.kill()
        output = out.rest(timeout=60)
        assert up.returncode == 1, output[-3000:]
        assert "llava-queue: the embedded Redis exited (status -9); stopping" in output, output[-3000:]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_ctrl_c_stops_the_api_without_a_traceback(redis_server):
    # uvicorn stops the API on Ctrl-C, then raises the SIGINT it held back: a KeyboardInterrupt traceback, after a
    # clean shutdown, and death by SIGINT instead of exit 0 (as `up` and `status --watch` exit on Ctrl-C).
    api = subprocess.Popen([sys.executable, "-m", "shared.cli", "api", "--port", "0"],
                           env=dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        out = Output(api)
        out.until("Application startup complete")
        api.send_signal(signal.SIGINT)
        output = out.rest(timeout=30)
        assert api.returncode == 0 and "Traceback" not in output, output[-3000:]
        assert "Finished server process" in output, output[-3000:]
    finally:
        if api.poll() is None:
            api.kill()
            api.wait()


# The CLI, with `localhost` naming ::1 and 127.0.0.1 as /etc/hosts has it on most systems (Debian, Fedora, macOS);
# this machine's own may name 127.0.0.1 alone. Nothing else changes: the real API runs.
DUAL_STACK_LOCALHOST = """
import runpy, socket, sys
resolve = socket.getaddrinfo
def getaddrinfo(host, port, *args, **kwargs):
    if host != "localhost":
        return resolve(host, port, *args, **kwargs)
    found = []
    for address in ("::1", "127.0.0.1"):
        try:
            found += resolve(address, port, *args, **kwargs)
        except socket.gaierror:  # a family the caller did not ask for
            pass
    return found
socket.getaddrinfo = getaddrinfo
runpy.run_module("shared.cli", run_name="__main__")
"""


def ipv6_loopback() -> bool:
    """Whether this machine can listen on ::1 (a kernel or a container without IPv6 cannot)."""
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_api_on_localhost_listens_on_every_address_it_names(redis_server):
    # `--host localhost` bound the first address the name resolves to alone: a client that tries ::1 first (curl,
    # a browser) got "connection refused". Every address, on the one port `--port 0` chose, and the log names them.
    api = subprocess.Popen([sys.executable, "-c", DUAL_STACK_LOCALHOST, "api", "--host", "localhost", "--port", "0"],
                           env=dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_server.url), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        line = Output(api).until("listening on http://localhost:")[-1]
        port = int(line.split("http://localhost:")[1].split()[0])
        for host in ("[::1]", "127.0.0.1"):
            wait_healthy(api, f"http://{host}:{port}")
        assert port != 0 and "(::1 and 127.0.0.1)" in line, line
    finally:
        api.terminate()
        api.wait(15)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_api_on_localhost_whose_port_is_taken_on_one_address_says_which():
    # The port taken on ::1 alone went unnoticed: the API listened on 127.0.0.1 and ran on (its Redis here is down).
    import socket

    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        api = subprocess.run([sys.executable, "-c", DUAL_STACK_LOCALHOST, "api", "--host", "localhost", "--port",
                              str(port)], env=dict(os.environ, LLAVA_QUEUE_REDIS_URL="redis://127.0.0.1:1/0"),
                             capture_output=True, text=True, timeout=60)
        assert api.returncode == 2, api.stderr[-2000:]
        assert f"localhost:{port} (::1) is in use by another process" in api.stderr, api.stderr[-2000:]


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.6])
def test_ctrl_c_as_up_starts_ends_it_quietly(tmp_path, delay):
    # The installed command, signalled as a terminal's Ctrl-C signals it, while it loads (shared.cli takes about a
    # second to import) or starts its Redis: it printed a KeyboardInterrupt traceback.
    command = Path(sys.executable).parent / "llava-queue"
    up = subprocess.Popen([str(command), "up", "--port", str(free_port()), "--redis-dir", str(tmp_path / "redis")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                          cwd=tmp_path)
    time.sleep(delay)
    os.killpg(up.pid, signal.SIGINT)
    try:
        output, _ = up.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        raise
    assert "Traceback" not in output, output
    assert up.returncode in (0, 130), (up.returncode, output)
    deadline = time.monotonic() + 10
    while (left := [process for process in psutil.process_iter(["cmdline"])
                    if str(tmp_path) in " ".join(process.info["cmdline"] or [])]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left  # its Redis, if it had started one


def test_ctrl_c_while_up_checks_a_redis_that_does_not_answer_ends_it_at_once(tmp_path):
    # Its check waits seconds for an answer: the Ctrl-C was held until the check ended, and `up` exited 2 with the
    # check's message instead (SIGTERM and a second Ctrl-C did nothing either). Nothing has started yet.
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # takes connections, never answers
    silent.settimeout(60)
    command = Path(sys.executable).parent / "llava-queue"
    up = subprocess.Popen([str(command), "up", "--port", str(free_port()), "--redis-url",
                           f"redis://127.0.0.1:{silent.getsockname()[1]}"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp_path)
    try:
        connection, _ = silent.accept()  # `up` is in its check now
        os.killpg(up.pid, signal.SIGINT)
        output, _ = up.communicate(timeout=3)
    except (subprocess.TimeoutExpired, OSError):
        os.killpg(up.pid, signal.SIGKILL)
        raise
    finally:
        silent.close()
    connection.close()
    assert up.returncode == 130 and "Traceback" not in output, (up.returncode, output)


def test_up_with_a_redis_url_redis_py_cannot_use_says_why(tmp_path):
    # `--redis-url` does not go through the settings: a query option redis-py does not take ended `up` with a
    # traceback. Refused as the setting is, before anything starts.
    run = subprocess.run([sys.executable, "-m", "shared.cli", "up", "--port", str(free_port()), "--redis-url",
                          "redis://:hunter2@127.0.0.1:1/0?foo=1"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent)))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "does not take: 'foo'" in run.stderr and "hunter2" not in run.stderr, run.stderr
