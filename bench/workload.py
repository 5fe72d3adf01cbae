"""The workload both benchmarks share: fixed chat prompts, the worker's tokenization, latency bookkeeping.

Prompts are rendered with the tokenizer's chat template and tokenized by the worker's own
`prepare`, so the in-process engine, `model.generate` and the HTTP stack see the same ids.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers

from shared.protocol import GenerateRequest
from workers.builder import LoadedModel
from workers.engine import LLMEngine, SamplingParams, SeqOutput
from workers.generation import prepare

# Open questions that make a small chat model write long answers (the e2e path cannot ignore EOS).
QUESTIONS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe the water cycle in detail for a school report.",
    "Write a detailed essay about the history of the printing press.",
    "Explain step by step how to bake sourdough bread at home.",
    "Write a long letter from a sailor to his family during a storm at sea.",
    "Describe in detail how the human heart pumps blood.",
    "Write a detailed guide to planting a vegetable garden.",
    "Explain how airplanes fly, with as much detail as you can.",
    "Write a long story about a robot who learns to paint.",
    "Describe the life cycle of a butterfly in detail.",
    "Write an essay about why sleep is important for health.",
    "Explain in detail how a computer processor executes a program.",
    "Write a long story about two friends crossing a desert.",
    "Describe the main causes of the French Revolution in detail.",
    "Write a detailed travel guide to a small mountain village.",
    "Explain step by step how to train for a first marathon.",
    "Write a long fairy tale about a dragon who is afraid of fire.",
    "Describe how volcanoes form and erupt, in detail.",
    "Write an essay about the importance of libraries in cities.",
    "Explain in detail how vaccines train the immune system.",
    "Write a long story about a cat who becomes the mayor of a town.",
    "Describe in detail how coffee is grown, harvested and roasted.",
    "Write a detailed lesson plan for teaching fractions to children.",
    "Explain how electricity gets from a power plant to a house.",
    "Write a long diary entry of an astronaut on her first day in space.",
    "Describe the rules and strategy of chess in detail.",
    "Write an essay about how the internet changed the way people work.",
    "Explain in detail how bees make honey.",
    "Write a long story about a boy who builds a boat to cross a lake.",
    "Describe the seasons and why the Earth has them, in detail.",
    "Write a detailed recipe and story behind a family's favorite soup.",
]


@dataclass
class Prompt:
    """One benchmark request: the rendered prompt text and the ids the worker would feed the engine."""

    text: str
    token_ids: list[int]


def build_prompts(loaded: LoadedModel, count: int) -> list[Prompt]:
    """The first `count` fixed prompts (cycling through QUESTIONS when more are asked), rendered and tokenized."""
    tokenizer = loaded.tokenizer
    prompts = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            question += f" (version {i // len(QUESTIONS) + 1})"
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        prepared = prepare(GenerateRequest(prompt=text, temperature=0.0, max_new_tokens=16), loaded, 1024)
        prompts.append(Prompt(text, prepared.token_ids))
    return prompts


def warm_up_in_this_thread(engine: LLMEngine, prompts: list[Prompt], params: SamplingParams) -> None:
    """Run `prompts` through an engine not started yet, stepping it in this thread, as the worker warms up.

    Call it through `in_passing_thread`, as the worker does: the OpenMP team of the thread that
    steps it then ends before the engine thread starts (workers/torch_threads.py).
    """
    engine.use_this_thread()
    handles = [engine.add_request(f"warm-up-{i}", p.token_ids, params) for i, p in enumerate(prompts)]
    while not all(handle.done.is_set() for handle in handles):
        engine.step()


@dataclass
class RequestTiming:
    """Wall-clock marks of one request (time.perf_counter seconds) and what it produced."""

    submitted: float
    first_token: float | None = None
    finished: float | None = None
    completion_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None

    @property
    def ttft(self) -> float:
        return self.first_token - self.submitted

    @property
    def tpot(self) -> float | None:
        """vLLM's time per output token: (e2e - TTFT) / (tokens - 1); None for a one-token answer."""
        if self.completion_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.completion_tokens - 1)


