"""Offline batch evaluation with large files, and a batch's last state: what the API process holds in memory (or
reads from Redis) to read a batch file, send its output file or a page of its lines does not grow with the file; a
batch whose reader died always ends."""

import json
import time
import uuid

import requests

from conftest import run_stack
from shared.batches import BatchStore, new_batch_id
from shared.jobs import JobStore
from shared.redis_server import RedisServer
from test_batches import jsonl, peak_memory_kib


def answered_batch(redis_url: str, lines: int, answer: str) -> str:
    """A completed batch of `lines` question lines, each answered with `answer` (its results as the job store's finish
    script writes them); returns its id."""
    batches = BatchStore(JobStore.from_url(redis_url), 3600)
    batch_id = new_batch_id()
    batches.create(batch_id, {"params": {}})
    now = time.time()
    for start in range(0, lines, 1000):
        numbers = range(start, min(lines, start + 1000))
        batches.add_lines(batch_id, [{"line": number + 1, "job": uuid.uuid4().hex, "question_id": number,
                                      "prompt": "Describe the image in detail."} for number in numbers])
        batches.redis.hset(batches.results_key(batch_id), mapping={str(number): json.dumps({
            "status": "succeeded", "error": "", "error_code": 0, "finish_reason": "length", "text": answer,
            "prompt_tokens": 600, "completion_tokens": 1024, "model": "llava-v1.5-13b", "started_at": now,
            "first_token_at": now, "finished_at": now}) for number in numbers})
    batches.redis.hset(batches.key(batch_id), mapping={"completed": lines, "ended": lines})
    assert batches.activate(batch_id, lines, 0) == "completed"
    return batch_id


def test_a_batchs_output_file_is_sent_as_it_is_read():
    # GET /v1/files/{output_file_id}/content (the openai package's files.content) built the whole file in the API's
    # memory, three times over (its lines, the text, its bytes): 270 MB for a 100 MB answers file, per download.
    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-batch-output-") \
            as stack:
        batch_id = answered_batch(server.url, 20_000, "word " * 1000)
        batch = requests.get(f"{stack.base_url}/v1/batches/{batch_id}", timeout=30).json()
        assert batch["status"] == "completed" and batch["output_file_id"], batch
        before = peak_memory_kib(stack.processes["api"].pid)
        with requests.get(f"{stack.base_url}/v1/files/{batch['output_file_id']}/content", stream=True,
                          timeout=120) as response:
            assert response.status_code == 200, response.text
            lines = sum(chunk.count(b"\n") for chunk in response.iter_content(1 << 16))
        grown_mib = (peak_memory_kib(stack.processes["api"].pid) - before) / 1024
        assert lines == 20_000, lines
        assert grown_mib < 48, grown_mib


def test_lines_refused_for_the_same_missing_image_are_not_all_kept_in_memory(tmp_path):
    # A refused image is remembered for the lines that name it again; the one refusal raised again for each took every
    # such line's frames into its traceback, and with them every line read: 300 MB for a 120 MB question file whose
    # image folder was wrong, until the whole file was read.
    (tmp_path / "images").mkdir()
    text = "Describe the image in detail. " * 200
    (tmp_path / "q.jsonl").write_bytes(jsonl([{"question_id": index, "image": "missing.png", "text": text}
                                              for index in range(20_000)]))
    env = {"LLAVA_QUEUE_DATA_ROOTS": str(tmp_path), "LLAVA_QUEUE_MAX_QUEUED_JOBS": "0"}
    with RedisServer() as server, run_stack(server.url, env, workers=(), log_prefix="llava-queue-batch-missing-") \
            as stack:
        before = peak_memory_kib(stack.processes["api"].pid)
        response = requests.post(f"{stack.base_url}/v1/batches", timeout=300,
                                 json={"input_path": "q.jsonl", "image_folder": "images"})
        grown_mib = (peak_memory_kib(stack.processes["api"].pid) - before) / 1024
        assert response.status_code == 200, response.text
        batch = response.json()
        assert batch["status"] == "failed", batch
        assert batch["request_counts"] == {"total": 20_000, "completed": 0, "failed": 20_000}, batch
        assert "no such file" in batch["errors"]["data"][0]["message"], batch
        assert grown_mib < 48, grown_mib


def test_a_page_of_a_batchs_lines_reads_that_page_alone():
    # GET /v1/batches/{id}/lines read every line and result before its offset, and skipped them: a page at the end of
    # a 20,000-line batch moved 100 MB out of Redis (270 MB and 3 s for 50,000 lines), a client paging through all of
    # them gigabytes.
    import redis as redis_lib

    with RedisServer() as server, run_stack(server.url, {}, workers=(), log_prefix="llava-queue-batch-lines-") \
            as stack:
        batch_id = answered_batch(server.url, 20_000, "word " * 1000)
        client = redis_lib.Redis.from_url(server.url)
        before = client.info("stats")["total_net_output_bytes"]
        response = requests.get(f"{stack.base_url}/v1/batches/{batch_id}/lines?offset=19950&limit=100", timeout=60)
        read_mib = (client.info("stats")["total_net_output_bytes"] - before) / (1 << 20)
        assert response.status_code == 200, response.text
        page = response.json()["data"]
        assert [line["line"] for line in page] == list(range(19951, 20001)), page[:2]
        assert {line["status"] for line in page} == {"succeeded"}
        assert read_mib < 5, read_mib


def test_a_batch_cancelled_while_read_whose_reader_died_ends_even_past_its_window():
    # A batch cancelled while its file was read, whose reader then died, ends `cancelled` at its next read; once its
    # completion window had passed, every read only looked for lines to expire, and it stayed `cancelling` for good.
    from api.routes.batches import batch_view, settled
    from shared.protocol import GenerateRequest

    with RedisServer() as server:
        store = JobStore.from_url(server.url)
        batches = BatchStore(store, 3600)
        batch_id = new_batch_id()
        batches.create(batch_id, {"params": {}, "completion_window": "1m", "expires_at": repr(time.time() + 60)})
        ids = store.create_many([GenerateRequest(prompt="hi")] * 2, "batch",
                                extra=[{"batch": batch_id, "batch_line": line} for line in range(2)])
        batches.add_lines(batch_id, [{"line": line + 1, "job": job_id, "question_id": line, "prompt": "hi"}
                                     for line, job_id in enumerate(ids)])
        assert batches.request_cancel(batch_id) == "cancelling"
        batches.cancel_jobs(batch_id)
        # Its reader died, and the batch is next read two minutes later: past its window.
        batches.redis.delete(batches.reader_key(batch_id))
        batches.redis.hset(batches.key(batch_id), mapping={"created_at": repr(time.time() - 120),
                                                           "expires_at": repr(time.time() - 60)})
        view = batch_view(batches, settled(batches, batches.get(batch_id)))
        assert view["status"] == "cancelled", view
        assert view["request_counts"] == {"total": 2, "completed": 0, "failed": 2}, view
