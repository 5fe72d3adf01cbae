"""The engine against Hugging Face generate, on the embedded default model, in one process and one run.

    python -m bench.engine                 # 32 requests x 128 new tokens (about 4 minutes on 2 CPU cores)
    python -m bench.engine --quick         # 8 x 16, a smoke run

Every request generates exactly --max-new-tokens tokens (EOS is ignored, see `ignore_eos`),
so every path does the same work and tokens/s compare directly:

(a) `model.generate` one request at a time, as the original LLaVA worker serves;
(b) `model.generate` on all requests as one left-padded static batch;
(c) the engine with every request submitted at once;
(d) the engine under Poisson arrivals (fixed seed), with TTFT and TPOT percentiles.

It also measures the machine's matmul FLOP/s and memory bandwidth and prints the decode
tokens/s they allow for this model (the roofline), and how close (b) and (c) come to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import random
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from bench.workload import (
    Prompt,
    RunResult,
    StepRecorder,
    build_prompts,
    fastest,
    latency_cells,
    machine_info,
    run_engine,
    warm_up_in_this_thread,
)
from shared.settings import get_settings
from workers.builder import LoadedModel, load_model, serving_engine
from workers.default_model import ensure_default_model
from workers.engine import LLMEngine, SamplingParams
from workers.engine.dtype import cpu_supports_bf16
from workers.torch_threads import in_passing_thread

WARMUP_TOKENS = 8


# Ignoring EOS.

def ignore_eos(loaded: LoadedModel) -> None:
    """Make `generate` on this process's model object run to max_new_tokens: no EOS in its generation config.

    The engine needs no change: its requests carry SamplingParams(ignore_eos=True).
    """
    loaded.model.generation_config.eos_token_id = None
    if loaded.model.generation_config.pad_token_id is None:
        loaded.model.generation_config.pad_token_id = loaded.tokenizer.pad_token_id


def benchmark_engine(loaded: LoadedModel, max_num_seqs: int, on_step=None) -> LLMEngine:
    """An engine built as the worker builds it (budgets from the settings, the model's context length)."""
    return serving_engine(loaded, get_settings(), max_num_seqs=max_num_seqs, on_step=on_step)


def run_on_fresh_engine(loaded: LoadedModel, max_num_seqs: int, recorder: StepRecorder, prompts: list[Prompt],
                        params: SamplingParams, arrivals: list[float] | None = None, tag: str = "r") -> RunResult:
    """`run_engine` on an engine built for this run and shut down after it.

    Its thread, and that thread's OpenMP team, end with the run, so the next path runs with a
    team of its own as the only one, as the worker's engine does (workers/torch_threads.py).
    """
    engine = in_passing_thread(benchmark_engine, loaded, max_num_seqs, on_step=recorder)
    engine.start()
    try:
        return run_engine(engine, recorder, prompts, params, arrivals, tag=tag)
    finally:
        engine.shutdown()


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)


# The four paths.

def run_sequential(loaded: LoadedModel, prompts: list[Prompt], max_new_tokens: int) -> RunResult:
    """(a) model.generate, one request at a time."""
    model = loaded.model
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            input_ids = torch.tensor([prompt.token_ids], device=model.device)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens)
            tokens += out.shape[1] - input_ids.shape[1]
    return RunResult(time.perf_counter() - start, tokens, len(prompts))


