"""The engine's own CPU kernels (the `*.cpp` files here, and the header they share), compiled into one library on
first use.

They are compiled with the machine's C++ compiler (`g++`, or `$CXX`) for this CPU (`-march=native`) into the cache
directory, under a name that hashes the sources, the flags, the compiler and the CPU's flags, so a cache shared by
different machines never hands one another's build; a build is written under a temporary name and renamed, so
processes starting together do not read a half-written one. Each kernel's module (decode_attention.py,
layer_ops.py) loads the library through `loaded` and, when it cannot be had, logs why once and keeps torch's ops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shared.settings import get_settings

log = logging.getLogger("llava_queue.worker")
T = TypeVar("T")

SOURCES = tuple(Path(__file__).with_name(name) for name in ("decode_attention.cpp", "layer_ops.cpp"))
HEADERS = (Path(__file__).with_name("bf16_math.h"),)
# -fassociative-math (with what it needs) lets the compiler vectorize sums; infinities stay (no
# -ffinite-math-only): masked attention columns are -inf.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-shared", "-fPIC")
BUILD_TIMEOUT_SECONDS = 120


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def _version(compiler: str) -> str:
    """What `compiler --version` says, asked once a process (each kernel's module builds, on the same compiler)."""
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the C++ compiler {compiler!r} does not run: {exc}") from exc


def build(cache_dir: Path | None = None, compiler: str | None = None) -> Path:
    """The kernels' shared library, compiled now unless a build for these sources, compiler and CPU is there.

    Raises RuntimeError (with the compiler's message) when it cannot be built.
    """
    compiler = compiler or _compiler()
    if not compiler:
        raise RuntimeError("no C++ compiler (g++, or $CXX) on this machine")
    version = _version(compiler)
    texts = [path.read_bytes() for path in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*texts, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_flags().encode()])).hexdigest()[:20]
    directory = (cache_dir or get_settings().cache_dir) / "kernels"
    library = directory / f"engine-kernels-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=directory, prefix=library.stem, suffix=".so.part")
    os.close(descriptor)
    try:
        result = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", partial], capture_output=True,
                                text=True, timeout=BUILD_TIMEOUT_SECONDS)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(result.stderr or result.stdout).strip()[-2000:]}")
        os.replace(partial, library)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{compiler} took more than {BUILD_TIMEOUT_SECONDS} s") from exc
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


def loaded(make: Callable[[Path], T], instead: str) -> T | None:
    """make(the library), built if needed into the settings' CACHE_DIR; None, the reason logged, when it cannot be
    built or loaded: `instead` says what the engine runs then."""
    try:
        return make(build())
    except (RuntimeError, OSError) as exc:
        log.warning("%s, as the engine's own could not be built (%s)", instead, exc)
        return None
