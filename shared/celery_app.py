"""The Celery app on Redis: JSON only, late acks, redelivery of jobs whose worker died, two queues (and their
per-model variants: `task_queue`)."""

import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from queue import Empty
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from celery import Celery
from kombu import Exchange, Queue, serialization
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from shared.batches import FINAL_STATUSES as BATCH_FINAL_STATUSES, BatchStore
from shared.jobs import (DAMAGED_ERROR, FINAL_STATES, QUEUES, Ending, JobStore, WorkerRegistry, answers_later,
                         glob_escaped, wrong_type)
from shared.protocol import ErrorCode
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


def worker_queues(model: str, max_batch_tokens: int | None = None) -> list[str]:
    """The queues a worker serving `model` reads, in the order it takes from them: interactive jobs for its
    model, then for any model, then batch jobs the same way; with its engine's `max_batch_tokens`, first of each kind
    those sent to the workers of its model with that budget (`budget_queue`)."""
    return [queue for kind in (INTERACTIVE_QUEUE, BATCH_QUEUE)
            for queue in ([budget_queue(kind, model, max_batch_tokens)] if max_batch_tokens else [])
            + [task_queue(kind, model), kind]]


def budget_queue(queue: str, model: str, max_batch_tokens: int) -> str:
    """The Celery queue of a job sent to the workers of `model` whose engine's KV budget (MAX_BATCH_TOKENS) is
    `max_batch_tokens`: one that needs more than the budget of the worker that took it (workers/generation.py).
    It is the model's queue and "%kv<budget>": a model's name, escaped there, holds "%" only before two hex digits,
    so no model's queue is one of these."""
    return f"{task_queue(queue, model)}%kv{max_batch_tokens}"


# Hash of delivery tag → the registry key of the worker that took the message (`message_holder`); kombu keeps the
# message itself in its "unacked" hash until the ack. A worker SIGKILLed between taking a message and starting its job
# left the job "queued" and the message there until kombu restored it past the visibility timeout (4 h): the orphan
# sweep restores the messages of workers gone at once (`restore_messages_of_gone_workers`).
MESSAGE_HOLDERS_KEY = "unacked_holders"


class _QoS(kombu_redis.QoS):
    """kombu's Redis QoS that records which worker holds each message it takes, in the transaction that records the
    message among the unacked, and forgets it with that record (ack, reject, restore)."""

    def append(self, message, delivery_tag):
        holder = self.channel.message_holder
        if not holder:
            return super().append(message, delivery_tag)
        # kombu's append, with the holder in its transaction.
        delivery = message.delivery_info
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}) \
                .hset(self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"],
                                                             delivery["routing_key"]])) \
                .hset(MESSAGE_HOLDERS_KEY, delivery_tag, holder) \
                .execute()
        virtual.QoS.append(self, message, delivery_tag)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        return super()._remove_from_indices(delivery_tag, pipe).hdel(MESSAGE_HOLDERS_KEY, delivery_tag)


@contextmanager
def _broker_channel(app: Celery) -> Iterator["_Channel"]:
    """The default channel of one of the app's pooled broker connections (no new connection at every sweep or
    send), connected (kombu's OperationalError when Redis cannot be reached)."""
    with app.connection_or_acquire() as connection:
        connection.ensure_connection(max_retries=1)
        yield connection.default_channel


def restore_messages_of_gone_workers(app: Celery) -> list[str]:
    """Put each message that a worker took and has not acknowledged back at the head of its queue when that worker's
    registry key is gone (it died, or left without giving it back); returns their delivery tags.

    Each is kombu's own restore, one transaction (WATCH on the unacked hash): the message leaves it and enters its
    queue together, so a sweep that dies midway loses none, and two sweeps never put one back twice. A job whose
    message comes back twice (its holder was alive after all, or had started it) still runs once: `JobStore.start`
    skips the second start as a duplicate; a worker of another model than the one that started it skips it too (the
    sweep's claim sent it to its model's queue).
    """
    with _broker_channel(app) as channel:
        held = channel.client.hgetall(MESSAGE_HOLDERS_KEY)
        if not held:
            return []
        holders = sorted(set(held.values()))
        gone = {holder for holder, info in zip(holders, channel.client.mget(holders)) if info is None}
        tags = [bytes_to_str(tag) for tag, holder in held.items() if holder in gone]
        for tag in tags:
            channel.qos.restore_by_tag(tag)
        return tags


# A task message's header: when its job joined the queue (seconds since the epoch; 0 for a job handed back, which goes
# before all). A worker takes, of its queues of one kind (interactive, batch), from the one whose next message is the
# oldest (`_Channel._brpop_start`).
ENQUEUED_AT_HEADER = "enqueued_at"


def send_many(app: Celery, jobs: list[tuple[str, str]], clock: Callable[[], float]) -> None:
    """Send the Celery task of each (already recorded) (job id, Celery queue: `task_queue`), pipelined: one
    Redis round trip per few hundred jobs.

    The message is the one `send_task` builds (JSON, the job id as its only argument and as the
    task id), published without the per-message queue declaration and task-sent event that make
    `send_task` cost a millisecond each (Flower lists a job's task once a worker receives it). `clock` times the
    messages (the `enqueued_at` header): the job store's (`JobStore.clock`), on which the records' `created_at` are,
    that the lost-task sweep compares the header with (an API's own clock minutes ahead made every job queued a minute
    look lost); no default, so that no sender stamps its own host's time by leaving it out.
    """
    if not jobs:
        return
    now = clock()
    with app.producer_or_acquire() as producer, producer.batch(max_size=500):
        for job_id, queue in jobs:
            headers, properties, body = _task_message(app, job_id, now)
            producer.publish(body, exchange="", routing_key=queue, serializer="json", headers=headers,
                             declare=[], retry=False, delivery_mode=2, **properties)


