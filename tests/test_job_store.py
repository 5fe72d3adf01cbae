"""The job store (shared/jobs.py) on a real Redis of each test's own: round trips of a keyed job's creation, the
hand-back bound as a setting, endings Redis refuses for good (a permission, a key of another type), long worker
names."""

import logging
import threading
import time

import pytest
import redis

from api.errors import ApiError
from api.submission import Submitter, unsent
from shared.celery_app import make_celery
from shared import jobs
from shared.jobs import HANDED_BACK_ERROR, MAX_HAND_BACKS, JobStore, NewJob
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings


@pytest.fixture
def redis_url():
    with RedisServer() as server:
        yield server.url


def calls_of(client: redis.Redis) -> dict[str, int]:
    """Redis's count of every command it has run (INFO commandstats), by name."""
    return {name.removeprefix("cmdstat_"): stats["calls"] for name, stats in client.info("commandstats").items()}


def commands_during(client: redis.Redis, action) -> dict[str, int]:
    """The commands Redis ran (as counted by INFO commandstats) while `action()` ran, by name; the INFO calls
    themselves left out. Commands a script runs count as well as the EVALSHA itself."""
    before = calls_of(client)
    action()
    after = calls_of(client)
    ran = {name: count - before.get(name, 0) for name, count in after.items() if count != before.get(name, 0)}
    ran["info"] = ran.get("info", 0) - 1
    return {name: count for name, count in ran.items() if count}


class Counting(redis.Connection):
    """Counts the requests the client sends (a pipeline is one): Redis round trips."""

    sent = 0

    def send_packed_command(self, *args, **kwargs):
        Counting.sent += 1
        return super().send_packed_command(*args, **kwargs)


def counting_store(redis_url: str, **kwargs) -> JobStore:
    pool = redis.ConnectionPool.from_url(redis_url, decode_responses=True, connection_class=Counting)
    return JobStore(redis.Redis(connection_pool=pool), "js", **kwargs)


def round_trips(action) -> int:
    before = Counting.sent
    action()
    return Counting.sent - before


def request(prompt: str = "hi") -> GenerateRequest:
    return GenerateRequest(prompt=prompt)


# --- 1. A job under an Idempotency-Key: one round trip ---------------------------------------------------------------

def test_a_job_created_under_an_idempotency_key_takes_one_round_trip(redis_url):
    # Since the key was set in the transaction that writes the record, a keyed creation was WATCH, GET, INCR, then
    # MULTI/EXEC: four round trips per job, one after another (a bulk submission of n jobs: 4n). Now one script
    # checks the key and writes record and key, and a group's keyed jobs go in one pipelined round trip.
    store = counting_store(redis_url)
    store.create(request("warm-up"), "interactive", idempotency_key="warm-up")  # loads the script

    ran = commands_during(store.redis, lambda: store.create(request(), "interactive", idempotency_key="k"))
    assert "watch" not in ran and "multi" not in ran and "exec" not in ran, ran
    assert round_trips(lambda: store.create(request("b"), "interactive", idempotency_key="k2")) == 1
    assert round_trips(lambda: store.create(request("b"), "interactive", idempotency_key="k2")) == 1  # known key

    jobs = [NewJob(request(f"bulk {index}"), "batch") for index in range(5)]
    answers: list = []
    assert round_trips(lambda: answers.extend(store.create_keyed(jobs, [f"bulk:{index}" for index in range(5)]))) == 1
    assert [created for _, created in answers] == [True] * 5
    assert [store.get(job_id)["prompt"] for job_id, _ in answers] == [f"bulk {index}" for index in range(5)]
    # The order of the queue is the order of creation, after the jobs created before.
    queue = store.redis.zrange(store.queue_key("batch"), 0, -1)
    assert queue == [job_id for job_id, _ in answers]
    assert store.redis.hget(store.submitted_key, "batch") == "5"


