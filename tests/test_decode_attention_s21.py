"""The engine's CPU decode-attention kernel (workers/engine/decode_attention.cpp): as close to exact as torch's flash
kernel or closer, on the layouts the engine hands it, built once per source and machine, and out of the way when it
cannot be built."""

import stat

import pytest
import torch
import torch.nn.functional as F

from workers.engine import cpu_kernels, decode_attention
from workers.engine.packed_llama import _attention


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return decode_attention.DecodeAttention(cpu_kernels.build(tmp_path_factory.mktemp("kernel-cache")))


def _case(dtype, rows, kv_heads, groups, head_dim, width, capacity, seed):
    """q as the engine's decode step makes it (a view of q/k rotated together), the keys and values a window of a
    cache buffer, the additive mask left-padded per row (every row keeps at least its last column)."""
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    rotated = torch.randn(rows, heads + kv_heads, 1, head_dim, generator=generator).to(dtype)
    q = rotated[:, :heads].reshape(rows, kv_heads, groups, head_dim)
    start = capacity - width - 3
    buffers = [torch.randn(rows, kv_heads, capacity, head_dim, generator=generator).mul_(2).to(dtype) for _ in "kv"]
    keys, values = (buffer[:, :, start : start + width] for buffer in buffers)
    live = torch.ones(rows, width, dtype=torch.bool)
    for row in range(rows):
        live[row, : (row * 5) % width] = False
    mask = torch.zeros(rows, width, dtype=dtype).masked_fill_(~live, float("-inf"))[:, None, None]
    return q, keys, values, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(32, 3, 3, 64, 100), (5, 2, 1, 128, 17), (3, 1, 4, 32, 1), (2, 4, 2, 64, 700)])
def test_kernel_is_as_close_to_exact_as_the_flash_kernel(kernel, dtype, shape):
    rows, kv_heads, groups, head_dim, width = shape
    q, keys, values, mask = _case(dtype, rows, kv_heads, groups, head_dim, width, width + 40, seed=width)
    scale = head_dim**-0.5
    exact = F.scaled_dot_product_attention(q.double(), keys.double(), values.double(), attn_mask=mask.double(),
                                           scale=scale)
    flash = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    ours = kernel(q, keys, values, mask, scale)
    assert ours.dtype == dtype and ours.shape == q.shape
    ulp = torch.finfo(dtype).eps
    flash_error, our_error = ((out.double() - exact).abs().max().item() for out in (flash, ours))
    flash_mean, our_mean = ((out.double() - exact).abs().mean().item() for out in (flash, ours))
    if dtype == torch.bfloat16:
        # Both round the output once to bf16; ours rounds nothing on the way (the flash kernel rounds the
        # softmax's weights to bf16).
        assert our_error <= max(flash_error, 2 * ulp * exact.abs().max().item()), (our_error, flash_error)
        assert our_mean <= flash_mean * 1.05, (our_mean, flash_mean)
    else:
        # fp32 (not what the engine runs it in): the sums' order alone differs, and ours sums 700 columns in
        # fewer, longer runs than the flash kernel's blocks.
        assert our_error <= max(2 * flash_error, 8 * ulp * exact.abs().max().item()), (our_error, flash_error)
        assert our_mean <= flash_mean * 1.5, (our_mean, flash_mean)


def test_one_live_column_gives_its_value_exactly(kernel):
    q, keys, values, mask = _case(torch.bfloat16, 4, 3, 3, 64, 9, 20, seed=1)
    mask.fill_(float("-inf"))[..., 4] = 0
    out = kernel(q, keys, values, mask, 0.125)
    assert torch.equal(out, values[:, :, 4:5].expand(-1, -1, 3, -1))


def test_layouts_it_does_not_read_go_to_sdpa(kernel):
    q, keys, values, mask = _case(torch.bfloat16, 4, 3, 3, 64, 9, 20, seed=2)
    columns_apart = keys.transpose(2, 3).contiguous().transpose(2, 3)  # head_dim not contiguous
    assert kernel(q, columns_apart, values, mask, 0.125) is None
    assert kernel(q.half(), keys.half(), values.half(), mask.half(), 0.125) is None  # no fp16 on a CPU
    # _attention then computes it with sdpa: [B, heads, 1, d] in, [B, 1, heads, d] out, the same either way.
    heads_q = q.reshape(4, 9, 1, 64)
    by_sdpa = _attention(heads_q, columns_apart, values, mask, 0.125, kernel)
    assert torch.equal(by_sdpa, _attention(heads_q, columns_apart, values, mask, 0.125, None))
    by_kernel = _attention(heads_q, keys, values, mask, 0.125, kernel)
    assert by_kernel.shape == (4, 1, 9, 64)
    assert torch.equal(by_kernel, kernel(q, keys, values, mask, 0.125).reshape(4, 9, 1, 64).transpose(1, 2))


def test_built_once_per_source_and_compiler(tmp_path):
    first = cpu_kernels.build(tmp_path)
    built_at = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == built_at
    # Another compiler (here the same one behind a wrapper that says another version) builds its own.
    wrapper = tmp_path / "other-g++"
    wrapper.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "other 1.0"; exit 0; }\nexec g++ "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    second = cpu_kernels.build(tmp_path, compiler=str(wrapper))
    assert second != first and second.exists()
    assert sorted(path.name for path in (tmp_path / "kernels").iterdir()) == sorted([first.name, second.name])


def test_without_a_compiler_it_says_why(tmp_path, monkeypatch, load_anew):
    with pytest.raises(RuntimeError, match="does not run"):
        cpu_kernels.build(tmp_path, compiler=str(tmp_path / "no-such-compiler"))
    failing = tmp_path / "failing-g++"
    failing.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "failing 1.0"; exit 0; }\n'
                       'echo "error: no room" >&2; exit 1\n')
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(RuntimeError, match="no room"):
        cpu_kernels.build(tmp_path, compiler=str(failing))
    assert not list((tmp_path / "kernels").iterdir())  # nothing half-written left behind
    # The engine then keeps torch's kernel, and so it does when told to.
    assert load_anew(decode_attention.load, CXX=str(failing), LLAVA_QUEUE_CACHE_DIR=str(tmp_path)) is None
    monkeypatch.delenv("CXX")
    assert load_anew(decode_attention.load, LLAVA_QUEUE_DECODE_ATTENTION="torch") is None
    assert load_anew(decode_attention.load, LLAVA_QUEUE_DECODE_ATTENTION="auto") is not None
    assert [path.suffix for path in (tmp_path / "kernels").iterdir()] == [".so"]  # built into CACHE_DIR
