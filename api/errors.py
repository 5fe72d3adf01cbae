"""Errors as values the client can read: one JSON body for every 4xx/5xx."""

import logging
from collections.abc import Sequence

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.routing import BaseRoute, Match
from starlette.types import Scope
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocket, WebSocketState

from shared.jobs import DamagedRecord
from shared.logs import Throttle
from shared.protocol import ErrorCode, InvalidRequest, describe_validation_error

log = logging.getLogger("llava_queue.api")
# While Redis refuses, every request gets its 503: one line at most this often, counting the others, so the outage is
# in the log without burying it.
UNAVAILABLE_LOG_INTERVAL_SECONDS = 10.0


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status. `code` is
    llava-queue's error code, or one of OpenAI's own string codes where its clients look for it (MODEL_NOT_FOUND)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: int | str = ErrorCode.INVALID_REQUEST, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = answered_code(code)
        self.headers = headers


def answered_code(code: int | str) -> int | str:
    """An error's `code` as its body carries it: llava-queue's as a plain int (not an ErrorCode), OpenAI's string."""
    return code if isinstance(code, str) else int(code)


# OpenAI's code for a model it does not serve (404), which OpenAI's clients and tools test for to tell a wrong model
# name from a wrong URL; llava-queue's own (NO_WORKER, 2) was answered there.
MODEL_NOT_FOUND = "model_not_found"


def error_body(message: str, type: str, param: str | None, code: int | str) -> dict:
    """The JSON body of every error response (the OpenAI error shape, with llava-queue's error code or OpenAI's, see
    ApiError)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    """An ApiError as the response every endpoint answering JSON gives it."""
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


def job_not_found(job_id: str) -> ApiError:
    return ApiError(404, f"unknown job id {job_id!r} (it never existed, or its record expired)",
                    type="not_found", param="id", code=ErrorCode.NOT_FOUND)


# The operator's line for 503s answered because Redis (the job store or the broker) is away or refuses. Those were
# answered and logged nowhere but in INFO access lines: a Redis out of memory or read-only failed every submission while
# the API's log said nothing about why.
_unavailable_lines = Throttle(UNAVAILABLE_LOG_INTERVAL_SECONDS)
# And a damaged record read again and again (a client polling it, or a list of jobs holding it): one line in each
# interval too.
_damaged_lines = Throttle(UNAVAILABLE_LOG_INTERVAL_SECONDS)


def log_damaged(message: str) -> None:
    """Log `message` about a damaged job record: one WARNING line in each interval, counting those turned down."""
    more = _damaged_lines.due()
    if more is not None:
        log.warning("%s%s", message, f" ({more} more such lines since the last one)" if more else "")


def log_unavailable(what: str, exc: Exception) -> None:
    """Log that `what` (the job store, the queue) answered `exc`: one ERROR line in each interval, counting the 503s
    answered in between."""
    more = _unavailable_lines.due()
    if more is None:
        return
    since = f" ({more} more 503s since the last such line)" if more else ""
    log.error("%s is unavailable (%s: %s): requests are answered 503%s; check the Redis at LLAVA_QUEUE_REDIS_URL "
              "(`llava-queue status`, its log, its memory)", what, type(exc).__name__, exc, since)


def store_unavailable(exc: redis.RedisError) -> ApiError:
    """Redis away (restarting, network) or refusing (out of memory, read-only): say so, and log it (see
    log_unavailable); the API recovers by itself when it is back."""
    log_unavailable("the job store (Redis)", exc)
    return ApiError(503, f"the job store is unavailable, try again shortly: {exc}", type="unavailable",
                    code=ErrorCode.SERVER_ERROR, headers={"Retry-After": "5"})


def body_not_json(request: Request, errors: list[dict]) -> ApiError | None:
    """The 400 for a body refused whole because it did not say it is JSON: FastAPI reads a body as JSON only then
    (curl -d sends a form type), and pydantic's own message ("a valid dictionary") does not say why."""
    content_type = request.headers.get("content-type", "")
    if "json" in content_type or not any(tuple(error.get("loc", ())) == ("body",) for error in errors):
        return None
    return ApiError(400, "send the body as JSON, with 'Content-Type: application/json' (it came as "
                         f"{content_type or 'no type'!r})")


