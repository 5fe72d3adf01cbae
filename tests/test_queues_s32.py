"""The Celery app's queues on a real Redis: each bound to its own name."""

import redis
from kombu import Producer

from shared.celery_app import BATCH_QUEUE, INTERACTIVE_QUEUE, make_celery
from shared.redis_server import RedisServer
from shared.settings import Settings


def test_each_queue_is_bound_to_an_exchange_and_key_of_its_own():
    # Both queues were bound to the default queue's exchange and key: a message sent to `interactive` that way
    # (Celery's defaults, another producer) went into the batch queue as well, to run twice.
    with RedisServer() as server:
        app = make_celery(Settings(redis_url=server.url))
        with app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in app.amqp.queues.values():
                queue(channel).declare()
            producer = Producer(channel)
            client = redis.Redis.from_url(server.url)
            for name, lengths in ((INTERACTIVE_QUEUE, (1, 0)), (BATCH_QUEUE, (1, 1))):
                queue = app.amqp.queues[name]
                producer.publish({"to": name}, exchange=queue.exchange, routing_key=queue.routing_key,
                                 serializer="json")
                assert (client.llen(INTERACTIVE_QUEUE), client.llen(BATCH_QUEUE)) == lengths, name
