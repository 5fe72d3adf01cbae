"""The stack on an operator's own Redis: a password, ACL users, a database other than 0, maxmemory with eviction.

Each test starts its own redis/valkey server with the configuration an operator would use, then the real worker or
API against it, as `llava-queue worker` and `llava-queue api` run them."""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import redis
import requests

from conftest import wait_answers
from shared.redis_server import find_server_binary, free_port

PASSWORD = "S3cret-pw-s30"


@contextmanager
def redis_process(tmp_path: Path, *options: str):
    """A Redis server on 127.0.0.1 with `options` (its command-line settings), its default user's password
    PASSWORD; yields its port."""
    port = free_port()
    tmp_path.mkdir(exist_ok=True)
    process = subprocess.Popen([find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", PASSWORD, *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        admin = redis.Redis(port=port, password=PASSWORD)
        wait_answers(admin, process)
        # An operator's users: one with every permission, one without scripts, one without CLIENT.
        for user, denied in (("queue", []), ("noeval", ["-eval", "-evalsha", "-script"]), ("noclient", ["-client"])):
            admin.acl_setuser(user, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"],
                              commands=["+@all", *denied])
        admin.close()
        yield port
    finally:
        process.terminate()
        process.wait(10)


def run_api(port: int, redis_url: str, tmp_path: Path):
    """`llava-queue api` started on `port` against `redis_url`: its process and its base URL."""
    env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=redis_url, LLAVA_QUEUE_PORT=str(port))
    log = open(tmp_path / f"api-{port}.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "shared.cli", "api"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def healthz(process: subprocess.Popen, base: str) -> requests.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return requests.get(f"{base}/healthz", timeout=10)
        except requests.ConnectionError:
            assert time.monotonic() < deadline and process.poll() is None, "the API did not start"
            time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_a_worker_refused_by_redis_says_why_and_exits_before_loading_its_model(tmp_path):
    """A wrong password, or an ACL user without EVAL, started a worker that loaded its model and then tried again
    for ever, as if Redis were away ("Cannot connect ... Trying again"); it never took a job. On a read-only replica
    Celery's consumer stopped at its start ("Unrecoverable error: ReadOnlyError") and the worker exited 0. Now it
    exits 2 at once with one line saying what Redis refuses, the password masked."""
    with redis_process(tmp_path / "primary") as port, \
            redis_process(tmp_path / "replica", "--replicaof", "127.0.0.1", str(port), "--masterauth",
                          PASSWORD) as replica_port:
        for url, said in ((f"redis://queue:wrong-{PASSWORD}@127.0.0.1:{port}/3", "refuses the credentials"),
                          (f"redis://127.0.0.1:{port}/3", "wants a password"),
                          (f"redis://noeval:{PASSWORD}@127.0.0.1:{port}/3", "'eval' command"),
                          (f"redis://:{PASSWORD}@127.0.0.1:{replica_port}/3", "read-only replica")):
            env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=url)
            try:
                worker = subprocess.run([sys.executable, "-m", "shared.cli", "worker"], env=env, capture_output=True,
                                        text=True, timeout=40)
            except subprocess.TimeoutExpired as exc:
                raise AssertionError(f"the worker still runs after 40 s: {exc.stderr[-1000:]}") from None
            assert worker.returncode == 2, worker.stderr[-2000:]
            line = worker.stderr.strip().splitlines()[-1]
            assert line.startswith("llava-queue worker: Redis at redis://") and said in line, worker.stderr[-2000:]
            assert PASSWORD not in worker.stderr + worker.stdout
            assert "loaded" not in worker.stderr  # before the model, not after


def test_an_api_refused_by_redis_says_why_and_healthz_says_what_it_cannot_do(tmp_path):
    """An ACL user without CLIENT: the API names its stream subscriber's connection (CLIENT SETNAME), refused, so its
    stream reader never connected and no stream got a token, while /healthz said "ok"; a wrong password started an
    API that tried again for ever. Now `llava-queue api` exits 2 at its start with one line, and /healthz answers
    503 with why for an ACL narrowed while it runs. A Redis that evicts keys at maxmemory (allkeys-lru) loses queued
    jobs unsaid: /healthz says so (200, the API still works); the user's database 3 is the one written."""
    with redis_process(tmp_path, "--maxmemory", "200mb", "--maxmemory-policy", "allkeys-lru") as port:
        for user, password, said in (("noclient", PASSWORD, "client|setname"), ("queue", "wrong", "credentials")):
            env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=f"redis://{user}:{password}@127.0.0.1:{port}/3",
                       LLAVA_QUEUE_PORT=str(free_port()))
            api = subprocess.run([sys.executable, "-m", "shared.cli", "api"], env=env, capture_output=True, text=True,
                                 timeout=60)
            line = api.stderr.strip().splitlines()[-1]
            assert api.returncode == 2 and line.startswith("llava-queue api: Redis at") and said in line, api.stderr
            assert PASSWORD not in api.stderr
        process, base = run_api(free_port(), f"redis://queue:{PASSWORD}@127.0.0.1:{port}/3", tmp_path)
        try:
            answer = healthz(process, base)
            assert answer.status_code == 200, answer.text
            (warning,) = answer.json()["redis_warnings"]
            assert "allkeys-lru" in warning and "noeviction" in warning, warning
            assert PASSWORD not in answer.text
            # Written to database 3, with the user's credentials.
            job = requests.post(f"{base}/v1/jobs", json={"prompt": "Hi", "max_new_tokens": 2}, timeout=10)
            assert job.status_code == 202, job.text
            assert redis.Redis(port=port, db=3, username="queue", password=PASSWORD).exists(
                f"llq:job:{job.json()['id']}")
        finally:
            stop(process)
        process, base = run_api(free_port(), f"redis://queue:{PASSWORD}@127.0.0.1:{port}/3", tmp_path)
        try:
            # The first /healthz reads the checks: the ACL is narrowed before it.
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"{base}/v1/models", timeout=10)
                    break
                except requests.ConnectionError:
                    assert time.monotonic() < deadline and process.poll() is None, "the API did not start"
                    time.sleep(0.2)
            redis.Redis(port=port, password=PASSWORD).acl_setuser("queue", enabled=True, commands=["-client"])
            answer = healthz(process, base)
            assert answer.status_code == 503, answer.text
            assert answer.json()["status"] == "refused" and "client|setname" in answer.json()["error"], answer.text
        finally:
            stop(process)


