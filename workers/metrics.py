"""A worker's Prometheus metrics, its HTTP exporter (`/metrics`, `/readyz`), and the conversation log.

The engine thread pays little: per step one histogram observation (the batch size) and one inter-token latency
per job that got a token (about a microsecond each); per finished job a counter and a put on a queue. Engine gauges
(running and waiting sequences, the KV budget in use, generated tokens) are read from `engine.stats()` when
Prometheus scrapes, once per scrape. A background thread reads each finished job's timestamps from its record,
several jobs per pipelined round trip, and observes the latency histograms (time in queue, time to first token,
time per output token, end to end) of every job this worker ended, whatever its status, and, when
`conversation_log` is set, appends the job's line to it.

Latencies are measured from the job's `created_at` (stamped by the API that took it) to the
times the worker stamped (`started_at`, `first_token_at`, `finished_at`), so they include the
wait in the queue, as a user sees it, and as vLLM's do (from the request's arrival at its server, its wait for the
scheduler included). All are on Redis's clock (`JobStore.clock`), whatever the hosts' say. The inter-token latencies
are the gaps between a job's outputs on the engine thread (`time.monotonic`).

The engine's series are also served under vLLM's names, `vllm:` as `llava_queue:`, labelled `model_name` as vLLM's
are (`_ScrapeCollector`, `VLLM_NAMES`): a vLLM Grafana dashboard or alert works here with its prefix replaced.
"""

import base64
import binascii
import errno
import hashlib
import json
import logging
import queue
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared.jobs import FINAL_STATES, JobStore
from shared.protocol import data_url_parts

log = logging.getLogger("llava_queue.worker")
# No `_created` series beside every counter and histogram: they double what a scrape carries, and
# Prometheus does not need them.
disable_created_metrics()

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
# From tens of milliseconds (a short answer on an idle GPU) to hours (a batch job behind a long queue).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
                   320.0, 640.0, 1280.0, 2560.0, 5120.0, 10240.0)
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0)
_RECORD_FIELDS = ("status", "worker", "model", "created_at", "started_at", "first_token_at", "finished_at",
                  "prompt_tokens", "completion_tokens", "error_code", "finish_reason")
_CONVERSATION_FIELDS = ("request", "prompt", "text")
# Prompt and generated tokens of one job, as vLLM's 1-2-5 buckets.
TOKEN_BUCKETS = tuple(base * 10 ** power for power in range(6) for base in (1, 2, 5))
# The `llava_queue_` series served again under vLLM's name (`vllm:` as `llava_queue:`), where they measure what vLLM's
# do; the series vLLM has and these lack (`request_success_total`, the per-job token counts, the engine's gauges) are
# their own. `inter_token_latency_seconds` is every gap between two tokens of a job; a job's mean gap is
# `request_time_per_output_token_seconds`, as vLLM's of those names.
VLLM_NAMES = {"llava_queue_time_to_first_token_seconds": "llava_queue:time_to_first_token_seconds",
              "llava_queue_e2e_request_latency_seconds": "llava_queue:e2e_request_latency_seconds",
              "llava_queue_time_in_queue_seconds": "llava_queue:request_queue_time_seconds",
              "llava_queue_time_per_output_token_seconds": "llava_queue:request_time_per_output_token_seconds",
              "llava_queue_inter_token_latency_seconds": "llava_queue:inter_token_latency_seconds",
              "llava_queue_prompt_tokens": "llava_queue:prompt_tokens",
              "llava_queue_generated_tokens": "llava_queue:generation_tokens",
              "llava_queue_running_sequences": "llava_queue:num_requests_running",
              "llava_queue_waiting_sequences": "llava_queue:num_requests_waiting"}
