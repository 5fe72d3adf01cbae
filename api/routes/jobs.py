"""Jobs: submit one or many, poll, cancel."""

import hashlib
import logging
import string
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError, WrapValidator
from starlette.concurrency import run_in_threadpool

from api.auth import KeyBeforeBody, owned_job, owns
from api.deps import ApiKey, IdempotencyKey, Store, Submissions
from api.errors import ApiError, job_not_found, log_damaged
from api.json_bodies import BULK_VALUES, REQUEST_VALUES
from api.routes.openai import job_id_of
from api.submission import BULK_ITEM_MARK, bulk_item_key, scoped_idempotency_key
from shared.jobs import ACTIVE_STATES, DAMAGED_ERROR, FINAL_STATES, DamagedRecord, JobStore
from shared.protocol import BulkJobRequest, ErrorCode, GenerateRequest, JobRequest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


class JobCreated(BaseModel):
    id: str
    status: str


class BulkCreated(BaseModel):
    ids: list[str]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class Params(BaseModel):
    """The sampling parameters the job runs with (after defaults and the max_new_tokens clamp)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop: str | list[str] | None = None
    seed: int | None = None
    top_k: int | None = None


class JobView(BaseModel):
    """A job as polling sees it. `text` is what was generated so far, without the prompt."""

    id: str
    status: str
    queue: str
    model: str
    prompt: str
    text: str
    error: str | None
    error_code: int
    finish_reason: str | None
    usage: Usage
    params: Params | None  # None only for a damaged record in a list (`listed_view`)
    created_at: float | None  # None only for a record whose created_at is no number (JobStore.get)
    started_at: float | None
    first_token_at: float | None
    finished_at: float | None
    queue_position: int | None
    attempts: int
    worker: str | None


# The fields every job record has from its creation (JobStore._queued_record), which the view reads as text.
_TEXT_FIELDS = ("id", "status", "queue", "model", "prompt", "request", "text", "error", "finish_reason")


def _params_or_missing(record: dict[str, Any]) -> tuple[Params | None, list[str]]:
    """A job record's sampling parameters, and the fields it lacks a valid value of (none for a record llava-queue
    wrote)."""
    missing = [name for name in _TEXT_FIELDS if not isinstance(record.get(name), str)]
    params = None
    if "request" not in missing:
        # Read from the request as recorded (validated when it was taken, defaults and clamp applied), not validated
        # again: that decoded every image at each poll, and an image over limits lowered since was a 500.
        try:
            params = Params.model_validate_json(record["request"])
        except ValidationError:
            missing.append("request")
    return params, missing


def _damaged_message(job_id: str | None, missing: list[str]) -> str:
    return f"the record of job {job_id!r} is damaged: it has no valid {', '.join(missing)}"


def job_view(record: dict[str, Any]) -> JobView:
    """The public view of a job record; an ApiError 500 naming what is wrong for a record llava-queue did not write
    (fields missing, a request that is not one), instead of a traceback."""
    params, missing = _params_or_missing(record)
    if missing:
        log.warning("job record %r is damaged (no valid %s): not written by llava-queue?", record.get("id"), missing)
        raise ApiError(500, _damaged_message(record.get("id"), missing), type="server_error",
                       code=ErrorCode.SERVER_ERROR)
    return _view(record, params)


def _view(record: dict[str, Any], params: Params) -> JobView:
    return JobView(
        id=record["id"], status=record["status"], queue=record["queue"], model=record["model"],
        prompt=record["prompt"], text=record["text"], error=record["error"] or None,
        error_code=record["error_code"], finish_reason=record["finish_reason"] or None,
        usage=Usage(prompt_tokens=record["prompt_tokens"], completion_tokens=record["completion_tokens"]),
        params=params,
        created_at=record["created_at"], started_at=record["started_at"], first_token_at=record["first_token_at"],
        finished_at=record["finished_at"], queue_position=record["queue_position"], attempts=record["attempts"],
        worker=record.get("worker") or None)


def listed_view(record: dict[str, Any] | DamagedRecord, job_id: str) -> JobView:
    """A job as a list shows it (`GET /v1/jobs`, `?ids=`): as `job_view`, but a damaged record (a key of another type,
    a hash that lacks fields) is that job's entry alone, `failed` with the message its own GET answers in its 500,
    error_code 1, nothing else read from it. Its 500 (or the 503 of a WRONGTYPE) failed the whole list, every other
    job with it; and `failed`, final, since no worker runs such a record: a client stops following it there."""
    if isinstance(record, DamagedRecord):
        message = record.message
    else:
        params, missing = _params_or_missing(record)
        if not missing:
            return _view(record, params)
        message = _damaged_message(job_id, missing)
    log_damaged(f"{message}; listed as failed")
    return JobView(id=job_id, status="failed", queue="", model="", prompt="", text="", error=message,
                   error_code=ErrorCode.SERVER_ERROR, finish_reason=None, usage=Usage(prompt_tokens=0,
                   completion_tokens=0), params=None, created_at=None, started_at=None, first_token_at=None,
                   finished_at=None, queue_position=None, attempts=0, worker=None)


class JobList(BaseModel):
    """A page of jobs, newest first (OpenAI's list shape). `last_id` is the `after` of the next page."""

    object: Literal["list"] = "list"
    data: list[JobView]
    first_id: str | None
    last_id: str | None
    has_more: bool


# A submission's body is checked by its endpoint, not by FastAPI: FastAPI validates a body on the event loop (even for
# a plain `def` endpoint), and checking its images (base64 decoded, opened and verified by PIL) takes a while, seconds
# for a crafted file, during which the API served no other request or stream. Declared with `_AS_SENT` (a validator
# that returns its input untouched), the body comes to the endpoint as FastAPI read it (the parsed JSON, or the bytes
# of a body not sent as JSON), and its schema in /openapi.json is the model's all the same (pydantic's SkipValidation
# would inline it there, "Body", instead of naming the model); the endpoint, which runs on a thread, validates it and
# answers what FastAPI answered (`_checked`, `_BodyCheckedOnAThread`).
_AS_SENT = WrapValidator(lambda body, _: body)
_Body = TypeVar("_Body", bound=BaseModel)


def _checked(model: type[_Body], body: Any) -> _Body:
    """`body` validated as `model`, or the RequestValidationError FastAPI raised for it (answered by the API's handler
    as before: a 422 naming the fields, a 400 for malformed JSON or a body not sent as JSON)."""
    try:
        return model.model_validate(body, from_attributes=True)  # (what FastAPI's validation of a body calls)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])}
                                      for error in exc.errors(include_url=False)], body=body) from None


