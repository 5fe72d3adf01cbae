"""Decode attention on a CPU in a kernel of our own (decode_attention.cpp), built on first use.

torch's CPU flash kernel, which `scaled_dot_product_attention` runs in bf16 and fp32, makes each (row, KV head)
pair of a decode step a task of its own and takes ~400 µs a layer at 32 rows and 100 columns on 2 cores, where
reading the keys and values takes ~40: a quarter of the engine's decode step (bench/README.md). The kernel here
reads each pair's keys and values once and computes in fp32 throughout (the flash kernel rounds the softmax's
weights to bf16 before multiplying them with the values), so it is at least as close to exact: 112 µs against
the flash kernel's 301 at that shape, measured alone. The engine runs it in bf16 only (packed_llama.py); in fp32
it was no faster over a whole run.

It is compiled with the engine's other CPU kernels (cpu_kernels.py) for this CPU on first use. Without a compiler,
or when the build fails, the engine logs why once and keeps the flash kernel (`LLAVA_QUEUE_DECODE_ATTENTION=torch`
chooses it outright).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from shared.settings import get_settings
from workers.engine import cpu_kernels

DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_INT, _PTR = ctypes.c_int64, ctypes.c_void_p


class DecodeAttention:
    """The loaded kernel: call it as `_attention`'s decode branch is called; None where it does not apply."""

    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))
        self._call = self._lib.llava_queue_decode_attention
        self._call.restype = None
        self._call.argtypes = [ctypes.c_int, _PTR, _INT, _INT, _PTR, _INT, _INT, _PTR, _INT, _INT, _PTR, _INT, _PTR,
                               _INT, _INT, _INT, _INT, _INT, ctypes.c_float, ctypes.c_int]
        self.max_head_dim = self._lib.llava_queue_max_head_dim()
        self.max_groups = self._lib.llava_queue_max_groups()

    def supports(self, dtype: torch.dtype, groups: int, head_dim: int) -> bool:
        return dtype in DTYPES and groups <= self.max_groups and head_dim <= self.max_head_dim

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor | None:
        """q [B, kv_heads, groups, d]; keys, values [B, kv_heads, W, d] (the cache's window, a strided view);
        mask [B, 1, 1, W] additive (0 and -inf), in q's dtype. Returns [B, kv_heads, groups, d], or None when
        the tensors are not laid out as the kernel reads them (the caller runs sdpa)."""
        rows, kv_heads, groups, head_dim = q.shape
        width = keys.shape[2]
        if not (q.device.type == "cpu" and self.supports(q.dtype, groups, head_dim)
                and keys.dtype == values.dtype == mask.dtype == q.dtype
                and q.stride()[2:] == (head_dim, 1) and keys.stride()[2:] == (head_dim, 1)
                and values.stride()[2:] == (head_dim, 1) and mask.shape[-1] == width and mask.stride(-1) == 1
                and mask.shape[0] == rows):
            return None
        out = torch.empty(q.shape, dtype=q.dtype)
        self._call(DTYPES[q.dtype], q.data_ptr(), q.stride(0), q.stride(1), keys.data_ptr(), keys.stride(0),
                   keys.stride(1), values.data_ptr(), values.stride(0), values.stride(1), mask.data_ptr(),
                   mask.stride(0), out.data_ptr(), rows, kv_heads, groups, width, head_dim, scale,
                   torch.get_num_threads())
        return out


@functools.cache
def load() -> DecodeAttention | None:
    """The kernel, built if needed (into the settings' CACHE_DIR), once a process; None (the reason logged once)
    when it cannot be had or the settings' DECODE_ATTENTION is `torch`."""
    if get_settings().decode_attention == "torch":
        return None
    return cpu_kernels.loaded(DecodeAttention, "decode attention: torch's flash kernel")
