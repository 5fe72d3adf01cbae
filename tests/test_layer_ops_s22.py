"""The engine's operations between a layer's products (workers/engine/layer_ops.cpp): torch's bits on the tensors a
decode step hands them, the same greedy text as torch's operations in the engine, and out of the way when told to.
"""

import pytest
import torch
import torch.nn.functional as F

from workers.engine import cpu_kernels, layer_ops
from workers.engine.packed_llama import _rms_norm, _rotate


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    return layer_ops.LayerOps(cpu_kernels.build(tmp_path_factory.mktemp("kernel-cache")))


def _bf16(*shape, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)


def test_row_sums_follow_torchs_order(ops):
    # The width found is one whose sums equal torch's, bit for bit, from a few floats to past the sum's cascade
    # (16 steps of 4 vectors) and with elements past the last whole vector.
    assert ops.lanes in layer_ops.PROBED_LANES
    generator = torch.Generator().manual_seed(1)
    for size in (5, 37, 576, 1000, 2048, 4100, 8192):
        for _ in range(8):
            squares = _bf16(size, generator=generator, scale=10.0).float().square()
            assert ops._row_sum(squares.data_ptr(), size, ops.lanes) == squares.sum().item(), size
    # Each other width sums some of these rows in another order: finding the width is not vacuous.
    rows = [_bf16(576, generator=generator).float().square() for _ in range(20)]
    for lanes in layer_ops.PROBED_LANES:
        if lanes != ops.lanes:
            assert any(ops._row_sum(row.data_ptr(), 576, lanes) != row.sum().item() for row in rows), lanes


