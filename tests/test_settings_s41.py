"""An operator's wrong settings and options: each is refused at start, in one line naming it, before anything starts.

Each test runs `llava-queue` as an operator does (a real Redis where one is needed, a real worker and API where the
old code started them), with one value wrong."""

import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from conftest import wait_answers
from shared.cli import build_parser
from shared.cpus import parse_cpu_list
from shared.redis_server import find_server_binary, free_port
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "S3cret-pw-s41"


def cli(args: list[str], timeout: float = 120, preexec_fn=None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=dict(os.environ, **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


@contextmanager
def redis_process(tmp_path: Path, *options: str):
    """A Redis server started with `options` (its command-line settings), no TCP port unless they name one;
    yields a redis-py client of it once it answers."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([find_server_binary(), "--port", "0", "--save", "", "--appendonly", "no",
                                "--dir", str(tmp_path), *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(10)


def test_engine_cpus_with_a_blank_inside_a_number_is_refused():
    # Blanks were removed before the list was read: "1 2" (meant as CPUs 1 and 2) read as CPU 12, which a machine
    # with 16 cores took, unsaid. Blanks around the numbers still read.
    with pytest.raises(ValueError, match="bad CPU list '1 2'"):
        parse_cpu_list("1 2")
    with pytest.raises(ValidationError, match="bad CPU list"):
        Settings(engine_cpus="1 2")
    assert parse_cpu_list(" 0 , 2 - 3 ") == {0, 2, 3}


def test_engine_cpus_past_any_machine_stop_every_command_at_once():
    # "0-99999999999" (a typo) was read as a set of a hundred billion CPUs: every command filled memory while it
    # read the settings, and ended with a MemoryError traceback (or never). Here at most 2 GiB, so as to end.
    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    started = time.monotonic()
    run = cli(["status"], timeout=120, preexec_fn=limit_memory, LLAVA_QUEUE_ENGINE_CPUS="0-99999999999")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "bad setting: LLAVA_QUEUE_ENGINE_CPUS='0-99999999999'" in run.stderr, run.stderr
    assert "CPU 99999999999 is past any machine's" in run.stderr, run.stderr
    assert time.monotonic() - started < 30


def test_up_checks_its_redis_url_as_api_and_worker_do_before_starting_anything(tmp_path):
    # `up --redis-url` was only pinged: a database that is no number, or an ACL user without scripts, started the
    # embedded stack's worker and API, which each refused it (exit 1 after they had started); a Redis that wants a
    # password was said not to answer ("HELLO must be called with the client already authenticated").
    port = free_port()
    with redis_process(tmp_path, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", PASSWORD) as server:
        admin = redis.Redis(port=port, password=PASSWORD)
        wait_answers(admin, server)
        admin.acl_setuser("noeval", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"],
                          commands=["+@all", "-eval", "-evalsha", "-script"])
        admin.close()
        cases = {
            f"redis://:{PASSWORD}@127.0.0.1:{port}/abc": "the database 'abc' is not a number",
            f"redis://127.0.0.1:{port}/0": "it wants a password (requirepass, or an ACL user's) and the URL has none",
            f"redis://noeval:{PASSWORD}@127.0.0.1:{port}/0": "its ACL denies the user what llava-queue needs",
        }
        for url, reason in cases.items():
            started = time.monotonic()
            run = cli(["up", "--port", str(free_port()), "--redis-url", url], timeout=180)
            assert run.returncode == 2 and "Traceback" not in run.stderr, (url, run.stdout + run.stderr[-2000:])
            assert reason in run.stderr and PASSWORD not in run.stdout + run.stderr, (url, run.stderr[-2000:])
            assert "starting the worker" not in run.stdout and time.monotonic() - started < 30, (url, run.stdout)


@pytest.mark.parametrize("option", ["--model-path", "--redis-url", "--redis-dir"])
def test_up_refuses_an_empty_option_instead_of_taking_its_default(option, capsys):
    # `up --model-path "$MODEL"` with MODEL unset served the default model; `--redis-url ''` started the embedded
    # Redis; `--redis-dir ''` kept the embedded Redis's data in the current folder: each as if it was left out.
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["up", option, ""])
    assert exited.value.code == 2
    assert f"argument {option}: empty: leave the option out for its default" in capsys.readouterr().err


def test_a_blank_listen_address_is_refused_naming_its_setting():
    # Only an empty variable counts as unset: " " reached the resolver, and `api` said "cannot listen on  :8000",
    # naming neither the setting nor what was wrong.
    run = cli(["api"], timeout=60, LLAVA_QUEUE_HOST=" ")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "bad setting: LLAVA_QUEUE_HOST=' ': blank: name an address" in run.stderr, run.stderr
    with pytest.raises(ValidationError, match="worker_metrics_host"):
        Settings(worker_metrics_host="\t")
