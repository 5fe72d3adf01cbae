"""Request bodies read as JSON without stalling the event loop: a heavy body is parsed in a pool process.

`json.loads` and pydantic hold the GIL for as long as they run, on a thread too: 64 MiB of `[0,0,...]` held every
request and stream of the API for 1.5 s, of `[[],[],...]` for 11 s. A body that is large (LIGHT_BODY_BYTES), or
may hold more values than any valid request (a count of the bytes `[{,:` says so, cheaply: an upper bound, commas in
a prompt count too) goes to one of a few long-lived processes, which parses it, counts its values, and sends back
either the value or why it is refused: more values than any valid request holds, or nested deeper. The API then only
unpickles a bounded value (or a few long strings, images), which is fast. A light body is parsed where it was.
"""

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import multiprocessing
import os
import signal
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
# and `POST /v1/jobs/bulk`: as many jobs as it takes (10,000), each with every field, and one request's worth more
# (539,982). More than a route's limit is refused: no valid request holds as many.
MAX_BULK_JOBS = next(rule.max_length for rule in BulkJobRequest.model_fields["jobs"].metadata
                     if getattr(rule, "max_length", None) is not None)
BULK_VALUES = MAX_BULK_JOBS * JOB_VALUES + REQUEST_VALUES


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


def is_heavy(raw: bytes | str, max_values: int) -> bool:
    """Whether `raw` goes to a parser process: larger than LIGHT_BODY_BYTES, or maybe more than `max_values`."""
    return len(raw) > LIGHT_BODY_BYTES or values_bound(raw) > max_values


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
                return (f"the body holds more than {max_values} JSON values (objects, arrays, keys, strings, numbers); "
                        "no valid request holds as many")
            inner.extend(member for member in members if isinstance(member, (dict, list)))
        level = inner
    return None


def parse_in_pool(raw: bytes | str, max_values: int) -> tuple[Any, str | None]:
    """(In a parser process.) The value of the JSON text `raw` and None, or None and why it is refused."""
    # Without the cyclic collector, which a parse makes no garbage for: it ran again and again over the millions of
    # arrays and objects being made (64 MiB of `[[]]`: 7 s with it, 1.7 s without).
    gc.disable()
    try:
        value = loads(raw)
    except InvalidRequest as exc:
        return None, exc.message
    finally:
        gc.enable()
    refusal = shape_refusal(value, max_values) if isinstance(value, (dict, list)) else None
    return (None, refusal) if refusal else (value, None)


# prctl's option that sends the calling process a signal when its parent dies (linux/prctl.h).
_PR_SET_PDEATHSIG = 1


def _start_parser(api_pid: int) -> None:
    """(In a parser process, as it starts.) Ctrl-C reaches the whole process group: the API stops its parsers itself,
    as it stops. And the parser dies with the API however the API ends (SIGKILL too): with forkserver's processes in
    between, parsers outlived every API killed, each holding the API's standard output open."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the parser exits as its call queue closes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != api_pid:  # the API died before that was set
        os._exit(0)


class JsonParsers:
    """The parser processes, started with the API: spawned (not a fork of the API's threads and sockets), each the
    API's own child, which dies with it (`_start_parser`)."""

    def __init__(self, processes: int = PARSER_PROCESSES):
        self.processes = processes
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_parser, initargs=(os.getpid(),))

    async def start(self) -> None:
        """Start every process now, not with the first heavy body (each imports the API's models: a second)."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, parse_in_pool, b"{}", 1)
                               for _ in range(self.processes)))

    async def parse(self, raw: bytes | str, max_values: int) -> Any:
        """The value of the JSON text `raw`, parsed in a parser process; InvalidRequest (400) for a body that is
        malformed or refused for its shape (`shape_refusal`), ApiError 503 when the process died parsing it."""
        pool = self.pool
        try:
            value, refusal = await asyncio.get_running_loop().run_in_executor(pool, parse_in_pool, raw, max_values)
        except BrokenProcessPool:
            if self.pool is pool:
                log.error("a JSON parser process died (out of memory?) parsing a body of %d bytes; starting anew",
                          len(raw))
                self.pool = self._new_pool()
            raise ApiError(503, "the request body could not be parsed: its parser process died; try again",
                           type="unavailable", code=ErrorCode.SERVER_ERROR) from None
        if refusal:
            raise InvalidRequest(refusal, status=400)
        return value

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


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
