"""The public probes (`/metrics`, `/readyz`, `/healthz`) under a flood: they need no key, and each call read Redis
anew (`/metrics` ended the overdue jobs and read the totals first), so anyone who reached the API made Redis work
with every call. Redis is now read at most FRESH_READINGS times in REUSE_SECONDS per probe, and a caller at an
ordinary pace still sees a change in its next answer. A real API process on a Redis of its own (no worker: Redis
counts only the probes' commands)."""

import time
from concurrent.futures import ThreadPoolExecutor

import requests
from prometheus_client.parser import text_string_to_metric_families

from api.routes.metrics import FRESH_READINGS, REUSE_SECONDS
from conftest import run_stack
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer

PROBES = ("/metrics", "/readyz", "/healthz")
FLOOD_SECONDS = 2.5 * REUSE_SECONDS


def commands(store: JobStore) -> tuple[int, int]:
    """Every command Redis has run (INFO commandstats), and the zrangebyscore of the overdue jobs' sweep apart."""
    stats = store.redis.info("commandstats")
    return sum(stat["calls"] for stat in stats.values()), stats.get("cmdstat_zrangebyscore", {}).get("calls", 0)


def probe_all(base_url: str) -> dict[str, requests.Response]:
    return {path: requests.get(f"{base_url}{path}", timeout=10) for path in PROBES}


def sample(text: str, name: str, **labels) -> float:
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == name and s.labels == labels)


def test_a_flood_of_probes_costs_redis_a_few_readings_a_second_and_answers_stay_true():
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-probes-s43-") as stack:
        store = JobStore.from_url(server.url)
        probe_all(stack.base_url)  # (the first /healthz also checks Redis's settings, once every 30 s)
        before, _ = commands(store)
        probe_all(stack.base_url)
        one_reading = commands(store)[0] - before - 1  # (the INFO itself left out)

        def flood() -> list[int]:
            statuses = []
            while time.monotonic() < started + FLOOD_SECONDS:
                statuses += [requests.get(f"{stack.base_url}{path}", timeout=30).status_code for path in PROBES]
            return statuses

        before, sweeps_before = commands(store)
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            answers = [status for statuses in pool.map(lambda _: flood(), range(16)) for status in statuses]
        elapsed = time.monotonic() - started
        after, sweeps_after = commands(store)
        # No worker: not ready (503), and alive (200).
        assert answers == [200, 503, 200] * (len(answers) // 3) and len(answers) > 100, answers[:10]
        readings = FRESH_READINGS * (elapsed / REUSE_SECONDS + 1)
        assert after - before - 1 <= one_reading * readings, (after - before, one_reading, len(answers), elapsed)
        # The overdue jobs are still ended during a flood.
        assert elapsed / REUSE_SECONDS - 2 <= sweeps_after - sweeps_before <= readings, (sweeps_after - sweeps_before,
                                                                                       elapsed)

        # Once the flood is over, what changed shows in the next answer: a job queued, one past its deadline ended,
        # a worker up; then a second job.
        time.sleep(REUSE_SECONDS)
        store.create(GenerateRequest(prompt="Hi", max_new_tokens=2), "batch")
        store.create(GenerateRequest(prompt="Hi", max_new_tokens=2), "interactive", deadline_seconds=0.1)
        WorkerRegistry(store.redis, "llq").announce("probe-worker", {"name": "probe-worker", "model": "m",
                                                                     "ready": True}, ttl_seconds=60)
        time.sleep(0.2)
        answers = probe_all(stack.base_url)
        metrics = answers["/metrics"].text
        assert sample(metrics, "llava_queue_queue_depth", queue="batch") == 1, metrics
        assert sample(metrics, "llava_queue_queue_depth", queue="interactive") == 0, metrics
        assert sample(metrics, "llava_queue_jobs_finished_total", status="expired", error_code="6") == 1, metrics
        assert sample(metrics, "llava_queue_workers", model="m", ready="true") == 1, metrics
        assert answers["/readyz"].status_code == 200 and answers["/readyz"].json()["ready_workers"] == 1
        health = answers["/healthz"].json()
        assert health["queued"] == {"interactive": 0, "batch": 1}, health
        assert [worker["name"] for worker in health["workers"]] == ["probe-worker"], health
        store.create(GenerateRequest(prompt="Hi", max_new_tokens=2), "batch")
        answers = probe_all(stack.base_url)
        assert sample(answers["/metrics"].text, "llava_queue_queue_depth", queue="batch") == 2
        assert answers["/healthz"].json()["queued"]["batch"] == 2