def _body_errors(model: type[BaseModel], body: Any) -> list[dict[str, Any]]:
    """The errors FastAPI's validation of `body` as `model` gives (locations under "body"); none for a valid body."""
    try:
        _checked(model, body)
    except RequestValidationError as exc:
        return list(exc.errors())
    return []


class _BodyCheckedOnAThread(KeyBeforeBody):
    """A route whose body (`_AS_SENT`) its endpoint validates: when FastAPI refuses the request for another
    parameter (an Idempotency-Key header too long), the body's errors are added to the answer, on a thread, as
    FastAPI's own validation listed them after the header's."""

    body_model: type[BaseModel]

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        model = self.body_model

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = list(exc.errors())
                if any(tuple(error.get("loc", ()))[:1] == ("body",) for error in errors):
                    raise  # the body's own errors are in (the endpoint's, malformed JSON, no body)
                errors += await run_in_threadpool(_body_errors, model, exc.body)
                raise RequestValidationError(errors, body=exc.body) from None

        return route


def _route_class(model: type[BaseModel], max_body_values: int = REQUEST_VALUES) -> type[APIRoute]:
    return type(f"{model.__name__}Route", (_BodyCheckedOnAThread,),
                {"body_model": model, "max_body_values": max_body_values})


def create_job(body: Annotated[JobRequest, _AS_SENT], submitter: Submissions, store: Store, api_key: ApiKey,
               idempotency_key: IdempotencyKey = None) -> JobCreated:
    """Enqueue one generation job; poll it at `GET /v1/jobs/{id}` or stream it at `WS /v1/jobs/{id}/ws`."""
    body = _checked(JobRequest, body)  # (on the endpoint's thread: see _AS_SENT)
    [job_id] = submitter.submit([(body, body.queue)], idempotency_key=idempotency_key, owner=api_key)
    status = "queued"
    if idempotency_key is not None:
        # A retry gets the job its key was first sent with, which may have run, ended, or been cancelled by the key
        # (`POST /v1/jobs/cancel`): its status, not "queued" (None: its record has expired since). A record of another
        # type is a 500 that says so, as its GET answers (its WRONGTYPE was a 503 "the job store is unavailable").
        status = store.status_of(job_id) or status
    return JobCreated(id=job_id, status=status)