def _task_message(app: Celery, job_id: str, enqueued_at: float) -> tuple[dict, dict, tuple]:
    """The headers, properties and body of a job's task message, as `send_task` builds them (the job id as its only
    argument and as the task id), with ENQUEUED_AT_HEADER."""
    headers, properties, body, _ = app.amqp.as_task_v2(job_id, GENERATE_TASK, args=[job_id],
                                                       argsrepr=f"['{job_id}']", kwargsrepr="{}")
    headers[ENQUEUED_AT_HEADER] = enqueued_at
    return headers, properties, body


def send_first(app: Celery, job_id: str, queue: str) -> None:
    """Send a job's task (the message `send_many` sends) to the head of its Celery queue, where the next worker to
    read the queue takes it: for a job that had started and was handed back (a worker told to stop, an engine that
    stopped) or whose worker died (its clients are mid-stream; at the tail it waited behind every job queued since),
    and for one whose message was lost (`resend_lost_tasks`: it has waited its turn).
    kombu pushes a message at the tail (LPUSH) and workers take from the head (BRPOP); its own restore of an unacked
    message pushes at the head (RPUSH), as this does; its ENQUEUED_AT_HEADER, 0, puts its queue before the worker's
    others of its kind."""
    with _broker_channel(app) as channel:
        _push_first(app, channel, job_id, queue)


def _push_first(app: Celery, channel: "_Channel", job_id: str, queue: str) -> None:
    """`send_first` on a broker channel already taken."""
    headers, properties, body = _task_message(app, job_id, 0.0)
    content_type, content_encoding, data = serialization.dumps(body, serializer="json")
    # What Producer.publish builds for the anonymous exchange, then kombu's _put, at the other end of the list.
    message = channel.prepare_message(data, 0, content_type, content_encoding, headers,
                                      dict(properties, delivery_mode=2))
    channel._inplace_augment_message(message, "", queue)
    channel.client.rpush(channel._q_for_pri(queue, 0), dumps(message))


