"""The one way a job enters the system: validate (done by the caller's parse), record, enqueue."""

import math

from celery import Celery

from api.errors import ApiError
from shared.celery_app import GENERATE_TASK
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest


def submit_jobs(store: JobStore, celery: Celery, requests: list[tuple[GenerateRequest, str]], *,
                idempotency_key: str | None = None) -> list[str]:
    """Record each (request, queue) as a queued job and send its Celery task; returns the job ids in order.

    Only the job id crosses the queue; the worker reads the request from the record. Past the
    queue limit the call answers 429 with a Retry-After from the measured drain rate. With an
    `idempotency_key` seen before, the first submission's ids come back and nothing is enqueued.
    If the broker cannot take a task, that job is marked failed and the call answers 503.
    """
    admit(store, len(requests))
    ids, created = [], []
    for index, (request, queue) in enumerate(requests):
        key = idempotency_key if idempotency_key is None or len(requests) == 1 else f"{idempotency_key}:{index}"
        job_id, new = store.create(request, queue, deadline_seconds=getattr(request, "deadline_seconds", None),
                                   idempotency_key=key)
        ids.append(job_id)
        if new:
            created.append((job_id, queue))
    with celery.producer_or_acquire() as producer:
        for position, (job_id, queue) in enumerate(created):
            try:
                celery.send_task(GENERATE_TASK, args=[job_id], queue=queue, task_id=job_id, producer=producer)
            except Exception as exc:
                for failed, _ in created[position:]:
                    store.finish(failed, "failed", error=f"could not enqueue the job: {exc}",
                                 error_code=ErrorCode.SERVER_ERROR, finish_reason="error")
                raise ApiError(503, f"the queue is unavailable: {exc}", type="unavailable",
                               code=ErrorCode.SERVER_ERROR, headers={"Retry-After": "5"}) from exc
    return ids


def admit(store: JobStore, count: int) -> None:
    """Refuse `count` more jobs with 429 when they would take the queues past their limit."""
    if not store.max_queued:
        return
    queued = sum(store.queue_lengths().values())
    excess = queued + count - store.max_queued
    if excess <= 0:
        return
    rate = store.finished_per_second()
    retry_after = min(3600, max(1, math.ceil(excess / rate))) if rate > 0 else 30
    raise ApiError(429, f"the queue is full ({queued} jobs queued, limit {store.max_queued}); "
                        f"retry in about {retry_after} s", type="overloaded", code=ErrorCode.OVERLOADED,
                   headers={"Retry-After": str(retry_after)})


def submit_job(store: JobStore, celery: Celery, request: GenerateRequest, queue: str = "interactive") -> str:
    """Submit one job; see `submit_jobs`."""
    return submit_jobs(store, celery, [(request, queue)])[0]
