"""Following a job's output: subscribe to its pub/sub channel, then read the record, so nothing is lost.

Every stream endpoint (WebSocket, the LLaVA NUL-delimited stream, OpenAI's server-sent events) is this
one follower plus an encoder for its wire format.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from api.channel_hub import STOPPING, ChannelHub, ServerStopping
from shared.jobs import FINAL_STATES, JobStore, Snapshot

log = logging.getLogger("llava_queue.api")


class JobNotFound(LookupError):
    """The job id is unknown (never existed, or its record expired)."""


class JobGone(JobNotFound):
    """The job's record was there when its stream began and is gone now (Redis restarted without its data, the key
    deleted): `text` is the prompt and text the stream had of it."""

    def __init__(self, job_id: str, text: str):
        super().__init__(job_id)
        self.text = text


@dataclass
class StreamEvent:
    """What a listener sees: `text` is the prompt followed by everything generated so far (`prompt` alone); `tokens`
    the job's count of generated tokens with that text, as its chunk message or its record said."""

    text: str
    done: bool = False
    status: str = "running"
    error: str = ""
    error_code: int = 0
    finish_reason: str = ""
    prompt: str = ""
    tokens: int = 0


@dataclass
class _Progress:
    prompt: str
    text: str
    seq: int
    tokens: int = 0

    def event(self) -> StreamEvent:
        return StreamEvent(self.prompt + self.text, prompt=self.prompt, tokens=self.tokens)


def _final(progress: _Progress, snap: Snapshot | dict) -> StreamEvent:
    get = snap.get if isinstance(snap, dict) else lambda name, default=None: getattr(snap, name, default)
    return StreamEvent(progress.prompt + progress.text, done=True, status=get("status"), error=get("error") or "",
                       error_code=int(get("error_code") or 0), finish_reason=get("finish_reason") or "",
                       prompt=progress.prompt)


async def follow_job(store: JobStore, hub: ChannelHub, job_id: str) -> AsyncIterator[StreamEvent]:
    """Yield an event for the current text (if any), one per new chunk, and a last one with `done`.

    Raises JobNotFound if the job does not exist (JobGone when its record goes while it is followed), ServerStopping
    when the API shuts down (the job goes on), and redis' RedisError when a read of the record finds Redis away (the
    job goes on too, at its worker): an outage over before the next read (at most twice
    channel_hub.QUIET_TICK_SECONDS after the last message) passes unseen; each endpoint ends its stream on the error
    in its own format.
    """
    async with hub.subscribe(store.channel(job_id)) as messages:
        snap = await asyncio.to_thread(store.snapshot, job_id)
        if snap is None:
            raise JobNotFound(job_id)
        progress = _Progress(snap.prompt, snap.text, snap.seq, snap.tokens)
        if snap.text:
            yield progress.event()
        if snap.status in FINAL_STATES:
            yield _final(progress, snap)
            return
        while True:
            payload = await _next_message(messages)
            data = None if payload is None else json.loads(payload)
            if data is not None and data["seq"] <= progress.seq:
                continue
            if data is None or data["seq"] != progress.seq + 1:
                # Missed something (or quiet for long): the record is the truth.
                snap = await asyncio.to_thread(store.snapshot, job_id)
                if snap is None:
                    raise JobGone(job_id, progress.prompt + progress.text)
                changed = snap.text != progress.text or snap.prompt != progress.prompt
                progress = _Progress(snap.prompt, snap.text, snap.seq, snap.tokens)
                if changed and progress.text:
                    yield progress.event()
                if snap.status in FINAL_STATES:
                    yield _final(progress, snap)
                    return
                continue
            progress.seq = data["seq"]
            if "delta" in data:
                progress.text += data["delta"]
                progress.tokens = data.get("tokens", 0)
                yield progress.event()
            elif "prompt" in data:
                progress.prompt = data["prompt"]
            elif data.get("done"):
                yield _final(progress, data)
                return


async def with_keepalives(events: AsyncIterator[StreamEvent], every: float) -> AsyncIterator[StreamEvent | None]:
    """`events`, with a None whenever `every` seconds pass without one (for a wire format's keepalive)."""
    iterator = aiter(events)
    pending = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(anext(iterator))
    finally:
        # Cancelling the step in flight closes `events` (its subscription) now, not when it is collected; with no step
        # in flight, `events` waits at a yield, and is closed here. Left to the collector, its close could come while
        # a step it had not seen cancelled still ran it ("aclose(): asynchronous generator is already running", logged
        # as an asyncio error, its subscription held meanwhile).
        pending.cancel()
        with anyio.CancelScope(shield=True), suppress(asyncio.CancelledError, Exception):
            await pending
        with anyio.CancelScope(shield=True), suppress(Exception):
            await events.aclose()


async def _next_message(messages: asyncio.Queue) -> str | None:
    """The next payload; None when the hub says messages may have been lost, or that the channel has been quiet a
    while. Raises ServerStopping when the API shuts down."""
    payload = await messages.get()
    if payload is STOPPING:
        raise ServerStopping
    return payload


