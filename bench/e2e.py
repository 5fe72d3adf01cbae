"""The whole stack (HTTP → Celery on Redis → worker engine → pub/sub → WebSocket) against the engine in-process.

    python -m bench.e2e                 # 32 requests x up to 128 new tokens
    python -m bench.e2e --quick         # 8 x 16, a smoke run

After the full rounds come short paired ones, for the TTFT difference alone: `--ttft-rounds` bursts of the
same prompts with `--ttft-tokens` new tokens, (c) and the stack in alternating order, reported as the median
difference with an interval of it that covers 95 % (under 6 pairs, their range and what it covers) (a full round
gives one TTFT p50 a side, and on a shared 2-core machine one round's difference moves by hundreds of ms); then
`--ws-rounds` such bursts with each of the stack's jobs submitted as the first message of `WS /v1/ws` (one
connection a job, no HTTP request); then `--lone` single
requests, one at a time on each side: the latency the stack adds to a request's first token when nothing else runs.

The API cannot ignore EOS, so both paths run the same prompts greedily, tokenized by the
worker's own `prepare`, and stop at EOS or max_new_tokens: they do the same work, and
tokens/s counts the completion tokens each really generated (the job record's usage for
the stack). The in-process engine and the stack take turns (`--repeats` rounds, the fastest of
each kept); the side not running only waits, so the two never share the CPU. After each stack round,
(c') runs the engine in process again, given each request at the moment the stack's worker started
its job in that round: its TTFT above (c)'s is what the delivery's timing costs by itself, the rest of
the stack's is the CPU the other processes take from the engine while it prefills.

TTFT here is submit → first visible text on both paths (the first non-empty delta in
process; the first WebSocket message whose text goes beyond the prompt over the stack).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
import psutil
import requests
import torch
import uvloop

from bench.ws import BareWebSocket
from bench.workload import (
    Prompt,
    RequestTiming,
    RunResult,
    StepRecorder,
    build_prompts,
    fastest,
    from_timings,
    latency_cells,
    machine_info,
    run_engine,
    warm_up_in_this_thread,
)
from shared.cpus import CpuSplit, keep_to, split_cpus
from shared.redis_server import RedisServer, free_port
from shared.settings import get_settings
from workers.builder import load_model, serving_engine
from workers.default_model import ensure_default_model
from workers.engine import LLMEngine, SamplingParams
from workers.torch_threads import in_passing_thread

WARMUP_TOKENS = 4
START_TIMEOUT_S = 180
# No cores of the engine's own: bench.batch_priority's stack, and bench.e2e's without --engine-cpus.
NO_SPLIT = split_cpus("")


# In process.

def in_process_engine(model_dir: Path, prompts_count: int, max_num_seqs: int, cpus: frozenset[int] | None = None
                      ) -> tuple[LLMEngine, StepRecorder, list[Prompt], list[str]]:
    """The engine as the worker builds it (on `cpus`, when given), warmed up and started; with its recorder, the
    prompts, dtype info.

    As in the worker, it is built and warmed up on a thread that then ends (workers/torch_threads.py).
    """
    def build() -> tuple[LLMEngine, StepRecorder, list[Prompt], list[str]]:
        settings = get_settings()
        loaded = load_model(str(model_dir), device=settings.device, dtype=settings.dtype)
        prompts = build_prompts(loaded, prompts_count)
        recorder = StepRecorder(first_text=True)
        engine = serving_engine(loaded, settings, max_num_seqs=max_num_seqs, on_step=recorder, cpus=cpus)
        warm_up_in_this_thread(engine, prompts, SamplingParams(temperature=0.0, max_new_tokens=WARMUP_TOKENS))
        return engine, recorder, prompts, machine_info(loaded.dtype)

    engine, recorder, prompts, info = in_passing_thread(build)
    engine.start()
    return engine, recorder, prompts, info


# The stack.

class Stack:
    """Redis, one worker and the API as child processes; `close` (or the `with` block's end) stops them all.

    With a `split` that gives the engine cores, Redis and the API keep to its rest; the worker starts on all of the
    split's CPUs and divides them itself, as LLAVA_QUEUE_ENGINE_CPUS (inherited) tells it. Without one, nothing is
    moved.
    """

    def __init__(self, model_dir: Path, max_num_seqs: int, split: CpuSplit = NO_SPLIT):
        self.log_dir = Path(tempfile.mkdtemp(prefix="llava-queue-bench-"))
        self.redis = RedisServer()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.rest = split.rest
        self.every_cpu = split.engine | split.rest
        self._env_extra = {"LLAVA_QUEUE_MODEL_PATH": str(model_dir), "LLAVA_QUEUE_MAX_NUM_SEQS": str(max_num_seqs)}

    def __enter__(self) -> Self:
        try:
            self.redis.start(preexec_fn=lambda: keep_to(self.rest))
            env = dict(os.environ, LLAVA_QUEUE_REDIS_URL=self.redis.url, **self._env_extra)
            self._spawn("worker", ["worker"], env, self.every_cpu)
            self._spawn("api", ["api", "--host", "127.0.0.1", "--port", str(self.port)], env, self.rest)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, name: str, args: list[str], env: dict, cpus: frozenset[int] = frozenset()) -> None:
        # The child keeps its own copy of the file descriptor.
        with open(self.log_dir / f"{name}.log", "w") as log:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "shared.cli", *args], env=env,
                                                    stdout=log, stderr=subprocess.STDOUT,
                                                    preexec_fn=lambda: keep_to(cpus))

    def _wait_ready(self) -> None:
        """Until /healthz lists a worker; RuntimeError (with the logs) if a process dies or it takes too long."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            dead = [name for name, process in self.processes.items() if process.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited during start-up\n{self.logs()}")
            try:
                if requests.get(f"{self.base_url}/healthz", timeout=2).json().get("workers"):
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not come up in {START_TIMEOUT_S} s\n{self.logs()}")
            time.sleep(0.3)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) each process of the stack, and this one (the client), has used so far."""
        pids = {name: process.pid for name, process in self.processes.items()}
        pids.update(redis=self.redis.process.pid, client=os.getpid())
        return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(self.log_dir.glob("*.log")))

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        self.redis.stop()

T = TypeVar("T")


def run_client(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run the benchmark's client on uvloop, as the API runs: it shares the cores with the stack it measures, and
    asyncio's own loop cost it about a third more CPU a followed job (bench/README.md)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


async def post_json(base_url: str, path: str, body: dict) -> tuple[int, dict]:
    """POST `body` as JSON on a connection of its own; returns the status and the JSON answer.

    A bare HTTP/1.1 exchange over asyncio streams: the benchmark's client shares the CPU with the stack, and
    an httpx request cost it ~2.5 ms of CPU against ~1 ms for this (32 POSTs at once, bench/README.md).
    """
    url = httpx.URL(base_url)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        status = int((await reader.readline()).split()[1])
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await (reader.read() if length is None else reader.readexactly(length))
        return status, json.loads(data)
    finally:
        writer.close()


async def follow_one(base_url: str, ws_url: str, prompt: Prompt, max_new_tokens: int, over_ws: bool = False
                     ) -> tuple[str, RequestTiming, float, float]:
    """Submit one job and follow it over WebSocket to its end: submitted over HTTP (`POST /v1/jobs`, then
    `WS /v1/jobs/{id}/ws`), or with `over_ws` as the first message of `WS /v1/ws` (one connection, no HTTP).

    Returns its id, its timing, and the wall-clock (time.time) moments of the submit and of the
    first visible text, to set against the timestamps in the job record.
    """
    body = {"prompt": prompt.text, "temperature": 0, "max_new_tokens": max_new_tokens}
    wall_submit, wall_first = time.time(), None
    timing = RequestTiming(time.perf_counter())
    url = httpx.URL(ws_url)
    if over_ws:
        job_id, path = None, "/v1/ws"
    else:
        status, answer = await post_json(base_url, "/v1/jobs", body)
        if status != 202:
            raise RuntimeError(f"POST /v1/jobs answered {status}: {answer}")
        job_id = answer["id"]
        path = f"/v1/jobs/{job_id}/ws"
    async with await BareWebSocket.connect(url.host, url.port, path) as ws:
        if over_ws:
            await ws.send_text(json.dumps(body))
        async for raw in ws:
            message = json.loads(raw)
            now = time.perf_counter()
            job_id = job_id or message.get("id")
            if timing.first_token is None and len(message["text"]) > len(prompt.text):
                timing.first_token, wall_first = now, time.time()
            if message.get("done"):
                timing.finished = now
                timing.finish_reason = message.get("error") or message.get("finish_reason")
                if message.get("status") != "succeeded":
                    raise RuntimeError(f"job {job_id} ended {message.get('status')}: {message.get('error')}")
                break
    if timing.finished is None:
        raise RuntimeError(f"the stream of job {job_id} closed before the job's end")
    if timing.first_token is None:
        timing.first_token, wall_first = timing.finished, time.time()
    return job_id, timing, wall_submit, wall_first


# Where a job's time to first text goes over the stack, from the job record's timestamps.
TTFT_SEGMENTS = ("submit → API records the job", "job recorded → worker starts it",
                 "job started → first text at the worker", "first text at the worker → client sees it")


@dataclass
class StackRound:
    """One round over the stack: the run; per TTFT_SEGMENTS entry each job's seconds in it; CPU seconds per process;
    and for each prompt, in order, when the worker started its job (seconds after the round's first submit)."""

    result: RunResult
    segments: dict[str, list[float]]
    cpu: dict[str, float]
    start_delays: list[float]


async def run_over_stack(stack: Stack, prompts: list[Prompt], max_new_tokens: int, over_ws: bool = False
                         ) -> StackRound:
    """Every prompt submitted at once over HTTP (or, `over_ws`, on `WS /v1/ws`) and followed over WebSocket; usage
    read back from the job records."""
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    segments: dict[str, list[float]] = {name: [] for name in TTFT_SEGMENTS}
    start_delays = []
    cpu_before = stack.cpu_seconds()
    done = await asyncio.gather(*(follow_one(stack.base_url, stack.ws_url, p, max_new_tokens, over_ws)
                                  for p in prompts))
    # The CPU of serving the jobs only: the job records read back below are the benchmark's bookkeeping.
    cpu = {name: seconds - cpu_before[name] for name, seconds in stack.cpu_seconds().items()}
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=600, limits=limits) as client:
        first_submit = min(wall_submit for _, _, wall_submit, _ in done)
        for job_id, timing, wall_submit, wall_first in done:
            record = (await client.get(f"/v1/jobs/{job_id}")).json()
            timing.completion_tokens = record["usage"]["completion_tokens"]
            timing.text = record["text"]
            created, started = record["created_at"], record["started_at"]
            first = record["first_token_at"] or record["finished_at"]
            moments = (wall_submit, created, started, first, wall_first)
            for name, seconds in zip(TTFT_SEGMENTS, (b - a for a, b in zip(moments, moments[1:]))):
                segments[name].append(seconds)
            start_delays.append(started - first_submit)
    return StackRound(from_timings([timing for _, timing, _, _ in done]), segments, cpu, start_delays)


