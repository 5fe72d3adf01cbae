"""The one way a job enters the system: validate (done by the caller's parse), record, enqueue.

Submissions that arrive together are committed together (group commit): the first caller
records and enqueues every submission waiting at that moment, in a few Redis round trips for
all of them, while the ones that arrive meanwhile queue up for the next commit. A burst of 32
single-job POSTs cost the API ~3.4 ms of CPU each, one after another, when every call made its
own six round trips (two counts, the order, the record, the message, Celery's task-sent event).
"""

import hashlib
import json
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from celery import Celery
from pydantic import BaseModel

from api.errors import ApiError, log_damaged, log_unavailable
from shared.batches import BatchStore
from shared.celery_app import send_many, task_queue
from shared.jobs import Ending, JobStore, NewJob, answers_later, new_job_id, owner_id
from shared.protocol import ErrorCode, GenerateRequest

log = logging.getLogger("llava_queue.api")


# Joins a bulk submission's Idempotency-Key and the index of each of its jobs. An HTTP header is read as Latin-1
# (RFC 9110's obs-text), so a key sent in one never holds this character, beyond U+00FF.
BULK_ITEM_MARK = "\u2192"
# How long the admission lock is held at most (its holder may die): past it, another admission goes ahead.
ADMISSION_LEASE_SECONDS = 10.0
# How long an admission waits for the lock before its submission gets the 503 of Redis away (LockError): longer than
# a lease, so a holder that died costs a wait, not a refusal.
ADMISSION_WAIT_SECONDS = ADMISSION_LEASE_SECONDS + 5.0


