"""One Redis pub/sub connection per API process, shared by every stream follower.

A subscription per follower would cost a Redis connection and a reader loop per streaming client.
Here one reader task reads every subscribed channel and hands each message to the queues of that
channel's followers. A channel's followers share one SUBSCRIBE: sent by the first, withdrawn after the last.

The reader alone opens connections: a new one each time, on which it subscribes every channel followed at that
moment. A follower only writes its SUBSCRIBE on the reader's connection while that is up; while it is not, the
reader's next connection subscribes the follower's channel, and the follower waits for that attempt (its stream
ends "unavailable" when it fails). redis-py's PubSub reconnected inside any of its calls, the reader's read and
a follower's SUBSCRIBE each: two at once opened two sockets on one connection object, the SUBSCRIBE went out on
one while the reader read the other, and the channel's followers got no message (an eighteenth-session defect).
"""

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger("llava_queue.api")

# How long a new follower waits for Redis to acknowledge its SUBSCRIBE. Past it, the follower goes on
# without: it re-reads the job record when a chunk is missing or the channel stays quiet.
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
# The pause before the reader tries again after losing its connection, doubled while Redis stays away. A new
# follower cuts it short: it wants to know now whether Redis can be reached.
RECONNECT_DELAY_SECONDS = 0.5
MAX_RECONNECT_DELAY_SECONDS = 4.0
# After this long without a word from Redis, the reader sends a PING (answered even while subscribed), and takes the
# connection as lost when PING_ANSWER_INTERVALS more pass without one: a half-open connection (a partition, a NAT or
# firewall dropping the flow, a host gone without a reset) held every stream to the quiet tick's reads of its record
# for a quarter of an hour, or for ever. Found 3 to 4 s after its last word (a Redis stalled 2 s, by a fork or a large
# DEL, is not taken for gone; one running a long script answers BUSY); no PING while messages flow.
PING_INTERVAL_SECONDS = 1.0
PING_ANSWER_INTERVALS = 2
# Every this many seconds, the followers of a channel that had no message since the last tick get a None (2.5 to
# 5 s of quiet): they re-read the job record, in case a message was missed that the hub could not report (Redis
# away, a subscription never acknowledged). One timer for the hub, where a timeout around each follower's wait
# cost a timer per message relayed.
QUIET_TICK_SECONDS = 2.5
# The most messages a follower's queue holds. A follower that falls this far behind (its client reads slowly) has
# them replaced by one None: it reads the job record instead, which holds the latest text.
MAX_BACKLOG = 256


class ServerStopping(Exception):
    """The API is shutting down: a follower's stream ends there, and its job goes on (clients follow it again, or poll
    it, on the API that takes over)."""


# What a follower's queue gets when the API shuts down (see ChannelHub.stop_followers).
STOPPING = object()