class GeneratedCounter(LogitsProcessor):
    """Counts the tokens each row of a greedy `generate` really generated.

    The output is as wide for every row: a row that stopped (at EOS) is filled with the pad id from then on, so
    its width says nothing. A filled step shows as a pad id where the row's scores chose another token; the
    check costs a comparison of one id a row per step (an argmax only for a row whose last id is the pad id).
    """

    def __init__(self, rows: int, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.steps = 0
        self.stopped_after: list[int | None] = [None] * rows
        self._scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._check(input_ids[:, -1])
        self._scores, self.steps = scores, self.steps + 1
        return scores

    def _check(self, appended: torch.Tensor) -> None:
        """Rows whose id appended at the last step is the pad id their scores did not choose stopped before it."""
        if self._scores is None:
            return
        for row in (appended == self.pad_token_id).nonzero().flatten().tolist():
            if self.stopped_after[row] is None and int(self._scores[row].argmax()) != self.pad_token_id:
                self.stopped_after[row] = self.steps - 1

    def counts(self, output_ids: torch.Tensor) -> list[int]:
        """Each row's generated tokens, given generate's output (whose last step no call saw)."""
        self._check(output_ids[:, -1])
        return [self.steps if stopped is None else stopped for stopped in self.stopped_after]


def run_static_batch(loaded: LoadedModel, prompts: list[Prompt], max_new_tokens: int) -> RunResult:
    """(b) model.generate on every prompt as one left-padded batch; the tokens each row really generated counted."""
    model, tokenizer = loaded.model, loaded.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer.pad({"input_ids": [p.token_ids for p in prompts]}, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    input_ids, attention_mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
    pad = model.generation_config.pad_token_id
    counter = GeneratedCounter(len(prompts), tokenizer.pad_token_id if pad is None else pad)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                             logits_processor=LogitsProcessorList([counter]))
    seconds = time.perf_counter() - start
    return RunResult(seconds, sum(counter.counts(out)), len(prompts))


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s) of `count` requests at `rate` per second; the first arrives at 0."""
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


def check_work(name: str, result: RunResult, max_new_tokens: int) -> RunResult:
    """`result`, once checked that every request generated exactly max_new_tokens."""
    expected = result.requests * max_new_tokens
    if result.tokens != expected:
        raise RuntimeError(f"{name}: generated {result.tokens} tokens, expected {expected}: EOS was not ignored")
    return result


# The roofline.

@dataclasses.dataclass
class Machine:
    """What the hardware allows: matmul FLOP/s per dtype, read and copy bandwidth in bytes/s."""

    flops: dict[torch.dtype, float]
    read_bandwidth: float
    copy_bandwidth: float


def measure_matmul(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5) -> float:
    """Best FLOP/s of an n x n x n matmul over `seconds`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=c)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 8) -> tuple[float, float]:
    """Best (read, copy) bandwidth in bytes/s: a sum over, and a copy of, an `nbytes` fp32 tensor."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    x.sum(), y.copy_(x)
    read = copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        t1 = time.perf_counter()
        y.copy_(x)
        t2 = time.perf_counter()
        read, copy = min(read, t1 - t0), min(copy, t2 - t1)
    del x, y
    return nbytes / read, 2 * nbytes / copy


def measure_machine(model_dtype: torch.dtype) -> Machine:
    """fp32 matmul, bf16 where the CPU has it natively, the model's dtype in any case; then bandwidth."""
    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_supports_bf16() else []) + [model_dtype]
    flops = {dtype: measure_matmul(dtype) for dtype in dict.fromkeys(dtypes)}
    read, copy = measure_bandwidth()
    return Machine(flops, read, copy)


@dataclasses.dataclass
class ModelCost:
    """What one token costs this model: parameters (tied weights once), their bytes, KV bytes per context token."""

    params: int
    embedding_params: int
    weight_bytes: int
    kv_bytes_per_token: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelCost:
        params = list(model.parameters())  # parameters() yields a tied weight once
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        elem = params[0].element_size()
        return cls(
            params=sum(p.numel() for p in params),
            embedding_params=model.get_input_embeddings().weight.numel(),
            weight_bytes=sum(p.numel() * p.element_size() for p in params),
            kv_bytes_per_token=2 * config.num_hidden_layers * kv_heads * head_dim * elem,
        )

    def decode_step_seconds(self, machine: Machine, dtype: torch.dtype, batch: int, context: float) -> float:
        """max(bytes read / bandwidth, FLOPs / FLOP/s) for one decode step of `batch` rows at `context` tokens."""
        bytes_read = self.weight_bytes + batch * context * self.kv_bytes_per_token
        flops = 2 * self.params * batch
        return max(bytes_read / machine.read_bandwidth, flops / machine.flops[dtype])

    def prefill_seconds(self, machine: Machine, dtype: torch.dtype, prompt_tokens: int, rows: int) -> float:
        """Compute-bound prefill; only each row's last position goes through the LM head."""
        flops = 2 * (self.params - self.embedding_params) * prompt_tokens + 2 * self.embedding_params * rows
        return max(self.weight_bytes / machine.read_bandwidth, flops / machine.flops[dtype])