class SendClock:
    """When the message being sent began to wait (the loop's time), None between messages."""

    since: float | None = None


async def stalled(clock: SendClock, timeout: float) -> None:
    """Return once a message has waited `timeout` seconds to be sent (seen within a quarter of that more): the
    client reads nothing, and its follower would wait for ever (uvicorn's own close of such a connection waits
    for its unread data to be sent). One watch per stream, where a timeout around every message cost a timer each:
    a fifth of the API's CPU per message relayed (bench/README.md)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(timeout / 4)
        if clock.since is not None and loop.time() - clock.since >= timeout:
            return


# In an HTTP request's scope: its response watches its own sends (FollowingResponse), which SendDeadline leaves alone.
SEND_WATCHED = "llava_queue.send_watched"
# SendDeadline sends a larger body in pieces of this many bytes: uvicorn waits for a paused transport before a send,
# never after, so a body sent whole sits in the transport's buffer, however slowly the client reads. (The buffer's
# high-water mark: a client reading 3.2 KB/s or more is never cut off by the 20 s timeout; 256 KB pieces asked 10.)
BODY_PIECE_BYTES = 64 * 1024


class SendDeadline:
    """ASGI middleware: an HTTP response one of whose sends has waited `timeout` seconds (a client that reads
    nothing) is let go: its request is cancelled and uvicorn closes the connection, as FollowingResponse lets a
    stream's go. A plain response (a file's content, a batch's results) was held for as long as its client kept the
    connection: 10 clients that never read a 32 MiB file held 650 MB of the API for good.

    A timer a send, which gives up the send only if it still waits two passes of the event loop later: a send whose
    wait ended as the timer came (the loop busy past both) goes on. (A task a send, with its timeout, put a pass of the
    loop between a response's head and its body, where the next request's first bytes could come and find the
    response not complete.) A job's stream watches its sends itself (`SEND_WATCHED`, one watch a stream, where a
    timeout a message cost a fifth of the API's CPU per message relayed).
    """

    def __init__(self, app, timeout: float):
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        sent, expired = 0, False

        def give_up(number: int) -> None:
            nonlocal expired
            if sent == number and not expired:  # that send still waits
                expired = True
                task.cancel()

        async def send_by_deadline(message: Message) -> None:
            nonlocal sent
            if scope.get(SEND_WATCHED):
                await send(message)
                return
            body = message.get("body", b"") if message["type"] == "http.response.body" else b""
            pieces = ([dict(message, body=body[at:at + BODY_PIECE_BYTES], more_body=True)
                       for at in range(0, len(body), BODY_PIECE_BYTES)] if len(body) > BODY_PIECE_BYTES else [])
            if pieces:
                pieces[-1]["more_body"] = message.get("more_body", False)
            for piece in pieces or [message]:
                timer = loop.call_later(self.timeout, loop.call_soon, loop.call_soon, give_up, sent)
                try:
                    await send(piece)
                finally:
                    timer.cancel()
                    sent += 1

        try:
            await self.app(scope, receive, send_by_deadline)
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel()
            log.warning("the client of %s %s read nothing for %s s; leaving it", scope.get("method"),
                        scope.get("path"), self.timeout)


class FollowingResponse(StreamingResponse):
    """A job's stream over HTTP (LLaVA's NUL-delimited frames, OpenAI's server-sent events) that lets go of a client
    that reads nothing, as the WebSocket routes let theirs go: once a message has waited `send_timeout` seconds to
    be sent, the response ends there (uvicorn closes the connection, and logs that the response was not completed),
    and `content` is closed, so its `finally` runs (the job is cancelled unless it is kept). Starlette's waited on
    that send for as long as the client kept its connection, still subscribed to the job's chunks.

    `content` is closed whatever ends the response, a client that left included: Starlette leaves that to the
    collector.
    """

    def __init__(self, content: AsyncIterator, *, job_id: str, send_timeout: float, **kwargs):
        super().__init__(content, **kwargs)
        self.job_id = job_id
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SEND_WATCHED] = True
        clock = SendClock()
        loop = asyncio.get_running_loop()

        async def send_on_the_clock(message: Message) -> None:
            clock.since = loop.time()
            await send(message)
            clock.since = None

        streaming = asyncio.ensure_future(super().__call__(scope, receive, send_on_the_clock))
        watch = asyncio.ensure_future(stalled(clock, self.send_timeout))
        try:
            await asyncio.wait({streaming, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            with anyio.CancelScope(shield=True):
                if not streaming.done():
                    streaming.cancel()
                    await asyncio.wait({streaming})
                with suppress(Exception):
                    await self.body_iterator.aclose()
        if streaming.cancelled():
            log.warning("the client of job %s read nothing for %s s; leaving it", self.job_id, self.send_timeout)
            return
        streaming.result()
