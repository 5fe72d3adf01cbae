"""Uploaded files (POST /v1/files) are kept in Redis for the batch TTL (30 days), and nothing bounded them: one client
(with keys off, anyone) could upload 64 MiB files until Redis had taken the host's memory. An API key's uploads are
bounded in bytes now (`MAX_FILE_BYTES_PER_KEY`): past it an upload gets a 400 that says what to do, and deleting
files, or their expiry, makes room again."""

import json
import time

import redis
import requests

from api.auth import key_digest
from conftest import run_stack
from shared.batches import BatchStore, FilesFull
from shared.jobs import JobStore
from shared.redis_server import RedisServer

LIMIT = 3000


def upload(stack, key: str, size: int) -> requests.Response:
    line = json.dumps({"question_id": 0, "text": "x" * (size - 32)})
    content = (line + " " * (size - len(line) - 1) + "\n").encode()
    assert len(content) == size
    return requests.post(f"{stack.base_url}/v1/files", files={"file": ("q.jsonl", content)}, data={"purpose": "batch"},
                         headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_an_api_keys_uploads_are_bounded_in_bytes():
    keys = ["quota-key-1", "quota-key-2"]
    env = {"LLAVA_QUEUE_API_KEY_HASHES": json.dumps([key_digest(key) for key in keys]),
           "LLAVA_QUEUE_MAX_FILE_BYTES_PER_KEY": str(LIMIT)}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-quota-") as stack:
        kept = [upload(stack, keys[0], 1000) for _ in range(3)]
        assert [answer.status_code for answer in kept] == [200] * 3, [answer.text for answer in kept]
        full = upload(stack, keys[0], 1000)
        assert full.status_code == 400, full.text
        error = full.json()["error"]
        assert error["param"] == "file" and f"limit of {LIMIT} bytes" in error["message"], error
        assert "3000 bytes" in error["message"] and "DELETE /v1/files" in error["message"], error
        # Nothing of the refused upload was kept: the key's list holds its three files.
        listed = requests.get(f"{stack.base_url}/v1/files", headers={"Authorization": f"Bearer {keys[0]}"},
                              timeout=10).json()
        assert sorted(file["id"] for file in listed["data"]) == sorted(answer.json()["id"] for answer in kept)
        # Another key has its own bytes.
        assert upload(stack, keys[1], 2500).status_code == 200
        # Deleting a file makes room for one of its size, and no more.
        deleted = requests.delete(f"{stack.base_url}/v1/files/{kept[0].json()['id']}",
                                  headers={"Authorization": f"Bearer {keys[0]}"}, timeout=10)
        assert deleted.status_code == 200, deleted.text
        assert upload(stack, keys[0], 1001).status_code == 400
        assert upload(stack, keys[0], 1000).status_code == 200
        # A file deleted twice gives back its bytes once.
        again = requests.delete(f"{stack.base_url}/v1/files/{kept[0].json()['id']}",
                                headers={"Authorization": f"Bearer {keys[0]}"}, timeout=10)
        assert again.status_code == 404
        assert upload(stack, keys[0], 1000).status_code == 400


def test_expired_uploads_give_their_bytes_back():
    with RedisServer() as server:
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        files = BatchStore(store, ttl_seconds=2, owner="someone", max_file_bytes=LIMIT)
        first = files.save_file(b"a" * 2000, "a.jsonl", "batch")
        try:
            files.save_file(b"b" * 1500, "b.jsonl", "batch")
            raise AssertionError("an upload over the limit was kept")
        except FilesFull as full:
            assert (full.size, full.kept, full.limit) == (1500, 2000, LIMIT)
        # With no limit (0) the same store keeps anything.
        unbounded = BatchStore(store, ttl_seconds=2, owner="someone else")
        unbounded.save_file(b"c" * 5000, "c.jsonl", "batch")
        deadline = time.monotonic() + 10
        while files.file_meta(first["id"]) is not None:  # expired with its key's TTL
            assert time.monotonic() < deadline, "the file did not expire"
            time.sleep(0.1)
        time.sleep(0.1)  # (the count's expiry time is the key's, read on Redis's clock in whole seconds)
        kept = files.save_file(b"b" * 1500, "b.jsonl", "batch")
        assert files.file_meta(kept["id"])["bytes"] == 1500


def test_a_lower_ttl_does_not_drop_the_count_of_files_kept_longer():
    """The count's keys took the TTL of the last upload: after BATCH_TTL_SECONDS was lowered (or with an API of
    another), they expired while files kept under the longer one remained, and the owner could keep twice its limit."""
    with RedisServer() as server:
        store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
        BatchStore(store, ttl_seconds=3600, owner="someone", max_file_bytes=LIMIT).save_file(b"a" * 2900, "a", "batch")
        shorter = BatchStore(store, ttl_seconds=1, owner="someone", max_file_bytes=LIMIT)
        shorter.save_file(b"b" * 50, "b.jsonl", "batch")
        time.sleep(1.5)  # past the shorter TTL
        try:
            shorter.save_file(b"c" * 2000, "c.jsonl", "batch")
            raise AssertionError("the 2,900 bytes kept for an hour were no longer counted")
        except FilesFull as full:
            assert full.kept == 2900, full.kept
