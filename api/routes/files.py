"""OpenAI's files, as far as batches need them: upload a batch file, list, read and delete files.

`POST /v1/files` (multipart `file`, `purpose` "batch") keeps the file in Redis for the batch TTL;
a batch names it as `input_file_id`. A batch's `output_file_id` and `error_file_id` name files
assembled from the batch when read (purpose "batch_output"). So the `openai` package's
`files.create`, `files.list`, `files.content`, `files.delete` and `batches.create` work against
llava-queue as they do against OpenAI.
"""

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from api.errors import ApiError, log_damaged
from api.routes.batches import (BATCH_FILE, ERROR_FILE, JSONL, OUTPUT_FILE, batch_file_id, batch_file_name,
                                batch_store, delete_output, file_deleted, file_kind, output_lines, settled, streamed)
from api.routes.openai import OpenAIRoute
from shared.batches import (FILES_SCAN_STEPS, FINAL_STATUSES, BatchStore, DamagedBatch, DamagedFile, FilesFull,
                            ended_at)
from shared.protocol import ErrorCode

# Invalid requests are answered 400, as OpenAI does (see api.routes.batches).
router = APIRouter(prefix="/v1/files", tags=["files"], route_class=OpenAIRoute)


class FileObject(BaseModel):
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: None = None
    # When it goes: BATCH_TTL_SECONDS after it was made (a batch's file as its batch ended: BATCH_END_LUA,
    # shared/jobs.py) or uploaded, as Redis expires either; it was null, which is OpenAI's "never expires".
    expires_at: int | None = None


def file_not_found(file_id: str) -> ApiError:
    return ApiError(404, f"unknown file id {file_id!r} (it never existed, or it expired)", type="not_found",
                    param="file_id", code=ErrorCode.NOT_FOUND)


def upload_object(batches: BatchStore, meta: dict[str, Any]) -> FileObject:
    """An upload's description (`BatchStore.save_file`'s), with when it expires."""
    return FileObject(**meta, expires_at=meta["created_at"] + batches.ttl_seconds)


def _batch_file(batches: BatchStore, file_id: str) -> tuple[dict[str, Any], bool] | None:
    """(the batch record, whether it is the errors file) of a batch's output or errors file; None if `file_id`
    names no batch file; 404 for a file deleted, one its batch object does not name (yet), or one of a batch unknown
    to the caller (expired, or another key's).

    As on OpenAI, a batch's file exists once the batch names it (`output_file_id`, `error_file_id`: it has ended, and
    the file holds a line): GET /v1/files/{id} and its content, the files list and DELETE agree with the batch object. A
    client that polls a batch until it names its output file, or that reads the file a list shows, never gets a
    partial one that changes under it; the answers so far are at GET /v1/batches/{id}/output."""
    match = BATCH_FILE.fullmatch(file_id)
    if not match:
        return None
    batch_id, kind = match.groups()
    record = batches.get(batch_id)
    if record is None:
        # Its batch expired, or is another key's: the file is unknown, as any other (it was "unknown batch id").
        raise file_not_found(file_id)
    record = settled(batches, record)
    if record.get(f"{kind}_deleted_at"):
        raise file_deleted(file_id)
    if batch_file_id(record, kind == "errors") != file_id:
        raise file_not_found(file_id)
    return record, kind == "errors"


def _batch_file_object(batches: BatchStore, record: dict[str, Any], errors: bool) -> FileObject:
    """A batch file's description. A finished batch's file no longer changes: its size is counted once, and kept."""
    size_field = f"{file_kind(errors)}_bytes"
    size = record.get(size_field)
    if size is None:
        size = sum(len(line.encode()) for line in output_lines(batches, record, errors))
        if record["status"] in FINAL_STATUSES:
            batches.keep_file_size(record["id"], file_kind(errors), size)
    name = batch_file_name(record["id"], errors)
    # Made, as OpenAI's, when the batch ended (it names the file from then on), and kept the TTL from then, as an
    # upload is from its upload (it went with the batch, the TTL after the batch's creation).
    made = int(ended_at(record) or record["created_at"])
    return FileObject(id=name, bytes=int(size), created_at=made, filename=f"{name}.jsonl", purpose="batch_output",
                      expires_at=made + batches.ttl_seconds)


def _listed(batches: BatchStore, file_id: str, records: dict[str, dict | None]) -> FileObject | None:
    """The description of a file the index names, if it is still there: an upload not expired, or a finished batch's
    file (one its batch object names) not deleted. `records` keeps the batches read, for their second file."""
    # A damaged file (an upload, or a batch: its record, lines or results) is left out, the other files listed: a
    # read of it answers the 500 that says why.
    try:
        return _listed_file(batches, file_id, records)
    except (DamagedBatch, DamagedFile) as damaged:
        if isinstance(damaged, DamagedBatch):
            records[damaged.batch_id] = None
        log_damaged(f"{damaged.message}; not listed")
        return None


def _listed_file(batches: BatchStore, file_id: str, records: dict[str, dict | None]) -> FileObject | None:
    """`_listed`, damage raised."""
    match = BATCH_FILE.fullmatch(file_id)
    if not match:
        meta = batches.file_meta(file_id)
        return upload_object(batches, meta) if meta else None
    batch_id, kind = match.groups()
    if batch_id not in records:
        record = batches.get(batch_id)
        records[batch_id] = settled(batches, record) if record else None
    record = records[batch_id]
    if record is None or record.get(f"{kind}_deleted_at"):
        return None
    if batch_file_id(record, kind == "errors") != file_id:
        return None  # not finished, or nothing in that file
    return _batch_file_object(batches, record, kind == "errors")