def create_jobs(body: Annotated[BulkJobRequest, _AS_SENT], submitter: Submissions, api_key: ApiKey,
                idempotency_key: IdempotencyKey = None) -> BulkCreated:
    """Enqueue many jobs in one call; the ids come back in the order of `jobs`."""
    body = _checked(BulkJobRequest, body)
    return BulkCreated(ids=submitter.submit([(job, job.queue) for job in body.jobs],
                                           idempotency_key=idempotency_key, owner=api_key))


router.add_api_route("", create_job, methods=["POST"], status_code=202, response_model=JobCreated,
                     route_class_override=_route_class(JobRequest))
router.add_api_route("/bulk", create_jobs, methods=["POST"], status_code=202, response_model=BulkCreated,
                     route_class_override=_route_class(BulkJobRequest, BULK_VALUES))


def _refuse_damaged_cancel(store: JobStore, job_id: str, previous: str) -> None:
    """Raise the 500 of a cancel whose job's record is damaged (as a record of another type answers, DamagedRecord):
    one its cancel failed instead, a key of its own damaged (`previous` "damaged", see JobStore.cancel), or one whose
    status is none llava-queue writes, which no cancel ends. They were answered 202 "cancelled" and "cancelling": the
    client took for cancelled a job that ended failed, or that went on."""
    if previous == "damaged":
        message = f"job {job_id}: {store.redis.hget(store.key(job_id), 'error')}; it ended failed, not cancelled"
    elif previous not in ACTIVE_STATES + FINAL_STATES:
        damage = DAMAGED_ERROR.format(f"its status, {previous!r}, is none llava-queue writes")
        message = f"job {job_id}: {damage}; it is not cancelled"
    else:
        return
    log_damaged(message)
    raise ApiError(500, message, type="server_error", code=ErrorCode.SERVER_ERROR)


# The request of the job a cancel by Idempotency-Key records when no job holds the key yet (a job cancelled from the
# start, `JobStore.create_cancelled`): the submission arriving after it gets this job (its key is taken) and creates
# none.
_CANCELLED_BEFORE_SUBMITTED = GenerateRequest(prompt="", max_new_tokens=0)