# vLLM's finish reasons (`request_success_total{finished_reason}`) of the jobs ended otherwise than `succeeded`.
VLLM_FINISHED_REASONS = {"cancelled": "abort", "expired": "abort", "failed": "error"}
# Every finish reason `request_success_total` counts (a succeeded job's own: stop or length).
VLLM_REASONS = ("stop", "length", "abort", "error")
# Jobs whose image hashes are kept for the conversation log until their end is observed (older ones are dropped).
MAX_NOTED_JOBS = 10_000


class WorkerMetrics:
    """Every metric of one worker process, in its own registry; `bind` it to the engine once the model is loaded."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.model = ""
        self.engine = None
        self._baseline = {"generated_tokens": 0, "steps": 0}
        # Each running job's last output on the engine thread: (time.monotonic(), its generated tokens then).
        self._last_output: dict[str, tuple[float, int]] = {}
        r = self.registry
        self.batch_size = Histogram("llava_queue_batch_size", "Sequences in the engine's batch at each step.",
                                    ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        # Served under two names by _ScrapeCollector, which collects them once a scrape: not in the registry
        # themselves.
        self.queue_time = Histogram("llava_queue_time_in_queue_seconds",
                                    "From a job's submission to its start on a worker.", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=None)
        self.ttft = Histogram("llava_queue_time_to_first_token_seconds",
                              "From a job's submission to its first generated token (its wait in the queue "
                              "included, as vLLM's from the request's arrival).", ["model"],
                              buckets=LATENCY_BUCKETS, registry=None)
        self.tpot = Histogram("llava_queue_time_per_output_token_seconds",
                              "Per ended job with 2 tokens or more: (end - first token) / (generated tokens - 1).",
                              ["model"], buckets=TPOT_BUCKETS, registry=None)
        self.itl = Histogram("llava_queue_inter_token_latency_seconds",
                             "Each gap between two generated tokens of a job.", ["model"], buckets=TPOT_BUCKETS,
                             registry=None)
        self.e2e = Histogram("llava_queue_e2e_request_latency_seconds",
                             "Per ended job, whatever its status: from its submission to its end.", ["model"],
                             buckets=LATENCY_BUCKETS, registry=None)
        self.jobs = Counter("llava_queue_worker_jobs", "Jobs this worker ran to an end, by final status.",
                            ["model", "status"], registry=r)
        self.prompt_tokens = Counter("llava_queue_prompt_tokens", "Prompt tokens of the jobs this worker ended.",
                                     ["model"], registry=None)
        self.load_seconds = Gauge("llava_queue_model_load_seconds", "How long loading the model took.", ["model"],
                                  registry=r)
        self.warmup_seconds = Gauge("llava_queue_model_warmup_seconds",
                                    "How long the warm-up request took after loading.", ["model"], registry=r)
        self.ready = Gauge("llava_queue_worker_ready",
                           "1 once the model is loaded and warmed up and while the heartbeat reaches Redis; 0 while "
                           "starting or shutting down, or with Redis out of reach.", registry=r)
        # vLLM's own series, with no `llava_queue_` twin.
        self.request_success = Counter("llava_queue:request_success", "Jobs this worker ended, by vLLM's finish "
                                       "reason: stop, length, abort (cancelled or expired), error (failed).",
                                       ["model_name", "finished_reason"], registry=r)
        self.request_prompt_tokens = Histogram("llava_queue:request_prompt_tokens", "Prompt tokens of each job this "
                                               "worker ended.", ["model_name"], buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("llava_queue:request_generation_tokens", "Generated tokens of "
                                                   "each job this worker ended.", ["model_name"],
                                                   buckets=TOKEN_BUCKETS, registry=r)
        self.registry.register(_ScrapeCollector(self, (self.ttft, self.e2e, self.queue_time, self.tpot, self.itl,
                                                       self.prompt_tokens)))
        self._ended: queue.Queue[str] = queue.Queue()
        self.is_ready = self.reaching_redis = False
        # The conversation log's image hashes of the jobs this worker started, taken from their requests as they start:
        # a job's record loses its images when it ends (JobStore's finish), before the observer reads it.
        self._conversation_log = ""
        self._image_md5s: OrderedDict[str, list[str]] = OrderedDict()
        self._image_md5s_lock = threading.Lock()

    def bind(self, model: str, engine) -> None:
        """Label every metric with `model` and read the engine's gauges from `engine.stats()` from now on."""
        stats = engine.stats()
        self._baseline = {"generated_tokens": stats["generated_tokens"], "steps": stats["steps"]}
        self.model, self.engine = model, engine
        # Every series of the model at 0 from the start: one that appeared with its first event (the first failed
        # job after a restart) hid that event from rate() and increase(), which had no sample before it.
        for status in FINAL_STATES:
            self.jobs.labels(model, status)
        for metric in (self.batch_size, self.queue_time, self.ttft, self.tpot, self.itl, self.e2e,
                       self.prompt_tokens, self.request_prompt_tokens, self.request_generation_tokens):
            metric.labels(model)
        for reason in VLLM_REASONS:
            self.request_success.labels(model, reason)

    def observe_load(self, model: str, load_seconds: float, warmup_seconds: float) -> None:
        self.load_seconds.labels(model).set(load_seconds)
        self.warmup_seconds.labels(model).set(warmup_seconds)

    def set_ready(self, ready: bool) -> None:
        """Say whether this worker takes jobs (its /readyz and `llava_queue_worker_ready`), as far as its start and
        its shutdown go; it is ready only while its heartbeat reaches Redis too (`set_reaching_redis`)."""
        self.is_ready = ready
        self.ready.set(1 if self.takes_jobs else 0)

    def set_reaching_redis(self, reaching: bool) -> None:
        """Whether this worker's last heartbeat reached Redis: one that never has (started before Redis was up) or
        has lost it takes no job, and its /readyz said ready all the same."""
        self.reaching_redis = reaching
        self.ready.set(1 if self.takes_jobs else 0)

    @property
    def takes_jobs(self) -> bool:
        return self.is_ready and self.reaching_redis

    def observe_step(self, outputs: list, endings: list) -> None:
        """After every engine step (from `JobRunner.publish`, on the engine thread): the batch size, the gaps
        between the jobs' tokens, and the jobs that ended, whose latencies the observer thread reads."""
        if self.engine is None:
            return
        # The rows running after the step, plus those that finished in it (they were in the batch too).
        size = self.engine.stats()["num_running"] + sum(1 for out in outputs if out.finished)
        if size:
            self.batch_size.labels(self.model).observe(size)
        self._observe_token_gaps(outputs, time.monotonic())
        self.observe_endings(endings)

    def _observe_token_gaps(self, outputs: list, now: float) -> None:
        """vLLM's inter-token latency: for each job's output after its first, the time since its last output, once
        per token it brought. A token whose text the engine held back (part of a character, a stop string's start)
        comes out with the next one: they share the gap between the two outputs."""
        itl = self.itl.labels(self.model)
        last = self._last_output
        for out in outputs:
            previous = last.pop(out.request_id, None)
            if not out.finished:
                last[out.request_id] = (now, out.completion_tokens)
            if previous is None or out.first_token:
                continue
            at, tokens = previous
            new_tokens = out.completion_tokens - tokens
            for _ in range(new_tokens):
                itl.observe((now - at) / new_tokens)

    def observe_endings(self, endings: list) -> None:
        """Count the jobs this worker ended, by final status, and queue them for the observer thread (latencies,
        conversation log): those that left the engine (`observe_step`) and those ended before they reached it (a bad
        image, a prompt that fills the context, a job cancelled or expired while queued)."""
        if self.engine is None:
            return
        for ending in endings:
            self.jobs.labels(self.model, ending.status).inc()
            self._ended.put(ending.job_id)

    def observe_record(self, record: dict[str, Any]) -> None:
        """Observe the latencies of one finished job record (its raw Redis fields)."""
        created, started, first, finished = (_float(record.get(name)) for name in
                                             ("created_at", "started_at", "first_token_at", "finished_at"))
        completion_tokens = int(record.get("completion_tokens") or 0)
        model = self.model or record.get("model") or ""
        if created is not None and started is not None:
            self.queue_time.labels(model).observe(max(0.0, started - created))
        if created is not None and first is not None:
            self.ttft.labels(model).observe(max(0.0, first - created))
        prompt_tokens = int(record.get("prompt_tokens") or 0)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.request_prompt_tokens.labels(model).observe(prompt_tokens)
        self.request_generation_tokens.labels(model).observe(completion_tokens)
        status = record.get("status")
        reason = record.get("finish_reason") if status == "succeeded" else VLLM_FINISHED_REASONS.get(status, "error")
        self.request_success.labels(model, reason if reason in VLLM_REASONS else "stop").inc()
        # Every ended job, as vLLM's observe every request `request_success_total` counts: a failed or cancelled job
        # took its time too (left out, a worker failing fast looked fast).
        if created is not None and finished is not None:
            self.e2e.labels(model).observe(max(0.0, finished - created))
        if first is not None and finished is not None and completion_tokens >= 2:
            self.tpot.labels(model).observe(max(0.0, finished - first) / (completion_tokens - 1))

    def note_images(self, job_id: str, images: list[str]) -> None:
        """A job this worker starts carries `images` (base64): their hashes, for its conversation log line."""
        if not self._conversation_log:
            return
        hashes = [image_md5(image) for image in images]
        with self._image_md5s_lock:
            self._image_md5s[job_id] = hashes
            while len(self._image_md5s) > MAX_NOTED_JOBS:  # a job whose end this worker never observes
                self._image_md5s.popitem(last=False)

    def _noted_images(self, job_id: str) -> list[str] | None:
        with self._image_md5s_lock:
            return self._image_md5s.pop(job_id, None)

    def start_observer(self, store: JobStore, worker_name: str, conversation_log: str = "") -> threading.Thread:
        """Start the thread that turns finished jobs into latency observations (and conversation log lines)."""
        self._conversation_log = conversation_log
        thread = threading.Thread(target=self._observe_finished, args=(store, worker_name, conversation_log),
                                  daemon=True, name="job-metrics")
        thread.start()
        return thread

    def _observe_finished(self, store: JobStore, worker_name: str, conversation_log: str) -> None:
        fields = _RECORD_FIELDS + (_CONVERSATION_FIELDS if conversation_log else ())
        while True:
            job_ids = [self._ended.get()]
            while len(job_ids) < 256:
                try:
                    job_ids.append(self._ended.get_nowait())
                except queue.Empty:
                    break
            try:
                with store.redis.pipeline(transaction=False) as pipe:
                    for job_id in job_ids:
                        pipe.hmget(store.key(job_id), fields)
                    rows = pipe.execute(raise_on_error=False)
            except Exception:
                log.exception("could not read %d finished jobs for the metrics", len(job_ids))
                continue
            lines = []
            for job_id, values in zip(job_ids, rows):
                noted = self._noted_images(job_id) if conversation_log else None
                if isinstance(values, Exception):
                    # One job's record of another type (a key SET by hand): raised, it lost the metrics of all those
                    # read with it, a traceback logged.
                    log.warning("job %s left out of the metrics: its record could not be read (%s)", job_id, values)
                    continue
                record = dict(zip(fields, values))
                # Only jobs this worker ended (a job handed back or fenced off was ended elsewhere).
                if record["status"] not in FINAL_STATES or record["worker"] != worker_name:
                    continue
                self.observe_record(record)
                if conversation_log:
                    lines.append(json.dumps(conversation_line(job_id, record, noted or []), ensure_ascii=False))
            if lines:
                try:
                    _append_lines(conversation_log, lines)
                except OSError:
                    log.exception("could not write the conversation log %s", conversation_log)