# What FastAPI raises (an HTTPException 400) for a body it cannot read, a JSON body not in UTF-8 among them.
_FASTAPI_UNPARSED_BODY = "There was an error parsing the body"
# OpenAI's answers, by status, to a URL under /v1 that it does not serve and to a method its path does not take, as
# `{message} ({method} {path})`. Starlette's "Not Found" and "Method Not Allowed", typed http_error, were answered
# there: an OpenAI client with a wrong base URL (`.../v1/v1`, `/v1/chat/completion`) got neither OpenAI's message nor
# its type.
_OPENAI_ROUTING_ERRORS = {404: "Invalid URL", 405: "Invalid method for URL"}


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the `error_body` shape: an ApiError as it says, Redis away as a 503, a client gone
    mid-body and malformed JSON as a 400, a bad field as a 422 that names it, and Starlette's own HTTP errors."""

    @app.exception_handler(ApiError)
    async def _api_error(conn: HTTPConnection, exc: ApiError) -> JSONResponse | None:
        if isinstance(conn, WebSocket) and conn.client_state != WebSocketState.CONNECTING:
            await conn.close(1008, exc.message[:120])  # accepted already: the close says why
            return None
        # On a WebSocket not accepted yet (a refused API key, the rate limit), the answer goes out in the place of the
        # upgrade (ASGI's denial response): its status, headers and JSON body, as on HTTP.
        return error_response(exc)

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return await _api_error(request, store_unavailable(exc))

    @app.exception_handler(DamagedRecord)
    async def _damaged(request: Request, exc: DamagedRecord) -> JSONResponse:
        # A job whose record key holds another type than a hash (a key SET by hand): 500 saying so, as one whose hash
        # lacks its fields is (`job_view`). Its WRONGTYPE, a Redis error, was answered 503 "the job store is
        # unavailable, try again shortly" and logged as an outage: a client polling the job, or cancelling it, was
        # told to retry for ever. (Not 404: the key is there, and no job can be made under it.)
        log_damaged(str(exc))
        return await _api_error(request, ApiError(500, exc.message, type="server_error", code=ErrorCode.SERVER_ERROR))

    @app.exception_handler(ClientDisconnect)
    async def _client_left(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # Answered to nobody: an endpoint reading its body when the client left (or its body stalled, see
        # api.main.with_request_timeouts) raised this, which the server logged as an unhandled exception.
        return JSONResponse(error_body("the client left before its request body came", "invalid_request_error", None,
                                       ErrorCode.INVALID_REQUEST), status_code=400)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse(error_body(exc.message, "invalid_request_error", exc.param, ErrorCode.INVALID_REQUEST),
                            status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        untyped = body_not_json(request, errors)
        if untyped:
            return JSONResponse(error_body(untyped.message, untyped.type, None, untyped.code), status_code=400)
        invalid = describe_validation_error(errors)
        return JSONResponse(error_body(invalid.message, "invalid_request_error", invalid.param,
                                       ErrorCode.INVALID_REQUEST), status_code=invalid.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.detail == _FASTAPI_UNPARSED_BODY and isinstance(exc.__cause__, UnicodeDecodeError):
            # A body FastAPI could not decode as JSON text at all: malformed JSON, as every other.
            return JSONResponse(error_body(f"malformed JSON: the body is not UTF-8 text ({exc.__cause__})",
                                           "invalid_request_error", None, ErrorCode.INVALID_REQUEST), status_code=400)
        message, error_type = str(exc.detail), "http_error"
        path = request.url.path
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and request.scope["type"] == "http":
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        # (Only the router answers these, and over HTTP: a route's own 404s are ApiErrors.)
        if (exc.status_code in _OPENAI_ROUTING_ERRORS and request.scope["type"] == "http"
                and (path == "/v1" or path.startswith("/v1/"))):
            message = f"{_OPENAI_ROUTING_ERRORS[exc.status_code]} ({request.method} {path})"
            error_type = "invalid_request_error"
        if exc.status_code == 404 and _takes_a_websocket(request):
            # (A plain GET of `/v1/ws` was "Invalid URL", or "Not Found": true, and no help to a client that forgot
            # the upgrade.)
            message += f": {path} takes a WebSocket (ws:// or wss://), not a plain HTTP request"
        return JSONResponse(error_body(message, error_type, None, ErrorCode.INVALID_REQUEST),
                            status_code=exc.status_code, headers=headers)


def methods_at(routes: Sequence[BaseRoute], scope: Scope) -> set[str]:
    """Every method some route of `routes` takes at the path of `scope` (an HTTP request's), as the routes name them."""
    methods = set()
    for route in iter_route_contexts(routes):
        if route.methods and route.matches(dict(scope))[0] != Match.NONE:
            methods |= route.methods
    return methods


def _allowed_methods(request: Request) -> list[str]:
    """Every method the app takes at the request's path, sorted: a 405's Allow. The router's own named the methods of
    the first route it matched alone: `PUT /v1/jobs/{id}` answered `Allow: GET`, though DELETE is taken there too (a
    route for each), and `/v1/jobs/cancel` takes GET and DELETE as a job id besides its POST. HEAD is taken wherever
    GET is (api.main.HeadAsGet)."""
    methods = methods_at(request.app.router.routes, request.scope)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _takes_a_websocket(request: Request) -> bool:
    """Whether the request's path is one of the app's WebSocket routes (asked as the router asks, of a WebSocket)."""
    scope = {**request.scope, "type": "websocket"}
    return any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes)
