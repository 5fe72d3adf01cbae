"""Logging for every llava-queue process: plain text, or JSON lines that carry the job id.

`setup_logging` is called once by the `llava-queue` command before anything logs. With
`log_format="json"` each record is one JSON object on one line:

    {"time": "2026-11-24T10:00:00.123Z", "level": "INFO", "logger": "llava_queue.worker",
     "message": "job 3f2a... failed", "job_id": "3f2a...", "process": 4242, "thread": "..."}

A line is about a job when the job id is bound to the thread that logs it (for the duration of
each Celery task, `bind_job_ids_to_celery_tasks`), when the record carries `extra={"job_id": ...}`,
or when its message names a job id (32 hex digits: the engine thread serves many jobs at once and
names the one it logs about). Every such line gets the `job_id` field, so one `grep`/`jq` finds a
job's whole story across the API and the workers.
"""

import contextvars
import json
import logging
import math
import os
import re
import sys
import threading
import time
from datetime import UTC, datetime
from urllib.parse import unquote_plus

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("llava_queue_job_id", default=None)
_JOB_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
TEXT_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
# A query parameter in a logged path: its name, and its value up to the next parameter, a space, or the quote that
# closes the path in uvicorn's access lines (a quote inside the value is masked with it).
_QUERY_PARAMETER = re.compile(r"([?&])([^=&#\s\"]+)=([^&#\s]*?)(?=\"?(?:[&#\s]|$))")
# An Authorization header as a line of the handshake the `websockets` library logs at DEBUG ("< authorization: Bearer
# <key>"): the key was logged in clear.
_AUTHORIZATION = re.compile(r"(?i)\b((?:proxy-)?authorization:\s*(?:[\w-]+\s+)?)\S+")


def _mask_api_key(match: re.Match) -> str:
    """An API key sent in a query string (`?api_key=`, as browsers do on a WebSocket; uvicorn logs the path with
    it), masked under any spelling the API reads as that name: `api%5Fkey=` was taken, and logged in clear."""
    separator, name, _ = match.groups()
    return f"{separator}{name}=***" if unquote_plus(name).lower() == "api_key" else match.group(0)


def job_id_of(record: logging.LogRecord) -> str | None:
    """The job a log record is about, or None."""
    explicit = getattr(record, "job_id", None)
    if explicit:
        return str(explicit)
    bound = _job_id.get()
    if bound:
        return bound
    found = _JOB_ID.search(record.getMessage())
    return found.group(0) if found else None


class Throttle:
    """For a line repeated through an outage: `due()` is the number of calls it turned down since the last one it
    let through (0 for the first) once `seconds` have passed since then, else None. Safe from any thread."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._last = -math.inf
        self._turned_down = 0

    def due(self) -> int | None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.seconds:
                self._turned_down += 1
                return None
            turned_down, self._turned_down, self._last = self._turned_down, 0, now
            return turned_down


class RedactSecrets(logging.Filter):
    """Masks API keys sent in query strings (uvicorn's lines about `/v1/ws?api_key=...`) and in Authorization headers
    (the `websockets` library's handshake lines at DEBUG) in every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format: the handler reports it as logging does
            return True
        masked = _AUTHORIZATION.sub(r"\1***", _QUERY_PARAMETER.sub(_mask_api_key, message))
        if masked != message:
            record.msg, record.args = masked, ()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks included as a string)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = job_id_of(record)
        if job_id:
            line["job_id"] = job_id
        line["process"] = record.process
        line["thread"] = record.threadName
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


_LINE_BREAK = re.compile(r"\r\n?|\n|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


class TextFormatter(logging.Formatter):
    """The plain format, with `[job ID]` added when the job is known but the message does not name it."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        job_id = job_id_of(record)
        if job_id and job_id not in record.message:
            text += f" [job {job_id}]"
        # A line break in the message (a client's text quoted in it: a path, a name) goes on an indented line: at the
        # start of one, it could pass for an entry of its own, a forged one. (A traceback follows, as logging adds it.)
        return _LINE_BREAK.sub(lambda brk: "\n    " if brk.group() == "\n" else repr(brk.group())[1:-1], text)


def setup_logging(log_format: str = "text", level: str | int = "INFO") -> None:
    """Send every process's logs to stderr in `log_format` ("text" or "json"); safe to call again."""
    if log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # uvicorn's own loggers propagate to this handler (the API runs uvicorn with log_config=None).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # Python warnings (Celery's "running the worker with superuser privileges", torch's) are log lines too: in JSON
    # they were several lines of plain text on stderr among the JSON ones.
    logging.captureWarnings(True)
    if log_format == "json":
        # The model loader's progress bars ("Loading weights: 36%|...") are not lines a log collector can read;
        # read by huggingface_hub when it is first imported, after this, here or in a process started from here.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def celery_worker_arguments(log_format: str) -> list[str]:
    """What the worker passes Celery, before its `worker` command, for `log_format`. Celery prints its banner (the
    queues, the concurrency, 20 lines of ASCII art) and its shutdown notices ("worker: Warm shutdown (MainProcess)")
    on stdout, not through logging: in JSON the banner is left out (the worker logs what it says in its own start-up
    line) and the notices become log lines."""
    if log_format != "json":
        return []
    from celery.apps import worker

    say = logging.getLogger("celery.apps.worker")
    # Celery says these in its signal handlers: logging there is safe, its handler's lock being re-entrant.
    worker.safe_say = lambda message, file=None: say.info("%s", message.strip())
    return ["--quiet"]


def bind_job_ids_to_celery_tasks() -> None:
    """Tag every line a Celery task thread logs with the job id the task carries (its first argument)."""
    from celery import signals

    # By task and thread: a job handed back as its worker stops can be delivered to the same worker again, its task
    # id the job id, while its first task is still ending on another thread (whose token, overwritten, was then reset
    # in the wrong context: ValueError).
    tokens: dict[tuple[str, int], contextvars.Token] = {}

    def on_prerun(task_id=None, args=None, **_):
        if args and isinstance(args[0], str) and _JOB_ID.fullmatch(args[0]):
            tokens[task_id, threading.get_ident()] = _job_id.set(args[0])

    def on_postrun(task_id=None, **_):
        token = tokens.pop((task_id, threading.get_ident()), None)
        if token is not None:
            _job_id.reset(token)

    signals.task_prerun.connect(on_prerun, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
