"""Optional API keys (Bearer tokens, configured as SHA-256 hashes) and a per-key rate limit."""

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from fastapi import params
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from api.errors import ApiError
from api.json_bodies import REQUEST_VALUES, with_parsed_body
from shared.jobs import JobStore, owner_id
from shared.protocol import ErrorCode
from shared.settings import Settings

log = logging.getLogger("llava_queue.api")


def key_digest(key: str) -> str:
    """The SHA-256 hex digest under which an API key is configured (`LLAVA_QUEUE_API_KEY_HASHES`): of its UTF-8."""
    return hashlib.sha256(key.encode()).hexdigest()


def header_text(value: str) -> str:
    """The text a header value carries, from the Latin-1 reading Starlette gives of its bytes: UTF-8 (curl, httpx)
    when they are valid UTF-8, else Latin-1 (`requests` and browsers' fetch write non-ASCII that way). Without this, a
    key beyond ASCII sent as UTF-8 was hashed as the mojibake its bytes spell in Latin-1, and matched no key."""
    raw = value.encode("latin-1")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return value


async def require_api_key(conn: HTTPConnection) -> str | None:
    """Check the caller's key when keys are configured; returns its digest (None when keys are off).

    The key comes as `Authorization: Bearer <key>`, or as `?api_key=` on a WebSocket (browsers
    cannot set headers there). A missing or unknown key → 401; past the per-minute limit → 429.
    A coroutine, so that every request does not hop to the thread pool and back for it; only the
    rate limit's Redis round trip runs there.
    """
    settings = conn.app.state.settings
    if not settings.api_key_hashes:
        return None
    if hasattr(conn.state, "api_key"):  # checked already, before the body was read (KeyBeforeBody): counted once
        return conn.state.api_key
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    token = header_text(token.strip(" "))  # credentials follow the scheme after 1*SP (RFC 9110): "Bearer  <key>"
    if scheme.lower() != "bearer" or not token:
        # Percent-decoded as UTF-8 already (a byte that is not is U+FFFD, and matches no key).
        token = conn.query_params.get("api_key", "") if conn.scope["type"] == "websocket" else ""
    digest = key_digest(token) if token else ""
    if digest not in settings.api_key_hashes:
        # On a WebSocket too: its handshake is answered 401 with this body (api/errors.py), not accepted.
        raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code=ErrorCode.INVALID_REQUEST,
                       headers={"WWW-Authenticate": "Bearer"})
    if settings.rate_limit_per_minute:
        await run_in_threadpool(_count_request, conn, settings, digest)
    conn.state.api_key = digest  # what the caller owns (batches, files) is scoped by it
    return digest


async def api_key_if_sent(conn: HTTPConnection) -> str | None:
    """`require_api_key` for a request that carries a key, on the open LLaVA protocol (`PUBLIC_LLAVA_PROTOCOL`): a
    job sent with a valid key is that key's (its quota, its rate limit; it was anyone's, readable by every other key),
    one with a wrong key is a 401; one with none stays open, as the original clients send none."""
    sent = conn.headers.get("authorization") or (conn.scope["type"] == "websocket" and "api_key" in conn.query_params)
    return await require_api_key(conn) if sent else None


class KeyBeforeBody(APIRoute):
    """A route whose endpoint takes a JSON body and the caller's key (`api.deps.ApiKey`): it checks the key, and counts
    the request against the key's rate limit, before FastAPI reads the body. FastAPI reads and parses a body before any
    dependency runs: a request with no key, a wrong one, or one past its limit, had its body read and parsed (23 MB of
    JSON: seconds of the event loop and 600 MB of memory) before its 401 or 429.

    Then it reads the body, and has a heavy one parsed in a parser process (api.json_bodies): refused there when it
    holds more than `max_body_values` values, for the route to see only a value that is quick to validate."""

    max_body_values: int = REQUEST_VALUES

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        if self.body_field is None or isinstance(self.body_field.field_info, params.Form):
            return handler
        checks_key = any(dependency.call is require_api_key for dependency in self.dependant.dependencies)

        async def route(request: Request) -> Response:
            if checks_key:
                await require_api_key(request)
            return await handler(await with_parsed_body(request, self.max_body_values))

        return route


def owns(record_owner: str | None, api_key: str | None) -> bool:
    """Whether a caller (its key's digest; None with keys off) may read or cancel a job recorded with `record_owner`.

    With keys on, a job submitted under a key is that key's alone: another key gets "unknown job id", as for
    batches and files. A job submitted without a key (keys off then, or the open LLaVA protocol) is anyone's.
    """
    return api_key is None or not record_owner or record_owner == owner_id(api_key)


def owned_job(store: JobStore, job_id: str, api_key: str | None) -> dict[str, Any] | None:
    """The record of a job the caller may read (`owns`); None for an unknown job and for another key's alike, which
    the caller answers as unknown."""
    record = store.get(job_id)
    return record if record is not None and owns(record.get("owner"), api_key) else None


def rate_counter(key_prefix: str, digest: str, now: float) -> str:
    """The Redis key that counts a key's requests in the clock minute of `now` (seconds since the epoch)."""
    return f"{key_prefix}:rate:{owner_id(digest)}:{int(now // 60)}"


def _count_request(conn: HTTPConnection, settings: Settings, digest: str) -> None:
    """Count the request against its key's per-minute limit; 429 past it."""
    now = conn.app.state.store.clock()  # one minute for every API process, whatever its host's clock says
    counter = rate_counter(settings.key_prefix, digest, now)
    with conn.app.state.store.redis.pipeline() as pipe:
        count, _ = pipe.incr(counter).expire(counter, 120).execute()
    if count > settings.rate_limit_per_minute:
        retry_after = max(1, 60 - int(now % 60))
        raise ApiError(429, f"rate limit of {settings.rate_limit_per_minute} requests per minute reached; retry in "
                            f"{retry_after} s", type="rate_limited", code=ErrorCode.OVERLOADED,
                       headers={"Retry-After": str(retry_after)})
