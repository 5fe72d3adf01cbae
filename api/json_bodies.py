"""Request bodies read as JSON without stalling the event loop: a heavy body is parsed in a pool process.

`json.loads` and pydantic hold the GIL for as long as they run, on a thread too: 64 MiB of `[0,0,...]` held every
request and stream of the API for 1.5 s, of `[[],[],...]` for 11 s. A body that is large (LIGHT_BODY_BYTES), or
may hold more values than any valid request (a count of the bytes `[{,:` says so, cheaply: an upper bound, commas in
a prompt count too) goes to one of a few long-lived processes, which parses it, counts its values, and sends back
either the value or why it is refused: more values than any valid request holds, or nested deeper. The API then only
unpickles a bounded value (or a few long strings, images), which is fast. A light body is parsed where it was.
"""

import asyncio
import ctypes
import gc
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from starlette.requests import Request

from api.errors import ApiError
from shared.protocol import (MAX_IMAGES, MAX_MESSAGES, MAX_STOP_STRINGS, BulkJobRequest, ErrorCode, InvalidRequest,
                             JobRequest)

log = logging.getLogger("llava_queue.api")

# A body up to this size, whose count of `[{,:` is within its route's limit, is parsed on the spot: a few
# milliseconds at most. Larger ones (images, long prompts) go to a parser process.
LIGHT_BODY_BYTES = 1 << 20
# How many parser processes the API keeps: each heavy body takes one for as long as it is parsed (seconds for a
# crafted 64 MiB), the others wait for one.
PARSER_PROCESSES = 2
# The deepest nesting a heavy body may have (a valid request nests 6 deep: bulk, jobs, a job, its turns, a turn, its
# images). json.loads itself stops at about 1,000, and a value that deep could not be sent back.
MAX_DEPTH = 64

# The values (objects, arrays, object keys, strings, numbers, true, false, null) a valid request holds at most:
# a chat turn in OpenAI's form, its object, role and name (keys and values), its content (key and array) of two text
# parts (each an object, its type and text, keys and values);
TURN_VALUES = 1 + 4 + 2 + 2 * 5
# a job, its object with every field of JobRequest (key and value), MAX_STOP_STRINGS stop strings, MAX_IMAGES images;
JOB_VALUES = 1 + 2 * len(JobRequest.model_fields) + MAX_STOP_STRINGS + MAX_IMAGES
# one request (a job, a chat completion with its 40-odd options, a batch, a vote): a job, 128 values of options,
# MAX_MESSAGES turns, all doubled for fields a client adds that the API ignores (69,982);
REQUEST_VALUES = 2 * (JOB_VALUES + 128 + MAX_MESSAGES * TURN_VALUES)
# and `POST /v1/jobs/bulk`: as many jobs as it takes (10,000), each with every field and 8 chat turns, and one
# request's worth more (1,900,000 or so). More than a route's limit is refused, saying so: a request of more values
# (a bulk of long chats, a chat of thousands of content parts) is sent as several.
MAX_BULK_JOBS = next(rule.max_length for rule in BulkJobRequest.model_fields["jobs"].metadata
                     if getattr(rule, "max_length", None) is not None)
BULK_VALUES = MAX_BULK_JOBS * (JOB_VALUES + 8 * TURN_VALUES) + REQUEST_VALUES


def malformed(exc: ValueError) -> str:
    """What is wrong with a body json.loads refused (`exc`), as the API says it."""
    if isinstance(exc, UnicodeDecodeError):
        return f"malformed JSON: the body is not UTF-8 text ({exc})"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON: {exc}"
    return "malformed JSON: a number has too many digits"  # what else json.loads raises: more than 4,300 digits