def resend_lost_tasks(app: Celery, store: JobStore, older_than: float, limit: int = 200) -> list[str]:
    """Send again the task of each job queued for `older_than` seconds or more whose message is nowhere: not in its
    Celery queue and held by no worker (kombu's unacked hash); returns their ids.

    A job's message is lost where an API died between writing the job's record and sending its task, where Redis
    refused the write that would have failed the job after a failed send, and where a worker died between taking the
    message (BRPOP) and recording it among the unacked (kombu's own window): the job stayed `queued` for good. Among
    the `limit` oldest jobs of each queue. A queue is read by its next messages only (one per priority list): a job's
    message is not in it when the oldest of them joined the queue (ENQUEUED_AT_HEADER) more than `older_than` seconds
    after the job was recorded, since a queue's messages go in the order they came; otherwise (a message without the
    header, a hand-back's 0) the job is left for a later sweep. (It was judged only once its queue was empty: a lost
    message in a deep queue was sent again once every job queued after it had been taken.) A lost job's message goes
    to the head of its queue (`send_first`: it has waited its turn). A message sent twice (one was being taken as this
    looked, one was sent over `older_than` seconds late) runs its job once: `JobStore.start` skips the second start.
    The line of a batch whose file is still being read is left out: its task is sent once the whole file has been read
    (api/batch_intake.py), and a batch whose file cannot be read to the end runs none of its lines. (A file read over
    `older_than` had its first lines sent here and run while the rest was read, and run in full if the API died.) One
    whose reader died is failed as abandoned here, as a read of it would fail it, and its lines end with it.
    A line of a batch that ended (or went) before it did is cancelled instead, whether its message is lost or not
    (`_cancel_lines_of_ended_batches`).
    """
    now = store.clock()  # the records' created_at are on it (a worker's own clock could be minutes off)
    candidates: list[tuple[str, str, float, str | None]] = []
    damaged: list[str] = []
    let_go: set[str] = set()
    for queue in QUEUES:
        job_ids = store.redis.zrange(store.queue_key(queue), 0, limit - 1)
        with store.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(store.key(job_id), ("status", "created_at", "model", "batch", "batch_line"))
            # A record that is no hash (written by hand) answers WRONGTYPE: raised, it failed every sweep (logged as
            # an outage), and no lost job of any queue was sent again.
            records = pipe.execute(raise_on_error=False)
        for job_id, record in zip(job_ids, records):
            if wrong_type(record):
                damaged.append(job_id)
                continue
            created_at = _queued_since(job_id, record)
            if created_at is not None and now - created_at >= older_than:
                candidates.append((job_id, task_queue(queue, record[2] or None), created_at, record[3]))
                if record[3] is None and record[4] is not None:
                    let_go.add(job_id)  # a line its batch let go of (_ADD_LINES, _END_LINES: shared/batches.py)
    batches = sorted({batch for *_, batch in candidates if batch})
    statuses: dict[str, object] = {}
    if batches:
        with store.redis.pipeline(transaction=False) as pipe:
            for batch in batches:
                pipe.hget(f"{store.batch_prefix}{batch}", "status")
            statuses = dict(zip(batches, pipe.execute(raise_on_error=False)))
        # A batch whose key holds another type than a hash (a key SET by hand) is a failed one to every read of it
        # (`DamagedBatch`, a 500 that says so): its lines, sent as lost, ran for nobody (and failed as they ended).
        statuses.update({batch: "damaged" for batch, status in statuses.items()
                         if wrong_type(status)})
    # A batch whose reader (an API process) died, as a read of it would: failed as abandoned, its lines ended with it
    # (`BatchStore.fail`). Left `validating` until someone read it, its lines waited here, queued, until their deadline.
    read = [batch for batch, status in statuses.items() if status in ("validating", "cancelling")]
    failed, damaged_lines = BatchStore(store, store.ttl_seconds).fail_abandoned(read) if read else ([], [])
    abandoned = set(failed) | {damage.batch_id for damage in damaged_lines}
    for batch in sorted(failed):
        log.warning("batch %s: the API process reading its file stopped before its end (its lease lapsed); ended as "
                    "abandoned by the lost-task sweep, its lines cancelled", batch)
    for damage in damaged_lines:
        log.warning("%s; ended as abandoned by the lost-task sweep (the API process reading its file stopped), its "
                    "lines left to end as they are swept", damage.message)
    candidates = _cancel_lines_of_ended_batches(store, [candidate for candidate in candidates
                                                        if candidate[3] not in abandoned], statuses, let_go)
    candidates = [candidate for candidate in candidates if statuses.get(candidate[3]) != "validating"]
    if damaged:
        _end_damaged(store, damaged)
    if not candidates:
        return []
    with _broker_channel(app) as channel:
        names = sorted({celery_queue for _, celery_queue, _, _ in candidates})
        with channel.client.pipeline(transaction=False) as pipe:
            for name in names:
                for priority in channel.priority_steps:
                    pipe.lindex(channel._q_for_pri(name, priority), -1)  # the next message a worker takes
            heads = pipe.execute()
        steps = len(channel.priority_steps)
        # When the oldest message of each queue joined it (None: the queue is empty).
        oldest = {name: min((_enqueued_at(head) for head in heads[index * steps:(index + 1) * steps]
                             if head is not None), default=None) for index, name in enumerate(names)}
        taken = {_task_id(raw) for raw in channel.client.hvals(channel.unacked_key)}
        lost = [(job_id, name, created_at) for job_id, name, created_at, _ in candidates
                if job_id not in taken and (oldest[name] is None or oldest[name] > created_at + older_than)]
        # At the head of their queues, as hand-backs: they have waited their turn; the oldest is taken first.
        for job_id, name, _ in sorted(lost, key=lambda job: job[2], reverse=True):
            _push_first(app, channel, job_id, name)
    return [job_id for job_id, _, _ in lost]


def _cancel_lines_of_ended_batches(store: JobStore, candidates: list[tuple[str, str, float, str | None]],
                                   statuses: dict[str, object],
                                   let_go: set[str]) -> list[tuple[str, str, float, str | None]]:
    """Cancel the queued jobs among `candidates` (job id, Celery queue, created at, batch) that are lines of a batch
    that ended, is cancelling, is gone or damaged (`statuses`: batch -> its status, None when gone, "damaged" when its
    key holds no hash), or that their batch let go of (`let_go`); returns the others.

    The process that ends such a batch (`BatchStore.fail`, `cancel_batch`), or that has a chunk of lines refused by one
    (_ADD_LINES, then `Intake._enqueue`), cancels their jobs right after, and it can be killed in between: their tasks,
    never sent while the file was read, were then sent here as lost, and ran for nobody. Checked here, not at a
    worker's pick-up: this sweep reads the batch's status already, is the only sender of a task never sent, and costs a
    batch line nothing on its way; a line whose task was sent (a batch cancelled in progress) ends here too, once it
    has waited `older_than` (a worker that takes its message then skips it)."""
    ended = [candidate for candidate in candidates if candidate[0] in let_go or (
        candidate[3] and (statuses[candidate[3]] is None or statuses[candidate[3]] in (*BATCH_FINAL_STATUSES,
                                                                                        "cancelling", "damaged")))]
    if not ended:
        return candidates
    store.cancel_many([job_id for job_id, *_ in ended])
    for batch in sorted({batch or "" for *_, batch in ended}):
        whose = f"batch {batch} ({statuses[batch] or 'gone'})" if batch else "batches that let them go"
        why = ("its key holds no hash: no read of it can show them" if batch and statuses[batch] == "damaged" else
               "the process ending their batch stopped before it cancelled them, or has not got to them yet")
        log.warning("%d queued lines of %s cancelled by the lost-task sweep (%s)",
                    sum((of or "") == batch for *_, of in ended), whose, why)
    cancelled = {job_id for job_id, *_ in ended}
    return [candidate for candidate in candidates if candidate[0] not in cancelled]


def _end_damaged(store: JobStore, job_ids: list[str]) -> None:
    """End the queued jobs whose record key holds another type than a hash (a key SET by hand), each logged once.

    No worker can start one, so its message, lost or not, ends nothing; one whose message was lost stayed in its
    queue for good, counted as queued, and was logged as unreadable at every sweep. Its ending (_FINISH) takes it out
    of its queue, the running hash and the deadline set, leaves the key as it is, and answers the error that says so:
    the line logged. It is ended at once, whatever its age: nothing can run in it."""
    endings = [Ending(job_id, "failed", DAMAGED_ERROR.format("its key holds no hash"), ErrorCode.SERVER_ERROR, "error")
               for job_id in job_ids]
    for job_id, answer in zip(job_ids, store.finish_many(endings)):
        if isinstance(answer, redis.RedisError) and answers_later(answer):
            raise answer  # Redis loading or busy: an outage, for the sweep to wait out
        log.warning("job %s: its record is unreadable, of another type than a hash; ended by the lost-task sweep "
                    "(%s)", job_id, answer)


def _queued_since(job_id: str, record: list | Exception) -> float | None:
    """When a job whose record read (status, created_at, ...) says it is queued was recorded; None for a job not
    queued, and for a record that is unreadable (logged: it is no job's as the store writes them)."""
    try:
        if isinstance(record, Exception):
            raise record
        status, created_at = record[:2]
        return float(created_at) if status == "queued" else None
    except (redis.RedisError, TypeError, ValueError) as exc:
        if isinstance(exc, redis.RedisError) and answers_later(exc):
            raise  # Redis loading or busy: an outage, as before, for the sweep to wait out
        log.warning("job %s: its record is unreadable (%s: %s); left out of the lost-task sweep", job_id,
                    type(exc).__name__, exc)
        return None