class _ScrapeCollector:
    """What a scrape reads once: the engine's stats (one `engine.stats()`) and `shared`, the metrics served under
    both names. Each family comes out as it is and, for VLLM_NAMES, again under vLLM's name, `model` as
    `model_name`: one reading, two names (read twice, the engine was asked twice a scrape and the two names of one
    series could differ). vLLM's `kv_cache_usage_perc` (0 to 1) is the share of the KV budget the running batch may
    come to hold."""

    def __init__(self, metrics: WorkerMetrics, shared: tuple):
        self.metrics = metrics
        self.shared = shared

    def collect(self):
        families = [family for metric in self.shared for family in metric.collect()]
        engine, model = self.metrics.engine, self.metrics.model
        stats = engine.stats() if engine is not None else None
        if stats is not None:
            families += _engine_families(model, stats, self.metrics._baseline)
        for family in families:
            yield family
            if family.name in VLLM_NAMES:
                yield _under_vllm_name(family)
        if stats is not None:
            usage = GaugeMetricFamily("llava_queue:kv_cache_usage_perc", "Share of the KV budget the running batch "
                                      "may come to hold (1 is all of it).", labels=["model_name"])
            budget = stats["max_batch_tokens"]
            usage.add_metric([model], stats["reserved_tokens"] / budget if budget else 0)
            yield usage