def test_status_refused_by_redis_says_why(tmp_path):
    """`llava-queue status` against a Redis that wants a password, or refuses the URL's: it said "does not answer"
    with the server's words and exited 1, as for a Redis that is away. Now one line as `api` and `worker` say it,
    exit 2; a user without scripts still reads the table (a monitoring user may have fewer rights)."""
    with redis_process(tmp_path) as port:
        for url, said in ((f"redis://127.0.0.1:{port}/0", "wants a password"),
                          (f"redis://queue:wrong-{PASSWORD}@127.0.0.1:{port}/0", "refuses the credentials")):
            env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=url)
            status = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True,
                                    text=True, timeout=60)
            line = status.stderr.strip().splitlines()[-1]
            assert status.returncode == 2 and line.startswith("llava-queue status: Redis at") and said in line, (
                status.returncode, status.stderr)
            assert PASSWORD not in status.stderr + status.stdout
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=f"redis://noeval:{PASSWORD}@127.0.0.1:{port}/0")
        status = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert "refuses" not in status.stderr and "wants a password" not in status.stderr, status.stderr
        # A monitoring user with reads only, PING not among them: its credentials are taken, the table is read.
        admin = redis.Redis(port=port, password=PASSWORD)
        admin.acl_setuser("monitor", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"],
                          commands=["+@read", "+time", "+client|setinfo"])
        admin.close()
        env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=f"redis://monitor:{PASSWORD}@127.0.0.1:{port}/0")
        status = subprocess.run([sys.executable, "-m", "shared.cli", "status"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and "QUEUE" in status.stdout, (status.returncode, status.stderr)
