"""Engine slots kept for interactive jobs: a cap on the batch-queue jobs one worker runs at once.

A worker takes a job only when a task thread (an engine slot) is free, and then takes an
interactive job before a batch job. With every slot held by a batch job, an interactive job
still waits for one of them to end. With `LLAVA_QUEUE_BATCH_RESERVED_SLOTS` = R, the worker
stops reading the batch queue while it runs MAX_NUM_SEQS − R batch jobs, and reads it again
when one ends: R slots stay free for interactive jobs, at the cost of R slots of batch
throughput when no interactive job comes.
"""

import logging
import threading

from celery import bootsteps

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
    (`queues`: the batch queue for its model, and for any) at `limit`.

    Counting starts at receipt (in the consumer's own thread, before it fetches the next message),
    so a worker with free threads does not take more batch jobs in the moment before they start.
    """

    def __init__(self, limit: int, queues: tuple[str, ...]):
        self.limit = max(1, limit)
        self.queues = queues
        self.running = 0
        self.paused = False
        self._lock = threading.Lock()
        self._consumer = None

    def attach(self, consumer) -> None:
        """Use the worker's Celery consumer, each time it starts (`consumer_step`).

        Celery builds a new queue consumer, reading every queue, when it reconnects to the broker (after a Redis
        outage): a pause in force is applied to it at once. Attached once (at `worker_ready`), the worker read the
        batch queue again while at its limit, filled the slots kept for interactive jobs with batch jobs, and kept
        refilling them while a batch backlog lasted (the count never fell below the limit to resume and pause again).
        """
        self._consumer = consumer
        self._apply()

    def received(self, delivery_info: dict | None) -> None:
        """A job arrived (`task_received`, in the consumer's thread): count it if it is a batch job."""
        if (delivery_info or {}).get("routing_key") not in self.queues:
            return
        with self._lock:
            self.running += 1
            changed = self._update()
        if changed:
            self._apply()

    def ended(self, delivery_info: dict | None) -> None:
        """A job ended (`task_postrun`, in its task thread): below the limit again, the batch queues are read."""
        if (delivery_info or {}).get("routing_key") not in self.queues:
            return
        with self._lock:
            self.running -= 1
            changed = self._update()
        if changed:
            # The consumer belongs to the worker's event loop: change it there.
            self._consumer.call_soon(self._apply)

    def _update(self) -> bool:
        full = self.running >= self.limit
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
            log.debug("batch queues paused: %d batch jobs running", self.running)
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
