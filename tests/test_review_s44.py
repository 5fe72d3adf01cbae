"""Review of the forty-fourth session's batch damage handling: a line's job record of another type does not take its
batch's reads and its owner's lists down, and an upload whose description is damaged can be deleted."""

import json
import time

from fastapi.testclient import TestClient

from api.main import create_app
from shared.batches import BatchStore, new_batch_id
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings


def test_a_damaged_job_record_of_a_failed_batchs_line_takes_no_list_down():
    # A batch failed while it was read ends its lines on its next read (_END_LINES): a line whose job key was SET by
    # hand failed that script (WRONGTYPE), and the batch, GET /v1/batches and GET /v1/files were a 503 "the job store
    # is unavailable" at every call, until the batch expired.
    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        batch_id = new_batch_id()
        batches.create(batch_id, {"params": None})
        jobs = store.create_many([GenerateRequest(prompt="Hello", max_new_tokens=2)] * 2, "batch",
                                 extra=[{"batch": batch_id, "batch_line": line} for line in range(2)])
        batches.add_lines(batch_id, [{"line": line + 1, "job": job_id, "question_id": line, "prompt": "Hello"}
                                     for line, job_id in enumerate(jobs)])
        # As failed while read, its lines still to end (the process failing it died before it ended them).
        batches.redis.hset(batches.key(batch_id), mapping={"status": "failed", "failed_at": repr(time.time()),
                                                           "lines_to_end": 0})
        batches.redis.delete(store.key(jobs[0]))
        batches.redis.set(store.key(jobs[0]), "a job record of another type")
        with TestClient(create_app(Settings(redis_url=server.url))) as client:
            answers = {path: client.get(path) for path in (f"/v1/batches/{batch_id}", "/v1/batches", "/v1/files")}
            errors = client.get(f"/v1/batches/{batch_id}/errors")
        for path, answer in answers.items():
            assert answer.status_code == 200, (path, answer.text)
        assert answers[f"/v1/batches/{batch_id}"].json()["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
        assert [file["id"] for file in answers["/v1/files"].json()["data"]] == [f"file-{batch_id}-errors"]
        ended = [json.loads(line) for line in errors.text.splitlines()]
        assert [(line["status"], line["error_code"]) for line in ended] == [("cancelled", ErrorCode.CANCELLED)] * 2
        assert batches.redis.get(store.key(jobs[0])) == "a job record of another type"  # left as it is
        assert batches.redis.hget(store.key(jobs[1]), "batch") is None  # let go of, as before


def test_an_upload_whose_description_is_damaged_can_be_deleted():
    # Its owner is readable: its DELETE was the 500 that named the damage, and the file stayed, its bytes counted
    # against the owner's limit (MAX_FILE_BYTES_PER_KEY), until it expired. A key of another type names no owner: it
    # is still a 500, and stays.
    with RedisServer() as server:
        batches = BatchStore(JobStore.from_url(server.url), 3600)
        damaged, other_type = (batches.save_file(b"{}\n", "batch.jsonl", "batch")["id"] for _ in range(2))
        batches.redis.hset(batches.file_key(damaged), "meta", "{not json")
        batches.redis.delete(batches.file_key(other_type))
        batches.redis.set(batches.file_key(other_type), "an upload of another type")
        kept_bytes = batches._files_kept_keys[2]
        with TestClient(create_app(Settings(redis_url=server.url))) as client:
            assert client.get(f"/v1/files/{damaged}").status_code == 500
            deleted = client.delete(f"/v1/files/{damaged}")
            assert deleted.status_code == 200, deleted.text
            assert deleted.json() == {"id": damaged, "object": "file", "deleted": True}
            assert client.get(f"/v1/files/{damaged}").status_code == 404
            assert client.delete(f"/v1/files/{damaged}").status_code == 404
            refused = client.delete(f"/v1/files/{other_type}")
        assert not batches.redis.exists(batches.file_key(damaged))
        assert batches.redis.get(kept_bytes) == "3"  # the other's bytes alone
        assert refused.status_code == 500 and "its key holds a string" in refused.json()["error"]["message"], \
            refused.text
        assert batches.redis.exists(batches.file_key(other_type))
