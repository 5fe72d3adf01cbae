"""The FastAPI application: routes, the gateway, and the connections they share."""

import asyncio
import logging
import resource
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from fastapi import Depends, FastAPI
from starlette.routing import Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from api.auth import FailedKeys, api_key_if_sent, require_api_key, require_api_key_for_reads
from api.channel_hub import ChannelHub
from api.errors import ApiError, error_response, install_error_handlers, methods_at
from api.json_bodies import JsonParsers
from api.origin import AllowedOrigins, Cors, OriginCheck
from api.stream import SendDeadline
from api.submission import Submitter
from api.routes import (batches, controller, files, health, jobs, llava, metrics, models, openai, page,
                        stream)
from api.routes.llava import FrameRefusals, refusal
from shared.celery_app import make_celery
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import set_max_new_tokens_cap
from shared.settings import Settings, get_settings


log = logging.getLogger("llava_queue.api")

# At shutdown, how long the streams get to send their last word before uvicorn closes the connections, and then
# how long it waits for requests still answering before it cancels them.
STREAMS_STOP_SECONDS = 0.2
GRACEFUL_SHUTDOWN_SECONDS = 10.0
# How long the lifespan's end waits for the pub/sub reader to stop (see _stop_hub).
HUB_STOP_SECONDS = 2.0
# How long a connection may take to send a request's head (request line and headers), from its opening or from the
# first byte after a response. uvicorn has no such limit: a client that connected and sent nothing, or a header a
# line at a time (slowloris), held its connection and a file descriptor for as long as it liked.
REQUEST_HEAD_TIMEOUT_SECONDS = 10.0
# How long a request's body may go without a byte while the API waits for it (nginx's client_body_timeout). A client
# that sent a head announcing a body, then stalled, held its connection until the API shut down, where its request
# was cancelled and logged as an unhandled exception.
REQUEST_BODY_IDLE_SECONDS = 20.0
# Past its first REQUEST_BODY_TIMEOUT_SECONDS, a request's body must come at this many bytes a second at least
# (Apache's mod_reqtimeout MinRate): see BodyDeadline.
REQUEST_BODY_MIN_RATE = 500
# How long a connection may stay idle between requests (uvicorn's keep-alive timeout; its default, 5 s, is shorter
# than a load balancer's or a client pool's idle timeout, typically 60 s: the API closed connections they were about
# to reuse, and the request sent on one failed, a 502 behind a balancer). nginx's keepalive_timeout.
KEEP_ALIVE_SECONDS = 75
# The most file descriptors the API asks for when the hard limit is unlimited (Linux refuses more than nr_open).
MAX_OPEN_FILES = 1 << 20


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, as nginx and other servers do; return the
    soft limit now. Every client holds a socket: at a distribution's usual soft limit, 1,024, the 1,025th client
    was dropped unanswered at accept, and every stream's read of Redis failed "Too many open files"."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open files limit from %d to %d (%s)", soft, wanted, exc)
            return soft
        log.info("open files limit raised from %d to %d", soft, wanted)
        soft = wanted
    return soft


