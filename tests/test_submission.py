"""Group commit of submissions (api/submission.py) on a real Redis: what arrives together is recorded and
sent together, and each submission still gets its own answer (ids, 429, the same job for a repeated key, 503)."""

import json
import threading
import time

import pytest
import redis

from api.errors import ApiError
from api.submission import Submitter
from shared.celery_app import make_celery
from shared.jobs import JobStore
from shared.protocol import GenerateRequest, JobRequest
from shared.redis_server import RedisServer
from shared.settings import Settings


class HeldStore(JobStore):
    """A JobStore whose first `create_jobs` waits for `release`, and that counts the jobs of every call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def create_jobs(self, jobs, transaction=True):
        self.calls.append(len(jobs))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        return super().create_jobs(jobs, transaction)


@pytest.fixture
def redis_url():
    """A Redis of the test's own: the tests count every key and message in it."""
    with RedisServer() as server:
        yield server.url


def make_submitter(redis_url: str, max_queued: int = 0, broker_url: str | None = None,
                   max_queued_per_owner: int = 0) -> tuple[Submitter, HeldStore]:
    store = HeldStore.from_url(redis_url, "sub", max_queued=max_queued, max_queued_per_owner=max_queued_per_owner)
    return Submitter(store, make_celery(Settings(redis_url=broker_url or redis_url))), store


def submit_held(submitter: Submitter, store: HeldStore, calls: list[tuple]) -> list:
    """Run the first call alone, hold its commit until every other call waits, then let them commit; each call's
    ids or error, in order."""
    answers: list = [None] * len(calls)

    def run(index):
        args, kwargs = calls[index]
        try:
            answers[index] = submitter.submit(*args, **kwargs)
        except ApiError as exc:
            answers[index] = exc

    threads = [threading.Thread(target=run, args=(0,))]
    threads[0].start()
    assert store.entered.wait(30)
    threads += [threading.Thread(target=run, args=(index,)) for index in range(1, len(calls))]
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 30
    while len(submitter._waiting) < len(calls) - 1:
        assert time.monotonic() < deadline, "the other calls never queued up behind the held commit"
        time.sleep(0.01)
    store.release.set()
    for thread in threads:
        thread.join(30)
    return answers


def queued_messages(store: JobStore, queue: str = "interactive") -> list[str]:
    """The job ids of the Celery messages waiting in the broker's `queue` list, oldest first."""
    raw = store.redis.lrange(queue, 0, -1)
    return [json.loads(message)["headers"]["id"] for message in reversed(raw)]


def one(prompt: str, queue: str = "interactive") -> tuple:
    return ([(GenerateRequest(prompt=prompt), queue)],), {}


def test_submissions_that_arrive_together_are_recorded_and_sent_together(redis_url):
    submitter, store = make_submitter(redis_url)
    calls = [one(f"prompt {index}") for index in range(31)]
    calls.append(([[(GenerateRequest(prompt=f"bulk {index}"), "batch") for index in range(3)]], {}))
    answers = submit_held(submitter, store, calls)

    assert store.calls == [1, 33]  # the held call alone, then everything that queued behind it at once
    ids = [job_id for answer in answers for job_id in answer]
    assert len(set(ids)) == 34
    for index, [job_id] in enumerate(answers[:31]):
        record = store.get(job_id)
        assert (record["status"], record["queue"], record["prompt"]) == ("queued", "interactive", f"prompt {index}")
    assert [store.get(job_id)["prompt"] for job_id in answers[31]] == ["bulk 0", "bulk 1", "bulk 2"]
    # Every job has its one task message, in the order the jobs were recorded.
    assert queued_messages(store) == [job_id for [job_id] in answers[:31]]
    assert queued_messages(store, "batch") == answers[31]
    order = [store.redis.zscore(store.queue_key("interactive"), job_id) for [job_id] in answers[:31]]
    assert order == sorted(order)