def test_a_keyed_submission_takes_two_round_trips_before_its_task_is_sent(redis_url):
    # The check of the key (check_idempotency) and then one write of every keyed job of the group: it was 1 + 4 per job.
    store = counting_store(redis_url)
    submitter = Submitter(store, make_celery(Settings(redis_url=redis_url)))
    single = [(request("once"), "interactive")]
    submitter.submit(single, idempotency_key="warm-up")  # loads the scripts

    ids: list = []
    assert round_trips(lambda: ids.extend(submitter.submit(single, idempotency_key="k"))) == 2
    assert round_trips(lambda: submitter.submit(single, idempotency_key="k")) == 1  # a retry: its job, at once
    bulk = [(request(f"b{index}"), "interactive") for index in range(4)]
    assert round_trips(lambda: ids.extend(submitter.submit(bulk, idempotency_key="bulk"))) == 2
    assert [store.get(job_id)["status"] for job_id in ids] == ["queued"] * 5


def test_one_job_for_one_key_however_many_create_it_at_once(redis_url):
    stores = [JobStore.from_url(redis_url, "js") for _ in range(8)]
    start = threading.Barrier(len(stores))
    answers: list = [None] * len(stores)

    def create(index):
        start.wait()
        answers[index] = stores[index].create(request(f"from {index}"), "interactive", idempotency_key="same")

    threads = [threading.Thread(target=create, args=(index,)) for index in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len({job_id for job_id, _ in answers}) == 1
    assert sum(created for _, created in answers) == 1
    assert stores[0].redis.zcard(stores[0].queue_key("interactive")) == 1
    assert len(list(stores[0].redis.scan_iter("js:job:*"))) == 1


def test_a_key_never_names_a_job_whose_write_failed(redis_url):
    # A write stopped by an error (here the queue's key holds another type: WRONGTYPE) sets no key: the key is written
    # last, and a retry creates the job once the cause is gone.
    store = JobStore.from_url(redis_url, "js", max_queued_per_owner=5)
    store.redis.set(store.queue_key("interactive"), "not a sorted set")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        store.create(request(), "interactive", idempotency_key="k", owner="owner-a")
    assert store.redis.get(store.idempotency_key("k")) is None
    store.redis.delete(store.queue_key("interactive"))
    job_id, created = store.create(request(), "interactive", idempotency_key="k", owner="owner-a",
                                   deadline_seconds=60)
    assert created and store.redis.get(store.idempotency_key("k")) == job_id
    record = store.get(job_id)
    assert (record["status"], record["queue_position"], record["owner"]) == ("queued", 0, "owner-a")
    assert store.redis.zscore(store.deadlines_key, job_id) == float(record["deadline"])
    assert store.owner_queued("owner-a") == 1
    assert store.redis.ttl(store.idempotency_key("k")) > 0


# --- 2. The hand-back bound, a setting --------------------------------------------------------------------------------

def test_the_hand_back_bound_is_a_setting(redis_url, monkeypatch):
    assert Settings().max_hand_backs == MAX_HAND_BACKS == 10
    monkeypatch.setenv("LLAVA_QUEUE_MAX_HAND_BACKS", "2")
    assert Settings().max_hand_backs == 2
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv("LLAVA_QUEUE_MAX_HAND_BACKS", bad)
        with pytest.raises(ValueError, match="max_hand_backs"):
            Settings()
    with pytest.raises(ValueError, match="max_hand_backs"):
        JobStore.from_url(redis_url, "js", max_hand_backs=-1)

    def handed_back(store: JobStore, times: int) -> str:
        job_id, _ = store.create(request(), "interactive")
        for n in range(times):
            assert store.start(job_id, f"stopping-{n}") in ("running", "resumed")
            assert store.release(job_id, f"stopping-{n}")
        return job_id

    store = JobStore.from_url(redis_url, "js", max_hand_backs=2)
    assert store.start(handed_back(store, 3), "w") == "handed_back"
    assert store.start(handed_back(store, 2), "w") == "resumed"
    assert store.start(handed_back(store, 3), "w", max_hand_backs=3) == "resumed"  # given for one start
    assert store.handed_back_error == jobs.handed_back_error(2) and "more than 2 times" in store.handed_back_error
    default = JobStore.from_url(redis_url, "js")
    assert default.max_hand_backs == MAX_HAND_BACKS and default.handed_back_error == HANDED_BACK_ERROR
    assert default.start(handed_back(default, 3), "w") == "resumed"


# --- 3. Endings Redis refuses for good -----------------------------------------------------------------------------

def restricted_store(redis_url: str, *rules: str) -> JobStore:
    """A store on a client logged in as an ACL user with `rules` (on top of every key, channel and command)."""
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser("limited", enabled=True, nopass=True, keys=["~*"], channels=["*"], commands=["+@all", *rules],
                      reset=True)
    return JobStore(redis.Redis.from_url(redis_url, decode_responses=True, username="limited", password="x"), "js")


def test_unsent_jobs_whose_failed_ending_redis_refuses_are_logged_not_raised(redis_url, caplog):
    # The broker refused a group's tasks; marking its jobs failed met a permanent Redis error (an ACL's NOPERM, a
    # record of another type). The error was raised out of the 503: the client got a 500, the group's other jobs
    # stayed queued with no task, and their idempotency keys kept naming them. Now each refused ending is logged,
    # not tried again, and the others are written.
    store = JobStore.from_url(redis_url, "js")
    ids = [store.create(request(f"p{index}"), "interactive")[0] for index in range(3)]
    store.redis.delete(store.key(ids[1]))
    store.redis.set(store.key(ids[1]), "a record of another type")  # WRONGTYPE for this job alone
    with caplog.at_level(logging.ERROR, logger="llava_queue.api"):
        error = unsent(store, ids, OSError("the broker is away"))
    assert isinstance(error, ApiError) and error.status == 503
    assert [store.redis.hget(store.key(job_id), "status") for job_id in (ids[0], ids[2])] == ["failed", "failed"]
    assert ids[1] in caplog.text and "WRONGTYPE" in caplog.text and "not tried again" in caplog.text

    denied = restricted_store(redis_url, "-evalsha", "-eval")  # NOPERM for every ending
    job_id, _ = store.create(request("denied"), "interactive")
    caplog.clear()
    def refused() -> int:
        return store.redis.info("commandstats").get("cmdstat_evalsha", {}).get("rejected_calls", 0)

    before = refused()
    with caplog.at_level(logging.ERROR, logger="llava_queue.api"):
        error = unsent(denied, [job_id], OSError("the broker is away"))
    assert error.status == 503 and job_id in caplog.text and "NoPermissionError" in caplog.text
    assert refused() - before == 1  # tried once, not again
    assert store.get(job_id)["status"] == "queued"


def test_a_submission_whose_failed_endings_redis_refuses_still_gets_its_503_and_lets_its_key_go(redis_url, caplog):
    with RedisServer() as broker:
        broker_url = broker.url  # stopped: the broker is away

    class Refusing(JobStore):
        """Writes records as usual; every ending is refused (an ACL that denies the finish script, say)."""

        def finish_many(self, endings):
            return [redis.exceptions.NoPermissionError("NOPERM this user has no permissions (by the test)")
                    for _ in endings]

        def finish(self, *args, **kwargs):
            raise redis.exceptions.NoPermissionError("NOPERM this user has no permissions (by the test)")

    store = Refusing.from_url(redis_url, "js")
    submitter = Submitter(store, make_celery(Settings(redis_url=broker_url)))
    with caplog.at_level(logging.ERROR, logger="llava_queue.api"), pytest.raises(ApiError) as refused:
        submitter.submit([(request("once"), "interactive")] * 2, idempotency_key="k")
    assert refused.value.status == 503 and "NOPERM" in caplog.text
    # Its keys are let go: the retry (the broker back) creates jobs that run, not those left unsent.
    assert [store.redis.get(store.idempotency_key(f"k\u2192{index}")) for index in range(2)] == [None, None]


def test_an_overdue_job_whose_expiry_redis_refuses_does_not_block_every_admission(redis_url, caplog):
    # A job in the deadline set whose record is of another type (WRONGTYPE): the sweep that runs before every
    # admission under a queue limit raised on it, and left it there to raise again: every submission failed (500),
    # for good. Now its error is logged and it leaves the deadline set.
    store = JobStore.from_url(redis_url, "js", max_queued=5)
    submitter = Submitter(store, make_celery(Settings(redis_url=redis_url)))
    store.redis.zadd(store.deadlines_key, {"broken": 1.0})
    store.redis.set(store.key("broken"), "a record of another type")
    with caplog.at_level(logging.ERROR, logger="llava_queue.jobs"):
        [job_id] = submitter.submit([(request("fits"), "interactive")])
    assert store.get(job_id)["status"] == "queued"
    assert store.redis.zscore(store.deadlines_key, "broken") is None
    assert "broken" in caplog.text and "WRONGTYPE" in caplog.text
    submitter.submit([(request("and the next"), "interactive")])


# --- 4. Long worker names --------------------------------------------------------------------------------------------

def test_a_worker_name_past_512_characters_is_held_in_records_and_keys(redis_url):
    # A worker's name is `<model>@<host>/<token>:<pid>` (workers/main.py): past 512 characters with a model name near
    # the longest a request may name. Redis keys and fields take it whole, and so does every script that compares it
    # (the fence of a running job, the heartbeat key, a hand-back, the sweep's claim); Celery takes it as its node
    # name too (checked by hand: a 70,013-character node name starts, runs tasks and answers a ping).
    from shared.jobs import WorkerRegistry

    store = JobStore.from_url(redis_url, "js")
    registry = WorkerRegistry(store.redis, "js")
    for length in (600, 70_000):
        name = "m" * length + "@host/abcdef:1234"
        other = "n" * length + "@host/abcdef:1234"
        registry.announce(name, {"name": name})
        assert {"name": name} in registry.workers()
        job_id, _ = store.create(request(), "interactive")
        assert store.start(job_id, name) == "running"
        assert store.start(job_id, other) == "duplicate"  # held by a live worker of that name
        assert store.set_prompt(job_id, "prompt", 3, name)
        assert store.record_step(name, [(job_id, "hello", 1, True)], []) == [2]
        assert store.record_step(other, [(job_id, "fenced", 2, False)], []) == [-1]
        assert store.release(job_id, name)
        assert store.start(job_id, other) == "resumed"
        registry.remove(name)
        assert [claim.holder for claim in store.orphans(0)] == [other]  # `other` never announced itself
        store.finish(job_id, "succeeded", finish_reason="stop", worker=other)
        record = store.get(job_id)
        assert (record["status"], record["worker"], record["text"]) == ("succeeded", other, "hello")


def test_a_model_name_no_request_may_name_is_refused_when_the_settings_are_read(monkeypatch):
    # The one limit a long worker name meets is its model's: a request naming a model of more than MAX_MODEL_CHARS
    # (512) is a 422, so a worker serving such a name (LLAVA_QUEUE_MODEL_NAME) was sent no job by its name, only jobs
    # naming no model, whose records then held a model no request could ask for. Now the worker (and every process)
    # stops at start with the variable named.
    from shared.protocol import MAX_MODEL_CHARS

    assert Settings(model_name="m" * MAX_MODEL_CHARS).model_name == "m" * MAX_MODEL_CHARS
    for name in ("LLAVA_QUEUE_MODEL_NAME", "LLAVA_QUEUE_DEFAULT_MODEL"):
        monkeypatch.setenv(name, "m" * (MAX_MODEL_CHARS + 1))
        with pytest.raises(ValueError, match=f"{MAX_MODEL_CHARS + 1} characters long"):
            Settings()
        monkeypatch.delenv(name)


# --- 5. A model named "requeued" ----------------------------------------------------------------------------------

def test_a_worker_whose_name_starts_like_a_hand_back_mark_is_swept_as_a_worker(redis_url):
    # A hand-back or a claim marks a job in the running hash "requeued@<time>"; a worker serving a model named
    # "requeued" is named "requeued@<host>/<token>:<pid>" (workers/main.py). `orphans` took that name for a mark and
    # read a time from the rest: ValueError, and the sweep (every worker's) failed at every round, for good.
    from shared.jobs import WorkerRegistry

    store = JobStore.from_url(redis_url, "js-requeued")
    registry = WorkerRegistry(store.redis, "js-requeued")
    dead, live = "requeued@host/abcdef:1", "requeued@host/123456:2"
    registry.announce(live, {"name": live})
    dead_job, live_job, handed = (store.create(request(name), "interactive")[0] for name in ("d", "l", "h"))
    assert store.start(dead_job, dead) == "running"
    assert store.start(live_job, live) == "running"
    assert store.start(handed, live) == "running"
    assert store.release(handed, live)  # a real mark, made just now
    assert [(claim.job_id, claim.holder) for claim in store.orphans(60)] == [(dead_job, dead)]
    assert sorted(claim.job_id for claim in store.orphans(0)) == sorted([dead_job, handed])  # the mark, lapsed
    # The worker of the model "requeued" hands its job back as any other worker does, and once only.
    assert store.release(live_job, live) and store.redis.hget(store.running_key, live_job).startswith("requeued@")
    assert store.start(live_job, "other") == "resumed"
    assert not store.release(live_job, live)


def test_an_idempotency_key_is_remembered_for_the_idempotency_ttl_setting(redis_url):
    # IDEMPOTENCY_TTL_SECONDS was read and never used: keys (and the bodies they came with) lived as long as job
    # records (JOB_TTL_SECONDS), whatever it said.
    from fastapi.testclient import TestClient

    from api.main import create_app

    settings = Settings(redis_url=redis_url, idempotency_ttl_seconds=120, job_ttl_seconds=7200)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/jobs", json={"prompt": "hi", "max_new_tokens": 1},
                             headers={"Idempotency-Key": "remembered"})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        client.delete(f"/v1/jobs/{job_id}")  # no worker here: the job is cancelled, not left queued
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    key_ttl = store.ttl(f"{settings.key_prefix}:idempotency:remembered")
    bodies = store.keys(f"{settings.key_prefix}:idempotency-body:*")
    assert len(bodies) == 1
    assert 0 < key_ttl <= 120 and 0 < store.ttl(bodies[0]) <= 120, (key_ttl, store.ttl(bodies[0]))
    assert store.ttl(f"{settings.key_prefix}:job:{job_id}") > 120  # the record keeps its own TTL