def with_request_timeouts(protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """`protocol_class` (one of uvicorn's HTTP protocols), closing a connection that has not sent a whole request
    head within REQUEST_HEAD_TIMEOUT_SECONDS of its opening, or of its first byte after a response (the idle time
    between requests is uvicorn's keep-alive timeout), and one whose request body stalls: no byte of it for
    REQUEST_BODY_IDLE_SECONDS while the API waits for it (the request's handler then sees the client gone)."""

    class RequestTimeouts(protocol_class):
        _head_timer: asyncio.TimerHandle | None = None
        _body_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            self._cancel("_body_timer")
            if self.transport.get_protocol() is not self:  # the connection became a WebSocket
                self._cancel("_head_timer")
                return
            if self.cycle is not cycle:  # a request's head came (a new request cycle)
                self._cancel("_head_timer")
            elif (self.cycle is None or self.cycle.response_complete) and self._head_timer is None:
                # The first bytes of a request after a response: uvicorn has just cancelled its keep-alive timer.
                self._await_head()
            if self._awaits_body():
                self._body_timer = self.loop.call_later(REQUEST_BODY_IDLE_SECONDS, self._body_stalled)

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel("_head_timer")
            self._cancel("_body_timer")
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT_SECONDS, self._head_timed_out)

        def _awaits_body(self) -> bool:
            cycle = self.cycle
            return cycle is not None and cycle.more_body and not cycle.response_complete and not cycle.disconnected

        def _cancel(self, name: str) -> None:
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            self._close()

        def _body_stalled(self) -> None:
            self._body_timer = None
            if not self._awaits_body():
                return
            if self.flow.read_paused or self.cycle.waiting_for_100_continue:
                # Not the client's stall: the handler has not read what came yet, or not asked for the body (a client
                # that sent "Expect: 100-continue" waits for that).
                self._body_timer = self.loop.call_later(REQUEST_BODY_IDLE_SECONDS, self._body_stalled)
                return
            log.info("closed a connection whose request body stalled (no byte for %.0f s): %s %s",
                     REQUEST_BODY_IDLE_SECONDS, self.cycle.scope["method"], self.cycle.scope["path"])
            self._close()

        def _close(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    RequestTimeouts.__name__ = RequestTimeouts.__qualname__ = f"RequestTimeouts{protocol_class.__name__}"
    return RequestTimeouts


class ApiServer(uvicorn.Server):
    """uvicorn's server, which ends the API's streams before it waits for every response to finish: a stream would
    finish only with its job. The jobs go on; their clients follow them again on the API that takes over.

    It also raises the open files limit (raise_open_files_limit) and closes connections slow to send a request's
    head, or stalled in its body (with_request_timeouts)."""

    def __init__(self, config: uvicorn.Config) -> None:
        raise_open_files_limit()
        if not config.loaded and not getattr(config, "http2", False):
            http = config.http
            config.http = with_request_timeouts(import_from_string(HTTP_PROTOCOLS.get(http, http))
                                            if isinstance(http, str) else http)
        super().__init__(config)

    async def shutdown(self, sockets=None) -> None:
        hub = getattr(self.config.app.state, "hub", None)
        if hub is not None:
            hub.stop_followers()
            await asyncio.sleep(STREAMS_STOP_SECONDS)
        await super().shutdown(sockets)


async def _stop_hub(hub: ChannelHub) -> None:
    """Stop the pub/sub reader, waiting HUB_STOP_SECONDS at most. A reader cancelled just after the lifespan started
    (uvicorn failing to bind its port there) was seen to lose that cancellation and block on its next read for ever:
    the lifespan never ended, and the API process hung, deaf to SIGTERM, instead of exiting. Past the wait
    asyncio.wait_for cancels it again, and the process goes on ending."""
    try:
        await asyncio.wait_for(hub.aclose(), HUB_STOP_SECONDS)
    except TimeoutError:
        log.warning("the pub/sub reader did not stop within %s s; leaving it", HUB_STOP_SECONDS)


class BodyLimitAnswers:
    """The body limit's 413 in this API's own formats: one frame on a route that answers in frames, the JSON error
    elsewhere.

    FastAPI's `max_body_size` (Starlette's limit) answers a body over MAX_BODY_BYTES from outside every route and
    error handler, with a plain-text "Content Too Large" when the Content-Length says so. The original LLaVA web
    server parses every answer of /worker_generate_stream as frames: it failed on that one and its page stayed
    stuck. This wraps the whole app and answers any 413 instead (the limit is the only thing here that answers one).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, frame_paths: frozenset[str]):
        self.app, self.frame_paths = app, frame_paths
        self.error = ApiError(413, f"the request body is larger than {max_body_bytes} bytes, the most a request may "
                                   "hold (MAX_BODY_BYTES)", param="body")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = False

        async def send_in_format(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and message["status"] == 413:
                answered = True
                in_frames = scope["path"] in self.frame_paths
                response = refusal(self.error) if in_frames else error_response(self.error)
                await response(scope, receive, send)
            elif not answered:  # (what the limit sent after its own start goes nowhere)
                await send(message)

        await self.app(scope, receive, send_in_format)


class BodyDeadline:
    """ASGI middleware: a request's body must come within `seconds` of waiting for it, plus a second for every
    REQUEST_BODY_MIN_RATE bytes of it that came (Apache's `RequestReadTimeout body=20,MinRate=500`); past that the
    request is answered 408, in the route's format, and its connection closed. The idle limit closed a body with no
    byte for REQUEST_BODY_IDLE_SECONDS, but one sent a byte just before each held its connection, and a request
    handler, for ever.

    Only the time the route waits for the body counts: not the time it takes with what came (the API reads no more
    meanwhile), nor the time before it asks for the body (a client that sent "Expect: 100-continue" waits for that)."""

    def __init__(self, app: ASGIApp, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        waited, received, more = 0.0, 0, True

        async def receive_by_deadline() -> Message:
            nonlocal waited, received, more
            if not more:  # the body is in: what comes now is the client leaving, waited for as long as the answer
                return await receive()
            started = loop.time()
            try:
                async with asyncio.timeout(self.seconds + received / REQUEST_BODY_MIN_RATE - waited):
                    message = await receive()
            except TimeoutError:
                raise self._too_slow(scope, received, loop.time() - started + waited) from None
            waited += loop.time() - started
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
            return message

        await self.app(scope, receive_by_deadline, send)

    def _too_slow(self, scope: Scope, received: int, waited: float) -> ApiError:
        log.info("answered 408 to a request whose body came too slowly (%d bytes in %.0f s): %s %s", received, waited,
                 scope["method"], scope["path"])
        return ApiError(408, f"the request body came too slowly: {received} bytes in {waited:.0f} s, where a body may "
                             f"take {self.seconds:g} s (REQUEST_BODY_TIMEOUT_SECONDS) and a second more for every "
                             f"{REQUEST_BODY_MIN_RATE} bytes", type="timeout", param="body",
                        headers={"Connection": "close"})


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET is (its status and headers, no body) at every path where a route takes
    GET and none takes HEAD, as HTTP has it and Starlette's own routes do. FastAPI's routes take only the methods they
    name: `HEAD /healthz` or `HEAD /v1/models`, which uptime checks and load balancers send, was a 405."""

    def __init__(self, app: ASGIApp, router: Router):
        self.app, self.router = app, router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = scope["type"] == "http" and scope["method"] == "HEAD"
        methods = methods_at(self.router.routes, scope) if head else set()
        if "GET" not in methods or "HEAD" in methods:
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        # (The servers in front see HEAD still: they send no body, and log the request as it came.)
        await self.app({**scope, "method": "GET"}, receive, without_body)


class _Api(FastAPI):
    """FastAPI, with the body limit's refusals in the API's formats (BodyLimitAnswers, outside everything but
    SendDeadline, which lets go of a client that reads nothing of a response), and a deadline on request bodies
    (BodyDeadline)."""

    send_timeout: float = 20.0
    body_timeout: float = 60.0

    def build_middleware_stack(self) -> ASGIApp:
        # (The router's own routes: the app holds included routers, not their routes. It has no prefix.)
        frame_paths = frozenset(route.path for route in llava.router.routes if isinstance(route, FrameRefusals))
        app = BodyDeadline(super().build_middleware_stack(), self.body_timeout)
        return SendDeadline(BodyLimitAnswers(app, self.max_body_size, frame_paths), self.send_timeout)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    set_max_new_tokens_cap(settings.max_new_tokens_cap)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.job_ttl_seconds,
                                            settings.max_queued_jobs, settings.max_queued_jobs_per_key,
                                            idempotency_ttl_seconds=settings.idempotency_ttl_seconds)
        app.state.registry = WorkerRegistry(app.state.store.redis, settings.key_prefix)
        # Named, so that CLIENT LIST shows which connection is the API's stream subscriber.
        app.state.aredis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True,
                                                   client_name="llava-queue-api")
        app.state.hub = ChannelHub(app.state.aredis)
        app.state.hub.start()
        app.state.celery = make_celery(settings)
        app.state.submitter = Submitter(app.state.store, app.state.celery)
        app.state.failed_keys = FailedKeys()  # the client addresses refused for their wrong API keys
        app.state.json_parsers = JsonParsers()  # heavy request bodies are parsed there (api.json_bodies)
        await app.state.json_parsers.start()
        yield
        await app.state.json_parsers.close()
        await _stop_hub(app.state.hub)
        await app.state.aredis.aclose()
        app.state.store.redis.close()

    app = _Api(title="llava-queue", version="0.1.0", lifespan=lifespan, max_body_size=settings.max_body_bytes,
               description="An async job queue serving LLaVA-style models with continuous batching.")
    app.send_timeout = settings.stream_send_timeout_seconds  # SendDeadline's, as the streams'
    app.body_timeout = settings.request_body_timeout_seconds
    install_error_handlers(app)
    # The Origin check runs first (the last added is outermost): a page not allowed is refused before CORS or a
    # route sees it. CORS is there even with no origin configured, so that a refused preflight says what to set.
    allowed = AllowedOrigins(settings.cors_origins, settings.public_url)
    app.add_middleware(HeadAsGet, router=app.router)  # (innermost: the checks before it see HEAD, as it came)
    app.add_middleware(Cors, allowed=allowed)
    app.add_middleware(OriginCheck, allowed=allowed)
    for module in (health, metrics, page):
        app.include_router(module.router)
    # Everything else needs an API key when keys are configured. The original LLaVA clients cannot
    # send one: an operator who runs them behind keys may leave their protocol open.
    protected = [jobs, stream, openai, models, batches, files]
    if settings.public_llava_protocol:
        for module in (llava, controller):
            app.include_router(module.router, dependencies=[Depends(api_key_if_sent)])
    else:
        protected += [llava, controller]
    for module in protected:
        # The model list is read often (the chat page polls it): counted apart from the key's other requests.
        check = require_api_key_for_reads if module is models else require_api_key
        app.include_router(module.router, dependencies=[Depends(check)])
    # With no API keys, `llava-queue api` warns once it listens, naming where (its --host, not only LLAVA_QUEUE_HOST).
    return app


app = create_app()
