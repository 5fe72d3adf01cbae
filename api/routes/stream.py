"""Streaming over WebSocket in the LLaVA chunk format `{"text", "error_code"}`.

`text` is the prompt followed by everything generated so far. The last message also has
`"done": true`, the job's `status`, `error` and `finish_reason`. Every message carries the job `id`.
"""

import asyncio
import logging
from collections.abc import Awaitable
from contextlib import aclosing
from typing import Literal

import redis
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.auth import owns
from api.deps import ApiKey, Hub, Store, Submissions
from api.errors import ApiError, store_unavailable
from api.routes.controller import read_original_body
from api.routes.llava import cancel_unless_ended
from api.routes.openai import job_id_of
from api.stream import JobGone, JobNotFound, SendClock, ServerStopping, StreamEvent, follow_job, stalled
from shared.protocol import ErrorCode, InvalidRequest, JobRequest

log = logging.getLogger("llava_queue.api")

router = APIRouter(tags=["stream"])

# What sending on a socket whose client has left raises: WebSocketDisconnect, or Starlette's RuntimeError once it
# has seen the socket closed.
CLIENT_GONE = (WebSocketDisconnect, RuntimeError)


def send_timeout(websocket: WebSocket) -> float:
    """How long one message may wait to be sent before its client counts as gone (Settings.stream_send_timeout_seconds,
    "the send timeout" below)."""
    return websocket.app.state.settings.stream_send_timeout_seconds


def ws_message(job_id: str, event: StreamEvent) -> dict:
    """The WebSocket message of one event."""
    message = {"text": event.text, "error_code": event.error_code, "id": job_id}
    if event.done:
        message.update(done=True, status=event.status, error=event.error or None,
                       finish_reason=event.finish_reason or None)
    return message