def run_engine_as_delivered(engine: LLMEngine, recorder: StepRecorder, prompts: list[Prompt],
                            params: SamplingParams, start_delays: list[float], tag: str) -> RunResult:
    """(c') The in-process engine given each prompt at the moment the stack's worker started its job, TTFT counted
    from the first submit as over the stack: what the delivery's timing alone costs the first tokens, without
    the CPU the API, Redis, Celery and the client take from the engine."""
    order = sorted(range(len(prompts)), key=start_delays.__getitem__)
    start = time.perf_counter()
    result = run_engine(engine, recorder, [prompts[i] for i in order], params,
                        arrivals=[start_delays[i] for i in order], tag=tag)
    for timing in result.timings:
        timing.submitted = start
    return result


# Short paired rounds: the TTFT difference with an interval, and the latency the stack adds to a lone request.

@dataclass
class Paired:
    """Per pair, the stack's TTFT minus (c)'s, in ms: p50 (for a lone request, its TTFT) and mean; and each side's
    TTFT p50."""

    differences: list[float] = field(default_factory=list)
    mean_differences: list[float] = field(default_factory=list)
    c_ms: list[float] = field(default_factory=list)
    stack_ms: list[float] = field(default_factory=list)

    def summary(self) -> str:
        low, high, covers = median_interval(self.differences)
        faster = sum(d < 0 for d in self.differences)
        text = (f"median {statistics.median(self.differences):+.0f} ms ({100 * covers:.0f} % interval {low:+.0f} to "
                f"{high:+.0f} ms), "
                f"the stack earlier in {faster} of {len(self.differences)}; (c) {statistics.median(self.c_ms):.0f} "
                f"ms, the stack {statistics.median(self.stack_ms):.0f} ms (medians)")
        if self.mean_differences != self.differences:  # one request a pair: its mean is its p50
            mean_low, mean_high, _ = median_interval(self.mean_differences)
            text += (f"; the mean TTFTs' difference, median {statistics.median(self.mean_differences):+.0f} ms "
                     f"({mean_low:+.0f} to {mean_high:+.0f} ms)")
        return text


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval of the median of `values`, and its coverage: the order statistics x(k) and
    x(n+1-k) for the largest k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least `level`. Under 6 values no
    k reaches 95 %: the whole range is returned with what it does cover (87.5 % for 4 values, 93.8 % for 5), where
    a bootstrap returned that range and called it 95 %."""
    ordered, n = sorted(values), len(values)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k < (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


def paired_rounds(engine: LLMEngine, recorder: StepRecorder, stack: Stack, bursts: list[list[Prompt]],
                  params: SamplingParams, over_ws: bool = False) -> Paired:
    """Each list of prompts submitted at once to (c) and to the stack (over HTTP, or `over_ws` on `WS /v1/ws`), in
    turn, the order alternating pair to pair (so that a machine slowing down or speeding up over the run does not
    favour one side)."""
    paired = Paired()
    for index, prompts in enumerate(bursts):
        def in_process() -> RunResult:
            return run_engine(engine, recorder, prompts, params, tag=f"p{index}_")

        def over_stack() -> RunResult:
            return run_client(run_over_stack(stack, prompts, params.max_new_tokens, over_ws)).result

        if index % 2:
            theirs, ours = over_stack(), in_process()
        else:
            ours, theirs = in_process(), over_stack()
        paired.differences.append(theirs.ttft_ms(50) - ours.ttft_ms(50))
        paired.mean_differences.append(theirs.ttft_mean_ms() - ours.ttft_mean_ms())
        paired.c_ms.append(ours.ttft_ms(50))
        paired.stack_ms.append(theirs.ttft_ms(50))
    return paired


# Output.

@dataclass
class Round:
    """One round: (c), the stack, and (c') fed as the stack's worker started that round's jobs."""

    c: RunResult
    stack: StackRound
    as_delivered: RunResult


def print_report(args, c: RunResult, best: StackRound, info: list[str], same_text: int, rounds: list[Round],
                 bursts: Paired | None, ws_bursts: Paired | None, lone: Paired | None) -> None:
    n, new = args.num_requests, args.max_new_tokens
    e2e = best.result
    print(f"\n## End-to-end benchmark: {n} requests x up to {new} new tokens, greedy, EOS honoured\n")
    print("\n".join(info))
    print(f"- load average at end {os.getloadavg()[0]:.2f} (1 min)")
    print("- TTFT = submit → first visible text; TPOT = (e2e − TTFT) / (completion tokens − 1)\n")
    print("| path | requests | completion tokens | time (s) | output tok/s | vs (c) | TTFT p50 / p99 (ms) | "
          "TPOT p50 / p99 (ms) | host load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, result in ((f"(c) engine in process, all {n} at once", c),
                          (f"stack: HTTP → Celery/Redis → worker → pub/sub → WebSocket, all {n} at once", e2e)):
        print(f"| {label} | {result.requests} | {result.tokens} | {result.seconds:.1f} | {result.tokens_per_s:.1f} | "
              f"{result.tokens_per_s / c.tokens_per_s:.2f}x | {latency_cells(result)} | {result.load:.1f} |")
    print(f"\nEach row: the fastest of {args.repeats} round(s), run in turn. Round by round, (c) then the stack, and "
          "(c'): the engine in process given each request when the stack's worker started its job in that round "
          "(TTFT from the first submit):")
    for index, r in enumerate(rounds, 1):
        stack = r.stack.result
        print(f"- round {index}: {r.c.tokens_per_s:.1f} and {stack.tokens_per_s:.1f} tok/s, "
              f"{stack.tokens_per_s / r.c.tokens_per_s:.2f}x; TTFT p50 {r.c.ttft_ms(50):.0f} and "
              f"{stack.ttft_ms(50):.0f} ms, {stack.ttft_ms(50) - r.c.ttft_ms(50):+.0f} ms "
              f"(TTFT mean {stack.ttft_mean_ms() - r.c.ttft_mean_ms():+.0f} ms); (c') TTFT p50 "
              f"{r.as_delivered.ttft_ms(50):.0f} ms, {r.as_delivered.ttft_ms(50) - r.c.ttft_ms(50):+.0f} ms")
    ratios = [r.stack.result.tokens_per_s / r.c.tokens_per_s for r in rounds]
    differences = [r.stack.result.ttft_ms(50) - r.c.ttft_ms(50) for r in rounds]
    mean_differences = [r.stack.result.ttft_mean_ms() - r.c.ttft_mean_ms() for r in rounds]
    delivered = [r.as_delivered.ttft_ms(50) - r.c.ttft_ms(50) for r in rounds]
    print(f"- median of the rounds: {statistics.median(ratios):.2f}x, TTFT p50 "
          f"{statistics.median(differences):+.0f} ms, TTFT mean {statistics.median(mean_differences):+.0f} ms; "
          f"(c') TTFT p50 {statistics.median(delivered):+.0f} ms: the part of the stack's TTFT difference that the "
          "moments its jobs reached the engine explain alone")
    # Each side's fastest round may be a different round, whose TTFTs moved by hundreds of ms: the figures that
    # count are within a round, (c) and the stack run in turn, their median over the rounds.
    print(f"\n**e2e throughput / (c) = {statistics.median(ratios):.2f}x; e2e TTFT p50 − (c) TTFT p50 = "
          f"{statistics.median(differences):+.0f} ms** (medians over the {len(rounds)} round(s) of each round's "
          f"stack against its (c); the fastest of each side, from any rounds: "
          f"{e2e.tokens_per_s / c.tokens_per_s:.2f}x, {e2e.ttft_ms(50) - c.ttft_ms(50):+.0f} ms)")
    parts = ", ".join(f"{name} {1000 * statistics.median(values):.0f} ms" for name, values in best.segments.items())
    print(f"\nStack TTFT, medians from the job records: {parts}.")
    per_k = 1000 / max(e2e.tokens, 1)
    print("\nCPU over the stack round (user + system seconds; the machine has "
          f"{os.cpu_count()} cores × {e2e.seconds:.1f} s = {os.cpu_count() * e2e.seconds:.1f} s): "
          + ", ".join(f"{name} {seconds:.1f} s ({1000 * seconds * per_k:.0f} ms per 1,000 tokens)"
                      for name, seconds in best.cpu.items()) + ".")
    print(f"\nSame work: {c.tokens} completion tokens in process, {e2e.tokens} over the stack; "
          f"{same_text} of {n} texts identical.")
    if bursts:
        print(f"\n**TTFT p50, stack − (c), over {len(bursts.differences)} paired bursts** ({n} requests × "
              f"{args.ttft_tokens} new tokens, the order alternating): {bursts.summary()}. Pair by pair: "
              + ", ".join(f"{d:+.0f}" for d in bursts.differences) + " ms.")
    if ws_bursts:
        print(f"\n**The same, each job submitted on `WS /v1/ws`** (its request the socket's first message: no HTTP "
              f"request, one connection a job), {len(ws_bursts.differences)} paired bursts: {ws_bursts.summary()}. "
              "Pair by pair: " + ", ".join(f"{d:+.0f}" for d in ws_bursts.differences) + " ms.")
    if lone:
        print(f"\n**One request alone, stack − (c), over {len(lone.differences)} pairs** (TTFT, {args.ttft_tokens} "
              f"new tokens): {lone.summary()}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=32, help="engine slots, in process and in the worker")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in process and in the worker (default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of (c) and the stack in turn; each one's fastest round is reported")
    parser.add_argument("--engine-cpus", default="",
                        help="cores of the engine's own, as LLAVA_QUEUE_ENGINE_CPUS (e.g. 1): the in-process engine "
                             "and the worker's compute there, everything else (API, Redis, client) on the others")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the worker's LLAVA_QUEUE_STREAM_INTERVAL: a job's text is sent every this many tokens")
    parser.add_argument("--ttft-rounds", type=int, default=16,
                        help="short paired bursts after the full rounds, for the TTFT difference with an interval")
    parser.add_argument("--ttft-tokens", type=int, default=8, help="new tokens in the short rounds")
    parser.add_argument("--ws-rounds", type=int, default=8,
                        help="paired bursts as --ttft-rounds, the stack's jobs submitted on WS /v1/ws (no HTTP)")
    parser.add_argument("--lone", type=int, default=16,
                        help="single requests, one at a time on each side: what the stack adds to one first token")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 requests x 16 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.max_new_tokens, args.ttft_rounds, args.ws_rounds, args.lone = 8, 16, 2, 2, 2
    if args.threads:
        # torch reads OMP_NUM_THREADS at start-up: the worker process inherits it.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    # Ctrl-C and SIGTERM both unwind through the `with` blocks, which stop every child process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # Worked out before this thread moves off the engine's cores; the worker inherits the setting.
    split = split_cpus(args.engine_cpus)
    os.environ["LLAVA_QUEUE_ENGINE_CPUS"] = args.engine_cpus
    os.environ["LLAVA_QUEUE_STREAM_INTERVAL"] = str(args.stream_interval)
    model_dir = in_passing_thread(ensure_default_model, get_settings().cache_dir)
    print("loading the engine in process ...", flush=True)
    engine, recorder, prompts, info = in_process_engine(model_dir, args.num_requests, args.max_num_seqs,
                                                        split.engine or None)
    keep_to(split.rest)  # the client, from here on
    if split.engine:
        info.append(f"- dedicated engine cores: {split.describe()}: the in-process engine and the worker's, with "
                    f"{len(split.engine)} torch thread(s); the client, the API, Redis and the worker's other threads "
                    "on the rest")
    if args.stream_interval != 1:
        info.append(f"- the worker streams every {args.stream_interval} tokens (LLAVA_QUEUE_STREAM_INTERVAL); a "
                    "job's first token and its end at once")
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    c = best = None
    rounds: list[Round] = []
    try:
        print("starting Redis, a worker and the API ...", flush=True)
        with Stack(model_dir, args.max_num_seqs, split) as stack:
            print(f"stack up (logs in {stack.log_dir}); warming up ...", flush=True)
            run_client(run_over_stack(stack, prompts, WARMUP_TOKENS))
            # The worker's engine thread served that burst; the in-process engine was warmed up on the thread that
            # built it, so its own engine thread gets the same burst: neither side's first timed round pays for it.
            run_engine(engine, recorder, prompts, SamplingParams(temperature=0.0, max_new_tokens=WARMUP_TOKENS),
                       tag="w")
            # Rounds of (c) then the stack, each one's fastest kept: on a shared machine, a round slowed by
            # other work is not the one that counts. The idle side only waits (no CPU) while the other runs.
            for round_ in range(1, args.repeats + 1):
                print(f"round {round_}: (c) engine in process, {args.num_requests} at once ...", flush=True)
                round_c = run_engine(engine, recorder, prompts, params, tag=f"c{round_}_")
                c = fastest(c, round_c)
                print(f"round {round_}: {args.num_requests} jobs over HTTP ...", flush=True)
                over_stack = run_client(run_over_stack(stack, prompts, args.max_new_tokens))
                if best is None or over_stack.result.tokens_per_s > best.result.tokens_per_s:
                    best = over_stack
                print(f"round {round_}: (c') in process, as the worker started the jobs ...", flush=True)
                as_delivered = run_engine_as_delivered(engine, recorder, prompts, params, over_stack.start_delays,
                                                       tag=f"d{round_}_")
                rounds.append(Round(round_c, over_stack, as_delivered))
            short = SamplingParams(temperature=0.0, max_new_tokens=args.ttft_tokens)
            bursts = ws_bursts = lone = None
            if args.ttft_rounds:
                print(f"{args.ttft_rounds} paired bursts of {args.num_requests} x {args.ttft_tokens} ...", flush=True)
                bursts = paired_rounds(engine, recorder, stack, [prompts] * args.ttft_rounds, short)
            if args.ws_rounds:
                print(f"{args.ws_rounds} paired bursts submitted on WS /v1/ws ...", flush=True)
                ws_bursts = paired_rounds(engine, recorder, stack, [prompts] * args.ws_rounds, short, over_ws=True)
            if args.lone:
                print(f"{args.lone} lone requests on each side ...", flush=True)
                lone = paired_rounds(engine, recorder, stack, [[prompts[i % len(prompts)]] for i in range(args.lone)],
                                     short)
    finally:
        engine.shutdown()
    same_text = sum(a.text == b.text for a, b in zip(c.timings, best.result.timings))
    print_report(args, c, best, info, same_text, rounds, bursts, ws_bursts, lone)


if __name__ == "__main__":
    main()
