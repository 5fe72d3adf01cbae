"""The original LLaVA controller's endpoints, answered from the workers' heartbeats in Redis.

The API plays both parts of the original stack: it is the controller (which models are served,
who serves them) and the one "worker" the controller hands out, since its own
`/worker_generate_stream` serves every model a live worker serves. So `/get_worker_address`
answers the API's own address. Workers announce themselves in Redis (`WorkerRegistry`); one that
stops beating drops out within its heartbeat TTL. HTTP workers of the original stack are not used:
`/register_worker` and `/receive_heart_beat` are accepted and change nothing.
"""

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api.auth import counted_as_reads
from api.deps import AppSettings, Registry, Store
from api.json_bodies import JsonParsers, parse_json
from api.routes.models import served_models
from api.submission import check_unicode
from shared.protocol import InvalidRequest, parse_request

log = logging.getLogger("llava_queue.api")

router = APIRouter(tags=["llava controller"])


class ModelList(BaseModel):
    models: list[str]


class WorkerAddressRequest(BaseModel):
    model: str


class WorkerAddress(BaseModel):
    address: str


class WorkerStatus(BaseModel):
    model_names: list[str]
    speed: int
    queue_length: int


class HeartBeatAnswer(BaseModel):
    exist: bool


async def read_original_body(parsers: JsonParsers, raw: bytes | str, model: type[BaseModel]) -> BaseModel:
    """A request body read as the original reads it (`await request.json()`, Python's `json.loads`: a heavy body in a
    parser process, api.json_bodies), then validated into `model` on a thread (checking images takes a while); raises
    InvalidRequest (400 for a body that is not JSON, 422 for a bad field) or, for text that is not valid Unicode, the
    422 ApiError every job submission gives it.

    `json.loads` reads bytes in UTF-8 (with or without a byte order mark), UTF-16 or UTF-32, as the original
    does (pydantic's JSON parser took UTF-8 without a mark only), and parses a "\\ud800" escape into a lone
    surrogate, refused here by name (pydantic called it "malformed JSON")."""
    return await asyncio.to_thread(_original_request, await parse_json(parsers, raw), model)


def _original_request(data: Any, model: type[BaseModel]) -> BaseModel:
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    request = parse_request(data, model)
    check_unicode(request)
    return request


def public_address(request: Request, public_url: str | None) -> str:
    """Where clients reach this API: the configured public URL, else the address this request came to."""
    return (public_url or str(request.base_url)).rstrip("/")


# The original web server reads the model list at every page load and refresh (`/refresh_all_workers`, then
# `/list_models`): counted with the key's other requests, two a page load, a user refreshing used the key's limit up,
# and the page then failed to load (it asserts a 200). They count against the key's reads, as GET /v1/models does.
@router.post("/refresh_all_workers")
@counted_as_reads
async def refresh_all_workers() -> None:
    """Answers `null` as the original; there is nothing to refresh, live workers are always current."""


@router.post("/list_models", response_model=ModelList)
@counted_as_reads
async def list_models(registry: Registry) -> ModelList:
    """Every model some live worker serves, sorted."""
    return ModelList(models=served_models(await asyncio.to_thread(registry.workers)))


@router.post("/get_worker_address", response_model=WorkerAddress,
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                 "type": "object", "properties": {"model": {"type": "string"}}, "required": ["model"]}}}}})
async def get_worker_address(request: Request, registry: Registry, settings: AppSettings) -> WorkerAddress:
    """This API's address when a live worker serves `model` (exact name), `""` when none does.

    The body is read as JSON whatever its Content-Type, as the original controller reads it.
    """
    body = await read_original_body(request.app.state.json_parsers, await request.body(), WorkerAddressRequest)
    served = served_models(await asyncio.to_thread(registry.workers))
    return WorkerAddress(address=public_address(request, settings.public_url) if body.model in served else "")


@router.post("/worker_get_status", response_model=WorkerStatus)
async def worker_get_status(registry: Registry, store: Store) -> WorkerStatus:
    """The original worker's status: the served models, speed 1, and queue_length = requests taken and not done.

    queue_length counts, over every live worker, the sequences running and waiting in its engine,
    plus the jobs still queued in Redis (the original's requests waiting on its semaphore) and the started jobs back
    in a queue (handed back, or claimed from a dead worker), which are in neither: the jobs of a SIGKILLed worker
    dropped out of the count once its heartbeat lapsed, until a worker of their model resumed them, if one ever came.
    """
    workers = await asyncio.to_thread(registry.workers)
    totals = await asyncio.to_thread(store.totals)
    in_engines = sum(int(worker.get("num_running", 0)) + int(worker.get("num_waiting", 0)) for worker in workers)
    waiting = sum(totals["queued"].values()) + totals["requeued"]
    return WorkerStatus(model_names=served_models(workers), speed=1, queue_length=in_engines + waiting)


@router.post("/register_worker")
async def register_worker() -> None:
    """Accepted and ignored (answers `null` as the original): llava-queue workers announce themselves in Redis."""
    log.info("ignored a /register_worker call: llava-queue workers announce themselves in Redis")


@router.post("/receive_heart_beat", response_model=HeartBeatAnswer)
async def receive_heart_beat() -> HeartBeatAnswer:
    """`{"exist": false}`: no HTTP worker is ever registered here (an original worker would re-register, harmlessly)."""
    return HeartBeatAnswer(exist=False)
