"""One typed settings object, read once from `LLAVA_QUEUE_*` environment variables."""

import difflib
import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from redis.connection import ConnectionPool
from redis.exceptions import RedisError

from shared.cpus import parse_cpu_list
from shared.protocol import MAX_MODEL_CHARS


# The longest time to live a setting may give a key, and the longest time any setting may name: ten years. Redis
# takes an expiry up to 2**63 - 1 ms, and one past that ("invalid expire time") failed every job's ending after its
# status was written; a thread's wait takes at most threading.TIMEOUT_MAX (about 292 years).
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
# The dtypes LLAVA_QUEUE_DTYPE may name (workers/builder.py resolve_dtype maps them to torch's): checked when the
# settings are read, so `api` and `up` refuse a typo at once, not only a worker after its model's download.
DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16")
# The most sequences one batch may hold (LLAVA_QUEUE_MAX_NUM_SEQS). A worker runs a Celery task thread per slot and
# asks Redis for as many messages: past 65535 kombu turned its QoS off ("prefetch_count exceeds 65535") and the
# worker started that many threads; no batch this wide pays off on one GPU.
MAX_NUM_SEQS_LIMIT = 4096
# LLAVA_QUEUE_* variables that are not settings but are read elsewhere: the install script's torch wheel, the eval
# client's API address and key, the page tests' screenshots and browser, the test script's processes. Any other one
# is a typo, said at start-up.
OTHER_VARIABLES = frozenset({"LLAVA_QUEUE_TORCH", "LLAVA_QUEUE_API_URL", "LLAVA_QUEUE_API_KEY",
                             "LLAVA_QUEUE_SCREENSHOTS", "LLAVA_QUEUE_CHROMIUM", "LLAVA_QUEUE_TEST_PROCESSES"})


