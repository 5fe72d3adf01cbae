"""A batch of many lines that fails while it is read ends its lines a chunk at a time, not in one script that holds
Redis; a failing stopped part-way is finished by the next read of the batch."""

import json

import pytest
import redis

from api.routes.batches import batch_view, output_lines, settled
from shared.batches import BULK_LINES, BatchStore, new_batch_id
from shared.jobs import CANCELLED_ERROR, JobStore
from shared.protocol import GenerateRequest
from shared.redis_server import RedisServer
from test_batches2_s42 import lapse_reader


def batch_of(store: JobStore, batches: BatchStore, lines: int) -> tuple[str, list[str]]:
    """A batch being read, with `lines` lines recorded and their jobs queued; and the jobs' ids."""
    batch_id, ids = new_batch_id(), []
    batches.create(batch_id, {"params": {}, "format": "openai"})
    for start in range(0, lines, BULK_LINES):
        chunk = store.create_many([GenerateRequest(prompt="hi", max_new_tokens=2)] * BULK_LINES, "batch",
                                  extra=[{"batch": batch_id, "batch_line": line}
                                         for line in range(start, start + BULK_LINES)])
        batches.add_lines(batch_id, [{"line": line + 1, "job": job_id, "custom_id": f"request-{line}",
                                      "model": "llava-v1.5-tiny"} for line, job_id in enumerate(chunk, start)])
        ids += chunk
    return batch_id, ids


def naming_the_batch(store: JobStore, ids: list[str]) -> int:
    """How many of these jobs' records still name their batch (an ended job's keeps naming it)."""
    with store.redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(store.key(job_id), "batch")
        return sum(batch is not None for batch in pipe.execute())


def test_a_failed_batch_of_thousands_of_lines_ends_them_a_chunk_at_a_time():
    # Its lines not ended were all ended in the script that failed it: 50,000 lines held Redis for a second (SLOWLOG
    # 987,468 us), every worker's step, stream and submission waiting.
    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        batch_id, ids = batch_of(store, batches, 8 * BULK_LINES)
        # A worker had started one line and ended another before the reader's lease lapsed.
        assert store.start(ids[1], "worker-1", "llava-v1.5-tiny") and store.start(ids[2], "worker-1", "llava-v1.5-tiny")
        store.finish(ids[2], "succeeded")
        store.redis.config_set("slowlog-log-slower-than", 1000)
        store.redis.slowlog_reset()
        record = lapse_reader(batches, batch_id)
        # The scripts that failed the batch and ended its lines (its key is one of theirs; a job's cancel names none).
        durations = [entry["duration"] for entry in store.redis.slowlog_get(1000)
                     if batches.key(batch_id).encode() in entry["command"]]
        assert durations and max(durations) < sum(durations) / 2, durations
        view = batch_view(batches, record)
        assert view["status"] == "failed" and view["request_counts"] == {"total": 8000, "completed": 1, "failed": 7999}
        errors = [json.loads(line) for line in output_lines(batches, record, errors=True)]
        assert [line["custom_id"] for line in errors] == [f"request-{line}" for line in range(8000) if line != 2]
        assert [json.loads(line)["custom_id"] for line in output_lines(batches, record, errors=False)] == ["request-2"]
        results = [result for _, _, result in batches.lines(batch_id)]
        # Ended as the batch did (cjson writes 14 digits).
        assert {(result["status"], result["error"], round(result["finished_at"], 3)) for result in results[3:]} == \
            {("cancelled", CANCELLED_ERROR, round(record["failed_at"], 3))}
        assert results[1]["model"] == "llava-v1.5-tiny" and results[1]["started_at"], results[1]
        assert "lines_to_end" not in record and naming_the_batch(store, ids[:2] + ids[3:]) == 0
        assert store.redis.zcard(store.queue_key("batch")) == 0  # its jobs cancelled


def test_a_failed_batch_whose_lines_stopped_ending_part_way_has_them_ended_by_its_next_read():
    # The API process failing the batch dies (here: Redis goes away) after the first chunk of its lines: the next
    # read of the batch, by any API process, ends the rest; a line whose job ended meanwhile keeps its answer.
    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        batch_id, ids = batch_of(store, batches, 3 * BULK_LINES)
        end_lines, calls = batches._end_lines, []

        def cut_after_one(**kwargs):
            calls.append(kwargs)
            if len(calls) > 1:
                raise redis.ConnectionError("the API process is gone")
            return end_lines(**kwargs)

        batches._end_lines = cut_after_one
        with pytest.raises(redis.ConnectionError):
            lapse_reader(batches, batch_id)
        assert batches.get(batch_id)["ended"] == BULK_LINES
        assert store.start(ids[-1], "worker-1", "llava-v1.5-tiny")
        store.finish(ids[-1], "succeeded")
        reader = BatchStore(JobStore.from_url(server.url), 3600)
        record = settled(reader, reader.get(batch_id))
        assert batch_view(reader, record)["request_counts"] == {"total": 3000, "completed": 1, "failed": 2999}
        assert len(list(output_lines(reader, record, errors=True))) == 2999
        assert "lines_to_end" not in record and naming_the_batch(store, ids[:-1]) == 0
