"""Decode attention on a CPU in a kernel of our own (decode_attention.cpp), built on first use.

torch's CPU flash kernel, which `scaled_dot_product_attention` runs in bf16 and fp32, makes each (row, KV head)
pair of a decode step a task of its own and takes ~400 µs a layer at 32 rows and 100 columns on 2 cores, where
reading the keys and values takes ~40: a quarter of the engine's decode step (bench/README.md). The kernel here
reads each pair's keys and values once and computes in fp32 throughout (the flash kernel rounds the softmax's
weights to bf16 before multiplying them with the values), so it is at least as close to exact: 112 µs against
the flash kernel's 301 at that shape, measured alone. The engine runs it in bf16 only (packed_llama.py); in fp32
it was no faster over a whole run.

It is compiled with the machine's C++ compiler (`g++`, or `$CXX`) for this CPU (`-march=native`) into the cache
directory, under a name that hashes the source, the flags, the compiler and the CPU's flags, so a cache shared by
different machines never hands one another's build; a build is written under a temporary name and renamed, so
processes starting together do not read a half-written one. Without a compiler, or when the build fails, the
engine logs why once and keeps the flash kernel (`LLAVA_QUEUE_DECODE_ATTENTION=torch` chooses it outright).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from shared.settings import get_settings

log = logging.getLogger("llava_queue.worker")

SOURCE = Path(__file__).with_name("decode_attention.cpp")
# -fassociative-math (with what it needs) lets the compiler vectorize the dot products' sums; infinities stay
# (no -ffinite-math-only): masked columns are -inf.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
BUILD_TIMEOUT_SECONDS = 120
_INT, _PTR = ctypes.c_int64, ctypes.c_void_p


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(cache_dir: Path | None = None, compiler: str | None = None) -> Path:
    """The kernel's shared library, compiled now unless a build for this source, compiler and CPU is there.

    Raises RuntimeError (with the compiler's message) when it cannot be built.
    """
    compiler = compiler or _compiler()
    if not compiler:
        raise RuntimeError("no C++ compiler (g++, or $CXX) on this machine")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the C++ compiler {compiler!r} does not run: {exc}") from exc
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:20]
    directory = (cache_dir or get_settings().cache_dir) / "kernels"
    library = directory / f"decode_attention-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=directory, prefix=library.stem, suffix=".so.part")
    os.close(descriptor)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(result.stderr or result.stdout).strip()[-2000:]}")
        os.replace(partial, library)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{compiler} took more than {BUILD_TIMEOUT_SECONDS} s") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


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
    try:
        return DecodeAttention(build())
    except (RuntimeError, OSError) as exc:
        log.warning("decode attention: torch's flash kernel, as the engine's own could not be built (%s)", exc)
        return None
