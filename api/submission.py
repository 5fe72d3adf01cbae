"""The one way a job enters the system: validate (done by the caller's parse), record, enqueue."""

from celery import Celery

from api.errors import ApiError
from shared.celery_app import GENERATE_TASK
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest


def submit_jobs(store: JobStore, celery: Celery, requests: list[tuple[GenerateRequest, str]]) -> list[str]:
    """Record each (request, queue) as a queued job and send its Celery task; returns the job ids in order.

    Only the job id crosses the queue; the worker reads the request from the record. If the broker
    cannot take a task, that job is marked failed and the call answers 503.
    """
    ids = [store.create(request, queue) for request, queue in requests]
    with celery.producer_or_acquire() as producer:
        for job_id, (_, queue) in zip(ids, requests):
            try:
                celery.send_task(GENERATE_TASK, args=[job_id], queue=queue, task_id=job_id, producer=producer)
            except Exception as exc:
                for failed in ids[ids.index(job_id):]:
                    store.finish(failed, "failed", error=f"could not enqueue the job: {exc}",
                                 error_code=ErrorCode.SERVER_ERROR, finish_reason="error")
                raise ApiError(503, f"the queue is unavailable: {exc}", type="unavailable",
                               code=ErrorCode.SERVER_ERROR) from exc
    return ids


def submit_job(store: JobStore, celery: Celery, request: GenerateRequest, queue: str = "interactive") -> str:
    """Submit one job; see `submit_jobs`."""
    return submit_jobs(store, celery, [(request, queue)])[0]
