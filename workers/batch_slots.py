"""When a worker reads its batch queues: not while it runs its share of batch jobs, nor while its engine is full.

A worker takes a job only when a task thread (an engine slot) is free, and then takes an
interactive job before a batch job. With every slot held by a batch job, an interactive job
still waits for one of them to end. With `LLAVA_QUEUE_BATCH_RESERVED_SLOTS` = R, the worker
stops reading the batch queue while it runs MAX_NUM_SEQS − R batch jobs, and reads it again
when one ends: R slots stay free for interactive jobs, at the cost of R slots of batch
throughput when no interactive job comes.

A free slot is not room in the engine: it runs what its KV budget (MAX_BATCH_TOKENS) holds, and the jobs beyond wait
in it. A batch job taken then waited there, behind jobs of minutes, while another worker (a second replica, one back
from a restart) idled. So while jobs wait in its engine for room the worker does not read its batch queues either:
the one job waiting is admitted as soon as room comes, and the batch jobs after it are left to whichever worker has
room first. Interactive jobs are still taken: they go before the waiting batch jobs in the engine.
"""

import logging
import threading

from celery import bootsteps
from celery.worker import state

log = logging.getLogger("llava_queue.worker")

# How long one poll of the queues waits for a message (kombu's BRPOP timeout) while the batch queues are paused.
# A poll reads the queues it was sent for until a message comes or it times out (kombu's 1 s), so the batch queues,
# read again at a batch job's end, were read only after the poll of the interactive queues then waiting had timed
# out: the freed slot stood empty for the rest of that second (0.43 s median, 0.75 s at most, between a batch job's
# end and the next one's start, at 3 batch jobs of 4 s; 0.02 s with no slots kept). Short polls while paused (a
# Redis round trip every 50 ms of a worker busy with its batch) bound that wait.
PAUSED_POLL_SECONDS = 0.05


