"""Optional API keys (Bearer tokens, configured as SHA-256 hashes), a per-key rate limit, and a limit on the wrong keys
one client address may try."""

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import redis
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


# Wrong keys (401s) one client address may send in a clock minute: Settings.auth_failures_per_minute
# (LLAVA_QUEUE_AUTH_FAILURES_PER_MINUTE, 30; 0: no limit). Past them its requests are refused (429, with Retry-After,
# as past a key's rate limit) until the minute ends, before their key is checked (a 401 or not would tell which key is
# right): a client could try keys without end. A page left open with a stale key polls well within it. Clients behind
# one address (a proxy the API does not trust to name them: uvicorn's FORWARDED_ALLOW_IPS) share its refusal.


def client_address(conn: HTTPConnection) -> str:
    """The address a client's wrong keys are counted under: its IP, or for IPv6 its /64 (one host is given a whole
    /64, and counted address by address it had as many tries as addresses)."""
    host = conn.client.host if conn.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.version == 6:
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class FailedKeys:
    """The client addresses refused for their wrong keys in this minute (Settings.auth_failures_per_minute), by one API
    process. The failures are counted in Redis, for every API process; each remembers the addresses it found over the
    limit, so that a request from one not refused costs no round trip (another process refuses an address at its
    next failure there)."""

    def __init__(self):
        self._refused: set[str] = set()
        self._until = -math.inf  # (time.monotonic) when the minute of those refusals ends

    def refusal(self, conn: HTTPConnection, limit: int) -> ApiError | None:
        """The 429 of a request of `conn` while its address is refused (past `limit`); None when it is not."""
        left = self._until - time.monotonic()
        if left <= 0 or not self._refused or client_address(conn) not in self._refused:
            return None
        return _failures_refusal(limit, math.ceil(left))

    def refuse(self, address: str, seconds: int) -> None:
        """Refuse `address` for the `seconds` left of the minute."""
        until = time.monotonic() + seconds
        if until > self._until + 1:  # a new minute: the last one's addresses are free again
            self._refused, self._until = set(), until
        self._refused.add(address)


async def require_api_key(conn: HTTPConnection) -> str | None:
    """Check the caller's key when keys are configured; returns its digest (None when keys are off).

    The key comes as `Authorization: Bearer <key>`, or as `?api_key=` on a WebSocket (browsers
    cannot set headers there). A missing or unknown key → 401 (429 past Settings.auth_failures_per_minute wrong ones
    from the caller's address); past the key's per-minute limit → 429.
    A coroutine, so that every request does not hop to the thread pool and back for it; only the
    rate limit's Redis round trip runs there.
    """
    return await _checked_key(conn, reads=False)


async def require_api_key_for_reads(conn: HTTPConnection) -> str | None:
    """`require_api_key` for cheap reads (GET /v1/models), counted against a rate limit of their own, as many a minute
    as the key's other requests: the chat page reads the model list every 30 s (every 5 s while an answer waits), and
    a page left open used its user's requests up."""
    return await _checked_key(conn, reads=True)


def counted_as_reads(endpoint: Callable) -> Callable:
    """Mark a route's endpoint as a read of the model list: the key check of its router (`require_api_key`, or
    `api_key_if_sent` on the open LLaVA protocol) counts it against the key's reads, as `require_api_key_for_reads`
    does. For the original controller's model list, which the original web server reads at every page load."""
    endpoint.counted_as_reads = True
    return endpoint


