"""A worker's job whose record is made of another type than a hash while it runs (a key SET by hand): the worker
drops it, ends it once and says so once."""

import logging
import uuid

from shared.jobs import JobStore
from shared.protocol import GenerateRequest
from workers.engine import SeqOutput
from workers.generation import JobRunner


def test_a_running_job_whose_record_is_made_of_another_type_is_ended_once_and_logged_once(redis_server, caplog):
    # Its chunk answered RECORD_DAMAGED: its ending went out in the step the engine dropped it in (logged there), and
    # again by its task, logged as an error with a traceback ("Redis refuses it for good").
    store = JobStore.from_url(redis_server.url, prefix=f"llq-s44r3-{uuid.uuid4().hex[:8]}")
    going_on, damaged = (store.create(GenerateRequest(prompt="p"), "interactive")[0] for _ in range(2))
    for job_id in (going_on, damaged):
        assert store.start(job_id, "w1") == "running"
    runner = JobRunner(store, loaded=None, worker_name="w1")
    runner.publish([SeqOutput(job_id, "A", "", 1, 1, first_token=True) for job_id in (going_on, damaged)])
    runner.flush()
    store.redis.delete(store.key(damaged))
    store.redis.set(store.key(damaged), "a record of another type")
    with caplog.at_level(logging.WARNING):
        runner.publish([SeqOutput(job_id, "b", "", 1, 2) for job_id in (going_on, damaged)])
        runner.flush()
        # The engine drops it at its next step (the going-on job's chunk with it); its task then ends it.
        dropped = SeqOutput(damaged, "", "Ab", 1, 2, finished=True, finish_reason="cancelled")
        runner.publish([SeqOutput(going_on, "c", "", 1, 3), dropped])
        runner._finish(dropped)
    said = [record for record in caplog.records if f"job {damaged}" in record.getMessage()]
    assert [(record.levelno, record.exc_info) for record in said] == [(logging.WARNING, None)], caplog.text
    assert "its key holds a string" in said[0].getMessage()
    assert not store.redis.hexists(store.running_key, damaged)
    record = store.get(going_on)
    assert (record["status"], record["text"]) == ("running", "Abc"), record
    store.redis.close()