def _engine_families(model: str, stats: dict, baseline: dict) -> list[Metric]:
    """The engine's counters and gauges from one `engine.stats()`; the counters from `baseline` (its stats at bind:
    the warm-up's tokens and steps are not the worker's)."""
    families: list[Metric] = []
    for name, help_text, value in (
            ("llava_queue_generated_tokens", "Tokens generated by this worker.",
             stats["generated_tokens"] - baseline["generated_tokens"]),
            ("llava_queue_engine_steps", "Engine steps (one decode for the batch, plus any prefill).",
             stats["steps"] - baseline["steps"])):
        family = CounterMetricFamily(name, help_text, labels=["model"])
        family.add_metric([model], value)
        families.append(family)
    for name, help_text, value in (
            ("llava_queue_running_sequences", "Sequences in the engine's batch.", stats["num_running"]),
            ("llava_queue_waiting_sequences", "Sequences handed to the engine, waiting for room in its batch.",
             stats["num_waiting"]),
            ("llava_queue_kv_budget_used_tokens",
             "KV cache positions the running batch may come to hold (rows x longest prompt + max new), "
             "of the KV budget.",
             stats["reserved_tokens"]),
            ("llava_queue_kv_budget_tokens", "The engine's KV budget (LLAVA_QUEUE_MAX_BATCH_TOKENS).",
             stats["max_batch_tokens"]),
            ("llava_queue_max_num_seqs", "The engine's sequence budget (LLAVA_QUEUE_MAX_NUM_SEQS).",
             stats["max_num_seqs"])):
        family = GaugeMetricFamily(name, help_text, labels=["model"])
        family.add_metric([model], value)
        families.append(family)
    return families