async def _relay(websocket: WebSocket, store: Store, hub: Hub,
                 job_id: str) -> Literal["ended", "left", "stopping", "unavailable"]:
    """Send the job's events until it ends ("ended"), the client leaves or stops reading ("left"), the API shuts down
    ("stopping": the socket is closed with 1012, Service Restart, and a reason that names the job, which goes on) or
    Redis goes away ("unavailable", see _send_unavailable)."""
    clock = SendClock()
    sending = asyncio.create_task(_send_events(websocket, store, hub, job_id, clock))
    leaving = asyncio.create_task(_client_left(websocket))
    timeout = send_timeout(websocket)
    watch = asyncio.create_task(stalled(clock, timeout))
    try:
        await asyncio.wait({sending, leaving, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        watch.cancel()
        if not sending.done():
            sending.cancel()
            await asyncio.wait({sending})
    if sending.cancelled():
        if watch.done() and not watch.cancelled():
            log.warning("the client of job %s read nothing for %s s; leaving it", job_id, timeout)
            return "left"
        leaving.result()  # the client left (an error in reading the socket goes on up)
        return "left"
    try:
        sending.result()
    except JobGone as exc:
        if not await _send_gone(websocket, job_id, exc.text):
            return "left"
    except JobNotFound:
        if not await _send_not_found(websocket, job_id):
            return "left"
    except CLIENT_GONE:
        return "left"
    except ServerStopping:
        await _close(websocket, 1012, f"the API is restarting; job {job_id} goes on at /v1/jobs/{job_id}/ws", job_id)
        return "stopping"
    except redis.RedisError as exc:
        log.warning("the stream of job %s lost Redis: %s", job_id, exc)
        return await _send_unavailable(websocket, job_id, exc)
    return "ended"


async def _send_events(websocket: WebSocket, store: Store, hub: Hub, job_id: str, clock: SendClock) -> None:
    """Send the job's events until it ends, each one's start on `clock`. Raises what follow_job raises, and
    CLIENT_GONE."""
    loop = asyncio.get_running_loop()
    async with aclosing(follow_job(store, hub, job_id)) as events:
        async for event in events:
            clock.since = loop.time()
            await websocket.send_json(ws_message(job_id, event))
            clock.since = None


async def _client_left(websocket: WebSocket) -> None:
    """Return once the client has closed the socket or the connection is lost. Nothing is sent while a job waits
    queued, so without this a follower learned that its client had left only at the job's first chunk. What the
    client sends is read and dropped: unread, it stops uvicorn reading the socket, the client's close included."""
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


async def _send_unavailable(websocket: WebSocket, job_id: str,
                            exc: redis.RedisError) -> Literal["left", "unavailable"]:
    """Redis is away, so the job can be neither followed nor cancelled: a final chunk that says so, then 1013 (Try
    Again Later) and a reason that names the job, which goes on at its worker. Without it the error left the
    endpoint (a WebSocket has no exception handler to answer the app's 503): a traceback, and a stream cut short.
    "left" when the client left before it (the caller cancels the job, if Redis lets it)."""
    message = store_unavailable(exc).message
    if not await _within_send_timeout(websocket, websocket.send_json(
            {"text": message, "error_code": ErrorCode.SERVER_ERROR, "id": job_id, "done": True,
             "status": "unavailable", "error": message}), job_id):
        return "left"
    await _close(websocket, 1013, f"the job store is unavailable; job {job_id} goes on at /v1/jobs/{job_id}/ws", job_id)
    return "unavailable"


async def _send_not_found(websocket: WebSocket, job_id: str) -> bool:
    """The final message for an unknown job id; False when the client left before it (that is not an error) or read
    nothing for the send timeout."""
    return await _within_send_timeout(websocket, websocket.send_json(
        {"text": "", "error_code": ErrorCode.NOT_FOUND, "id": job_id, "done": True, "status": "unknown",
         "error": f"unknown job id {job_id!r}"}), job_id)


async def _send_gone(websocket: WebSocket, job_id: str, text: str) -> bool:
    """The final message for a job whose record went while it was streamed (Redis restarted without its data, the key
    deleted): the text streamed so far stays, and the error says what happened. It was the answer for an id never
    known, "unknown job id", with an empty text, which took back every word the client had been sent. False when the
    client left before it, or read nothing for the send timeout."""
    error = (f"job {job_id} is gone: its record left Redis while it was streamed (Redis restarted without its data, "
             "or the record was deleted); its text ends here")
    return await _within_send_timeout(websocket, websocket.send_json(
        {"text": text, "error_code": ErrorCode.NOT_FOUND, "id": job_id, "done": True, "status": "unknown",
         "error": error}), job_id)


@router.websocket("/v1/jobs/{job_id}/ws")
async def job_stream(websocket: WebSocket, job_id: str, store: Store, hub: Hub, api_key: ApiKey) -> None:
    """Stream an existing job: its current text first, then every chunk, then how it ended. A chat completion's id
    (`chatcmpl-<job id>`) names its job here too, as at `GET /v1/jobs/{id}`; the messages name the job id."""
    job_id = job_id_of(job_id)
    await websocket.accept()
    try:
        foreign = api_key is not None and not owns(
            await asyncio.to_thread(store.redis.hget, store.key(job_id), "owner"), api_key)
    except redis.RedisError as exc:
        await _send_unavailable(websocket, job_id, exc)
        return
    if foreign:
        if await _send_not_found(websocket, job_id):
            await _close(websocket, job_id=job_id)
        return
    if await _relay(websocket, store, hub, job_id) == "ended":
        await _close(websocket, job_id=job_id)


async def _close(websocket: WebSocket, code: int = 1000, reason: str | None = None, job_id: str = "") -> None:
    """Close the socket from this side, unless the client has already: a client may leave as soon as it has the
    last message, and that is not an error (uvicorn would log one, with its traceback, for every such stream).

    The close waits, as a message does, while the client's unread data fill the socket: a client that reads nothing
    is let go after the send timeout (before, the endpoint waited for it for as long as it kept the connection).
    A close reason holds at most 123 bytes: a longer one is cut there, at a character's start.
    """
    if reason is not None:
        reason = reason.encode()[:123].decode(errors="ignore")
    await _within_send_timeout(websocket, websocket.close(code=code, reason=reason), job_id)


async def _within_send_timeout(websocket: WebSocket, sending: Awaitable[None], job_id: str = "") -> bool:
    """Await `sending` (a send or the close on `websocket`) for at most the send timeout. False when the client
    has left, or has read nothing for that long (logged: it is let go, where it held the endpoint for as long as it
    kept the connection)."""
    timeout = send_timeout(websocket)
    try:
        async with asyncio.timeout(timeout):
            await sending
    except CLIENT_GONE:
        return False
    except TimeoutError:
        log.warning("the client of %s read nothing for %s s; leaving it", f"job {job_id}" if job_id else "a stream",
                    timeout)
        return False
    return True


@router.websocket("/v1/ws")
async def submit_and_stream(websocket: WebSocket, store: Store, hub: Hub, submitter: Submissions,
                            api_key: ApiKey) -> None:
    """Take a job request as the first message, then stream that job. Leaving the socket cancels the job; the API
    shutting down does not (the close reason names the job)."""
    await websocket.accept()
    timeout = send_timeout(websocket)
    try:
        # A client that sends nothing is let go, as one that reads nothing is: it held the socket for ever.
        async with asyncio.timeout(timeout):
            first = await websocket.receive()
    except TimeoutError:
        await _reject(websocket, f"no job request came in the {timeout:g} s after the connection opened; send it as "
                                 "the first message", ErrorCode.INVALID_REQUEST)
        return
    if first["type"] == "websocket.disconnect":
        return
    try:
        # A binary frame holds the request's JSON too, read as a POST body of the original is.
        request = await read_original_body(websocket.app.state.json_parsers, first["text"]
                                           if first.get("text") is not None else first["bytes"], JobRequest)
        job_id = await asyncio.to_thread(submitter.submit_one, request, request.queue, api_key)
    except InvalidRequest as exc:
        await _reject(websocket, exc.message, ErrorCode.INVALID_REQUEST)
        return
    except ApiError as exc:  # the queue or this key's quota is full (429), or the broker is away (503)
        await _reject(websocket, exc.message, exc.code, exc.headers)
        return
    except redis.RedisError as exc:  # the app's 503 for Redis away, as a refusal on the socket
        refused = store_unavailable(exc)
        await _reject(websocket, refused.message, refused.code, refused.headers)
        return
    ended = await _relay(websocket, store, hub, job_id)
    if ended == "ended":
        await _close(websocket, job_id=job_id)
    elif ended == "left":
        # With Redis away it cannot be cancelled: it goes on (a warning names it).
        await cancel_unless_ended(store, job_id)


async def _reject(websocket: WebSocket, message: str, error_code: int, headers: dict[str, str] | None = None) -> None:
    """Refuse a submission on the socket: one final error chunk (with `retry_after` when the queue is full), then
    close."""
    reply = {"text": message, "error_code": error_code, "done": True, "status": "rejected", "error": message}
    if headers and "Retry-After" in headers:
        reply["retry_after"] = int(headers["Retry-After"])
    if not await _within_send_timeout(websocket, websocket.send_json(reply)):
        return
    await _close(websocket, 1008 if error_code == ErrorCode.INVALID_REQUEST else 1013)
