"""A long prompt arriving while streams decode: prefilled in chunks against in one forward, in one process and run.

    python -m bench.long_prompt                    # 3 streams, then a 4,000-token prompt; 2 rounds of each way
    python -m bench.long_prompt --prompt-tokens 7800 --streams 1

The engine admits a prompt longer than its prefill budget alone. In one forward, every running
stream waits for the whole prefill; in chunks of the budget (the engine's way), the running
batch decodes a step between two chunks. Both ways run on the embedded default model with the
worker's budgets, in turn, `--repeats` rounds each, and the report gives, for the time from the
long prompt's submission to its first token: the longest gap between two tokens of a stream,
the tokens the streams produced, and the long prompt's time to first token, with ratios.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from bench.workload import build_prompts, machine_info
from shared.settings import get_settings
from workers.builder import LoadedModel, load_model, serving_engine
from workers.default_model import ensure_default_model
from workers.engine import SamplingParams, SeqOutput
from workers.engine.scheduler import prefill_budget
from workers.torch_threads import in_passing_thread


@dataclass
class Marks:
    """When each request's outputs came (time.perf_counter seconds), from an engine's on_step."""

    outputs: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, outputs: list[SeqOutput]) -> None:
        now = time.perf_counter()
        with self.lock:
            for output in outputs:
                self.outputs.setdefault(output.request_id, []).append((now, output.completion_tokens))


@dataclass
class Round:
    stall_s: float  # the longest gap between two outputs of a stream while the long prompt was prefilled
    stream_tokens: int  # tokens the streams produced meanwhile, all together
    ttft_s: float  # the long prompt's time to first token


def long_prompt_ids(loaded: LoadedModel, count: int) -> list[int]:
    """`count` ids of ordinary text, the chat template's user turn around a document repeated to length."""
    tokenizer = loaded.tokenizer
    document = " ".join(f"Paragraph {i}: the queue holds jobs, the worker batches them, the tokens stream back."
                        for i in range(count // 8))
    text = tokenizer.apply_chat_template([{"role": "user", "content": document + "\nSummarize."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-count:]


def run_round(loaded: LoadedModel, budget: int, streams: list[list[int]], long_ids: list[int],
              stream_tokens: int, lead_tokens: int) -> Round:
    marks = Marks()
    # The worker's engine (budgets, forward), its prefill budget set to this way's.
    settings = get_settings().model_copy(update={"max_prefill_tokens": budget})
    engine = in_passing_thread(serving_engine, loaded, settings, on_step=marks)
    engine.start()
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=stream_tokens, ignore_eos=True)
        handles = [engine.add_request(f"s{i}", ids, params) for i, ids in enumerate(streams)]
        # The streams run a while before the long prompt comes.
        while min(marks.outputs.get(f"s{i}", [(0, 0)])[-1][1] for i in range(len(streams))) < lead_tokens:
            time.sleep(0.005)
        submitted = time.perf_counter()
        long_handle = engine.add_request("long", long_ids, SamplingParams(temperature=0.0, max_new_tokens=8,
                                                                           ignore_eos=True))
        for handle in handles + [long_handle]:
            output = handle.wait()
            if output.error:
                raise RuntimeError(f"request {output.request_id} failed: {output.error}")
    finally:
        engine.shutdown()
    first = marks.outputs["long"][0][0]
    stall, produced = 0.0, 0
    for i in range(len(streams)):
        seen = marks.outputs[f"s{i}"]
        before = [mark for mark in seen if mark[0] <= submitted][-1]
        during = [mark for mark in seen if submitted < mark[0] <= first]
        if len(during) and during[-1][1] >= stream_tokens:
            raise RuntimeError("a stream ended before the long prompt's first token: raise --stream-tokens")
        after = next(mark for mark in seen if mark[0] > first)
        times = [before[0]] + [mark[0] for mark in during] + [after[0]]
        stall = max(stall, max(later - earlier for earlier, later in zip(times, times[1:])))
        produced += (during[-1][1] if during else before[1]) - before[1]
    return Round(stall, produced, first - submitted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="the long prompt's length")
    parser.add_argument("--streams", type=int, default=3, help="requests decoding when it comes")
    parser.add_argument("--stream-tokens", type=int, default=400, help="max_new_tokens of each stream")
    parser.add_argument("--lead-tokens", type=int, default=8, help="tokens each stream has before it comes")
    parser.add_argument("--budget", type=int, default=None,
                        help="the chunk size, the engine's prefill budget (default: the worker's on this device)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of each way, in turn")
    args = parser.parse_args()

    settings = get_settings()
    model_dir = in_passing_thread(ensure_default_model, settings.cache_dir)
    loaded = in_passing_thread(load_model, str(model_dir))
    budget = args.budget or prefill_budget(settings.max_prefill_tokens, loaded.device.type)
    if args.prompt_tokens <= budget:
        parser.error(f"--prompt-tokens must exceed the prefill budget ({budget}) for chunks to be made")
    info = machine_info(loaded.dtype)
    streams = [prompt.token_ids for prompt in build_prompts(loaded, args.streams)]
    long_ids = long_prompt_ids(loaded, args.prompt_tokens)
    ways = {f"chunks of {budget} (the engine's way)": budget, "one forward": len(long_ids)}
    print("warming up ...", flush=True)
    run_round(loaded, budget, streams, long_ids[: 2 * budget], 40, 2)
    rounds: dict[str, list[Round]] = {name: [] for name in ways}
    for round_ in range(1, args.repeats + 1):
        for name, way_budget in ways.items():
            print(f"round {round_}: {name} ...", flush=True)
            rounds[name].append(run_round(loaded, way_budget, streams, long_ids, args.stream_tokens,
                                          args.lead_tokens))

    print(f"\n## A {len(long_ids)}-token prompt while {args.streams} streams decode\n")
    print("\n".join(info))
    print(f"- torch {torch.__version__}; budgets: max_num_seqs {settings.max_num_seqs}, max_batch_tokens "
          f"{settings.max_batch_tokens}; medians of {args.repeats} rounds each\n")
    print("| prefill | longest stall of a stream (s) | stream tokens meanwhile | long prompt TTFT (s) |")
    print("|---|---:|---:|---:|")
    medians = {}
    for name, results in rounds.items():
        stall = statistics.median(r.stall_s for r in results)
        tokens = statistics.median(r.stream_tokens for r in results)
        ttft = statistics.median(r.ttft_s for r in results)
        medians[name] = (stall, tokens, ttft)
        rounds_text = ", ".join(f"{r.stall_s:.2f}" for r in results)
        print(f"| {name} | {stall:.2f} ({rounds_text}) | {tokens:.0f} | {ttft:.2f} |")
    chunked, whole = medians.values()
    print(f"\nlongest stall, one forward / chunks: {whole[0] / chunked[0]:.1f}x; long prompt TTFT, chunks / one "
          f"forward: {chunked[2] / whole[2]:.2f}x")


if __name__ == "__main__":
    main()
