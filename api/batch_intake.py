"""Reading a batch file into jobs: line by line, a few hundred lines per bulk write of job records; the jobs are
sent to the workers once the whole file is read, so that a batch that cannot be read to its end runs none of its lines.

Two formats, told apart by the first line that is a JSON object (`custom_id` or `body`: OpenAI's):

* the original question file (`llava/eval/model_vqa.py`): `{"question_id", "image", "text"}`,
  run with the batch's parameters (shared/vqa.py makes the prompt and the job);
* the OpenAI Batch input: `{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}`,
  whose body is checked and converted exactly as `POST /v1/chat/completions` does.

A line that cannot run (bad JSON, a missing or bad field, an image that is missing, unreadable
or outside the data roots) is recorded with the reason and becomes no job; the others run.
"""

import base64
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from celery import Celery
from pydantic import ValidationError

from api.errors import MODEL_NOT_FOUND, ApiError, answered_code, log_damaged
from api.json_bodies import JsonParsers
from api.routes.openai import parse_chat_request
from api.submission import check_unicode, damaged_images, queue_unavailable
from shared.celery_app import BATCH_QUEUE, send_many, task_queue
from shared.batches import FINAL_STATUSES, BatchStore
from shared.dataroot import PathRefused, resolve_in_folder
from shared.jobs import JobStore
from shared.protocol import (ErrorCode, GenerateRequest, InvalidRequest, check_images, describe_validation_error,
                             one_submission)
from shared.settings import Settings
from shared.vqa import EvalParams, Question, question_job, stated_question_id

log = logging.getLogger("llava_queue.api")

CHAT_COMPLETIONS = "/v1/chat/completions"
# Lines per bulk write: one pipelined write of their job records and entries ...
CHUNK_LINES = 500
# ... or fewer, once their jobs hold this many bytes of images and prompts: a chunk's jobs, and the pipeline that
# writes them, are in the API's memory at once, twice over (150 lines of 2 MB images took 0.9 to 1.2 GB; 500 lines of
# 20 MB ones would take 20 GB).
CHUNK_BYTES = 16 * 1024 * 1024
# Line errors kept in the batch record's `errors` (all of them are in the errors file).
MAX_LISTED_ERRORS = 100
# Images read for earlier lines, kept for the lines that name them again (an evaluation asks several questions of each
# image): this many at most, of at most this many bytes together.
_IMAGE_CACHE_SIZE = 64
_IMAGE_CACHE_BYTES = 16 * 1024 * 1024
# How much of a line too long to run is read at a time, to skip it.
_SKIP_BYTES = 1 << 20
# Keys that make a line an OpenAI one: not `custom_id` alone, so that a first line without it (a typo) does not make
# the whole file a question file. No question file has a request `body`.
_OPENAI_KEYS = {"custom_id", "body"}


class LineRefused(Exception):
    """A line that cannot run: why, and for OpenAI lines the HTTP status and error the call would have had."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None,
                 code: int | str = ErrorCode.INVALID_REQUEST):
        super().__init__(message)
        self.message, self.status_code, self.param = message, status_code, param
        self.code = answered_code(code)


def _unexpected(line_number: int, exc: Exception) -> LineRefused:
    """A line the reader failed on in a way no check foresaw: it fails alone (a 500, logged with its traceback); the
    batch's other lines run."""
    log.error("batch line %d could not be read", line_number, exc_info=exc)
    return LineRefused(f"line {line_number} could not be read ({type(exc).__name__}: {exc})", 500,
                       code=ErrorCode.SERVER_ERROR)


