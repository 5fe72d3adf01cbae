"""Shared dependencies, injected with `Annotated[..., Depends(...)]`.

They are coroutines: FastAPI runs a plain `def` dependency on its thread pool, a hop to another thread and
back (anyio's machinery and a GIL handoff each way) for what is an attribute lookup.
"""

from typing import Annotated

from celery import Celery
from fastapi import Depends, Header, Request
from starlette.requests import HTTPConnection

from api.auth import require_api_key
from api.channel_hub import ChannelHub
from api.submission import Submitter
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


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


Store = Annotated[JobStore, Depends(get_store)]
Hub = Annotated[ChannelHub, Depends(get_hub)]
CeleryApp = Annotated[Celery, Depends(get_celery)]
Submissions = Annotated[Submitter, Depends(get_submitter)]
Registry = Annotated[WorkerRegistry, Depends(get_registry)]
AppSettings = Annotated[Settings, Depends(get_app_settings)]
# The caller's API key digest (None with keys off): the same dependency the protected routers run,
# so FastAPI evaluates it once per request (the rate limit counts the request once).
ApiKey = Annotated[str | None, Depends(require_api_key)]


# An empty key is refused: it would be one key shared by every client that sends the header blank.
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=200, description=(
    "Retrying a submission with the same key returns the first submission's job(s) instead of new ones."))]