@router.post("/cancel", status_code=202, response_model=JobCreated)
def cancel_job_by_idempotency_key(store: Store, api_key: ApiKey, idempotency_key: Annotated[str, Header(
        min_length=1, max_length=200, description="The Idempotency-Key the job was (or will be) submitted with.")]
                                  ) -> JobCreated:
    """Cancel the job submitted with this `Idempotency-Key` (by this API key), as `DELETE /v1/jobs/{id}` does.

    For a client that has no job id to name: one whose `POST /v1/jobs` is still unanswered (a page that is closed
    meanwhile). The cancel may reach the API before the submission does: then the key is taken by a job that is
    cancelled from the start (never queued), and the submission that comes with that key afterwards gets this job
    instead of creating one.
    Only a single job's key is taken; a bulk submission's jobs are cancelled by their ids.
    """
    if BULK_ITEM_MARK in idempotency_key:
        raise ApiError(422, f"the Idempotency-Key holds {BULK_ITEM_MARK!r}, which no submission's key holds",
                       param="header.idempotency-key")
    scoped = scoped_idempotency_key(idempotency_key, api_key)
    # A bulk submission keeps its jobs under the key and each job's index: this key would name none of them, and a job
    # cancelled from the start made under it would answer 202 for jobs that go on running.
    bulk_first = store.redis.get(store.idempotency_key(bulk_item_key(scoped, 0)))
    if bulk_first is not None:
        raise ApiError(409, f"this Idempotency-Key was sent with a bulk submission (its first job {bulk_first}): "
                            "cancel its jobs by their ids (DELETE /v1/jobs/{id})", type="conflict",
                       param="header.idempotency-key", code=ErrorCode.INVALID_REQUEST)
    job, created = store.create_cancelled(_CANCELLED_BEFORE_SUBMITTED, "interactive", scoped, owner=api_key)
    if created:
        return JobCreated(id=job, status="cancelled")
    previous = store.cancel(job)  # a submission took the key first: its job is the one to cancel
    if previous is None:  # (the record expired since the key was read)
        raise ApiError(404, "no job was submitted with this Idempotency-Key", type="not_found",
                       param="header.idempotency-key", code=ErrorCode.NOT_FOUND)
    _refuse_damaged_cancel(store, job, previous)
    if previous in FINAL_STATES:
        raise ApiError(409, f"job {job} already ended ({previous})", type="conflict",
                       param="header.idempotency-key", code=ErrorCode.INVALID_REQUEST)
    return JobCreated(id=job, status="cancelled" if previous == "queued" else "cancelling")


# A poll's answer changes while the job runs: a cache between client and API (a proxy, a CDN, the browser) may keep
# it only to revalidate it (`no-cache`), and only for the one client that asked (`private`: it is that key's job).
POLL_CACHE_CONTROL = "private, no-cache"


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (or is `*`), compared weakly as RFC 9110 says for it."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


# `GET /v1/jobs?ids=`: how many jobs one request may read, and what an id may hold (a job id, a completion id).
MAX_IDS = 100
_ID_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-_")
_MAX_ID_CHARS = 200


def _asked_ids(ids: str) -> list[str]:
    """The job ids of an `ids` parameter (comma-separated job or completion ids), in the order asked, each once; an
    ApiError 422 naming `ids` for none, more than MAX_IDS, an empty one, or one with other characters than an id's."""
    asked = ids.split(",")
    if len(asked) > MAX_IDS:
        raise ApiError(422, f"ids: at most {MAX_IDS} job ids at once, not {len(asked)}", param="query.ids")
    for job_id in asked:
        if not job_id:
            raise ApiError(422, "ids: an empty job id (ids are separated by single commas)", param="query.ids")
        if len(job_id) > _MAX_ID_CHARS or not _ID_CHARACTERS.issuperset(job_id):
            raise ApiError(422, f"ids: {job_id[:_MAX_ID_CHARS]!r} is not a job id (letters, digits, '-' and '_', "
                                f"at most {_MAX_ID_CHARS})", param="query.ids")
    return list(dict.fromkeys(job_id_of(job_id) for job_id in asked))


