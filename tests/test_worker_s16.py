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


def test_an_interactive_job_waiting_in_the_engine_goes_before_the_batch_jobs_there(redis_server, tiny_llava):
    # A worker takes a job for each free engine slot (MAX_NUM_SEQS task threads), but its engine admits only what its
    # budgets hold: the rest wait in the engine. They waited first come, first served, so an interactive job taken
    # then came after every batch job already waiting there. Here the engine holds one job at a time, and its step
    # hook is held while two batch jobs and then an interactive one reach it.
    import threading

    from workers.engine import LLMEngine
    from workers.generation import JobRunner

    store = JobStore.from_url(redis_server.url, prefix=f"llq-s16-{uuid.uuid4().hex[:8]}")
    runner = JobRunner(store, tiny_llava, "w1")
    gate = threading.Event()
    gate.set()

    def publish(outputs):
        gate.wait(60)
        runner.publish(outputs)

    engine = LLMEngine(tiny_llava.model, tiny_llava.tokenizer, max_num_seqs=1, max_model_len=tiny_llava.context_len,
                       on_step=publish)
    runner.attach(engine)
    engine.start()
    threads = []

    def run(queue: str, tokens: int) -> str:
        job_id, _ = store.create(GenerateRequest(prompt="USER: Count. ASSISTANT:", temperature=0,
                                                 max_new_tokens=tokens), queue)
        threads.append(threading.Thread(target=runner.run, args=(job_id,)))
        threads[-1].start()
        return job_id

    def until(condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.01)

    try:
        running = run("batch", 64)
        until(lambda: store.get(running)["completion_tokens"] >= 1, "the first batch job never ran")
        gate.clear()
        later = [run("batch", 2), run("batch", 2), run("interactive", 2)]
        until(lambda: all(store.get(job_id)["prompt"] for job_id in later), "the jobs never reached the engine")
        time.sleep(0.3)  # from its prompt written to the engine's inbox
        assert store.get(running)["status"] == "running"
        gate.set()
        for thread in threads:
            thread.join(120)
        finished = {job_id: store.get(job_id)["finished_at"] for job_id in (running, *later)}
        assert all(store.get(job_id)["status"] == "succeeded" for job_id in finished)
        interactive = later[-1]
        assert finished[interactive] < min(finished[job_id] for job_id in later[:2]), finished
    finally:
        gate.set()
        engine.shutdown()
