"""Liveness and readiness: Redis answers, and which workers serve which models."""

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import Checks, Registry, Store
from api.routes.metrics import shared_reading

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(request: Request, store: Store, registry: Registry, checks: Checks) -> JSONResponse:
    """200 with the live workers and queue lengths while Redis answers, and `redis_warnings` when something about
    it loses or refuses jobs (keys evicted, a read-only replica); 503 when it does not answer, or refuses the API
    for good (its credentials, its ACL: `redis_refusal`), which no waiting mends. Under a flood, the workers and
    queues are at most REUSE_SECONDS old (api.routes.metrics.SharedReading)."""
    try:
        refusal, warnings = await checks.read()
        if refusal:
            return JSONResponse({"status": "refused", "redis": False, "error": f"Redis {refusal}"},
                                status_code=503)
        workers, queues = await shared_reading(request, "health",
                                               lambda: (registry.workers(), store.queue_lengths())).get()
    except redis.RedisError as exc:
        return JSONResponse({"status": "unavailable", "redis": False, "error": str(exc)}, status_code=503)
    body = {"status": "ok", "redis": True, "workers": workers, "queued": queues}
    if warnings:
        body["redis_warnings"] = warnings
    return JSONResponse(body)