@router.get("", response_model=JobList)
def list_jobs(request: Request, store: Store, api_key: ApiKey, limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(max_length=200, description=(
                  "A job id (a `last_id`): the jobs created before it."))] = None,
              status: Annotated[Literal[ACTIVE_STATES + FINAL_STATES] | None, Query(
                  description="Only the jobs in this state.")] = None,
              ids: Annotated[str | None, Query(description=(
                  f"Comma-separated job ids (at most {MAX_IDS}): just those jobs, in this order, those unknown "
                  "left out; not with `limit`, `after` or `status`."))] = None) -> JobList:
    """The caller's jobs, newest first, each as `GET /v1/jobs/{id}` answers it: with API keys on, the key's own
    jobs; with keys off, all. Batch lines are listed by their batch (`GET /v1/batches/{id}/lines`), not here.

    A page reads at most 10 x `limit` jobs (LIST_SCAN_FACTOR): filtered by a `status` few jobs have, it may hold
    fewer than `limit` with `has_more` true; go on from its `last_id`, which may then name a job not in `data`.

    With `ids`, the jobs named, in the order named (a client following many jobs polls them all in one request);
    one unknown, expired or another key's is left out, as `GET /v1/jobs/{id}` answers 404 for it.
    """
    if ids is not None:
        return _jobs_named(store, api_key, ids, [name for name in ("limit", "after", "status")
                                                 if name in request.query_params])
    after = job_id_of(after) if after else None
    records, more, cursor = store.list_jobs(api_key, limit, after, status)
    data = [listed_view(record, record.job_id if isinstance(record, DamagedRecord) else record.get("id") or "")
            for record in records]
    last = cursor if more else (data[-1].id if data else None)
    return JobList(data=data, first_id=data[0].id if data else None, last_id=last, has_more=more)


def _jobs_named(store: JobStore, api_key: str | None, ids: str, paging: list[str]) -> JobList:
    """`GET /v1/jobs?ids=`: the jobs of `ids` the caller may read, their records read in one round trip. `paging`
    (the list's other parameters sent) is refused: a filter would leave a job out that exists, which the caller
    could no longer tell from one that is gone."""
    if paging:
        raise ApiError(422, f"{paging[0]}: not with ids (which names every job to answer)",
                       param=f"query.{paging[0]}")
    asked = _asked_ids(ids)
    # A record of another type names no owner: its damage is said to any caller, as its own GET says it.
    data = [listed_view(record, job_id) for job_id, record in zip(asked, store.get_many(asked))
            if record is not None and (isinstance(record, DamagedRecord) or owns(record.get("owner"), api_key))]
    return JobList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                   has_more=False)


@router.get("/{job_id}", response_model=JobView, responses={
    304: {"description": "The job is as it was when its answer carried the ETag sent in `If-None-Match`."}})
def get_job(job_id: str, store: Store, api_key: ApiKey, if_none_match: Annotated[str | None, Header(
        description="The ETag of an earlier answer: 304 with no body while the job has not changed since.")] = None
            ) -> Response:
    """The job's state, text so far, timings, token usage, and queue position while queued.

    The id of an OpenAI chat completion (`chatcmpl-<job id>`) is accepted too. The answer carries an `ETag` and
    `Cache-Control: private, no-cache`; a poll that sends the ETag back in `If-None-Match` gets 304 until the job
    changes.
    """
    record = owned_job(store, job_id_of(job_id), api_key)
    if record is None:
        raise job_not_found(job_id)
    # Serialized here, once: the ETag is the body's digest, and FastAPI would validate the view again to send it.
    body = job_view(record).model_dump_json().encode()
    headers = {"ETag": f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"', "Cache-Control": POLL_CACHE_CONTROL}
    if etag_matches(if_none_match, headers["ETag"]):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.delete("/{job_id}", status_code=202, response_model=JobCreated)
def cancel_job(job_id: str, store: Store, api_key: ApiKey) -> JobCreated:
    """Cancel a job: a queued job ends at once, a running one leaves its batch at the next step.

    The id of an OpenAI chat completion (`chatcmpl-<job id>`) is accepted too, as by `GET`.
    """
    job = job_id_of(job_id)
    if api_key is not None and not owns(store.owner_of(job), api_key):
        raise job_not_found(job_id)
    previous = store.cancel(job)
    if previous is None:
        raise job_not_found(job_id)
    _refuse_damaged_cancel(store, job, previous)
    if previous in FINAL_STATES:
        raise ApiError(409, f"job {job} already ended ({previous})", type="conflict", param="id",
                       code=ErrorCode.INVALID_REQUEST)
    return JobCreated(id=job, status="cancelled" if previous == "queued" else "cancelling")
