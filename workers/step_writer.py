"""Writes an engine step's chunks to Redis on a thread of its own, while the engine computes its next step.

A step's round trip (8 or more jobs' chunks appended and published) took about 1.8 ms of the engine thread, 1.2 ms
of it waiting for Redis's answer (bench/README.md, "A step's write behind the engine"). Here the engine hands the
write over and goes on; it waits only when the step before is still being written, so at most one step is ever in
flight, the writes keep their order, and while Redis is away the engine waits one step later than it did, not
never. A worker uses it where its engine leaves CPUs to the rest (`workers.generation.writes_behind`): with a CPU
engine on every core, the wait it hides is Redis's and the API's work on those same cores, and nothing was gained.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("llava_queue.worker")


class StepWriter:
    """Runs one write at a time, in the order given, on a daemon thread of its own."""

    def __init__(self, name: str = "step-writer"):
        self._changed = threading.Condition()
        self._next: Callable[[], None] | None = None
        # Writes submitted, and finished: `wait` waits for those submitted before it, not for a moment with none in
        # flight, which an engine submitting a step after each could keep from coming.
        self._submitted = self._finished = 0
        # Started here, not by the engine thread's first write: a thread keeps the CPUs of the one that started it,
        # and with ENGINE_CPUS the writer belongs off the engine's (workers/main.py makes the worker's runner before
        # its engine thread moves there).
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, write: Callable[[], None]) -> None:
        """Run write() on the writer's thread, once the write before it has finished. What it raises is logged there
        (as an engine logs what its on_step raised), not raised to a caller that has moved on."""
        with self._changed:
            self._until(self._submitted)
            self._next = write
            self._submitted += 1
            self._changed.notify_all()

    def wait(self) -> None:
        """Return once every write submitted before this call has finished."""
        with self._changed:
            self._until(self._submitted)

    def _until(self, finished: int) -> None:
        while self._finished < finished:
            self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._next is None:
                    self._changed.wait()
                write, self._next = self._next, None
            try:
                write()
            except BaseException:
                # Whatever it is, this thread goes on: were it to end, the engine's next step would wait for it for
                # good (the engine thread itself ends on what is not an Exception, failing its requests; this one
                # holds none of them).
                log.exception("writing an engine step failed")
            finally:
                with self._changed:
                    self._finished += 1
                    self._changed.notify_all()
