"""`GET /metrics` (Prometheus) and `GET /readyz` (ready to serve the default model).

Every number here is read from Redis when asked, so all API replicas answer the same: queue
depths, jobs queued and running, jobs ever submitted and finished (counters kept in Redis by the
job store's scripts), and the live workers with their load from their heartbeats. What happens
inside one worker (batch sizes, latencies, tokens) is on that worker's own exporter
(`LLAVA_QUEUE_WORKER_METRICS_PORT`).

These endpoints need no key: a flood of calls costs Redis a few readings a second (`SharedReading`).
"""

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from api.deps import AppSettings, Registry
from api.routes.models import returning_models
from shared.jobs import QUEUES, JobStore, WorkerRegistry
from shared.protocol import ErrorCode

router = APIRouter(tags=["health"])

# The public probes (/metrics, /readyz, /healthz) read Redis at most FRESH_READINGS times in REUSE_SECONDS each; a
# call beyond that has the last answer, which began within those seconds. Each call read Redis anew (/metrics ended
# the overdue jobs first), so anyone who reached the API made Redis work with every call. Prometheus scrapes every
# 15 s and a probe every few seconds: they, and a reader who looks again after a change, are read fresh.
REUSE_SECONDS = 1.0
FRESH_READINGS = 5


class SharedReading:
    """A read of Redis (`read`, run on a thread) made for a call unless one began after the call came (the calls
    waiting meanwhile share it) or `readings` began within the last `seconds` (the call has the last one's answer).
    A RedisError is an answer too: with Redis away, every call of a flood waited for its own time-out in turn."""

    def __init__(self, read: Callable[[], Any], seconds: float = REUSE_SECONDS, readings: int = FRESH_READINGS):
        self.read, self.seconds = read, seconds
        self._lock = asyncio.Lock()
        self._began: deque[float] = deque(maxlen=readings)  # when the last readings began
        self._answer: tuple[Any, redis.RedisError | None] = (None, None)

    async def get(self) -> Any:
        """The answer to a call now (see the class); raises its RedisError."""
        called = time.monotonic()
        async with self._lock:
            now = time.monotonic()
            spent = len(self._began) == self._began.maxlen and now - self._began[0] < self.seconds
            if not self._began or (self._began[-1] < called and not spent):
                try:
                    answer = (await asyncio.to_thread(self.read), None)
                except redis.RedisError as exc:
                    answer = (None, exc)
                # Counted only once answered: a reading that raised anything else (or was cancelled) answered no
                # one, and the calls waiting for it had the answer before it, read before they came (None at first).
                self._began.append(now)
                self._answer = answer
            value, error = self._answer
        if error is not None:
            raise error.with_traceback(None)  # (raised again and again, its traceback would grow with each call)
        return value


def shared_reading(request: Request, name: str, read: Callable[[], Any]) -> SharedReading:
    """The app's SharedReading `name`, made with `read` at its first call."""
    readings = getattr(request.app.state, "shared_readings", None)
    if readings is None:
        readings = request.app.state.shared_readings = {}
    if name not in readings:
        readings[name] = SharedReading(read)
    return readings[name]


# The ways a job ends, (status, error code), each counted from 0: a series that appeared with its first job hid that
# job from rate() and increase(), which had no sample before it (the first failure of a deployment went unseen).
ENDINGS = (("succeeded", ErrorCode.OK), ("failed", ErrorCode.SERVER_ERROR), ("failed", ErrorCode.INVALID_REQUEST),
           ("cancelled", ErrorCode.CANCELLED), ("expired", ErrorCode.EXPIRED))


