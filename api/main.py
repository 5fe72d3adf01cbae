"""The FastAPI application: routes, the gateway, and the connections they share."""

from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routes import health, jobs, llava, models, page, stream
from shared.celery_app import make_celery
from shared.jobs import JobStore, WorkerRegistry
from shared.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.job_ttl_seconds)
        app.state.registry = WorkerRegistry(app.state.store.redis, settings.key_prefix)
        app.state.aredis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
        app.state.celery = make_celery(settings)
        yield
        await app.state.aredis.aclose()
        app.state.store.redis.close()

    app = FastAPI(title="llava-queue", version="0.1.0", lifespan=lifespan,
                  description="An async job queue serving LLaVA-style models with continuous batching.")
    install_error_handlers(app)
    for module in (jobs, stream, llava, models, health, page):
        app.include_router(module.router)
    return app


app = create_app()
