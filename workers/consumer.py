"""The worker's Celery consumer: after a Redis outage it takes jobs again within a second of Redis's return.

Celery's consumer reaches the broker through kombu's `ensure_connection` with kombu's waits between
tries, 2, 4, 6 ... up to 30 seconds, and no setting changes them. After an outage of 13 s its next
try came 7 s after Redis was back, after one of a minute up to 30 s, while the API took submissions
at once and the worker's own loops (heartbeat, cancellations, sweep), which try every second, were
back too: the jobs waited in the queue for the consumer. This one tries every second, as they do;
a try is one connection to Redis. Celery logs an error at each failed try: at one a second, one in
`LOG_EVERY_SECONDS` is kept, about as often as it logged them before. And at each lost connection it
warned, in six lines, that Celery 6 will cancel the running jobs by default: the app says False outright
(`shared/celery_app.py`), so that warning is not shown.
"""

import functools
import logging
import warnings

from celery.exceptions import CPendingDeprecationWarning
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.consumer import CONNECTION_ERROR
from celery.worker.consumer.consumer import logger as celery_consumer_log

from shared.logs import Throttle

RECONNECT_WAITS = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 1.0}
LOG_EVERY_SECONDS = 30.0


class Consumer(CeleryConsumer):
    """Celery's consumer, reconnecting to the broker with waits of at most a second (`RECONNECT_WAITS`)."""

    def ensure_connected(self, conn):
        conn.ensure_connection = functools.partial(conn.ensure_connection, **RECONNECT_WAITS)
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the instance's own, shadowing the method


class OnceInAWhile(logging.Filter):
    """Keeps the consumer's "Cannot connect" errors one in `seconds`: the first of an outage, then one in each
    `seconds` while it lasts. Every other record passes."""

    def __init__(self, seconds: float = LOG_EVERY_SECONDS):
        super().__init__()
        self._throttle = Throttle(seconds)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != CONNECTION_ERROR or self._throttle.due() is not None


celery_consumer_log.addFilter(OnceInAWhile())
warnings.filterwarnings("ignore", r"\s*In Celery 5\.1 we introduced an optional breaking change",
                        CPendingDeprecationWarning)
