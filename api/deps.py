"""Shared dependencies, injected with `Annotated[..., Depends(...)]`.

They are coroutines: FastAPI runs a plain `def` dependency on its thread pool, a hop to another thread and
back (anyio's machinery and a GIL handoff each way) for what is an attribute lookup.
"""

import asyncio
import math
import time
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Header, Request
from starlette.requests import HTTPConnection

from api.auth import require_api_key
from api.channel_hub import ChannelHub
from api.submission import Submitter
from shared.celery_app import redis_refusal, redis_warnings
from shared.jobs import JobStore, WorkerRegistry
from shared.settings import Settings


async def get_store(conn: HTTPConnection) -> JobStore:
    return conn.app.state.store


async def get_hub(conn: HTTPConnection) -> ChannelHub:
    return conn.app.state.hub


async def get_celery(conn: HTTPConnection) -> Celery:
    return conn.app.state.celery


async def get_submitter(conn: HTTPConnection) -> Submitter:
    return conn.app.state.submitter


async def get_registry(conn: HTTPConnection) -> WorkerRegistry:
    return conn.app.state.registry


class RedisChecks:
    """What the API's Redis refuses for good (`redis_refusal`) and what about it loses or refuses jobs
    (`redis_warnings`), for /healthz: read again at most every CHECK_SECONDS, since a check costs a dozen round trips
    and a pub/sub connection, and /healthz is polled (an ACL or a maxmemory-policy changed meanwhile shows then)."""

    CHECK_SECONDS = 30.0

    def __init__(self, settings: Settings, client: redis.Redis):
        self.settings, self.client = settings, client
        self._lock = asyncio.Lock()
        self._checked_at = -math.inf
        self._result: tuple[str | None, list[str]] = (None, [])

    async def read(self) -> tuple[str | None, list[str]]:
        """(the refusal or None, the warnings); raises redis.RedisError when Redis does not answer."""
        async with self._lock:  # one check at a time: the others wait for its answer
            if time.monotonic() - self._checked_at >= self.CHECK_SECONDS:
                refusal = await asyncio.to_thread(redis_refusal, self.settings.redis_url, self.settings.key_prefix,
                                                  names_connections=True)
                warnings = [] if refusal else await asyncio.to_thread(redis_warnings, self.client)
                self._result, self._checked_at = (refusal, warnings), time.monotonic()
            return self._result


async def get_redis_checks(conn: HTTPConnection) -> RedisChecks:
    state = conn.app.state
    if getattr(state, "redis_checks", None) is None:
        state.redis_checks = RedisChecks(state.settings, state.store.redis)
    return state.redis_checks


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


Store = Annotated[JobStore, Depends(get_store)]
Hub = Annotated[ChannelHub, Depends(get_hub)]
CeleryApp = Annotated[Celery, Depends(get_celery)]
Submissions = Annotated[Submitter, Depends(get_submitter)]
Registry = Annotated[WorkerRegistry, Depends(get_registry)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]
Checks = Annotated[RedisChecks, Depends(get_redis_checks)]
# The caller's API key digest (None with keys off): the same dependency the protected routers run,
# so FastAPI evaluates it once per request (the rate limit counts the request once).
ApiKey = Annotated[str | None, Depends(require_api_key)]


# An empty key is refused: it would be one key shared by every client that sends the header blank.
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=200, description=(
    "Retrying a submission with the same key returns the first submission's job(s) instead of new ones."))]