def _under_vllm_name(family: Metric) -> Metric:
    """`family` again under its name in VLLM_NAMES, its `model` label as `model_name`."""
    name = VLLM_NAMES[family.name]
    renamed = Metric(name, family.documentation, family.type)
    for sample in family.samples:
        labels = {"model_name" if label == "model" else label: value for label, value in sample.labels.items()}
        renamed.add_sample(name + sample.name.removeprefix(family.name), labels, sample.value)
    return renamed


def conversation_line(job_id: str, record: dict[str, Any], image_md5s: list[str]) -> dict[str, Any]:
    """The original's conversation log record for one finished job; images as the MD5 hashes of their bytes noted as
    the job started (`note_images`: an ended job's record holds no images)."""
    request = json.loads(record.get("request") or "{}")
    messages = request.get("messages")
    finished = _float(record.get("finished_at")) or time.time()
    line: dict[str, Any] = {
        "tstamp": round(finished, 4),
        "type": "chat",
        "job_id": job_id,
        "model": record.get("model") or "",
        "start": round(_float(record.get("created_at")) or finished, 4),
        "finish": round(finished, 4),
        "status": record.get("status"),
        "error_code": int(record.get("error_code") or 0),
        "finish_reason": record.get("finish_reason") or "",
        "parameters": {name: request.get(name) for name in ("temperature", "top_p", "max_new_tokens", "stop",
                                                             "seed")},
    }
    if messages:
        line["messages"] = [{"role": message.get("role"), "text": message.get("text", "")} for message in messages]
    line["prompt"] = record.get("prompt") or ""
    line["text"] = record.get("text") or ""
    line["images"] = image_md5s
    line["prompt_tokens"] = int(record.get("prompt_tokens") or 0)
    line["completion_tokens"] = int(record.get("completion_tokens") or 0)
    return line


