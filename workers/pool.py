"""The worker's Celery pool: Celery's thread pool, whose cold shutdown hands the running jobs back; and the job
task's request, whose revoke with terminate cancels that job alone."""

from collections.abc import Callable

from celery.concurrency.thread import TaskPool
from celery.worker.request import Request


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


class _KillsNothing:
    """The pool a revoked job's request is terminated on: a task thread cannot be killed, and the job is cancelled by
    the worker's `task_revoked` handler instead (workers/main.py)."""

    @staticmethod
    def terminate_job(pid: int, signal: int | None = None) -> None:
        pass


class JobRequest(Request):
    """The request of a job's task: `revoke(id, terminate=True)` (Flower's Terminate, `celery control revoke
    --terminate`) ends that job cancelled and no other.

    Celery terminates a running task through its pool's `terminate_job`, given the process id alone, the same call
    as a cold shutdown's: with every task a thread of this one process, the pool's handed every running job back,
    and the revoked one, its new message discarded by the worker that remembered the revoke, stayed "running" for
    hours, sent again by the orphan sweep every minute. Here the pool is left alone; Celery still acks the message
    and announces the revoke, and the worker's `task_revoked` handler cancels the job, which leaves its batch at the
    next step.
    """

    def terminate(self, pool, signal=None):
        super().terminate(_KillsNothing(), signal)
