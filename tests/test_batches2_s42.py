"""A batch failed as abandoned while its reader went on: it keeps saying why it failed, and its files and counts stay
as they were when it failed."""

import io
import json
import time

from api.routes.batches import BatchCreate, batch_view, create, output_lines, settled
from shared.batches import BatchStore, new_batch_id
from shared.jobs import JobStore, WorkerRegistry
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from shared.settings import Settings
from test_batches import jsonl, questions


def lapse_reader(batches: BatchStore, batch_id: str) -> dict:
    """The batch as a read finds it once its reader's lease has lapsed (failed as abandoned)."""
    batches.redis.delete(batches.reader_key(batch_id))
    batches.redis.hset(batches.key(batch_id), "created_at", repr(time.time() - 120))
    return settled(batches, batches.get(batch_id))


class ReadSlowly(io.BytesIO):
    """A batch file whose reading is overtaken at its 600th line (the first 500 are recorded) by `overtake`."""

    counted, read = False, 0

    def seek(self, *args):
        self.counted = True  # the lines are counted: the batch reads it now
        return super().seek(*args)

    def readline(self, *args):
        self.read += self.counted
        if self.read == 600:
            self.overtake()
        return super().readline(*args)

    def overtake(self) -> None:
        raise NotImplementedError


def test_a_batch_failed_as_abandoned_while_read_keeps_its_reason_beside_its_invalid_lines():
    # The slow reader wrote the errors of its file's invalid lines over the batch's `errors` once it was done: the
    # failed batch said only "line 1 is not valid JSON", not that it failed as abandoned.
    class ReadAbandoned(ReadSlowly):
        """Overtaken by a read of the batch that finds its reader's lease lapsed."""

        def overtake(self) -> None:
            [batch_id] = batches.redis.zrange(batches.index_key, 0, -1)
            assert lapse_reader(batches, batch_id)["status"] == "failed"

    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        batch = create(BatchCreate(temperature=0, max_new_tokens=2),
                       ReadAbandoned(jsonl(["{not json", *questions(1000, image=False)])), store, batches, None,
                       WorkerRegistry(store.redis, store.prefix), Settings(redis_url=server.url), None)
        assert batch["status"] == "failed", batch
        codes = [error["code"] for error in batch["errors"]["data"]]
        assert codes == ["abandoned", "invalid_line"], batch["errors"]
        assert batch["errors"]["data"][1]["line"] == 1, batch["errors"]


def test_a_line_still_running_when_its_batch_failed_as_abandoned_changes_nothing_when_it_ends():
    # A batch failed as abandoned is final at once (as OpenAI's `failed`, which no line of waits on): its lines not
    # ended end with it, cancelled. A line a worker still ran wrote its result into the final batch when it ended
    # later: the errors file (its size already kept) and the request counts changed after the batch had ended.
    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        batch_id = new_batch_id()
        batches.create(batch_id, {"params": {}, "format": "openai"})
        ids = store.create_many([GenerateRequest(prompt="hi", max_new_tokens=2)] * 2, "batch",
                                extra=[{"batch": batch_id, "batch_line": line} for line in range(2)])
        batches.add_lines(batch_id, [{"line": line + 1, "job": job_id, "custom_id": f"request-{line}",
                                      "model": "llava-v1.5-tiny"} for line, job_id in enumerate(ids)])
        # The jobs were sent, and a worker started the first, before the reader's lease lapsed.
        assert store.start(ids[0], "worker-1", "llava-v1.5-tiny")
        record = lapse_reader(batches, batch_id)
        assert record["status"] == "failed", record
        errors, counts = list(output_lines(batches, record, errors=True)), batch_view(batches, record)["request_counts"]
        assert counts == {"total": 2, "completed": 0, "failed": 2}, counts
        assert [json.loads(line)["custom_id"] for line in errors] == ["request-0", "request-1"], errors
        # The worker ends it: it had its answer before it heard the cancel.
        store.finish(ids[0], "succeeded")
        record = batches.get(batch_id)
        assert record["status"] == "failed" and batch_view(batches, record)["request_counts"] == counts, record
        assert list(output_lines(batches, record, errors=True)) == errors
        assert list(output_lines(batches, record, errors=False)) == []
