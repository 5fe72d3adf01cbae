"""The metrics against what vLLM's of the same names mean, and what an autoscaler reads from the API: every ended job
in the latency histograms (vLLM's observe every request `request_success_total` counts), vLLM's inter-token latency,
one reading of the engine a scrape, and no slots of a draining worker. A real stack on a Redis of its own (the queues
are not under the key prefix: on the suite's Redis, the session stack's worker took these jobs' tasks)."""

import os
import signal
import time

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import job_final, model_workers, run_stack
from shared.redis_server import RedisServer, free_port

MODEL = "SmolLM2-135M-Instruct"
BY_NAME = (("model_name", MODEL),)
BY_MODEL = (("model", MODEL),)
# Counting goes on for hundreds of tokens at temperature 0: a job that runs for a while.
COUNTING = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
FAST_HEARTBEAT = {"LLAVA_QUEUE_HEARTBEAT_INTERVAL_SECONDS": "1", "LLAVA_QUEUE_HEARTBEAT_TTL_SECONDS": "4"}


@pytest.fixture(scope="module")
def exporter_stack(default_model_dir):
    port = free_port()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": "4",
           "LLAVA_QUEUE_WORKER_METRICS_PORT": str(port), "LLAVA_QUEUE_WORKER_METRICS_HOST": "127.0.0.1",
           **FAST_HEARTBEAT}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-metrics-s41-logs-") as stack:
        yield stack, f"http://127.0.0.1:{port}/metrics"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    return samples(requests.get(url, timeout=10).text)


def scrape_until(url: str, done, timeout: float = 60.0) -> dict:
    """The samples once `done(samples)` holds (a worker's latencies are observed off the engine thread)."""
    deadline = time.monotonic() + timeout
    while True:
        scraped = scrape(url)
        if done(scraped) or time.monotonic() > deadline:
            return scraped
        time.sleep(0.2)


def submit(stack, prompt: str, max_new_tokens: int, model: str | None = None) -> str:
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0} | ({"model": model} if model else {})
    response = requests.post(f"{stack.base_url}/v1/jobs", json=body, timeout=10)
    assert response.status_code in (200, 201, 202), response.text
    return response.json()["id"]


def running_with_tokens(stack, job_id: str, tokens: int = 3, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] == "running" and job["usage"]["completion_tokens"] > tokens:
            return job
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, f"{job}\n{stack.logs()}"
        time.sleep(0.1)


def ended_jobs(scraped: dict) -> float:
    return sum(value for (name, _), value in scraped.items() if name == "llava_queue:request_success_total")


def test_a_cancelled_job_is_in_the_latency_histograms(exporter_stack):
    """vLLM observes `e2e_request_latency_seconds` and `request_time_per_output_token_seconds` for every request
    `request_success_total` counts, aborted and failed ones too. Here they took succeeded jobs only: a cancelled job
    was counted under `abort` and missing from both, so the counts disagreed and slow cancelled jobs went unseen."""
    stack, url = exporter_stack
    before = scrape(url)
    succeeded = job_final(stack, submit(stack, "Say hello:", 6))
    assert succeeded["status"] == "succeeded"
    cancelled_id = submit(stack, COUNTING, 1000)
    running_with_tokens(stack, cancelled_id)
    assert requests.delete(f"{stack.base_url}/v1/jobs/{cancelled_id}", timeout=10).status_code == 202
    cancelled = job_final(stack, cancelled_id)
    assert cancelled["status"] == "cancelled" and cancelled["usage"]["completion_tokens"] >= 2, cancelled
    after = scrape_until(url, lambda s: ended_jobs(s) - ended_jobs(before) >= 2)

    def added(name: str, labels=BY_NAME) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert ended_jobs(after) - ended_jobs(before) == 2
    assert added("llava_queue:request_success_total", (("finished_reason", "abort"),) + BY_NAME) == 1
    # Every ended job in each, as in vLLM's: both jobs generated 2 tokens or more.
    for histogram in ("e2e_request_latency_seconds", "request_time_per_output_token_seconds"):
        assert added(f"llava_queue:{histogram}_count") == 2, histogram
    for histogram in ("e2e_request_latency_seconds", "time_per_output_token_seconds"):
        assert added(f"llava_queue_{histogram}_count", BY_MODEL) == 2, histogram