class BatchSlots:
    """Counts this worker's batch jobs from their receipt to their end, and pauses its batch-queue consumers
    (`queues`: the batch queues of its budget, of its model and of any) at `limit`, and while requests wait in the
    engine for room (`engine_waits`).

    Counting starts at receipt (in the consumer's own thread, before it fetches the next message),
    so a worker with free threads does not take more batch jobs in the moment before they start.
    A job counted is one of Celery's requests; it ends when its task has run (`ended`), or when Celery lets it go
    without running it (`dropped`; or, where Celery says nothing, once it has handled the message: `received`).
    """

    def __init__(self, limit: int, queues: tuple[str, ...]):
        self.limit = max(1, limit)
        self.queues = queues
        self.paused = False
        # Whether requests wait in the engine for room, as of its last step (`engine_waits`).
        self.engine_full = False
        self._jobs: set = set()  # the batch requests counted (Celery's Request objects)
        self._lock = threading.Lock()
        self._consumer = None

    @property
    def running(self) -> int:
        return len(self._jobs)

    def attach(self, consumer) -> None:
        """Use the worker's Celery consumer, each time it starts (`consumer_step`).

        Celery builds a new queue consumer, reading every queue, when it reconnects to the broker (after a Redis
        outage): a pause in force is applied to it at once. Attached once (at `worker_ready`), the worker read the
        batch queue again while at its limit, filled the slots kept for interactive jobs with batch jobs, and kept
        refilling them while a batch backlog lasted (the count never fell below the limit to resume and pause again).
        Requests waiting for their countdown are dropped by Celery as it reconnects: they are no longer counted.
        """
        self._consumer = consumer
        with self._lock:
            self._forget_dropped()
            self._update()
        self._apply()

    def received(self, request) -> None:
        """A job arrived (`task_received`, in the consumer's thread): count it if it is a batch job.

        Celery may still let its message go once this returns, with no signal of its own: an ETA that parses but
        does not convert to a timestamp (a foreign client's) is logged and rejected. Counted until the next message
        received, at its limit the worker read no batch queue until an interactive job came. So once Celery has
        handled the message, in the consumer's next turn, the requests it let go are no longer counted."""
        with self._lock:
            self._forget_dropped()
            batch = (request.delivery_info or {}).get("routing_key") in self.queues
            if batch:
                self._jobs.add(request)
            changed = self._update()
        if changed:
            self._apply()
        if batch:
            self._consumer.call_soon(self._settle)

    def _settle(self) -> None:
        with self._lock:
            self._forget_dropped()
            changed = self._update()
        if changed:
            self._apply()

    def ended(self, task_id: str) -> None:
        """A job's task ended (`task_postrun`, in its task thread): below the limit again, the batch queues are
        read."""
        with self._lock:
            # Started: a message of the same job received since (delivered again) is still to run.
            ran = next((request for request in self._jobs if request.id == task_id and request.time_start), None)
            self._jobs.discard(ran)
            changed = self._update()
        if changed:
            # The consumer belongs to the worker's event loop: change it there.
            self._consumer.call_soon(self._apply)

    def dropped(self, task_id: str) -> None:
        """Celery revoked a task (`task_revoked`): a batch job of that id that it discarded before it ran (revoked or
        expired while it waited for its countdown) will end no task, and is no longer counted. Counted, it held its
        slot for good: at its limit the worker never read the batch queue again. A task revoked as it runs
        (terminated) is still counted: it ends when its task does."""
        with self._lock:
            self._forget_dropped(task_id)
            changed = self._update()
        if changed:
            self._consumer.call_soon(self._apply)

    def _forget_dropped(self, task_id: str | None = None) -> None:
        """Stop counting the requests (of `task_id`, or all) that never started and that Celery no longer holds,
        neither reserved for the pool nor waiting for their countdown: they will never run. All of them only in the
        consumer's thread, where a request received is reserved before anything else runs there."""
        self._jobs -= {request for request in self._jobs
                       if (task_id is None or request.id == task_id) and not request.time_start
                       and request not in state.reserved_requests and request not in state.scheduled_requests}

    def engine_waits(self, waiting: bool) -> None:
        """After each step of the engine (in its thread): whether requests wait in it for room. While some do, the
        batch queues are not read."""
        if waiting == self.engine_full:
            return
        with self._lock:
            self.engine_full = waiting
            changed = self._update()
        if changed:
            self._consumer.call_soon(self._apply)

    def _update(self) -> bool:
        full = len(self._jobs) >= self.limit or self.engine_full
        if full == self.paused or self._consumer is None:
            return False
        self.paused = full
        return True

    def _apply(self) -> None:
        """Make the consumer match `paused` (callbacks may run in any order: each applies the latest state).

        A batch message already on its way when the consumer pauses is handed back to the queue by
        kombu, which has no consumer for it.
        """
        task_consumer = self._consumer.task_consumer
        with self._lock:
            paused = self.paused
        # The queues it reads, or will read once it starts consuming (one built anew at a reconnect has not yet).
        consuming = any(queue.name == self.queues[0] for queue in task_consumer.queues)
        if paused and consuming:
            for queue in self.queues:
                task_consumer.cancel_by_queue(queue)
            log.debug("batch queues paused: %d batch jobs running, %s", self.running,
                      "jobs waiting in the engine" if self.engine_full else "none waiting in the engine")
        elif not paused and not consuming:
            # Added after the interactive queues, in order, so they are still polled interactive first.
            for queue in self.queues:
                task_consumer.add_queue(self._consumer.app.amqp.queues[queue])
            task_consumer.consume()
        _poll_for(task_consumer, PAUSED_POLL_SECONDS if paused else None)


def _poll_for(task_consumer, seconds: float | None) -> None:
    """Make the polls of the consumer's channel wait at most `seconds` for a message (None: the transport's own
    wait). Only kombu's Redis channel polls that way (`brpop_timeout`); any other is left as it is."""
    channel = getattr(task_consumer, "channel", None)
    if channel is None or not hasattr(channel, "brpop_timeout"):
        return
    channel.brpop_timeout = seconds if seconds is not None else getattr(channel.connection, "brpop_timeout", 1)


def consumer_step(slots: BatchSlots) -> type[bootsteps.StartStopStep]:
    """A Celery consumer bootstep that attaches `slots` to the consumer each time its queue consumer is built (at
    start-up and after every reconnect to the broker), before it takes a message. Add it to
    `app.steps["consumer"]` before the worker starts."""

    class BatchSlotsStep(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, consumer):
            slots.attach(consumer)

    return BatchSlotsStep
