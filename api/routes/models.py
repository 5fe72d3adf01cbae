"""The models live workers serve, in the OpenAI list shape."""

import asyncio

from fastapi import APIRouter

from api.deps import Registry

router = APIRouter(tags=["models"])


def served_models(workers: list[dict]) -> list[str]:
    """Names of the models some live worker serves, sorted (the original's model list order).

    A worker that is draining (its heartbeat says `"ready": false`) takes no new work: it does not count.
    """
    return sorted({worker["model"] for worker in workers if worker.get("ready", True)})


@router.get("/v1/models")
async def list_models(registry: Registry) -> dict:
    """`{"object": "list", "data": [{"id", "object": "model", "owned_by", "created"}]}` for every served model."""
    workers = await asyncio.to_thread(registry.workers)
    started = {}
    for worker in workers:
        started[worker["model"]] = min(started.get(worker["model"], worker["started_at"]), worker["started_at"])
    return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "llava-queue",
                                        "created": int(started[name])} for name in served_models(workers)]}