def test_a_refused_submission_leaves_the_rest_of_its_group_whole(redis_url):
    submitter, store = make_submitter(redis_url, max_queued=6)
    calls = [one("first"), one("a"), ([[(GenerateRequest(prompt="x"), "interactive")] * 3], {}), one("b"),
             ([[(GenerateRequest(prompt="y"), "interactive")] * 2], {}), one("c"), one("d")]
    answers = submit_held(submitter, store, calls)

    # In order: first (1), a (2), the bulk of 3 (5), b (6); the bulk of 2 and c, d no longer fit.
    accepted = [answer for answer in answers if not isinstance(answer, ApiError)]
    refused = [answer for answer in answers if isinstance(answer, ApiError)]
    assert [len(answer) for answer in accepted] == [1, 1, 3, 1]
    assert [answer.status for answer in refused] == [429, 429, 429]
    assert all("the queue is full (6 jobs queued, limit 6)" in answer.message for answer in refused[1:])
    assert sum(store.queue_lengths().values()) == 6
    assert sorted(queued_messages(store)) == sorted(job_id for answer in accepted for job_id in answer)


def test_each_api_key_is_held_to_its_quota_within_a_group(redis_url):
    submitter, store = make_submitter(redis_url, max_queued_per_owner=2)
    owned = lambda owner, prompt: ([[(GenerateRequest(prompt=prompt), "interactive")]], {"owner": owner})
    calls = [owned("key-a", "a1"), owned("key-a", "a2"), owned("key-b", "b1"), owned("key-a", "a3"),
             owned("key-b", "b2"), owned("key-b", "b3"), one("no key")]
    answers = submit_held(submitter, store, calls)

    refused = [index for index, answer in enumerate(answers) if isinstance(answer, ApiError)]
    assert refused == [3, 5]  # a3 and b3: each key already has 2 queued, counted within the group
    assert all(answers[index].status == 429 and "its quota is 2" in answers[index].message for index in refused)
    assert len(queued_messages(store)) == 5


def test_a_repeated_idempotency_key_in_one_group_gives_one_job(redis_url):
    submitter, store = make_submitter(redis_url)
    keyed = ([[(GenerateRequest(prompt="once"), "interactive")]], {"idempotency_key": "same"})
    answers = submit_held(submitter, store, [one("first"), keyed, one("between"), keyed, keyed])

    assert answers[1] == answers[3] == answers[4]
    assert len(queued_messages(store)) == 3  # first, between, and the keyed job once
    assert submitter.submit(*keyed[0], **keyed[1]) == answers[1]  # a later retry too
    assert len(queued_messages(store)) == 3


def test_when_the_broker_is_away_every_job_of_the_group_fails_with_503(redis_url):
    with RedisServer() as broker:
        broker_url = broker.url
    submitter, store = make_submitter(redis_url, broker_url=broker_url)  # the broker's Redis has stopped
    answers = submit_held(submitter, store, [one("first"), one("a"), one("b")])

    assert all(isinstance(answer, ApiError) and answer.status == 503 for answer in answers)
    assert "the queue is unavailable" in answers[0].message
    records = [store.get(job_id) for job_id in store.redis.zrange(store.queue_key("interactive"), 0, -1)]
    assert records == []  # none is left queued without a task
    failed = [key for key in store.redis.scan_iter("sub:job:*")]
    assert len(failed) == 3
    assert {store.redis.hget(key, "status") for key in failed} == {"failed"}


def test_a_retry_after_the_broker_was_away_gets_a_job_that_runs(redis_url):
    # A 503 says "retry": a client that does, with the same Idempotency-Key, must get a job that is sent to the
    # workers, not the one that failed because it could not be sent.
    with RedisServer() as broker:
        broker_url = broker.url
    away, store = make_submitter(redis_url, broker_url=broker_url)
    store.release.set()  # no holding here
    request = [(GenerateRequest(prompt="once"), "interactive")]
    for key, requests_ in (("single", request), ("bulk", request * 2)):
        with pytest.raises(ApiError) as refused:
            away.submit(requests_, idempotency_key=key, owner="key-a")
        assert refused.value.status == 503

        back, back_store = make_submitter(redis_url)
        back_store.release.set()
        ids = back.submit(requests_, idempotency_key=key, owner="key-a")
        assert [store.get(job_id)["status"] for job_id in ids] == ["queued"] * len(requests_)
        assert back.submit(requests_, idempotency_key=key, owner="key-a") == ids  # and that job from now on
    assert len(queued_messages(store)) == 3


