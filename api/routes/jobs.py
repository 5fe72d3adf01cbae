"""Jobs: submit one or many, poll, cancel."""

from typing import Annotated, Any

from fastapi import APIRouter, Header
from pydantic import BaseModel

from api.auth import owns
from api.deps import ApiKey, Store, Submissions
from api.errors import ApiError, job_not_found
from api.routes.openai import COMPLETION_ID_PREFIX
from api.submission import BULK_ITEM_MARK, scoped_idempotency_key
from shared.jobs import FINAL_STATES
from shared.protocol import BulkJobRequest, ErrorCode, GenerateRequest, JobRequest

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
    params: Params
    created_at: float | None  # None only for a record whose created_at is no number (JobStore.get)
    started_at: float | None
    first_token_at: float | None
    finished_at: float | None
    queue_position: int | None
    attempts: int
    worker: str | None


def job_view(record: dict[str, Any]) -> JobView:
    """The public view of a job record."""
    # Read from the request as recorded (validated when it was taken, defaults and clamp applied), not validated
    # again: that decoded every image at each poll, and an image over limits lowered since was a 500.
    params = Params.model_validate_json(record["request"])
    return JobView(
        id=record["id"], status=record["status"], queue=record["queue"], model=record["model"],
        prompt=record["prompt"], text=record["text"], error=record["error"] or None,
        error_code=record["error_code"], finish_reason=record["finish_reason"] or None,
        usage=Usage(prompt_tokens=record["prompt_tokens"], completion_tokens=record["completion_tokens"]),
        params=params,
        created_at=record["created_at"], started_at=record["started_at"], first_token_at=record["first_token_at"],
        finished_at=record["finished_at"], queue_position=record["queue_position"], attempts=record["attempts"],
        worker=record.get("worker") or None)


# An empty key is refused: it would be one key shared by every client that sends the header blank.
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=200, description=(
    "Retrying a submission with the same key returns the first submission's job(s) instead of new ones."))]


@router.post("", status_code=202, response_model=JobCreated)
def create_job(body: JobRequest, submitter: Submissions, api_key: ApiKey,
               idempotency_key: IdempotencyKey = None) -> JobCreated:
    """Enqueue one generation job; poll it at `GET /v1/jobs/{id}` or stream it at `WS /v1/jobs/{id}/ws`."""
    [job_id] = submitter.submit([(body, body.queue)], idempotency_key=idempotency_key, owner=api_key)
    return JobCreated(id=job_id, status="queued")


@router.post("/bulk", status_code=202, response_model=BulkCreated)
def create_jobs(body: BulkJobRequest, submitter: Submissions, api_key: ApiKey,
                idempotency_key: IdempotencyKey = None) -> BulkCreated:
    """Enqueue many jobs in one call; the ids come back in the order of `jobs`."""
    return BulkCreated(ids=submitter.submit([(job, job.queue) for job in body.jobs],
                                           idempotency_key=idempotency_key, owner=api_key))


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
    job, created = store.create_cancelled(_CANCELLED_BEFORE_SUBMITTED, "interactive",
                                          scoped_idempotency_key(idempotency_key, api_key), owner=api_key)
    if created:
        return JobCreated(id=job, status="cancelled")
    previous = store.cancel(job)  # a submission took the key first: its job is the one to cancel
    if previous is None:  # (the record expired while its key lived on)
        raise ApiError(404, "no job was submitted with this Idempotency-Key", type="not_found",
                       param="header.idempotency-key", code=ErrorCode.NOT_FOUND)
    if previous in FINAL_STATES:
        raise ApiError(409, f"job {job} already ended ({previous})", type="conflict",
                       param="header.idempotency-key", code=ErrorCode.INVALID_REQUEST)
    return JobCreated(id=job, status="cancelled" if previous == "queued" else "cancelling")


def _plain_id(job_id: str) -> str:
    """The job id of a job id or of an OpenAI chat completion's id (`chatcmpl-<job id>`)."""
    return job_id.removeprefix(COMPLETION_ID_PREFIX)


@router.get("/{job_id}", response_model=JobView)
def get_job(job_id: str, store: Store, api_key: ApiKey) -> JobView:
    """The job's state, text so far, timings, token usage, and queue position while queued.

    The id of an OpenAI chat completion (`chatcmpl-<job id>`) is accepted too.
    """
    record = store.get(_plain_id(job_id))
    if record is None or not owns(record.get("owner"), api_key):
        raise job_not_found(job_id)
    return job_view(record)


@router.delete("/{job_id}", status_code=202, response_model=JobCreated)
def cancel_job(job_id: str, store: Store, api_key: ApiKey) -> JobCreated:
    """Cancel a job: a queued job ends at once, a running one leaves its batch at the next step.

    The id of an OpenAI chat completion (`chatcmpl-<job id>`) is accepted too, as by `GET`.
    """
    job = _plain_id(job_id)
    if api_key is not None and not owns(store.redis.hget(store.key(job), "owner"), api_key):
        raise job_not_found(job_id)
    previous = store.cancel(job)
    if previous is None:
        raise job_not_found(job_id)
    if previous in FINAL_STATES:
        raise ApiError(409, f"job {job} already ended ({previous})", type="conflict", param="id",
                       code=ErrorCode.INVALID_REQUEST)
    return JobCreated(id=job, status="cancelled" if previous == "queued" else "cancelling")
