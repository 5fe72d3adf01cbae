"""The worker's own books: what it reports about the jobs it ends, whichever way they end."""

import json
import time
import uuid

import pytest

from llava_fixtures import b64, png_b64, png_with_corrupt_pixels
from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir):
    from workers.builder import load_model

    return load_model(str(tiny_llava_dir), device="cpu", dtype="float32")


def test_jobs_a_worker_fails_before_they_reach_the_engine_are_in_its_metrics_and_log(redis_server, tiny_llava,
                                                                                      tmp_path, monkeypatch):
    # A job failed by a bad image (error code 4) ends before the engine: its ending was written, but the worker's
    # llava_queue_worker_jobs_total{status="failed"} stayed at 0 and the conversation log had no line for it, so an
    # alert on a worker's failures never saw the commonest one.
    from workers import generation
    from workers.engine import LLMEngine
    from workers.generation import JobRunner
    from workers.metrics import WorkerMetrics

    store = JobStore.from_url(redis_server.url, prefix=f"llq-s16-{uuid.uuid4().hex[:8]}")
    metrics = WorkerMetrics()
    monkeypatch.setattr(generation, "METRICS", metrics)
    runner = JobRunner(store, tiny_llava, "w1")
    engine = LLMEngine(tiny_llava.model, tiny_llava.tokenizer, max_num_seqs=4, max_model_len=tiny_llava.context_len,
                       on_step=runner.publish)
    runner.attach(engine)
    metrics.bind(tiny_llava.name, engine)
    conversation_log = tmp_path / "conv.jsonl"
    metrics.start_observer(store, "w1", str(conversation_log))
    engine.start()
    try:
        requests = [GenerateRequest(prompt="USER: <image>\nWhat is it? ASSISTANT:", images=[png_b64(20, 20)],
                                    temperature=0, max_new_tokens=2),
                    GenerateRequest(prompt="USER: <image>\nWhat is it? ASSISTANT:",
                                    images=[b64(png_with_corrupt_pixels())], temperature=0, max_new_tokens=2),
                    GenerateRequest(prompt="USER: What is it? ASSISTANT:", images=[png_b64(20, 20)], temperature=0,
                                    max_new_tokens=2)]
        ids = [store.create(request, "interactive")[0] for request in requests]
        assert [runner.run(job_id) for job_id in ids] == ["succeeded", "failed", "failed"]
        assert [store.get(job_id)["error_code"] for job_id in ids] == [0, ErrorCode.INVALID_REQUEST,
                                                                         ErrorCode.INVALID_REQUEST]

        def jobs(status: str) -> float:
            return metrics.registry.get_sample_value("llava_queue_worker_jobs_total",
                                                     {"model": tiny_llava.name, "status": status})

        assert (jobs("succeeded"), jobs("failed")) == (1, 2)
        deadline = time.monotonic() + 10
        while not conversation_log.exists() or len(conversation_log.read_text().splitlines()) < 3:
            assert time.monotonic() < deadline, conversation_log.read_text() if conversation_log.exists() else None
            time.sleep(0.05)
        lines = [json.loads(line) for line in conversation_log.read_text().splitlines()]
        assert sorted((line["job_id"], line["status"], line["error_code"]) for line in lines) == sorted(
            zip(ids, ["succeeded", "failed", "failed"], [0, 4, 4]))
    finally:
        engine.shutdown()
        store.redis.close()