def test_text_that_is_not_unicode_is_refused_alone(redis_url):
    # JSON's "\ud800" escape parses into a lone surrogate, which can be neither serialized nor written to Redis: it
    # was a 500, for the request and for every submission committed in the same group. Now a 422 names the field,
    # before the submission joins a group.
    submitter, store = make_submitter(redis_url)
    store.release.set()  # no holding here
    fine = (GenerateRequest(prompt="fine"), "interactive")
    for requests_, param in (([fine, (GenerateRequest(prompt="bad \ud800"), "batch")], "jobs.1.prompt"),
                             ([(GenerateRequest(prompt="hi", stop=["\udfff"]), "interactive")], "stop"),
                             ([(GenerateRequest(prompt="hi", model="m\ud800"), "interactive")], "model")):
        with pytest.raises(ApiError) as refused:
            submitter.submit(requests_)
        assert (refused.value.status, refused.value.param) == (422, param)
        assert "not valid Unicode" in refused.value.message
    assert len(submitter.submit([fine, fine])) == 2
    assert len(queued_messages(store)) == 2 and len(list(store.redis.scan_iter("sub:job:*"))) == 2


def test_an_idempotency_key_reused_with_another_body_is_a_422(redis_url):
    # A key sent again with a different request is a client bug (a key generator that repeats, a key reused for the
    # next prompt): it was answered 202 with the first request's job, so the second prompt was silently dropped and
    # its caller polled someone else's answer. As Stripe and the IETF Idempotency-Key draft: 422, nothing created.
    submitter, store = make_submitter(redis_url)
    store.release.set()  # no holding here
    first = [(GenerateRequest(prompt="first"), "interactive")]
    ids = submitter.submit(first, idempotency_key="k", owner="key-a")
    for other in ([(GenerateRequest(prompt="second"), "interactive")],  # another prompt
                  [(GenerateRequest(prompt="first"), "batch")],  # another queue
                  [(GenerateRequest(prompt="first", max_new_tokens=5), "interactive")]):  # another parameter
        with pytest.raises(ApiError) as refused:
            submitter.submit(other, idempotency_key="k", owner="key-a")
        assert (refused.value.status, refused.value.param) == (422, "header.idempotency-key"), refused.value.message
    assert submitter.submit(first, idempotency_key="k", owner="key-a") == ids  # the same request: its job
    bulk = [(GenerateRequest(prompt=f"b{index}"), "interactive") for index in range(2)]
    bulk_ids = submitter.submit(bulk, idempotency_key="bulk", owner="key-a")
    with pytest.raises(ApiError) as longer:  # one more job under the key of a bulk of two
        submitter.submit(bulk + first, idempotency_key="bulk", owner="key-a")
    assert longer.value.status == 422
    assert submitter.submit(bulk, idempotency_key="bulk", owner="key-a") == bulk_ids
    assert len(queued_messages(store)) == 3


def test_an_idempotency_key_reused_with_another_body_in_one_group_is_a_422(redis_url):
    submitter, store = make_submitter(redis_url)
    keyed = lambda prompt: ([[(GenerateRequest(prompt=prompt), "interactive")]], {"idempotency_key": "same"})
    answers = submit_held(submitter, store, [one("first"), keyed("a"), keyed("b"), keyed("a")])

    assert answers[1] == answers[3] and isinstance(answers[2], ApiError) and answers[2].status == 422
    assert store.get(answers[1][0])["prompt"] == "a"
    assert len(queued_messages(store)) == 2


