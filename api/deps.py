"""Shared dependencies, injected with `Annotated[..., Depends(...)]`."""

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from api.auth import require_api_key
from api.channel_hub import ChannelHub
from api.submission import Submitter
from shared.jobs import JobStore, WorkerRegistry
from shared.settings import Settings


def get_store(conn: HTTPConnection) -> JobStore:
    return conn.app.state.store


def get_hub(conn: HTTPConnection) -> ChannelHub:
    return conn.app.state.hub


def get_celery(conn: HTTPConnection) -> Celery:
    return conn.app.state.celery


def get_submitter(conn: HTTPConnection) -> Submitter:
    return conn.app.state.submitter


def get_registry(conn: HTTPConnection) -> WorkerRegistry:
    return conn.app.state.registry


def get_app_settings(request: Request) -> Settings:
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
