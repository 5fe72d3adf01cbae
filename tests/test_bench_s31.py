"""The benchmarks' arithmetic on known inputs: what bench/README.md reports is only as right as these helpers.

Latencies follow vLLM's benchmark_serving definitions (TTFT: submit → first token; TPOT: (e2e − TTFT) /
(tokens − 1), none for a one-token answer; percentiles as numpy's, linear); the roofline counts the first
token as the prefill's and max_new_tokens − 1 decode steps after it.
"""

import argparse
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from bench.e2e import median_interval
from bench.engine import Machine, ModelCost, poisson_arrivals, print_report, roofline_tokens_per_s
from bench.workload import Prompt, RequestTiming, RunResult, from_timings


def _timing(submitted: float, first: float, finished: float, tokens: int) -> RequestTiming:
    return RequestTiming(submitted, first_token=first, finished=finished, completion_tokens=tokens)


def test_ttft_tpot_and_their_percentiles_on_known_requests():
    timings = [_timing(0.0, 0.1, 1.1, 11), _timing(0.0, 0.2, 2.2, 11), _timing(0.5, 0.8, 0.8, 1),
               _timing(1.0, 1.4, 3.4, 5)]
    # TPOT: 1.0 / 10, 2.0 / 10, none for the one-token answer, 2.0 / 4.
    assert [t.tpot for t in timings] == pytest.approx([0.1, 0.2, None, 0.5])
    run = from_timings(timings)
    assert run.seconds == pytest.approx(3.4) and run.tokens == 28 and run.tokens_per_s == pytest.approx(28 / 3.4)
    # TTFTs 100, 200, 300, 400 ms: linear percentiles, as vLLM's np.percentile.
    assert run.ttft_ms(50) == pytest.approx(250)
    assert run.ttft_ms(99) == pytest.approx(397)
    assert run.ttft_mean_ms() == pytest.approx(250)
    # TPOTs 100, 200, 500 ms: the one-token answer takes no part.
    assert run.tpot_ms(50) == pytest.approx(200)
    assert run.tpot_ms(99) == pytest.approx(494)


def test_interval_of_the_median_is_its_order_statistics_and_says_what_it_covers():
    assert median_interval([7.0] * 5) == (7.0, 7.0, pytest.approx(1 - 2 / 32))
    # 4 values: only their range, which holds the median 87.5 % of the time (a bootstrap called it 95 %).
    assert median_interval([40.0, 10.0, 30.0, 20.0]) == (10.0, 40.0, 0.875)
    # 6 values: the range, now 1 - 2/64 = 96.9 %; 16 values: x(4) and x(13), 97.9 % (x(5)..x(12) is 92.3 %).
    assert median_interval([float(v) for v in range(6)]) == (0.0, 5.0, pytest.approx(1 - 2 / 64))
    low, high, covers = median_interval([float(v) for v in range(16, 0, -1)])
    assert (low, high) == (4.0, 13.0) and covers == pytest.approx(0.97873, abs=1e-5)
    values = [float(v) for v in range(-10, 31)]
    low, high, covers = median_interval(values)
    assert low < statistics.median(values) < high and covers >= 0.95
    assert min(values) < low and high < max(values)


def test_poisson_arrivals_start_at_zero_and_keep_the_rate():
    times = poisson_arrivals(4000, rate=5.0, seed=1)
    assert times[0] == 0.0 and times == sorted(times)
    assert (len(times) - 1) / times[-1] == pytest.approx(5.0, rel=0.05)
    assert poisson_arrivals(10, 5.0, 1) == times[:10]


# A machine and a model with round numbers: a decode step of one row reads 1 MB at 1 GB/s, 1 ms, and its
# 2 MFLOP take 2 µs at 1 TFLOP/s; a prefill of 10 tokens is 20 MFLOP, 20 µs, so it too takes the 1 ms read.
MACHINE = Machine({torch.float32: 1e12}, read_bandwidth=1e9, copy_bandwidth=1e9)
COST = ModelCost(params=1_000_000, embedding_params=0, weight_bytes=1_000_000, kv_bytes_per_token=0)


def test_roofline_counts_the_first_token_as_the_prefills():
    # 4 new tokens: the prefill gives the first, 3 decode steps the rest: 4 tokens in 4 ms.
    assert roofline_tokens_per_s(COST, MACHINE, torch.float32, 1, 10, 4, with_prefill=True) == pytest.approx(1000)
    # Decode only: one token a row every 1 ms step.
    assert roofline_tokens_per_s(COST, MACHINE, torch.float32, 1, 10, 4, with_prefill=False) == pytest.approx(1000)
    assert roofline_tokens_per_s(COST, MACHINE, torch.float32, 8, 10, 4, with_prefill=False) == pytest.approx(8000)