def test_a_key_refused_for_a_full_queue_may_carry_another_body_next_time(redis_url):
    # Nothing was created under a key whose submission was refused (429): the key stays free for any request.
    submitter, store = make_submitter(redis_url, max_queued=1)
    store.release.set()  # no holding here
    submitter.submit([(GenerateRequest(prompt="fills the queue"), "interactive")])
    with pytest.raises(ApiError) as full:
        submitter.submit([(GenerateRequest(prompt="a"), "interactive")], idempotency_key="k")
    assert full.value.status == 429
    store.redis.delete(store.queue_key("interactive"))  # the queue drained
    [job_id] = submitter.submit([(GenerateRequest(prompt="b"), "interactive")], idempotency_key="k")
    assert store.get(job_id)["prompt"] == "b"


def test_a_key_whose_jobs_expired_submits_anew(redis_url):
    # JOB_TTL_SECONDS shorter than IDEMPOTENCY_TTL_SECONDS: the job's record expires while its key is remembered. A
    # retry was given the id of that job, which no longer existed (POST /v1/jobs: 202 "queued" for a 404; a chat
    # completion: a 500). The key goes with its job, as though it had expired too, and the retry is a new submission.
    submitter, store = make_submitter(redis_url)
    store.release.set()  # no holding here
    first = [(GenerateRequest(prompt="first"), "interactive")]
    [gone] = submitter.submit(first, idempotency_key="k", owner="key-a")
    store.redis.delete(store.key(gone))  # its TTL
    [again] = submitter.submit(first, idempotency_key="k", owner="key-a")
    assert again != gone and store.get(again)["status"] == "queued"
    assert submitter.submit(first, idempotency_key="k", owner="key-a") == [again]  # a retry of the retry: its job
    store.redis.delete(store.key(again))
    # With its jobs gone, the key may carry another body, as an expired one may.
    [other] = submitter.submit([(GenerateRequest(prompt="second"), "interactive")], idempotency_key="k",
                               owner="key-a")
    assert store.get(other)["prompt"] == "second"
    # A bulk one of whose jobs is gone gets a new job in its place, and the others it had.
    bulk = [(GenerateRequest(prompt=f"b{index}"), "interactive") for index in range(3)]
    bulk_ids = submitter.submit(bulk, idempotency_key="bulk", owner="key-a")
    store.redis.delete(store.key(bulk_ids[1]))
    retried = submitter.submit(bulk, idempotency_key="bulk", owner="key-a")
    assert retried[0] == bulk_ids[0] and retried[2] == bulk_ids[2] and retried[1] != bulk_ids[1], (retried, bulk_ids)
    assert store.get(retried[1])["prompt"] == "b1"
    with pytest.raises(ApiError) as refused:  # the key still holds its body, some of its jobs being there
        submitter.submit(bulk[:2], idempotency_key="bulk", owner="key-a")
    assert refused.value.status == 422
    assert len(queued_messages(store)) == 1 + 1 + 1 + 3 + 1


def test_jobs_past_their_deadline_leave_room_in_the_queue_with_no_worker_up(redis_url):
    # With no worker sweeping, overdue jobs were expired only when polled: unpolled, they held the queue full (429).
    submitter, store = make_submitter(redis_url, max_queued=2)
    store.release.set()  # no holding here
    submitter.submit([(JobRequest(prompt="soon gone", deadline_seconds=0.2), "interactive")] * 2)
    with pytest.raises(ApiError) as full:
        submitter.submit([(JobRequest(prompt="waits"), "interactive")])
    assert full.value.status == 429
    time.sleep(0.3)
    [job_id] = submitter.submit([(JobRequest(prompt="fits now"), "interactive")])
    assert store.queue_lengths()["interactive"] == 1 and store.get(job_id)["status"] == "queued"


