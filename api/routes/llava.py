"""The original LLaVA worker endpoint, byte-compatible: NUL-delimited JSON frames of cumulative text."""

import asyncio
import logging
import time

import anyio
import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute

from api.deps import Hub, Registry, Store, Submissions
from api.errors import ApiError, store_unavailable
from api.routes.controller import read_original_body
from api.routes.models import served_models
from api.stream import FollowingResponse, JobNotFound, ServerStopping, StreamEvent, follow_job, with_keepalives
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import SERVER_ERROR_MSG, ErrorCode, GenerateRequest, InvalidRequest, encode_chunk

log = logging.getLogger("llava_queue.api")


class FrameRefusals(APIRoute):
    """A route whose refusals go out as one frame that says why, with the refusal's status, never as the app's JSON
    error body, which clients of the original protocol cannot read (they take every body as frames:
    `data["text"]`, `data["error_code"]`). Covers those of its dependencies too (no API key: 401, over the key's
    rate limit: 429), and Redis away (503)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return refusal(exc)
            except redis.RedisError as exc:
                return refusal(store_unavailable(exc))

        return answer


router = APIRouter(tags=["llava"], route_class=FrameRefusals)

# The header that names the job behind a stream, so it can be polled at GET /v1/jobs/{id}.
JOB_ID_HEADER = "X-Job-Id"


class StreamRequest(GenerateRequest):
    """The original payload; `keep_on_disconnect` (llava-queue's) lets the job finish after the client leaves."""

    keep_on_disconnect: bool = False


def ending_frame(event: StreamEvent) -> bytes | None:
    """The frame that ends a job that did not succeed, as the original worker sends it; None after a success.

    A failed job streams the original's server error message with code 1 (the reason is in the job
    record); a cancelled or expired job (llava-queue's states) says so with its own code.
    """
    if not event.error_code:
        return None
    if event.status == "failed":
        return encode_chunk(SERVER_ERROR_MSG, ErrorCode.SERVER_ERROR)
    return encode_chunk(event.error or f"the job ended {event.status}", event.error_code)


def refusal(exc: ApiError) -> Response:
    """A refused request as one frame that says why (original clients read frames, never a JSON error body)."""
    # No media type: the original answers with no Content-Type header.
    return Response(encode_chunk(exc.message, exc.code), status_code=exc.status, headers=exc.headers,
                    media_type=None)


async def cancel_unless_ended(store: JobStore, job_id: str) -> None:
    """Cancel a job whose stream ends before it (its client left, its model's workers died); shielded, because the
    client leaving cancels the caller.

    With Redis away the job cannot be cancelled: it goes on (its record names it), and the stream ends quietly.
    """
    with anyio.CancelScope(shield=True):
        try:
            await asyncio.to_thread(store.cancel, job_id)
        except redis.RedisError as exc:
            log.warning("could not cancel job %s, whose stream ended, with Redis away: %s", job_id, exc)


class WorkerWatch:
    """Whether a stream's model has had no live worker for `grace` seconds on end, read once per call (the stream
    calls it at its keepalive ticks, never per chunk: two Redis round trips each).

    Live is what /list_models reads (`WorkerRegistry.workers`: the heartbeat key is there), draining workers included:
    one draining still runs the jobs it holds, this one's maybe.
    """

    def __init__(self, registry: WorkerRegistry, model: str, grace: float):
        self.registry, self.model, self.grace = registry, model, grace
        self.unserved_since: float | None = None

    def heard(self) -> None:
        """The job streamed a chunk: a worker runs it, whatever the registry says of its heartbeat."""
        self.unserved_since = None

    async def gone(self) -> bool:
        """Whether no live worker of the model was seen since `grace` seconds ago; raises redis' RedisError."""
        workers = await asyncio.to_thread(self.registry.workers)
        now = time.monotonic()
        if any(worker.get("model") == self.model for worker in workers):
            self.unserved_since = None
            return False
        if self.unserved_since is None:
            self.unserved_since = now
        return now - self.unserved_since >= self.grace


@router.post("/worker_generate_stream", response_class=StreamingResponse)
async def worker_generate_stream(request: Request, store: Store, hub: Hub, submitter: Submissions,
                                 registry: Registry):
    """Generate like the original worker: frames `{"text": prompt + output, "error_code": 0}` each followed by NUL.

    Every answer is frames, since the original clients parse nothing else. A bad request is answered
    with one error frame (code 4) and the status every endpoint gives it: 400 for malformed JSON, 422
    for a bad field. A `model` that no live worker serves gets the original controller's `{"text":
    <server error>, "error_code": 2}` frame. A refused job (queue full, Redis away) is one frame that
    says why, with the refusal's status. A failed job ends with `{"text": <server error>, "error_code":
    1}`, as the original worker's does whatever the cause, and so does a stream that loses Redis.
    A client that disconnects cancels the job, unless the request says `"keep_on_disconnect": true`.
    A job whose `model` has had no live worker for a heartbeat TTL while it waits (its only worker died) is ended
    as a disconnect ends it, and its stream with the original proxy's `{"text": <server error>, "error_code": 3}`.
    The `X-Job-Id` response header names the job.
    """
    try:
        body = await read_original_body(request.app.state.json_parsers, await request.body(), StreamRequest)
    except InvalidRequest as exc:
        raise ApiError(exc.status, exc.message, param=exc.param) from None
    if body.model and body.model not in served_models(await asyncio.to_thread(registry.workers)):
        # No media type: the original answers with no Content-Type header.
        return Response(encode_chunk(SERVER_ERROR_MSG, ErrorCode.NO_WORKER), media_type=None)
    # With API keys on, the job is the key's, and counts against its queued-job quota. A refusal (the
    # queue or the key's quota full, the broker or Redis away) goes out as a frame (FrameRefusals).
    owner = getattr(request.state, "api_key", None)
    job_id = await asyncio.to_thread(submitter.submit_one, body, "interactive", owner)

    async def frames():
        ended = sent = False
        settings = request.app.state.settings
        events = with_keepalives(follow_job(store, hub, job_id), settings.llava_keepalive_seconds)
        # The keepalives below keep the original client reading for as long as the job waits; with its model's only
        # worker dead, that is for ever (the original's client met a refused connection at once). So a job whose
        # model has had no live worker for one heartbeat TTL ends: a worker is dropped from the registry a TTL after
        # its last heartbeat, and a TTL more lets one whose heartbeat came late (a slow host, a Redis blip), or one
        # restarted that is back as fast, announce itself again. A job naming no model waits for any worker, as it
        # is accepted with none up.
        watch = WorkerWatch(registry, body.model, settings.heartbeat_ttl_seconds) if body.model else None
        try:
            async for event in events:
                if event is None:
                    if watch is not None and await watch.gone():
                        ended = True
                        if not body.keep_on_disconnect:
                            await cancel_unless_ended(store, job_id)
                        # The frame of the original controller's proxy for a worker request that failed.
                        yield encode_chunk(SERVER_ERROR_MSG, ErrorCode.WORKER_FAILED)
                        return
                    # Waiting (in the queue, say): an empty frame, which the original clients skip, keeps their
                    # 10-second read timeout from ending the stream (and so the job) while it waits.
                    yield b"\0"
                    continue
                if watch is not None:
                    watch.heard()
                if not event.done:
                    sent = True
                    yield encode_chunk(event.text)
                    continue
                ended = True
                frame = ending_frame(event)
                if frame:
                    yield frame
                elif not sent:
                    # The original always sends a frame, the prompt alone if nothing was generated
                    # (its web server fails on a stream with none).
                    yield encode_chunk(event.text)
        except JobNotFound:
            ended = True
            yield encode_chunk(SERVER_ERROR_MSG, ErrorCode.SERVER_ERROR)
        except ServerStopping:
            # The API shuts down, the job goes on (X-Job-Id): the original's frame for a worker that went away.
            ended = True
            yield encode_chunk(SERVER_ERROR_MSG, ErrorCode.SERVER_ERROR)
        except redis.RedisError as exc:
            # Redis went away: the same frame, not a stream cut short. The job cannot be cancelled now; it goes on.
            log.warning("the stream of job %s lost Redis: %s", job_id, exc)
            ended = True
            yield encode_chunk(SERVER_ERROR_MSG, ErrorCode.SERVER_ERROR)
        finally:
            # Closed now, its subscription with it: a bare `async for` leaves that to the collector.
            await events.aclose()
            if not ended and not body.keep_on_disconnect:
                await cancel_unless_ended(store, job_id)

    return FollowingResponse(frames(), job_id=job_id,
                             send_timeout=request.app.state.settings.stream_send_timeout_seconds,
                             media_type=None, headers={JOB_ID_HEADER: job_id})
