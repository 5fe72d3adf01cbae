"""Torch work outside the engine thread runs on threads that end, so the engine's OpenMP team is the only one.

Torch's CPU builds parallelize with OpenMP (libgomp). Every thread that runs a parallel op
gets a team of worker threads of its own, kept until that thread ends. libgomp lets its
workers spin between two parallel regions only while it manages no more threads than there
are CPUs; past that it puts them to sleep after each region, and every one of the few hundred
small ops of a decode step then pays for waking them up. A worker that loaded its model on
the main thread and decoded on the engine thread had two teams: on 2 cores its engine ran
15-25 % slower than with one team (a 32 x 128 run made about 265,000 voluntary context
switches against about 1,000; bench/README.md). So loading, warm-up and the vision tower
run here, on a thread that ends when they return, and its team ends with it.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) run on a new thread that ends when fn returns; its result, or its exception raised here."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller, which re-raises it
            outcome.append((False, exc))

    # Daemon: a Ctrl-C that interrupts the caller's join must not wait for a model that is still loading.
    thread = threading.Thread(target=run, name=f"torch-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
