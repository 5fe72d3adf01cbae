"""Offline batch evaluation: `POST /v1/batches` runs a JSONL file of questions or OpenAI requests.

The file comes as an upload (multipart `file`), as an uploaded file's id (`input_file_id`, see
`POST /v1/files`), or as a path under the server's data roots (`input_path`). Every line that
can run becomes a job on the `batch` queue, which workers take only when no interactive job
waits. Results come back in the input's order: `GET /v1/batches/{id}/output` (the original's
answers file, or OpenAI's batch output) and `/errors` (the lines that failed, with why), also
as OpenAI's `output_file_id` / `error_file_id` at `GET /v1/files/{id}/content` once the batch has ended.
"""

import asyncio
import io
import itertools
import json
import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, IO, Literal

import redis
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ConfigDict, Field, StringConstraints

from api.batch_intake import CHAT_COMPLETIONS, Intake, survey
from api.deps import ApiKey, AppSettings, CeleryApp, Registry, Store
from api.errors import MODEL_NOT_FOUND, ApiError, error_body, log_damaged
from api.json_bodies import REQUEST_VALUES, JsonParsers, is_heavy
from api.routes.models import returning_models, served_models
from api.routes.openai import OpenAIRoute, completion_of, job_error
from api.submission import admission_lock, check_room
from shared.batches import (ABANDONED_ERROR, BATCH_ID, FINAL_STATUSES, BatchStore, DamagedBatch, answer_id_of,
                            ended_at, new_batch_id, window_seconds)
from shared.dataroot import PathRefused, resolve_data_path
from shared.jobs import JobStore
from shared.protocol import ErrorCode, InvalidRequest, context_overflowed, parse_request
from shared.settings import Settings
from shared.vqa import EvalParams, answer_line, answer_record

log = logging.getLogger("llava_queue.api")

# Invalid requests are answered 400, as OpenAI does: the `openai` package raised UnprocessableEntityError for its 422.
router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=OpenAIRoute)

JSONL = "application/jsonl"
# Output files of a batch are named after it: file-<batch id>-output / -errors.
OUTPUT_FILE = "file-{}-output"
ERROR_FILE = "file-{}-errors"
# Either of them: (the batch id, "output" | "errors").
BATCH_FILE = re.compile(rf"file-({BATCH_ID.pattern})-(output|errors)")
# The largest `offset` of a batch's lines page: past any batch (Redis' list indexes are 64-bit; an offset near
# that end answered 503 as if Redis were away).
MAX_LINE_OFFSET = 2**31


# What only a question file's lines run with (`EvalParams`, and where their images are).
_QUESTION_FILE_SETTINGS = frozenset(EvalParams.model_fields) | {"image_folder"}


class BatchCreate(EvalParams):
    """A batch: where its file is, and for question files the original's evaluation parameters
    (model, conv_mode, temperature, top_p, num_beams = 1, max_new_tokens, seed) and image folder."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str | None = Field(None, max_length=200, description="an uploaded file (POST /v1/files)")
    input_path: str | None = Field(None, max_length=4096, description="a file under the server's data roots")
    endpoint: Literal["/v1/chat/completions"] | None = Field(None, description="OpenAI's; OpenAI lines' url")
    completion_window: str = Field("24h", max_length=16, pattern=r"^[0-9]{1,7}[smhd]$",
                                   description="lines not started by then expire")
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[Annotated[str, StringConstraints(max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = Field(None, max_length=16)
    image_folder: str | None = Field(None, max_length=4096, description="question files: where `image` files "
                                                                         "are, under the data roots")


def batch_store(request: Request | Any) -> BatchStore:
    """The batches and files of the caller's API key (with keys off, everyone's)."""
    settings: Settings = request.app.state.settings
    return BatchStore(request.app.state.store, settings.batch_ttl_seconds, getattr(request.state, "api_key", None),
                      settings.max_file_bytes_per_key)


def batch_not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"unknown batch id {batch_id!r} (it never existed, or it expired)", type="not_found",
                    param="batch_id", code=ErrorCode.NOT_FOUND)


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _failed(record: dict[str, Any]) -> int:
    """The batch's lines that did not succeed (OpenAI's `request_counts.failed`: the lines of its errors file)."""
    return record["failed"] + record["cancelled"] + record["expired"] + record["invalid"]


def batch_file_name(batch_id: str, errors: bool) -> str:
    """The id of a batch's errors (or output) file."""
    return (ERROR_FILE if errors else OUTPUT_FILE).format(batch_id)


