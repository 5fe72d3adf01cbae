"""The engine's sampling parameters at their edges: a request's draws do not depend on its batch-mates' parameters,
and a parameter the sampler cannot use fails its own request, saying which, never its batch-mates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_engine import run_until_done, tiny_model, tokenizer  # noqa: F401 (fixtures)
from workers.engine import LLMEngine, SamplingParams
from workers.engine.sampling import sample


def test_a_negative_top_k_keeps_every_token_whatever_its_batch_mates_ask():
    # A negative top_k (vLLM's -1) kept every token while no row of the batch asked for a top-k, and the row's argmax
    # alone once one did: a seeded request drew other tokens depending on its batch-mates (120 of 200 seeds here).
    torch.manual_seed(0)
    logits = torch.randn(2, 1000) * 3
    differ = 0
    for seed in range(40):
        alone = sample(logits[:1], [1.0], [1.0], [torch.Generator().manual_seed(seed)], [-1])
        batched = sample(logits, [1.0, 1.0], [1.0, 1.0],
                         [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(7)], [-1, 5])
        differ += int(alone[0] != batched[0])
    assert differ == 0
    draws = {int(sample(logits, [1.0, 1.0], [1.0, 1.0], None, [-1, 5])[0]) for _ in range(50)}
    assert len(draws) > 1  # drawn from the whole row, not its argmax alone


@pytest.mark.parametrize("params, error", [
    (SamplingParams(top_k=None, max_new_tokens=4), "top_k must be a whole number"),
    (SamplingParams(top_k=2.5, max_new_tokens=4), "top_k must be a whole number"),
    (SamplingParams(seed=2**64, max_new_tokens=4), "seed must be a whole number in [-2^63, 2^64)"),
    (SamplingParams(seed=1.5, max_new_tokens=4), "seed must be a whole number in [-2^63, 2^64)"),
])
def test_a_top_k_or_seed_the_sampler_cannot_use_fails_alone_and_says_so(tiny_model, tokenizer, params,  # noqa: F811
                                                                         error):
    # A top_k that is no whole number failed the sampling of its whole prefill group, then the request with "model
    # forward failed: TypeError"; a seed out of 64 bits with "invalid request: ValueError: Overflow when unpacking".
    engine = LLMEngine(tiny_model, tokenizer, max_num_seqs=4)
    mate = engine.add_request("mate", [17, 18, 19], SamplingParams(temperature=0.0, max_new_tokens=4))
    bad = engine.add_request("bad", [20, 21, 22], params)
    edge = engine.add_request("edge", [20, 21, 22], SamplingParams(top_k=-1, seed=-2**63, max_new_tokens=4))
    # numpy's integers are whole numbers too (a seed of one failed with "invalid request: TypeError").
    numpy = engine.add_request("numpy", [20, 21, 22], SamplingParams(top_k=np.int64(5), seed=np.int64(-5),
                                                                      max_new_tokens=4))
    run_until_done(engine, [mate, bad, edge, numpy])
    assert bad.wait(0).finish_reason == "error"
    assert bad.wait(0).error.startswith(error), bad.wait(0).error
    for handle in (mate, edge, numpy):
        assert handle.wait(0).finish_reason == "length" and len(handle.wait(0).token_ids) == 4