def test_the_gaps_between_tokens_are_served_as_vllm_s_inter_token_latency(exporter_stack):
    """vLLM's `inter_token_latency_seconds` (every gap between two tokens of a request) was not served: a vLLM
    dashboard's inter-token latency panel found no series. One observation per token after a job's first."""
    stack, url = exporter_stack
    before = scrape(url)
    jobs = [job_final(stack, submit(stack, f"Name {n} colours:", 12)) for n in (3, 4)]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    after = scrape_until(url, lambda s: ended_jobs(s) - ended_jobs(before) >= 2)

    def added(name: str, labels=BY_NAME) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    gaps = sum(job["usage"]["completion_tokens"] - 1 for job in jobs)
    assert gaps >= 2, jobs
    assert added("llava_queue:inter_token_latency_seconds_count") == gaps
    assert added("llava_queue:inter_token_latency_seconds_bucket", (("le", "+Inf"),) + BY_NAME) == gaps
    assert added("llava_queue:inter_token_latency_seconds_sum") > 0
    # One observation, two names.
    assert after[("llava_queue:inter_token_latency_seconds_sum", BY_NAME)] == \
        after[("llava_queue_inter_token_latency_seconds_sum", BY_MODEL)]
    # The gaps of a job add up to no more than its time from its first token to its end.
    decoding = sum(job["finished_at"] - job["first_token_at"] for job in jobs)
    assert added("llava_queue:inter_token_latency_seconds_sum") <= decoding + 0.5


def test_a_scrape_reads_the_engine_once(default_model_dir):
    """The engine's stats were read twice a scrape: once for the `llava_queue_` series and again for their vLLM names
    (a second collector collected the first), so `llava_queue_running_sequences` and
    `llava_queue:num_requests_running` of one scrape could be two readings. A real engine on the default model."""
    from workers.builder import load_model
    from workers.engine import LLMEngine
    from workers.metrics import WorkerMetrics

    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=4, max_model_len=loaded.context_len)
    metrics = WorkerMetrics()
    metrics.bind(loaded.name, engine)
    reads = []
    read_stats = engine.stats
    engine.stats = lambda: reads.append(1) or read_stats()
    scraped = samples(generate_latest(metrics.registry).decode())
    assert len(reads) == 1
    assert scraped[("llava_queue_running_sequences", BY_MODEL)] == scraped[("llava_queue:num_requests_running",
                                                                             BY_NAME)]
    assert scraped[("llava_queue_kv_budget_tokens", BY_MODEL)] == engine.stats()["max_batch_tokens"]
    assert ("llava_queue:kv_cache_usage_perc", BY_NAME) in scraped


def test_a_draining_worker_s_slots_are_not_counted(exporter_stack, default_model_dir):
    """A worker shutting down (SIGTERM) says `ready: false` and runs its jobs to their end, but takes no new one. The
    API's `llava_queue_worker_slots` still counted its max_num_seqs: room for new jobs (`slots - slots_used`) that the
    model did not have, for as long as the drain lasted."""
    stack, _ = exporter_stack
    model = "draining-model"
    env = dict(os.environ, LLAVA_QUEUE_MODEL_PATH=str(default_model_dir), LLAVA_QUEUE_MAX_NUM_SEQS="4",
               LLAVA_QUEUE_SHUTDOWN_GRACE_SECONDS="120", **FAST_HEARTBEAT)
    api = f"{stack.base_url}/metrics"
    by_model = (("model", model),)
    with model_workers(stack, env, [model]) as workers:
        # (model_workers found the stack's own worker announced: this one may still be loading.)
        ready = scrape_until(api, lambda s: s.get(("llava_queue_workers", by_model + (("ready", "true"),))) == 1,
                             timeout=180)
        assert ready[("llava_queue_workers", by_model + (("ready", "true"),))] == 1
        assert ready[("llava_queue_worker_slots", by_model)] == 4
        job_id = submit(stack, COUNTING, 1000, model=model)
        running_with_tokens(stack, job_id)
        workers[model].send_signal(signal.SIGTERM)
        draining = scrape_until(api, lambda s: s.get(("llava_queue_workers", by_model + (("ready", "false"),))) == 1)
        job = requests.get(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10).json()
        assert draining[("llava_queue_workers", by_model + (("ready", "false"),))] == 1, (job, stack.logs())
        assert draining[("llava_queue_workers", by_model + (("ready", "true"),))] == 0
        assert draining[("llava_queue_worker_slots", by_model)] == 0
        assert draining[("llava_queue_worker_slots_used", by_model)] == 0
        assert draining[("llava_queue_worker_kv_budget_tokens", by_model)] == 0
        # The job it runs goes on (its tokens are counted in the speed): ended here, so the worker exits at once.
        requests.delete(f"{stack.base_url}/v1/jobs/{job_id}", timeout=10)
        assert workers[model].wait(60) is not None