class Settings(BaseSettings):
    """Every knob of llava-queue; each field reads `LLAVA_QUEUE_<FIELD>` from the environment.

    Every count, size, time and port has its range: a value out of it (MAX_NUM_SEQS=0, a negative TTL, a port past
    65535) is refused when the settings are read, with the variable named, instead of failing later in odd ways."""

    # A variable set but empty (`LLAVA_QUEUE_DEFAULT_MODEL=`, or compose's `${VAR}` of an unset VAR) means unset:
    # the field's default, not an empty model name, URL or list.
    model_config = SettingsConfigDict(env_prefix="LLAVA_QUEUE_", extra="ignore", env_ignore_empty=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "llq"

    # The API: where `llava-queue api` and `llava-queue up` listen (their --host and --port win).
    host: str = "127.0.0.1"
    # 0: a free port the system picks, which the API logs (`llava-queue api`; `up` needs one it can wait on and
    # refuses it).
    port: int = Field(8000, ge=0, le=65535)
    # WebSocket permessage-deflate. Off: every chunk repeats the whole text so far (LLaVA's format), and
    # compressing each one costs the API, and every client decompressing it, CPU for each token
    # (bench/README.md); turn it on for clients on slow links.
    ws_compression: bool = False
    # /worker_generate_stream sends a lone NUL byte after this many seconds without a frame (a job waiting in the
    # queue): the original web server reads with a 10 s timeout, the original controller's proxy (a hierarchical
    # setup, llava-queue registered with it as a worker) with 5 s, and both skip empty frames. At 5 s the keepalive
    # raced the proxy's timeout (a busy API loses it, and the proxy's client gets its error frame, code 3).
    llava_keepalive_seconds: float = Field(2.5, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)
    # A streamed chat completion sends an SSE comment (": keepalive") after this many seconds without an event (a job
    # waiting in a deep queue): nothing went out after its first chunk, and a proxy's read timeout (nginx's 60 s) or
    # a client's cut it. OpenAI's clients and EventSource skip comments.
    sse_keepalive_seconds: float = Field(15.0, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)
    # How long one message of a stream (WebSocket, LLaVA's HTTP stream, server-sent events) may wait to be sent
    # (uvicorn holds it back while the client's unread data fill the socket) before the client counts as gone and its
    # stream ends: a client that keeps its connection but reads nothing is let go, as one that left (its job goes on
    # at /v1/jobs/{id}/ws; elsewhere it is cancelled unless kept). WS /v1/ws waits as long for its first message.
    stream_send_timeout_seconds: float = Field(20.0, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)
    # How long the API waits for a request's body, plus a second for every 500 bytes of it that came (Apache's
    # RequestReadTimeout body=..,MinRate=500): a body slower than that is answered 408 (api.main.BodyDeadline). A
    # client that sent a byte every 19 s, within the 20 s idle limit, held its connection and a handler for ever.
    request_body_timeout_seconds: float = Field(60.0, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)
    # The API's address as clients reach it, answered by the controller endpoint /get_worker_address.
    # Unset: the address the asking client used (the scheme and Host of its request).
    public_url: str | None = None
    # The web page's folder; None means `frontend/` beside the `api` package (a checkout or editable install).
    frontend_dir: Path | None = None

    # The worker's model. No model_path means the embedded default (SmolLM2-135M-Instruct).
    model_path: str | None = None
    model_base: str | None = None
    model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    load_8bit: bool = False
    load_4bit: bool = False
    # A local copy of the vision tower an original LLaVA checkpoint names in `mm_vision_tower`
    # (e.g. openai/clip-vit-large-patch14-336), so an offline worker needs no model hub.
    vision_tower: str | None = None
    # Limits on one image of a request, checked by the API and the worker alike: the base64 text's
    # length, and width x height read from the file's header before decoding (decompression bombs).
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "llava-queue")

    # The engine's budgets: sequences in one batch, and the positions their (left-padded) KV cache may
    # hold: rows x the longest prompt + max new tokens among them.
    max_num_seqs: int = Field(32, ge=1, le=MAX_NUM_SEQS_LIMIT)
    max_batch_tokens: int = Field(16384, ge=1)
    # Prompt positions (rows x longest prompt) one prefill forward computes: a burst is prefilled in
    # groups, so the first ones start streaming early. Unset: 256 on a CPU, 4096 on a GPU.
    max_prefill_tokens: int | None = Field(None, ge=1)
    # Which forward the engine's steps run (workers/engine/model_runner.py FORWARDS): auto is the engine's own
    # for Llama-family models (prepacked weights on a CPU, fused ones on a GPU); graphs is the fused one with decode
    # steps replayed from CUDA graphs (not yet measured on a GPU); fused forces the engine's own on fused weights;
    # model is the model's own.
    engine_forward: Literal["auto", "graphs", "fused", "model"] = "auto"
    # Decode attention of the engine's own forward in bf16 on a CPU: auto runs the engine's kernel
    # (workers/engine/decode_attention.cpp, built with g++ into CACHE_DIR on first use; torch's flash kernel when
    # it cannot be built), torch runs torch's flash kernel.
    decode_attention: Literal["auto", "torch"] = "auto"
    # The operations between a layer's products (RMSNorm, rotary embedding, SiLU, residual sums) in bf16 decode
    # steps of the engine's own forward on a CPU: auto runs the engine's (workers/engine/layer_ops.cpp, built with
    # decode attention's kernel; torch's when it cannot be built), torch runs torch's.
    layer_ops: Literal["auto", "torch"] = "auto"
    # On a CPU, the engine's own forward multiplies a request decoded alone as it multiplies the rows of a batch
    # (oneDNN multiplies a single row in another order) and attends in its decode kernel in fp32 too, so that a
    # greedy answer does not depend on what else ran: a lone decode step costs about 15 % more. Prompts prefilled
    # together are computed as alone either way.
    batch_invariant: bool = False
    # Cores of the engine's own on a CPU (a Linux cpu list: "1", "2-7"): the engine thread and its OpenMP
    # team run there, one torch thread per core; the worker's other threads, and the API and Redis that
    # `llava-queue up` starts, run on the other cores (shared/cpus.py). Empty: every process on every core.
    engine_cpus: str = ""

    # The original worker clamps max_new_tokens to 1024.
    max_new_tokens_cap: int = Field(1024, ge=1)
    # A running job's text is written and streamed every this many tokens (the original worker's
    # --stream-interval): 1 sends every token; more sends fewer, longer chunks, each still the whole text so far,
    # for less work per token in Redis, the API and the clients. A job's first token and its end go out at once.
    stream_interval: int = Field(1, ge=1)
    # How long a finished job's record stays readable.
    job_ttl_seconds: int = Field(24 * 3600, ge=1, le=MAX_TTL_SECONDS)
    # Celery/Redis redelivers an unacked job after this long; it must exceed the longest job.
    visibility_timeout: int = Field(4 * 3600, ge=1, le=MAX_TTL_SECONDS)
    # A worker refreshes its heartbeat this often; one silent for heartbeat_ttl_seconds is dead, and
    # the jobs it held are delivered again (at most max_attempts starts per job).
    heartbeat_interval_seconds: float = Field(3.0, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)
    heartbeat_ttl_seconds: int = Field(10, ge=1, le=MAX_TTL_SECONDS)
    # A job queued this long whose task message is nowhere (not in its queue, held by no worker) has it sent again by
    # the workers' sweep (shared.celery_app.resend_lost_tasks).
    resend_after_seconds: float = Field(60.0, gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)
    max_attempts: int = Field(3, ge=1)
    # Hand-backs (a worker told to stop gives its running jobs back: rolling restarts, scale-downs) a job may have;
    # its next start past them fails it. They do not count against max_attempts, but without a bound of their own a
    # job whose worker is stopped at every start (an eviction or a liveness probe it sets off) went round for ever.
    # 0: a job handed back once fails at its next start.
    max_hand_backs: int = Field(10, ge=0)
    # On SIGTERM a worker stops taking jobs and lets running ones finish for this long, then hands
    # the rest back to the queue (another worker resumes them) and exits. Like every time here, at most ten years:
    # `inf` (or 1e30) was taken, and the worker's wait for its jobs failed with an OverflowError on SIGTERM, handing
    # nothing back.
    shutdown_grace_seconds: float = Field(20.0, ge=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)

    # Admission and abuse limits. Past max_queued_jobs, submissions get 429 with Retry-After (0: no limit).
    max_queued_jobs: int = Field(10_000, ge=0)
    # The same limit for the jobs of one API key (0: none), so one client cannot fill the queue.
    max_queued_jobs_per_key: int = Field(0, ge=0)
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # The feedback log (POST /v1/feedback, a Redis list kept for good) keeps its newest lines within this many bytes.
    feedback_log_bytes: int = Field(64 * 1024 * 1024, ge=1)
    # SHA-256 hex digests of the accepted API keys (Bearer tokens); empty means no keys are required.
    api_key_hashes: list[str] = Field(default_factory=list)
    # Requests per minute per API key (0: no limit).
    rate_limit_per_minute: int = Field(0, ge=0)
    # Wrong API keys one client address (an IPv6 /64) may send in a minute before it is refused until the minute ends,
    # its right key too (api.auth; 0: no limit).
    auth_failures_per_minute: int = Field(30, ge=0)
    # Origins allowed to call the API from a browser (CORS); none by default.
    cors_origins: list[str] = Field(default_factory=list)
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=1, le=MAX_TTL_SECONDS)
    # With API keys on, also leave the original LLaVA protocol (controller endpoints and
    # /worker_generate_stream) open, for the original clients, which cannot send a key.
    public_llava_protocol: bool = False

    # Operations. Logs go to stderr as plain text or as JSON lines (one object per line, with the
    # job id on every line about a job).
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # A worker serves Prometheus metrics (and /readyz) on this port; 0: no exporter.
    worker_metrics_port: int = Field(0, ge=0, le=65535)
    worker_metrics_host: str = "0.0.0.0"
    # Celery task events (task-received, -started, -succeeded: three more messages per job through the
    # worker's one consumer thread, which also takes every job from the queue). Off by default; Flower
    # turns them on in the workers it watches (its enable_events), `celery control enable_events` too.
    task_events: bool = False
    # The original's conversation log: one JSON line per finished job, appended by the worker that
    # ran it (image MD5 hashes instead of image bytes); empty: off.
    conversation_log: str = ""
    # The model GET /readyz requires a live, ready worker for; unset: any model.
    default_model: str | None = None

    # Offline batch evaluation (POST /v1/batches). Server-side files (question files, image folders)
    # are read only under these folders: a JSON list or paths separated by ':'; empty: server-side
    # paths are refused, uploads still work.
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Lines in one batch file, and how long a batch, its results and uploaded files stay readable.
    batch_max_lines: int = Field(50_000, ge=1)
    batch_ttl_seconds: int = Field(30 * 24 * 3600, ge=1, le=MAX_TTL_SECONDS)
    # Bytes of uploaded files (POST /v1/files) one API key (with keys off, everyone together) may keep in Redis at
    # once; an upload past it gets a 400 (0: no limit).
    max_file_bytes_per_key: int = Field(4 * 1024 ** 3, ge=0)
    # Engine slots a worker keeps for interactive jobs: it runs at most max_num_seqs minus this many
    # batch-queue jobs at once (0: batch jobs may fill every slot). Unset: an eighth of max_num_seqs.
    batch_reserved_slots: int | None = Field(None, ge=0)

    @property
    def reserved_slots(self) -> int:
        """The engine slots kept for interactive jobs (`batch_reserved_slots`, or its default); a batch job
        always has at least one slot."""
        wanted = self.max_num_seqs // 8 if self.batch_reserved_slots is None else self.batch_reserved_slots
        return max(0, min(wanted, self.max_num_seqs - 1))

    @model_validator(mode="after")
    def _heartbeat_outlives_its_interval(self) -> "Settings":
        # A heartbeat that expires before its next refresh makes a live worker look dead for part of every
        # interval: /readyz flaps, and the orphan sweep delivers the jobs it is running again.
        if self.heartbeat_ttl_seconds <= self.heartbeat_interval_seconds:
            raise ValueError(f"LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS ({self.heartbeat_ttl_seconds}) must exceed "
                             f"LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS ({self.heartbeat_interval_seconds:g}), "
                             "by a few intervals")
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        problem = redis_url_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("host", "worker_metrics_host")
    @classmethod
    def _listen_host(cls, value: str) -> str:
        # Blank (a set variable is only ignored when empty): it reached the resolver, and `api` said "cannot listen
        # on  :8000", naming no setting. `--host ''` is refused alike.
        if not value.strip():
            raise ValueError("blank: name an address (127.0.0.1, 0.0.0.0 for every one, ::) or a host name")
        return value

    @field_validator("log_format", "engine_forward", "decode_attention", "layer_ops", mode="before")
    @classmethod
    def _choice(cls, value):
        # In any case, as DTYPE and LOG_LEVEL are read: LOG_FORMAT=JSON was refused while LOG_LEVEL=debug was taken.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        dtype = value.strip().lower()
        if dtype not in DTYPES:
            raise ValueError(f"use {', '.join(DTYPES)}")
        return dtype

    @field_validator("api_key_hashes")
    @classmethod
    def _key_hashes(cls, value: list[str]) -> list[str]:
        # A key itself, or a digest cut short, matched no request: every request was refused with 401, unsaid.
        # Upper-case hex is a digest too (the API compares hashlib's lower-case one). Which entry, not its text:
        # it may be a key.
        digests = []
        for index, digest in enumerate(value):
            digest = digest.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"entry {index} is not a SHA-256 hex digest (64 hex digits): list the digests of "
                                 "the keys, not the keys (python -c \"import hashlib; "
                                 "print(hashlib.sha256(b'KEY').hexdigest())\")")
            digests.append(digest)
        return digests

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        # One that is not an origin (no scheme, a path) matched no page, which got 403 while the setting named it.
        for origin in value:
            if origin.strip() == "*":
                continue
            parts = urlsplit(origin.strip().rstrip("/"))
            try:
                parts.port  # a port that is no number, or out of range, raises
            except ValueError:
                parts = parts._replace(netloc="")
            if not (parts.scheme and parts.hostname) or parts.path or parts.query or parts.fragment:
                raise ValueError(f"{origin!r} is not an origin: write scheme://host[:port] "
                                 "(https://app.example), or \"*\" for any")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        # /get_worker_address hands it to the original controller's clients, which post to it: one that is no
        # http(s) URL (a bare host name) was answered as it was, and every one of their requests failed there.
        if value is not None:
            parts = urlsplit(value.strip())
            try:
                parts.port
            except ValueError:
                parts = parts._replace(netloc="")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("not an http(s) URL: write http(s)://host[:port][/path], the API's address as "
                                 "clients reach it")
        return value

    @field_validator("conversation_log")
    @classmethod
    def _conversation_log(cls, value: str) -> str:
        # A folder was taken, and every finished job's line failed to be written, each with a traceback in the log.
        if value.strip() and Path(value).expanduser().is_dir():
            raise ValueError("is a folder: name a file the worker appends to (e.g. /var/log/llava-queue/conv.jsonl)")
        return value

    @field_validator("model_name", "default_model")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        # No request may name a model longer than this (a 422): a worker serving one could be sent no job by its name,
        # only jobs that name no model, and they recorded a model no request can ask for again.
        if value is not None and len(value) > MAX_MODEL_CHARS:
            raise ValueError(f"is {len(value)} characters long; a request may name a model of at most "
                             f"{MAX_MODEL_CHARS}, so a longer one could never be asked for")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().upper()
        # Python's aliases as their names: the worker hands the level to Celery, which takes these five (and
        # FATAL) only; WARN and NOTSET were taken here, and the worker exited with a traceback once its model
        # had loaded.
        level = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level, level)
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("engine_cpus")
    @classmethod
    def _cpu_list(cls, value: str) -> str:
        if value.strip():
            parse_cpu_list(value)  # a malformed list fails here, with what is wrong
        return value

    @field_validator("data_roots", mode="before")
    @classmethod
    def _path_list(cls, value):
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @field_validator("data_roots", "frontend_dir", "cache_dir")
    @classmethod
    def _no_nul(cls, value):
        # JSON's "\u0000" gets one into a path, which no file name holds: taken, it failed later, in a request (a
        # batch read from the data roots answered 500).
        if any("\0" in str(path) for path in (value if isinstance(value, list) else [value] if value else [])):
            raise ValueError("a path with a NUL character names no file")
        return value


