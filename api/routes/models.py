"""The models live workers serve, in the OpenAI list shape."""

import asyncio

from fastapi import APIRouter

from api.deps import Registry
from api.errors import MODEL_NOT_FOUND, ApiError
from shared.protocol import ErrorCode, reads_images

router = APIRouter(tags=["models"])
# A model that a worker served this recently, with no live worker now (one restarting, a rolling deploy, a crash), is
# one coming back: a chat completion for it is answered 503 with Retry-After (OpenAI's clients retry that), where a
# 404 said the model does not exist; a batch's lines for it are queued for its workers.
RETURNING_SECONDS = 600.0


def served_models(workers: list[dict]) -> list[str]:
    """Names of the models some live worker serves, sorted (the original's model list order).

    A worker that is draining (its heartbeat says `"ready": false`) takes no new work: it does not count.
    """
    return sorted({worker["model"] for worker in workers if worker.get("ready", True) and "model" in worker})


def returning_models(registry, served: list[str]) -> dict[str, float]:
    """Models no live worker serves (not in `served`) that one served within RETURNING_SECONDS: seconds since, by
    name."""
    now = registry.clock()  # (the workers wrote the times on it)
    return {model: max(now - at, 0.0) for model, at in registry.models_seen().items()
            if model not in served and now - at < RETURNING_SECONDS}


def model_away(model: str, seconds: float) -> ApiError:
    """The 503 of a request for a model whose workers are all away for now (see RETURNING_SECONDS)."""
    return ApiError(503, f"no worker of the model {model!r} is up at the moment (the last one was seen "
                         f"{seconds:.0f} s ago): try again shortly", type="unavailable", param="model",
                    code=ErrorCode.NO_WORKER, headers={"Retry-After": "5"})


async def _model_objects(registry, workers: list[dict] | None = None) -> list[dict]:
    """OpenAI's model object `{"id", "object": "model", "owned_by", "created"}` of every served model, with
    `reads_images`: whether its jobs have their images read (`shared.protocol.reads_images`; a text-only model's
    worker ignores them), so that a client (the chat page) need not repeat the rule."""
    if workers is None:
        workers = await asyncio.to_thread(registry.workers)
    started = {}
    for worker in workers:
        if "model" in worker:  # (every worker names its model; a description written by hand may not)
            at = worker.get("started_at", 0)
            started[worker["model"]] = min(started.get(worker["model"], at), at)
    return [{"id": name, "object": "model", "owned_by": "llava-queue", "created": int(started[name]),
             "reads_images": reads_images(name)} for name in served_models(workers)]


@router.get("/v1/models")
async def list_models(registry: Registry) -> dict:
    """`{"object": "list", "data": [<model object>, ...]}` for every served model."""
    return {"object": "list", "data": await _model_objects(registry)}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, registry: Registry) -> dict:
    """One served model's object (the openai package's `models.retrieve`); 503 with Retry-After while its workers
    are away (see RETURNING_SECONDS), 404 when none served it lately. The name may hold slashes, as hub ids do."""
    workers = await asyncio.to_thread(registry.workers)
    for found in await _model_objects(registry, workers):
        if found["id"] == model:
            return found
    away = (await asyncio.to_thread(returning_models, registry, served_models(workers))).get(model)
    if away is not None:
        raise model_away(model, away)
    raise ApiError(404, f"the model {model!r} is not served here", param="model", code=MODEL_NOT_FOUND)
