"""A job resumed after its worker died goes on as it would have: where its text ends, and how long it may get."""

import uuid

import pytest

from shared.jobs import JobStore
from shared.protocol import GenerateRequest


@pytest.fixture(scope="module")
def store(redis_server):
    store = JobStore.from_url(redis_server.url, prefix=f"llq-s40w-{uuid.uuid4().hex[:8]}")
    yield store
    store.redis.close()


def serve(loaded, store):
    """A JobRunner of the worker "w2" on an engine of its own, started; shut it down after."""
    from workers.engine import LLMEngine
    from workers.generation import JobRunner

    runner = JobRunner(store, loaded, "w2")
    engine = LLMEngine(loaded.model, loaded.tokenizer, max_num_seqs=4, max_model_len=loaded.context_len,
                       on_step=runner.publish)
    runner.attach(engine)
    engine.start()
    return runner, engine


def died_after(store, request: GenerateRequest, text: str, tokens: int) -> str:
    """A job that the worker "w1" started, wrote `text` of `tokens` tokens for, and died: claimed for a new
    delivery, as the orphan sweep claims it."""
    job_id, _ = store.create(request, "interactive")
    assert store.start(job_id, "w1") == "running"
    store.set_prompt(job_id, "the prompt", 1, "w1")
    store.record_step("w1", [(job_id, text, tokens, True)], [], 1)
    assert store.claim_orphans(requeue_after=0) == [job_id]
    return job_id


def test_a_job_whose_worker_died_inside_a_token_goes_on_as_it_would_have(store, default_model_dir):
    # A token's text that ends in the start of a stop string is held back, and what comes before it is written: " l"
    # with the stop "lies beneath" writes " ". A worker that died then left "A gentle " in the record, counting " l".
    # The worker that resumed the job tokenized that text anew, so its prompt ended in a lone space token, which the
    # model never makes: it went on with other text ("A gentle ire, a gentle ire" for "A gentle lapping of the
    # shore"), and its count held " l" twice.
    from workers.builder import load_model
    from workers.engine.detokenizer import Detokenizer

    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    tokenizer = loaded.tokenizer
    runner, engine = serve(loaded, store)
    try:
        request = GenerateRequest(messages=[{"role": "user", "text": "Write a haiku about the sea."}], temperature=0,
                                  max_new_tokens=24)
        whole_id, _ = store.create(request, "interactive")
        assert runner.run(whole_id) == "succeeded"
        whole = store.get(whole_id)
        ids = tokenizer(whole["text"], add_special_tokens=False).input_ids
        words = [index for index, token in enumerate(ids[:20])
                 if len(piece := tokenizer.decode([token])) > 2 and piece[0] == " " and piece[1:].isalpha()]
        assert len(words) >= 3, whole["text"]
        seen = []
        for index in words[-3:]:
            # A stop that starts as this word does and never comes: the answer is the same, but the worker holds the
            # word back when it comes, and writes the space before it.
            stop = tokenizer.decode([ids[index]])[1:] + "§"
            detokenizer = Detokenizer(tokenizer, stop)
            written = "".join(detokenizer.add(token) for token in ids[:index + 1])
            assert written.endswith(" "), written
            job_id = died_after(store, request.model_copy(update={"stop": stop}), written, index + 1)
            assert runner.run(job_id) == "succeeded"
            record = store.get(job_id)
            seen.append((written, record["text"], record["completion_tokens"], record["finish_reason"]))
        assert seen == [(written, whole["text"], whole["completion_tokens"], whole["finish_reason"])
                        for written, *_ in seen]
    finally:
        engine.shutdown()


def test_a_resumed_job_whose_text_takes_more_positions_anew_ends_at_the_context(store, tiny_llava_family):
    # The context guard counts the tokens a job generated, but its text is tokenized anew where it is resumed: an
    # invalid byte the model made is one token, and its replacement character three. Near the context, the prompt
    # and that text no longer fit, and the engine failed the job ("leaves no room in the model's context") instead of
    # ending it at the context's end, as it would have ended.
    from workers.builder import load_model

    loaded = load_model(str(tiny_llava_family.base), device="cpu", dtype="float32")
    runner, engine = serve(loaded, store)
    try:
        prompt = "USER: " + "What colour is the sky? " * 48 + "ASSISTANT:"
        prompt_tokens = len(loaded.tokenizer(prompt).input_ids)
        assert loaded.context_len - 40 < prompt_tokens < loaded.context_len - 20, prompt_tokens
        request = GenerateRequest(prompt=prompt, temperature=0, max_new_tokens=64)
        text = "A cat \ufffd\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd sat"
        assert len(loaded.tokenizer(text, add_special_tokens=False).input_ids) > loaded.context_len - prompt_tokens
        job_id = died_after(store, request, text, 12)
        assert runner.run(job_id) == "succeeded", store.get(job_id)["error"]
        record = store.get(job_id)
        assert (record["status"], record["finish_reason"], record["error"]) == ("succeeded", "length", "")
        assert record["text"] == text and record["completion_tokens"] == 12
    finally:
        engine.shutdown()


def test_a_resumed_job_that_ends_before_its_first_new_token_keeps_its_count(store, default_model_dir):
    # A resumed job whose text ends in white space counts one token fewer before, for its first new token makes the
    # last one again. Ended before it made one (here the model's output is not finite at once; a cancel does the
    # same), its count was one fewer than its record's text holds.
    import torch

    from workers.builder import load_model

    loaded = load_model(str(default_model_dir), device="cpu", dtype="float32")
    runner, engine = serve(loaded, store)
    try:
        request = GenerateRequest(prompt="Once upon a time", temperature=0, max_new_tokens=24)
        job_id = died_after(store, request, " there was a ", 4)
        embeddings = loaded.model.get_input_embeddings().weight
        [there] = loaded.tokenizer(" there", add_special_tokens=False).input_ids
        with torch.no_grad():
            embeddings[there] = float("inf")  # every later position of the prompt's forward is NaN
        assert runner.run(job_id) == "failed"
        record = store.get(job_id)
        assert "not finite" in record["error"], record["error"]
        assert (record["text"], record["completion_tokens"]) == (" there was a ", 4)
    finally:
        engine.shutdown()