def test_roofline_decode_bound_switches_to_compute_at_large_batches():
    # 1,000 rows: 2 GFLOP a step, 2 ms at 1 TFLOP/s, past the 1 ms read.
    cost = ModelCost(params=1_000_000, embedding_params=0, weight_bytes=1_000_000, kv_bytes_per_token=100)
    assert cost.decode_step_seconds(MACHINE, torch.float32, 1000, context=0) == pytest.approx(0.002)
    # One row at 10,000 tokens of context: 1 MB of weights and 1 MB of KV cache.
    assert cost.decode_step_seconds(MACHINE, torch.float32, 1, context=10_000) == pytest.approx(0.002)


class _Loaded:
    name = "known"
    dtype = torch.float32


def test_report_rates_sequential_against_the_roofline_of_the_prompts_it_ran(capsys):
    # (a) ran the 2 short prompts of 4 (--sequential-requests 2): its batch-1 roofline is theirs, not the mean's.
    prompts = [Prompt("", [0] * 10), Prompt("", [0] * 10), Prompt("", [0] * 5000), Prompt("", [0] * 5000)]
    cost = ModelCost(params=1_000_000, embedding_params=0, weight_bytes=1_000_000, kv_bytes_per_token=100)
    args = argparse.Namespace(num_requests=4, max_new_tokens=4, sequential_requests=2, repeats=1)
    a = RunResult(1.0, 8, 2)
    b = c = RunResult(1.0, 16, 4)
    d = RunResult(2.0, 16, 4)  # (d) as fast as its Poisson arrivals came: a rate, not a capacity
    rows = [("(a)", "float32", a), ("(b)", "float32", b), ("(c)", "float32", c), ("(d) Poisson", "float32", d)]
    print_report(args, _Loaded(), rows, a, b, c, MACHINE, cost, prompts, [])
    out = capsys.readouterr().out.splitlines()
    batch_one = next(line for line in out if line.startswith("| 1 |"))
    assert next(line for line in out if line.startswith("| (c) |")).split(" | ")[5:7] == ["2.00x", "1.00x"]
    assert next(line for line in out if line.startswith("| (d) Poisson |")).split(" | ")[5:7] == ["—", "—"]
    expected = roofline_tokens_per_s(cost, MACHINE, torch.float32, 1, 10, 4, with_prefill=True)
    assert batch_one.split(" | ")[4] == f"{expected:.0f}"


def test_report_gives_the_ratios_within_each_round(capsys):
    prompts = [Prompt("", [0] * 10)] * 2
    args = argparse.Namespace(num_requests=2, max_new_tokens=4, sequential_requests=0, repeats=2)
    # The fastest (a) came in round 2, the fastest (c) in round 1: no single round had their ratio of 4.
    rounds = [(RunResult(1.0, 8, 2), RunResult(1.0, 8, 2), RunResult(1.0, 32, 2)),
              (RunResult(1.0, 16, 2), RunResult(1.0, 8, 2), RunResult(1.0, 24, 2))]
    a, b, c = rounds[1][0], rounds[0][1], rounds[0][2]
    rows = [("(a)", "float32", a), ("(b)", "float32", b), ("(c)", "float32", c)]
    print_report(args, _Loaded(), rows, a, b, c, MACHINE, COST, prompts, [], rounds)
    out = capsys.readouterr().out
    assert "(c)/(a) within each round: 4.00x, 1.50x (median 2.75x)" in out
    assert "(c)/(b) within each round: 4.00x, 3.00x (median 3.50x)" in out


def test_load_test_percentile_interpolates_as_the_other_benchmarks():
    from bench.load import percentile

    values = [float(v) for v in range(1, 101)]
    # p99 of 1..100 is 99.01, not the maximum; the median as statistics.median.
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile(values, 0.5) == statistics.median(values)
    assert percentile([3.0], 0.99) == 3.0


def test_batch_priority_builds_its_stack_without_a_cpu_split():
    # bench.batch_priority makes its Stack without a split (`python -m bench.batch_priority` died on a TypeError):
    # a stack with no engine cores of its own moves no process.
    from bench.batch_priority import Stack

    stack = Stack(Path("model"), 4)
    shutil.rmtree(stack.log_dir)
    assert stack.rest == frozenset() and stack.every_cpu == frozenset()


def test_static_batch_counts_only_the_tokens_each_row_generated(default_model_dir):
    # (b)'s output is as wide for every row: a row that stopped at EOS is padded to the end and must not count.
    from bench.engine import check_work, ignore_eos, run_static_batch
    from workers.builder import load_model

    loaded = load_model(str(default_model_dir), device="cpu", dtype="auto")
    tokenizer = loaded.tokenizer

    def prompt(question: str, answer: str = "") -> Prompt:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True) + answer
        return Prompt(text, tokenizer(text, add_special_tokens=False).input_ids)

    # The first has its answer already: the model ends its turn at once.
    prompts = [prompt("Reply with the single word yes.", "Yes."), prompt("Write a long story about a cat.")]
    honoured = run_static_batch(loaded, prompts, 8)
    assert honoured.tokens < 16
    with pytest.raises(RuntimeError, match="EOS was not ignored"):
        check_work("(b)", honoured, 8)
    ignore_eos(loaded)
    assert check_work("(b)", run_static_batch(loaded, prompts, 8), 8).tokens == 16