class RedisCollector:
    """The deployment's state from Redis, collected at scrape time (the jobs past their deadline ended, then one
    pipelined read and one scan)."""

    def __init__(self, store: JobStore, registry: WorkerRegistry, default_model: str | None = None):
        self.store = store
        self.registry = registry
        self.default_model = default_model

    def collect(self):
        up = GaugeMetricFamily("llava_queue_redis_up", "1 if the API reached Redis for this scrape, else 0.")
        try:
            # Jobs past their deadline end first, as before an admission counts the queues: with no worker up to
            # sweep them, they were counted as waiting (an autoscaler reading the depth started workers for them).
            # A read-only replica cannot end them: it is read as it is, as `llava-queue status` reads it (the
            # scrape said Redis was not reached, and nothing else).
            try:
                self.store.expire_overdue()
            except redis.ReadOnlyError:
                pass
            totals = self.store.totals()
            workers = self.registry.workers()
            known = self._known_models(totals)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("llava_queue_queue_depth", "Jobs waiting in each queue.", labels=["queue"])
        for queue in QUEUES:
            depth.add_metric([queue], totals["queued"].get(queue, 0))
        yield depth
        jobs = GaugeMetricFamily("llava_queue_jobs", "Jobs in each active state (ended jobs: "
                                 "llava_queue_jobs_finished_total).", labels=["state"])
        jobs.add_metric(["queued"], sum(totals["queued"].values()))
        jobs.add_metric(["running"], totals["running"])
        yield jobs
        yield GaugeMetricFamily("llava_queue_requeued_jobs", "Running jobs that no worker runs now (handed back, or "
                                "claimed from a dead worker): their tasks wait in a queue for a worker of their model, "
                                "not counted in llava_queue_queue_depth.", value=totals["requeued"])
        yield _requeued_per_model(totals["requeued_per_model"], workers)
        submitted = CounterMetricFamily("llava_queue_jobs_submitted", "Jobs accepted, per queue.", labels=["queue"])
        for queue in sorted(set(QUEUES) | set(totals["submitted"])):
            submitted.add_metric([queue], totals["submitted"].get(queue, 0))
        yield submitted
        finished = CounterMetricFamily("llava_queue_jobs_finished", "Jobs that ended, per final status and error "
                                       "code.", labels=["status", "error_code"])
        counts = {(status, int(code)): 0 for status, code in ENDINGS} | totals["finished"]
        for (status, error_code), count in sorted(counts.items()):
            finished.add_metric([status, str(error_code)], count)
        yield finished
        yield from _worker_families(workers, known)

    def _known_models(self, totals: dict) -> set[str]:
        """The models whose worker series are there, 0 when no worker is live: the default model, those a worker
        served within RETURNING_SECONDS, those whose jobs wait for a worker. Without, a model whose last worker died
        had no series, and an alert on `llava_queue_workers == 0` found an empty vector and never fired."""
        known = set(returning_models(self.registry, served=[])) | set(totals["requeued_per_model"])
        return known | ({self.default_model} if self.default_model else set())


def _requeued_per_model(per_model: dict[str, int], workers: list[dict]) -> GaugeMetricFamily:
    """llava_queue_requeued_jobs per model: for each model that has such jobs, and 0 for each model a live worker
    serves (a series there from 0, as the workers' own gauges are). The total alone did not say which model's workers
    had gone; a model no worker serves is the one whose jobs wait for good."""
    family = GaugeMetricFamily("llava_queue_requeued_jobs_by_model", "Running jobs that no worker runs now (handed "
                               "back, or claimed from a dead worker), per model: their tasks wait in that model's "
                               "queue.", labels=["model"])
    counts = {worker.get("model", ""): 0 for worker in workers} | per_model
    for model, count in sorted(counts.items()):
        family.add_metric([model], count)
    return family


