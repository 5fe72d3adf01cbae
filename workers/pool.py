"""The worker's Celery pool: Celery's thread pool, whose cold shutdown hands the running jobs back."""

from collections.abc import Callable

from celery.concurrency.thread import TaskPool


class HandingBackPool(TaskPool):
    """One task thread per engine slot, as `--pool=threads`; a cold shutdown (a second Ctrl-C, SIGQUIT) hands every
    running job back to the queue.

    Celery ends a cold shutdown by terminating each running task (`terminate_job`), which a thread pool cannot do:
    it raised NotImplementedError (a CRITICAL traceback), and then the engine's shutdown could end the jobs failed
    ("engine shut down"). Here the worker's `hand_back_all` hands them back, which ends their tasks, so the pool's
    stop, which waits for its threads, returns at once.
    """

    hand_back_all: Callable[[], None] | None = None  # set by the worker once its jobs can be handed back

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        if HandingBackPool.hand_back_all is not None:
            HandingBackPool.hand_back_all()
