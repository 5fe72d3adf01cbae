"""The original LLaVA worker endpoint, byte-compatible: NUL-delimited JSON frames of cumulative text."""

import asyncio

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from api.deps import Hub, Registry, Store, Submissions
from api.errors import ApiError
from api.routes.models import served_models
from api.stream import JobNotFound, ServerStopping, StreamEvent, follow_job, with_keepalives
from shared.jobs import JobStore
from shared.protocol import SERVER_ERROR_MSG, ErrorCode, GenerateRequest, InvalidRequest, encode_chunk, parse_request

router = APIRouter(tags=["llava"])

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


async def cancel_unless_ended(store: JobStore, job_id: str) -> None:
    """Cancel a job whose client left; shielded, because the client leaving cancels the caller."""
    with anyio.CancelScope(shield=True):
        await asyncio.to_thread(store.cancel, job_id)


@router.post("/worker_generate_stream", response_class=StreamingResponse)
async def worker_generate_stream(request: Request, store: Store, hub: Hub, submitter: Submissions,
                                 registry: Registry):
    """Generate like the original worker: frames `{"text": prompt + output, "error_code": 0}` each followed by NUL.

    A bad request is answered 400 with one error frame (so original clients show the message). A
    `model` that no live worker serves gets the original controller's `{"text": <server error>,
    "error_code": 2}` frame. A failed job ends with `{"text": <server error>, "error_code": 1}`.
    A client that disconnects cancels the job, unless the request says `"keep_on_disconnect": true`.
    The `X-Job-Id` response header names the job.
    """
    try:
        body = parse_request(await request.body(), StreamRequest)
    except InvalidRequest as exc:
        return Response(encode_chunk(exc.message, ErrorCode.INVALID_REQUEST), status_code=400)
    if body.model and body.model not in served_models(await asyncio.to_thread(registry.workers)):
        # No media type: the original answers with no Content-Type header.
        return Response(encode_chunk(SERVER_ERROR_MSG, ErrorCode.NO_WORKER), media_type=None)
    try:
        # Behind API keys (the default), the job is the key's, and counts against its queued-job quota.
        owner = getattr(request.state, "api_key", None)
        job_id = await asyncio.to_thread(submitter.submit_one, body, "interactive", owner)
    except ApiError as exc:
        # Refused (queue full, broker away): one frame that says why, so original clients show it.
        return Response(encode_chunk(exc.message, exc.code), status_code=exc.status, headers=exc.headers,
                        media_type=None)

    async def frames():
        ended = sent = False
        keepalive = request.app.state.settings.llava_keepalive_seconds
        try:
            async for event in with_keepalives(follow_job(store, hub, job_id), keepalive):
                if event is None:
                    # Waiting (in the queue, say): an empty frame, which the original clients skip, keeps their
                    # 10-second read timeout from ending the stream (and so the job) while it waits.
                    yield b"\0"
                    continue
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
        finally:
            if not ended and not body.keep_on_disconnect:
                await cancel_unless_ended(store, job_id)

    return StreamingResponse(frames(), media_type=None, headers={JOB_ID_HEADER: job_id})
