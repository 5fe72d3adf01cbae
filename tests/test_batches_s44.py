"""Damage to a batch's key, lines or results, or to an upload's key, is a 500 that names it, lists go on without it,
and the lost-task sweep neither runs the lines of a damaged batch nor stops at one; a batch's output files are kept
the TTL from when they were made (the batch's end); a batch cancelled while its lines run is cancelled at once."""

import logging
import time

import pytest
import requests
from fastapi.testclient import TestClient

from api.main import create_app
from shared.batches import BatchStore, DamagedBatch, new_batch_id
from shared.celery_app import resend_lost_tasks, task_queue
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_batches import jsonl, questions, upload_batch
from test_lost_tasks_s19 import queued_task_ids, sweep_parts

INVALID = [{"code": "invalid_line", "message": "no", "param": None, "line": 1}]


def queued_line(store: JobStore, batches: BatchStore, batch_id: str, model: str = "") -> str:
    """A line of the batch, its job queued."""
    [job_id] = store.create_many([GenerateRequest(model=model or None, prompt="Hello", max_new_tokens=2)], "batch",
                                 extra=[{"batch": batch_id, "batch_line": 0}])
    batches.add_lines(batch_id, [{"line": 1, "job": job_id, "question_id": 1, "prompt": "Hello"}])
    return job_id


def test_the_sweep_runs_no_line_of_a_damaged_batch_and_goes_on_past_damaged_lines(redis_server, caplog):
    # The queued lines of a batch whose key was SET by hand (a read of it: a 500, "failed") were sent as lost and ran
    # for nobody; a batch whose reader died, its lines key damaged, failed the whole sweep (WRONGTYPE) at every round.
    store, app, client, model = sweep_parts(redis_server.url, "damaged-batch")
    batches = BatchStore(store, 3600)
    damaged, abandoned = new_batch_id(), new_batch_id()
    batches.create(damaged, {"params": None})
    damaged_line = queued_line(store, batches, damaged, model)
    batches.activate(damaged, 1, 0)
    client.delete(batches.key(damaged))
    client.set(batches.key(damaged), "a record of another type")
    try:
        assert resend_lost_tasks(app, store, older_than=0) == []
        assert queued_task_ids(client, task_queue("batch", model)) == []
        assert store.get(damaged_line)["status"] == "failed"  # ended as its batch's damage makes it end
        batches.create(abandoned, {"params": None})
        abandoned_line = queued_line(store, batches, abandoned, model)
        client.delete(batches.reader_key(abandoned))  # its reader died a while ago
        client.hset(batches.key(abandoned), "created_at", repr(time.time() - 600))
        client.delete(batches.lines_key(abandoned))
        client.sadd(batches.lines_key(abandoned), "a lines list of another type")
        with caplog.at_level(logging.WARNING, logger="llava_queue"):
            assert resend_lost_tasks(app, store, older_than=0) == []
        assert client.hget(batches.key(abandoned), "status") == "failed"
        assert any("its :lines key holds a set, not a list" in record.getMessage() for record in caplog.records)
        assert resend_lost_tasks(app, store, older_than=0) == []  # its lines end at the next sweep
        assert store.get(abandoned_line)["status"] == "cancelled"
    finally:
        client.delete(task_queue("batch", model))


def test_damaged_lines_results_and_uploads_are_500s_that_say_so_and_lists_go_on(caplog):
    # Damage to a batch's lines or results, or to an upload's key, was a 503 "the job store is unavailable"
    # (WRONGTYPE) or a bare 500 (a ValueError), for the file, its content and the lists alike.
    with RedisServer() as server:
        batches = BatchStore(JobStore.from_url(server.url), 3600)
        healthy, string_file, meta_file = (batches.save_file(b"{}\n", "batch.jsonl", "batch")["id"] for _ in range(3))
        batches.redis.delete(batches.file_key(string_file))
        batches.redis.set(batches.file_key(string_file), "an upload of another type")
        batches.redis.hset(batches.file_key(meta_file), "meta", "{not json")
        ids = [new_batch_id() for _ in range(4)]
        for batch_id in ids:
            batches.create(batch_id, {"params": None})
            batches.add_lines(batch_id, [{"line": 1, "error": {"message": "no", "param": None}}])
            batches.activate(batch_id, 1, 1, INVALID)
        fine, lines, results, entry = ids
        batches.redis.delete(batches.lines_key(lines))
        batches.redis.set(batches.lines_key(lines), "lines of another type")
        batches.redis.hset(batches.key(lines), "lines_to_end", 0)  # as failed while read: a read ends its lines first
        batches.redis.rpush(batches.results_key(results), "results of another type")
        batches.redis.lset(batches.lines_key(entry), 0, "{not json")
        damage = {lines: "its :lines key holds a string, not a list", results: "its :results key holds a list, not a "
                  "hash", entry: "its :lines entry 0 is no JSON object"}
        with (caplog.at_level(logging.WARNING, logger="llava_queue.api"),
              TestClient(create_app(Settings(redis_url=server.url))) as client):
            calls = {(f"/v1/batches/{batch_id}/{path}", f"batch {batch_id}: the batch's record is damaged: {what}")
                     for batch_id, what in damage.items()
                     for path in ("errors", "lines", f"../../files/file-{batch_id}-errors",
                                  f"../../files/file-{batch_id}-errors/content")}
            calls |= {(f"/v1/files/{string_file}{path}", f"file {string_file}: the file's record is damaged: its key "
                       "holds a string, not a hash") for path in ("", "/content")}
            calls.add((f"/v1/batches/{lines}", f"batch {lines}: the batch's record is damaged: {damage[lines]}"))
            calls.add((f"/v1/files/{meta_file}", f"file {meta_file}: the file's record is damaged: its description"))
            for path, said in sorted(calls):
                answer = client.get(path)
                assert answer.status_code == 500 and answer.json()["error"]["code"] == ErrorCode.SERVER_ERROR, \
                    (path, answer.text)
                assert answer.json()["error"]["message"].startswith(said), (path, answer.text)
            answer = client.post("/v1/batches", json={"input_file_id": string_file})
            assert answer.status_code == 500 and "its key holds a string" in answer.json()["error"]["message"]
            # The first list call also scans the keys for uploads missing from the index: it stopped at a damaged one.
            files = client.get("/v1/files")
            listed = client.get("/v1/batches")
        assert files.status_code == 200, files.text
        assert [file["id"] for file in files.json()["data"]] == [f"file-{fine}-errors", healthy]
        assert listed.status_code == 200, listed.text
        shown = {batch["id"]: batch for batch in listed.json()["data"]}
        assert shown.keys() == set(ids) and shown[lines]["errors"]["data"][0]["code"] == "damaged_record", shown
    assert not any("is unavailable" in record.getMessage() for record in caplog.records)


