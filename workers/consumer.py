"""The worker's Celery consumer: after a Redis outage it takes jobs again within a second of Redis's return.

Celery's consumer reaches the broker through kombu's `ensure_connection` with kombu's waits between
tries, 2, 4, 6 ... up to 30 seconds, and no setting changes them. After an outage of 13 s its next
try came 7 s after Redis was back, after one of a minute up to 30 s, while the API took submissions
at once and the worker's own loops (heartbeat, cancellations, sweep), which try every second, were
back too: the jobs waited in the queue for the consumer. This one tries every second, as they do;
a try is one connection to Redis.
"""

import functools

from celery.worker.consumer import Consumer as CeleryConsumer

RECONNECT_WAITS = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 1.0}


class Consumer(CeleryConsumer):
    """Celery's consumer, reconnecting to the broker with waits of at most a second (`RECONNECT_WAITS`)."""

    def ensure_connected(self, conn):
        conn.ensure_connection = functools.partial(conn.ensure_connection, **RECONNECT_WAITS)
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the instance's own, shadowing the method