def batch_file_id(record: dict[str, Any], errors: bool) -> str | None:
    """The errors (or output) file id the batch object names: none until the batch has ended, nor for a file that
    would hold no line."""
    lines = _failed(record) if errors else record["completed"]
    return batch_file_name(record["id"], errors) if record["status"] in FINAL_STATUSES and lines else None


def batch_view(batches: BatchStore, record: dict[str, Any]) -> dict[str, Any]:
    """The batch object: OpenAI's fields, then llava-queue's (format, timings, tokens/s, time left)."""
    failed = _failed(record)
    errors = record["errors"]
    return {
        "id": record["id"], "object": "batch",
        "endpoint": (record.get("endpoint") or CHAT_COMPLETIONS) if record.get("format") == "openai" else None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": record.get("input_file_id") or None,
        "completion_window": record.get("completion_window", "24h"), "status": record["status"],
        "output_file_id": batch_file_id(record, errors=False),
        "error_file_id": batch_file_id(record, errors=True),
        **{name: _int(record[name]) for name in ("created_at", "in_progress_at", "expires_at", "finalizing_at",
                                                 "completed_at", "failed_at", "expired_at", "cancelling_at",
                                                 "cancelled_at")},
        "request_counts": {"total": record["total"], "completed": record["completed"], "failed": failed},
        "metadata": record["metadata"],
        "format": record.get("format") or None, "input_path": record.get("input_path") or None,
        "params": record["params"], "started_at": record["in_progress_at"], "ended_at": ended_at(record),
        # OpenAI's batch usage (its Responses-style names), plus llava-queue's earlier completion_tokens.
        "usage": {"input_tokens": record["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": record["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": record["prompt_tokens"] + record["completion_tokens"],
                  "completion_tokens": record["completion_tokens"]},
        **batches.progress(record),
    }


def damaged_view(batches: BatchStore, damaged: DamagedBatch) -> dict[str, Any]:
    """A batch whose record is damaged as a list shows it (`DamagedBatch.record`): its own read answers a 500."""
    log_damaged(f"{damaged.message}; listed as failed")
    return batch_view(batches, damaged.record())


def read_batch(batches: BatchStore, batch_id: str) -> dict[str, Any]:
    """The batch record, brought up to date (`settled`)."""
    record = batches.get(batch_id)
    if record is None:
        raise batch_not_found(batch_id)
    return settled(batches, record)


def settled(batches: BatchStore, record: dict[str, Any]) -> dict[str, Any]:
    """The record after what a read settles: lines still queued past the completion window expire, and a batch
    whose reader died fails, and one that failed has its lines ended (`BatchStore.end_lines`); read again if any of
    these happened (the record as it was if it expired meanwhile)."""
    batch_id = record["id"]
    # A dead reader first (the API process reading the file died: the lines it queued do not make a whole batch; the
    # lost-task sweep fails such a batch too, `BatchStore.fail_abandoned`): a batch cancelled while it was read
    # (`cancelling`, its lines never counted) whose window had passed was only looked at for lines to expire, and
    # stayed `cancelling` for good.
    if batches.abandoned(record):
        batches.fail(batch_id, ABANDONED_ERROR)
    elif "lines_to_end" in record:
        # Failed while it was read, its lines still being ended (by the process that failed it, or left part-way by
        # one that died): ended before it is shown, its counts and files as they stay.
        batches.end_lines(batch_id)
    elif record["status"] in ("in_progress", "cancelling") and record["expires_at"] and \
            record["expires_at"] < batches.store.clock():
        batches.store.expire_overdue()
    else:
        return record
    return batches.get(batch_id) or record


def _open_input(body: BatchCreate, upload: IO[bytes] | None, batches: BatchStore,
                settings: Settings) -> tuple[IO[bytes], dict[str, str]]:
    """The batch file, opened, and what the batch records about where it came from."""
    sources = [name for name, given in (("file", upload is not None), ("input_file_id", body.input_file_id),
                                        ("input_path", body.input_path)) if given]
    if len(sources) != 1:
        raise ApiError(400, "give the batch file exactly once: upload it as 'file', or name an uploaded file "
                            f"('input_file_id') or a server path ('input_path'); got {sources or 'none'}",
                       param="input_file_id")
    if upload is not None:
        return upload, {}
    if body.input_file_id:
        if BATCH_FILE.fullmatch(body.input_file_id):
            # As on OpenAI, a file of another purpose is refused as such (it was "unknown", yet GET /v1/files has it).
            raise ApiError(400, f"input_file_id: {body.input_file_id!r} is a batch's output (purpose 'batch_output'); "
                                "a batch reads a file uploaded with purpose 'batch'", param="input_file_id")
        content = batches.file_content(body.input_file_id)
        if content is None:
            raise ApiError(404, f"unknown file id {body.input_file_id!r}", type="not_found",
                           param="input_file_id", code=ErrorCode.NOT_FOUND)
        return io.BytesIO(content), {"input_file_id": body.input_file_id}
    path = _server_path(body.input_path, "input_path", settings, folder=False)
    try:
        return path.open("rb"), {"input_path": body.input_path}
    except OSError as exc:
        raise ApiError(400, f"input_path: {body.input_path!r} cannot be read ({exc.strerror})",
                       param="input_path") from None


def _image_folder(body: BatchCreate, settings: Settings) -> Path | None:
    if body.image_folder is None:
        return None
    return _server_path(body.image_folder, "image_folder", settings, folder=True)


def _server_path(value: str, param: str, settings: Settings, *, folder: bool) -> Path:
    """The existing file (or folder) `value` names under the data roots; 403 outside them, 404 if missing,
    400 if the OS cannot look at it."""
    try:
        path = resolve_data_path(value, settings.data_roots, param)
    except PathRefused as exc:
        raise ApiError(403, str(exc), type="permission_denied", param=param) from None
    try:
        if path.is_dir() if folder else path.is_file():
            return path
    except OSError as exc:
        raise ApiError(400, f"{param}: {value!r} cannot be read ({exc.strerror})", param=param) from None
    kind = "folder" if folder else "file"
    raise ApiError(404, f"{param}: no {kind} {value!r} under the data roots", type="not_found", param=param,
                   code=ErrorCode.NOT_FOUND)


def admit_batch(store: JobStore, batches: BatchStore, batch_id: str, lines: int, owner: str | None) -> None:
    """The queue limit and the key's quota (`check_room`) for a batch's `lines`, with the places other batches being
    read have yet to fill counted as taken (in the queues, and in the key's quota for the key's batches), and this
    batch's held until its file is read (`BatchStore.reserve`); 429 (400) when they do not fit."""
    quota = bool(owner and store.max_queued_per_owner)
    # Under the lock submissions take (on any API process): a submission counting the queues while recording its jobs
    # would not see this batch's places, nor this batch its jobs.
    with admission_lock(store):
        queued, owned = batches.reserve(batch_id, lines) if store.max_queued or quota else (0, 0)
        if quota:
            owned += store.owner_queued(owner, at_least=store.max_queued_per_owner - lines - owned + 1)
        try:
            check_room(store, queued, lines, owner, owned)
        except ApiError:
            batches.release(batch_id)
            raise


def read_file(intake: Intake, stream: IO[bytes]) -> None:
    """Read the batch's file into jobs, and send them to the workers once it is all read: a queue (or Redis) that goes
    away part-way fails the batch (its lines are cancelled), and none of its lines ran meanwhile."""
    try:
        intake.read(stream)
        if intake.status == "validating":
            intake.send()
    except (ApiError, redis.RedisError):
        try:
            intake.batches.fail(intake.batch_id, {"code": "unavailable", "message": "the queue was unavailable "
                                                  "while reading", "param": None, "line": intake.total})
        except redis.RedisError:
            pass  # Still away: a read fails the batch as abandoned once its reader's lease lapses (`settled`).
        raise


def create(body: BatchCreate, upload: IO[bytes] | None, store: JobStore, batches: BatchStore, celery,
           registry, settings: Settings, owner: str | None, parsers: JsonParsers | None = None) -> dict[str, Any]:
    """Check the request, read the file into jobs (the batch is `validating` meanwhile), start the batch. A heavy
    line is parsed by one of the API's `parsers`, as a heavy request body is."""
    try:
        window = window_seconds(body.completion_window)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="completion_window") from None
    if window > settings.batch_ttl_seconds:
        # The batch and its results would expire while its lines still wait for the window.
        raise ApiError(400, f"completion_window {body.completion_window!r} is longer than a batch is kept "
                            f"({settings.batch_ttl_seconds} s, BATCH_TTL_SECONDS)", param="completion_window")
    image_folder = _image_folder(body, settings)
    live = served_models(registry.workers())
    # Lines for a model whose workers are away for now are queued for them, as lines wait for busy workers.
    served = live + sorted(returning_models(registry, live))
    if body.model is not None and body.model not in served:
        raise ApiError(404, f"the model {body.model!r} is not served here (live workers serve: {live or 'none'})",
                       param="model", code=MODEL_NOT_FOUND)
    stream, source = _open_input(body, upload, batches, settings)
    with stream:
        lines, file_format = survey(stream, settings.max_body_bytes, parsers)
        # A file without a JSON object line (a pretty-printed JSON file) tells no format: OpenAI's `endpoint` does, so
        # that its errors file has the OpenAI error lines its caller reads (they were a question file's, endpoint null).
        file_format = file_format or ("openai" if body.endpoint else None)
        if lines > settings.batch_max_lines:
            raise ApiError(400, f"the file has {lines} lines; a batch holds at most {settings.batch_max_lines}",
                           param="file")
        question_settings = sorted(body.model_fields_set & _QUESTION_FILE_SETTINGS)
        if file_format == "openai" and question_settings:
            # They were recorded as the batch's params, and each line ran with its own body's.
            raise ApiError(400, f"{', '.join(question_settings)}: these apply to question files; the lines of an "
                                "OpenAI batch file carry their own (in each line's body)", param=question_settings[0])
        batch_id = new_batch_id()
        admit_batch(store, batches, batch_id, lines, owner)
        try:
            params = EvalParams.model_validate(body.model_dump(include=set(EvalParams.model_fields)))
            now = store.clock()
            batches.create(batch_id, {**source, "endpoint": body.endpoint or CHAT_COMPLETIONS,
                                      "completion_window": body.completion_window, "expires_at": repr(now + window),
                                      "metadata": body.metadata,
                                      "params": None if file_format == "openai" else params.model_dump(),
                                      "image_folder": body.image_folder or ""})
            intake = Intake(store, batches, celery, settings, batch_id, params, image_folder, served, window, owner,
                            format=file_format, parsers=parsers)
            read_file(intake, stream)
        finally:
            batches.release(batch_id)
    errors = intake.errors or ([] if intake.total else [{"code": "empty_file", "message": "the file has no lines",
                                                         "param": "file", "line": None}])
    status = batches.activate(batch_id, intake.total, intake.invalid, errors, intake.format or "llava")
    if status == "missing":
        raise batch_lost(batches, intake)
    if status in ("failed", "cancelling", "cancelled") and intake.total > intake.invalid:
        # Cancelled while it was read, or failed as abandoned while this slow reader went on (its lease lapsed; after a
        # cancel, that ended it `cancelled`): the jobs of the lines read since the cancel (or of every line it has) go
        # too. (Lines read once it was final are not its: `Intake._enqueue` cancelled their jobs.) Those of a batch that
        # failed meanwhile end first, as they do in `BatchStore.fail`, if the read that failed it is not done with them.
        batches.end_lines(batch_id)
        batches.cancel_jobs(batch_id)
    record = batches.get(batch_id)
    if record is None:
        raise batch_lost(batches, intake)  # gone since
    return batch_view(batches, record)


def batch_lost(batches: BatchStore, intake: Intake) -> ApiError:
    """The batch's record went while its file was read (deleted, or evicted by a Redis short of memory): the jobs of
    its lines are cancelled (none may run for a batch nobody can read), and the request fails as one the server could
    not complete, a 500 `server_error`, as OpenAI answers a failure on its side. No 4xx: the request was good, and the
    client (the openai package retries a 5xx) should submit it again; nothing of this batch runs or is listed."""
    batches.cancel_jobs(intake.batch_id, intake.job_ids)
    log.error("batch %s: its record in Redis went while its file was read (deleted, or evicted: is Redis short of "
              "memory?); the batch is not created, its %d jobs are cancelled", intake.batch_id, len(intake.job_ids))
    return ApiError(500, f"the batch's record ({intake.batch_id}) was lost from the job store while its file was read "
                         "(deleted, or evicted from Redis); its lines will not run; submit the batch again",
                    type="server_error", code=ErrorCode.SERVER_ERROR)


async def _parse_create(request: Request) -> tuple[BatchCreate, Any]:
    """The request's parameters, and its uploaded file (multipart) if any."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            fields = {name: value for name, value in form.multi_items() if name != "file"}
            if isinstance(fields.get("metadata"), str):
                try:
                    fields["metadata"] = json.loads(fields["metadata"])
                except (ValueError, RecursionError):  # too deep a nesting raises the latter
                    raise InvalidRequest("metadata: give a JSON object of strings", "metadata") from None
            if upload is not None and isinstance(upload, str):
                raise InvalidRequest("file: send the batch file as a file part", "file")
            return parse_request(fields, BatchCreate), upload
        raw = await request.body()
        if is_heavy(raw, REQUEST_VALUES):  # (a light body pydantic parses, as before)
            raw = await request.app.state.json_parsers.parse(raw, REQUEST_VALUES)
            if not isinstance(raw, dict):
                raise InvalidRequest("the body must be a JSON object")
        return parse_request(raw, BatchCreate), None
    except InvalidRequest as exc:
        raise ApiError(400, exc.message, param=exc.param) from None


_CREATE_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": BatchCreate.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"},
        **{name: {"type": "string"} for name in BatchCreate.model_fields if name != "metadata"}}}}}}}


@router.post("", openapi_extra=_CREATE_DOC, responses={
    403: {"description": "A server path outside the data roots (or none configured)"},
    404: {"description": "An unknown file, path or model"},
    429: {"description": "The batch would take the queue past its limit"}})
async def create_batch(request: Request, store: Store, celery: CeleryApp, registry: Registry, settings: AppSettings,
                       api_key: ApiKey) -> dict:
    """Start a batch from a JSONL file: original question lines or OpenAI batch lines.

    JSON `{"input_file_id" | "input_path", ...parameters}`, or multipart with the file as `file`
    and the parameters as fields. Returns the batch object once every line is read and queued.
    """
    body, upload = await _parse_create(request)
    batches = batch_store(request)
    try:
        return await asyncio.to_thread(create, body, upload.file if upload is not None else None, store, batches,
                                       celery, registry, settings, api_key, request.app.state.json_parsers)
    finally:
        if upload is not None:
            await upload.close()


@router.get("")
def list_batches(request: Request, limit: int = Query(20, ge=1, le=100),
                 after: str | None = Query(None, max_length=200)) -> dict:
    """Batches, newest first (OpenAI's list shape: `data`, `first_id`, `last_id`, `has_more`)."""
    batches = batch_store(request)
    records, more = batches.list(limit, after)
    data = [_listed_view(batches, record) for record in records]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def _listed_view(batches: BatchStore, record: dict[str, Any] | DamagedBatch) -> dict[str, Any]:
    """A batch as the list shows it; a damaged one (its record, or the lines `settled` ends) as its own read answers
    (`damaged_view`): raised, it failed the whole list."""
    if not isinstance(record, DamagedBatch):
        try:
            return batch_view(batches, settled(batches, record))
        except DamagedBatch as damaged:
            record = damaged
    return damaged_view(batches, record)


@router.get("/{batch_id}")
def get_batch(batch_id: str, request: Request) -> dict:
    """The batch: status, request counts, timestamps, tokens/s and an estimate of the seconds left."""
    batches = batch_store(request)
    return batch_view(batches, read_batch(batches, batch_id))


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: str, request: Request) -> dict:
    """Cancel a batch: queued lines end `cancelled`, running ones leave their engine batch at the next step. As
    OpenAI's, a batch still `validating` can be cancelled: its file is read no further."""
    batches = batch_store(request)
    read_batch(batches, batch_id)  # another key's batch is unknown to this one
    status = batches.request_cancel(batch_id)
    if status == "not:missing":
        raise batch_not_found(batch_id)
    if status.startswith("not:"):
        raise ApiError(409, f"batch {batch_id} is {status[4:]}; only a batch being read or in progress can be "
                            "cancelled",
                       type="conflict", param="batch_id")
    if status == "cancelling":
        batches.cancel_jobs(batch_id)
    return batch_view(batches, read_batch(batches, batch_id))


@router.get("/{batch_id}/lines")
def batch_lines(batch_id: str, request: Request, store: Store, offset: int = Query(0, ge=0, le=MAX_LINE_OFFSET),
                limit: int = Query(100, ge=1, le=1000)) -> dict:
    """Each line's job and state: `{line, job_id, status, started_at, finished_at, error}` in file order."""
    batches = batch_store(request)
    read_batch(batches, batch_id)
    data = []
    # The page alone is read: reading (and skipping) every line and result before it made a page at the end of a
    # 50,000-line batch take seconds and hundreds of MB from Redis.
    for _, entry, result in itertools.islice(batches.lines(batch_id, chunk=limit, start=offset), limit):
        if result is None and entry.get("job"):
            job = store.get(entry["job"])
            result = {name: job.get(name) for name in ("status", "started_at", "finished_at", "error")} if job \
                else {"status": "unknown"}
        elif result is None:
            result = {"status": "invalid", "error": entry["error"]["message"]}
        data.append({"line": entry["line"], "job_id": entry.get("job"), "status": result.get("status"),
                     "started_at": result.get("started_at"), "finished_at": result.get("finished_at"),
                     "error": result.get("error") or None})
    return {"object": "list", "data": data}


# Output files, assembled from the batch's lines and results in file order.
def _llava_line(batch_id: str, entry: dict, result: dict | None) -> tuple[str | None, str | None]:
    if "error" in entry:
        return None, _error_line(entry, entry["error"]["message"], ErrorCode.INVALID_REQUEST, "invalid")
    if result is None:
        return None, None
    if result["status"] == "succeeded" and context_overflowed(result["text"], result["completion_tokens"]):
        return None, _error_line(entry, f"the question does not fit the model's context ({result['prompt_tokens']} "
                                        "prompt tokens)", ErrorCode.INVALID_REQUEST, "failed")
    if result["status"] == "succeeded":
        record = answer_record(entry["question_id"], entry["prompt"], result["text"], result["model"],
                               answer_id_of(entry["job"]))
        return answer_line(record), None
    return None, _error_line(entry, result["error"], result["error_code"], result["status"])


def _error_line(entry: dict, error: str, error_code: int, status: str) -> str:
    return json.dumps({"line": entry["line"], "question_id": entry.get("question_id"), "status": status,
                       "error": error, "error_code": error_code}) + "\n"


_UNRUN = {"cancelled": ("batch_cancelled", "This request was cancelled with its batch before it ran."),
          "expired": ("batch_expired", "This request could not be executed before the completion window expired.")}


def _request_id(batch_id: str, entry: dict) -> str:
    """A line's `id` in OpenAI's output and errors files: its job's id, or for a line refused when it was read (no
    job), one made from the batch's id and the line's number, the same at every read of the file. As OpenAI's, unique
    per request: it was `batch_req_<line number>`, the same in every batch."""
    job_id = entry.get("job") or uuid.uuid5(uuid.NAMESPACE_URL, f"llava-queue:{batch_id}/line/{entry['line']}").hex
    return f"batch_req_{job_id}"


def _openai_line(batch_id: str, entry: dict, result: dict | None) -> tuple[str | None, str | None]:
    job_id = entry.get("job")
    line = {"id": _request_id(batch_id, entry), "custom_id": entry.get("custom_id")}
    if "error" in entry:
        error = entry["error"]
        if error["param"] in ("custom_id", "method", "url", "body") or entry.get("custom_id") is None:
            line.update(response=None,
                        error={"code": "invalid_line", "message": error["message"], "line": entry["line"]})
        else:
            line.update(response={"status_code": error["status_code"], "request_id": None,
                                  "body": error_body(error["message"], "invalid_request_error", error["param"],
                                                     error.get("code", ErrorCode.INVALID_REQUEST))}, error=None)
        return None, json.dumps(line) + "\n"
    if result is None:
        return None, None
    if result["status"] in _UNRUN and not result.get("started_at"):
        code, message = _UNRUN[result["status"]]
        line.update(response=None, error={"code": code, "message": message})
        return None, json.dumps(line) + "\n"
    failure = job_error(result)
    if failure is None:
        body = completion_of(result, f"chatcmpl-{job_id}", entry["model"], int(result["finished_at"]))
        line.update(response={"status_code": 200, "request_id": job_id, "body": body.model_dump()}, error=None)
        return json.dumps(line) + "\n", None
    line.update(response={"status_code": failure.status, "request_id": job_id,
                          "body": error_body(failure.message, failure.type, failure.param, failure.code)}, error=None)
    return None, json.dumps(line) + "\n"


def _file_lines(batches: BatchStore, record: dict[str, Any],
                errors: bool) -> Iterator[tuple[int, dict[str, Any], dict[str, Any] | None, str]]:
    """(line number, line entry, result, its line in the file) for each line of the output (or errors) file, in input
    order."""
    convert = _openai_line if record.get("format") == "openai" else _llava_line
    for number, entry, result in batches.lines(record["id"]):
        line = convert(record["id"], entry, result)[1 if errors else 0]
        if line is not None:
            yield number, entry, result, line


def output_lines(batches: BatchStore, record: dict[str, Any], errors: bool) -> Iterator[str]:
    """The batch's output file (answers, or OpenAI's output) or its errors file, line by line in input order."""
    return (line for *_, line in _file_lines(batches, record, errors))


def delete_output(batches: BatchStore, record: dict[str, Any], errors: bool) -> bool:
    """Delete the batch's output (or errors) file: the lines' results it shows go, and their jobs' records (a line
    refused when the file was read keeps its reason, which the batch's `errors` lists too); False if it was deleted
    already."""
    ended = [(number, entry["job"]) for number, entry, result, _ in _file_lines(batches, record, errors)
             if result is not None]
    return batches.delete_output(record["id"], file_kind(errors), [number for number, _ in ended],
                                 [job_id for _, job_id in ended])


def file_kind(errors: bool) -> str:
    """The name of a batch's output file kind: "errors" or "output" (its field `<kind>_deleted_at` once deleted)."""
    return "errors" if errors else "output"


def file_deleted(file_id: str) -> ApiError:
    return ApiError(404, f"file {file_id!r} was deleted", type="not_found", param="file_id", code=ErrorCode.NOT_FOUND)


def streamed(lines: Iterator[str]) -> StreamingResponse:
    """A file sent as it is read, its first line read before the answer starts: damage found there (`DamagedBatch`:
    the batch's lines or results of another type, or an entry that is none) is the 500 that names it, not an answer
    cut off after its 200."""
    first = next(lines, None)
    return StreamingResponse(itertools.chain([] if first is None else [first], lines), media_type=JSONL)


def output_response(batches: BatchStore, batch_id: str, errors: bool) -> StreamingResponse:
    record = read_batch(batches, batch_id)
    if record.get(f"{file_kind(errors)}_deleted_at"):
        raise file_deleted(batch_file_name(batch_id, errors))
    return streamed(output_lines(batches, record, errors))


@router.get("/{batch_id}/output", response_class=StreamingResponse,
            responses={200: {"content": {JSONL: {}}, "description": "One line per answered line, in input order"}})
def batch_output(batch_id: str, request: Request) -> StreamingResponse:
    """The answers so far: the original's answers file for question files (`question_id`, `prompt`, `text`,
    `answer_id`, `model_id`, `metadata`), OpenAI's batch output for OpenAI lines; in input order."""
    return output_response(batch_store(request), batch_id, errors=False)


@router.get("/{batch_id}/errors", response_class=StreamingResponse,
            responses={200: {"content": {JSONL: {}}, "description": "One line per failed line, in input order"}})
def batch_errors(batch_id: str, request: Request) -> StreamingResponse:
    """The lines that failed so far, with why (OpenAI's error lines for OpenAI batches)."""
    return output_response(batch_store(request), batch_id, errors=True)
