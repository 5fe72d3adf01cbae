"""Choosing the dtype a model runs in on a given device."""

from __future__ import annotations

from pathlib import Path

import torch

# CPU feature flags that make bf16 matmuls fast: x86 AVX512-BF16 and AMX, arm64 BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def pick_dtype(device: str) -> torch.dtype:
    """The fastest safe dtype for `device` ("cuda", "cuda:1", "cpu"...).

    fp16 on CUDA, bf16 on a CPU with native bf16 support, fp32 otherwise
    (emulated bf16 on an older CPU is slower than fp32).
    """
    if device.startswith("cuda"):
        return torch.float16
    if device.startswith("cpu") and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16 on x86, the BF16 extension on arm64)."""
    if "AMX" in torch.backends.cpu.get_cpu_capability():
        return True
    return bool(_cpu_flags() & BF16_CPU_FLAGS)


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        # x86 names the line "flags", arm64 "Features".
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags
