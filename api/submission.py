"""The one way a job enters the system: validate (done by the caller's parse), record, enqueue."""

import math

from celery import Celery

from api.errors import ApiError
from shared.celery_app import GENERATE_TASK
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest


def submit_jobs(store: JobStore, celery: Celery, requests: list[tuple[GenerateRequest, str]], *,
                idempotency_key: str | None = None, owner: str | None = None) -> list[str]:
    """Record each (request, queue) as a queued job and send its Celery task; returns the job ids in order.

    Only the job id crosses the queue; the worker reads the request from the record. Past the
    queue limit the call answers 429 with a Retry-After from the measured drain rate. With an
    `idempotency_key` seen before, the first submission's ids come back and nothing is enqueued.
    If the broker cannot take a task, that job is marked failed and the call answers 503. An
    `owner` (the caller's API key digest) is held to its own queued-job quota too.
    """
    keys: list[str | None] = [None] * len(requests)
    if idempotency_key is not None:
        keys = [idempotency_key] if len(requests) == 1 else [f"{idempotency_key}:{i}" for i in range(len(requests))]
        known = store.idempotent_jobs(keys)
        if all(known):  # a retry of a submission that went through: its jobs, even when the queue is full now
            return known
    admit(store, len(requests), owner)
    ids, created = [], []
    for key, (request, queue) in zip(keys, requests):
        job_id, new = store.create(request, queue, deadline_seconds=getattr(request, "deadline_seconds", None),
                                   idempotency_key=key, owner=owner)
        ids.append(job_id)
        if new:
            created.append((job_id, queue))
    with celery.producer_or_acquire() as producer:
        for position, (job_id, queue) in enumerate(created):
            try:
                celery.send_task(GENERATE_TASK, args=[job_id], queue=queue, task_id=job_id, producer=producer)
            except Exception as exc:
                raise unsent(store, [failed for failed, _ in created[position:]], exc) from exc
    return ids


def unsent(store: JobStore, job_ids: list[str], exc: Exception) -> ApiError:
    """Jobs recorded but not enqueued (the broker refused): they end failed; the 503 the caller answers."""
    for job_id in job_ids:
        store.finish(job_id, "failed", error=f"could not enqueue the job: {exc}", error_code=ErrorCode.SERVER_ERROR,
                     finish_reason="error")
    return ApiError(503, f"the queue is unavailable: {exc}", type="unavailable", code=ErrorCode.SERVER_ERROR,
                    headers={"Retry-After": "5"})


def admit(store: JobStore, count: int, owner: str | None = None) -> None:
    """Refuse `count` more jobs with 429 when they would take the queues past their limit, or the
    caller (`owner`, an API key digest) past its own quota."""
    if store.max_queued:
        queued = sum(store.queue_lengths().values())
        excess = queued + count - store.max_queued
        if excess > 0:
            _refuse(store, excess, f"the queue is full ({queued} jobs queued, limit {store.max_queued})")
    if owner and store.max_queued_per_owner:
        limit = store.max_queued_per_owner
        queued = store.owner_queued(owner, at_least=limit - count + 1)
        excess = queued + count - limit
        if excess > 0:
            _refuse(store, excess, f"this API key has {queued} jobs queued; its quota is {limit}"
                                   + (f" and this request holds {count}" if count > 1 else ""))


def _refuse(store: JobStore, excess: int, reason: str) -> None:
    """429 with a Retry-After from the measured drain rate: about when `excess` queued jobs will have left."""
    rate = store.finished_per_second()
    retry_after = min(3600, max(1, math.ceil(excess / rate))) if rate > 0 else 30
    raise ApiError(429, f"{reason}; retry in about {retry_after} s", type="overloaded", code=ErrorCode.OVERLOADED,
                   headers={"Retry-After": str(retry_after)})


def submit_job(store: JobStore, celery: Celery, request: GenerateRequest, queue: str = "interactive",
               owner: str | None = None) -> str:
    """Submit one job; see `submit_jobs`."""
    return submit_jobs(store, celery, [(request, queue)], owner=owner)[0]


def send_many(celery: Celery, job_ids: list[str], queue: str) -> None:
    """Send the Celery task of each (already recorded) job, pipelined: a batch's lines enqueued in bulk.

    The message is the one `send_task` builds (JSON, the job id as its only argument and as the
    task id), published in one Redis pipeline per few hundred jobs, without the per-message
    queue declaration and task-sent event that make `send_task` cost a millisecond each.
    """
    with celery.producer_or_acquire() as producer, producer.batch(max_size=500):
        for job_id in job_ids:
            headers, properties, body, _ = celery.amqp.as_task_v2(job_id, GENERATE_TASK, args=[job_id],
                                                                  argsrepr=f"['{job_id}']", kwargsrepr="{}")
            producer.publish(body, exchange="", routing_key=queue, serializer="json", headers=headers,
                             declare=[], retry=False, delivery_mode=2, **properties)
