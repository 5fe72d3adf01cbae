"""OpenAI's files, as far as batches need them: upload a batch file, read a batch's output and errors.

`POST /v1/files` (multipart `file`, `purpose` "batch") keeps the file in Redis for the batch TTL;
a batch names it as `input_file_id`. A batch's `output_file_id` and `error_file_id` name files
assembled from the batch when read. So the `openai` package's `files.create`, `batches.create`
and `files.content` work against llava-queue as they do against OpenAI.
"""

import asyncio
import re

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from api.errors import ApiError
from api.routes.batches import ERROR_FILE, JSONL, OUTPUT_FILE, batch_store, output_lines, read_batch
from shared.protocol import ErrorCode

router = APIRouter(prefix="/v1/files", tags=["files"])

_BATCH_FILE = re.compile(r"file-(batch_[0-9a-f]{32})-(output|errors)")


class FileObject(BaseModel):
    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: None = None


def file_not_found(file_id: str) -> ApiError:
    return ApiError(404, f"unknown file id {file_id!r} (it never existed, or it expired)", type="not_found",
                    param="file_id", code=ErrorCode.NOT_FOUND)


def _batch_file(request: Request, file_id: str) -> tuple[str, bytes] | None:
    """(file name, content) of a batch's output or errors file; None if `file_id` names no batch file."""
    match = _BATCH_FILE.fullmatch(file_id)
    if not match:
        return None
    batch_id, kind = match.groups()
    batches = batch_store(request)
    record = read_batch(batches, batch_id)
    name = (OUTPUT_FILE if kind == "output" else ERROR_FILE).format(batch_id)
    return f"{name}.jsonl", "".join(output_lines(batches, record, errors=kind == "errors")).encode()


@router.post("", response_model=FileObject)
async def upload_file(request: Request) -> FileObject:
    """Upload a batch input file: multipart with `file` and `purpose` ("batch")."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the file as multipart/form-data with a 'file' part and purpose=batch", param="file")
    form = await request.form()
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose != "batch":
        raise ApiError(400, f"purpose: only 'batch' is supported, not {purpose!r}", param="purpose")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "file: a file part is required", param="file")
    content = await upload.read()
    meta = await asyncio.to_thread(batch_store(request).save_file, content, upload.filename or "batch.jsonl",
                                   purpose)
    return FileObject(**meta)


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, request: Request) -> FileObject:
    """An uploaded file's description, or a batch output file's."""
    batch_file = _batch_file(request, file_id)
    if batch_file is not None:
        batch = read_batch(batch_store(request), _BATCH_FILE.fullmatch(file_id).group(1))
        return FileObject(id=file_id, bytes=len(batch_file[1]), created_at=int(batch["created_at"]),
                          filename=batch_file[0], purpose="batch_output")
    meta = batch_store(request).file_meta(file_id)
    if meta is None:
        raise file_not_found(file_id)
    return FileObject(**meta)


@router.get("/{file_id}/content", response_class=Response,
            responses={200: {"content": {JSONL: {}}, "description": "The file's bytes"}})
def file_content(file_id: str, request: Request) -> Response:
    """A file's content: an uploaded file, or a batch's output or errors (JSONL, input order)."""
    batch_file = _batch_file(request, file_id)
    if batch_file is not None:
        return Response(batch_file[1], media_type=JSONL)
    content = batch_store(request).file_content(file_id)
    if content is None:
        raise file_not_found(file_id)
    return Response(content, media_type=JSONL)


@router.delete("/{file_id}")
def delete_file(file_id: str, request: Request) -> dict:
    """Delete an uploaded file (a batch that read it keeps its lines)."""
    if not batch_store(request).delete_file(file_id):
        raise file_not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
