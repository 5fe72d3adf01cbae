"""One Redis pub/sub connection per API process, shared by every stream follower.

A subscription per follower would cost a Redis connection and a reader loop per streaming client.
Here one reader task reads every subscribed channel and hands each message to the queues of that
channel's followers. A channel's followers share one SUBSCRIBE: sent for the first (for the next, if
that fails), withdrawn after the last.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("llava_queue.api")

# How long a new follower waits for Redis to acknowledge its SUBSCRIBE. Past it, the follower goes on
# without: it re-reads the job record when a chunk is missing or the channel stays quiet.
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
# The pause before the reader tries again after losing its connection, doubled while Redis stays away.
RECONNECT_DELAY_SECONDS = 0.5
MAX_RECONNECT_DELAY_SECONDS = 4.0
# The most messages a follower's queue holds. A follower that falls this far behind (its client reads slowly) has
# them replaced by one None: it reads the job record instead, which holds the latest text.
MAX_BACKLOG = 256


class ServerStopping(Exception):
    """The API is shutting down: a follower's stream ends there, and its job goes on (clients follow it again, or poll
    it, on the API that takes over)."""


# What a follower's queue gets when the API shuts down (see ChannelHub.stop_followers).
STOPPING = object()


class _Channel:
    """The followers' queues of one channel, whether its SUBSCRIBE was sent, and whether Redis has acknowledged it."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue] = set()
        # Held by the follower sending the SUBSCRIBE: the others wait for it, then send it themselves if it failed.
        self.subscribing = asyncio.Lock()
        self.subscribed = False
        self.acknowledged = asyncio.get_running_loop().create_future()


class ChannelHub:
    """Hands the messages of subscribed channels to their followers, over one pub/sub connection.

    `start()` it on the running loop, `aclose()` it at shutdown.
    """

    def __init__(self, aredis: aioredis.Redis):
        self._pubsub = aredis.pubsub()
        self._channels: dict[str, _Channel] = {}
        # Two coroutines connecting the PubSub at once would each open a connection.
        self._connecting = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self.stopping = False

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="channel-hub-reader")

    async def aclose(self) -> None:
        self._reader.cancel()
        with suppress(asyncio.CancelledError):
            await self._reader
        await self._pubsub.aclose()

    def stop_followers(self) -> None:
        """At shutdown: every follower's queue gets STOPPING, and new subscriptions raise ServerStopping. A stream
        would otherwise hold the API up until its job ended (the server waits for its responses to finish)."""
        self.stopping = True
        for followers in self._channels.values():
            _put(followers, STOPPING)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue]:
        """A queue of `channel`'s message payloads, for the `with` block; None in it means some may have been lost
        (or dropped: it holds MAX_BACKLOG at most), STOPPING that the API is shutting down.

        Entered once Redis acknowledged the subscription (or after SUBSCRIBE_TIMEOUT_SECONDS), so
        whatever is published after entering is in the queue. Raises redis' ConnectionError when
        Redis cannot be reached, ServerStopping when the API is shutting down.
        """
        if self.stopping:
            raise ServerStopping
        queue = asyncio.Queue()
        followers = self._channels.setdefault(channel, _Channel())
        followers.queues.add(queue)
        try:
            async with followers.subscribing:
                # Sent once for all the channel's followers. One whose sending failed has left with the error: the
                # next sends it, else the channel's followers would follow it unsubscribed, each reading the record
                # every RESYNC_AFTER_SECONDS instead of getting its chunks.
                if not followers.subscribed:
                    try:
                        await self._connect()
                        await self._pubsub.subscribe(channel)
                    except AttributeError as exc:
                        # redis-py's PubSub, its connection dropped by the reader's failed read while this wrote on
                        # it: "'NoneType' object has no attribute 'writelines'". The connection is lost, as said.
                        raise RedisConnectionError(f"the pub/sub connection closed while subscribing: {exc}") from exc
                    followers.subscribed = True
            _, waiting = await asyncio.wait([followers.acknowledged], timeout=SUBSCRIBE_TIMEOUT_SECONDS)
            if waiting:
                log.warning("Redis did not acknowledge the subscription to %s in %s s", channel,
                            SUBSCRIBE_TIMEOUT_SECONDS)
            yield queue
        finally:
            followers.queues.discard(queue)
            if not followers.queues and self._channels.get(channel) is followers:
                del self._channels[channel]
                with suppress(RedisConnectionError, RedisTimeoutError):
                    # Unsent for want of a connection, it is resent by the reader (see _dispatch).
                    await self._pubsub.unsubscribe(channel)

    async def _connect(self) -> None:
        async with self._connecting:
            await self._pubsub.connect()

    async def _read(self) -> None:
        """Dispatch every message for as long as the hub runs, reconnecting whenever the connection fails.

        A reconnection (redis-py's own, or this loop's) subscribes every live channel again, and
        Redis acknowledges each again: _dispatch takes that as the sign that messages were lost.
        """
        delay = RECONNECT_DELAY_SECONDS
        while True:
            try:
                await self._connect()
                delay = RECONNECT_DELAY_SECONDS
                while True:
                    await self._dispatch(await self._pubsub.get_message(timeout=None))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("lost the pub/sub connection to Redis (%s); reconnecting in %s s", exc, delay)
            except Exception:
                log.exception("the pub/sub reader failed; restarting it in %s s", delay)
                # It may have dropped a message on its way out.
                self._tell_all_missed()
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_RECONNECT_DELAY_SECONDS)

    async def _dispatch(self, message: dict | None) -> None:
        """Hand a message to its channel's followers; note an acknowledged SUBSCRIBE."""
        if message is None or message["type"] not in ("message", "subscribe"):
            return
        channel = message["channel"]
        followers = self._channels.get(channel)
        if message["type"] == "message":
            if followers:
                _put(followers, message["data"])
        elif followers is None:
            # Subscribed again on reconnecting, though its last follower left (its UNSUBSCRIBE was lost).
            await self._pubsub.unsubscribe(channel)
        elif followers.acknowledged.done():
            # Subscribed again on reconnecting: what was published while disconnected is lost.
            _put(followers, None)
        else:
            followers.acknowledged.set_result(None)

    def _tell_all_missed(self) -> None:
        for followers in self._channels.values():
            _put(followers, None)


def _put(followers: _Channel, payload: str | object | None) -> None:
    for queue in followers.queues:
        if queue.qsize() >= MAX_BACKLOG and payload is not STOPPING:
            _drop_backlog(queue)
        queue.put_nowait(payload)


def _drop_backlog(queue: asyncio.Queue) -> None:
    """Replace what `queue` holds by None (some messages were lost), or by STOPPING when that is among them."""
    backlog = [queue.get_nowait() for _ in range(queue.qsize())]
    queue.put_nowait(STOPPING if any(payload is STOPPING for payload in backlog) else None)