def test_an_idempotency_key_is_checked_in_one_round_trip(redis_url):
    # A submission with an Idempotency-Key asked Redis whether the key was used with another body (SET NX, then GET
    # when it was), then whether its jobs exist (MGET): up to three round trips, one after another, before its group
    # was committed. Now one script answers all of it; what each submission gets is unchanged.
    class Counting(redis.Connection):
        """Counts the requests the client sends (a pipeline is one): Redis round trips."""

        sent = 0

        def send_packed_command(self, *args, **kwargs):
            Counting.sent += 1
            return super().send_packed_command(*args, **kwargs)

    class FirstWrite(HeldStore):
        """Notes how many round trips had been sent when the first job of a submission was written."""

        at_write: int | None = None

        def create_keyed(self, *args, **kwargs):
            if self.at_write is None:
                self.at_write = Counting.sent
            return super().create_keyed(*args, **kwargs)

    pool = redis.ConnectionPool.from_url(redis_url, decode_responses=True, connection_class=Counting)
    store = FirstWrite(redis.Redis(connection_pool=pool), "sub")
    store.release.set()  # no holding here
    submitter = Submitter(store, make_celery(Settings(redis_url=redis_url)))
    request = [(GenerateRequest(prompt="once"), "interactive")]
    submitter.submit(request, idempotency_key="warm-up")  # loads the script

    def round_trips(requests_, key) -> tuple[int, object]:
        store.at_write, before = None, Counting.sent
        try:
            answer = submitter.submit(requests_, idempotency_key=key)
        except ApiError as refused:
            answer = refused
        return (store.at_write if store.at_write is not None else Counting.sent) - before, answer

    sent, ids = round_trips(request, "k")  # a first use: one round trip before its job is written
    assert sent == 1 and len(ids) == 1
    assert round_trips(request, "k") == (1, ids)  # a retry: its job, in one round trip
    sent, refused = round_trips([(GenerateRequest(prompt="other"), "interactive")], "k")  # another body: 422
    assert sent == 1 and isinstance(refused, ApiError) and refused.status == 422
    bulk = request * 2
    sent, bulk_ids = round_trips(bulk, "bulk")
    assert sent == 1 and len(bulk_ids) == 2
    assert round_trips(bulk, "bulk") == (1, bulk_ids)
    assert len(queued_messages(store)) == 4


class CutOff(HeldStore):
    """A HeldStore whose connection to Redis breaks while it writes the jobs numbered in `cut` (counted from 0 over
    every job it writes): what a Redis restart or a network cut between two round trips does."""

    cut: set[int] = set()
    written = 0

    def _queued_record(self, *args, **kwargs):
        self.written += 1
        if self.written - 1 in self.cut:
            raise redis.ConnectionError("Connection reset by peer (cut by the test)")
        return super()._queued_record(*args, **kwargs)


def test_a_keyed_submission_cut_off_by_redis_leaves_no_key_naming_a_job_that_does_not_exist(redis_url):
    # The job created under an Idempotency-Key was claimed (SET NX) a round trip before its record was written: a
    # connection cut between them left the key naming a job that does not exist. The client's retry got that id (202)
    # and then 404 for it, for good: the job was lost. Now the key is set in the transaction that writes the record.
    store = CutOff.from_url(redis_url, "sub")
    store.cut = {0, 3}  # the single job's write; the second job of the bulk (its first try)
    store.release.set()  # no holding here
    submitter = Submitter(store, make_celery(Settings(redis_url=redis_url)))
    single = [(GenerateRequest(prompt="once"), "interactive")]
    bulk = [(GenerateRequest(prompt=f"b{index}"), "interactive") for index in range(2)]
    for requests_, key in ((single, "single"), (bulk, "bulk")):
        with pytest.raises((redis.ConnectionError, ApiError)):
            submitter.submit(requests_, idempotency_key=key)
        ids = submitter.submit(requests_, idempotency_key=key)  # the client's retry
        records = [store.get(job_id) for job_id in ids]
        assert [record and record["status"] for record in records] == ["queued"] * len(requests_), ids
        assert submitter.submit(requests_, idempotency_key=key) == ids
    assert len(queued_messages(store)) == 3


