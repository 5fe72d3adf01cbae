"""The worker's metrics observer, past one ended job whose record cannot be read."""

import json
import time
import uuid

from shared.jobs import JobStore


def test_a_record_of_another_type_loses_the_metrics_of_no_other_job(redis_server, tmp_path):
    # The observer reads the jobs a worker ended in one pipeline: one job's key SET by hand (WRONGTYPE) failed the
    # whole read, and the latencies and conversation log lines of every job read with it were lost.
    from workers.metrics import WorkerMetrics

    store = JobStore.from_url(redis_server.url, prefix=f"llq-s44m-{uuid.uuid4().hex[:8]}")
    metrics = WorkerMetrics()
    conversation_log = tmp_path / "conv.jsonl"
    now = time.time()
    good, damaged = "good-job", "damaged-job"
    store.redis.hset(store.key(good), mapping={
        "status": "succeeded", "worker": "w1", "model": "m", "created_at": now - 2, "started_at": now - 1.5,
        "first_token_at": now - 1, "finished_at": now, "prompt_tokens": 5, "completion_tokens": 3, "error_code": 0,
        "finish_reason": "length", "request": json.dumps({"prompt": "hi"}), "prompt": "hi", "text": "ok"})
    store.redis.set(store.key(damaged), "not a hash")
    for job_id in (damaged, good):  # read in one pipeline, the damaged one first
        metrics._ended.put(job_id)
    try:
        metrics.start_observer(store, "w1", str(conversation_log))
        deadline = time.monotonic() + 10
        while not conversation_log.exists():
            assert time.monotonic() < deadline, "the job read with the damaged one was never logged"
            time.sleep(0.05)
        assert [json.loads(line)["job_id"] for line in conversation_log.read_text().splitlines()] == [good]
    finally:
        store.redis.close()