@router.get("")
def list_files(request: Request, background: BackgroundTasks, purpose: str | None = Query(None, max_length=64),
               limit: int = Query(10_000, ge=1, le=10_000), after: str | None = Query(None, max_length=200),
               order: Literal["asc", "desc"] = "desc") -> dict:
    """The caller's files, OpenAI's list (`data`, `first_id`, `last_id`, `has_more`): uploads (`purpose` "batch")
    and finished batches' output and errors files ("batch_output"), newest first (`order=asc`: oldest first),
    `limit` of them after the file id `after`."""
    batches = batch_store(request)
    # Uploads kept before the files index: a few steps of the database's one scan for them now, and the rest of it
    # after the answer (see `BatchStore.index_files`), not the whole keyspace before it.
    if not batches.index_files(FILES_SCAN_STEPS):
        background.add_task(batches.index_files)
    indexed = [(at, file_id) for file_id, at in batches.uploaded_files(scan_steps=0)]
    # A batch's files by when they were made (`created_at`, see `_batch_file_object`): when it ended. (Listed by the
    # batch's creation, they were out of created_at order: a client paging until a file older than it wants stopped
    # before one.) Only a batch that ended has files; one gone has none, nor one damaged, which `_listed` would leave
    # out (and at its creation time, a page's `after` naming its file went on from there, past newer files).
    ended = batches.ended_times([batch_id for batch_id, _ in batches.batch_index()])
    indexed += [(at, name.format(batch_id)) for batch_id, at in ended.items() for name in (OUTPUT_FILE, ERROR_FILE)]
    indexed.sort(reverse=order == "desc")
    ids = [file_id for _, file_id in indexed]
    if after in ids:
        start = ids.index(after) + 1
    elif after:
        # The indexes keep a file deleted or expired until it is older than the TTL, and drop it then: a file they no
        # longer hold is older than every file they do (none follows it newest first, all of them oldest first).
        start = len(ids) if order == "desc" else 0
    else:
        start = 0
    data, records = [], {}
    for file_id in ids[start:]:
        if len(data) > limit:
            break
        if purpose not in (None, "batch_output" if BATCH_FILE.fullmatch(file_id) else "batch"):
            continue
        file = _listed(batches, file_id, records)
        if file is not None:
            data.append(file.model_dump())
    more, data = len(data) > limit, data[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


@router.post("", response_model=FileObject)
async def upload_file(request: Request) -> FileObject:
    """Upload a batch input file: multipart with `file` and `purpose` ("batch")."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the file as multipart/form-data with a 'file' part and purpose=batch", param="file")
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose != "batch":
        shown = purpose if not isinstance(purpose, str) or len(purpose) <= 64 else f"{purpose[:64]}..."
        raise ApiError(400, f"purpose: only 'batch' is supported, not {shown!r}", param="purpose")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "file: a file part is required", param="file")
    content, batches = await upload.read(), batch_store(request)
    try:
        meta = await asyncio.to_thread(batches.save_file, content, upload.filename or "batch.jsonl", purpose)
    except FilesFull as full:
        raise ApiError(400, f"file: {full}; delete files (DELETE /v1/files/{{file_id}}) or wait for them to expire "
                            "(LLAVA_QUEUE_BATCH_TTL_SECONDS; the limit is LLAVA_QUEUE_MAX_FILE_BYTES_PER_KEY)",
                       param="file", code=ErrorCode.INVALID_REQUEST) from None
    return upload_object(batches, meta)


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, request: Request) -> FileObject:
    """An uploaded file's description, or a batch output file's."""
    batches = batch_store(request)
    batch_file = _batch_file(batches, file_id)
    if batch_file is not None:
        return _batch_file_object(batches, *batch_file)
    meta = batches.file_meta(file_id)
    if meta is None:
        raise file_not_found(file_id)
    return upload_object(batches, meta)


@router.get("/{file_id}/content", response_class=Response,
            responses={200: {"content": {JSONL: {}}, "description": "The file's bytes"}})
def file_content(file_id: str, request: Request) -> Response:
    """A file's content: an uploaded file, or a batch's output or errors (JSONL, input order)."""
    batches = batch_store(request)
    batch_file = _batch_file(batches, file_id)
    if batch_file is not None:
        # Sent as it is read, as GET /v1/batches/{id}/output sends it: a batch of 50,000 answers is hundreds of MB.
        return streamed(output_lines(batches, *batch_file))
    content = batches.file_content(file_id)
    if content is None:
        raise file_not_found(file_id)
    return Response(content, media_type=JSONL)


@router.delete("/{file_id}")
def delete_file(file_id: str, request: Request) -> dict:
    """Delete an uploaded file (a batch that read it keeps its lines), or a finished batch's output or errors file:
    as on OpenAI, the batch still names it, and the file and its answers are gone (404)."""
    batches = batch_store(request)
    batch_file = _batch_file(batches, file_id)
    if batch_file is not None:
        if not delete_output(batches, *batch_file):
            raise file_not_found(file_id)
    elif not batches.delete_file(file_id):
        raise file_not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