def test_a_key_prefix_with_pattern_characters_lists_its_own_workers_only(redis_url):
    # The prefix went into SCAN's MATCH pattern as it is: `llq[staging]` made a character class that matched no
    # worker key (/readyz 503 for ever, no workers in /metrics or `status`), and a `*` matched other prefixes' keys.
    from shared.jobs import WorkerRegistry

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    for prefix in ("llq[staging]", "a*", "q?\\"):
        WorkerRegistry(client, prefix).announce("w@host", {"name": f"{prefix} worker"})
    WorkerRegistry(client, "abc").announce("w@host", {"name": "abc worker"})  # matched by `a*` as a pattern
    for prefix in ("llq[staging]", "a*", "q?\\"):
        assert WorkerRegistry(client, prefix).workers() == [{"name": f"{prefix} worker"}]


def test_listing_the_workers_reads_their_set_not_the_keyspace(redis_url):
    # /healthz, /readyz, /metrics and `status` list the workers on every call; a SCAN for their keys walked every job
    # record too. Redis's own command counters show which commands the listing ran.
    from shared.jobs import WorkerRegistry

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    registry = WorkerRegistry(client, "js-set")
    client.mset({f"js-set:job:{index}": "x" for index in range(2_000)})
    registry.announce("b@host", {"name": "b"})
    registry.announce("a@host", {"name": "a"})
    registry.announce("gone@host", {"name": "gone"}, ttl_seconds=1)
    registry.announce("left@host", {"name": "left"})
    registry.remove("left@host")

    def calls(command: str) -> int:
        return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)

    scans = calls("scan")
    assert registry.workers() == [{"name": "a"}, {"name": "b"}, {"name": "gone"}]
    deadline = time.monotonic() + 5
    while registry.workers() != [{"name": "a"}, {"name": "b"}]:  # its key lapsed: no longer listed
        assert time.monotonic() < deadline, registry.workers()
        time.sleep(0.1)
    assert calls("scan") == scans
    assert sorted(client.zrange(registry.names_key, 0, -1)) == ["a@host", "b@host", "gone@host"]  # until an hour lapsed


