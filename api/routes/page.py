"""The web chat page at `/`, its static files, and the votes and flags it records.

The page is plain HTML, CSS and JavaScript in `frontend/` (no build step). It is served from
`settings.frontend_dir`, by default the `frontend/` folder beside the `api` package, which is
where it is in a checkout and in an editable install.
"""

import json
import time
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from api.auth import KeyBeforeBody, owned_job
from api.deps import ApiKey, AppSettings, Store
from api.errors import ApiError, job_not_found
from api.routes.openai import job_id_of
from shared.protocol import ErrorCode
from shared.settings import Settings

router = APIRouter(tags=["page"], route_class=KeyBeforeBody)

# Revalidate on every load (ETag), so an upgraded page is never mixed with stale scripts. No script runs but the
# page's own files: markup that got into a model answer (written into the DOM as HTML) ran its event handlers, which
# could read the page's API key; no other site may frame the page. Styles stay open: table cells are aligned with them.
PAGE_POLICY = "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
_PAGE_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY,
                 "X-Content-Type-Options": "nosniff"}


def frontend_dir(settings: Settings) -> Path:
    """The folder the page is served from."""
    return settings.frontend_dir or Path(__file__).resolve().parents[2] / "frontend"


def _page_file(settings: Settings, relative: str) -> FileResponse:
    """The page's file at `relative`, or a 404 that names only that path (not the server's folder)."""
    root = frontend_dir(settings).resolve()
    try:
        path = (root / relative).resolve()
        found = path.is_file() and root in path.parents
    except (ValueError, OSError):  # a NUL in the name, a name too long for the file system
        found = False
    if not found:
        raise ApiError(404, f"no such page file: {relative!r}",
                       type="not_found", param="path", code=ErrorCode.NOT_FOUND)
    return FileResponse(path, headers=_PAGE_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
def index(settings: AppSettings) -> FileResponse:
    """The chat page."""
    return _page_file(settings, "index.html")


class PageConfig(BaseModel):
    """What the page needs to know of this server's settings."""

    max_image_pixels: int = Field(description="the most pixels an image may have (LLAVA_QUEUE_MAX_IMAGE_PIXELS); "
                                              "the page refuses a larger one before reading it")


# Public, as the page is: it is read before an API key is entered.
@router.get("/page/config", response_model=PageConfig)
def page_config(settings: AppSettings) -> PageConfig:
    """The settings the chat page follows (its image limit is the API's)."""
    return PageConfig(max_image_pixels=settings.max_image_pixels)


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
def static_file(path: str, settings: AppSettings) -> FileResponse:
    """The page's scripts, style sheet and example images."""
    return _page_file(settings, path)


class Feedback(BaseModel):
    """A vote or a flag on one answer, named by the job that produced it (its id, or its chat completion's id)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["upvote", "downvote", "flag"]
    job_id: str = Field(min_length=1, max_length=64)


class FeedbackRecord(BaseModel):
    """One line of the feedback log (the original's vote record: tstamp, type, model, the conversation, ip)."""

    tstamp: float
    type: str
    job_id: str
    model: str
    prompt: str
    text: str
    ip: str | None


def feedback_key(settings: Settings) -> str:
    """The Redis list that holds the feedback log, one JSON line per vote or flag, oldest first."""
    return f"{settings.key_prefix}:feedback"


# The feedback log keeps its newest this many lines (each holds a job's prompt and answer), within
# Settings.feedback_log_bytes.
MAX_FEEDBACK_LINES = 100_000

# Append a line to the log (KEYS[1]) and count its bytes (KEYS[2]), then drop the oldest lines while there are more
# than ARGV[2] or more than ARGV[3] bytes (the newest line stays, whatever its size). A line count alone let 100,000
# lines of 2.4 MB each (a 400,000-character prompt, its answer) stay in Redis for good. The count is made again from
# the lines where it cannot be right: missing (a log written before it was kept), below zero, or with the log new (the
# list deleted, the count left).
_APPEND_FEEDBACK = """
local lines = redis.call('RPUSH', KEYS[1], ARGV[1])
local bytes = tonumber(redis.call('GET', KEYS[2]) or '-1') + #ARGV[1]
if bytes < #ARGV[1] or lines == 1 then
  bytes = 0
  for start = 0, lines - 1, 100 do
    for _, line in ipairs(redis.call('LRANGE', KEYS[1], start, start + 99)) do bytes = bytes + #line end
  end
end
redis.call('SET', KEYS[2], bytes)
while lines > 1 and (lines > tonumber(ARGV[2]) or bytes > tonumber(ARGV[3])) do
  bytes = redis.call('DECRBY', KEYS[2], #redis.call('LPOP', KEYS[1]))
  lines = lines - 1
end
return lines
"""


# The page and its files are public; feedback needs an API key when keys are configured, as jobs do.
@router.post("/v1/feedback", status_code=201, response_model=FeedbackRecord, tags=["feedback"])
def record_feedback(body: Feedback, request: Request, response: Response, store: Store, settings: AppSettings,
                    api_key: ApiKey) -> FeedbackRecord:
    """Record an upvote, downvote or flag on a job's answer: a job of the caller's API key (with keys on).

    The model, prompt and answer are copied from the job record, so the log line outlives the job. A job's vote or
    flag is recorded once: the same again answers the line recorded first, 200 (each repeat copied the prompt and
    answer again, 400 KB a request for a long prompt, into a list never trimmed). The log keeps its newest
    MAX_FEEDBACK_LINES lines.
    """
    # A chat completion's id names its job, as at GET /v1/jobs/{id}; the log line names the job id, so that a vote
    # by either id is the same vote.
    body.job_id = job_id_of(body.job_id)
    # Another key's job is unknown here as at GET /v1/jobs/{id}: the answer holds its prompt and text.
    job = owned_job(store, body.job_id, api_key)
    if job is None:
        raise job_not_found(body.job_id)
    record = FeedbackRecord(tstamp=round(time.time(), 4), type=body.type, job_id=body.job_id, model=job["model"],
                            prompt=job["prompt"], text=job["text"],
                            ip=request.client.host if request.client else None)
    line = json.dumps(record.model_dump(), ensure_ascii=False)  # UTF-8: an escaped "é" took 6 bytes
    once = f"{feedback_key(settings)}:{body.job_id}:{body.type}"
    if not store.redis.set(once, line, nx=True, ex=settings.job_ttl_seconds):
        first = store.redis.get(once)
        if first is not None:
            response.status_code = 200
            return FeedbackRecord.model_validate_json(first)
    store.redis.eval(_APPEND_FEEDBACK, 2, feedback_key(settings), f"{feedback_key(settings)}:bytes", line,
                     MAX_FEEDBACK_LINES, settings.feedback_log_bytes)
    return record