def loads(raw: bytes | str) -> Any:
    """`json.loads(raw)`, which reads bytes in UTF-8 (with or without a byte order mark), UTF-16 or UTF-32, as the
    original LLaVA server does; InvalidRequest (400) for what it refuses."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequest("malformed JSON: nested too deeply", status=400) from None
    except ValueError as exc:
        raise InvalidRequest(malformed(exc), status=400) from None


def values_bound(raw: bytes | str) -> int:
    """At least as many values as the JSON text `raw` holds, keys counted: each but the first comes after a `,` `[`
    `{` or `:`. More when strings hold those characters (a prompt of CSV text): a bound, never a reason to refuse."""
    marks = (b",", b"[", b"{", b":") if isinstance(raw, bytes) else (",", "[", "{", ":")
    return 1 + sum(raw.count(mark) for mark in marks)


def is_heavy(raw: bytes | str, max_values: int = REQUEST_VALUES) -> bool:
    """Whether `raw` goes to a parser process: larger than LIGHT_BODY_BYTES, or maybe more values than one request's
    (`max_values` where it is fewer): a bulk's limit would leave 0.1 s of parsing on the event loop."""
    return len(raw) > LIGHT_BODY_BYTES or values_bound(raw) > min(max_values, REQUEST_VALUES)


def shape_refusal(value: Any, max_values: int) -> str | None:
    """Why a parsed body is refused for its shape (more than `max_values` values, nested deeper than MAX_DEPTH); None
    when it is not. Stops at the first array or object past the count: a crafted array is refused at once."""
    count, depth, level = 1, 0, [value]
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            return f"the body nests arrays and objects more than {MAX_DEPTH} deep; no valid request does"
        inner = []
        for container in level:
            members = container.values() if isinstance(container, dict) else container
            count += 2 * len(container) if isinstance(container, dict) else len(container)
            if count > max_values:
                return (f"the body holds more than {max_values} JSON values (objects, arrays, keys, strings, numbers), "
                        "the most a request may hold here; send such a request as several")
            inner.extend(member for member in members if isinstance(member, (dict, list)))
        level = inner
    return None


def parse_here(raw: bytes | str, max_values: int) -> tuple[Any, str | None]:
    """The value of the JSON text `raw` and None, or None and why it is refused (malformed, or `shape_refusal`)."""
    try:
        value = loads(raw)
    except InvalidRequest as exc:
        return None, exc.message
    refusal = shape_refusal(value, max_values) if isinstance(value, (dict, list)) else None
    return (None, refusal) if refusal else (value, None)


def parse_in_pool(raw: bytes | str, max_values: int) -> tuple[Any, str | None]:
    """(In a parser process.) `parse_here`, without the cyclic collector, which a parse makes no garbage for: it ran
    again and again over the millions of arrays and objects being made (64 MiB of `[[]]`: 7 s with it, 1.7 s
    without)."""
    gc.disable()
    try:
        return parse_here(raw, max_values)
    finally:
        gc.enable()