@dataclass
class _Submission:
    """One call's jobs, and what the commit that took it answered: their ids, or the error to raise."""

    requests: list[tuple[GenerateRequest, str]]
    idempotency_key: str | None
    owner: str | None
    ids: list[str] | None = None
    error: BaseException | None = None
    done: bool = False
    claimed: bool = False  # this submission recorded its body's fingerprint under its idempotency key

    def settle(self, ids: list[str] | None = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.ids, self.error, self.done = ids, error, True


def _new_jobs(submissions: list[_Submission]) -> list[NewJob]:
    """A job with a new id for each request of `submissions`, in order."""
    return [NewJob(request, queue, getattr(request, "deadline_seconds", None), submission.owner, job_id=new_job_id())
            for submission in submissions for request, queue in submission.requests]


@contextmanager
def admission_lock(store: JobStore) -> Iterator[None]:
    """Hold the deployment's admission lock (in Redis) for the `with` block, when the queues or keys have limits.

    Admission counts the jobs queued, then records the jobs it admits. API replicas behind a load balancer did that
    at once, each counting the queues without the jobs the other was recording: both were admitted past
    `MAX_QUEUED_JOBS` or a key's quota (5 jobs for a quota of 4). One process's commits never overlap (`Submitter`);
    the lock makes every process's commits, and batches' admissions, take their turn.
    """
    if not (store.max_queued or store.max_queued_per_owner):
        yield
        return
    with store.redis.lock(f"{store.prefix}:admission-lock", timeout=ADMISSION_LEASE_SECONDS, sleep=0.002,
                          blocking_timeout=ADMISSION_WAIT_SECONDS, raise_on_release_error=False):
        yield


def bulk_item_key(key: str, index: int) -> str:
    """The key the `index`-th job of a bulk submission of several jobs is remembered under (`Submitter._keys`)."""
    return f"{key}{BULK_ITEM_MARK}{index}"


def scoped_idempotency_key(idempotency_key: str, owner: str | None) -> str:
    """The idempotency key within its owner's: another API key's retry must not get this one's jobs (nor its cancel,
    see POST /v1/jobs/cancel, cancel them)."""
    return f"{owner_id(owner)}:{idempotency_key}" if owner else idempotency_key


class Submitter:
    """Records jobs and sends their Celery tasks; thread-safe, one per API process (`app.state.submitter`).

    Only the job id crosses the queue; the worker reads the request from the record. Past the
    queue limit a submission gets 429 with a Retry-After from the measured drain rate. With an
    `idempotency_key` seen before, the first submission's ids come back and nothing is enqueued (a 422 when
    the request differs from the first).
    If the broker cannot take the tasks, their jobs are marked failed and the call gets 503. An
    `owner` (the caller's API key digest) is held to its own queued-job quota too.
    """

    def __init__(self, store: JobStore, celery: Celery):
        self.store = store
        self.celery = celery
        self._batches = BatchStore(store, store.ttl_seconds)
        self._changed = threading.Condition()
        self._waiting: list[_Submission] = []
        self._committing = False

    def submit(self, requests: list[tuple[GenerateRequest, str]], *, idempotency_key: str | None = None,
               owner: str | None = None) -> list[str]:
        """Record each (request, queue) as a queued job and send its task; returns the job ids in order."""
        if idempotency_key is not None and BULK_ITEM_MARK in idempotency_key:
            raise ApiError(422, f"the Idempotency-Key holds {BULK_ITEM_MARK!r}, which joins a bulk submission's key "
                                "and each job's index", param="header.idempotency-key")
        for index, (request, _) in enumerate(requests):
            check_unicode(request, f"jobs.{index}." if len(requests) > 1 else "")
        submission = _Submission(requests, idempotency_key, owner)
        with self._changed:
            self._waiting.append(submission)
            while self._committing and not submission.done:
                self._changed.wait()
            group = None
            if not submission.done:
                # Nobody is committing: this call commits everything waiting, its own submission included.
                self._committing = True
                group, self._waiting = self._waiting, []
        if group is not None:
            try:
                self._commit(group)
            except BaseException as exc:
                for other in group:
                    other.settle(error=exc)
            finally:
                with self._changed:
                    self._committing = False
                    self._changed.notify_all()
        if submission.error is not None:
            raise submission.error  # the same error object in every call it concerns, as futures do
        return submission.ids

    def submit_one(self, request: GenerateRequest, queue: str = "interactive", owner: str | None = None) -> str:
        """Submit one job; see `submit`."""
        return self.submit([(request, queue)], owner=owner)[0]

    def _commit(self, group: list[_Submission]) -> None:
        """Settle every submission of `group`: admission, one write of all their records, one send of all tasks.

        The idempotency keys are read, and the jobs admitted and recorded, under the admission lock: a submission
        whose key another API process was recording at that moment got a 429 from a quota its twin had just filled,
        where it is the twin's job."""
        created: list[tuple[str, str]] = []
        written: list[str] = []  # every job whose record may be written: its write's answer may be lost
        admitted: list[_Submission] = []
        try:
            with admission_lock(self.store):
                fresh = [submission for submission in group
                         if submission.idempotency_key is None or not self._settled_by_key(submission)]
                admitted = self._admit(self._refuse_damaged(fresh))
                self._unclaim([submission for submission in fresh if submission.error is not None])
                created = self._record(admitted, written)
            send_many(self.celery, created, self.store.clock)
        except Exception as exc:
            # Recorded jobs whose tasks will not be sent end failed (if Redis lets us say so), those whose write's
            # answer was lost too (they waited queued for good with no task); every submission of the group gets the
            # error (`submit`). Their idempotency keys are let go, so that retrying after the 503 submits the jobs
            # again instead of finding the failed ones; and so are the bodies recorded under the keys of every
            # submission that gets the error, whatever failed: a Redis error partway (one submission's key of
            # another type) left those of the submissions checked before it, and each key stayed bound to a body
            # that created nothing (a retry with the body corrected was a 422).
            error = unsent(self.store, written, exc) if written else exc
            try:
                if written:
                    self._forget_keys([submission for submission in admitted
                                       if submission.idempotency_key is not None], set(written))
                self._unclaim([submission for submission in group if submission.error is not None
                               or not submission.done])
            except redis.RedisError as cleanup:
                # The submissions get their 503 all the same (a Redis error here made it a 500); a key kept names a
                # failed job, which a retry under it gets.
                log.error("the idempotency keys of jobs that could not be enqueued were not let go (%s: %s)",
                          type(cleanup).__name__, cleanup)
            if error is exc:
                raise
            raise error from exc
        for submission in admitted:
            submission.settle(submission.ids)

    def _refuse_damaged(self, group: list[_Submission]) -> list[_Submission]:
        """The submissions of `group` whose images' stored copies are sound; the others are settled with the 500 that
        names the damage (`damaged_images`). Written with the group, such an image failed the write of every job of the
        group: each submission got a 503 "the queue is unavailable", its jobs failed, and so at every retry."""
        requests = [request for submission in group for request, _ in submission.requests]
        damage = damaged_images(self.store, requests)
        if not damage:
            return group
        sound, start = [], 0
        for submission in group:
            count = len(submission.requests)
            found = [(index, damage[start + index]) for index in range(count) if start + index in damage]
            start += count
            if not found:
                sound.append(submission)
                continue
            index, what = found[0]
            message = f"{f'jobs.{index}: ' if count > 1 else ''}{what}; an operator must delete the key"
            log_damaged(message)
            submission.settle(error=ApiError(500, message, type="server_error", code=ErrorCode.SERVER_ERROR))
        return sound

    def _record(self, admitted: list[_Submission], written: list[str]) -> list[tuple[str, str]]:
        """Write the records of the `admitted` submissions' jobs (each id added to `written` first) and set each one's
        ids; returns the (job id, Celery queue) of every job created, whose task is to be sent."""
        jobs = _new_jobs([submission for submission in admitted if submission.idempotency_key is None])
        written += [job.job_id for job in jobs]
        ids = iter(self.store.create_jobs(jobs))
        keyed = iter(self._create_keyed([submission for submission in admitted
                                         if submission.idempotency_key is not None], written))
        created = []
        for submission in admitted:
            if submission.idempotency_key is None:
                submission.ids = [next(ids) for _ in submission.requests]
                new = [True] * len(submission.requests)
            else:
                answers = [next(keyed) for _ in submission.requests]
                submission.ids, new = [job_id for job_id, _ in answers], [is_new for _, is_new in answers]
            created += [(job_id, task_queue(queue, request.model))
                        for job_id, is_new, (request, queue) in zip(submission.ids, new, submission.requests)
                        if is_new]
        return created

    def _settled_by_key(self, submission: _Submission) -> bool:
        """Settle a submission whose idempotency key was used before, in one round trip; True if it was settled.

        A key first used with another request gets a 422 (Stripe's and the IETF Idempotency-Key draft's answer; it
        was a 202 with the first request's jobs, the new request dropped without a word). A retry of a submission
        that went through gets its jobs, even when the queue is full now. The first use of a key records its body's
        fingerprint, and the submission goes on to be committed.
        """
        fingerprint = _fingerprint(submission.requests)
        recorded, first, known = self.store.check_idempotency(self._fingerprint_key(submission), fingerprint,
                                                              self._keys(submission))
        submission.claimed = recorded
        if first is not None and first != fingerprint:  # (None: it expired or was let go just now)
            submission.settle(error=ApiError(
                422, "this Idempotency-Key was already used with a different request (another body, queue or number "
                     "of jobs): send a new key for a new request", param="header.idempotency-key",
                code=ErrorCode.INVALID_REQUEST))
            return True
        if all(known):
            submission.settle(known)
            return True
        return False

    def _fingerprint_key(self, submission: _Submission) -> str:
        """Where the fingerprint of the body first sent with the submission's idempotency key is kept."""
        return self.store.idempotency_body_key(self._scoped_key(submission))

    def _unclaim(self, submissions: list[_Submission]) -> None:
        """Let go of the fingerprints `submissions` recorded: they created nothing (429, 503), so their key is free
        for any request, as it would have been had they never come."""
        claimed = [submission for submission in submissions if submission.claimed]
        if claimed:
            self.store.redis.delete(*(self._fingerprint_key(submission) for submission in claimed))
            for submission in claimed:
                submission.claimed = False  # let go: the key may be another request's by now

    @staticmethod
    def _scoped_key(submission: _Submission) -> str:
        return scoped_idempotency_key(submission.idempotency_key, submission.owner)

    @classmethod
    def _keys(cls, submission: _Submission) -> list[str]:
        """The key each job of the submission is remembered under: its own for one job; for the n-th of many, the key
        and n joined by `BULK_ITEM_MARK`, which no key a client sends holds (with ":", the bulk key "x" and the single
        key "x:0" named one job, and each got the other's)."""
        key, count = cls._scoped_key(submission), len(submission.requests)
        return [key] if count == 1 else [bulk_item_key(key, i) for i in range(count)]

    def _create_keyed(self, keyed: list[_Submission], written: list[str]) -> list[tuple[str, bool]]:
        """Record the jobs of the submissions with an idempotency key, in one round trip for them all (a key already
        taken gives its job, a key twice in the group the first one's); returns each job's (id, created), in order.
        The id of each job it tries to create is added to `written` before (a write whose answer is lost may be done),
        and taken out again where the key named a job already (created and sent by an earlier submission)."""
        jobs = _new_jobs(keyed)
        if not jobs:
            return []
        written += [job.job_id for job in jobs]
        answers = self.store.create_keyed(jobs, [key for submission in keyed for key in self._keys(submission)])
        unused = {job.job_id for job, (_, new) in zip(jobs, answers) if not new}
        written[:] = [job_id for job_id in written if job_id not in unused]
        return answers

    def _forget_keys(self, keyed: list[_Submission], job_ids: set[str]) -> None:
        """Let go of the idempotency keys of `keyed` submissions that name one of `job_ids` (jobs that failed)."""
        names = [self.store.idempotency_key(key) for submission in keyed for key in self._keys(submission)]
        if names:
            stale = [name for name, job_id in zip(names, self.store.redis.mget(names)) if job_id in job_ids]
            if stale:
                self.store.redis.delete(*stale)

    def _admit(self, group: list[_Submission]) -> list[_Submission]:
        """The submissions of `group` that fit the queue limit and their owner's quota, in order; the others are
        settled with a 429. Counts are read once for the group, and each admitted submission adds its jobs. Places
        that batches being read hold count as taken, in the queues and in their owner's quota, as for a batch."""
        store = self.store
        if not group or not (store.max_queued or store.max_queued_per_owner):
            return group
        expire_overdue(store)
        queued, held = self._batches.places_taken()
        owned: dict[str, int] = {}
        if store.max_queued_per_owner:
            wanted: dict[str, int] = {}
            for submission in group:
                if submission.owner:
                    wanted[submission.owner] = wanted.get(submission.owner, 0) + len(submission.requests)
            for owner, count in wanted.items():
                batches = held.get(owner_id(owner), 0)
                owned[owner] = batches + store.owner_queued(
                    owner, at_least=store.max_queued_per_owner - count - batches + 1)
        admitted = []
        # The keys of the submissions admitted: a twin (the same key and body, sent again before the first was
        # committed) gets the first one's jobs (`_create_keyed`), so it takes no place of its own. Counted, it was
        # refused for the place its own job took, or made a request after it refused with a count one too high.
        keys: set[str] = set()
        for submission in group:
            count, owner = len(submission.requests), submission.owner
            key = None if submission.idempotency_key is None else self._scoped_key(submission)
            if key in keys:
                admitted.append(submission)
                continue
            try:
                check_room(store, queued, count, owner, owned.get(owner, 0))
            except ApiError as refusal:
                submission.settle(error=refusal)
                continue
            queued += count
            if owner in owned:
                owned[owner] += count
            if key is not None:
                keys.add(key)
            admitted.append(submission)
        return admitted


def _fingerprint(requests: list[tuple[GenerateRequest, str]]) -> str:
    """A digest of a submission's requests as recorded (fields set, defaults applied) and their queues, in order."""
    body = json.dumps([[request.model_dump_json(exclude_none=True), queue] for request, queue in requests])
    return hashlib.sha256(body.encode()).hexdigest()


def damaged_images(store: JobStore, requests: Sequence[GenerateRequest]) -> dict[int, str]:
    """The requests (by index) that hold an image whose stored copy (`JobStore.image_key`) is damaged, and how, read
    in one round trip (`JobStore.image_damage`): its key holds another type than a hash, its count of holders is no
    number, or its data is not the image (another length). No job is written with one: its HSETNX or HINCRBY failed
    the whole write it was part of, or its worker read what the store kept in the image's place."""
    damage = store.image_damage([image for request in requests for image in request.all_images()])
    found = {}
    for index, request in enumerate(requests):
        for number, image in enumerate(request.all_images()):
            if image in damage:
                found[index] = (f"image {number}: its stored copy ({store.image_key_of(image)}) is damaged: "
                                f"{damage[image]} (changed by hand, or by another program on the key prefix)")
                break
    return found


def check_unicode(request: BaseModel, prefix: str = "") -> None:
    """422 for text that is not valid Unicode: JSON's "\\ud800" escape parses into a lone surrogate, which can be
    neither written to Redis nor serialized (it was a 500, for every submission committed with it)."""
    def bad(value) -> bool:
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return True
            return False
        if isinstance(value, (list, tuple)):
            return any(bad(item) for item in value)
        if isinstance(value, dict):
            return any(bad(key) or bad(item) for key, item in value.items())
        if isinstance(value, BaseModel):
            return any(bad(item) for _, item in value)
        return False

    for name, value in request:
        if bad(value):
            raise ApiError(422, f"{prefix}{name}: holds text that is not valid Unicode (a lone surrogate such as "
                                "\\ud800)", param=f"{prefix}{name}")


def unsent(store: JobStore, job_ids: list[str], exc: Exception) -> ApiError:
    """Jobs recorded but not enqueued (the broker refused): they end failed, in one round trip; the 503 the caller
    answers.

    An ending Redis refuses is logged, never raised: the caller answers its 503 and lets go of the jobs' keys all the
    same (a Redis error raised here made it a 500, left the group's other jobs queued with no task, and kept their
    keys naming them). A refusal that would come again (a permission an ACL denies, a record of another type:
    `answers_later` says no) is not tried again; that job stays as it is (queued with no task, or not written)."""
    endings = [Ending(job_id, "failed", f"could not enqueue the job: {exc}", ErrorCode.SERVER_ERROR, "error")
               for job_id in job_ids]
    try:
        answers = store.finish_many(endings)
    except redis.RedisError as lost:
        answers = [lost] * len(job_ids)
    refused = [(job_id, answer) for job_id, answer in zip(job_ids, answers) if isinstance(answer, Exception)]
    for later in (False, True):
        group = [(job_id, answer) for job_id, answer in refused if answers_later(answer) == later]
        if group:
            log.error("%d jobs recorded but not enqueued could not be marked failed (%s: %s)%s: %s", len(group),
                      type(group[0][1]).__name__, group[0][1],
                      ": Redis is away or refuses writes for now" if later else ": not tried again",
                      [job_id for job_id, _ in group])
    return queue_unavailable(exc)


def queue_unavailable(exc: Exception) -> ApiError:
    """The 503 of a submission the broker refused, logged (see api.errors.log_unavailable)."""
    log_unavailable("the queue (Celery's broker, Redis)", exc)
    return ApiError(503, f"the queue is unavailable: {exc}", type="unavailable", code=ErrorCode.SERVER_ERROR,
                    headers={"Retry-After": "5"})


def expire_overdue(store: JobStore) -> None:
    """Before jobs are counted against a limit, end those queued past their deadline: they are over, "whether or
    not a worker is up", but only a worker's sweep or a poll of the very job ended them, so with no worker up for
    their model they held the queue and their key's quota full (429) for jobs that had ended."""
    if store.max_queued or store.max_queued_per_owner:
        store.expire_overdue()


def check_room(store: JobStore, queued: int, count: int, owner: str | None, owned: int) -> None:
    """429 unless `count` more jobs fit: `queued` in the queues now, `owned` of them the caller's (`owner`); 400
    when `count` is over the limit itself, since no wait would let the request in."""
    if store.max_queued:
        _never_fits(count, store.max_queued, "the queues hold at most {limit} queued jobs (MAX_QUEUED_JOBS)")
        excess = queued + count - store.max_queued
        if excess > 0:
            _refuse(store, excess, f"the queue is full ({queued} jobs queued, limit {store.max_queued})")
    if owner and store.max_queued_per_owner:
        limit = store.max_queued_per_owner
        _never_fits(count, limit, "an API key may have at most {limit} queued jobs (MAX_QUEUED_JOBS_PER_KEY)")
        excess = owned + count - limit
        if excess > 0:
            _refuse(store, excess, f"this API key has {owned} jobs queued; its quota is {limit}"
                                   + (f" and this request holds {count}" if count > 1 else ""))


def _never_fits(count: int, limit: int, rule: str) -> None:
    """400 (not 429: a Retry-After would be a promise never kept) for a request of more jobs than `limit` allows."""
    if count > limit:
        raise ApiError(400, f"this request holds {count} jobs and {rule.format(limit=limit)}: split it",
                       code=ErrorCode.INVALID_REQUEST)


def _refuse(store: JobStore, excess: int, reason: str) -> None:
    """429 with a Retry-After from the measured drain rate: about when `excess` queued jobs will have left."""
    rate = store.finished_per_second()
    retry_after = min(3600, max(1, math.ceil(excess / rate))) if rate > 0 else 30
    raise ApiError(429, f"{reason}; retry in about {retry_after} s", type="overloaded", code=ErrorCode.OVERLOADED,
                   headers={"Retry-After": str(retry_after)})
