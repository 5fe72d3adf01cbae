"""An image whose stored copy is damaged (its key of another type, its count of holders or its data not the store's)
fails the submission that holds it, and a batch's line that holds it, as a 500 that names the damage; the submissions
committed with it, and the batch's other lines, go ahead. A batch's files are kept the TTL from its end, read or
not."""

import base64
import time
import uuid

from fastapi.testclient import TestClient

from api.errors import ApiError
from api.main import create_app
from llava_fixtures import png_bytes
from shared.batches import BatchStore, new_batch_id
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_batches import jsonl, questions
from test_batches_s44 import queued_line
from test_records_s18 import png_b64
from test_submission import make_submitter, one, redis_url, submit_held  # noqa: F401 - redis_url: a fixture

DAMAGED = "(changed by hand, or by another program on the key prefix); an operator must delete the key"


def test_a_damaged_image_fails_its_submission_alone_with_a_500_that_names_it(redis_url):  # noqa: F811
    # It failed the write of every job committed with it: each submission of the group got a 503 "the queue is
    # unavailable" (logged as an outage), and their jobs failed, at every retry.
    submitter, store = make_submitter(redis_url)
    of_another_type, counted_wrong, other_data = png_b64(0), png_b64(1), png_b64(2)
    store.redis.set(store.image_key_of(of_another_type), "an image of another type")
    store.redis.hset(store.image_key_of(counted_wrong), mapping={"data": counted_wrong, "refs": "two"})
    store.redis.hset(store.image_key_of(other_data), mapping={"data": other_data[:100], "refs": 1})

    def holding(image: str) -> tuple:
        return ([[(GenerateRequest(prompt="<image>\nWhat is it?", images=[image]), "interactive")]], {})

    bulk = ([[(GenerateRequest(prompt="fine"), "interactive"),
              (GenerateRequest(prompt="<image>\nWhat?", images=[of_another_type]), "interactive")]], {})
    answers = submit_held(submitter, store, [one("first"), holding(of_another_type), one("healthy"),
                                             holding(counted_wrong), holding(other_data), bulk])
    first, string, healthy, counted, data, bulk = answers
    damage = {string: "its key holds a string, not a hash", counted: "its count of holders (field refs) is no number",
              data: f"its data is 100 bytes, not the image's {len(other_data)}", bulk: "its key holds a string"}
    for answer, what in damage.items():
        assert isinstance(answer, ApiError) and answer.status == 500, answer
        assert answer.code == ErrorCode.SERVER_ERROR and what in answer.message, answer.message
    assert string.message.startswith("image 0: its stored copy (") and string.message.endswith(DAMAGED)
    assert bulk.message.startswith("jobs.1: image 0: its stored copy (")
    for [job_id], prompt in ((first, "first"), (healthy, "healthy")):
        assert (store.get(job_id)["status"], store.get(job_id)["prompt"]) == ("queued", prompt)
    assert sum(store.queue_lengths().values()) == 2  # no job of a refused submission was written
    assert store.redis.get(store.image_key_of(of_another_type)) == "an image of another type"  # left as it was


def test_a_batch_line_whose_image_is_damaged_fails_alone(tmp_path):
    # Written with its chunk, the image failed the chunk's write: the whole batch failed ("the queue was unavailable
    # while reading") and its POST was a 503, every time the file was sent again.
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(2):
        (folder / f"img{seed}.png").write_bytes(png_bytes(40, 30, seed=seed))
    with RedisServer() as server, TestClient(create_app(Settings(redis_url=server.url, data_roots=[tmp_path]))) as api:
        store = JobStore.from_url(server.url)
        damaged = store.image_key_of(base64.b64encode((folder / "img0.png").read_bytes()).decode())
        store.redis.set(damaged, "an image of another type")
        answer = api.post("/v1/batches", files={"file": ("q.jsonl", jsonl(questions(2)[::-1] + questions(1)))},
                          data={"image_folder": str(folder)})
        assert answer.status_code == 200, answer.text
        batch = answer.json()
        assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 3, batch
        said = f"its stored copy ({damaged}) is damaged: its key holds a string, not a hash"
        assert [(error["line"], said in error["message"]) for error in batch["errors"]["data"]] == [(2, True),
                                                                                                   (3, True)]
        lines = api.get(f"/v1/batches/{batch['id']}/lines").json()["data"]
        assert [line["status"] for line in lines] == ["queued", "invalid", "invalid"], lines
        assert lines[1]["error"].startswith(f"line 2: image 0: {said}") and lines[1]["error"].endswith(DAMAGED)
        errors = api.get(f"/v1/batches/{batch['id']}/errors").text.splitlines()
        assert len(errors) == 2 and all(said in line for line in errors), errors


def test_a_batchs_files_are_kept_the_ttl_from_its_end_unread(redis_server):
    # Its keys were kept the TTL from its end by the first read that found it ended: a batch that ended near the TTL
    # after its creation, and that nobody read before then, went with its files, said to expire the TTL after its end.
    ttl = 3600
    store = JobStore.from_url(redis_server.url, f"llq-s45-{uuid.uuid4().hex[:8]}")
    batches = BatchStore(store, ttl)
    by_worker, all_refused = new_batch_id(), new_batch_id()
    for batch_id in (by_worker, all_refused):
        batches.create(batch_id, {"params": None})
    job_id = queued_line(store, batches, by_worker)
    batches.activate(by_worker, 1, 0)
    batches.add_lines(all_refused, [{"line": 1, "error": {"message": "no", "param": None}}])
    for batch_id in (by_worker, all_refused):  # as though created an hour ago, less 3 s: its keys have 3 s left
        batches.redis.hset(batches.key(batch_id), "created_at", repr(store.clock() - ttl + 3))
        for key in (batches.key(batch_id), batches.lines_key(batch_id), batches.index_key):
            batches.redis.expire(key, 3)
    assert store.finish(job_id, "succeeded", finish_reason="stop")  # its last line, ended by its worker
    batches.activate(all_refused, 1, 1, [{"code": "invalid_line", "message": "no", "param": None, "line": 1}])
    ended = time.time()
    time.sleep(4)
    with TestClient(create_app(Settings(redis_url=redis_server.url, key_prefix=store.prefix,
                                        batch_ttl_seconds=ttl))) as api:
        files = {file["id"]: file for file in api.get("/v1/files").json()["data"]}
    assert files.keys() == {f"file-{by_worker}-output", f"file-{all_refused}-errors"}, files
    assert all(abs(file["expires_at"] - (ended + ttl)) <= 2 for file in files.values()), files
    for batch_id in (by_worker, all_refused):
        for key in (batches.key(batch_id), batches.lines_key(batch_id), batches.index_key):
            assert batches.redis.ttl(key) >= ttl - 8, key
