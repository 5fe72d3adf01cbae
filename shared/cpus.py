"""Dedicated engine cores: which CPUs the engine's thread computes on, and which the rest of the stack keeps to.

On a CPU the engine's every op runs on an OpenMP team, one thread per core, that meets at a
barrier after each op: when the API, Redis, a Celery thread or a client takes one of those
cores, the whole team waits for it (bench/README.md). `LLAVA_QUEUE_ENGINE_CPUS` gives the
engine cores of its own, as vLLM's CPU backend does with `VLLM_CPU_OMP_THREADS_BIND`: the
engine thread and its team run there, one torch thread per core, and the worker's other
threads, the API and the embedded Redis that `llava-queue up` starts run on the others.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


# Past any machine's CPU numbers (Linux's NR_CPUS is at most 8192): a range is a set of this many at most. Unbounded,
# a typo such as "0-99999999999" filled memory while the settings were read, in every command.
MAX_CPU = 65535
# One part of a cpu list: a number or a range, blanks around them only. Blanks were removed first, and "1 2" read
# as CPU 12.
_CPU_LIST_PART = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU numbers from a Linux cpu list such as "1", "2-7" or "0,2,4-5"; ValueError saying what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        found = _CPU_LIST_PART.fullmatch(part)
        if not found:
            raise ValueError(f"bad CPU list {text!r}: expected numbers and ranges such as '1', '2-7' or '0,2,4-5'")
        low = int(found[1])
        high = low if found[2] is None else int(found[2])
        if high < low:
            raise ValueError(f"bad CPU list {text!r}: the range {part.strip()} runs backwards")
        if high > MAX_CPU:
            raise ValueError(f"bad CPU list {text!r}: CPU {high} is past any machine's (at most {MAX_CPU})")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: frozenset[int]) -> str:
    """The shortest cpu list naming `cpus` ("0-3,6")."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


@dataclass(frozen=True)
class CpuSplit:
    """The engine's CPUs, and the ones left to everything else.

    No engine CPUs: the engine has no cores of its own (the setting is empty). No rest: it has them all. Either
    way nothing is moved (`keep_to` and `keep_process_to` do nothing with no CPUs).
    """

    engine: frozenset[int]
    rest: frozenset[int]

    def describe(self) -> str:
        rest = format_cpu_list(self.rest) if self.rest else "the same CPUs (none is left over)"
        return f"engine on CPU {format_cpu_list(self.engine)}, the rest on {rest}"


def split_cpus(engine_cpus: str) -> CpuSplit:
    """The split `engine_cpus` (the setting) asks for, among the CPUs this process may use; an empty one when the
    setting is empty.

    ValueError when the list is malformed or names a CPU this process cannot run on.
    """
    if not engine_cpus.strip():
        return CpuSplit(frozenset(), frozenset())
    engine = parse_cpu_list(engine_cpus)
    available = frozenset(os.sched_getaffinity(0))
    missing = engine - available
    if missing:
        raise ValueError(f"LLAVA_QUEUE_ENGINE_CPUS names CPU {format_cpu_list(missing)}, which this process cannot "
                         f"run on (it may use {format_cpu_list(available)})")
    return CpuSplit(engine, available - engine)


def keep_process_to(cpus: frozenset[int]) -> None:
    """Run every thread this process has now (a library's native ones too), and every thread they start, on `cpus`."""
    if cpus:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:  # a thread that ended meanwhile
                pass


def keep_to(cpus: frozenset[int]) -> None:
    """Run the calling thread (and the threads it starts from now on) on `cpus` only; nothing when it is empty."""
    if cpus:
        # pid 0 is the calling thread: Linux sets the affinity of one thread, not of the whole process.
        os.sched_setaffinity(0, cpus)