def test_an_old_record_that_a_script_cannot_count_on_leaves_the_other_overdue_jobs_to_expire(redis_url):
    # A queued job past its deadline whose record holds a seq that is no number (written by another version, or by
    # hand) made the ending script raise ("hash value is not an integer"). The sweep before every admission stopped
    # there: every submission under a queue limit was refused with that error (a 500), the job stayed in the
    # deadline set to break the next one, and the other overdue jobs were never expired. Its seq now counts as 0.
    submitter, store = make_submitter(redis_url, max_queued=2)
    store.release.set()  # no holding here
    ids = submitter.submit([(JobRequest(prompt="soon gone", deadline_seconds=0.2), "interactive")] * 2)
    store.redis.hset(store.key(ids[0]), "seq", "x")
    time.sleep(0.3)
    [job_id] = submitter.submit([(JobRequest(prompt="fits now"), "interactive")])
    assert [store.get(expired)["status"] for expired in ids] == ["expired", "expired"]
    assert store.get(ids[0])["seq"] == 1 and store.get(job_id)["status"] == "queued"


class AnswerLost(HeldStore):
    """A HeldStore whose first write of jobs (`create_jobs`, or `create_keyed` under an idempotency key) reaches Redis
    and then loses its answer with the connection: the records are written, and the caller hears an error."""

    lost = False

    def _lose_the_answer(self):
        if not self.lost:
            self.lost = True
            raise redis.ConnectionError("Connection reset by peer (after the write, cut by the test)")

    def create_jobs(self, jobs, transaction=True):
        ids = super().create_jobs(jobs, transaction)
        if jobs:
            self._lose_the_answer()
        return ids

    def create_keyed(self, *args, **kwargs):
        created = super().create_keyed(*args, **kwargs)
        self._lose_the_answer()
        return created


def test_jobs_written_before_their_answer_was_lost_do_not_wait_for_ever_unsent(redis_url):
    # A write of jobs whose answer was lost (Redis wrote them, then the connection broke) raised before their tasks
    # were sent, and nothing ended them: they stayed queued for good with no task to run them, holding places in the
    # queue and their key's quota. Under an Idempotency-Key it was worse: the client's retry was given that job,
    # which never ran. Now they end failed, as jobs whose tasks could not be sent, and the key is let go.
    for keyed in (False, True):
        store = AnswerLost.from_url(redis_url, f"lost-{keyed}")
        store.release.set()  # no holding here
        submitter = Submitter(store, make_celery(Settings(redis_url=redis_url)))
        key = {"idempotency_key": "k"} if keyed else {}
        request = [(GenerateRequest(prompt="once"), "interactive")]
        with pytest.raises((redis.ConnectionError, ApiError)):
            submitter.submit(request, owner="key-a", **key)
        assert store.queue_lengths() == {"interactive": 0, "batch": 0}, keyed  # none waits without a task
        [ended] = [store.get(name.rpartition(":")[2]) for name in store.redis.scan_iter(f"lost-{keyed}:job:*")]
        assert ended["status"] == "failed" and "could not enqueue the job" in ended["error"]
        if keyed:
            [job_id] = submitter.submit(request, owner="key-a", **key)  # the client's retry: a job that runs
            assert store.get(job_id)["status"] == "queued" and job_id in queued_messages(store)


def test_twins_in_one_group_take_one_place(redis_url):
    # The same Idempotency-Key and body twice in one commit (a client's retry while the first was being committed)
    # make one job: the twin took a place of its own all the same, so it was refused (429) for the place its own job
    # took, or a request after it was refused with a count one too high.
    keyed = ([[(GenerateRequest(prompt="keyed"), "interactive")]], {"idempotency_key": "same"})
    submitter, store = make_submitter(redis_url, max_queued=2)
    answers = submit_held(submitter, store, [one("first"), keyed, keyed])
    assert not any(isinstance(answer, ApiError) for answer in answers), answers
    assert answers[1] == answers[2] and len(queued_messages(store)) == 2

    # Two jobs queued already: with five places, three more jobs fit, the twins' one job among them.
    again = ([[(GenerateRequest(prompt="keyed"), "interactive")]], {"idempotency_key": "again"})
    submitter, store = make_submitter(redis_url, max_queued=5)
    answers = submit_held(submitter, store, [one("first"), again, again, one("after")])
    assert not any(isinstance(answer, ApiError) for answer in answers), answers
    assert len(set(job for answer in answers for job in answer)) == 3 and len(queued_messages(store)) == 5