def redis_url_problem(url: str) -> str | None:
    """Why `url` cannot be LLAVA_QUEUE_REDIS_URL, read without connecting (its message does not repeat the URL, which
    may hold a password), or None: the settings' check, and `up --redis-url`'s, which does not go through them (it
    took a database that is no number, and started a worker and an API that each refused it)."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        return "not a URL: use redis://[:password@]host:port/db (rediss:// for TLS)"
    problem = redis_url_options_problem(url)
    if problem:
        return problem
    if scheme == "unix" and not urlsplit(url).path:
        return "names no socket: use unix:///path/to/redis.sock?db=0"
    if scheme in ("redis", "rediss"):
        database = urlsplit(url).path.strip("/")
        if database and not database.isdigit():
            # redis-py leaves it out (database 0), Celery's kombu refuses it: the API and the worker used two.
            return f"the database {database!r} is not a number: use redis://host:port/0"
    # Other schemes (redis+socket://, sentinel://) are kombu's; Celery checks them when it connects.
    return None


def redis_url_options_problem(url: str) -> str | None:
    """Why redis-py cannot use the redis://, rediss:// or unix:// URL `url` (its message does not repeat the URL, which
    may hold a password), or None; None for another scheme (kombu's: sentinel://, redis+socket://), which Celery checks
    when it connects. Its connection is built, not connected: an option of the query it does not take (?foo=1, or
    rediss://'s ssl_cert_reqs on a redis:// URL) or cannot read (ssl_cert_reqs=CERT_REQUIRED, protocol=4) fails here.
    parse_url took them, and every command failed later, with a traceback."""
    scheme = url.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix"):
        return None
    try:
        pool = ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)
    except TypeError as exc:
        option = str(exc).rpartition(" argument ")[2] or str(exc)
        return f"its query has an option a {scheme}:// URL does not take: {option}"
    except (ValueError, RedisError) as exc:
        return str(exc)
    return None


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line for each `LLAVA_QUEUE_*` variable in `environ` that is no setting (a typo: MAX_NUM_SEQ for
    MAX_NUM_SEQS), with the setting it may have meant; pydantic-settings ignores them, and the default ran unsaid."""
    known = {f"LLAVA_QUEUE_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    lines = []
    for name in sorted(environ):
        if name.upper().startswith("LLAVA_QUEUE_") and name.upper() not in known:
            near = difflib.get_close_matches(name.upper(), sorted(known - OTHER_VARIABLES), n=1, cutoff=0.75)
            meant = f" (did you mean {near[0]}?)" if near else ""
            lines.append(f"{name} is not a setting, ignored{meant}")
    return lines


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