@pytest.mark.parametrize("rows, dim", [(1, 64), (7, 576), (32, 576), (3, 2048), (64, 1000), (2, 5120)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_has_torchs_bits(ops, rows, dim, with_delta):
    generator = torch.Generator().manual_seed(rows * dim)
    # Rows of different magnitudes, as a residual stream's, some with outliers; 64 x 1000 is shared among threads.
    hidden = _bf16(rows, dim, generator=generator) * torch.rand(rows, 1, generator=generator).mul(40).to(torch.bfloat16)
    hidden[:, 3] *= 30
    delta = _bf16(rows, dim, generator=generator) if with_delta else None
    weight = _bf16(dim, generator=generator).add(1)
    expected_hidden = hidden + delta if with_delta else hidden.clone()
    expected = _rms_norm(expected_hidden, weight, 1e-5)
    out = torch.empty_like(hidden)
    ops.add_rms_norm(hidden, delta, weight, 1e-5, out)
    assert torch.equal(hidden, expected_hidden)
    assert torch.equal(out, expected)


def test_add_rms_norm_on_strided_rows(ops):
    # Rows of a wider buffer (a row stride past the row's length), written in place and read from there.
    generator = torch.Generator().manual_seed(7)
    buffer = _bf16(6, 700, generator=generator)
    hidden, delta = buffer[:, :576], _bf16(6, 600, generator=generator)[:, :576]
    weight = _bf16(576, generator=generator)
    expected_hidden = hidden + delta
    expected = _rms_norm(expected_hidden, weight, 1e-6)
    out = torch.full((6, 640), 7.0, dtype=torch.bfloat16)
    ops.add_rms_norm(hidden, delta, weight, 1e-6, out[:, :576])
    assert torch.equal(buffer[:, :576], expected_hidden)
    assert torch.equal(out[:, :576], expected) and (out[:, 576:] == 7).all()  # nothing written past a row


@pytest.mark.parametrize("rows, kv_heads, groups, head_dim", [(32, 3, 3, 64), (5, 2, 2, 128), (1, 1, 4, 32)])
def test_rotate_has_torchs_bits(ops, rows, kv_heads, groups, head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    heads = kv_heads * groups
    qkv = _bf16(rows, (heads + 2 * kv_heads) * head_dim, generator=generator, scale=3.0)
    positions = torch.randint(0, 500, (rows,), generator=generator)
    frequencies = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = positions[:, None].float() * frequencies[None]
    cos = torch.cat([angles, angles], -1).cos().to(torch.bfloat16)
    sin = torch.cat([angles, angles], -1).sin().to(torch.bfloat16)
    rotated = ops.rotate(qkv, cos, sin, heads + kv_heads, head_dim)
    assert rotated.shape == (rows, heads + kv_heads, 1, head_dim)
    as_the_layer_does = qkv.view(rows, 1, heads + 2 * kv_heads, head_dim).transpose(1, 2)[:, : heads + kv_heads]
    assert torch.equal(rotated, _rotate(as_the_layer_does, cos[:, None, None], sin[:, None, None]))


@pytest.mark.parametrize("rows, width", [(32, 1536), (3, 100), (1, 8)])
def test_silu_mul_has_torchs_bits(ops, rows, width):
    generator = torch.Generator().manual_seed(width)
    gate_up = _bf16(rows, 2 * width, generator=generator, scale=4.0)
    gate_up[0, :4] = torch.tensor([0.0, -0.0, 60.0, -60.0])  # zeros and both tails of the exponential
    gate, up = gate_up.split(width, dim=-1)
    out = ops.silu_mul(gate_up)
    expected = F.silu(gate) * up
    # The exponential is not torch's (the last fp32 bit may differ): a bf16 result may, very rarely, round the
    # other way. None did on these inputs; allow one in 10,000, by one bf16 step at most.
    differing = out != expected
    assert differing.sum().item() <= out.numel() // 10_000
    assert torch.allclose(out.float(), expected.float(), rtol=2**-7, atol=0)


def test_load_honours_the_setting_and_a_missing_compiler(tmp_path, monkeypatch, load_anew):
    missing = str(tmp_path / "no-such-compiler")
    assert load_anew(layer_ops.load, CXX=missing, LLAVA_QUEUE_CACHE_DIR=str(tmp_path)) is None
    monkeypatch.delenv("CXX")
    assert load_anew(layer_ops.load, LLAVA_QUEUE_LAYER_OPS="torch") is None
    assert isinstance(load_anew(layer_ops.load, LLAVA_QUEUE_LAYER_OPS="auto"), layer_ops.LayerOps)


@pytest.fixture(scope="module")
def default_model_bf16(default_model_dir):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 on this CPU")
    from workers.builder import load_model

    return load_model(str(default_model_dir), device="cpu", dtype="bfloat16")


def test_decode_steps_have_the_logits_of_torchs_operations(default_model_bf16):
    # The embedded default model (30 layers, 9 query heads over 3 KV heads of 64) in bf16, a mixed batch decoded
    # by the engine: every decode step's logits are those of the same engine on torch's operations, bit for bit.
    from workers.engine import LLMEngine, SamplingParams

    loaded = default_model_bf16
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=8)
    runner = engine.runner
    assert runner.packed.layer_ops is not None
    forward, logits = runner._forward, []

    def recording(inputs, attention_mask, position_ids, cache):
        out = forward(inputs, attention_mask, position_ids, cache)
        if position_ids.shape[1] == 1:
            logits.append(out.clone())
        return out

    runner._forward = recording
    prompts = [loaded.tokenizer(text).input_ids for text in
               ("The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,", "Hello")]

    def run() -> list[torch.Tensor]:
        logits.clear()
        handles = [engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_new_tokens=6 + 3 * i,
                                                                      ignore_eos=True))
                   for i, prompt in enumerate(prompts)]
        while not all(handle.done.is_set() for handle in handles):
            engine.step()
        return list(logits)

    ops = runner.packed.layer_ops
    with_ops = run()
    runner.packed.layer_ops = None
    try:
        with_torch = run()
    finally:
        runner.packed.layer_ops = ops
    assert len(with_ops) == len(with_torch) >= 10
    assert all(torch.equal(a, b) for a, b in zip(with_ops, with_torch))
