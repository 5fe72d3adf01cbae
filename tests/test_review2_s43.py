"""Review of session 43's damaged-batch handling: a damaged record leaves the other files listed as they were."""

from fastapi.testclient import TestClient

from shared.batches import BatchStore, new_batch_id
from shared.jobs import JobStore
from shared.redis_server import RedisServer
from shared.settings import Settings


def test_a_batch_that_ended_at_no_time_leaves_the_files_list_in_order():
    # A damaged batch whose end time read as NaN ("nan" is a float) was sorted among the files by it: every comparison
    # with NaN is false, and the batches' files around it came out of created_at order (the newest file last, where a
    # client paging newest first stopped before it).
    from api.main import create_app

    with RedisServer() as server, TestClient(create_app(Settings(redis_url=server.url))) as client:
        batches = BatchStore(JobStore.from_url(server.url), 3600)
        ids = [new_batch_id() for _ in range(4)]
        for ended, batch_id in enumerate(ids, 1):
            batches.create(batch_id, {"params": None})
            batches.activate(batch_id, 1, 1, [{"code": "invalid_line", "message": "no", "param": None, "line": 1}])
            batches.redis.hset(batches.key(batch_id), "failed_at", repr(batches.store.clock() + ended))
        *older, damaged, newest = ids
        batches.redis.hset(batches.key(damaged), "failed_at", "nan")
        files = client.get("/v1/files")
    assert files.status_code == 200, files.text
    listed = [file["id"] for file in files.json()["data"]]
    assert listed == [f"file-{batch_id}-errors" for batch_id in (newest, *reversed(older))], listed