def file_lines(stream: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The lines of a binary file; None for a line longer than `limit` bytes, which is read no further than that
    (a server file may hold a line of gigabytes, such as a training set's JSON array, that no job could take)."""
    while line := stream.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while (rest := stream.readline(_SKIP_BYTES)) and not rest.endswith(b"\n"):
            pass
        yield None


# Parsers of none: a caller that gives none (a test, a tool) parses every line here.
_NO_PARSERS = JsonParsers()


def survey(stream: IO[bytes], limit: int, parsers: JsonParsers | None = None) -> tuple[int, str | None]:
    """The non-blank lines of a seekable binary file (see `file_lines`), and its format as its reading will tell it
    (`line_format` of its first line that is a JSON object; None without one); the file is left at its start."""
    count, file_format = 0, None
    for line in file_lines(stream, limit):
        if line is None or line.strip():
            count += 1
            if file_format is None and line is not None:
                file_format = line_format(line, parsers)
    stream.seek(0)
    return count, file_format


def parse_line(raw: bytes, parsers: JsonParsers | None) -> Any:
    """A line's JSON value: a heavy one parsed by one of the API's `parsers` (api.json_bodies), as a heavy request
    body is (64 MiB of `[[]]` in a line held the API for 11 s, twice: once to tell the file's format, once to read it);
    InvalidRequest (400) for a line that is malformed, or holds more values than a request may."""
    return (parsers or _NO_PARSERS).parse_blocking(raw)


def line_format(raw: bytes, parsers: JsonParsers | None = None) -> str | None:
    """"openai" for a line that is a JSON object with OpenAI's keys, "llava" for another object, None otherwise."""
    try:
        line = parse_line(raw, parsers)
    except (InvalidRequest, ApiError):
        return None
    return object_format(line) if isinstance(line, dict) else None


def request_bytes(request: GenerateRequest) -> int:
    """About what a line's job holds in memory: its images (base64 or data: URLs) and its prompt, or its turns' text
    (an OpenAI line's: up to MAX_PROMPT_CHARS each, uncounted, 500 of them made a chunk of 200 MB)."""
    texts = [request.prompt or ""] + [message.text for message in request.messages or ()]
    return sum(map(len, texts)) + sum(map(len, request.all_images()))


def object_format(line: dict[str, Any]) -> str:
    """"openai" for a line with OpenAI's keys (`custom_id` or `body`), else "llava" (a question)."""
    return "openai" if _OPENAI_KEYS & line.keys() else "llava"


@dataclass
class Intake:
    """Turns the lines of one batch file into queued jobs on the `batch` queue."""

    store: JobStore
    batches: BatchStore
    celery: Celery
    settings: Settings
    batch_id: str
    params: EvalParams
    image_folder: Path | None
    served: list[str]
    deadline_seconds: float
    owner: str | None = None
    # "llava" or "openai": as the caller tells it (`survey`), or its first JSON object line (`object_format`).
    format: str | None = None
    total: int = 0
    invalid: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    # The batch's status as the last chunk written found it (see `BatchStore.add_lines`).
    status: str = "validating"
    # (job id, Celery queue) of every job recorded, sent by `send` once the file is read.
    _unsent: list[tuple[str, str]] = field(default_factory=list)
    # The ids of the jobs of every line the batch took, sent or not: cancelled if the batch's record goes meanwhile.
    job_ids: list[str] = field(default_factory=list)
    _custom_ids: set[str] = field(default_factory=set)
    _images: dict[Path, str | LineRefused] = field(default_factory=dict)
    _images_bytes: int = 0
    # Where a heavy line is parsed (`parse_line`); none: here.
    parsers: JsonParsers | None = None

    def read(self, stream: IO[bytes]) -> None:
        """Read every line, record the jobs of the good ones in chunks, record every line in order (`send` sends the
        jobs). Stops after a chunk that finds the batch no longer `validating` (cancelled, or failed as abandoned): the
        rest of a file its user gave up on is not queued only to be cancelled."""
        with one_submission():  # the file's images share one budget of decoding (`check_images`)
            self._read(stream)

    def _read(self, stream: IO[bytes]) -> None:
        entries: list[dict[str, Any]] = []
        jobs: list[tuple[int, GenerateRequest]] = []
        size = 0  # the bytes of the chunk's jobs (`request_bytes`)
        for line_number, raw in enumerate(file_lines(stream, self.settings.max_body_bytes), 1):
            if raw is not None and not raw.strip():
                continue
            number = self.total
            self.total += 1
            entry, request = self._line(number, line_number, raw)
            entries.append(entry)
            if request is None:
                self.invalid += 1
                if len(self.errors) < MAX_LISTED_ERRORS:
                    self.errors.append({"code": "invalid_line", "message": entry["error"]["message"],
                                        "param": entry["error"].get("param"), "line": line_number})
            else:
                jobs.append((len(entries) - 1, request))
                size += request_bytes(request)
            if len(entries) >= CHUNK_LINES or size >= CHUNK_BYTES:
                if self._enqueue(entries, jobs) != "validating":
                    return
                entries, jobs, size = [], [], 0
        if entries:
            self._enqueue(entries, jobs)

    def _enqueue(self, entries: list[dict[str, Any]], jobs: list[tuple[int, GenerateRequest]]) -> str:
        """Record the lines and their queued jobs; returns the batch's status (see `BatchStore.add_lines`). A batch
        that became final (or went) meanwhile takes none of them: their jobs are cancelled, and their errors not
        listed in its `errors` (its errors file does not hold them)."""
        first_line = self.total - len(entries)
        jobs = self._without_damaged_images(entries, jobs)
        ids = self.store.create_many(
            [request for _, request in jobs], "batch", deadline_seconds=self.deadline_seconds, owner=self.owner,
            extra=[{"batch": self.batch_id, "batch_line": first_line + index} for index, _ in jobs]) if jobs else []
        for (index, _), job_id in zip(jobs, ids):
            entries[index]["job"] = job_id
        self.status = self.batches.add_lines(self.batch_id, entries, self.format)
        if self.status in FINAL_STATUSES or self.status == "missing":
            self.store.cancel_many(ids)
            self.errors = [error for error in self.errors if error["line"] < entries[0]["line"]]
        else:
            self._unsent += [(job_id, task_queue(BATCH_QUEUE, request.model))
                             for job_id, (_, request) in zip(ids, jobs)]
            self.job_ids += ids
        return self.status

    def _without_damaged_images(self, entries: list[dict[str, Any]],
                                jobs: list[tuple[int, GenerateRequest]]) -> list[tuple[int, GenerateRequest]]:
        """The chunk's `jobs` but those holding an image whose stored copy is damaged (`damaged_images`): each such
        line fails alone, as a 500 that names the damage. Written with the chunk, its image failed the chunk's write,
        and so the whole batch, as "the queue was unavailable while reading", every time it was sent again."""
        damage = damaged_images(self.store, [request for _, request in jobs])
        for position, what in damage.items():
            entry = entries[jobs[position][0]]
            message = f"line {entry['line']}: {what}; an operator must delete the key"
            log_damaged(message)
            entry["error"] = {"message": message, "param": None, "status_code": 500,
                              "code": int(ErrorCode.SERVER_ERROR)}
            self.invalid += 1
            self.errors.append({"code": "invalid_line", "message": message, "param": None, "line": entry["line"]})
        if damage:
            # In line order, as the lines refused while read are listed; the first MAX_LISTED_ERRORS of them.
            self.errors = sorted(self.errors, key=lambda error: error["line"])[:MAX_LISTED_ERRORS]
        return [job for position, job in enumerate(jobs) if position not in damage]

    def send(self) -> None:
        """Send the jobs recorded to the workers (pipelined, a few hundred a round trip); a 503 if the broker
        refuses, part-way or not (the caller fails the batch, which cancels the jobs sent)."""
        try:
            send_many(self.celery, self._unsent, self.store.clock)
        except Exception as exc:
            raise queue_unavailable(exc) from exc
        self._unsent = []

    def _line(self, number: int, line_number: int,
              raw: bytes | None) -> tuple[dict[str, Any], GenerateRequest | None]:
        """The entry of the `number`th non-blank line (`line_number` in the file, blank lines counted; None if it is
        too long to read): what its output line needs, and its job request; or the entry with `error`."""
        entry: dict[str, Any] = {"line": line_number}
        try:
            if raw is None:
                raise LineRefused(f"line {line_number} is longer than {self.settings.max_body_bytes} bytes, more than "
                                  "a request may hold (MAX_BODY_BYTES); it is not read")
            try:
                # Without its line break: a line cut short was "not valid JSON: ... line 2 column 1" (of one line).
                line = parse_line(raw.rstrip(b"\r\n"), self.parsers)
            except InvalidRequest as exc:
                malformed = exc.message.removeprefix("malformed JSON: ")
                raise LineRefused(f"line {line_number} is not valid JSON: {malformed}" if malformed != exc.message
                                  else f"line {line_number}: {exc.message.replace('the body', 'the line')}") from None
            if not isinstance(line, dict):
                raise LineRefused(f"line {line_number} is not a JSON object")
            if self.format is None:
                self.format = object_format(line)
            request = self._openai_line(line, entry) if self.format == "openai" else self._question_line(line, entry)
            try:
                check_unicode(request)  # JSON's "\ud800" escape: no job can hold it
            except ApiError as exc:
                raise LineRefused(exc.message, param=exc.param) from None
            return entry, request
        except Exception as exc:  # noqa: BLE001 - one line that breaks the reader fails alone, not the batch
            refused = exc if isinstance(exc, LineRefused) else _unexpected(line_number, exc)
            entry["error"] = {"message": refused.message, "param": refused.param, "status_code": refused.status_code,
                              "code": refused.code}
            return entry, None

    def _question_line(self, line: dict[str, Any], entry: dict[str, Any]) -> GenerateRequest:
        # Not a float JSON cannot hold (1e400 reads as inf): written back as Infinity, it made the errors file JSON
        # that no strict parser reads.
        entry["question_id"] = stated_question_id(line)
        try:
            question = Question.model_validate(line)
        except ValidationError as exc:
            invalid = describe_validation_error(exc)
            raise LineRefused(invalid.message, param=invalid.param) from None
        entry["prompt"] = question.text
        image = self._image(question.image) if question.image is not None else None
        try:
            return question_job(question, self.params, image)
        except ValueError as exc:
            message = describe_validation_error(exc).message if isinstance(exc, ValidationError) else str(exc)
            raise LineRefused(message) from None

    def _image(self, name: str) -> str:
        """The base64 file of a question's image, read under the image folder; LineRefused says why not."""
        if self.image_folder is None:
            raise LineRefused(f"image {name!r}: this batch has no image_folder (images are read from a folder "
                              "under the server's data roots)", param="image")
        try:
            path = resolve_in_folder(self.image_folder, name, self.settings.data_roots, what="image")
        except PathRefused as exc:
            raise LineRefused(str(exc), status_code=403, param="image") from None
        cached = self._images.get(path)
        if cached is None:
            cached = self._images[path] = self._read_image(name, path)
            self._images_bytes += len(cached) if isinstance(cached, str) else 0
            while len(self._images) > _IMAGE_CACHE_SIZE or self._images_bytes > _IMAGE_CACHE_BYTES:
                oldest = self._images.pop(next(iter(self._images)))  # (this line's own, if alone over the bytes)
                self._images_bytes -= len(oldest) if isinstance(oldest, str) else 0
        if isinstance(cached, LineRefused):
            # A new one for each line: the cached one raised again took every such line's frames into its traceback,
            # and with them every line read (tens of thousands behind one missing image) until the file was read.
            raise LineRefused(cached.message, cached.status_code, cached.param, cached.code)
        return cached

    def _read_image(self, name: str, path: Path) -> str | LineRefused:
        try:
            if not path.is_file():
                return LineRefused(f"image {name!r}: no such file in the image folder", status_code=404,
                                   param="image")
            size = path.stat().st_size
            if (size + 2) // 3 * 4 > self.settings.max_image_bytes:
                return LineRefused(f"image {name!r}: {size} bytes is over the image size limit", param="image")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except OSError as exc:
            return LineRefused(f"image {name!r}: cannot be read ({exc.strerror})", param="image")
        try:
            check_images([data])
        except ValueError as exc:
            return LineRefused(f"image {name!r}: {str(exc).removeprefix('image 0 ')}", param="image")
        return data

    def _openai_line(self, line: dict[str, Any], entry: dict[str, Any]) -> GenerateRequest:
        custom_id = line.get("custom_id")
        entry["custom_id"] = custom_id if isinstance(custom_id, str) else None
        if not isinstance(custom_id, str) or not custom_id:
            raise LineRefused("custom_id: a non-empty string is required", param="custom_id")
        if custom_id in self._custom_ids:
            raise LineRefused(f"custom_id {custom_id!r} is used by an earlier line; each line needs its own",
                              param="custom_id")
        self._custom_ids.add(custom_id)
        if line.get("method", "POST") != "POST":
            raise LineRefused(f"method: only POST is supported, not {line.get('method')!r}", param="method")
        if line.get("url") != CHAT_COMPLETIONS:
            raise LineRefused(f"url: only {CHAT_COMPLETIONS} is supported, not {line.get('url')!r}", param="url")
        body = line.get("body")
        if not isinstance(body, dict):
            raise LineRefused("body: the chat completion request (a JSON object) is required", param="body")
        if body.get("stream"):
            raise LineRefused("body.stream: a batch line is answered whole; leave stream out", param="body.stream")
        try:
            chat, request = parse_chat_request(body)
        except ApiError as exc:
            raise LineRefused(exc.message, status_code=exc.status, param=exc.param, code=exc.code) from None
        if chat.model not in self.served:
            raise LineRefused(f"the model {chat.model!r} is not served here (live workers serve: "
                              f"{self.served or 'none'})", status_code=404, param="model", code=MODEL_NOT_FOUND)
        entry["model"] = chat.model
        return request