@dataclass
class StepRecorder:
    """An engine `on_step` hook that timestamps each request's first output and its end.

    first_text=False marks the first generated token (vLLM's TTFT); True marks the first
    non-empty text, which is what a streaming client can see.
    """

    first_text: bool = False
    timings: dict[str, RequestTiming] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def submitted(self, request_id: str) -> None:
        with self._lock:
            self.timings[request_id] = RequestTiming(time.perf_counter())

    def __call__(self, outputs: list[SeqOutput]) -> None:
        now = time.perf_counter()
        with self._lock:
            for out in outputs:
                timing = self.timings.get(out.request_id)
                if timing is None:
                    continue
                seen = bool(out.delta) if self.first_text else out.first_token
                if timing.first_token is None and (seen or out.finished):
                    timing.first_token = now
                if out.finished:
                    timing.finished = now
                    timing.completion_tokens = out.completion_tokens
                    timing.text = out.text
                    timing.finish_reason = out.error or out.finish_reason


@dataclass
class RunResult:
    """One timed run: its wall time, the tokens it generated and, when measured, per-request latencies."""

    seconds: float
    tokens: int
    requests: int
    timings: list[RequestTiming] = field(default_factory=list)
    # The host's 1-minute load average when the run ended: above the core count, other work shared the CPU.
    load: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def ttft_ms(self, q: float) -> float | None:
        values = self._ttfts()
        return 1000 * float(np.percentile(values, q)) if values else None

    def ttft_mean_ms(self) -> float | None:
        values = self._ttfts()
        return 1000 * float(np.mean(values)) if values else None

    def _ttfts(self) -> list[float]:
        return [t.ttft for t in self.timings if t.first_token is not None]

    def tpot_ms(self, q: float) -> float | None:
        values = [t.tpot for t in self.timings if t.tpot is not None]
        return 1000 * float(np.percentile(values, q)) if values else None


def from_timings(timings: list[RequestTiming]) -> RunResult:
    """A RunResult spanning the first submit to the last finish of `timings`."""
    start = min(t.submitted for t in timings)
    end = max(t.finished for t in timings)
    return RunResult(end - start, sum(t.completion_tokens for t in timings), len(timings), timings)


def fastest(best: RunResult | None, result: RunResult) -> RunResult:
    """Whichever of two runs of the same work had the higher throughput (`best` may be None)."""
    return result if best is None or result.tokens_per_s > best.tokens_per_s else best


def fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def latency_cells(result: RunResult) -> str:
    """The "TTFT p50 / p99 | TPOT p50 / p99" cells of a markdown row, in ms."""
    return (f"{fmt_ms(result.ttft_ms(50))} / {fmt_ms(result.ttft_ms(99))} | "
            f"{fmt_ms(result.tpot_ms(50))} / {fmt_ms(result.tpot_ms(99))}")


def machine_info(dtype: torch.dtype) -> list[str]:
    """Lines describing where the numbers come from."""
    load1, load5, _ = os.getloadavg()
    return [
        (f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible, "
         f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"),
        (f"- torch {torch.__version__}, transformers {transformers.__version__}, "
         f"{torch.get_num_threads()} torch threads"),
        f"- dtype {str(dtype).removeprefix('torch.')}",
        f"- load average at start {load1:.2f} (1 min), {load5:.2f} (5 min)",
    ]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the machine architecture)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.machine()


def run_engine(engine: LLMEngine, recorder: StepRecorder, prompts: list[Prompt], params: SamplingParams,
               arrivals: list[float] | None = None, tag: str = "r") -> RunResult:
    """Every prompt submitted to a started engine at once, or each at its arrival time (seconds from the start);
    returns the run once every request has ended (RuntimeError if one failed)."""
    recorder.timings.clear()
    handles = []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        if arrivals is not None:
            delay = start + arrivals[i] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        request_id = f"{tag}{i}"
        recorder.submitted(request_id)
        handles.append(engine.add_request(request_id, prompt.token_ids, params))
    for handle in handles:
        out = handle.wait()
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed in the engine: {out.error}")
    return from_timings(list(recorder.timings.values()))