# prctl's option that sends the calling process a signal when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _start_parser(api_pid: int) -> None:
    """(In a parser process, as it starts.) Ctrl-C and a stop sent to the whole process group (systemd's) reach it
    too: the API stops its parsers itself, as it stops. And the parser dies with the API however the API ends (SIGKILL
    too): with forkserver's processes in between, parsers outlived every API killed, each holding the API's standard
    output open. Where the kernel refuses that (a sandbox), the parser exits once it finds the API gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        dies_with_the_api = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError):  # no prctl: not Linux
        dies_with_the_api = False
    if not dies_with_the_api:
        threading.Thread(target=_exit_without, args=(api_pid,), daemon=True).start()
    if os.getppid() != api_pid:  # the API died before that was set
        os._exit(0)


def _exit_without(api_pid: int) -> None:
    while os.getppid() == api_pid:
        time.sleep(1)
    os._exit(0)


def _outcome(outcome: tuple[Any, str | None]) -> Any:
    value, refusal = outcome
    if refusal:
        raise InvalidRequest(refusal, status=400)
    return value


class JsonParsers:
    """The parser processes, started with the API: spawned (not a fork of the API's threads and sockets), each the
    API's own child, which dies with it (`_start_parser`). Where they cannot start, heavy bodies are parsed in the
    API's own process, on a thread (as before they were), and the API says so as it starts."""

    def __init__(self, processes: int = PARSER_PROCESSES):
        self.processes = processes
        self.pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_parser, initargs=(os.getpid(),))

    async def start(self) -> None:
        """Start every process now, not with the first heavy body (each imports the API's models: a second)."""
        loop = asyncio.get_running_loop()
        try:
            self.pool = self._new_pool()
            await asyncio.gather(*(loop.run_in_executor(self.pool, parse_in_pool, b"{}", 1)
                                   for _ in range(self.processes)))
        except (OSError, ImportError, BrokenProcessPool) as exc:  # no /dev/shm for the pool's locks, no spawn
            log.warning("no JSON parser processes (%s: %s): heavy request bodies are parsed in this process, which "
                        "serves nothing else meanwhile", type(exc).__name__, exc)
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    async def parse(self, raw: bytes | str, max_values: int) -> Any:
        """The value of the JSON text `raw`, parsed in a parser process; InvalidRequest (400) for a body that is
        malformed or refused for its shape (`shape_refusal`), ApiError 503 when the process died parsing it."""
        pool = self.pool
        if pool is None:
            return _outcome(await asyncio.to_thread(parse_here, raw, max_values))
        try:
            return _outcome(await asyncio.wrap_future(pool.submit(parse_in_pool, raw, max_values)))
        except BrokenProcessPool:
            raise self._broken(pool, len(raw)) from None

    def parse_blocking(self, raw: bytes | str, max_values: int = REQUEST_VALUES) -> Any:
        """`parse` for code on a worker thread (a batch file's lines): a heavy body in a parser process, waited for,
        a light one here."""
        pool = self.pool
        if pool is None or not is_heavy(raw, max_values):
            return _outcome(parse_here(raw, max_values))
        try:
            return _outcome(pool.submit(parse_in_pool, raw, max_values).result())
        except BrokenProcessPool:
            raise self._broken(pool, len(raw)) from None

    def _broken(self, pool: ProcessPoolExecutor, size: int) -> ApiError:
        if self.pool is pool:
            log.error("a JSON parser process died (out of memory?) parsing a body of %d bytes; starting anew", size)
            self.pool = self._new_pool()
        return ApiError(503, "the request body could not be parsed: its parser process died; try again",
                        type="unavailable", code=ErrorCode.SERVER_ERROR)

    async def close(self) -> None:
        """Stop the parser processes, waiting for them (a parse under way: seconds at most). Not waited for, the
        interpreter's exit woke the pool's manager thread through a pipe closed already, printing a traceback
        ("Bad file descriptor") as Ctrl-C stopped the API."""
        if self.pool is not None:
            await asyncio.to_thread(self.pool.shutdown, wait=True, cancel_futures=True)


async def parse_json(parsers: JsonParsers, raw: bytes | str, max_values: int = REQUEST_VALUES) -> Any:
    """A request body's JSON value: a light body parsed here, a heavy one (`is_heavy`) in a parser process;
    InvalidRequest (400) for a body that is malformed or holds more than `max_values` values."""
    return await parsers.parse(raw, max_values) if is_heavy(raw, max_values) else loads(raw)


def sends_json(request: Request) -> bool:
    """Whether FastAPI reads the request's body as JSON: its Content-Type is application/json or application/*+json."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class ParsedJsonRequest(Request):
    """A request whose heavy JSON body was parsed already (`parsed`), which FastAPI's `await request.json()` gets."""

    parsed: Any = None
    has_parsed: bool = False

    async def json(self) -> Any:
        return self.parsed if self.has_parsed else await super().json()


async def with_parsed_body(request: Request, max_values: int) -> Request:
    """`request` for FastAPI to read its JSON body from: its body read, and parsed already in a parser process when it
    is heavy (InvalidRequest (400) for one malformed or over `max_values` values); a light one FastAPI parses itself,
    as before."""
    request = ParsedJsonRequest(request.scope, request.receive)
    raw = await request.body()
    if raw and sends_json(request) and is_heavy(raw, max_values):
        request.parsed = await request.app.state.json_parsers.parse(raw, max_values)
        request.has_parsed = True
    return request