class _Channel:
    """The followers' queues of one channel, and whether Redis has acknowledged its subscription."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue] = set()
        self.acknowledged = asyncio.get_running_loop().create_future()
        # A message came since the hub's last quiet tick (a new channel counts as heard: its first tick passes).
        self.heard = True


class ChannelHub:
    """Hands the messages of subscribed channels to their followers, over one pub/sub connection.

    `start()` it on the running loop, `aclose()` it at shutdown.
    """

    def __init__(self, aredis: aioredis.Redis):
        self._pool = aredis.connection_pool
        self._channels: dict[str, _Channel] = {}
        # The reader's connection while it is up; None while the reader connects or waits to.
        self._connection: AbstractConnection | None = None
        # Done once the reader's connection is lost (a follower waiting for an acknowledgement then waits on the next).
        self._lost = asyncio.get_running_loop().create_future()
        # The outcome of the reader's next attempt to connect, one that starts after now: None, or the error it failed
        # with. A follower that came while an attempt was under way waits on the next: the one under way may have
        # started before Redis took connections again.
        self._attempt = asyncio.get_running_loop().create_future()
        self._hurry = asyncio.Event()  # set by a follower that waits on the next attempt
        self._reader: asyncio.Task | None = None
        # The task that reads the reader's connection (see _read_all), and how many answers it has read in all.
        self._reading: asyncio.Task | None = None
        self._reads = 0
        self._ticker: asyncio.Task | None = None
        self.stopping = False

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="channel-hub-reader")
        self._ticker = asyncio.create_task(self._tick(), name="channel-hub-ticker")

    async def aclose(self) -> None:
        for task in (self._reader, self._ticker):
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    def stop_followers(self) -> None:
        """At shutdown: every follower's queue gets STOPPING, and new subscriptions raise ServerStopping. A stream
        would otherwise hold the API up until its job ended (the server waits for its responses to finish)."""
        self.stopping = True
        for followers in self._channels.values():
            _put(followers, STOPPING)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue]:
        """A queue of `channel`'s message payloads, for the `with` block; None in it means some may have been lost
        (or dropped: it holds MAX_BACKLOG at most), or that the channel has been quiet for QUIET_TICK_SECONDS or
        up to twice that (the record is to be read either way), STOPPING that the API is shutting down.

        Entered once Redis acknowledged the subscription (or after SUBSCRIBE_TIMEOUT_SECONDS), so
        whatever is published after entering is in the queue. Raises redis' ConnectionError when
        Redis cannot be reached, ServerStopping when the API is shutting down.
        """
        if self.stopping:
            raise ServerStopping
        queue = asyncio.Queue()
        followers = self._channels.get(channel)
        first = followers is None
        if first:
            followers = self._channels[channel] = _Channel()
        followers.queues.add(queue)
        try:
            if first and self._connection is not None:
                # Unsent, or failing (the connection is then closed), it is sent by the reader's next connection,
                # which subscribes every channel followed then.
                await self._send("SUBSCRIBE", channel)
            await self._until_acknowledged(channel, followers)
            yield queue
        finally:
            followers.queues.discard(queue)
            if not followers.queues and self._channels.get(channel) is followers:
                del self._channels[channel]
                # Unsent for want of a connection, it is not needed: the next connection subscribes the channels
                # followed then.
                await self._send("UNSUBSCRIBE", channel)

    async def _until_acknowledged(self, channel: str, followers: _Channel) -> None:
        """Wait, SUBSCRIBE_TIMEOUT_SECONDS at most, for Redis to acknowledge `channel`'s subscription, on the reader's
        connection or, when that is lost meanwhile, on its next (that attempt to connect is waited for to its end).
        Raises redis' ConnectionError when the attempt fails (or does not end in its own time): Redis cannot be
        reached. A connection that was up all along and left it unacknowledged is taken as lost: the reader connects
        again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUBSCRIBE_TIMEOUT_SECONDS
        connection = self._connection
        while not followers.acknowledged.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("Redis did not acknowledge the subscription to %s in %s s", channel,
                            SUBSCRIBE_TIMEOUT_SECONDS)
                if connection is not None and connection is self._connection:
                    # Up all along, it is lost, maybe one way only: messages for other channels still come, so the
                    # reader hears no silence. Cancelling its reads has the reader connect again.
                    self._reading.cancel()
                return
            if self._connection is None:
                await self._connected()
            else:
                await asyncio.wait([followers.acknowledged, self._lost], timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)

    async def _connected(self) -> None:
        """Return once the reader has connected; raise redis' ConnectionError if its next attempt fails.

        The attempt is waited for to its end, not for what is left of the follower's SUBSCRIBE_TIMEOUT_SECONDS: an
        attempt bounds itself (to as long, from its start), and one still under way is Redis slow to take a
        connection, not Redis away. A silent connection is found lost 3 to 4 s after its last word, so a follower
        that came just before had a second or less left for the attempt that followed; under load the attempt ran
        past that, and the follower's stream ended "the job store is unavailable", Redis up all along.
        """
        attempt = self._attempt
        self._hurry.set()
        try:  # slack for the reader's pause, cut short by the hurry, before the attempt starts
            error = await asyncio.wait_for(asyncio.shield(attempt), SUBSCRIBE_TIMEOUT_SECONDS + 1)
        except TimeoutError:
            raise RedisConnectionError(f"Redis did not take the pub/sub connection in {SUBSCRIBE_TIMEOUT_SECONDS} s")
        if error is not None:
            raise RedisConnectionError(f"the pub/sub connection could not be made: {error}") from error

    async def _send(self, *command: str) -> None:
        """Write `command` on the reader's connection if it is up; else (or if writing fails) drop it."""
        connection = self._connection
        # Checked right before the write, with no await between: redis-py connects a closed connection again
        # itself when asked to write on it, and only the reader may open one.
        if connection is None or not connection.is_connected:
            return
        with suppress(RedisConnectionError, RedisTimeoutError):
            await connection.send_command(*command, check_health=False)

    async def _read(self) -> None:
        """Dispatch every message for as long as the hub runs, on a new connection whenever the last one fails.

        Each connection subscribes every channel followed at the time, and Redis acknowledges each: _dispatch takes
        an acknowledgement after the first as the sign that messages were lost.
        """
        delay = RECONNECT_DELAY_SECONDS
        while True:
            connection = self._pool.make_connection()
            attempt, self._attempt = self._attempt, asyncio.get_running_loop().create_future()
            try:
                # Bounded: a Redis that takes the connection and never answers (a stopped process) held the reader
                # here for good.
                await asyncio.wait_for(connection.connect(), SUBSCRIBE_TIMEOUT_SECONDS)
            except asyncio.CancelledError:
                await connection.disconnect(nowait=True)
                raise
            except (RedisError, OSError) as exc:  # TimeoutError among them
                # Not only a connection refused: a Redis running a long script answers the connection's CLIENT SETNAME
                # with BUSY (a ResponseError), which ended the reader for good.
                log.warning("could not connect to Redis for pub/sub (%s); trying again in %s s",
                            exc if str(exc) else f"no answer in {SUBSCRIBE_TIMEOUT_SECONDS} s", delay)
                attempt.set_result(exc)
                await connection.disconnect(nowait=True)
                await self._pause(delay)
                delay = min(2 * delay, MAX_RECONNECT_DELAY_SECONDS)
                continue
            delay = RECONNECT_DELAY_SECONDS
            # With no await from here to the reads' start, every channel is either in their first write, a SUBSCRIBE,
            # or subscribed by its own first follower on this connection.
            self._connection, self._lost = connection, asyncio.get_running_loop().create_future()
            self._reading = reading = asyncio.create_task(self._read_all(connection, list(self._channels)),
                                                          name="channel-hub-reads")
            # Those that came while it connected are in that SUBSCRIBE too.
            for waiting in (attempt, self._attempt):
                waiting.set_result(None)
            self._attempt = asyncio.get_running_loop().create_future()
            try:
                await self._watch(reading)
            except Exception as exc:
                if isinstance(exc, (RedisConnectionError, RedisTimeoutError)) or not connection.is_connected:
                    # Closed under the reads by a follower's failed write, redis-py's read fails with whatever
                    # it finds missing (AttributeError): the connection was lost all the same. The error's name and
                    # message, since redis-py's repr of its errors leaves the message out.
                    log.warning("lost the pub/sub connection to Redis (%s: %s); reconnecting in %s s",
                                type(exc).__name__, exc, delay)
                else:
                    log.exception("the pub/sub reader failed; restarting it in %s s", delay)
                    self._tell_all_missed()  # it may have dropped a message on its way out
            finally:
                reading.cancel()
                self._connection = None
                self._lost.set_result(None)
                await connection.disconnect(nowait=True)
            await self._pause(delay)

    async def _read_all(self, connection: AbstractConnection, channels: list[str]) -> None:
        """Subscribe `channels` on `connection`, then dispatch whatever it reads until it fails."""
        if channels:
            await connection.send_command("SUBSCRIBE", *channels, check_health=False)
        while True:
            try:
                message = await connection.read_response(timeout=math.inf, push_request=True)
            except ResponseError:  # an error reply (a PING answered BUSY while a script runs): Redis is there
                self._reads += 1
                continue
            self._reads += 1
            await self._dispatch(connection, message)

    async def _watch(self, reading: asyncio.Task) -> None:
        """Wait while `reading` (a _read_all) reads its connection. Raises what it failed with, or redis' TimeoutError
        when the connection went silent or a follower cancelled the reads (its subscription went unacknowledged).

        Looked at every PING_INTERVAL_SECONDS from here: a timeout around each read cost a timer per message relayed.
        """
        silent, reads = 0, self._reads  # intervals with nothing read
        answer_seconds = PING_ANSWER_INTERVALS * PING_INTERVAL_SECONDS
        while not reading.done():
            await asyncio.wait([reading], timeout=PING_INTERVAL_SECONDS)
            if self._reads != reads or reading.done():
                silent, reads = 0, self._reads
                continue
            silent += 1
            if silent > 1 + PING_ANSWER_INTERVALS:
                raise RedisTimeoutError(f"no answer to a PING in {answer_seconds} s")
            if silent == 1:
                try:  # its answer may come while it is written: counted from before
                    await asyncio.wait_for(self._send("PING"), answer_seconds)
                except TimeoutError:  # the socket's buffer full: nothing goes out, nothing comes back
                    raise RedisTimeoutError(f"a PING could not be written in {answer_seconds} s") from None
        if reading.cancelled():
            raise RedisTimeoutError(f"a subscription was not acknowledged in {SUBSCRIBE_TIMEOUT_SECONDS} s")
        reading.result()

    async def _tick(self) -> None:
        """Every QUIET_TICK_SECONDS, a None to the followers of each channel that had no message since the last."""
        while True:
            await asyncio.sleep(QUIET_TICK_SECONDS)
            for followers in list(self._channels.values()):
                if not followers.heard:
                    _put(followers, None)
                followers.heard = False

    async def _pause(self, delay: float) -> None:
        """Wait `delay` seconds, or less if a follower asks for a connection meanwhile."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), delay)
        self._hurry.clear()

    async def _dispatch(self, connection: AbstractConnection, message: list) -> None:
        """Hand a message to its channel's followers; note an acknowledged SUBSCRIBE."""
        if not isinstance(message, list) or len(message) < 3:
            return  # a PING's answer ("PONG", or ["pong", ""] when subscribed on RESP2), among others
        kind, channel = _text(message[0]), _text(message[1])
        followers = self._channels.get(channel)
        if kind == "message":
            if followers:
                followers.heard = True
                _put(followers, _text(message[2]))
        elif kind != "subscribe":
            return
        elif followers is None:
            # Its last follower left after this connection's SUBSCRIBE went out.
            await connection.send_command("UNSUBSCRIBE", channel, check_health=False)
        elif followers.acknowledged.done():
            # Subscribed again on a new connection: what was published while there was none is lost.
            _put(followers, None)
        else:
            followers.acknowledged.set_result(None)

    def _tell_all_missed(self) -> None:
        for followers in self._channels.values():
            _put(followers, None)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _put(followers: _Channel, payload: str | object | None) -> None:
    for queue in followers.queues:
        if queue.qsize() >= MAX_BACKLOG and payload is not STOPPING:
            _drop_backlog(queue)
        queue.put_nowait(payload)


def _drop_backlog(queue: asyncio.Queue) -> None:
    """Replace what `queue` holds by None (some messages were lost), or by STOPPING when that is among them."""
    backlog = [queue.get_nowait() for _ in range(queue.qsize())]
    queue.put_nowait(STOPPING if any(payload is STOPPING for payload in backlog) else None)
