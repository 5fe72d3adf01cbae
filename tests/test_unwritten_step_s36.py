"""A step that cannot be written (Redis refusing the write, or away past the runner's wait) stops its jobs there,
failed with an error that says so, their records' text and token count as last written. The engine went on and the
jobs' next chunks were appended after the lost one's place: a hole in the text that nothing told of."""

import time
from contextlib import contextmanager

import pytest
import redis


def store_as(redis_url: str, user: str, prefix: str):
    """A job store on a client logged in as an ACL user of its own, whose scripts an admin can take away."""
    from shared.jobs import JobStore

    redis.Redis.from_url(redis_url).acl_setuser(user, enabled=True, nopass=True, keys=["~*"], channels=["*"],
                                                commands=["+@all"], reset=True)
    return JobStore(redis.Redis.from_url(redis_url, decode_responses=True, username=user, password="x"), prefix)


@contextmanager
def scripts_refused(redis_url: str, user: str):
    """Redis refuses `user`'s scripts (NOPERM, a permission taken away) for the block."""
    admin = redis.Redis.from_url(redis_url)
    admin.acl_setuser(user, commands=["-evalsha", "-eval"])
    try:
        yield
    finally:
        admin.acl_setuser(user, commands=["+evalsha", "+eval"])


# Written behind the engine too (a GPU's, or ENGINE_CPUS'), where the engine computes and hands over its next step
# while the failing write waits: that step, built before the failure was known, held the job's next chunk.
@pytest.mark.parametrize("write_behind", [False, True])
def test_a_step_that_cannot_be_written_fails_its_job_with_its_text_whole(redis_server, default_model_dir,
                                                                        write_behind):
    from shared.protocol import ErrorCode, GenerateRequest
    from shared.settings import Settings
    from workers.builder import load_model, serving_engine
    from workers.generation import JobRunner

    user = f"unwritten-{write_behind}"
    store = store_as(redis_server.url, user, prefix=user)
    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    runner = JobRunner(store, loaded, "w1", write_behind=write_behind)
    engine = serving_engine(loaded, Settings(), on_step=runner.publish)
    runner.attach(engine)
    engine.start()
    written: list[str] = []
    calls = [0]
    record_step = store.record_step

    def refuse_the_fifth_step(worker, chunks, endings, step=None):
        calls[0] += 1
        if calls[0] == 5:
            # Not a wait for Redis (a permission taken away): the write fails at once, as after the wait's end, here
            # once the engine has computed its next step.
            time.sleep(0.5)
            with scripts_refused(redis_server.url, user):
                return record_step(worker, chunks, endings, step)
        seqs = record_step(worker, chunks, endings, step)
        written.extend(delta for (_, delta, _, _), seq in zip(chunks, seqs) if seq > 0)
        return seqs

    store.record_step = refuse_the_fifth_step
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time, in a land far away,", temperature=0,
                                                 max_new_tokens=40), "interactive")
        result = runner.run(job_id)
        record = store.get(job_id)
        assert result == "failed", (calls, written, record)
        assert record["status"] == "failed" and record["error_code"] == ErrorCode.SERVER_ERROR, record
        assert "could not write the job's text to Redis" in record["error"] and "NoPermissionError" in record["error"]
        # The text is the chunks written before the lost one, no more: 4 steps, one token each.
        assert len(written) == 4 and record["text"] == "".join(written), (written, record["text"])
        assert record["completion_tokens"] == 4
        # The runner goes on: the next job runs as ever.
        job_id, _ = store.create(GenerateRequest(prompt="Hi", temperature=0, max_new_tokens=4), "interactive")
        assert runner.run(job_id) == "succeeded" and store.get(job_id)["completion_tokens"] >= 1
    finally:
        engine.shutdown()


def test_a_job_whose_last_step_cannot_be_written_ends_with_its_last_chunk(redis_server, default_model_dir):
    # The step that ends a job is lost: the job is not failed (it ran to its end), and its last chunk is written with
    # its ending, under that step's number (a try of the step that had reached Redis is not appended twice).
    from shared.protocol import GenerateRequest
    from shared.settings import Settings
    from workers.builder import load_model, serving_engine
    from workers.generation import JobRunner

    store = store_as(redis_server.url, "unwritten-last", prefix="unwritten-last")
    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    runner = JobRunner(store, loaded, "w1")
    engine = serving_engine(loaded, Settings(), on_step=runner.publish)
    runner.attach(engine)
    engine.start()
    refused = []
    record_step = store.record_step

    def refuse_the_first_ending(worker, chunks, endings, step=None):
        if endings and chunks and not refused:
            refused.append(step)
            with scripts_refused(redis_server.url, "unwritten-last"):
                return record_step(worker, chunks, endings, step)
        return record_step(worker, chunks, endings, step)

    store.record_step = refuse_the_first_ending
    try:
        job_id, _ = store.create(GenerateRequest(prompt="Once upon a time, in a land far away,", temperature=0,
                                                 max_new_tokens=6), "interactive")
        assert runner.run(job_id) == "succeeded" and refused
        record = store.get(job_id)
        assert (record["status"], record["completion_tokens"]) == ("succeeded", 6), record
        tokens = loaded.tokenizer(record["text"], add_special_tokens=False).input_ids
        assert len(tokens) == 6, record["text"]  # every token's text, the last chunk's too
    finally:
        engine.shutdown()