async def _checked_key(conn: HTTPConnection, reads: bool) -> str | None:
    reads = reads or getattr(conn.scope.get("endpoint"), "counted_as_reads", False)
    settings = conn.app.state.settings
    if not settings.api_key_hashes:
        return None
    if hasattr(conn.state, "api_key"):  # checked already, before the body was read (KeyBeforeBody): counted once
        return conn.state.api_key
    failed_keys: FailedKeys = conn.app.state.failed_keys
    refused = failed_keys.refusal(conn, settings.auth_failures_per_minute)
    if refused:
        raise refused
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    token = header_text(token.strip(" "))  # credentials follow the scheme after 1*SP (RFC 9110): "Bearer  <key>"
    if scheme.lower() != "bearer" or not token:
        # Percent-decoded as UTF-8 already (a byte that is not is U+FFFD, and matches no key).
        token = conn.query_params.get("api_key", "") if conn.scope["type"] == "websocket" else ""
    digest = key_digest(token) if token else ""
    if digest not in settings.api_key_hashes:
        if token and settings.auth_failures_per_minute:  # a wrong key (a request without one tries none)
            await _count_failure(conn, settings)
        # On a WebSocket too: its handshake is answered 401 with this body (api/errors.py), not accepted.
        raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code=ErrorCode.INVALID_REQUEST,
                       headers={"WWW-Authenticate": "Bearer"})
    if settings.rate_limit_per_minute:
        await run_in_threadpool(_count_request, conn, settings, digest, reads)
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


def rate_counter(key_prefix: str, digest: str, now: float, reads: bool = False) -> str:
    """The Redis key that counts a key's requests in the clock minute of `now` (seconds since the epoch); `reads`:
    its cheap reads (`require_api_key_for_reads`), counted apart."""
    return f"{key_prefix}:{'rate-reads' if reads else 'rate'}:{owner_id(digest)}:{int(now // 60)}"


def _counted(conn: HTTPConnection, counter: Callable[[float], str]) -> tuple[int, int]:
    """Add one to the Redis count `counter(now)` names (a count of the clock minute of `now`, kept two minutes);
    returns (the count now, the seconds left of the minute)."""
    now = conn.app.state.store.clock()  # one minute for every API process, whatever its host's clock says
    name = counter(now)
    with conn.app.state.store.redis.pipeline() as pipe:
        count, _ = pipe.incr(name).expire(name, 120).execute()
    return count, max(1, 60 - int(now % 60))


def _rate_limited(message: str, retry_after: int) -> ApiError:
    return ApiError(429, f"{message}; retry in {retry_after} s", type="rate_limited", code=ErrorCode.OVERLOADED,
                    headers={"Retry-After": str(retry_after)})


def _failures_refusal(limit: int, retry_after: int) -> ApiError:
    return _rate_limited(f"more than {limit} requests with a wrong API key from this address in a minute", retry_after)


def _count_request(conn: HTTPConnection, settings: Settings, digest: str, reads: bool) -> None:
    """Count the request against its key's per-minute limit (its reads' with `reads`); 429 past it."""
    count, retry_after = _counted(conn, lambda now: rate_counter(settings.key_prefix, digest, now, reads))
    if count > settings.rate_limit_per_minute:
        raise _rate_limited(f"rate limit of {settings.rate_limit_per_minute} requests per minute reached"
                            + (" for reads of the model list, counted apart from the key's other requests" if reads
                               else ""), retry_after)


async def _count_failure(conn: HTTPConnection, settings: Settings) -> None:
    """Count a wrong key against its client address; past Settings.auth_failures_per_minute, 429, and the address is
    refused until the minute ends (FailedKeys). With Redis away the wrong key is a 401 as before, not a 503 telling its
    client to come back."""
    address, limit = client_address(conn), settings.auth_failures_per_minute
    try:
        count, retry_after = await run_in_threadpool(
            _counted, conn, lambda now: f"{settings.key_prefix}:key-failures:{address}:{int(now // 60)}")
    except redis.RedisError as exc:
        log.debug("the wrong key of %s went uncounted: %s", address or "a client", exc)
        return
    if count > limit:
        if count == limit + 1:
            log.warning("%s sent a wrong API key %d times this minute: its requests are refused for %d s",
                        address or "a client", limit, retry_after)
        conn.app.state.failed_keys.refuse(address, retry_after)
        raise _failures_refusal(limit, retry_after)
