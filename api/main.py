"""The FastAPI application: routes, the gateway, and the connections they share."""

import asyncio
import logging
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.auth import require_api_key
from api.channel_hub import ChannelHub
from api.errors import install_error_handlers
from api.submission import Submitter
from api.routes import (batches, controller, files, health, jobs, llava, metrics, models, openai, page,
                        stream)
from shared.celery_app import make_celery
from shared.jobs import JobStore, WorkerRegistry
from shared.settings import Settings, get_settings


log = logging.getLogger("llava_queue.api")

# At shutdown, how long the streams get to send their last word before uvicorn closes the connections, and then
# how long it waits for requests still answering before it cancels them.
STREAMS_STOP_SECONDS = 0.2
GRACEFUL_SHUTDOWN_SECONDS = 10.0
# How long the lifespan's end waits for the pub/sub reader to stop (see _stop_hub).
HUB_STOP_SECONDS = 2.0


class ApiServer(uvicorn.Server):
    """uvicorn's server, which ends the API's streams before it waits for every response to finish: a stream would
    finish only with its job. The jobs go on; their clients follow them again on the API that takes over."""

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


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for `settings` (default: from the environment)."""
    settings = settings or get_settings()

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
        yield
        await _stop_hub(app.state.hub)
        await app.state.aredis.aclose()
        app.state.store.redis.close()

    app = FastAPI(title="llava-queue", version="0.1.0", lifespan=lifespan, max_body_size=settings.max_body_bytes,
                  description="An async job queue serving LLaVA-style models with continuous batching.")
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    for module in (health, metrics, page):
        app.include_router(module.router)
    # Everything else needs an API key when keys are configured. The original LLaVA clients cannot
    # send one: an operator who runs them behind keys may leave their protocol open.
    protected = [jobs, stream, openai, models, batches, files]
    if settings.public_llava_protocol:
        for module in (llava, controller):
            app.include_router(module.router)
    else:
        protected += [llava, controller]
    for module in protected:
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    if not settings.api_key_hashes:
        log.warning("no API keys configured (LLAVA_QUEUE_API_KEY_HASHES): anyone who can reach the API can "
                    "submit jobs; it listens on %s by default", settings.host)
    return app


app = create_app()