def image_md5(image: str) -> str:
    """MD5 of an image's file bytes (base64, plain or as a data: URL); of the text itself if it is not base64."""
    parts = data_url_parts(image)
    data = image if parts is None else parts[1]
    try:
        raw = base64.b64decode(data.replace("\n", "").replace("\r", ""), validate=True)
    except (binascii.Error, ValueError):
        raw = image.encode()
    return hashlib.md5(raw).hexdigest()


_log_lock = threading.Lock()


def _append_lines(path: str, lines: list[str]) -> None:
    with _log_lock:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        with open(Path(path).expanduser(), "a", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in lines))


def _float(value: Any) -> float | None:
    return float(value) if value not in (None, "") else None


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every few seconds would flood the log
        pass


class _ThreadingServerIPv6(_ThreadingServer):
    address_family = socket.AF_INET6


def _server_class(host: str, port: int) -> type[_ThreadingServer]:
    """IPv4 for a host that has an IPv4 address (0.0.0.0, localhost, a name), as the exporter always listened; IPv6
    for an IPv6 address (`::`, which takes IPv4 clients too on Linux, or `::1`) or a name with IPv6 addresses alone.
    Raises socket.gaierror for a name that resolves to nothing."""
    found = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    return _ThreadingServer if socket.AF_INET in {family for family, *_ in found} else _ThreadingServerIPv6


class ExporterError(RuntimeError):
    """The worker's exporter cannot listen where the settings say."""


def serve(metrics: WorkerMetrics, host: str, port: int) -> WSGIServer:
    """Serve `GET /metrics` (Prometheus text) and `GET /readyz` (200 once ready, else 503) in a daemon thread.

    `host` may be an IPv4 or IPv6 address or a name. Port 0 picks a free port (`server.server_port`). Stop it with
    `server.shutdown()`. Raises ExporterError when it cannot listen there (the port in use, a name that resolves
    to nothing).
    """
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/readyz":
            ready = metrics.takes_jobs
            body = json.dumps({"ready": ready, "model": metrics.model or None}).encode()
            start_response("200 OK" if ready else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        # The classic text format whatever the scraper asks (Prometheus asks OpenMetrics first): prometheus_client's
        # OpenMetrics writes the samples of a `llava_queue:` family with `_` for `:`, names of families it never
        # announced (a strict parser refuses the scrape).
        return metrics_app({**environ, "HTTP_ACCEPT": "text/plain"}, start_response)

    try:
        server = make_server(host, port, app, _server_class(host, port), handler_class=_QuietHandler)
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
        reason = ("is in use by another process; give each worker on this host a port of its own" if in_use
                  else f"cannot be used: {exc.strerror or exc}")
        raise ExporterError(f"LLAVA_QUEUE_WORKER_METRICS_PORT {port} on {host} (LLAVA_QUEUE_WORKER_METRICS_HOST) "
                            f"{reason}") from exc
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-exporter").start()
    return server


# The process's metrics: the worker binds them at start, `JobRunner.publish` feeds them.
METRICS = WorkerMetrics()