def test_overdue_jobs_are_expired_in_pipelined_rounds(redis_url):
    # One script call a job, each its own round trip: 10,000 overdue jobs (a batch whose window passed) took 10 s, and
    # every admission under a queue limit, /metrics scrape and batch read waited on that sweep. Redis counts the read
    # events it served: a round trip a job is at least one read a job; a pipelined round is a read per 16 KB of it.
    store = JobStore.from_url(redis_url, "js-overdue")
    [running] = store.create_many([request("started")], "batch", deadline_seconds=1.0)
    assert store.start(running, "w@host") == "running"  # no longer queued: not expired, and off the deadline set
    job_ids = [running] + store.create_many([request(f"late {index}") for index in range(2_500)], "batch",
                                            deadline_seconds=0.01)
    time.sleep(1.05)
    reads = store.redis.info("stats")["total_reads_processed"]
    expired = store.expire_overdue()
    assert store.redis.info("stats")["total_reads_processed"] - reads < len(job_ids) / 5
    assert sorted(expired) == sorted(job_ids[1:])
    assert [store.get(job_id)["status"] for job_id in (running, job_ids[1], job_ids[-1])] == \
        ["running", "expired", "expired"]
    assert store.redis.zcard(store.deadlines_key) == 0 and store.queue_lengths()["batch"] == 0