def _enqueued_at(message: bytes | str) -> float:
    """The ENQUEUED_AT_HEADER of a message as kombu keeps it in a queue; 0 where it has none (or is unreadable)."""
    try:
        return float(json.loads(message)["headers"].get(ENQUEUED_AT_HEADER) or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0.0


def _task_id(unacked: bytes | str) -> str | None:
    """The task id (a job's id) of a message in kombu's unacked hash: [message, exchange, routing key]."""
    try:
        return json.loads(unacked)[0]["headers"]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


# The queues of jobs that name a model, "interactive.<model>" and "batch.<model>" (`task_queue`), in one SCAN pattern
# (glob has no "or"); the few other names it fits are dropped by their prefix.
_MODEL_QUEUE_PATTERN = "[ib][na]t[ec][rh]*"
_MODEL_QUEUE_PREFIXES = (f"{INTERACTIVE_QUEUE}.", f"{BATCH_QUEUE}.")
# Keys a stale-message sweep looks at per SCAN step, and messages it reads of one queue list at a time.
STALE_SCAN_COUNT = 5000
STALE_CHUNK = 100


@dataclass
class QueueScan:
    """How far `remove_stale_messages` has got, from one sweep to the next: the keyspace's SCAN cursor, and the queue
    lists the last step found and not yet read to the end, each with how many messages it kept at their head."""

    cursor: int = 0
    lists: dict[str, int] = field(default_factory=dict)


def remove_stale_messages(app: Celery, store: JobStore, scan: QueueScan, limit: int = 1000) -> list[str]:
    """Remove the task messages of jobs that have ended from the queues of models that no live worker serves;
    returns their job ids. Reads `limit` messages at most, and takes up where the last call left off (`scan`).

    A worker takes and drops the message of an ended job itself, but a queue no worker reads kept every one for
    good: a client sending jobs for a misspelt model, with a deadline or cancelling them, grew Redis without bound.
    A message goes when its job's record says it ended, or is gone and the message joined its queue (its
    ENQUEUED_AT_HEADER) more than the records' TTL ago: a queued job's record has no TTL, and one gone sooner may be
    the job of another key prefix on the same database. Only a message read here is removed (LREM of its bytes, one
    of a kind: kombu's delivery tag), so one taken meanwhile (a worker of the model came, another sweep removed it)
    is not; a job that ended stays ended, so what was read is still true when it goes.

    The queue lists come from SCAN, one step of STALE_SCAN_COUNT keys in a call that has no list left to read; a list
    is read from its head (where the oldest wait), STALE_CHUNK messages at a time, past those it keeps."""
    with _broker_channel(app) as channel:
        # kombu's client leaves SCAN, LRANGE and LREM unprefixed: the names here are whole, its global_keyprefix too.
        client, prefix = channel.client, channel.global_keyprefix or ""
        if not scan.lists:
            scan.cursor, keys = client.scan(scan.cursor, match=glob_escaped(prefix) + _MODEL_QUEUE_PATTERN,
                                            count=STALE_SCAN_COUNT)
            names = sorted({bytes_to_str(key) for key in keys})
            scan.lists = {name: 0 for name in names if name[len(prefix):].startswith(_MODEL_QUEUE_PREFIXES)}
        if not scan.lists:
            return []
        served = {queue for worker in WorkerRegistry(store.redis, store.prefix).workers()
                  if isinstance(worker.get("model"), str)
                  for queue in worker_queues(worker["model"], worker.get("max_batch_tokens"))}
        served_lists = {prefix + channel._q_for_pri(queue, priority)
                        for queue in served for priority in channel.priority_steps}
        for name in [name for name in scan.lists if name in served_lists]:
            del scan.lists[name]  # its workers take and drop them
        chunk = max(1, min(STALE_CHUNK, limit))
        names = list(scan.lists)[:max(1, limit // chunk)]
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.lrange(name, -(scan.lists[name] + chunk), -(scan.lists[name] + 1))
            windows = pipe.execute(raise_on_error=False)  # a key that is no list (another program's) answers an error
        windows = [[] if isinstance(window, Exception) else window for window in windows]
        read = [(name, raw, *_queued_task(raw)) for name, window in zip(names, windows) for raw in window]
        read = [message for message in read if message[2] is not None]
        with store.redis.pipeline(transaction=False) as pipe:
            for _, _, job_id, _ in read:
                pipe.hget(store.key(job_id), "status")
            statuses = pipe.execute(raise_on_error=False)
        for status in statuses:
            if isinstance(status, redis.RedisError) and answers_later(status):
                raise status  # Redis loading or busy: an outage, for the sweep to wait out
        now = store.clock()
        stale = [(name, raw, job_id) for (name, raw, job_id, enqueued_at), status in zip(read, statuses)
                 if status in FINAL_STATES or (status is None and 0 < enqueued_at < now - store.ttl_seconds)]
        going: dict[str, list[tuple[bytes | str, str]]] = {}
        for name, raw, job_id in stale:
            going.setdefault(name, []).append((raw, job_id))
        with client.pipeline(transaction=False) as pipe:
            for name, messages in going.items():
                # Looked for where it was read, give or take a chunk (messages taken from the head, or put back there,
                # since): LREM walked the whole list for a message taken meanwhile.
                pipe.execute_command("EVAL", _REMOVE_READ, 1, name, scan.lists[name] + 2 * chunk,
                                     max(1, scan.lists[name] + 1 - chunk), *[raw for raw, _ in messages])
            answers = pipe.execute()
        for name, window in zip(names, windows):
            if len(window) < chunk:
                del scan.lists[name]  # read to its end: the next SCAN pass finds it again
            else:
                scan.lists[name] += len(window) - len(going.get(name, ()))
    return [job_id for messages, counts in zip(going.values(), answers)
            for (_, job_id), count in zip(messages, counts) if count]


# Remove from a queue list (KEYS[1]) each message of ARGV[3..] found among the part of it that was read: from the
# ARGV[1]th to the ARGV[2]th message from its head (its tail in Redis's terms, where BRPOP takes); answers a count a
# message, 0 for one not found. Only that part is copied, whatever was read before it. (EVAL, not EVALSHA: kombu's
# client prefixes EVALSHA's key, and the name here is whole.)
_REMOVE_READ = """
local present = {}
for _, message in ipairs(redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -tonumber(ARGV[2]))) do
  present[message] = true
end
local removed = {}
for i = 3, #ARGV do
  removed[i - 2] = present[ARGV[i]] and redis.call('LREM', KEYS[1], -1, ARGV[i]) or 0
end
return removed
"""


def _queued_task(message: bytes | str) -> tuple[str | None, float]:
    """The job id and ENQUEUED_AT_HEADER (0 where it has none) of a task message as kombu keeps it in a queue; no id
    for a message that is no llava-queue task (left alone)."""
    try:
        headers = json.loads(message)["headers"]
        job_id = headers["id"] if headers.get("task") == GENERATE_TASK else None
        return (job_id if isinstance(job_id, str) else None), float(headers.get(ENQUEUED_AT_HEADER) or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, 0.0


# Takes, without waiting, the next message of one of a worker's queue lists (KEYS, in the order kombu's BRPOP names
# them; ARGV[i]: the rank of KEYS[i], the lowest first): of those of the lowest rank, the one whose next message (the
# list's last element) joined its queue first (ENQUEUED_AT_HEADER; 0 where absent). Answers {list, message} as BRPOP
# does, or nil when every list is empty.
_TAKE_OLDEST = """
local best, best_rank, best_at
for i, key in ipairs(KEYS) do
  local head = redis.call('LINDEX', key, -1)
  if head then
    local rank = tonumber(ARGV[i])
    local ok, message = pcall(cjson.decode, head)
    local at = 0
    if ok and type(message) == 'table' and type(message['headers']) == 'table' then
      at = tonumber(message['headers']['enqueued_at']) or 0
    end
    if best == nil or rank < best_rank or (rank == best_rank and at < best_at) then
      best, best_rank, best_at = i, rank, at
    end
  end
end
if best == nil then return nil end
return {KEYS[best], redis.call('RPOP', KEYS[best])}
"""


# Where a worker keeps the messages on its queues that neither kombu nor Celery can read (`_Channel._set_aside`), the
# newest first, this many at most.
DEAD_LETTERS_KEY = "llava_queue.dead_letters"
DEAD_LETTERS_KEPT = 1000
log = logging.getLogger("llava_queue.worker")


class _Channel(kombu_redis.Channel):
    """kombu's Redis channel with one client for its commands outside the event loop, instead of one per command.

    kombu builds a new `redis.Redis` over the channel's connection pool for every such command: each
    message a worker takes (recorded among the unacked), each ack, each publish. redis-py spends about
    120 µs building one (its table of response callbacks), on the worker's consumer thread, the one
    thread that takes every job, and on every submission in the API. A client holds no connection
    of its own (each command takes one from the pool), so one per pool serves them all.

    On a worker's consumer it also records which worker holds each message it takes (`_QoS`).
    """

    QoS = _QoS
    # The registry key of the worker whose consumer this channel is (the `message_holder` transport option), recorded
    # with each message it takes; None elsewhere (the API, a producer).
    message_holder = None
    from_transport_options = kombu_redis.Channel.from_transport_options + ("message_holder",)
    _sync_client = None
    # The queues the last poll read if it was the script (_TAKE_OLDEST), else None; and those of them it found all empty
    # (None: it took a message, or was BRPOP). Only a poll of those same queues after such a script waits in BRPOP.
    _scripted: frozenset | None = None
    _found_none: frozenset | None = None

    def _brpop_start(self, timeout=None):
        """Poll the worker's queues: interactive before batch (kombu's "priority" order, as `worker_queues` declares
        them), and of the queues of one kind, the one whose next message joined its queue first.

        With BRPOP alone a worker took every queued job naming its model before any job naming none (POST /v1/jobs
        need not name one), while each job's queue position (`JobStore.queue_position`, by the order jobs joined the
        queue) counted those ahead of it. A poll takes the oldest in one script, in the round trip BRPOP took; only
        after a script found every queue empty does the next poll, of the same queues, go to BRPOP, which waits (a
        script cannot), and takes the first message to come, from whichever queue. Any other poll is the script:
        after a BRPOP (that timed out, or took a message), and after the worker's queues changed (its batch queues,
        paused while it runs its share of batch jobs, read again: a BRPOP then took a job naming the model before an
        older one naming none).
        """
        if self._found_none == frozenset(self.active_queues) or self.global_keyprefix:
            self._scripted = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        kinds = (INTERACTIVE_QUEUE, BATCH_QUEUE)
        keys, ranks = [], []
        for step, priority in enumerate(self.priority_steps):
            for queue in queues:
                kind = queue.split(".", 1)[0]
                keys.append(self._q_for_pri(queue, priority))
                ranks.append(step * (len(kinds) + 1) + (kinds.index(kind) if kind in kinds else len(kinds)))
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        self.client.connection.send_command("EVAL", _TAKE_OLDEST, len(keys), *keys, *ranks)
        self._scripted = frozenset(self.active_queues)

    def _brpop_read(self, **options):
        """kombu's read of a poll's answer (BRPOP's, or the script's, which answers as BRPOP does), and the delivery of
        the message it took, except that a message kombu or Celery cannot read is set aside (`_set_aside`): one entry
        that was no task message ("garbage" pushed on a queue, a body that is not base64, Celery's arguments in two
        parts instead of three) raised out of the consumer, which Celery takes for an unrecoverable error: the worker
        exited, with status 0, and took no job again."""
        scripted, self._found_none = self._scripted, None
        try:
            try:
                answer = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll connects again
                raise
            if not answer:
                self._found_none = scripted
                raise Empty()
            dest, item = answer
            queue = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            raw = bytes_to_str(item)
            message = None
            try:
                message = loads(raw)
                self.connection._deliver(message, queue)
            except Exception as exc:
                # kombu counts KeyError among its connection errors; here it is a field the message lacks.
                if isinstance(exc, self.connection_errors) and not isinstance(exc, KeyError):
                    raise
                self._set_aside(raw, message, queue, exc)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # (kombu 5.5's, after each read)
            if flush is not None:
                flush()

    def _set_aside(self, raw: str, message: object, queue: str, error: Exception) -> None:
        """Keep a message that could not be delivered in DEAD_LETTERS_KEY (the newest DEAD_LETTERS_KEPT), out of the
        unacked hash if it got there, and log why: no job is lost (every job's record is the API's, and a job whose
        message is lost is sent again by the sweep, `resend_lost_tasks`), and the worker goes on."""
        log.error("a message on queue %r that is no task llava-queue sent was set aside in %s (%s: %s): %.300s",
                  queue, DEAD_LETTERS_KEY, type(error).__name__, error, raw)
        properties = message.get("properties") if isinstance(message, dict) else None
        tag = properties.get("delivery_tag") if isinstance(properties, dict) else None
        if isinstance(tag, str) and tag in self.qos._delivered:
            self.qos.ack(tag)  # recorded among the unacked, then refused: not to be restored in 4 hours
        with self.client.pipeline(transaction=False) as pipe:
            pipe.lpush(DEAD_LETTERS_KEY, raw).ltrim(DEAD_LETTERS_KEY, 0, DEAD_LETTERS_KEPT - 1).execute()

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
    """kombu's Redis transport, on `_Channel`: the broker's for redis:// and rediss:// (`make_celery`)."""

    Channel = _Channel


class RedisSocketTransport(RedisTransport):
    """`RedisTransport` for a Redis on a unix socket, whose URL is `broker_url`'s socket://. Saying it parses its URLs,
    it has kombu's Connection keep the URL whole, and kombu's channel reads the socket's path, database and credentials
    from it (`_connparams`), as for kombu's redis+socket://, whose "redis+" names kombu's own transport instead."""

    can_parse_url = True


# The keys outside the job store's prefix that kombu reads and writes: a queue, its unacked hashes and a binding. An
# ACL user held to the prefix (`~llq:*`) could write job records, and every task message was refused.
_KOMBU_KEYS = (INTERACTIVE_QUEUE, "unacked", "unacked_index", MESSAGE_HOLDERS_KEY,
               f"_kombu.binding.{INTERACTIVE_QUEUE}")


def redis_refusal(url: str, prefix: str, *, names_connections: bool = False, writes: bool = False,
                  commands: bool = True) -> str | None:
    """Why the Redis at `url` refuses llava-queue for good, in one line, or None: it refuses the URL's credentials
    (or wants some), or its ACL denies the user a command the stack runs (scripts, PUBLISH, SUBSCRIBE and PSUBSCRIBE,
    CLIENT SETNAME with `names_connections`: the API names its stream subscriber) or the keys it uses; with `writes`,
    also a read-only replica (a worker's Celery consumer cannot start on one); without `commands`, the credentials
    alone (`llava-queue status`, which a monitoring user with fewer rights may run). Each such Redis
    was taken for one away: the worker loaded its model and tried again for ever, the API's /healthz said "ok" while
    every submission got a 503 "try again shortly" or no stream got a token. Writes nothing (PUBLISH to a channel of
    the prefix nobody hears, PERSIST, a no-op on keys without a TTL). Raises redis.ConnectionError or TimeoutError when
    Redis does not answer (to be waited for)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        try:
            client.ping()
        except (redis.AuthenticationError, redis.ResponseError) as exc:  # (redis-py's AuthenticationError is neither)
            if not commands and isinstance(exc, redis.exceptions.NoPermissionError):
                return None  # the credentials were taken: a user without PING (a monitoring user's ACL, +@read)
            if answers_later(exc) and not isinstance(exc, redis.AuthenticationError):
                raise redis.ConnectionError(str(exc)) from exc
            if "authenticated" in str(exc) or str(exc).startswith(("NOAUTH", "Authentication required")):
                # NOAUTH, in HELLO's words too
                return ("it wants a password (requirepass, or an ACL user's) and the URL has none; use "
                        "redis://:PASSWORD@host:port/db or redis://USER:PASSWORD@host:port/db")
            if isinstance(exc, redis.AuthenticationError):  # WRONGPASS
                return f"it refuses the credentials in the URL ({exc})"
            return f"it refuses the connection: {exc}"  # DENIED (protected mode), a DB index it lacks
        if not commands:
            return None
        probes = [("EVAL", "return 1", 0), ("SCRIPT", "LOAD", "return 1"),
                  ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", 0),
                  ("PUBLISH", f"{prefix}:probe", "")]
        probes += [("PERSIST", key) for key in (f"{prefix}:probe", *_KOMBU_KEYS)]
        if names_connections:
            probes.append(("CLIENT", "SETNAME", "llava-queue-probe"))
        for probe in probes:
            try:
                client.execute_command(*probe)
            except redis.exceptions.NoPermissionError as exc:
                if probe[0] == "PERSIST":
                    return (f"its ACL denies the user the key {probe[1]!r}, which llava-queue writes ({exc}): grant "
                            f"~* (Celery's keys are outside {prefix}:*)")
                return f"its ACL denies the user what llava-queue needs: {exc} (grant +@all, or at least {probe[0]})"
            except redis.ResponseError as exc:
                if isinstance(exc, redis.ReadOnlyError) and writes:
                    return (f"it is a read-only replica ({exc}); point LLAVA_QUEUE_REDIS_URL at its primary")
                if probe[0] == "PERSIST" and answers_later(exc):
                    continue  # a read-only replica: said by redis_warnings
                if "unknown command" in str(exc).lower():  # rename-command
                    return f"it has no {probe[0]} command ({exc}); llava-queue runs it"
                raise
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(f"{prefix}:probe")
            pubsub.psubscribe(f"{prefix}:probe:*")  # Celery's fanout (remote control) subscribes to patterns
            for _ in range(2):
                pubsub.get_message(timeout=5)
        except redis.exceptions.NoPermissionError as exc:
            return f"its ACL denies the user what llava-queue needs: {exc} (grant +@pubsub and &* channels)"
        finally:
            pubsub.close()
        return None
    finally:
        client.close()


def redis_warnings(client: redis.Redis) -> list[str]:
    """What about the Redis behind `client` loses or refuses the stack's data while it is up, one line each: a
    `maxmemory` with a policy that evicts keys (job records, queue messages and the workers list vanish unsaid,
    and the jobs with them), a Redis full under noeviction or a read-only replica (every write refused). Read from
    INFO; none where the ACL denies INFO (the operator who denied it can read them)."""
    try:
        info = client.info("memory") | client.info("replication")
    except redis.exceptions.NoPermissionError:
        return []
    except redis.ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return []
        raise
    warnings = []
    policy = info.get("maxmemory_policy", "noeviction")
    if int(info.get("maxmemory") or 0) and policy != "noeviction":
        warnings.append(f"maxmemory-policy is {policy}: once Redis holds maxmemory bytes it evicts keys, job records "
                        "and task messages among them, and their jobs are lost unsaid; set maxmemory-policy "
                        "noeviction (a full Redis then refuses writes, which llava-queue waits out)")
    elif int(info.get("maxmemory") or 0) and int(info.get("used_memory") or 0) >= int(info["maxmemory"]):
        warnings.append(f"it is full ({info.get('used_memory_human')} of maxmemory "
                        f"{info.get('maxmemory_human')}): it refuses writes, and every submission gets a 503, until "
                        "records expire or maxmemory is raised")
    if info.get("role") in ("slave", "replica"):
        master = f"{info.get('master_host', '?')}:{info.get('master_port', '?')}"
        warnings.append(f"it is a replica of {master}: it refuses every write (READONLY) until it is promoted; point "
                        "LLAVA_QUEUE_REDIS_URL at the primary")
    return warnings


# How long the broker's client waits for a connection to Redis, and for Redis's answer on one. A connection that died
# without closing (a NAT or firewall that forgot it while it was idle, a failover) answers nothing: with kombu's
# default (no timeout) a send on one waited for ever, and with it every later submission of that API (they commit
# one group at a time). Past it the command fails as on a lost connection, and the next one connects anew.
BROKER_SOCKET_TIMEOUT_SECONDS = 10.0


def broker_url(redis_url: str) -> str:
    """The URL Celery's kombu reads for the Redis at `redis_url` (LLAVA_QUEUE_REDIS_URL): the URL itself (its query
    cut, below), but for a unix:// socket. redis-py reads unix:///path?db=N and kombu does not ("No such transport:
    unix"); kombu's channel reads socket:///path?virtual_host=N (`RedisSocketTransport`; kombu's own redis+socket://,
    less its transport) and redis-py does not: one URL serves both, this one is kombu's. The credentials go along (in
    the URL's user part, which kombu's logs mask, from the query too); the other options of the query are redis-py's
    (the broker has its own timeouts, make_celery).

    A redis:// or rediss:// URL keeps only the query's TLS options (ssl_*, which kombu reads as redis-py does), and
    its database is redis-py's (?db=N, over the path's): kombu took every other option of the query (?db=,
    ?socket_timeout=...) for an argument of its own, and `api` and `worker` ended at start with a TypeError."""
    parts = urlsplit(redis_url)
    if parts.scheme in ("redis", "rediss"):
        db = redis.connection.parse_url(redis_url).get("db")
        tls = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True)
               if name.startswith("ssl_")]
        return urlunsplit(parts._replace(path=parts.path if db is None else f"/{db}", query=urlencode(tls)))
    if parts.scheme != "unix":
        return redis_url
    options = redis.connection.parse_url(redis_url)
    user, password = options.get("username") or "", options.get("password") or ""
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user or password else ""
    return f"socket://{credentials}{quote(options['path'])}?virtual_host={options.get('db', 0)}"


# The broker's transport for each scheme redis-py reads (the job store's): the project's, with its channel. A transport
# named outright takes the place of the URL's scheme: a socket's URL is one the transport reads (`broker_url`). Other
# schemes (sentinel://, kombu's redis+socket://) keep kombu's own; `api` and `worker` refuse them (redis-py cannot).
_TRANSPORTS = {"redis": RedisTransport, "rediss": RedisTransport, "unix": RedisSocketTransport}


def make_celery(settings: Settings) -> Celery:
    """A Celery app whose broker is `settings.redis_url` (`broker_url`); tasks carry only job ids (JSON)."""
    app = Celery("llava_queue", broker=broker_url(settings.redis_url))
    scheme = urlsplit(settings.redis_url).scheme
    if scheme in _TRANSPORTS:
        app.conf.broker_transport = f"{__name__}:{_TRANSPORTS[scheme].__name__}"
    if scheme == "rediss":
        # kombu reads TLS options from the URL's query as for its own rediss:// (ssl_cert_reqs=required|optional|none,
        # ssl_ca_certs, ssl_certfile, ssl_keyfile...), these where the query names none (a query naming others but no
        # ssl_cert_reqs gets redis-py's default, required). The certificate is verified, as redis-py verifies it for
        # the job store: kombu's own default is CERT_NONE ("defaulting to insecure SSL behaviour"), a broker anyone on
        # the path could read and change while the job store refused them. ?ssl_cert_reqs=none is off for both.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app.conf.update(
        # Only JSON crosses the queue: every serializer Celery has, and what it accepts, named (the defaults of the
        # last two are JSON already; said here so that no upgrade or other setting changes them unseen).
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        event_serializer="json",
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
                                  "queue_order_strategy": "priority",
                                  "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
                                  "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_SECONDS},
        broker_connection_retry_on_startup=True,
        # A worker reconnects to Redis for as long as Redis is away, as its other loops wait for it: after Celery's
        # default 100 tries (about 46 minutes) the worker exited, with status 0, and took no job again.
        broker_connection_max_retries=None,
        # A running job goes on through a broker outage (its text and ending go to Redis once it is back, and it is
        # acked then). Celery 6 is to make the default True: every running job cancelled and delivered again at each
        # lost connection. Said here, so that no upgrade changes it unseen.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Each queue on an exchange and routing key of its own name: left out, Celery gave both the default queue's
        # (the worker's banner read "batch exchange=interactive key=interactive", and Redis bound both queues to
        # that one key). Jobs are sent to a queue by name (send_many), so this is what the names say.
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
                          for name in (INTERACTIVE_QUEUE, BATCH_QUEUE)),
        task_default_queue=INTERACTIVE_QUEUE,
        worker_hijack_root_logger=False,
        # Task events only when asked (settings.task_events): Flower asks for them itself. Worker events
        # (heartbeats, online, offline) are always sent, so Flower lists the workers either way.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
    )
    return app


celery_app = make_celery(get_settings())
