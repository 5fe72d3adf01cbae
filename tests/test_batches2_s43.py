"""A damaged batch record is a 500 that says so, and lists go on without it; a batch whose reader died is failed as
abandoned by the lost-task sweep, its lines cancelled, without waiting for someone to read it."""

import logging
import time

import pytest
from fastapi.testclient import TestClient

import shared.batches
from api.routes.batches import BatchCreate, create
from shared.batches import BatchStore, new_batch_id
from shared.celery_app import make_celery, resend_lost_tasks
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import ErrorCode, GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_batches import jsonl, questions
from test_batches2_s42 import ReadSlowly


def test_a_damaged_batch_is_a_500_that_says_so_and_lists_go_on_without_it(caplog):
    # A batch key SET by hand answered 503 "the job store is unavailable ... WRONGTYPE" (Redis was fine), and one whose
    # fields did not read as times or counts a bare 500 (a ValueError): each failed the batch and file lists too.
    from api.main import create_app

    with RedisServer() as server, TestClient(create_app(Settings(redis_url=server.url))) as client:
        batches = BatchStore(JobStore.from_url(server.url), 3600)
        ids = [new_batch_id() for _ in range(3)]
        for batch_id in ids:
            batches.create(batch_id, {"params": None})
            batches.activate(batch_id, 1, 1, [{"code": "invalid_line", "message": "no", "param": None, "line": 1}])
        healthy, string, fields = ids
        batches.redis.delete(batches.key(string))
        batches.redis.set(batches.key(string), "a record of another type")
        batches.redis.hset(batches.key(fields), mapping={"failed_at": "not a time", "total": "x"})
        damage = {string: "its key holds a string, not a hash", fields: "it has no valid failed_at, total"}
        with caplog.at_level(logging.WARNING, logger="llava_queue.api"):
            for batch_id, what in damage.items():
                for method, path in (("GET", f"/v1/batches/{batch_id}"), ("POST", f"/v1/batches/{batch_id}/cancel"),
                                     ("GET", f"/v1/files/file-{batch_id}-errors")):
                    answer = client.request(method, path)
                    error = answer.json()["error"]
                    assert (answer.status_code, error["type"], error["code"]) == (500, "server_error",
                                                                                 ErrorCode.SERVER_ERROR), answer.text
                    assert error["message"].startswith(f"batch {batch_id}: the batch's record is damaged: {what}")
            listed = client.get("/v1/batches")
            files = client.get("/v1/files")
        assert listed.status_code == 200, listed.text
        shown = {batch["id"]: batch for batch in listed.json()["data"]}
        assert shown.keys() == set(ids) and shown[healthy]["status"] == "failed", shown
        assert shown[healthy]["error_file_id"] == f"file-{healthy}-errors"
        for batch_id, what in damage.items():
            # As the jobs list shows a damaged job: failed, saying what its own read says.
            assert shown[batch_id]["status"] == "failed" and shown[batch_id]["error_file_id"] is None
            [error] = shown[batch_id]["errors"]["data"]
            assert error["code"] == "damaged_record" and what in error["message"], error
        assert files.status_code == 200, files.text
        assert [file["id"] for file in files.json()["data"]] == [f"file-{healthy}-errors"]
    assert not any("is unavailable" in record.getMessage() for record in caplog.records)


class ReaderDied(Exception):
    """The API process reading a batch file stops where it is, as a killed one does."""


def test_the_sweep_fails_a_batch_whose_reader_died_and_cancels_its_lines(monkeypatch):
    # Left `validating` until someone read the batch, its queued lines were passed over by every sweep (their batch
    # was still read), and waited for their deadline.
    monkeypatch.setattr(shared.batches, "READER_LEASE_SECONDS", 1)  # a lease that lapses within the test

    class DyingRead(ReadSlowly):
        def overtake(self) -> None:
            raise ReaderDied

    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        settings = Settings(redis_url=server.url)
        app = make_celery(settings)
        with pytest.raises(ReaderDied):
            create(BatchCreate(temperature=0, max_new_tokens=2), DyingRead(jsonl(questions(1000, image=False))), store,
                   batches, app, WorkerRegistry(store.redis, store.prefix), settings, None)
        [dead] = store.redis.zrange(batches.index_key, 0, -1)
        dead_lines = list(batches.job_ids(dead))
        assert dead_lines and all(store.get(job_id)["status"] == "queued" for job_id in dead_lines)

        def being_read(batch_id: str) -> list[str]:
            """A batch being read (its reader alive), with a line queued."""
            batches.create(batch_id, {"params": None})
            line = store.create_many([GenerateRequest(prompt="Hello", max_new_tokens=2)], "batch",
                                     extra=[{"batch": batch_id, "batch_line": 0}])
            batches.add_lines(batch_id, [{"line": 1, "job": line[0], "question_id": 1, "prompt": "Hello"}])
            return line

        alive, damaged = new_batch_id(), new_batch_id()
        alive_lines, damaged_lines = being_read(alive), being_read(damaged)
        batches.redis.hset(batches.key(damaged), "created_at", "not a time")
        time.sleep(1.5)  # the dead reader's lease lapses
        batches.add_lines(alive, [{"line": 2, "error": {"message": "no", "param": None}}])  # its next chunk renews it
        assert resend_lost_tasks(app, store, older_than=0) == []
        batch = batches.get(dead)
        assert batch["status"] == "failed" and [error["code"] for error in batch["errors"]] == ["abandoned"], batch
        assert {store.get(job_id)["status"] for job_id in dead_lines} == {"cancelled"}
        # A batch still read, and one whose record is damaged, are left as they are, their lines queued.
        assert [batches.get(alive)["status"], store.redis.hget(batches.key(damaged), "status")] == ["validating"] * 2
        assert set(store.redis.zrange(store.queue_key("batch"), 0, -1)) == {*alive_lines, *damaged_lines}