def test_a_batchs_files_are_kept_the_ttl_from_when_they_were_made():
    # They went with their batch, the TTL after its creation: a file made as a batch ended near that expired soon
    # after, before uploads listed after it (a page's `after` naming it then ended the list, those uploads unlisted).
    ttl = 3600
    with (RedisServer() as server,
          TestClient(create_app(Settings(redis_url=server.url, batch_ttl_seconds=ttl))) as client):
        batches = BatchStore(JobStore.from_url(server.url), ttl)
        batch_id = new_batch_id()
        batches.create(batch_id, {"params": None})
        batches.add_lines(batch_id, [{"line": 1, "error": {"message": "no", "param": None}}])
        # As though created 55 minutes ago: its keys have 5 minutes left.
        batches.redis.hset(batches.key(batch_id), "created_at", repr(time.time() - ttl + 300))
        for key in (batches.key(batch_id), batches.lines_key(batch_id), batches.index_key):
            batches.redis.expire(key, 300)
        batches.activate(batch_id, 1, 1, INVALID)
        file = client.get(f"/v1/files/file-{batch_id}-errors").json()
        assert file["created_at"] >= int(time.time()) - 5 and file["expires_at"] == file["created_at"] + ttl, file
        listed = {listed["id"]: listed for listed in client.get("/v1/files").json()["data"]}
        assert listed == {file["id"]: file}
        for key in (batches.key(batch_id), batches.lines_key(batch_id), batches.index_key):
            assert batches.redis.ttl(key) >= file["expires_at"] - time.time() - 2, key


def test_a_batch_cancelled_while_its_lines_run_is_cancelled_at_once(tiny_llava_stack):
    # Its running lines leave their engine batch at the next step: nothing waits for the lost-task sweep's timer
    # (LLAVA_QUEUE_RESEND_AFTER_SECONDS, 60 s).
    base = tiny_llava_stack.base_url
    batch = upload_batch(tiny_llava_stack, jsonl(questions(12, image=False)), temperature=0, max_new_tokens=4000)
    deadline = time.monotonic() + 60
    while not any(line["status"] == "running"
                  for line in requests.get(f"{base}/v1/batches/{batch['id']}/lines", timeout=10).json()["data"]):
        assert time.monotonic() < deadline, "no line started"
        time.sleep(0.05)
    cancelled_at = time.monotonic()
    assert requests.post(f"{base}/v1/batches/{batch['id']}/cancel", timeout=10).status_code == 200
    while (done := requests.get(f"{base}/v1/batches/{batch['id']}", timeout=10).json())["status"] != "cancelled":
        assert time.monotonic() - cancelled_at < 10, done
        time.sleep(0.05)
    lines = requests.get(f"{base}/v1/batches/{batch['id']}/lines", timeout=10).json()["data"]
    assert {line["status"] for line in lines} == {"cancelled"} and any(line["started_at"] for line in lines), lines


def test_a_damaged_lines_key_of_a_batch_being_read_is_said_so_and_takes_no_admission_down():
    # Its LLEN, counting the places batches being read hold, failed every batch's admission (WRONGTYPE: a 503 for every
    # key), and its reader's next chunk was a 503 "the job store is unavailable".
    with RedisServer() as server:
        batches = BatchStore(JobStore.from_url(server.url), 3600)
        batch_id = new_batch_id()
        batches.reserve(batch_id, 5)
        batches.create(batch_id, {"params": None})
        batches.redis.set(batches.lines_key(batch_id), "lines of another type")
        assert batches.places_taken() == (5, {})
        with pytest.raises(DamagedBatch, match="its :lines key holds a string, not a list"):
            batches.add_lines(batch_id, [{"line": 1, "error": {"message": "no", "param": None}}])
