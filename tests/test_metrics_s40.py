"""A worker's exporter under vLLM's metric names: `vllm:` as `llava_queue:`, labelled `model_name`, so that a vLLM
Grafana dashboard or alert works with its prefix replaced; and a scrape as Prometheus asks for it (OpenMetrics first)
that its parsers read. A real stack: a worker of the default model with its exporter on, on a Redis of its own."""

import time

import pytest
import requests
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from conftest import job_final, run_stack
from shared.redis_server import RedisServer, free_port

MODEL = "SmolLM2-135M-Instruct"
# The series vLLM's own Grafana dashboard and the usual alerts read (vLLM's `examples/online_serving/
# prometheus_grafana/grafana.json`), `vllm:` replaced.
VLLM_SERIES = ("llava_queue:num_requests_running", "llava_queue:num_requests_waiting",
               "llava_queue:kv_cache_usage_perc", "llava_queue:prompt_tokens_total",
               "llava_queue:generation_tokens_total",
               "llava_queue:time_to_first_token_seconds_bucket", "llava_queue:e2e_request_latency_seconds_bucket",
               "llava_queue:request_queue_time_seconds_bucket",
               "llava_queue:request_time_per_output_token_seconds_bucket", "llava_queue:request_prompt_tokens_bucket",
               "llava_queue:request_generation_tokens_bucket", "llava_queue:request_success_total")
# What Prometheus 2 sends: OpenMetrics first, the classic text format last.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;"
                     "q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")


@pytest.fixture(scope="module")
def exporter_stack(default_model_dir):
    # A Redis of its own: the queues are not under the key prefix, so on the suite's Redis the session stack's worker
    # took these jobs' tasks, found no record under its own prefix, and dropped them (the jobs never ended).
    port = free_port()
    env = {"LLAVA_QUEUE_MODEL_PATH": str(default_model_dir),
           "LLAVA_QUEUE_WORKER_METRICS_PORT": str(port), "LLAVA_QUEUE_WORKER_METRICS_HOST": "127.0.0.1"}
    with RedisServer() as server, run_stack(server.url, env, log_prefix="llava-queue-metrics-s40-logs-") as stack:
        yield stack, f"http://127.0.0.1:{port}/metrics"


def samples(text: str, parse=text_string_to_metric_families) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in parse(text) for sample in family.samples}


def scrape_until(url: str, done, timeout: float = 30.0) -> dict:
    """The worker's samples once `done(samples)` holds (its latencies are observed off the engine thread)."""
    deadline = time.monotonic() + timeout
    while True:
        scraped = samples(requests.get(url, timeout=5).text)
        if done(scraped) or time.monotonic() > deadline:
            return scraped
        time.sleep(0.2)


def run_jobs(stack, count: int) -> list[dict]:
    ids = [requests.post(f"{stack.base_url}/v1/jobs", json={"prompt": f"Count to {n}:", "max_new_tokens": 4,
                                                             "temperature": 0}, timeout=10).json()["id"]
           for n in range(count)]
    return [job_final(stack, job_id) for job_id in ids]


def test_a_vllm_dashboard_finds_its_series_with_the_prefix_replaced(exporter_stack):
    """The worker served `llava_queue_time_to_first_token_seconds{model=...}` and the like, names and a label of its
    own: a vLLM dashboard or alert with `vllm:` replaced by `llava_queue:` found no series at all."""
    stack, url = exporter_stack
    jobs = run_jobs(stack, 2)
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    model = (("model_name", MODEL),)
    scraped = scrape_until(url, lambda s: s.get(("llava_queue:e2e_request_latency_seconds_count", model)) == 2)
    names = {name for name, labels in scraped if ("model_name", MODEL) in labels}
    assert set(VLLM_SERIES) <= names, sorted(set(VLLM_SERIES) - names)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_time_per_output_token_seconds", "request_prompt_tokens", "request_generation_tokens"):
        assert scraped[(f"llava_queue:{histogram}_count", model)] == 2, histogram
        assert scraped[(f"llava_queue:{histogram}_bucket", (("le", "+Inf"),) + model)] == 2, histogram
    # The same observations as the `llava_queue_` names: one measurement, two names.
    assert scraped[("llava_queue:time_to_first_token_seconds_sum", model)] == \
        scraped[("llava_queue_time_to_first_token_seconds_sum", (("model", MODEL),))]
    generated = sum(job["usage"]["completion_tokens"] for job in jobs)
    assert scraped[("llava_queue:request_generation_tokens_sum", model)] == generated
    assert scraped[("llava_queue:generation_tokens_total", model)] >= generated
    assert scraped[("llava_queue:prompt_tokens_total", model)] == sum(job["usage"]["prompt_tokens"] for job in jobs)
    success = {dict(labels)["finished_reason"]: value for (name, labels), value in scraped.items()
               if name == "llava_queue:request_success_total"}
    # Every reason from 0 (as vLLM's), each job under its own.
    assert set(success) == {"stop", "length", "abort", "error"}
    assert success["abort"] == success["error"] == 0
    assert success["stop"] + success["length"] == 2
    assert success["length"] == sum(job["finish_reason"] == "length" for job in jobs)
    assert scraped[("llava_queue:num_requests_running", model)] == 0
    assert 0 <= scraped[("llava_queue:kv_cache_usage_perc", model)] <= 1


def test_a_scrape_as_prometheus_asks_for_it_is_read_whole(exporter_stack):
    """Prometheus asks OpenMetrics first. prometheus_client's OpenMetrics writes a `llava_queue:` family's samples with
    `_` for `:`, so its parser refused the scrape ("Clashing name"); the exporter answers the classic text format, whose
    parser reads every vLLM-named series."""
    stack, url = exporter_stack
    assert run_jobs(stack, 1)[0]["status"] == "succeeded"
    response = requests.get(url, headers={"Accept": PROMETHEUS_ACCEPT}, timeout=5)
    assert response.status_code == 200
    parse = (openmetrics_families if response.headers["Content-Type"].startswith("application/openmetrics-text")
             else text_string_to_metric_families)
    scraped = samples(response.text, parse)
    names = {name for name, labels in scraped if ("model_name", MODEL) in labels}
    assert set(VLLM_SERIES) <= names, sorted(set(VLLM_SERIES) - names)
    assert scraped[("llava_queue:time_to_first_token_seconds_count", (("model_name", MODEL),))] >= 1
