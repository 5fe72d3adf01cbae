"""The Celery app on Redis: JSON only, late acks, redelivery of jobs whose worker died, two queues (and their
per-model variants: `task_queue`)."""

import re
from urllib.parse import urlsplit

import redis
from celery import Celery
from kombu import Queue
from kombu.transport import redis as kombu_redis

from shared.settings import Settings, get_settings

GENERATE_TASK = "llava_queue.generate"
INTERACTIVE_QUEUE = "interactive"
BATCH_QUEUE = "batch"
# Characters a queue name does not hold as they are: commas (the worker's -Q option splits on them), whitespace
# (a name in logs, Flower and redis-cli that reads as two), and "%", the escape itself.
_ESCAPED = re.compile(r"[\s,%]")


def _escape(match: re.Match) -> str:
    """A character of `_ESCAPED` as URLs write it: "%XX" for each of its UTF-8 bytes."""
    return "".join(f"%{byte:02X}" for byte in match[0].encode())


def task_queue(queue: str, model: str | None = None) -> str:
    """The Celery queue of a job's task: `queue` ("interactive" or "batch") for a job that names no model,
    `queue.<model>` for one that does, which only workers serving that model read. Whitespace, commas and "%" in
    the name are percent-encoded, so two models never share a queue (with "_" for each, "a b" and "a_b" did, and
    a worker of one ran the other's jobs); other names are as they were."""
    return f"{queue}.{_ESCAPED.sub(_escape, model)}" if model else queue


def worker_queues(model: str) -> list[str]:
    """The queues a worker serving `model` reads, in the order it takes from them: interactive jobs for its
    model, then for any model, then batch jobs the same way."""
    return [task_queue(INTERACTIVE_QUEUE, model), INTERACTIVE_QUEUE, task_queue(BATCH_QUEUE, model), BATCH_QUEUE]


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel with one client for its commands outside the event loop, instead of one per command.

    kombu builds a new `redis.Redis` over the channel's connection pool for every such command: each
    message a worker takes (recorded among the unacked), each ack, each publish. redis-py spends about
    120 µs building one (its table of response callbacks), on the worker's consumer thread, the one
    thread that takes every job, and on every submission in the API. A client holds no connection
    of its own (each command takes one from the pool), so one per pool serves them all.
    """

    _sync_client = None

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._sync_client
        # The channel's pool is None once the channel closed (or after a fork) until asked for again; a client's
        # pool, disconnected, connects again when used.
        if client is not None and (self._pool is None or client.connection_pool is self._pool):
            return client
        if self._pool is None and getattr(self.connection, "client", None) is None:
            # Closed with its connection (Redis went away): kombu's own client would need a pool built from the
            # connection's address, gone, and raised AttributeError, which Celery takes for an unrecoverable error:
            # the worker's consumer died, and the worker took no job again. A connection error it recovers from.
            raise redis.ConnectionError("the broker connection is closed")
        client = self._sync_client = super()._create_client()  # a new pool after a reconnect: a client of it
        return client


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, on `_Channel`."""

    Channel = _Channel


def make_celery(settings: Settings) -> Celery:
    """A Celery app whose broker is `settings.redis_url`; tasks carry only job ids (JSON)."""
    app = Celery("llava_queue", broker=settings.redis_url)
    if urlsplit(settings.redis_url).scheme == "redis":
        # Plain redis:// only: a transport named outright takes the place of the URL's scheme, and kombu reads
        # TLS (rediss://), sockets and Sentinel from the scheme; those keep kombu's own transport.
        app.conf.broker_transport = f"{__name__}:RedisTransport"
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # results live in the job record, not in Celery's backend
        # Ack after the job ends, and put it back if the worker dies while holding it.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Reserve no more than the engine's free slots; the worker's concurrency is its slot count.
        # Without prefetch a worker takes a message only when a task thread (an engine slot) is
        # free, and it then polls the queues in the order declared: an interactive job waiting
        # goes before every queued batch job (kombu's "priority" order; its default rotates).
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout,
                                  "queue_order_strategy": "priority"},
        broker_connection_retry_on_startup=True,
        # A worker reconnects to Redis for as long as Redis is away, as its other loops wait for it: after Celery's
        # default 100 tries (about 46 minutes) the worker exited, with status 0, and took no job again.
        broker_connection_max_retries=None,
        task_queues=(Queue(INTERACTIVE_QUEUE), Queue(BATCH_QUEUE)),
        task_default_queue=INTERACTIVE_QUEUE,
        worker_hijack_root_logger=False,
        # Task events only when asked (settings.task_events): Flower asks for them itself. Worker events
        # (heartbeats, online, offline) are always sent, so Flower lists the workers either way.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    return app


celery_app = make_celery(get_settings())