def mean_prompt_tokens(prompts: list[Prompt]) -> float:
    """The mean prompt length, in tokens, of `prompts`: a roofline row must use the prompts its run had."""
    return sum(len(p.token_ids) for p in prompts) / len(prompts)


def roofline_tokens_per_s(cost: ModelCost, machine: Machine, dtype: torch.dtype, batch: int,
                          mean_prompt: float, max_new_tokens: int, with_prefill: bool) -> float:
    """Output tokens/s the roofline allows for `batch` rows generating max_new_tokens each.

    With the prefill, the prefill itself yields each row's first token, so max_new_tokens - 1 decode steps follow
    (as in (a), (b), (c)); decode only, the rate of max_new_tokens decode steps.
    """
    steps = range(1, max_new_tokens) if with_prefill else range(max_new_tokens)
    decode = sum(cost.decode_step_seconds(machine, dtype, batch, mean_prompt + step) for step in steps)
    prefill = cost.prefill_seconds(machine, dtype, round(mean_prompt * batch), batch) if with_prefill else 0.0
    return batch * max_new_tokens / (decode + prefill)


# Output.

def gb(value: float) -> str:
    return f"{value / 1e9:.1f}"


def print_report(args, loaded: LoadedModel, rows: list[tuple[str, str, RunResult | None]], a: RunResult | None,
                 b: RunResult | None, c: RunResult, machine: Machine, cost: ModelCost, prompts: list[Prompt],
                 info: list[str], per_round: list[tuple[RunResult | None, RunResult | None, RunResult]] = ()) -> None:
    """The markdown report; `per_round` holds each round's (a), (b), (c), whose ratios come from one round each."""
    dtype = loaded.dtype
    n, new = args.num_requests, args.max_new_tokens
    print(f"\n## Engine benchmark: {loaded.name}, {n} requests x {new} new tokens (EOS ignored, greedy)\n")
    print("\n".join(info))
    print(f"- load average at end {os.getloadavg()[0]:.2f} (1 min)")
    print("- EOS ignored: generation_config.eos_token_id = None for generate, SamplingParams(ignore_eos=True) "
          "for the engine")
    if dtype == torch.float32:
        print("- the engine's default dtype here is already float32, so there is no separate fp32 reference")
    print()
    print("| run | requests | dtype | time (s) | output tok/s | vs (a) | vs (b) | TTFT p50 / p99 (ms) | "
          "TPOT p50 / p99 (ms) | host load |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, dtype_name, result in rows:
        if result is None:
            continue
        # (d)'s tokens/s is the arrival rate's, not what the engine can do: no ratio for it.
        arrivals = label.startswith("(d)")
        vs_a = f"{result.tokens_per_s / a.tokens_per_s:.2f}x" if a and not arrivals else "—"
        vs_b = f"{result.tokens_per_s / b.tokens_per_s:.2f}x" if b and not arrivals else "—"
        requests = f"{result.requests} x {new}"
        print(f"| {label} | {requests} | {dtype_name} | {result.seconds:.1f} | {result.tokens_per_s:.1f} | {vs_a} | "
              f"{vs_b} | {latency_cells(result)} | {result.load:.1f} |")
    if args.repeats > 1:
        print(f"\n(a), (b), (c): the fastest of {args.repeats} rounds run in turn; (d) and fp32 references: one run.")
    if len(per_round) > 1:
        # The fastest of each path may come from different rounds: the ratios within each round are printed too.
        for name, index in (("(a)", 0), ("(b)", 1)):
            within = [r[2].tokens_per_s / r[index].tokens_per_s for r in per_round if r[index] is not None]
            if within:
                print(f"\n(c)/{name} within each round: " + ", ".join(f"{x:.2f}x" for x in within)
                      + f" (median {statistics.median(within):.2f}x)")
    if a is not None and a.requests < n:
        print(f"\n(a) ran {a.requests} of the {n} requests one after another: its per-request cost does not depend "
              "on the others, so its tokens/s stands for all of them.")
    ratios = [f"(c)/{name} = {c.tokens_per_s / base.tokens_per_s:.2f}x" for name, base in (("(a)", a), ("(b)", b))
              if base is not None]
    if ratios:
        print(f"\n**{', '.join(ratios)}**")

    mean_prompt = mean_prompt_tokens(prompts)
    # (a) may have run a subset: its batch-1 row uses that subset's prompts.
    sequential_prompt = mean_prompt_tokens(prompts[: args.sequential_requests or len(prompts)])
    batch = len(prompts)
    print(f"\n### Roofline ({str(dtype).removeprefix('torch.')})\n")
    print("- matmul (2048^3): " + ", ".join(f"{str(d).removeprefix('torch.')} {f / 1e9:.0f} GFLOP/s"
                                              for d, f in machine.flops.items())
          + ("" if torch.bfloat16 in machine.flops else "; bf16 not measured: this CPU has no native bf16"))
    print(f"- memory bandwidth (512 MiB fp32): read (sum) {gb(machine.read_bandwidth)} GB/s, "
          f"copy (read + write) {gb(machine.copy_bandwidth)} GB/s; the roofline uses the read bandwidth")
    print(f"- model: {cost.params / 1e6:.1f} M parameters (tied embedding counted once), "
          f"{cost.weight_bytes / 1e6:.0f} MB of weights, KV cache {cost.kv_bytes_per_token / 1024:.1f} KiB per "
          f"token of context; mean prompt {mean_prompt:.1f} tokens ((a)'s: {sequential_prompt:.1f})")
    print("- decode step time = max((weights + batch x context x KV bytes) / bandwidth, 2 x params x batch / FLOP/s),"
          " summed over the steps (context grows by one each step); with prefill, the prefill gives each row its first"
          " token and max_new_tokens - 1 decode steps follow; attention FLOPs left out (< 3 %)\n")
    print("| batch | decode step (ms) at mean context | bound by | roofline tok/s (decode only) | "
          "roofline tok/s (with prefill) | measured tok/s | fraction of roofline (decode only / with prefill) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for rows_, prompt_, measured in ((1, sequential_prompt, [("(a)", a)]),
                                     (batch, mean_prompt, [("(b)", b), ("(c)", c)])):
        context = prompt_ + new / 2
        step = cost.decode_step_seconds(machine, dtype, rows_, context)
        memory = (cost.weight_bytes + rows_ * context * cost.kv_bytes_per_token) / machine.read_bandwidth
        bound = "memory" if memory >= step else "compute"
        decode_only = roofline_tokens_per_s(cost, machine, dtype, rows_, prompt_, new, with_prefill=False)
        full = roofline_tokens_per_s(cost, machine, dtype, rows_, prompt_, new, with_prefill=True)
        for name, result in measured:
            if result is None:
                continue
            print(f"| {rows_} | {step * 1000:.1f} | {bound} | {decode_only:.0f} | {full:.0f} | "
                  f"{name} {result.tokens_per_s:.1f} | {result.tokens_per_s / decode_only:.0%} / "
                  f"{result.tokens_per_s / full:.0%} |")
    if a is not None:
        # What the machine lets (c)/(a) be: how sequential generate serves is measured, (c) can at most reach
        # the roofline, so on a CPU whose products are slow against its memory even a perfect engine falls short.
        ceiling = roofline_tokens_per_s(cost, machine, dtype, batch, mean_prompt, new, with_prefill=True)
        print(f"\n(c)/(a) if (c) ran at the batch-{batch} roofline (with prefill): {ceiling / a.tokens_per_s:.1f}x; "
              f"a ratio of 15 needs (c) at {15 * a.tokens_per_s / ceiling:.0%} of that roofline, where it is at "
              f"{c.tokens_per_s / ceiling:.0%}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto", help="auto (the engine's default), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sequential-requests", type=int, default=8,
                        help="how many requests (a) runs one at a time (0: all of them)")
    parser.add_argument("--skip-sequential", action="store_true", help="leave out (a)")
    parser.add_argument("--skip-static", action="store_true", help="leave out (b)")
    parser.add_argument("--skip-poisson", action="store_true", help="leave out (d)")
    parser.add_argument("--rate", type=float, default=None,
                        help="(d) arrivals per second (default: the request rate (c) sustained)")
    parser.add_argument("--seed", type=int, default=0, help="(d) arrival times seed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of (a), (b), (c) in turn; each one's fastest round is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 requests x 16 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.num_requests, args.max_new_tokens, args.sequential_requests = 8, 16, 4
    if args.threads:
        torch.set_num_threads(args.threads)

    # Every torch run outside the engine thread goes through in_passing_thread, so that while a path runs, its
    # thread's OpenMP team is the only one (workers/torch_threads.py), as in the worker.
    settings = get_settings()
    model_dir = in_passing_thread(ensure_default_model, settings.cache_dir)
    loaded = in_passing_thread(load_model, str(model_dir), device=args.device, dtype=args.dtype)
    info = machine_info(loaded.dtype)
    ignore_eos(loaded)
    prompts = build_prompts(loaded, args.num_requests)
    new = args.max_new_tokens
    dtype_name = str(loaded.dtype).removeprefix("torch.")

    print("measuring the machine ...", flush=True)
    machine = in_passing_thread(measure_machine, loaded.dtype)
    cost = ModelCost.of(loaded.model)

    subset = prompts[: args.sequential_requests or len(prompts)]
    recorder = StepRecorder()
    max_num_seqs = max(settings.max_num_seqs, len(prompts))
    # Warm every path once, then time (a), (b), (c) in turn, `--repeats` rounds, keeping each one's fastest:
    # on a shared machine a round that other work slowed down is not the one reported.
    print("warming up ...", flush=True)
    in_passing_thread(lambda: warm_up_in_this_thread(benchmark_engine(loaded, max_num_seqs), prompts,
                                                     greedy(WARMUP_TOKENS)))
    if not args.skip_sequential:
        in_passing_thread(run_sequential, loaded, prompts[:1], WARMUP_TOKENS)
    if not args.skip_static:
        in_passing_thread(run_static_batch, loaded, prompts, WARMUP_TOKENS)
    a = b = c = d = None
    per_round = []
    for round_ in range(1, args.repeats + 1):
        a_round = b_round = None
        if not args.skip_sequential:
            print(f"round {round_}: (a) sequential generate, {len(subset)} requests ...", flush=True)
            a_round = check_work("(a)", in_passing_thread(run_sequential, loaded, subset, new), new)
            a = fastest(a, a_round)
        if not args.skip_static:
            print(f"round {round_}: (b) static batch generate, batch {len(prompts)} ...", flush=True)
            b_round = check_work("(b)", in_passing_thread(run_static_batch, loaded, prompts, new), new)
            b = fastest(b, b_round)
        print(f"round {round_}: (c) engine, {len(prompts)} at once ...", flush=True)
        c_round = run_on_fresh_engine(loaded, max_num_seqs, recorder, prompts, greedy(new), tag=f"c{round_}_")
        c = fastest(c, check_work("(c)", c_round, new))
        per_round.append((a_round, b_round, c_round))
    rate = args.rate or c.requests / c.seconds
    if not args.skip_poisson:
        print(f"(d) engine, Poisson arrivals at {rate:.2f} requests/s (seed {args.seed}) ...", flush=True)
        arrivals = poisson_arrivals(len(prompts), rate, args.seed)
        d_run = run_on_fresh_engine(loaded, max_num_seqs, recorder, prompts, greedy(new), arrivals, tag="d")
        d = check_work("(d)", d_run, new)

    rows = [
        ("(a) `model.generate`, one request at a time", dtype_name, a),
        (f"(b) `model.generate`, static batch of {len(prompts)} (left padding)", dtype_name, b),
        (f"(c) engine, all {len(prompts)} submitted at once", dtype_name, c),
        (f"(d) engine, Poisson arrivals {rate:.2f} req/s (seed {args.seed})", dtype_name, d),
    ]
    if loaded.dtype != torch.float32:
        gc.collect()
        fp32 = in_passing_thread(load_model, str(model_dir), device=args.device, dtype="float32")
        ignore_eos(fp32)
        if not args.skip_sequential:
            in_passing_thread(run_sequential, fp32, prompts[:1], WARMUP_TOKENS)
            rows.append(("(a) fp32 reference", "float32", in_passing_thread(run_sequential, fp32, subset, new)))
        if not args.skip_static:
            in_passing_thread(run_static_batch, fp32, prompts, WARMUP_TOKENS)
            rows.append(("(b) fp32 reference", "float32", in_passing_thread(run_static_batch, fp32, prompts, new)))
    print_report(args, loaded, rows, a, b, c, machine, cost, prompts, info, per_round)


if __name__ == "__main__":
    main()