def test_a_page_of_jobs_is_read_in_a_round_trip_not_one_a_job(redis_url):
    # GET /v1/jobs: list_jobs read each job of a page with its own `get`, 100 round trips for a full page (100 ms on a
    # Redis 1 ms away). The records of a page are read in one pipelined round trip now, each as `get` reads it.
    store = counting_store(redis_url)
    ids = [store.create(request(f"job {n}"), "interactive", owner="key-a")[0] for n in range(30)]
    for job_id in ids[::2]:
        assert store.start(job_id, "w1") == "running"
        assert store.finish(job_id, "succeeded", worker="w1")
    store.clock()  # its TIME, every 30 s, is not the listing's
    store.list_jobs("key-a", limit=1)  # the first call of the list's script loads it
    page = []
    trips = round_trips(lambda: page.extend(store.list_jobs("key-a", limit=20)[0]))
    assert [record["id"] for record in page] == ids[::-1][:20]
    assert page == [store.get(job_id) for job_id in ids[::-1][:20]]
    # One for the list, one for the records, one for the queued jobs' places in their queues (10 of the 20 here: one
    # a job before, tests/test_job_reads_s40.py).
    assert trips == 3, trips
    succeeded = []
    trips = round_trips(lambda: succeeded.extend(store.list_jobs("key-a", limit=10, status="succeeded")[0]))
    assert [record["id"] for record in succeeded] == ids[-2::-2][:10] and trips == 2, trips


def test_a_page_whose_job_changes_as_it_is_read_is_filled_from_the_jobs_after_it(redis_url, monkeypatch):
    # A job listed as queued that a worker starts between the listing's read and its records' read leaves the page
    # (status=queued); the page goes on with the jobs after it, as it did when each job was read on its own, instead
    # of ending one short.
    store = counting_store(redis_url)
    ids = [store.create(request(f"job {n}"), "interactive", owner="key-b")[0] for n in range(6)]
    get_many = store.get_many

    def started_meanwhile(job_ids):
        if ids[-1] in job_ids and store.get(ids[-1])["status"] == "queued":
            assert store.start(ids[-1], "w1") == "running"
        return get_many(job_ids)

    monkeypatch.setattr(store, "get_many", started_meanwhile)
    page, more, cursor = store.list_jobs("key-b", limit=3, status="queued")
    assert [record["id"] for record in page] == ids[-2:-5:-1] and more and cursor == ids[-4]
