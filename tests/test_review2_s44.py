"""Review of a request the engine can never run (error code 4): a resumed job is not taken for one.

A JobRunner with its engine in this process, on the default model and the test Redis (a key prefix of its own), driven
the way the Celery task drives it; the worker that died is a name that never announces itself.
"""

import uuid

import pytest

from shared.jobs import JobStore
from shared.protocol import ErrorCode, GenerateRequest
from test_worker_s40 import died_after


@pytest.fixture(scope="module")
def loaded(default_model_dir):
    from workers.builder import load_model

    return load_model(str(default_model_dir), device="cpu", dtype="float32")


def test_a_resumed_job_whose_text_tokenizes_longer_still_fits_the_budget_it_ran_in(redis_server, loaded):
    # A job's worker died after it generated a token whose text tokenizes anew as two (two bytes of no character,
    # each a replacement character: SmolLM2's token 10644). Its prompt on the next worker holds that text, one
    # position more than it was generated in: a job whose prompt and new tokens filled MAX_BATCH_TOKENS was refused
    # there ("shorten the prompt or lower max_new_tokens", error code 4, a 400), the client's error for a
    # request it did not change, after its text had streamed.
    from workers.engine import LLMEngine
    from workers.generation import JobRunner, prepare

    tokenizer = loaded.tokenizer
    generated = [19556, 10644, 905]  # "Hello", "��", " world"
    text = tokenizer.decode(generated)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) > len(generated)
    request = GenerateRequest(prompt="Say hello", max_new_tokens=8, temperature=0)
    budget = len(prepare(request, loaded, 1024).token_ids) + request.max_new_tokens

    store = JobStore.from_url(redis_server.url, prefix=f"llq-review2-{uuid.uuid4().hex[:8]}")
    runner = JobRunner(store, loaded, "w-new")
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=2, max_batch_tokens=budget,
                       max_model_len=loaded.context_len, on_step=runner.publish)
    runner.attach(engine)
    engine.start()
    try:
        job_id = died_after(store, request, text, len(generated))
        outcome = runner.run(job_id)
        record = store.get(job_id)
        assert outcome == "succeeded", (record["error_code"], record["error"])
        assert (record["status"], record["error_code"], record["finish_reason"]) == ("succeeded", ErrorCode.OK,
                                                                                      "length"), record
        assert record["text"].startswith(text)
        assert len(generated) < record["completion_tokens"] <= request.max_new_tokens
    finally:
        engine.shutdown()
        store.redis.close()
