"""Settings a user may get wrong, each tried at start-up (the twenty-ninth session): every one either stops `api`,
`worker`, `up` and `status` at once with exit status 2 and one line naming the variable, its value and what is
accepted, or is taken; none starts a process that fails later (at its first job, at its SIGTERM) or ignores it."""

import json
import os
import subprocess
import sys

import pytest

from api.auth import key_digest
from shared.redis_server import free_port
from shared.settings import Settings, get_settings, unknown_variables

# Refused by every command before it needs Redis or a model; `status` exits 2 first thing on each.
REDIS_URL_ONLY_CELERY_READS = "sentinel://127.0.0.1:26379/0"


@pytest.fixture
def clean_env(monkeypatch):
    """The pytest process's environment without LLAVA_QUEUE_* variables, and fresh settings on either side."""
    for name in [name for name in os.environ if name.startswith("LLAVA_QUEUE_")]:
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def refused(env, variable: str, value: str, capsys) -> str:
    """The one line `llava-queue status` prints when `variable` is set to `value` (it must exit 2, no traceback)."""
    from shared.cli import main

    with env.context() as one:
        one.setenv(variable, value)
        get_settings.cache_clear()
        assert main(["status"]) == 2, (variable, value)
    err = capsys.readouterr().err
    assert err.startswith("llava-queue: bad setting: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert variable in err, err
    return err


def cli(args: list[str], timeout: float = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=timeout)


def test_a_time_that_is_not_finite_or_past_ten_years_is_refused(clean_env, capsys):
    # SHUTDOWN_GRACE_SECONDS=inf was taken, and the worker's wait for its running jobs raised an OverflowError on
    # SIGTERM (a traceback, nothing handed back); 1e30 the same. The other times took them too.
    for variable in ("LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS", "LLAVA_QUEUE_LLAVA_KEEPALIVE_SECONDS",
                     "LLAVA_QUEUE_STREAM_SEND_TIMEOUT_SECONDS", "LLAVA_QUEUE_RESEND_AFTER_SECONDS"):
        for value in ("inf", "nan"):
            assert "Input should be a finite number" in refused(clean_env, variable, value, capsys)
        assert "less than or equal to 315360000" in refused(clean_env, variable, "1e30", capsys)
    # An int as large: Celery's transport took it as it was.
    refused(clean_env, "LLAVA_QUEUE_VISIBILITY_TIMEOUT", str(2 ** 64), capsys)
    assert Settings(shutdown_grace_seconds=3600.5, visibility_timeout=315360000).shutdown_grace_seconds == 3600.5


def test_a_dtype_no_worker_can_load_is_refused_by_every_command(clean_env, capsys):
    # A typo was said by the worker only, after its start (a model's download, on a first start), and `api` and
    # `up` took it: `up` started Redis and the API for a worker that then failed.
    err = refused(clean_env, "LLAVA_QUEUE_DTYPE", "half", capsys)
    assert "LLAVA_QUEUE_DTYPE='half': use auto, float32, fp32, float16, fp16, bfloat16, bf16" in err, err
    # Case is no typo: the worker reads the lower-case name.
    clean_env.setenv("LLAVA_QUEUE_DTYPE", "BF16")
    assert Settings().dtype == "bf16"


def test_api_key_hashes_must_be_digests_and_the_refusal_does_not_print_them(clean_env, capsys):
    # A key listed instead of its digest matched no request: every request was answered 401, unsaid. The refusal
    # names the entry, not its text, which may be a key.
    err = refused(clean_env, "LLAVA_QUEUE_API_KEY_HASHES", json.dumps([key_digest("k1"), "hunter2"]), capsys)
    assert "entry 1 is not a SHA-256 hex digest" in err and "hunter2" not in err, err
    # A digest in upper case is one: it is compared in lower case, as the API writes a key's.
    clean_env.setenv("LLAVA_QUEUE_API_KEY_HASHES", json.dumps([key_digest("k1").upper()]))
    assert Settings().api_key_hashes == [key_digest("k1")]


def test_cors_origins_and_public_url_must_be_origins_and_urls(clean_env, capsys):
    # An origin without its scheme, or with a path, matched no page (403 on every write while the setting named
    # it); a PUBLIC_URL that is no http(s) URL was handed to the original clients by /get_worker_address.
    for value in ('["app.example"]', '["https://app.example/chat"]', '[""]', '["https://app.example:99999"]'):
        err = refused(clean_env, "LLAVA_QUEUE_CORS_ORIGINS", value, capsys)
        assert "is not an origin: write scheme://host[:port]" in err, err
    for value in ("api.example:8000", "ftp://api.example", "https://"):
        err = refused(clean_env, "LLAVA_QUEUE_PUBLIC_URL", value, capsys)
        assert f"LLAVA_QUEUE_PUBLIC_URL={value!r}: not an http(s) URL" in err, err
    clean_env.setenv("LLAVA_QUEUE_CORS_ORIGINS", '["*", "https://app.example/", "http://[::1]:8080"]')
    clean_env.setenv("LLAVA_QUEUE_PUBLIC_URL", "https://api.example/llava/")
    assert len(Settings().cors_origins) == 3


def test_a_variable_that_is_no_setting_is_named_with_the_one_it_may_mean():
    # pydantic-settings ignores it: MAX_NUM_SEQ=4 ran 32 sequences, and nothing said so. (A process of its own: past
    # the settings, `main` sets up the process's logging.)
    run = cli(["status"], LLAVA_QUEUE_MAX_NUM_SEQ="4", LLAVA_QUEUE_REDIS_URL=REDIS_URL_ONLY_CELERY_READS,
              LLAVA_QUEUE_API_URL="http://127.0.0.1:8000")  # the eval client's, not a setting: no line
    assert run.returncode == 2, run.stderr
    err = run.stderr
    assert ("llava-queue: LLAVA_QUEUE_MAX_NUM_SEQ is not a setting, ignored (did you mean LLAVA_QUEUE_MAX_NUM_SEQS?)"
            in err.splitlines()), err
    assert "API_URL" not in err, err
    assert unknown_variables({"LLAVA_QUEUE_TORCH": "torch", "LLAVA_QUEUE_PORT": "1", "PATH": "/bin"}) == []
    # With JSON logs it is a JSON line, there at a level above WARNING too.
    run = cli(["status"], LLAVA_QUEUE_MAX_NUM_SEQ="4", LLAVA_QUEUE_REDIS_URL=REDIS_URL_ONLY_CELERY_READS,
              LLAVA_QUEUE_LOG_FORMAT="json", LLAVA_QUEUE_LOG_LEVEL="ERROR")
    lines = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert any("LLAVA_QUEUE_MAX_NUM_SEQ is not a setting" in line["message"] for line in lines), run.stderr


def test_a_conversation_log_the_worker_cannot_write_stops_it_before_its_model_loads(tmp_path, clean_env, capsys):
    # A folder, or a path under a file, was taken: the worker started, and every finished job's line failed to be
    # written, each with a traceback in its log.
    err = refused(clean_env, "LLAVA_QUEUE_CONVERSATION_LOG", str(tmp_path), capsys)
    assert "is a folder: name a file" in err, err
    (tmp_path / "file").write_text("")
    run = cli(["worker"], LLAVA_QUEUE_CONVERSATION_LOG=str(tmp_path / "file" / "conv.jsonl"),
              LLAVA_QUEUE_REDIS_URL=REDIS_URL_ONLY_CELERY_READS)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert (f"llava-queue worker: LLAVA_QUEUE_CONVERSATION_LOG='{tmp_path}/file/conv.jsonl' cannot be written: "
            f"{tmp_path}/file is a file, not a folder") in run.stderr, run.stderr[-2000:]


def test_an_api_whose_frontend_dir_has_no_page_stops_at_start_up(tmp_path):
    # It started, and answered 404 for its page, unsaid; a folder that is not there the same.
    for folder, what in ((tmp_path / "missing", "is not a folder"), (tmp_path, "has no index.html")):
        run = cli(["api", "--port", str(free_port())], LLAVA_QUEUE_FRONTEND_DIR=str(folder))
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert f"llava-queue api: LLAVA_QUEUE_FRONTEND_DIR='{folder}' {what}" in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("value, level", [("warn", "WARNING"), ("Fatal", "CRITICAL"), ("debug", "DEBUG")])
def test_logging_aliases_of_a_level_are_its_name(value, level):
    # The worker hands its level to Celery, which takes DEBUG, INFO, WARNING, ERROR, CRITICAL (and FATAL) only: WARN
    # was taken here, and the worker exited with a traceback once its model had loaded.
    assert Settings(log_level=value).log_level == level