def _worker_families(workers: list[dict], known: set[str] = frozenset()):
    """Live workers and their load, summed per model, from their heartbeats (a few seconds old at most); 0 for the
    `known` models no live worker serves, and for either readiness a model's workers are not in.

    The slots and the KV budget, and their use, are the ready workers' only: a draining worker (shutting down, or
    its engine stopped) takes no new job, and counted, its slots were room for new jobs (`slots - used`) that the
    model did not have. The tokens per second are every live worker's: a draining one's are generated all the same."""
    count = GaugeMetricFamily("llava_queue_workers", "Live workers, per model and readiness.",
                              labels=["model", "ready"])
    slots = GaugeMetricFamily("llava_queue_worker_slots", "Sequence slots (max_num_seqs) of the live, ready workers "
                              "(a draining worker takes no new job).", labels=["model"])
    used = GaugeMetricFamily("llava_queue_worker_slots_used", "Sequences running on the live, ready workers.",
                             labels=["model"])
    kv_used = GaugeMetricFamily("llava_queue_worker_kv_budget_used_tokens", "KV budget tokens reserved on the "
                                "live, ready workers.", labels=["model"])
    kv_total = GaugeMetricFamily("llava_queue_worker_kv_budget_tokens", "KV budget tokens of the live, ready "
                                 "workers.", labels=["model"])
    speed = GaugeMetricFamily("llava_queue_worker_tokens_per_second", "Tokens generated per second by the live "
                              "workers, draining ones too (over their last heartbeat interval).", labels=["model"])
    per_model: dict[tuple[str, str], int] = defaultdict(int)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for model in known | {worker.get("model", "") for worker in workers}:
        per_model[(model, "true")] = per_model[(model, "false")] = 0
        sums[model]["max_num_seqs"] = 0
    for worker in workers:
        model, ready = worker.get("model", ""), worker.get("ready", True)
        per_model[(model, "true" if ready else "false")] += 1
        sums[model]["tokens_per_second"] += worker.get("tokens_per_second") or 0
        if ready:
            for name in ("max_num_seqs", "num_running", "reserved_tokens", "max_batch_tokens"):
                sums[model][name] += worker.get(name) or 0
    for (model, ready), n in sorted(per_model.items()):
        count.add_metric([model, ready], n)
    for model, values in sorted(sums.items()):
        slots.add_metric([model], values["max_num_seqs"])
        used.add_metric([model], values["num_running"])
        kv_used.add_metric([model], values["reserved_tokens"])
        kv_total.add_metric([model], values["max_batch_tokens"])
        speed.add_metric([model], values["tokens_per_second"])
    yield from (count, slots, used, kv_used, kv_total, speed)


def _registry_of(request: Request) -> CollectorRegistry:
    state = request.app.state
    if getattr(state, "metrics_registry", None) is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RedisCollector(state.store, state.registry, state.settings.default_model))
        state.metrics_registry = registry
    return state.metrics_registry


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the whole deployment, read from Redis (every API replica answers the same); under a
    flood, at most REUSE_SECONDS old (SharedReading)."""
    registry = _registry_of(request)
    body = await shared_reading(request, "metrics", lambda: generate_latest(registry)).get()
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# A probe, not part of the client API: left out of the OpenAPI schema (its 503 is an answer, not a fault).
@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request, registry: Registry, settings: AppSettings) -> JSONResponse:
    """200 when Redis answers and a live, ready worker serves the default model (any model if
    LLAVA_QUEUE_DEFAULT_MODEL is unset); 503 with the reasons otherwise. Under a flood, at most REUSE_SECONDS old
    (SharedReading)."""
    try:
        # (Listing the workers reads Redis: an answer is Redis answering, without a PING of its own.)
        workers = await shared_reading(request, "workers", registry.workers).get()
    except redis.RedisError as exc:
        return JSONResponse({"status": "not ready", "redis": False, "reasons": [f"Redis is unreachable: {exc}"]},
                            status_code=503)
    model = settings.default_model
    ready = [worker for worker in workers if worker.get("ready", True)
             and (model is None or worker.get("model") == model)]
    body = {"status": "ready" if ready else "not ready", "redis": True, "model": model,
            "ready_workers": len(ready), "workers": len(workers)}
    if ready:
        return JSONResponse(body)
    wanted = f"model {model!r}" if model else "any model"
    live_models = sorted({worker.get("model", "") for worker in workers})
    body["reasons"] = [f"no live, ready worker serves {wanted} (live workers' models: {live_models or 'none'})"]
    return JSONResponse(body, status_code=503)
