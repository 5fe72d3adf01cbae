"""The operations between a decoder layer's products, for bf16 decode steps on a CPU (layer_ops.cpp).

At a decode step's few dozen rows, torch's RMSNorm, rotary embedding, SiLU and residual sums cost their dispatch
from Python, not their arithmetic: about 300 µs a layer of SmolLM2-135M at 32 rows, against about 650 µs for the
layer's four products (bench/README.md). Here they are four calls a layer, each rounding to bf16 where torch's
operations do, so their outputs have torch's bits but for the order of RMSNorm's sum and the last bit of SiLU's
exponential. The engine runs them in bf16 decode steps of its prepacked forward (packed_llama.py); a prefill
step, another dtype or a GPU keeps torch's operations.

They are compiled with the engine's other CPU kernels (cpu_kernels.py) on first use; without a compiler the engine
logs why once and keeps torch's operations (`LLAVA_QUEUE_LAYER_OPS=torch` chooses them outright).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from shared.settings import get_settings
from workers.engine import cpu_kernels

_INT, _PTR, _THREADS = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# The vector widths (floats) of torch's CPU sums that RMSNorm's sum here can follow, the likeliest first.
PROBED_LANES = (8, 16, 4, 32)


class LayerOps:
    """The loaded operations, on bf16 CPU tensors whose rows are contiguous (the caller makes them so)."""

    def __init__(self, library: Path):
        lib = ctypes.CDLL(str(library))
        self._add_rms_norm = lib.llava_queue_add_rms_norm
        self._add_rms_norm.argtypes = [_PTR, _INT, _PTR, _INT, _PTR, ctypes.c_float, _PTR, _INT, _INT, _INT,
                                       ctypes.c_int, _THREADS]
        self._rotate = lib.llava_queue_rotate
        self._rotate.argtypes = [_PTR, _INT, _PTR, _PTR, _INT, _PTR, _INT, _INT, _INT, _THREADS]
        self._silu_mul = lib.llava_queue_silu_mul
        self._silu_mul.argtypes = [_PTR, _INT, _PTR, _INT, _INT, _INT, _THREADS]
        for function in (self._add_rms_norm, self._rotate, self._silu_mul):
            function.restype = None
        self._row_sum = lib.llava_queue_row_sum
        self._row_sum.restype, self._row_sum.argtypes = ctypes.c_float, [_PTR, _INT, ctypes.c_int]
        self.lanes = self._torch_sum_lanes()

    def _torch_sum_lanes(self) -> int:
        """The vector width (in floats) with which RMSNorm's sum here adds in torch's order: the one whose sums
        equal torch's on probe rows (8 in torch 2.13 on x86, whichever of its CPU code runs). Where none does, 8,
        and a last bit of a normalized value may then differ from torch's."""
        generator = torch.Generator().manual_seed(0)
        rows = [torch.randn(size, generator=generator).to(torch.bfloat16).float().square() for size in
                (100, 576, 2048, 5120, 16384) for _ in range(4)]
        for lanes in PROBED_LANES:
            if all(self._row_sum(row.data_ptr(), row.numel(), lanes) == row.sum().item() for row in rows):
                return lanes
        return PROBED_LANES[0]

    @staticmethod
    def supports(tensor: torch.Tensor) -> bool:
        return tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu"

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor) -> None:
        """hidden [rows, dim] += delta (in place; none when delta is None), then out [rows, dim] = RMSNorm(hidden)
        times weight [dim], as packed_llama._rms_norm."""
        rows, dim = hidden.shape
        self._add_rms_norm(hidden.data_ptr(), hidden.stride(0), None if delta is None else delta.data_ptr(),
                           0 if delta is None else delta.stride(0), weight.data_ptr(), eps, out.data_ptr(),
                           out.stride(0), rows, dim, self.lanes, torch.get_num_threads())

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        """The first `heads` heads of each row of x [rows, >= heads * head_dim] rotated by cos and sin
        [rows, head_dim], as packed_llama._rotate: [rows, heads, 1, head_dim]."""
        rows = x.shape[0]
        out = torch.empty(rows, heads, 1, head_dim, dtype=x.dtype)
        self._rotate(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0), out.data_ptr(), rows,
                     heads, head_dim, torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of gate_up [rows, 2 * width] (gate, then up): [rows, width]."""
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, width, dtype=gate_up.dtype)
        self._silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), width, rows, width,
                       torch.get_num_threads())
        return out


@functools.cache
def load() -> LayerOps | None:
    """The operations, built if needed (into the settings' CACHE_DIR), once a process; None (the reason logged
    once) when they cannot be had or the settings' LAYER_OPS is `torch`."""
    if get_settings().layer_ops == "torch":
        return None
    return cpu_kernels.loaded(LayerOps, "layer operations: torch's")
