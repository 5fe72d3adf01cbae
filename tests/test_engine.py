"""The batching engine on real forward passes: what a caller submits, what it gets back.

Most tests use a tiny random Llama (fast, and its argmax is far from ties) with the
real SmolLM2 tokenizer; one test runs the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from workers.engine import LLMEngine, SamplingParams, SeqOutput
from workers.engine.detokenizer import Detokenizer, special_token_id
from workers.engine.sampling import argmax, sample
from workers.torch_threads import in_passing_thread


GREEDY = SamplingParams(temperature=0.0)
WAIT_S = 60


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        # Larger than the default 0.02, so the logits spread out and greedy ties cannot happen.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1; spread them, so a forward that drops one is caught
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return model


def random_prompt(length: int, seed: int) -> list[int]:
    """Token ids past the special ones (0-16 in SmolLM2's vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(17, 49152, (length,), generator=generator).tolist()


def generate_alone(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy new tokens of `prompt` run by itself through model.generate."""
    input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=2,
        )
    return out[0, len(prompt) :].tolist()


def run_until_done(engine: LLMEngine, handles, max_steps: int = 1000) -> None:
    """Drive an engine that was not start()ed until every handle is done."""
    for _ in range(max_steps):
        if all(h.done.is_set() for h in handles):
            return
        engine.step()
    raise AssertionError("engine did not finish the requests")


class StreamLog:
    """An on_step that records every output and the running count after each step."""

    def __init__(self, engine_ref: list[LLMEngine] | None = None):
        self.outputs: dict[str, list[SeqOutput]] = {}
        self.running_per_step: list[int] = []
        self.reserved_per_step: list[int] = []
        self.batch_len_per_step: list[int] = []
        self.allocated_per_step: list[int] = []  # KV positions the running batch's buffers hold (rows x columns)
        self.calls = 0
        self._engine_ref = engine_ref
        self._lock = threading.Lock()

    def __call__(self, outputs: list[SeqOutput]) -> None:
        with self._lock:
            self.calls += 1
            for output in outputs:
                self.outputs.setdefault(output.request_id, []).append(output)
            if self._engine_ref:
                stats = self._engine_ref[0].stats()
                self.running_per_step.append(stats["num_running"])
                self.reserved_per_step.append(stats["reserved_tokens"])
                self.batch_len_per_step.append(stats["batch_len"])
                batch = self._engine_ref[0]._batch
                cache = batch.cache if batch is not None else None
                self.allocated_per_step.append(0 if cache is None else cache.row_capacity * cache.column_capacity)

    def joined_deltas(self, request_id: str) -> str:
        return "".join(output.delta for output in self.outputs[request_id])


def make_engine(model, tokenizer, **kwargs) -> tuple[LLMEngine, StreamLog]:
    engine_ref: list[LLMEngine] = []
    stream = StreamLog(engine_ref)
    engine = LLMEngine(model, tokenizer, on_step=stream, **kwargs)
    engine_ref.append(engine)
    return engine, stream


@pytest.fixture(scope="module")
def tiny_model_fp64(tiny_model):
    return copy.deepcopy(tiny_model).double()


@pytest.fixture(scope="module")
def tiny_model_bf16(tiny_model):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU")
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


@pytest.fixture
def tiny_model_to_fuse(tiny_model):
    # Its own copy: fusing rewrites the model's q/k/v and gate/up weights as views into fused ones.
    return copy.deepcopy(tiny_model)


@pytest.fixture
def tiny_model_fp16_to_fuse(tiny_model):
    return copy.deepcopy(tiny_model).half()


@pytest.mark.parametrize("forward", ["packed", "packed-bf16", "fused", "fused-fp16", "graphs", "transformers"])
def test_greedy_mixed_batch_matches_generate_alone(forward, request, tokenizer):
    # The engine runs fp32 and bf16 Llama models on its own forward over prepacked weights on a CPU, and on its own
    # forward over fused weights on a GPU (here forced on the CPU, in fp32 and in fp16, the GPU's dtype); others
    # (here fp64) on the model's forward. Each is compared with model.generate in the same dtype, run after the
    # fusing: the model's own modules keep computing the same on views of the fused weights. With graphs, decode
    # steps have the fixed shapes a CUDA graph replays (rows padded, attention over the buffers' every column),
    # run here without capture: padding rows write into spare rows that rows admitted later take. (Not in fp16 here:
    # the CPU's fp16 attention over the buffers' width rounds 1 ulp apart from the window's, which parts greedy
    # paths at fp16's near-ties; bench/gpu.py measures the parity on a GPU.)
    fixture = {"packed": "tiny_model", "packed-bf16": "tiny_model_bf16", "fused": "tiny_model_to_fuse",
               "fused-fp16": "tiny_model_fp16_to_fuse", "graphs": "tiny_model_to_fuse",
               "transformers": "tiny_model_fp64"}[forward]
    tiny_model = request.getfixturevalue(fixture)
    kind = forward.split("-")[0]
    engine, stream = make_engine(tiny_model, tokenizer, max_num_seqs=4,
                                 forward=kind if kind in ("fused", "graphs") else "auto")
    assert (engine.runner.packed is not None) == (forward != "transformers")
    assert engine.runner.packed is None or engine.runner.packed.packed == (kind == "packed")
    # In bf16 on a CPU, decode attention and the operations between the products run in the engine's own kernels
    # (decode_attention.cpp, layer_ops.cpp; the install provides the compiler), elsewhere in sdpa and torch's ops.
    packed = engine.runner.packed
    assert (packed is not None and packed.decode_attention is not None) == (forward == "packed-bf16")
    assert (packed is not None and packed.layer_ops is not None) == (forward == "packed-bf16")
    assert (engine.runner.graphs is not None) == (kind == "graphs")
    if kind in ("fused", "graphs"):  # no weight held twice: the model's q_proj is a view into the fused q/k/v
        q_proj = tiny_model.model.layers[0].self_attn.q_proj.weight
        assert q_proj.untyped_storage().data_ptr() == engine.runner.packed.layers[0].qkv.weight.data_ptr()
    plan = {  # request id: (prompt length, max_new_tokens)
        "a": (1, 12), "b": (7, 20), "c": (23, 6),
        "d": (4, 15), "e": (40, 9), "f": (11, 25),
        "g": (2, 18), "h": (16, 7),
    }
    prompts = {rid: random_prompt(length, seed=i) for i, (rid, (length, _)) in enumerate(plan.items())}

    def add(*rids):
        return {rid: engine.add_request(rid, prompts[rid], SamplingParams(temperature=0.0, max_new_tokens=plan[rid][1]))
                for rid in rids}

    handles = add("a", "b", "c")
    for _ in range(3):
        engine.step()
    handles |= add("d", "e", "f")  # "f" has to wait: max_num_seqs=4
    for _ in range(2):
        engine.step()
    engine.abort("b")  # running
    engine.abort("f")  # still waiting
    engine.step()
    assert handles["f"].done.is_set(), "an aborted waiting request finishes at once"
    handles |= add("g", "h")
    run_until_done(engine, handles.values())

    for rid in ("b", "f"):
        assert handles[rid].wait().finish_reason == "cancelled"
    for rid in ("a", "c", "d", "e", "g", "h"):
        output = handles[rid].wait(0)
        expected = generate_alone(tiny_model, prompts[rid], plan[rid][1])
        assert output.token_ids == expected, rid
        assert output.finish_reason == ("stop" if expected[-1] == 2 else "length")
        assert stream.joined_deltas(rid) == output.text
        assert sum(o.first_token for o in stream.outputs[rid]) == 1
    assert engine.stats()["num_running"] == 0
    # Once the 40-token prompt left, the padding columns nobody needed were cut off the cache.
    lens = stream.batch_len_per_step
    assert any(0 < later < earlier for earlier, later in zip(lens, lens[1:]))


def test_a_row_admitted_where_an_overflow_was_left_decodes_as_alone_with_graphs(tiny_model_to_fuse, tokenizer):
    # A decode step of fixed shapes (CUDA graphs) attends over every column of the buffers, the mask hiding those
    # not live; a masked inf still makes the attention NaN. A row admitted into a spare row slot had only its window's
    # columns cleared: an inf that a row which left there had written left of the window (here written by hand, as an
    # fp16 overflow would) turned its tokens to garbage.
    engine, _ = make_engine(tiny_model_to_fuse, tokenizer, max_num_seqs=4, forward="graphs")
    prompts = {"long": random_prompt(30, seed=1), "b": random_prompt(3, seed=2), "c": random_prompt(4, seed=3),
               "late": random_prompt(2, seed=4)}
    limits = {"long": 2, "b": 12, "c": 12, "late": 8}

    def add(rid):
        return engine.add_request(rid, prompts[rid], SamplingParams(temperature=0.0, max_new_tokens=limits[rid]))

    handles = {rid: add(rid) for rid in ("long", "b", "c")}
    while not handles["long"].done.is_set():
        engine.step()
    engine.step()
    cache = engine._batch.cache
    assert cache.start > 0  # the long prompt's columns were cut off the window
    with torch.inference_mode():
        for layer in cache.layers:
            layer.keys[cache.rows :, :, : cache.end] = float("inf")
            layer.values[cache.rows :, :, : cache.end] = float("inf")
    handles["late"] = add("late")
    run_until_done(engine, handles.values())
    for rid in ("b", "c", "late"):
        assert handles[rid].wait(0).token_ids == generate_alone(tiny_model_to_fuse, prompts[rid], limits[rid]), rid


def test_an_unknown_forward_is_refused_and_model_runs_the_models_own(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="forward must be one of auto, graphs, fused, model"):
        LLMEngine(tiny_model, tokenizer, forward="fast")
    assert LLMEngine(tiny_model, tokenizer, forward="model").runner.packed is None
    # A model the engine's forward does not compute (fp64 here) runs on its own even when fused is asked for.
    assert LLMEngine(copy.deepcopy(tiny_model).double(), tokenizer, forward="fused").runner.packed is None


def test_never_more_than_max_num_seqs_running(tiny_model, tokenizer):
    engine, stream = make_engine(tiny_model, tokenizer, max_num_seqs=4)
    engine.start()
    try:
        handles = [
            engine.add_request(f"r{i}", random_prompt(3 + i % 7, seed=100 + i),
                               SamplingParams(temperature=0.0, max_new_tokens=4 + i % 5))
            for i in range(20)
        ]
        outputs = [h.wait(WAIT_S) for h in handles]
    finally:
        engine.shutdown()
    assert all(o.finished and o.finish_reason in ("length", "stop") for o in outputs)
    assert max(stream.running_per_step) == 4
    assert engine.stats()["num_finished"] == 20


def test_prefill_budget_splits_a_burst_into_groups(tiny_model, tokenizer):
    engine, stream = make_engine(tiny_model, tokenizer, max_prefill_tokens=40)
    forwards = []  # ("group", prompt lengths) per prefill, ("chunk", end) per chunk of a long prompt
    first_group_outputs = []
    prefill, prefill_chunk = engine.runner.prefill, engine.runner.prefill_chunk

    def recording_prefill(seqs, *args, **kwargs):
        forwards.append(("group", [seq.prompt_len for seq in seqs]))
        first_group_outputs.append(len(stream.outputs.get("b0", [])))
        return prefill(seqs, *args, **kwargs)

    def recording_chunk(seq, batch, end):
        forwards.append(("chunk", end))
        return prefill_chunk(seq, batch, end)

    engine.runner.prefill, engine.runner.prefill_chunk = recording_prefill, recording_chunk
    prompts = [random_prompt(length, seed=300 + i) for i, length in enumerate([8, 8, 14, 5, 9, 50, 7])]
    handles = [engine.add_request(f"b{i}", prompt, SamplingParams(temperature=0.0, max_new_tokens=5))
               for i, prompt in enumerate(prompts)]
    run_until_done(engine, handles)
    # Arrival order is kept; each group computes at most 40 padded positions. The 50-token prompt is prefilled alone
    # in chunks of 40, and the 7-token one behind it is admitted between its two chunks.
    assert forwards == [("group", [8, 8]), ("group", [14, 5]), ("group", [9]), ("chunk", 40), ("group", [7]),
                        ("chunk", 50)]
    for prompt, handle in zip(prompts, handles):
        assert handle.wait(0).token_ids == generate_alone(tiny_model, prompt, 5)
    # The first group's first token was out before the second group's prefill (prefills come first: no more yet).
    assert first_group_outputs == [0, 1, 1, 1]


@pytest.mark.parametrize("forward", ["packed", "packed-bf16", "fused", "graphs", "transformers"])
def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes(forward, request, tokenizer):
    # A prompt longer than the prefill budget went through in one forward, and every running stream waited for it
    # (38.8 s for an 8,000-token prompt on a 2-core CPU). Now it goes a chunk of the budget a step, every other step,
    # on top of the keys and values of the chunks before: the streams go on meanwhile, a short request that comes in
    # is admitted between two chunks, a second long prompt waits its turn, and every token is still generate's.
    fixture = {"packed": "tiny_model", "packed-bf16": "tiny_model_bf16", "fused": "tiny_model_to_fuse",
               "graphs": "tiny_model_to_fuse", "transformers": "tiny_model_fp64"}[forward]
    model = request.getfixturevalue(fixture)
    engine, stream = make_engine(model, tokenizer, max_prefill_tokens=16,
                                 forward=forward if forward in ("fused", "graphs") else "auto")
    assert (engine.runner.graphs is not None) == (forward == "graphs")
    assert (engine.runner.packed is None) == (forward == "transformers")
    chunks = []
    prefill_chunk = engine.runner.prefill_chunk

    def recording_chunk(seq, batch, end):
        chunks.append((seq.request_id, end))
        return prefill_chunk(seq, batch, end)

    engine.runner.prefill_chunk = recording_chunk
    plan = {"running": (5, 40), "long": (100, 8), "short": (6, 10), "long2": (37, 6)}
    prompts = {rid: random_prompt(length, seed=2600 + i) for i, (rid, (length, _)) in enumerate(plan.items())}

    def add(rid):
        return engine.add_request(rid, prompts[rid], SamplingParams(temperature=0, max_new_tokens=plan[rid][1],
                                                                    ignore_eos=True))

    handles = {"running": add("running")}
    engine.step()
    handles["long"] = add("long")
    engine.step()  # its first chunk
    before = stream.outputs["running"][-1].completion_tokens
    handles["long2"] = add("long2")
    handles["short"] = add("short")
    while not stream.outputs.get("long"):
        engine.step()
    during = stream.outputs["running"][-1].completion_tokens - before
    short_first_token_before_long = any(output.first_token for output in stream.outputs.get("short", []))
    run_until_done(engine, handles.values())

    assert chunks == [("long", end) for end in (16, 32, 48, 64, 80, 96, 100)] + [("long2", 16), ("long2", 32),
                                                                                 ("long2", 37)]
    # The running stream had a token between every two of the long prompt's seven chunks but one (the short
    # request's prefill took one turn).
    assert during >= 5, during
    # The short request, behind the second long prompt, was admitted between the first one's chunks: passed over,
    # the second long prompt kept its place (stopping at it, the short request waited for the whole first prefill).
    assert short_first_token_before_long, "the short request waited for the long prompt's whole prefill"
    # In bf16, the short request's 6-token row in a batch the long prompt made 100 columns wide parts from generate
    # at its fifth token with chunks or without (bf16 rounds a row's products and attention apart with its batch
    # mates, README "Performance"): there the chunked prompts and the row running before them are compared.
    exact = [rid for rid in plan if forward != "packed-bf16" or rid != "short"]
    for rid in exact:
        output = handles[rid].wait(0)
        limit = plan[rid][1]
        assert output.token_ids == generate_alone(model, prompts[rid], limit), rid
        assert output.prompt_tokens == plan[rid][0]
        assert stream.joined_deltas(rid) == output.text
    assert engine._chunked is None and engine.stats()["num_running"] == 0


def test_a_long_prompt_cancelled_between_chunks_or_failing_leaves_the_others_whole(tiny_model, tokenizer):
    engine, stream = make_engine(tiny_model, tokenizer, max_prefill_tokens=16)
    prompts = {rid: random_prompt(length, seed=2700 + i)
               for i, (rid, length) in enumerate({"running": 4, "cancelled": 70, "fails": 50, "after": 40}.items())}
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    handles = {"running": engine.add_request("running", prompts["running"], params)}
    engine.step()
    handles["cancelled"] = engine.add_request("cancelled", prompts["cancelled"], params)
    for _ in range(3):
        engine.step()
    assert engine._chunked is not None and engine._chunked[0].request_id == "cancelled"
    engine.abort("cancelled")
    handles["fails"] = engine.add_request("fails", prompts["fails"], params)
    engine.step()
    assert handles["cancelled"].done.is_set() and handles["cancelled"].wait(0).finish_reason == "cancelled"
    # The next long prompt's second chunk fails (an out-of-memory, say): that request fails alone.
    prefill_chunk, calls = engine.runner.prefill_chunk, []

    def failing_second_chunk(seq, batch, end):
        calls.append(seq.request_id)
        if seq.request_id == "fails" and calls.count("fails") == 2:
            raise RuntimeError("out of memory")
        return prefill_chunk(seq, batch, end)

    engine.runner.prefill_chunk = failing_second_chunk
    handles["after"] = engine.add_request("after", prompts["after"], params)
    run_until_done(engine, handles.values())
    failed = handles["fails"].wait(0)
    assert failed.finish_reason == "error" and failed.error == "model forward failed: RuntimeError: out of memory"
    assert calls.count("after") == 3
    for rid in ("running", "after"):
        assert handles[rid].wait(0).token_ids == generate_alone(tiny_model, prompts[rid], 12), rid
    assert engine._chunked is None and engine.stats()["num_running"] == 0


def test_long_prompt_embeds_are_prefilled_in_chunks_as_their_ids_would_be(tiny_model, tokenizer):
    # The vision path: an image's prompt comes as embeddings (576 image positions and more for LLaVA-1.5, past a
    # CPU's 256-position budget), chunked as ids are.
    prompt = random_prompt(45, seed=2800)
    with torch.inference_mode():
        embeds = tiny_model.get_input_embeddings()(torch.tensor(prompt))
    engine, _ = make_engine(tiny_model, tokenizer, max_prefill_tokens=16)
    handle = engine.add_request("embeds", [], SamplingParams(temperature=0, max_new_tokens=12), prompt_embeds=embeds)
    run_until_done(engine, [handle])
    assert handle.wait(0).prompt_tokens == 45
    assert handle.wait(0).token_ids == generate_alone(tiny_model, prompt, 12)


def test_request_that_can_never_fit_fails_at_once(tiny_model, tokenizer):
    engine, stream = make_engine(tiny_model, tokenizer, max_batch_tokens=64)
    params = SamplingParams(temperature=0, max_new_tokens=20)
    small = [engine.add_request(f"s{i}", random_prompt(6, seed=200 + i), params) for i in range(3)]
    huge = engine.add_request("huge", random_prompt(10, seed=210), SamplingParams(max_new_tokens=100))
    engine.step()
    assert huge.done.is_set()
    output = huge.wait(0)
    assert output.finish_reason == "error"
    assert "max_batch_tokens (64)" in output.error and "110" in output.error
    assert output.completion_tokens == 0
    # The request's own error, met on every try (the worker answers it as an invalid request, not a server error);
    # so is one whose parameters the engine refuses, whether it finds them on taking the request or in its step.
    assert output.refused
    odd = [engine.add_request("stop", [1, 2], SamplingParams(stop=5)),
           engine.add_request("top_k", [1, 2], SamplingParams(top_k=2.5))]
    run_until_done(engine, small)
    assert all(h.wait(0).finish_reason == "length" and not h.wait(0).refused for h in small)
    assert [(h.wait(0).finish_reason, h.wait(0).refused) for h in odd] == [("error", True)] * 2, [h.wait(0) for h in odd]
    engine.shutdown()
    closed = engine.add_request("closed", [1, 2], params).wait(0)
    assert (closed.finish_reason, closed.refused) == ("error", False), closed
    # Each small one reserves 6 + 20 tokens: two fit the budget of 64, the third waits.
    assert max(stream.running_per_step) == 2
    assert max(stream.reserved_per_step) <= 64


def test_kv_budget_counts_the_longest_request_on_every_row(tiny_model, tokenizer):
    # The cache is left-padded: beside a 10 + 90 token request, every row is up to 100 columns wide.
    engine, stream = make_engine(tiny_model, tokenizer, max_batch_tokens=200)
    long = engine.add_request("long", random_prompt(10, seed=400), SamplingParams(temperature=0, max_new_tokens=90))
    short = [engine.add_request(f"s{i}", random_prompt(6, seed=401 + i),
                                SamplingParams(temperature=0, max_new_tokens=4))
             for i in range(5)]
    run_until_done(engine, [long, *short])
    assert all(h.wait(0).finish_reason == "length" for h in [long, *short])
    # Summed per row (100 + 5 x 10 = 150) all six would have run at once; padded, two rows of 100 fill 200.
    assert max(stream.running_per_step) == 2
    assert max(stream.reserved_per_step) <= 200
    # What the cache really held never went past the budget, nor did its buffers, spare rows and columns included.
    assert max(rows * width for rows, width in zip(stream.running_per_step, stream.batch_len_per_step)) <= 200
    assert max(stream.allocated_per_step) <= 200


def test_stop_string_spanning_tokens_ends_and_is_removed(tiny_model, tokenizer):
    prompt = random_prompt(5, seed=300)
    reference_ids = generate_alone(tiny_model, prompt, 30)
    reference_text = tokenizer.decode(reference_ids, skip_special_tokens=True)
    stop = tokenizer.decode(reference_ids[8:11], skip_special_tokens=True)
    expected_text = reference_text[: reference_text.find(stop)]

    engine, stream = make_engine(tiny_model, tokenizer)
    handle = engine.add_request("stop", prompt, SamplingParams(temperature=0, max_new_tokens=30, stop=stop))
    run_until_done(engine, [handle])
    output = handle.wait(0)
    assert output.finish_reason == "stop"
    assert output.text == expected_text
    assert stop not in output.text
    assert stream.joined_deltas("stop") == output.text
    assert len(output.token_ids) <= 11


@pytest.mark.parametrize("last_allowed", [True, False])
def test_stop_completed_by_a_token_that_ends_mid_character(tiny_model, tokenizer, last_allowed):
    # Token 459 is " " and the first two bytes of a three-byte character: its text is held back (half a
    # character) until the next token. When it is the last token, the text released at the end must still be
    # searched for the stop string its space completes. When it is not, the stop ends the sequence at that token:
    # its text was held back whole until the character's last bytes came, tokens later, and the sequence ran on to
    # them (its token count and ids past the stop).
    partial = 459
    assert tokenizer.decode([partial]) == " \ufffd"
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.lm_head.weight[partial] *= 3
    prompt = random_prompt(6, seed=903)
    reference_ids = generate_alone(model, prompt, 40)
    last = reference_ids.index(partial)
    before = tokenizer.decode(reference_ids[:last], skip_special_tokens=True)
    stop = before.split()[-1] + " "
    assert last >= 2 and stop not in before

    engine, stream = make_engine(model, tokenizer)
    max_new_tokens = last + 1 if last_allowed else 40
    handle = engine.add_request("partial", prompt, SamplingParams(temperature=0, max_new_tokens=max_new_tokens,
                                                                  stop=stop))
    run_until_done(engine, [handle])
    output = handle.wait(0)
    assert output.token_ids == reference_ids[: last + 1], (output.token_ids, reference_ids)
    assert output.text == before[: before.rfind(stop.strip())]
    assert output.finish_reason == "stop"
    assert stream.joined_deltas("partial") == output.text


@pytest.mark.parametrize("text, stop", [("Paris 好的", " "), ("Paris. 好", ". "), ("Hi 😀 there", "Hi ")])
def test_detokenizer_finds_a_stop_before_a_broken_character(tokenizer, text, stop):
    # Token by token: the stop is found at the token that completes it, though that token also starts a multi-byte
    # character (" " + its first byte), and the text before the character goes out with it.
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = Detokenizer(tokenizer, stop=stop)
    deltas = []
    for count, token_id in enumerate(ids, 1):
        deltas.append(detokenizer.add(token_id))
        if tokenizer.decode(ids[:count]).find(stop) >= 0:
            break
    assert detokenizer.stopped, (ids, deltas)
    assert "".join(deltas) == text[: text.find(stop)] == detokenizer.text

def test_stop_that_is_a_special_token_acts_as_a_token_id(tiny_model, tokenizer):
    special = "<file_sep>"
    special_id = special_token_id(tokenizer, special)
    assert special_id == tokenizer.convert_tokens_to_ids(special)
    assert special_token_id(tokenizer, "<|im_end|>") == 2
    assert special_token_id(tokenizer, "hello") is None
    # Make the model favour the special token, then check the engine stops on it.
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.lm_head.weight[special_id] *= 3
    prompt = random_prompt(6, seed=310)
    reference_ids = generate_alone(model, prompt, 40)
    assert special_id in reference_ids
    expected = reference_ids[: reference_ids.index(special_id) + 1]

    engine, stream = make_engine(model, tokenizer)
    handle = engine.add_request("special", prompt, SamplingParams(temperature=0, max_new_tokens=40, stop=special))
    run_until_done(engine, [handle])
    output = handle.wait(0)
    assert output.token_ids == expected
    assert output.finish_reason == "stop"
    assert output.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert special not in output.text


def test_several_stop_strings_end_at_the_earliest(tiny_model, tokenizer):
    prompt = random_prompt(5, seed=300)
    reference_ids = generate_alone(tiny_model, prompt, 30)
    reference_text = tokenizer.decode(reference_ids, skip_special_tokens=True)
    early = tokenizer.decode(reference_ids[6:8], skip_special_tokens=True)
    late = tokenizer.decode(reference_ids[14:16], skip_special_tokens=True)
    assert reference_text.find(early) < reference_text.find(late)
    never = "never in this text \u2603"

    engine, stream = make_engine(tiny_model, tokenizer)
    # Listed late first: the order of the list does not matter, the earliest match in the text wins.
    params = SamplingParams(temperature=0, max_new_tokens=30, stop=[never, late, early, "<file_sep>"])
    assert params.stop == (never, late, early, "<file_sep>")
    handle = engine.add_request("stops", prompt, params)
    run_until_done(engine, [handle])
    output = handle.wait(0)
    assert output.finish_reason == "stop"
    assert output.text == reference_text[: reference_text.find(early)]
    assert stream.joined_deltas("stops") == output.text
    assert len(output.token_ids) <= 8


def test_special_token_among_several_stops_acts_as_a_token_id(tiny_model, tokenizer):
    special = "<file_sep>"
    special_id = special_token_id(tokenizer, special)
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.lm_head.weight[special_id] *= 3
    prompt = random_prompt(6, seed=310)
    reference_ids = generate_alone(model, prompt, 40)
    expected = reference_ids[: reference_ids.index(special_id) + 1]

    engine, _ = make_engine(model, tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=40, stop=("no such text", special))
    handle = engine.add_request("special", prompt, params)
    run_until_done(engine, [handle])
    output = handle.wait(0)
    assert output.token_ids == expected and output.finish_reason == "stop"
    assert output.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_ignore_eos_runs_to_max_new_tokens(tiny_model, tokenizer):
    eos = 2  # the tiny model's EOS, also SmolLM2's "<|im_end|>"
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        # EOS is also the pad id, whose (tied) embedding row starts at zero: give it a strong one.
        model.lm_head.weight[eos] = 3 * model.lm_head.weight[special_token_id(tokenizer, "<file_sep>")]
    prompt = random_prompt(6, seed=320)
    reference_ids = generate_alone(model, prompt, 30)
    assert reference_ids[-1] == eos and len(reference_ids) < 30, "the model should emit EOS early"
    with torch.inference_mode():
        input_ids = torch.tensor([prompt])
        no_eos = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=30, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()

    engine, _ = make_engine(model, tokenizer)
    stops = engine.add_request("stops", prompt, SamplingParams(temperature=0, max_new_tokens=30))
    ignores = engine.add_request("ignores", prompt, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True))
    # An explicit stop still ends a request that ignores EOS.
    stopped = engine.add_request("stopped", prompt, SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True,
                                                                   stop="<|im_end|>"))
    run_until_done(engine, [stops, ignores, stopped])
    assert stops.wait(0).token_ids == reference_ids
    assert ignores.wait(0).token_ids == no_eos and ignores.wait(0).finish_reason == "length"
    assert stopped.wait(0).token_ids == stops.wait(0).token_ids and stopped.wait(0).finish_reason == "stop"


def test_sampling_params_stop_forms():
    assert SamplingParams(stop="</s>").stop == "</s>"
    assert SamplingParams(stop="</s>").stop_strings == ("</s>",)
    assert SamplingParams(stop=["a", "", "b", "a"]).stop_strings == ("a", "b")
    assert SamplingParams(stop=["a", "b"]) == SamplingParams(stop=("a", "b"))
    assert hash(SamplingParams(stop=["a"]))
    assert SamplingParams().stop_strings == SamplingParams(stop="").stop_strings == ()


def test_detokenizer_streams_multibyte_characters_whole(tokenizer):
    text = "Hi 😀 你好世界 🎉! Ünïcödé ✓"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids), "the text should split characters across tokens"
    detokenizer = Detokenizer(tokenizer)
    deltas = [detokenizer.add(token) for token in ids] + [detokenizer.finish()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text == detokenizer.text


def test_detokenizer_holds_back_a_possible_stop_and_removes_it(tokenizer):
    stop = "世界END"
    ids = tokenizer.encode("a 世 b 世界EN c 世界END tail", add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer, stop=stop)
    deltas = []
    for token in ids:
        deltas.append(detokenizer.add(token))
        streamed = "".join(deltas)
        # Streamed text never holds a broken character nor anything that could still become the stop.
        assert "\ufffd" not in streamed and stop not in streamed
        if detokenizer.stopped:
            break
    deltas.append(detokenizer.finish())
    assert detokenizer.stopped
    assert "".join(deltas) == detokenizer.text == "a 世 b 世界EN c "
    assert detokenizer.add(ids[-1]) == ""


def test_detokenizer_stops_at_the_earliest_of_several(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)

    def run(stop):
        detokenizer = Detokenizer(tokenizer, stop=stop)
        deltas = []
        for token in ids:
            deltas.append(detokenizer.add(token))
            if detokenizer.stopped:
                break
        deltas.append(detokenizer.finish())
        assert "".join(deltas) == detokenizer.text
        return detokenizer.text, detokenizer.stopped

    assert run(["four", "two"]) == ("one ", True)
    assert run(("five", "hree")) == ("one two t", True)
    # Both complete on the same token: the one that begins first wins.
    assert run(["o three", "two three"]) == ("one ", True)
    assert run(["seven", "eight"]) == ("one two three four five", False)
    assert run("two") == run(["two"])


def test_detokenizer_holds_back_the_longest_prefix_of_any_stop(tokenizer):
    detokenizer = Detokenizer(tokenizer, stop=["xyz", "ab cd"])
    streamed = ""
    for token in tokenizer.encode("hello ab c", add_special_tokens=False):
        streamed += detokenizer.add(token)
    # "ab c" could still become "ab cd"; nothing else is held.
    assert streamed == "hello "
    assert detokenizer.finish() == "ab c"


def test_sample_function_greedy_top_p_and_seeds():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[3] = -10.0
    logits[3, 7], logits[3, 9] = 5.0, 4.9  # ~52% and ~48%: top_p=0.5 keeps token 7 alone
    temperature = [0.0, 1.0, 0.0005, 1.0]
    top_p = [1.0, 1.0, 1.0, 0.5]
    for _ in range(20):
        tokens = sample(logits, temperature, top_p)
        assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
        assert tokens[3] == 7

    def seeded_draws(other_rows_seed: int) -> list[int]:
        torch.manual_seed(other_rows_seed)
        generators = [None, torch.Generator().manual_seed(42), None, None]
        return [int(sample(logits, [1.0] * 4, [1.0] * 4, generators)[1]) for _ in range(10)]

    assert seeded_draws(1) == seeded_draws(2)
    assert len(set(seeded_draws(1))) > 1

    wide = torch.randn(3, 256)
    wide[1, 70] = wide[1, 200] = 10.0  # a tie in two blocks: the first index wins, as torch.argmax
    for x in (wide, torch.randn(3, 100)):  # 100 is not a multiple of the block
        assert torch.equal(argmax(x), x.argmax(dim=-1))


def test_top_k_keeps_each_rows_k_most_likely_tokens_as_transformers_does():
    # The original worker samples with `generate`'s top-k (the checkpoint's, else 50); the engine sampled from every
    # token. Each row's mask is transformers' TopKLogitsWarper's, ties with the k-th logit kept.
    from transformers.generation.logits_process import TopKLogitsWarper

    from workers.engine.sampling import _top_k_filter

    torch.manual_seed(0)
    logits = torch.randn(4, 300).round(decimals=1)  # rounded: ties at the k-th logit
    for ks in ([3, 0, 1, 50], [5, 5, 5, 5], [300, 400, 2, 7]):
        filtered = _top_k_filter(logits, ks)
        for row, k in enumerate(ks):
            expected = logits[row:row + 1] if k == 0 else TopKLogitsWarper(k)(None, logits[row:row + 1].clone())
            assert torch.equal(filtered[row:row + 1], expected), (ks, row)
    hot = [100.0] * 4  # nearly uniform: only the top-k limits what is drawn
    drawn = [sample(logits, hot, [1.0] * 4, None, [3, 0, 1, 50]).tolist() for _ in range(300)]

    def kept(row: int, k: int) -> set[int]:
        return set(torch.nonzero(logits[row] >= logits[row].topk(k).values[-1]).flatten().tolist())

    assert {tokens[0] for tokens in drawn} == kept(0, 3)
    assert len({tokens[1] for tokens in drawn}) > 50
    assert {tokens[2] for tokens in drawn} == kept(2, 1)
    assert {tokens[3] for tokens in drawn} <= kept(3, 50)
    assert torch.equal(sample(logits, [0.0] * 4, [1.0] * 4, None, [3, 0, 1, 50]), argmax(logits))  # greedy rows


def test_waiting_requests_are_admitted_by_priority_then_arrival(tiny_model, tokenizer):
    # The worker gives interactive jobs priority 0 and batch jobs 1: an interactive job that reaches an engine where
    # batch jobs wait (its budgets full) goes before them; within one priority, first come, first served.
    engine, _ = make_engine(tiny_model, tokenizer, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_new_tokens=3, ignore_eos=True)
    first = engine.add_request("first", random_prompt(5, seed=1950), params, priority=1)
    engine.step()
    order = ["b1", "b2", "i1", "b3", "i2"]
    handles = {name: engine.add_request(name, random_prompt(4, seed=1951 + index), params,
                                        priority=0 if name.startswith("i") else 1)
               for index, name in enumerate(order)}
    ended = []
    for _ in range(100):
        engine.step()
        ended += [name for name, handle in handles.items() if handle.done.is_set() and name not in ended]
        if len(ended) == len(order):
            break
    assert first.done.is_set() and ended == ["i1", "i2", "b1", "b2", "b3"]
    refused = engine.add_request("odd", random_prompt(4, seed=1960), params, priority="high")
    assert refused.done.is_set() and "priority must be an int" in refused.wait(0).error


def test_seeded_sampling_is_reproducible_across_batch_mates(tiny_model, tokenizer):
    prompt = random_prompt(9, seed=400)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=1234)

    alone, _ = make_engine(tiny_model, tokenizer)
    handle = alone.add_request("x", prompt, seeded)
    run_until_done(alone, [handle])
    tokens_alone = handle.wait(0).token_ids

    crowded, _ = make_engine(tiny_model, tokenizer)
    mates = [crowded.add_request(f"m{i}", random_prompt(3 + 11 * i, seed=410 + i), SamplingParams(max_new_tokens=20))
             for i in range(3)]
    crowded.step()
    crowded.step()
    handle = crowded.add_request("x", prompt, seeded)
    other_seed = crowded.add_request("y", prompt, SamplingParams(temperature=1.0, max_new_tokens=16, seed=99))
    greedy = crowded.add_request("z", prompt, SamplingParams(temperature=0.0, max_new_tokens=16))
    run_until_done(crowded, [handle, other_seed, greedy, *mates])

    assert handle.wait(0).token_ids == tokens_alone
    assert other_seed.wait(0).token_ids != tokens_alone
    assert greedy.wait(0).token_ids == generate_alone(tiny_model, prompt, 16)


def test_per_request_params_in_one_batch(tiny_model, tokenizer):
    engine, stream = make_engine(tiny_model, tokenizer)
    greedy_prompt = random_prompt(12, seed=500)
    handles = {
        "greedy": engine.add_request("greedy", greedy_prompt, SamplingParams(temperature=0.0, max_new_tokens=20)),
        "hot": engine.add_request("hot", random_prompt(5, seed=501),
                                  SamplingParams(temperature=1.5, max_new_tokens=20)),
        "nucleus": engine.add_request("nucleus", random_prompt(30, seed=502),
                                      SamplingParams(temperature=0.7, top_p=0.3, max_new_tokens=20, seed=7)),
        "short": engine.add_request("short", random_prompt(2, seed=503),
                                    SamplingParams(temperature=1.0, max_new_tokens=3)),
    }
    engine.step()
    assert engine.stats()["num_running"] == 4, "all four share the batch"
    run_until_done(engine, handles.values())
    assert handles["greedy"].wait(0).token_ids == generate_alone(tiny_model, greedy_prompt, 20)
    assert handles["short"].wait(0).completion_tokens == 3
    assert all(h.wait(0).finish_reason in ("length", "stop") for h in handles.values())


def test_a_temperature_just_above_the_greedy_threshold_samples(tiny_model, tokenizer):
    # The original samples when temperature > 0.001 in Python floats. In float32 0.0010000001 rounds onto 0.001, and
    # the engine compared there, so it took the argmax. Here two tokens' logits differ by 1e-4: sampled at about
    # 0.001 they come out about evenly; greedy takes the first every time.
    prompt = random_prompt(6, seed=521)  # the third most likely token is 0.5 behind: never drawn at 0.001
    first = generate_alone(tiny_model, prompt, 1)[0]
    runner_up = 17 if first != 17 else 18
    assert runner_up not in prompt  # its row is also its input embedding (tied)
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        first_logit = model(torch.tensor([prompt])).logits[0, -1, first]
        model.lm_head.weight[runner_up] = model.lm_head.weight[first] * (1 - 1e-4 / first_logit)
    engine, _ = make_engine(model, tokenizer)
    just_above = [engine.add_request(f"above{i}", prompt, SamplingParams(temperature=0.0010000001, max_new_tokens=1,
                                                                          seed=i)) for i in range(24)]
    at_threshold = [engine.add_request(f"at{i}", prompt, SamplingParams(temperature=0.001, max_new_tokens=1, seed=i))
                    for i in range(8)]
    run_until_done(engine, just_above + at_threshold)
    assert {handle.wait(0).token_ids[0] for handle in just_above} == {first, runner_up}
    assert {handle.wait(0).token_ids[0] for handle in at_threshold} == {first}


def test_prompt_embeds_match_token_ids(tiny_model, tokenizer):
    prompt = random_prompt(10, seed=600)
    with torch.inference_mode():
        embeds = tiny_model.get_input_embeddings()(torch.tensor(prompt))
    engine, _ = make_engine(tiny_model, tokenizer)
    by_embeds = engine.add_request("embeds", [], SamplingParams(temperature=0, max_new_tokens=12), prompt_embeds=embeds)
    ids_prompt = random_prompt(4, seed=601)  # prefilled beside the embeddings, in the same batch
    by_ids = engine.add_request("ids", ids_prompt, SamplingParams(temperature=0, max_new_tokens=12))
    run_until_done(engine, [by_embeds, by_ids])
    assert by_embeds.wait(0).prompt_tokens == 10
    assert by_embeds.wait(0).token_ids == generate_alone(tiny_model, prompt, 12)
    assert by_ids.wait(0).token_ids == generate_alone(tiny_model, ids_prompt, 12)


def test_a_bad_request_fails_alone(tiny_model, tokenizer):
    poison = 12345

    def refuse_poison(module, args):
        if (args[0] == poison).any():
            raise RuntimeError("poisoned input")

    model = copy.deepcopy(tiny_model)
    model.get_input_embeddings().register_forward_pre_hook(refuse_poison)

    def broken_on_step(outputs):
        raise ValueError("publisher is down")

    engine = LLMEngine(model, tokenizer, on_step=broken_on_step)
    good_prompt = random_prompt(8, seed=700)
    good = engine.add_request("good", good_prompt, SamplingParams(temperature=0, max_new_tokens=10))
    out_of_vocab = engine.add_request("oov", [5, 10**6], GREEDY)
    empty = engine.add_request("empty", [], GREEDY)
    poisoned = engine.add_request("poisoned", [17, poison, 18], GREEDY)  # prefilled in one batch with "good"
    duplicate = engine.add_request("good", good_prompt, GREEDY)
    zero = engine.add_request("zero", [17], SamplingParams(max_new_tokens=0))
    engine.step()
    assert "vocabulary" in out_of_vocab.wait(0).error
    assert "empty prompt" in empty.wait(0).error
    assert poisoned.wait(0).error == "model forward failed: RuntimeError: poisoned input"
    assert "duplicate request id" in duplicate.wait(0).error
    assert "max_new_tokens" in zero.wait(0).error
    run_until_done(engine, [good])
    assert good.wait(0).token_ids == generate_alone(tiny_model, good_prompt, 10)


def test_the_ids_beside_prompt_embeds_are_not_decoded(tiny_model, tokenizer):
    # With prompt_embeds the ids are not read: one the tokenizer cannot decode (an image placeholder left in) used
    # to fail the request when it served as the detokenizer's context; the text is the generated ids' alone.
    engine, _ = make_engine(tiny_model, tokenizer)
    with torch.inference_mode():
        embeds = tiny_model.get_input_embeddings()(torch.tensor([17, 18, 19]))
    placeholder = engine.add_request("placeholder", [-200, 17], SamplingParams(temperature=0, max_new_tokens=8),
                                     prompt_embeds=embeds)
    run_until_done(engine, [placeholder])
    output = placeholder.wait(0)
    assert output.token_ids == generate_alone(tiny_model, [17, 18, 19], 8)
    assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)


def test_a_row_gone_non_finite_leaves_nothing_for_the_next_in_its_place(tiny_model, tokenizer):
    # A request whose activations overflow (here: an input embedding made infinite) writes inf/NaN keys and values
    # in its row of the cache. Once it has left, a request merged into that row must not read them: they sit in
    # columns masked for it, but a masked NaN still turns its attention into NaN.
    poison = 12345

    def overflow_on_poison(module, args, output):
        return output.masked_fill((args[0] == poison).unsqueeze(-1), float("inf"))

    model = copy.deepcopy(tiny_model)
    model.get_input_embeddings().register_forward_hook(overflow_on_poison)
    engine, _ = make_engine(model, tokenizer)
    keep_prompt, good_prompt = random_prompt(20, seed=1000), random_prompt(5, seed=1001)
    keep = engine.add_request("keep", keep_prompt, SamplingParams(temperature=0, max_new_tokens=30))
    bad = engine.add_request("bad", [17, poison, 18], SamplingParams(temperature=0, max_new_tokens=3))
    engine.step()  # prefilled together: "bad" is row 1, 20 columns wide
    run_until_done(engine, [bad])
    good = engine.add_request("good", good_prompt, SamplingParams(temperature=0, max_new_tokens=8))  # takes row 1
    run_until_done(engine, [good, keep])
    assert good.wait(0).token_ids == generate_alone(tiny_model, good_prompt, 8)
    assert keep.wait(0).token_ids == generate_alone(tiny_model, keep_prompt, 30)


def test_context_cap_and_shutdown(tiny_model, tokenizer):
    engine, stream = make_engine(tiny_model, tokenizer, max_model_len=20)
    capped = engine.add_request("capped", random_prompt(15, seed=800),
                                SamplingParams(temperature=0, max_new_tokens=100))
    too_long = engine.add_request("too_long", random_prompt(20, seed=801), GREEDY)
    run_until_done(engine, [capped, too_long])
    assert capped.wait(0).completion_tokens == 5 and capped.wait(0).finish_reason == "length"
    assert "no room" in too_long.wait(0).error

    engine.start()
    long_running = [engine.add_request(f"l{i}", random_prompt(3, seed=810 + i), SamplingParams(max_new_tokens=10))
                    for i in range(2)]
    engine.shutdown()
    for handle in long_running:
        output = handle.wait(0)
        assert output.finished and output.finish_reason in ("error", "length")
        if output.finish_reason == "error":
            assert output.error == "engine shut down"
    late = engine.add_request("late", [17], GREEDY)
    assert late.wait(0).error == "engine shut down"


def test_real_model_greedy_batch_matches_generate(tokenizer, default_model_dir):
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    questions = ["What is 2+2?", "Name a colour.", "Write one short sentence about the sea and the sky at night."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        for q in questions
    ]
    engine, stream = make_engine(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop="<|im_end|>")
    handles = [engine.add_request(f"q{i}", p, params) for i, p in enumerate(prompts)]
    run_until_done(engine, handles)
    for i, (prompt, handle) in enumerate(zip(prompts, handles)):
        output = handle.wait(0)
        assert output.token_ids == generate_alone(model, prompt, 12)
        assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)
        assert stream.joined_deltas(f"q{i}") == output.text


def test_torch_work_in_a_passing_thread_leaves_no_thread_behind():
    # workers/torch_threads.py: the thread that ran a parallel op ends, and the OpenMP team it got ends with it.
    def live_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    x = torch.randn(1024, 1024)
    expected = torch.mm(x, x)  # this thread's own team, if any, exists from here on
    before = live_threads()
    assert torch.equal(in_passing_thread(torch.mm, x, x), expected)
    deadline = time.monotonic() + 5
    while live_threads() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_threads() == before
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)


def test_a_failure_outside_a_forward_fails_the_batch_and_the_engine_goes_on(tiny_model, tokenizer):
    # step() fails the batch when a forward fails; anything else escaping it used to end the engine thread silently,
    # leaving every request, running or to come, waiting for ever. Here the step's publishing fails once.
    class FailsOnce(LLMEngine):
        failed = False

        def _publish(self):
            if not FailsOnce.failed and self.scheduler.running:
                FailsOnce.failed = True
                raise RuntimeError("publishing failed")
            return super()._publish()

    engine = FailsOnce(tiny_model, tokenizer, max_num_seqs=4)
    engine.start()
    try:
        first = engine.add_request("first", random_prompt(5, seed=1), SamplingParams(temperature=0.0,
                                                                                     max_new_tokens=8))
        output = first.wait(WAIT_S)
        assert output.finish_reason == "error" and "publishing failed" in output.error, output
        later = engine.add_request("later", random_prompt(5, seed=2), SamplingParams(temperature=0.0,
                                                                                     max_new_tokens=4))
        assert later.wait(WAIT_S).finish_reason in ("length", "stop")
    finally:
        engine.shutdown()


def test_malformed_prompt_embeds_fail_alone(tiny_model, tokenizer):
    # prompt_embeds that are not even a sequence of positions (a 0-dim tensor, a list): the request is refused, and
    # reporting it (its prompt_tokens) must not break the step's publishing, which every other request waits on.
    engine, stream = make_engine(tiny_model, tokenizer)
    good_prompt = random_prompt(6, seed=1100)
    scalar = engine.add_request("scalar", [17], GREEDY, prompt_embeds=torch.tensor(1.0))
    listed = engine.add_request("list", [17], GREEDY, prompt_embeds=[[0.0] * 64])
    good = engine.add_request("good", good_prompt, SamplingParams(temperature=0, max_new_tokens=6))
    run_until_done(engine, [scalar, listed, good], max_steps=20)
    for handle in (scalar, listed):
        assert handle.wait(0).finish_reason == "error" and "prompt_embeds" in handle.wait(0).error
    assert good.wait(0).token_ids == generate_alone(tiny_model, good_prompt, 6)


def test_sampling_parameters_that_are_not_numbers_fail_alone_and_say_so(tiny_model, tokenizer):
    # A temperature or top_p that is not a finite number (None from a caller, a string, NaN) reached the batch's
    # sampling: the whole prefill group failed and was retried one by one, and the request failed with a misleading
    # "model forward failed: TypeError". It is refused at intake, naming the parameter; its batch-mates run.
    engine, _ = make_engine(tiny_model, tokenizer)
    good_prompt = random_prompt(6, seed=1150)
    bad = {
        "none": SamplingParams(temperature=None, max_new_tokens=4),
        "text": SamplingParams(top_p="0.9", max_new_tokens=4),
        "nan": SamplingParams(temperature=float("nan"), max_new_tokens=4),
        # A NaN passed the `< 1` check and ran past the KV budget and the context.
        "nan-limit": SamplingParams(temperature=0, max_new_tokens=float("nan")),
        "float-limit": SamplingParams(temperature=0, max_new_tokens=4.0),
    }
    handles = {rid: engine.add_request(rid, [17, 18], params) for rid, params in bad.items()}
    good = engine.add_request("good", good_prompt, SamplingParams(temperature=0, max_new_tokens=6))
    run_until_done(engine, [*handles.values(), good], max_steps=20)
    for rid, name in (("none", "temperature"), ("text", "top_p"), ("nan", "temperature")):
        output = handles[rid].wait(0)
        assert output.finish_reason == "error" and output.error.startswith(f"{name} must be a finite number"), output
    for rid in ("nan-limit", "float-limit"):
        output = handles[rid].wait(0)
        assert output.finish_reason == "error" and output.error.startswith("max_new_tokens must be a whole number"), \
            output
    assert good.wait(0).token_ids == generate_alone(tiny_model, good_prompt, 6)


def test_special_token_stop_spelled_out_by_ordinary_tokens_still_stops(tiny_model, tokenizer):
    # The original stops when the stop string's ids end the output *or* its text shows in the decoded output
    # (KeywordsStoppingCriteria). A stop that is a special token ("</s>") can also be spelled out by ordinary
    # tokens ("</", "s", ">"): that text must end generation and be removed too. Here a copy of the tokenizer makes
    # a piece of the model's greedy text a special token, which the model itself never emits as one id.
    prompt = random_prompt(5, seed=300)
    reference_ids = generate_alone(tiny_model, prompt, 30)
    reference_text = tokenizer.decode(reference_ids, skip_special_tokens=True)
    stop = tokenizer.decode(reference_ids[8:11], skip_special_tokens=True)
    special = copy.deepcopy(tokenizer)
    special.add_special_tokens({"additional_special_tokens": [stop]})
    assert special_token_id(special, stop) is not None

    engine, stream = make_engine(tiny_model, special)
    handle = engine.add_request("spelled", prompt, SamplingParams(temperature=0, max_new_tokens=30, stop=stop))
    run_until_done(engine, [handle])
    output = handle.wait(0)
    assert output.finish_reason == "stop"
    assert output.text == reference_text[: reference_text.find(stop)]
    assert stream.joined_deltas("spelled") == output.text
    assert len(output.token_ids) <= 11


def sentencepiece_tokenizer():
    """A small Llama-style tokenizer: "▁" for spaces, byte fallback, and a decoder that strips the text's leading
    space, as LLaVA's Llama/Vicuna tokenizers (so "▁The" decodes to "The" at the start of a text)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(["The cat sat on the mat. Hello there, the world! What is in the image?"] * 10, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_text_is_the_decode_of_the_generated_ids_with_a_sentencepiece_tokenizer():
    # The original streams decode(generated ids) (TextIteratorStreamer, skip_prompt): with a Llama tokenizer the
    # first generated "▁The" reads "The", not " The" as it would inside a decode of prompt + answer.
    tokenizer = sentencepiece_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = LlamaForCausalLM(config).eval()
    prompt = tokenizer.encode("What is in the image? 😀", add_special_tokens=False)
    with torch.no_grad():  # make the model answer with a token that opens with a space
        first = generate_alone(model, prompt, 1)[0]
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("▁the")] = 2 * model.lm_head.weight[first]
    engine, stream = make_engine(model, tokenizer)
    handle = engine.add_request("sp", prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    run_until_done(engine, [handle])
    output = handle.wait(0)
    assert tokenizer.convert_ids_to_tokens(output.token_ids[0]).startswith("▁"), "the answer should open with a space"
    assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)
    assert stream.joined_deltas("sp") == output.text
    # A resumed job's text goes on from the text it had: there the same first token keeps its space.
    context = tokenizer.encode("Look at", add_special_tokens=False)
    resumed = engine.add_request("resumed", prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
                                 text_context=context)
    run_until_done(engine, [resumed])
    going_on = resumed.wait(0)
    assert going_on.token_ids == output.token_ids
    assert going_on.text.startswith(" ") and going_on.text == " " + output.text
    assert "Look at" + going_on.text == tokenizer.decode(context + going_on.token_ids, skip_special_tokens=True)
    assert stream.joined_deltas("resumed") == going_on.text


def test_a_request_id_cancelled_then_submitted_again_runs(tiny_model, tokenizer):
    # A client cancels a request and submits one with the same id before the engine's next step: the abort came
    # first, so the new request is not a duplicate of the cancelled one, and the abort must not cancel it.
    engine, _ = make_engine(tiny_model, tokenizer)
    prompt = random_prompt(6, seed=1200)
    first = engine.add_request("x", prompt, SamplingParams(temperature=0, max_new_tokens=20))
    engine.step()
    engine.abort("x")
    again = engine.add_request("x", prompt, SamplingParams(temperature=0, max_new_tokens=8))
    engine.abort("new")  # an id no request has yet: the request added after it runs
    new = engine.add_request("new", prompt, SamplingParams(temperature=0, max_new_tokens=8))
    added_then_aborted = engine.add_request("gone", prompt, GREEDY)
    engine.abort("gone")
    run_until_done(engine, [first, again, new, added_then_aborted])
    assert first.wait(0).finish_reason == "cancelled"
    for handle in (again, new):
        assert handle.wait(0).error is None and handle.wait(0).token_ids == generate_alone(tiny_model, prompt, 8)
    assert added_then_aborted.wait(0).finish_reason == "cancelled"


def test_a_request_id_that_is_not_a_string_fails_alone(tiny_model, tokenizer):
    # The engine keys its requests by id. An unhashable one (a list out of a JSON body) raised in the step's intake,
    # which failed every running request with "engine step failed", then again as the step published, which left
    # its own handle and those published after it (a good batch-mate's) waiting for ever. It is refused as it is
    # added, with an error its handle reads.
    engine, stream = make_engine(tiny_model, tokenizer)
    running_prompt, mate_prompt = random_prompt(7, seed=1300), random_prompt(5, seed=1301)
    running = engine.add_request("running", running_prompt, SamplingParams(temperature=0, max_new_tokens=10))
    engine.step()
    listed = engine.add_request(["listed"], [17, 18], GREEDY)
    numbered = engine.add_request(7, [17, 18], GREEDY)
    mate = engine.add_request("mate", mate_prompt, SamplingParams(temperature=0, max_new_tokens=6))
    run_until_done(engine, [running, listed, numbered, mate])
    for handle in (listed, numbered):
        output = handle.wait(0)
        assert output.finish_reason == "error" and output.error.startswith("request_id must be a string"), output
    assert running.wait(0).token_ids == generate_alone(tiny_model, running_prompt, 10)
    assert mate.wait(0).token_ids == generate_alone(tiny_model, mate_prompt, 6)
    assert stream.joined_deltas("mate") == mate.wait(0).text


def test_an_abort_with_an_id_that_is_not_a_string_is_refused_to_its_caller(tiny_model, tokenizer):
    # An unhashable id in abort() raised in the engine's next step, failing every running request.
    engine, _ = make_engine(tiny_model, tokenizer)
    prompt = random_prompt(6, seed=1310)
    running = engine.add_request("running", prompt, SamplingParams(temperature=0, max_new_tokens=8))
    engine.step()
    with pytest.raises(TypeError, match="request_id must be a string"):
        engine.abort(["running"])
    run_until_done(engine, [running])
    assert running.wait(0).token_ids == generate_alone(tiny_model, prompt, 8)


def test_an_undecodable_id_and_a_failing_on_step_fail_nothing_else(tiny_model, tokenizer):
    # A request whose detokenizer meets an id the tokenizer cannot decode (here in its text_context) fails alone, and
    # an on_step that raises on every step neither stops the engine thread nor keeps the handles from resolving.
    def broken_on_step(outputs):
        raise ValueError("publisher is down")

    engine = LLMEngine(tiny_model, tokenizer, on_step=broken_on_step)
    engine.start()
    try:
        prompt = random_prompt(6, seed=1320)
        undecodable = engine.add_request("undecodable", prompt, GREEDY, text_context=[-1])
        good = engine.add_request("good", prompt, SamplingParams(temperature=0, max_new_tokens=6))
        assert undecodable.wait(WAIT_S).error.startswith("detokenization failed: OverflowError")
        assert good.wait(WAIT_S).token_ids == generate_alone(tiny_model, prompt, 6)
        later = engine.add_request("later", prompt, SamplingParams(temperature=0, max_new_tokens=3))
        assert later.wait(WAIT_S).token_ids == generate_alone(tiny_model, prompt, 3)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("stop", [SystemExit, KeyboardInterrupt])
def test_an_on_step_that_raises_a_base_exception_stops_the_engine_and_no_waiter_hangs(tiny_model, tokenizer, stop):
    # An on_step raising what is not an Exception (sys.exit() in it) ended the engine thread in the middle of its
    # publishing: the request that had just finished, the one still running and every one added later waited for ever.
    # The engine stops, as asked, and every request it had or is given ends, saying why.
    def stopping_on_step(outputs):
        if outputs:
            raise stop("publisher asked to stop")

    engine = LLMEngine(tiny_model, tokenizer, on_step=stopping_on_step)
    prompt = random_prompt(5, seed=1400)
    done = engine.add_request("done", prompt, SamplingParams(temperature=0, max_new_tokens=1))
    running = engine.add_request("running", prompt, SamplingParams(temperature=0, max_new_tokens=50))
    engine.start()  # one prefill of both: "done" ends there, "running" has its first token
    try:
        assert done.wait(WAIT_S).token_ids == generate_alone(tiny_model, prompt, 1)
        assert running.wait(WAIT_S).error == f"engine stopped: {stop.__name__}: publisher asked to stop"
        later = engine.add_request("later", prompt, GREEDY)
        assert later.wait(WAIT_S).error == f"engine stopped: {stop.__name__}: publisher asked to stop"
    finally:
        engine.shutdown()


def test_a_base_exception_from_on_step_in_a_step_called_directly_reaches_its_caller_and_the_step_still_resolves(
        tiny_model, tokenizer):
    # step() called by the caller's own thread (a warm-up) hands the exception to that caller, who decides; the
    # handles the step finished are resolved all the same: before, nothing (not even shutdown()) ever resolved them.
    def exiting_on_step(outputs):
        raise GeneratorExit

    engine = LLMEngine(tiny_model, tokenizer, on_step=exiting_on_step)
    prompt = random_prompt(5, seed=1410)
    done = engine.add_request("done", prompt, SamplingParams(temperature=0, max_new_tokens=1))
    with pytest.raises(GeneratorExit):
        engine.step()
    assert done.wait(0).token_ids == generate_alone(tiny_model, prompt, 1)


def test_a_prompt_or_context_that_is_not_token_ids_fails_alone_and_says_so(tiny_model, tokenizer):
    # add_request took list() of whatever came: an int raised in the caller's thread (add_request never raises), a
    # string, a float or a nested list failed in the step with an unclear TypeError, and a bool ran as token 1. A
    # text_context in a tensor raised there too (its truth value is ambiguous), though its ids are good.
    engine, stream = make_engine(tiny_model, tokenizer)
    good_prompt = random_prompt(6, seed=1500)
    bad_prompts = {"int": 17, "string": "hello", "bytes": b"hi", "str-in-list": [17, "18"], "float": [17, 18.0],
                   "nested": [[17, 18]], "bool": [True, 17]}
    handles = {rid: engine.add_request(rid, prompt, GREEDY) for rid, prompt in bad_prompts.items()}
    context = {rid: engine.add_request(rid, [17, 18], GREEDY, text_context=bad)
               for rid, bad in (("context-int", 5), ("context-str", ["a"]))}
    not_params = engine.add_request("not-params", [17, 18], {"temperature": 0})
    good = engine.add_request("good", good_prompt, SamplingParams(temperature=0, max_new_tokens=6))
    tensors = engine.add_request("tensors", torch.tensor(good_prompt), SamplingParams(temperature=0, max_new_tokens=6),
                                 text_context=torch.tensor([17, 18]))
    run_until_done(engine, [*handles.values(), *context.values(), not_params, good, tensors], max_steps=20)
    for name, group in (("prompt_token_ids", handles), ("text_context", context)):
        for handle in group.values():
            output = handle.wait(0)
            assert output.finish_reason == "error" and output.error.startswith(f"{name} must be"), output
    assert not_params.wait(0).error == "params must be a SamplingParams, got dict"
    assert good.wait(0).token_ids == tensors.wait(0).token_ids == generate_alone(tiny_model, good_prompt, 6)
    assert stream.joined_deltas("good") == good.wait(0).text


def test_prompt_embeds_that_are_a_class_not_a_tensor_fail_alone(tiny_model, tokenizer):
    # torch.Tensor itself (a call forgotten) has a `shape` that is no shape: reporting its request raised in the step's
    # publishing, and in every step after, so that every request, running or to come, waited for ever.
    engine, _ = make_engine(tiny_model, tokenizer)
    good_prompt = random_prompt(6, seed=1600)
    bad = engine.add_request("class", [17], GREEDY, prompt_embeds=torch.Tensor)
    good = engine.add_request("good", good_prompt, SamplingParams(temperature=0, max_new_tokens=6))
    run_until_done(engine, [bad, good], max_steps=20)
    assert bad.wait(0).error.startswith("prompt_embeds must be a torch.Tensor"), bad.wait(0)
    assert good.wait(0).token_ids == generate_alone(tiny_model, good_prompt, 6)


def test_a_stop_that_is_not_text_fails_at_add_request_and_says_so(tiny_model, tokenizer):
    # A stop that is not a string (an int, a list holding one) ran into the detokenizer: the request failed with
    # "invalid request: TypeError" or, once it had generated, "detokenization failed: TypeError", which names neither
    # the parameter nor the fix. It is refused as it is added, as the other arguments of the wrong form are.
    engine, _ = make_engine(tiny_model, tokenizer)
    good_prompt = random_prompt(6, seed=1700)
    bad = {"int": 5, "int-in-list": ["a", 5], "bytes": b"x", "none-in-list": [None], "nested": [["a"]]}
    handles = {rid: engine.add_request(rid, [17, 18], SamplingParams(temperature=0, max_new_tokens=4, stop=stop))
               for rid, stop in bad.items()}
    for rid, handle in handles.items():
        assert handle.done.is_set(), rid  # at add_request, before any step
        output = handle.wait(0)
        assert output.finish_reason == "error" and output.error.startswith("stop must be a string or a list of "
                                                                           "strings"), output
    good = engine.add_request("good", good_prompt, SamplingParams(temperature=0, max_new_tokens=6, stop=["zzz"]))
    run_until_done(engine, [good], max_steps=20)
    assert good.wait(0).token_ids == generate_alone(tiny_model, good_prompt, 6)


def test_aborts_after_the_engine_closed_are_not_kept(tiny_model, tokenizer):
    # abort() queued its request id for the engine thread's next step even once the engine had closed (shut down, or
    # stopped by on_step): no step takes them any more, so a cancellation listener that goes on calling it grew the
    # queue for as long as the process lived. After close an abort has nothing to cancel: it is dropped.
    engine, _ = make_engine(tiny_model, tokenizer)
    engine.start()
    engine.shutdown()
    for number in range(1000):
        engine.abort(f"job-{number}")
    assert engine._aborts == []
    with pytest.raises(TypeError, match="request_id must be a string"):
        engine.abort(["listed"])  # still refused to its caller


def test_on_stop_hears_that_the_engine_stopped_before_any_request_is_failed(tiny_model, tokenizer):
    # An engine that stopped itself fails every request from then on, and its owner (the worker) could not tell: it
    # stayed "ready" and took jobs only to fail them. on_stop is told the error first, while every request it had is
    # still unresolved (the worker hands their jobs back before they are failed); a raising on_stop changes nothing.
    heard = []

    def stopping_on_step(outputs):
        if outputs:
            raise SystemExit("publisher asked to stop")

    def on_stop(error):
        heard.append((error, running.done.is_set()))
        raise RuntimeError("the owner's hook failed")

    engine = LLMEngine(tiny_model, tokenizer, on_step=stopping_on_step, on_stop=on_stop)
    running = engine.add_request("running", random_prompt(5, seed=1800), SamplingParams(temperature=0,
                                                                                          max_new_tokens=50))
    engine.start()
    try:
        error = "engine stopped: SystemExit: publisher asked to stop"
        assert running.wait(WAIT_S).error == error
        assert heard == [(error, False)]
        assert engine.add_request("later", [17, 18], GREEDY).wait(0).error == error
    finally:
        engine.shutdown()
    assert len(heard) == 1  # shutdown() is no stop of the engine's own


def test_requests_that_end_at_their_first_token_do_not_starve_the_running_batch(tiny_model, tokenizer):
    # Admitted requests are prefilled ahead of the running batch's decode. Requests that end at their first token
    # (max_new_tokens 1, as a classification batch sends; an EOS at once) leave as fast as they come, so a stream of
    # them admitted a group every step and the running batch never decoded: here a request had 1 token of 20 after 60
    # steps, and an interactive request beside a batch of such jobs waited until the whole batch had drained.
    engine, stream = make_engine(tiny_model, tokenizer)
    prompt = random_prompt(6, seed=1900)
    running = engine.add_request("running", prompt, SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True))
    engine.step()
    one_token = []
    for i in range(60):
        one_token.append(engine.add_request(f"one{i}", random_prompt(4, seed=1901 + i),
                                            SamplingParams(temperature=0, max_new_tokens=1)))
        engine.step()
    assert running.done.is_set(), f"{stream.outputs['running'][-1].completion_tokens} of 20 tokens after 60 steps"
    assert running.wait(0).token_ids == generate_alone(tiny_model, prompt, 20)
    run_until_done(engine, one_token)
    assert all(handle.wait(0).completion_tokens == 1 for handle in one_token)
