"""Liveness and readiness: Redis answers, and which workers serve which models."""

import asyncio

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import Registry, Store

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(store: Store, registry: Registry) -> JSONResponse:
    """200 with the live workers and queue lengths while Redis answers; 503 otherwise."""
    try:
        workers = await asyncio.to_thread(registry.workers)
        queues = await asyncio.to_thread(store.queue_lengths)
    except redis.RedisError as exc:
        return JSONResponse({"status": "unavailable", "redis": False, "error": str(exc)}, status_code=503)
    return JSONResponse({"status": "ok", "redis": True, "workers": workers, "queued": queues})
